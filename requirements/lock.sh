#!/usr/bin/env bash
# Regenerates the lock files from setup.py (needs PyPI and a Python of the version the workers
# and CI use; run it after changing install_requires or extras):
#   bash requirements/lock.sh                # PYTHON=python3.11 by default
# lock.txt: exact versions of install_requires + the `test` extra; CI (tests/run.sh) and every
#           TPU worker (launch/tpu.py install) install exactly these.
# tpu.txt:  what `jax[tpu]` adds on top of lock.txt (empty while libtpu is in the `test` extra,
#           hence in lock.txt); TPU workers only.
# torch.txt: what the `torch` extra adds on top of lock.txt (torch, torchvision and the CUDA
#           libraries PyPI's Linux torch needs even to import on a CPU); CI installs it for
#           tests/test_export.py, TPU workers never do.
# Resolution only (pip --dry-run --report): nothing is installed, only metadata is downloaded.
# Each line carries the sha256 of the file pip chose (linux x86_64 wheels), so installing the
# lock is in pip's hash-checking mode. KEEP=1 keeps every version already in lock.txt (to add
# a package or the hashes without upgrading anything).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip)
keep=()
if [ "${KEEP:-0}" = 1 ]; then
    sed 's/ --hash=.*//' requirements/lock.txt > "$tmp/keep.txt"
    keep=(-c "$tmp/keep.txt")
fi
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q --dry-run --ignore-installed --report "$tmp/base.json" "${keep[@]}" \
    '.[test]'
"$tmp/venv/bin/python" requirements/lock_report.py "$tmp/base.json" > requirements/lock.txt
"${pip[@]}" install -q --dry-run --ignore-installed --report "$tmp/tpu.json" \
    -c <(sed 's/ --hash=.*//' requirements/lock.txt) '.[test,tpu]'
"$tmp/venv/bin/python" requirements/lock_report.py "$tmp/tpu.json" \
    --minus requirements/lock.txt > requirements/tpu.txt
"${pip[@]}" install -q --dry-run --ignore-installed --report "$tmp/torch.json" \
    -c <(sed 's/ --hash=.*//' requirements/lock.txt) '.[test,torch]'
"$tmp/venv/bin/python" requirements/lock_report.py "$tmp/torch.json" \
    --minus requirements/lock.txt > requirements/torch.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages) and" \
    "requirements/tpu.txt ($(grep -c '==' requirements/tpu.txt)) and" \
    "requirements/torch.txt ($(grep -c '==' requirements/torch.txt))"
