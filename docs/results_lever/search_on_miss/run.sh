#!/usr/bin/env bash
# --search-on-miss 0.5 against today's default, side by side: label noise 0.1 on the rare tastes (3 seeds), then
# label noise 0 on every set and taste (seeds 0 and 1). Resumable per job.
V=$1   # base | miss
cd /work/bench-miss
export PYTHONPATH=/work/bench-miss/src OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
SET=""; [ "$V" = miss ] && SET="--set session.search_on_miss=0.5"
O=/work/runs/miss
$PY benchmarks/align_results.py --prefer --taste style:7:thick style:3:slant-right like:400,437,468 --seeds 0,1,2 \
  --label-noise 0.1 --final noise+move:500 --peers '' $SET --jobs 1 --threads 1 --out $O/${V}_mnist_n01
$PY benchmarks/align_results.py --prior fashion --prefer --taste style:0:large --seeds 0,1,2 \
  --label-noise 0.1 --final noise+move:500 --peers '' $SET --jobs 1 --threads 1 --out $O/${V}_fashion_n01
$PY benchmarks/align_results.py --prefer 1,4,7,9 0 3,8 2,5 5,6 0,3,7 --taste style:7:thick style:3:slant-right like:400,437,468 \
  --seeds 0,1 --final noise+move:500 --peers '' $SET --jobs 1 --threads 1 --out $O/${V}_mnist_n0
$PY benchmarks/align_results.py --prior fashion --prefer 5,7,9 --taste style:0:large --seeds 0,1 \
  --final noise+move:500 --peers '' $SET --jobs 1 --threads 1 --out $O/${V}_fashion_n0
