#!/usr/bin/env bash
# The Performance issue's GPU figures (target 6) in one short job, for a
# lent GPU machine whose Python has JAX (CUDA), flax, optax, chex and
# PyTorch but no registry. Run from the repository root:
#
#   bash benchmarks/gpu.sh            # on the GPU machine; logs under $OUT
#   SMOKE=1 bash benchmarks/gpu.sh    # tiny sizes, any machine (a test)
#
# Missing pure-Python packages of the experiments (ml_collections, tqdm,
# PyYAML, absl-py) are installed from ./.gpu-wheels (`make gpu-wheels`,
# carried with the tree) into ./.gpu-site. Sections, each a separate
# process: (1) the MultiMNIST step, JAX against PyTorch on the same device,
# alternating A B A B; (2) the vmapped K = 40 solver at batches 1 ... 4096;
# (3) seconds per MultiMNIST epoch, chunked lax.scan against a step per
# call; (4) bench_step's tables (the first layer's two forms included).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
LOG="$OUT/gpu-bench.log"
export PYTHONPATH="$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch runs after JAX

if ! $PY -c 'import ml_collections, tqdm, yaml, absl' 2>/dev/null; then
  $PY -m pip install --quiet --no-index --no-deps --find-links .gpu-wheels \
    --target .gpu-site ml_collections tqdm PyYAML absl-py \
    || echo "could not install the experiments' packages from .gpu-wheels"
fi

if [ "${SMOKE:-0}" = 1 ]; then
  REPEATS=2; BLOCKS=1; BATCHES="1 64"; FAMILIES=iid; SOLVER_REPEATS=1
  EPOCH_ARGS="--train 2560 --chunks 1,5 --methods mgda_ub"; STEP_ARGS="--repeats 4 --only-conv"
else
  REPEATS=30; BLOCKS=2; BATCHES="1 64 1024 4096"; FAMILIES=iid,hard,rankdef
  SOLVER_REPEATS=5; EPOCH_ARGS=""; STEP_ARGS="--repeats 30 --conv"
fi
TORCH_DEVICE=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo none)

status=0
run() {  # a titled section; its output into the log too
  echo "== $1" | tee -a "$LOG"
  shift
  "$@" 2>&1 | grep -v -e 'batch/s\]' -e 's/batch\]' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "   (exit $rc)" | tee -a "$LOG"; status=1; }
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c 'import jax; print("jax", jax.__version__, jax.devices())'
  echo "torch device: $TORCH_DEVICE"; } 2>&1 | tee -a "$LOG"

for k in 2 40; do
  for block in $(seq "$BLOCKS"); do
    run "step K=$k, jax, block $block" $PY -m benchmarks.peer_worker \
      --framework jax --tasks $k --repeats $REPEATS
    if [ "$TORCH_DEVICE" != none ]; then
      run "step K=$k, torch ($TORCH_DEVICE), block $block" $PY -m \
        benchmarks.peer_worker --framework torch --tasks $k \
        --repeats $REPEATS --device "$TORCH_DEVICE"
    fi
  done
done
for batch in $BATCHES; do
  run "solver, K=40, vmapped batch $batch" $PY -m benchmarks.bench_solver \
    --batch "$batch" --families "$FAMILIES" --repeats $SOLVER_REPEATS
done
run "seconds per epoch" $PY -m benchmarks.bench_epoch $EPOCH_ARGS
run "training steps (bench_step)" $PY -m benchmarks.bench_step $STEP_ARGS
echo "log: $LOG (exit $status)"
exit $status
