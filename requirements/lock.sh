#!/usr/bin/env bash
# Regenerates the lock files from setup.py (needs PyPI and a Python of the version the workers
# and CI use; run it after changing install_requires or extras):
#   bash requirements/lock.sh                # PYTHON=python3.11 by default
# lock.txt: exact versions of install_requires + the `test` extra; CI (tests/run.sh) and every
#           TPU worker (launch/tpu.py install) install exactly these.
# tpu.txt:  what `jax[tpu]` adds on top of lock.txt (libtpu); TPU workers only.
# Resolution only (pip --dry-run --report): nothing is installed, only metadata is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q --dry-run --ignore-installed --report "$tmp/base.json" '.[test]'
"$tmp/venv/bin/python" requirements/lock_report.py "$tmp/base.json" > requirements/lock.txt
"${pip[@]}" install -q --dry-run --ignore-installed --report "$tmp/tpu.json" \
    -c requirements/lock.txt '.[test,tpu]'
"$tmp/venv/bin/python" requirements/lock_report.py "$tmp/tpu.json" \
    --minus requirements/lock.txt > requirements/tpu.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages) and" \
    "requirements/tpu.txt ($(grep -c '==' requirements/tpu.txt))"
