#!/usr/bin/env bash
# Set-up and test in one command on a fresh machine: makes .venv, installs the locked
# dependencies (requirements/lock.txt, the exact versions TPU workers get too; with
# requirements/torch.txt, PyTorch for tests/test_export.py: PyPI's Linux torch is the CUDA build,
# which needs its nvidia-* libraries even to import on a CPU, about 5.5 GB; TORCH=0 leaves it out
# and those tests skip, except under CI=1) and the project, runs the whole suite (slow
# end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), "simclr_jax needs Python >= 3.11; set VENV to one made with python3.11"'
"$VENV/bin/python" -m pip install -q --upgrade pip
locks=(-r requirements/lock.txt)
[ "${TORCH:-1}" = 0 ] || locks+=(-r requirements/torch.txt)
"$VENV/bin/python" -m pip install -q "${locks[@]}"
"$VENV/bin/python" -m pip install -q --no-deps -e .
# Two phases: every test in 2 parallel workers, then the few that need most of the memory
# (marked `alone`), one at a time. Exit status 5 (nothing selected, e.g. under -m "not slow")
# is not a failure.
status=0
SIMCLR_TEST_PHASE=shared "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@" || status=$?
SIMCLR_TEST_PHASE=alone "$VENV/bin/python" -m pytest "$@" || { code=$?; [ "$code" = 5 ] || status=$code; }
[ "$status" = 5 ] && status=0
exit "$status"
