#!/usr/bin/env bash
# Set-up and test in one command on a fresh machine: makes .venv, installs the project
# with its test extras, runs the whole suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@"
