"""The launcher's memory gate (stdlib only): before `create` makes a slice or `run` starts a
run, compile the run's step for the slice's accelerator type here, with
`python -m simclr_jax.preflight`, and refuse what would not fit in HBM.

On a machine without JAX or libtpu (a laptop, macOS) the gate says so in one line, with the
command to run elsewhere, and lets the launch go ahead; --skip_preflight turns it off.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def check(
    config: str,
    accelerator: str,
    overrides: Sequence[str] = (),
    *,
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> None:
    """Runs the preflight; returns when the step fits or cannot be checked here, raises
    PreflightRefused with the preflight's reason when it does not fit or does not compile."""
    command = preflight_command(config, accelerator, overrides)
    missing = missing_tools()
    if missing:
        elsewhere = shlex.join(["python", *command[1:]])
        print(
            f"preflight skipped: this machine has no {missing}; on a linux x86_64 machine with "
            f"`pip install -e .[test]` run `{elsewhere}` (or pass --skip_preflight).",
            file=sys.stderr,
            flush=True,
        )
        return
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
        check(args.config, args.accelerator)


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
