"""The launcher's memory gate (stdlib only): before `create` makes a slice or `run` starts a
run, compile the run's step for the slice's accelerator type here, with
`python -m simclr_jax.preflight`, and refuse what would not fit in HBM.

The launcher's own Python need not have JAX (it is stdlib only): the gate then uses the
project's environment, $SIMCLR_JAX_VENV (a virtual environment's directory, or a Python
executable) or else the checkout's .venv, and says which. Where none has JAX and libtpu (a
laptop, macOS) the gate says so in one line, with the command to run elsewhere, and lets the
launch go ahead; --skip_preflight turns it off.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_ENV = "SIMCLR_JAX_VENV"  # the project's environment, when the launcher's Python lacks JAX
HAS_TOOLS = (
    "import importlib.util as u, sys; "
    "sys.exit(0 if u.find_spec('jax') and u.find_spec('libtpu') else 3)"
)


class PreflightRefused(Exception):
    """The run would not fit (or not compile) on the slice: one line naming the figure."""


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The gate's flags: --skip_preflight on create, run and supervise; create's --config."""
    if command not in ("create", "run", "supervise"):
        return
    parser.add_argument(
        "--skip_preflight",
        action="store_true",
        help="do not compile the step for the slice here before launching",
    )
    if command == "create":
        parser.add_argument(
            "--config",
            default="",
            help="configs/<file>.py[:arg] the slice is for: refuse to create it if the step "
            "does not fit",
        )


def preflight_command(
    config: str, accelerator: str, overrides: Sequence[str], python: str = sys.executable
) -> list[str]:
    """The local preflight command line for a run's config on an accelerator type."""
    return [
        python, "-m", "simclr_jax.preflight", f"--config={config}", f"--tpu={accelerator}",
        *overrides,
    ]  # fmt: skip


def missing_tools() -> str | None:
    """What this machine lacks to compile for TPU ('JAX', 'libtpu'), or None."""
    for module, name in (("jax", "JAX"), ("libtpu", "libtpu")):
        if importlib.util.find_spec(module) is None:
            return name
    return None


def project_python() -> tuple[str, str]:
    """(python, where it came from) of the project's environment: $SIMCLR_JAX_VENV (a venv
    directory or a Python executable), else <checkout>/.venv; ('', '') when there is none."""
    chosen = os.environ.get(VENV_ENV, "")
    candidates = [(chosen, f"${VENV_ENV}")] if chosen else []
    candidates.append((str(REPO / ".venv"), f"{REPO / '.venv'}"))
    for path, source in candidates:
        python = Path(path) / "bin" / "python" if Path(path).is_dir() else Path(path)
        if python.is_file() and os.access(python, os.X_OK):
            return str(python), source
        if path == chosen:
            raise PreflightRefused(f"${VENV_ENV}={chosen}: no Python there (expected a virtual "
                                   "environment's directory or a Python executable)")  # fmt: skip
    return "", ""


def gate_python() -> tuple[str, str]:
    """(the Python that runs the preflight, '' or a line saying which and why); ('', reason)
    when no Python here has JAX and libtpu."""
    missing = missing_tools()
    if not missing:
        return sys.executable, ""
    python, source = project_python()
    if python:
        found = subprocess.run([python, "-c", HAS_TOOLS], capture_output=True)
        if found.returncode == 0:
            return python, (f"preflight: this Python ({sys.executable}) has no {missing}; using "
                            f"the project's {python} (from {source})")  # fmt: skip
        return "", f"neither this Python nor {python} (from {source}) has JAX and libtpu"
    return "", (f"this Python ({sys.executable}) has no {missing}, and there is no project "
                f"environment (${VENV_ENV} unset, no {REPO / '.venv'})")  # fmt: skip


def check(
    config: str,
    accelerator: str,
    overrides: Sequence[str] = (),
    *,
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> None:
    """Runs the preflight; returns when the step fits or cannot be checked here, raises
    PreflightRefused with the preflight's reason when it does not fit or does not compile."""
    python, said = gate_python()
    command = preflight_command(config, accelerator, overrides, python or "python")
    if not python:
        elsewhere = shlex.join(["python", *command[1:]])
        print(
            f"preflight skipped: {said}; set ${VENV_ENV} to the project's virtual environment "
            f"(`pip install -e .[test]` on linux x86_64), or run `{elsewhere}` there (or pass "
            "--skip_preflight).",
            file=sys.stderr,
            flush=True,
        )
        return
    if said:
        print(said, flush=True)
    print(f"$ {shlex.join(command)}", flush=True)
    result = runner(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    print(result.stdout, end="", flush=True)
    if result.returncode == 0:
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {result.returncode}"
    raise PreflightRefused(
        f"{reason.removeprefix('preflight: ')} -- refused before launching; fix the config or "
        "pass --skip_preflight"
    )


def accelerator_from_describe(describe_json: str) -> str:
    """The accelerator type (e.g. 'v4-32') from `gcloud ... tpu-vm describe --format=json`."""
    return str(json.loads(describe_json or "{}").get("acceleratorType", ""))


def gate_create(args: argparse.Namespace) -> None:
    """`create`: checks args.config (if given) on args.accelerator before anything is made."""
    if getattr(args, "config", "") and not args.skip_preflight:
        check(args.config, args.accelerator, getattr(args, "override", ()))


def gate_run(args: argparse.Namespace, describe: Callable[[], str]) -> None:
    """`run`: checks the run's config on the slice's accelerator type (from describe)."""
    if args.skip_preflight:
        return
    if args.dry_run:
        print("preflight: skipped in a dry run (the accelerator type comes from describe)")
        return
    accelerator = accelerator_from_describe(describe())
    if not accelerator:
        print("preflight skipped: describe did not name the accelerator type", file=sys.stderr)
        return
    check(args.config, accelerator, args.override)
