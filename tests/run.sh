#!/usr/bin/env bash
# Set-up and test in one command on a fresh machine: makes .venv, installs the locked
# dependencies (requirements/lock.txt, the exact versions TPU workers get too) and the project,
# runs the whole suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), "simclr_jax needs Python >= 3.11; set VENV to one made with python3.11"'
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements/lock.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@"
