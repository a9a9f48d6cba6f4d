"""Command line: python -m simclr_jax.main --config=configs/<name>.py[:arg] --workdir=DIR.

Any config field can be overridden with --config.<field>=<value> (e.g. --config.mode=eval,
--config.init_checkpoint=/tmp/pretrain). The workdir may be local or gs://.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax import dispatch, parallel, preemption

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
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        timeout_seconds=_DISTRIBUTED_TIMEOUT.value,
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
    )
    config = _CONFIG.value
    config.lock()
    logging.info("Config:\n%s", config)
    try:
        dispatch.train_and_evaluate(config, _WORKDIR.value)
    except preemption.Preempted as stop:
        # Exit status 0: the scheduler relaunches the job and it resumes from this checkpoint.
        logging.warning("%s", stop)


if __name__ == "__main__":
    app.run(main)
