"""Preemption notices (SIGTERM, as spot / preemptible TPU VMs send): every process agrees on
one step, the training loop saves a checkpoint there and stops; the relaunched job resumes.

Multi-process runs use JAX's preemption sync manager: `jax.distributed.initialize` installs a
SIGTERM listener, tells every process when any one of them is notified, and
`reached_preemption_sync_point(step)` turns True on all of them at the same step. A single
process needs no agreement: a Python SIGTERM handler sets a flag the loop checks every step.

The exit status tells a scheduler what happened (JobSet / xpk and `launch/tpu.py supervise`
restart on EXIT_PREEMPTED and never on EXIT_CONFIG_ERROR); the launchers repeat these numbers
and the marker name, since they cannot import JAX.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils

EXIT_FINISHED = 0  # results.json written, or stopped on purpose (the stop marker was there)
EXIT_CONFIG_ERROR = 2  # a config, argument or data error: one line on stderr; never restart
EXIT_PREEMPTED = 42  # SIGTERM without the stop marker, checkpoint saved: restart to resume
# `launch/tpu.py stop` writes <workdir>/STOP_MARKER before it sends SIGTERM: the run then saves
# and exits EXIT_FINISHED, so a scheduler does not bring it back.
STOP_MARKER = "stop_requested"


class Preempted(Exception):
    """Raised after the checkpoint at the agreed step is saved: the run stopped, not finished."""

    def __init__(self, step: int, saved: bool = True) -> None:
        where = (
            f"checkpoint saved at step {step}"
            if saved
            else f"stopped before training, nothing written (resumes from step {step})"
        )
        super().__init__(f"preempted (SIGTERM): {where}; relaunch resumes")
        self.step = step
        self.saved = saved


def _distributed_mode() -> str:
    """'sync' for a multi-process run with JAX's preemption service (jax.distributed then
    owns SIGTERM), 'unsynced' for one without it, 'single' for one process."""
    # Public API only: a multi-process run has called jax.distributed.initialize, which
    # starts the preemption sync manager exactly when jax_enable_preemption_service is on.
    if jax.process_count() == 1:
        return "single"
    return "sync" if jax.config.jax_enable_preemption_service else "unsynced"


class PreemptionWatcher:
    """Answers, once per step and identically on every process: save and stop at this step?"""

    def __init__(self) -> None:
        self._mode = _distributed_mode()
        self._notified = threading.Event()
        self._previous: Any = None
        if self._mode == "unsynced":
            # A per-process flag would make processes stop at different steps and hang the
            # rest in a collective; keep SIGTERM fatal and rely on the periodic checkpoints.
            logging.warning(
                "jax_enable_preemption_service is off: SIGTERM will not save a checkpoint."
            )
        # Python can only install handlers from the main thread; elsewhere SIGTERM keeps
        # its existing meaning.
        elif self._mode == "single" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint after the current step.")
        self._notified.set()

    def reached_sync_point(self, step: int) -> bool:
        """True at the step where every process saves and stops (call it at every step)."""
        if self._mode == "sync":
            return multihost_utils.reached_preemption_sync_point(step)
        return self._notified.is_set()

    def close(self) -> None:  # idempotent
        """Restores the SIGTERM handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def stop_marker(workdir: str | epath.Path) -> epath.Path:
    """The file whose presence turns a SIGTERM into a deliberate stop."""
    return epath.Path(workdir) / STOP_MARKER


def remove_stale_stop_marker(workdir: str | epath.Path) -> bool:
    """Removes a marker left by an earlier stop (process 0 only); True if one was there."""
    marker = stop_marker(workdir)
    if jax.process_index() != 0 or not marker.exists():
        return False
    marker.unlink()
    logging.warning("Removed %s left by an earlier stop.", marker)
    return True


def exit_status_after_stop(workdir: str | epath.Path) -> int:
    """EXIT_FINISHED when the stop marker is there (a deliberate stop), else EXIT_PREEMPTED."""
    return EXIT_FINISHED if stop_marker(workdir).exists() else EXIT_PREEMPTED
