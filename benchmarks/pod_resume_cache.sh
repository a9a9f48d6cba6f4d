#!/usr/bin/env bash
# What the compilation cache in the workdir saves a resumed run: a 2-process x 2-device
# simulated pod trains 2 steps, then the same command resumes it to 4 steps, once without a
# cache and once with JAX_COMPILATION_CACHE_DIR=<workdir>/jax_cache (what launch/tpu.py sets on
# the workers). Prints the time from the relaunch to its first step, and the whole relaunch.
#
#   bash benchmarks/pod_resume_cache.sh [SCRATCH_DIR]      # default /tmp/pod_resume_cache
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${1:-/tmp/pod_resume_cache}
PY=${PYTHON:-${VENV:-.venv}/bin/python}
FLAGS=(--config.data.image_size=16 --config.train_batch_size=16 --config.eval_batch_size=48
       "--config.data.eval_split=test[:10]" --config.knn_eval=False --config.log_every_steps=1
       --config.warmup_steps=1 --config.checkpoint_every_steps=2)
pod() {  # workdir, steps, extra launcher flags...
  local workdir=$1 steps=$2; shift 2
  "$PY" launch/simulate_pod.py --num_processes 2 --devices_per_process 2 \
    --config configs/smoke.py:pretrain --workdir "$workdir" "$@" -- "${FLAGS[@]}" \
    --config.train_steps="$steps" > /dev/null
}
for cache in off on; do
  workdir=$SCRATCH/$cache
  rm -rf "$workdir"
  if [ "$cache" = on ]; then
    export JAX_COMPILATION_CACHE_DIR=$workdir/jax_cache
  else
    unset JAX_COMPILATION_CACHE_DIR
  fi
  pod "$workdir" 2
  start=$(date +%s.%N)
  pod "$workdir" 4 --log_dir "$workdir/relaunch_logs"
  end=$(date +%s.%N)
  "$PY" - "$workdir/relaunch_logs/process0.log" "$start" "$end" "$cache" <<'PY'
import datetime
import re
import sys

log, start, end, cache = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
text = open(log).read()
match = re.search(r"^I(\d{4}) (\d\d:\d\d:\d\d\.\d+).*step 3/4", text, re.M)
year = datetime.date.today().year
first = datetime.datetime.strptime(f"{year}{match.group(1)} {match.group(2)}", "%Y%m%d %H:%M:%S.%f")
first = first.replace(tzinfo=datetime.timezone.utc).timestamp()
print(f"cache {cache}: first step {first - start:.1f} s after the relaunch, relaunch {end - start:.1f} s")
PY
done
