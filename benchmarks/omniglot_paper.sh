#!/usr/bin/env bash
# Omniglot 20-way 1-shot at the paper's width (Conv4, 64 channels; Table 3): exact A-MAML at
# T = 0.5 (5 GD steps of 0.1) and T = 1.0 (10 steps of 0.1) against MAML (5 steps of 0.1),
# meta-batch 5, Adam 1e-3, each for every seed in SEEDS; then every run is meta-tested on the
# same 600 episodes of the held-out characters and tabled against MAML (paired per episode).
#
#   CPU, the budget that fits a 2-core machine (docs/results.md):
#     AMAML_DATA_ROOT=../shared/data META_STEPS=300 SEEDS="0 1 2" bash benchmarks/omniglot_paper.sh
#   GPU, the paper's budget (5,000 meta-steps), one seed per call within a 10-minute limit:
#     AMAML_DATA_ROOT=omniglot_data DEVICE=cuda META_STEPS=5000 SEEDS=0 bash benchmarks/omniglot_paper.sh
#   On a lent device machine (docs/benchmarks.md, GPU) the data do not travel by themselves:
#   copy ../shared/data/omniglot into a folder git ignores (echo /omniglot_data/ >> .git/info/exclude;
#   mkdir -p omniglot_data && cp -r ../shared/data/omniglot omniglot_data/), name it in the call's
#   carry (omniglot_data), build there first (pip install --no-build-isolation --no-deps -e .),
#   and bring back $RUNS/table.md and the runs' eval.json. Never commit the data.
#
# Every run checkpoints every 50 meta-steps: run the same line again after an interruption (or
# a time limit) and it goes on from there, bit for bit. Runs go to $RUNS (default
# runs/omniglot64), the table and plot to $RUNS/table.md and $RUNS/valid.png.
set -euo pipefail
: "${AMAML_DATA_ROOT:?set AMAML_DATA_ROOT to the folder holding omniglot/}"
DEVICE=${DEVICE:-cpu}
META_STEPS=${META_STEPS:-300}
SEEDS=${SEEDS:-0}
CHANNELS=${CHANNELS:-64}
RUNS=${RUNS:-runs/omniglot64}
AMAML=${AMAML:-amaml-ext}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

C="--task omniglot --data-root $AMAML_DATA_ROOT --channels $CHANNELS --ways 20 --shots 1 --meta-steps $META_STEPS
   --device $DEVICE --inner-lr 0.1 --quiet"
runs=()
for s in $SEEDS; do
  $AMAML train $C --seed "$s" --method maml --maml-steps 5 --inner-steps 5 --out "$RUNS/maml5_s$s"
  for k in 5 10; do   # T = 0.5 and T = 1.0 on the grid h = 0.1
    $AMAML train $C --seed "$s" --method amaml --solver euler --adjoint discrete --inner-steps "$k" \
        --out "$RUNS/exact${k}_s$s"
  done
  runs+=("$RUNS/maml5_s$s" "$RUNS/exact5_s$s" "$RUNS/exact10_s$s")
done
for r in "${runs[@]}"; do $AMAML evaluate --run "$r" --device "$DEVICE"; done
first=${SEEDS%% *}
$PY -m benchmarks.run_table --ref "maml5_s$first" "${runs[@]}" --plot "$RUNS/valid.png" | tee "$RUNS/table.md"
