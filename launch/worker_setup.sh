#!/usr/bin/env bash
# Runs on every TPU VM worker (sent by `launch/tpu.py install`): makes a virtual environment with
# Python >= 3.11 at VENV and installs the locked dependencies and the source tree SRC into it.
#   bash worker_setup.sh SRC VENV PYTHON_VERSION LOCK [EXTRA_LOCK|-] [-- PIP_ARGS...]
# The TPU VM images ship Python 3.10, too old for jax >= 0.7 / flax 0.12: when no
# python<PYTHON_VERSION> is on PATH, a standalone CPython is fetched with uv (installed with the
# image's pip). PIP_ARGS (e.g. --no-index --find-links=DIR for an offline wheel directory) go to
# every pip install. Prints one line per stage; the last line says which stack was installed.
set -euo pipefail
src=$1 venv=$2 version=$3 lock=$4 extra=${5:--}
shift $(($# < 5 ? $# : 5))
[ "${1:-}" = "--" ] && shift
pip_args=("$@")
UV_VERSION=0.13.9

python=$(command -v "python$version" || true)
if [ -z "$python" ]; then
    echo "setup: no python$version on PATH; installing uv==$UV_VERSION and CPython $version"
    python3 -m pip install -q --user "${pip_args[@]}" "uv==$UV_VERSION"
    "$HOME/.local/bin/uv" python install "$version"
    python=$("$HOME/.local/bin/uv" python find "$version")
fi
"$python" -c "import sys; assert sys.version_info >= (3, 11), sys.version" || {
    echo "setup: $python is Python $("$python" -V 2>&1); simclr_jax needs >= 3.11" >&2
    exit 1
}
echo "setup: virtual environment $venv from $python"
"$python" -m venv "$venv"
requirements=(-r "$lock")
[ "$extra" != "-" ] && requirements+=(-r "$extra")
echo "setup: pip install ${requirements[*]} ${pip_args[*]}"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pip_args[@]}" \
    "${requirements[@]}"
# No build isolation: setuptools comes with the venv, so nothing is fetched to build it.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    --no-build-isolation "${pip_args[@]}" "$src"
cd /
"$venv/bin/python" -c "import sys, jax, flax, simclr_jax
print(f'setup: done: Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}')"
