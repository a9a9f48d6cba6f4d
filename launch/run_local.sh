#!/usr/bin/env bash
# The README's main job on a CPU: set-up (.venv on first use), then SimCLR pretraining on the
# bundled CIFAR-10 sample, a linear evaluation restoring that pretraining workdir, and the
# SimCLRv2 semi-supervised chain: fine-tuning on 10% of the labels, then distillation of that
# fine-tuned teacher into a student on all (unlabeled) training images.
#
#   bash launch/run_local.sh [WORKDIR]        # default /tmp/simclr_smoke
#
# Re-running resumes (or skips) finished phases: each phase resumes from its own checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-${WORKDIR:-/tmp/simclr_smoke}}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements/lock.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
PY="$VENV/bin/python"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}  # a CPU job: libtpu (in the lock) need not look for a TPU

run_phase() {  # name, extra flags...: runs one phase, shows its metric lines, fails loudly
  local name=$1; shift
  mkdir -p "$WORKDIR"
  echo "== $name -> $WORKDIR/$name"
  set +e
  "$PY" -m simclr_jax.main --config="configs/smoke.py:$name" --workdir="$WORKDIR/$name" "$@" 2>&1 \
    | tee "$WORKDIR/$name.log" \
    | grep --line-buffered -E "logging_writer|Restored from|Results:|Error" 
  local status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "$name failed (exit $status); full log: $WORKDIR/$name.log" >&2
    exit "$status"
  fi
}

start=$(date +%s)
run_phase pretrain
run_phase linear_eval --config.init_checkpoint="$WORKDIR/pretrain"
run_phase finetune --config.init_checkpoint="$WORKDIR/pretrain" --config.knn_eval=False
run_phase distill --config.init_checkpoint="$WORKDIR/pretrain" \
  --config.distill.teacher_checkpoint="$WORKDIR/finetune" --config.knn_eval=False
for phase in pretrain linear_eval finetune distill; do
  echo "== $WORKDIR/$phase/results.json"
  cat "$WORKDIR/$phase/results.json"
done
echo "== total wall time: $(( $(date +%s) - start )) s"
