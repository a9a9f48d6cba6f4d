"""What the pod launchers share (stdlib only): the trainer's exit statuses and stop marker, the
--env assignments, the compilation cache's default place and the trainer's command line.

launch/tpu.py (Cloud TPU VMs) and launch/gke.py (GKE JobSets) import it from this folder; each
wraps the trainer's command in its own way (tpu.py: the workers' venv Python and the
jax.distributed flags; gke.py: the image's python, with JAX's own cluster detection).
"""

from __future__ import annotations

from collections.abc import Sequence

# Exit statuses of `python -m simclr_jax.main` and its stop marker, repeated from
# simclr_jax/preemption.py (the launchers cannot import jax; the tests check they agree).
EXIT_FINISHED = 0  # results.json written, or stopped on purpose (the stop marker exists)
EXIT_CONFIG_ERROR = 2  # configuration, argument or data error: a restart cannot help
EXIT_PREEMPTED = 42  # SIGTERM without the stop marker: a checkpoint was saved; restart
STOP_MARKER = "stop_requested"  # <workdir>/stop_requested: a SIGTERM means "stop", not "preempted"


def parse_env(pairs: Sequence[str]) -> list[tuple[str, str]]:
    """--env NAME=VALUE strings as (name, value) pairs; ValueError naming the first bad one."""
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--env {pair!r}: expected NAME=VALUE")
        out.append((name, value))
    return out


def jax_cache_dir(workdir: str, chosen: str = "") -> str:
    """The run's persistent compilation cache: --jax_cache, else <workdir>/jax_cache; '' for
    'none' (no cache)."""
    if chosen == "none":
        return ""
    return chosen or f"{workdir.rstrip('/')}/jax_cache"


def trainer_args(
    config: str, workdir: str, overrides: Sequence[str], launch_flags: Sequence[str] = ()
) -> list[str]:
    """The trainer's arguments after the Python executable: `-m simclr_jax.main --config=...
    --workdir=...`, then the launcher's own flags (e.g. jax.distributed's), then the overrides."""
    return [
        "-m", "simclr_jax.main", f"--config={config}", f"--workdir={workdir}",
        *launch_flags, *overrides,
    ]  # fmt: skip
