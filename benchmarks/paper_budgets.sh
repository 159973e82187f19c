#!/usr/bin/env bash
# The paper's experiments at the paper's budgets (issue 27; results in docs/results.md,
# "The paper at its budgets"). One item per call; every run checkpoints every 50 meta-steps, so
# the same call after an interruption goes on bit for bit, and a finished run is only
# meta-tested again. Runs go to $RUNS (default runs/paper).
#
#   bash benchmarks/paper_budgets.sh fig2 cosmixture 50shot-50val   # 5,000 meta-steps, seed 0, six methods
#   bash benchmarks/paper_budgets.sh seeds alpine 100shot-100val    # 1,000 meta-steps, seeds 0 1 2, four methods
#   bash benchmarks/paper_budgets.sh table2 jester 10shot-15val      # 100 inner steps, seeds 0 1 2
#   bash benchmarks/paper_budgets.sh figs34                          # memory and time against K (CPU)
#
# METHODS restricts a call to some methods (comma-separated), so that one setting can be split
# over processes, one per core, each with its own OUT_SUFFIX: move the method folders into one
# directory afterwards and call again without METHODS to meta-test them together.
set -euo pipefail
AMAML=${AMAML:-amaml-ext}
PY=${PYTHON:-python}
RUNS=${RUNS:-runs/paper}
DATA=${AMAML_DATA_ROOT:-../shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
item=${1:?usage: paper_budgets.sh fig2|seeds|table2|figs34 [task setting]}
task=${2:-}
setting=${3:-}

synthetic() {  # the paper's Sec. 5.1: T = 2 (200 steps, MAML 20) or T = 5 (500 steps, MAML 50)
  case $setting in
    50shot-50val) echo "--inner-steps 200 --maml-steps 20";;
    100shot-100val) echo "--inner-steps 500 --maml-steps 50";;
    *) echo "setting $setting: 50shot-50val or 100shot-100val" >&2; exit 2;;
  esac
}

case $item in fig2|seeds) steps=$(synthetic);; esac   # set -e: a bad setting stops here

case $item in
  fig2)
    $AMAML compare --task "$task" --setting "$setting" $steps --meta-steps 5000 --compile --quiet \
        ${METHODS:+--methods $METHODS} --out "$RUNS/fig2_${task}_${setting}${OUT_SUFFIX:-}";;
  seeds)
    for s in ${SEEDS:-0 1 2}; do
      $AMAML compare --task "$task" --setting "$setting" $steps --meta-steps 1000 --compile --quiet \
          --methods "${METHODS:-amaml,maml,imaml,reptile}" --seed "$s" \
          --out "$RUNS/seeds_${task}_${setting}_s$s${OUT_SUFFIX:-}"
    done
    $PY -m benchmarks.seed_spread "$RUNS"/seeds_"${task}_${setting}"_s*/compare.json;;
  table2)  # the paper's Table 2: 100 inner GD steps (A-MAML T = 1), MAML 10
    for s in ${SEEDS:-0 1 2}; do
      $AMAML compare --task "$task" --data-root "$DATA" --setting "$setting" --inner-steps 100 --maml-steps 10 \
          --meta-steps 5000 --compile --quiet --seed "$s" ${METHODS:+--methods $METHODS} \
          --out "$RUNS/table2_${task}_${setting}_s$s${OUT_SUFFIX:-}"
    done
    $PY -m benchmarks.seed_spread "$RUNS"/table2_"${task}_${setting}"_s*/compare.json
    $PY -m benchmarks.rating_references --data-root "$DATA" --task "$task" --setting "$setting";;
  figs34)  # the paper's Figs. 3-4 on this machine's CPU: CosMixture 100shot-100val, meta-batch 5
    $PY -m benchmarks.meta_grad --model cosmixture --tasks 5 --threads 1 --ks 10,20,50,100,200,500,1000,2000 \
        --mem-limit 4 --repeats 2 --timeout 120 \
        --methods ours_store,ours_dopri5_ckpt,ours_exact_linearise,ours_exact,ours_checkpoint,ours_revolve,maml_unrolled,learner_imaml,learner_fomaml,learner_reptile \
        --out "$RUNS/inner_steps_cosmixture_cpu.json"
    $PY -m benchmarks.inner_steps "$RUNS/inner_steps_cosmixture_cpu.json" --clock cpu \
        --out "$RUNS/inner_steps_cosmixture_cpu.png";;
  *) echo "unknown item $item: fig2, seeds, table2 or figs34" >&2; exit 2;;
esac
