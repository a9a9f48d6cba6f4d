"""Command line: python -m simclr_jax.main --config=configs/<name>.py[:arg] --workdir=DIR.

Any config field can be overridden with --config.<field>=<value> (e.g. --config.mode=eval,
--config.init_checkpoint=/tmp/pretrain). The workdir may be local or gs://. `-v 1` also shows
the full config and other libraries' INFO lines (config.json in the workdir has the config).

Exit status (simclr_jax.preemption): 0 finished, or stopped on purpose (SIGTERM with
<workdir>/stop_requested present); 42 preempted by SIGTERM, checkpoint saved (restart it);
2 a config, argument or data error (one line on stderr).
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from simclr_jax import cli, dispatch, parallel, preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs off Cloud TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds to wait for the coordinator and every process."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "Seconds after which a vanished process stops the others."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Starts multi-host JAX when needed and runs dispatch.train_and_evaluate."""
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
    parallel.initialize_distributed(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        timeout_seconds=_DISTRIBUTED_TIMEOUT.value,
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
    )
    config, workdir = _CONFIG.value, _WORKDIR.value
    config.lock()
    logging.info(
        "%s: mode %s, workdir %s.",
        config_flags.get_config_filename(flags.FLAGS["config"]),
        config.mode,
        workdir,
    )
    logging.debug("Config:\n%s", config)
    preemption.remove_stale_stop_marker(workdir)
    try:
        dispatch.train_and_evaluate(config, workdir)
    except preemption.Preempted as stop:
        status = preemption.exit_status_after_stop(workdir)
        why = " (stop requested)" if status == preemption.EXIT_FINISHED else ""
        logging.warning("%s; exit status %d%s.", stop, status, why)
        sys.exit(status)


def run() -> None:
    """The command line (also what tests/pod_worker.py runs after installing its hooks)."""
    cli.run(main, prog="simclr_jax.main")


if __name__ == "__main__":
    run()
