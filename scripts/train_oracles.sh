#!/usr/bin/env bash
# Train and export the shipped oracles on one CPU thread (runs resume from runs/oracle-<dataset>).
# Usage: scripts/train_oracles.sh [mnist] [fashion]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
datasets=("$@")
[ ${#datasets[@]} -eq 0 ] && datasets=(mnist fashion)
for dataset in "${datasets[@]}"; do
  "$PY" - "$dataset" <<'PYEOF'
import json, sys
import torch
torch.set_num_threads(1)
from apa.training.oracle import export_from_run, train_oracle
dataset = sys.argv[1]
run_dir = f"runs/oracle-{dataset}"
train_oracle(dataset, run_dir, progress=False)
path, info = export_from_run(dataset, run_dir)
print(path)
print(json.dumps(info, indent=1))
PYEOF
done
