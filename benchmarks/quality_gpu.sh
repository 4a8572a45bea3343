#!/usr/bin/env bash
# The GPU quality table (issue 9, deliverable 7) in one sitting: the five methods of benchmarks/quality.py trained
# at once on one GPU, each for the same training wall clock, with the same share of the CPU cores for its loader.
#
# Why at once: the demo ViT (5 tokens of 192 dims) leaves a GPU nearly idle; a run is bound by the loader's
# CPU augmentations (~750 images/s per core for two 28-px crops), so the methods in turn would each get all the
# cores for a fifth of the time, and five at once each get a fifth of the cores for all of it (the same images
# per method, and the start-up and evaluations overlap). Equal budgets and equal loader workers keep the
# comparison fair; the images/s of a row is its share, not what one method alone reaches on the machine.
#
# Usage: benchmarks/quality_gpu.sh [BUDGET] [WORKERS_PER_METHOD] [RESULTS_DIR] [DOCS_DIR] [EXTRA...]
#   BUDGET: training minutes per method (5.5), or epochs with the suffix "ep" (100ep: --epochs 100; the methods
#   with cheaper steps end first and leave the cores to the others)
#   e.g. benchmarks/quality_gpu.sh 6 3 benchmarks/results docs --root /path/to/fashion-mnist
# (paths relative to the repository root; logs in $LOGS, default runs/quality_gpu_logs; ACCELERATOR and PRECISION
# override gpu and bf16-mixed, e.g. for a smoke run on a CPU; PYTHON the interpreter, default python3)
# then:  python benchmarks/quality.py --report
set -u
LAUNCHER="benchmarks/quality_gpu.sh $*"
BUDGET=${1:-6}
WORKERS=${2:-3}
RESULTS=${3:-benchmarks/results}
DOCS=${4:-docs}
shift $(($# < 4 ? $# : 4))
cd "$(dirname "$0")/.." || exit 1  # relative paths are the repository's
LOGS=${LOGS:-runs/quality_gpu_logs}
mkdir -p "$LOGS" "$RESULTS" "$DOCS"
if [[ $BUDGET == *ep ]]; then budget=(--epochs "${BUDGET%ep}"); else budget=(--budget "$BUDGET"); fi
pids=()
for method in sop dino ibot dino_vmf ibot_vmf; do
    OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/quality.py --methods "$method" "${budget[@]}" \
        --results "$RESULTS" --docs "$DOCS" --runs runs/quality_gpu --launcher "$LAUNCHER" \
        --set trainer.accelerator="${ACCELERATOR:-gpu}" --set trainer.precision="${PRECISION:-bf16-mixed}" \
        --set data.init_args.batch_size=256 --set data.init_args.num_workers="$WORKERS" "$@" \
        >"$LOGS/$method.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
