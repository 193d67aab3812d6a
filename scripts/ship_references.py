"""Draw the plain prior samples a report compares every final batch with, once, and ship them beside
the built-in priors' weights (``apa/weights/reference_<weights sha256[:24]>_25_512.safetensors``).

They are a pure function of the weights (seed 0, the default 25 steps, 512 samples), named by the
weights' digest, so a retrained prior never reads another's; without a shipped file a session draws
them on its first report and caches them per machine (``evaluation.novelty.prior_reference``).

    .venv/bin/python scripts/ship_references.py            # mnist and fashion
"""

from __future__ import annotations

import argparse

from safetensors.torch import save_file

from apa.config import SamplerConfig
from apa.data import file_sha256
from apa.measures.novelty import REFERENCE_SAMPLES, draw_reference, reference_name
from apa.priors.ddpm import load_prior, weights_path
from apa.shipped import shipped_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,fashion")
    args = ap.parse_args()
    steps = SamplerConfig().steps
    for dataset in args.datasets.split(","):
        sha = file_sha256(weights_path(dataset))
        path = shipped_path(reference_name(sha, steps, REFERENCE_SAMPLES))
        z = draw_reference(load_prior(dataset), steps)
        save_file({"particles": z.contiguous()}, str(path),
                  metadata={"prior_sha256": sha, "steps": str(steps), "seed": "0", "dataset": dataset})
        print(f"{dataset}: {tuple(z.shape)} -> {path}")


if __name__ == "__main__":
    main()
