#!/usr/bin/env bash
# One prepared run for a GPU or TPU machine, sized to finish within 8 minutes on
# one H200 (not yet run on one):
#  (a) ResNet-50 at 224 px in bfloat16: step time, images/s and MFU at the largest batch that
#      fits, with and without on-device augmentation (bench_augment_step.py --batch max);
#  (b) CIFAR-10 ResNet-18 pretraining throughput with the TF-free input path
#      (data.backend='jax': Grain decodes and crops on the host, the device augments), on the
#      CIFAR-10 JPEGs of ../shared/data, or on the bundled sample where they are absent.
# Every table goes to stdout and to OUT_DIR/accelerator.md (copy it into benchmarks/README.md).
#
#   bash benchmarks/accelerator.sh [OUT_DIR]          # default OUT_DIR: ${OUT:-/tmp}/accelerator
#   TINY=1 bash benchmarks/accelerator.sh OUT_DIR     # minutes on a CPU: tiny sizes, same paths
#
# Needs the project's dependencies except TensorFlow (a GPU machine without a registry: carry
# wheels, `pip download -d wheels -r requirements/lock.txt`, install them with --no-index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${1:-${OUT:-/tmp}/accelerator}
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/accelerator.md"
CIFAR_TAR=${CIFAR_TAR:-../shared/data/cifar10-train-jpeg.tar.gz}

if [ "${TINY:-0}" = 1 ]; then
    STEP_ARGS=(--work r18_32 --batch 16 --steps 1 --dtype bfloat16)
    CIFAR_STEPS=4 CIFAR_BATCH=16 EVAL_SPLIT="train[4500:4510]"  # 10 images per class
else
    STEP_ARGS=(--work r50_224 --batch max --steps 10 --dtype bfloat16)
    CIFAR_STEPS=300 CIFAR_BATCH=1024 EVAL_SPLIT="train[4500:]"
fi

"$PYTHON" - <<'EOF' | tee "$REPORT"
import datetime, jax, platform
print(f"# accelerator.sh, {datetime.date.today()}: {jax.device_count()} x "
      f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {platform.node()}\n")
EOF

echo "## (a) pretraining step, with and without on-device augmentation" | tee -a "$REPORT"
"$PYTHON" benchmarks/bench_augment_step.py "${STEP_ARGS[@]}" | tee -a "$REPORT"

echo -e "\n## (b) CIFAR-10 ResNet-18 pretraining, data.backend='jax'" | tee -a "$REPORT"
if [ -f "$CIFAR_TAR" ]; then
    tar -xzf "$CIFAR_TAR" -C "$OUT_DIR"  # train/<class>/<n>.jpg
    CIFAR_ARG=val
    data_flags=(--config.data.data_dir="$OUT_DIR" --config.data.eval_split="$EVAL_SPLIT")
else
    echo "($CIFAR_TAR not found: the bundled sample instead)" | tee -a "$REPORT"
    CIFAR_ARG=val,runlocal
    data_flags=()
fi
workdir="$OUT_DIR/cifar10_workdir"
rm -rf "$workdir"  # this script's own scratch run, never a user's
"$PYTHON" -m simclr_jax.main --config="configs/cifar10_pretrain.py:$CIFAR_ARG" \
    --workdir="$workdir" "${data_flags[@]}" \
    --config.data.backend=jax --config.train_steps="$CIFAR_STEPS" \
    --config.train_batch_size="$CIFAR_BATCH" --config.warmup_steps=1 \
    --config.log_every_steps=$((CIFAR_STEPS / 4)) --config.checkpoint_every_steps=0 \
    --config.eval_every_steps=0 --config.knn_eval=False >"$OUT_DIR/cifar10.log" 2>&1 \
    || { tail -30 "$OUT_DIR/cifar10.log"; exit 1; }
"$PYTHON" - "$workdir/metrics.jsonl" "$CIFAR_BATCH" <<'EOF' | tee -a "$REPORT"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rates = [(r["step"], r["images_per_sec"]) for r in rows if "images_per_sec" in r]
assert rates, f"no images_per_sec in {sys.argv[1]}"
print(f"\nbatch {sys.argv[2]} images (2 views each); the first window includes compilation\n")
print("| steps up to | images/s |")
print("|---|---|")
for step, rate in rates:
    print(f"| {step} | {rate:,.1f} |")
EOF
echo -e "\nwrote $REPORT"
