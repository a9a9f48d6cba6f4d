"""The command-line edge (simclr_jax/cli.py): config and argument errors are one line and exit
status 2 from main and the preflight; restoring a checkpoint to evaluate it prints a short
console at the default verbosity, with the results."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simclr_jax import cli, preemption

REPO = Path(__file__).resolve().parents[1]

# (extra arguments, what the one line must say)
BAD_INPUT = {
    "misspelled override": (
        ["--config=configs/smoke.py:eval", "--config.trian_steps=3"],
        ["--config.trian_steps", "did you mean --config.train_steps?"],
    ),
    "bad config argument": (
        ["--config=configs/smoke.py:nonsense"],
        ["'nonsense' is not understood", "accepted: pretrain | linear_eval"],
    ),
    "missing config file": (
        ["--config=configs/smok.py"],
        ["--config=configs/smok.py: no such config file", "did you mean smoke.py?"],
    ),
}
ENTRY_POINTS = {
    "main": (["-m", "simclr_jax.main", "--workdir=/nonexistent/never_written"], "simclr_jax.main"),
    "preflight": (["-m", "simclr_jax.preflight", "--tpu=v4-8"], "preflight"),
}


def run(args, *, env=None, timeout=600):
    """python <args> from the repository root; the completed process (text)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.multiprocess  # 6 short processes: an import of JAX each
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(entry, case):
    command, prog = ENTRY_POINTS[entry]
    extra, expected = BAD_INPUT[case]
    done = run([*command, *extra])
    assert done.returncode == preemption.EXIT_CONFIG_ERROR, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{prog}: error: ")
    for part in expected:
        assert part in lines[0]
    assert not Path("/nonexistent/never_written").exists()


def test_flag_error_messages():
    """The messages for ml_collections' and absl's errors, without a process."""
    override = AttributeError("'\\'trian_steps\\'\\nDid you mean \"train_steps\" instead of "
                              "\"trian_steps\"?'")  # fmt: skip
    argv = ["main", "--config=c.py", "--config.model.trian_steps=3"]
    assert cli.flag_error_message(override, argv) == (
        "--config.model.trian_steps: the config has no field 'trian_steps'; did you mean "
        "--config.model.train_steps?"
    )
    assert cli.flag_error_message(AttributeError("'zzz'"), ["m", "--config.zzz=1"]) == (
        "--config.zzz: the config has no field 'zzz'"
    )
    unknown = cli.flags.UnrecognizedFlagError("config.train_steps")
    assert "needs --config=<config file> first" in cli.flag_error_message(unknown, [])


def test_argparse_errors_are_one_line(capsys):
    parser = cli.ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--n=x"])
    assert stopped.value.code == preemption.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tool: error: argument --n")


def test_console_filter_keeps_own_lines_and_warnings_only():
    import logging

    def record(path, level):
        return logging.LogRecord("x", level, path, 1, "message", None, None)

    own = os.path.join(os.path.dirname(cli.__file__), "loop.py")
    keep = cli.ConsoleFilter().filter
    assert keep(record(own, logging.INFO))
    assert not keep(record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.INFO))
    assert not keep(
        record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.WARNING)
    )
    assert keep(record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.ERROR))
    assert keep(record("/site-packages/jax/_src/xla_bridge.py", logging.WARNING))
    assert not keep(record("/site-packages/clu/metric_writers/logging_writer.py", logging.INFO))


@pytest.mark.multiprocess  # one eval of the tiny checkpoint in a new process
def test_eval_restore_console_is_short(tiny_pretrain_workdir, tmp_path):
    """Restoring a checkpoint to evaluate it on 8 CPU devices, at the default verbosity: at
    most 25 lines of at most 300 characters, the results among them, no TPU probe."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")
    }
    done = run(
        [
            "-m",
            "simclr_jax.main",
            "--config=configs/smoke.py:eval",
            f"--workdir={tmp_path / 'eval'}",
            f"--config.init_checkpoint={tiny_pretrain_workdir}",
            "--config.data.eval_split=test[:10]",
        ],
        env=env,
    )
    console = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 0, "\n".join(console[-40:])
    assert len(console) <= 25, "\n".join(console)
    assert max(len(line) for line in console) <= 300, "\n".join(console)
    text = "\n".join(console)
    assert "results at step 2:" in text and "top1" in text and "knn_top1" in text
    for absent in ("Unable to initialize backend", "TPU", "libtpu", "orbax", "Config:"):
        assert absent not in text, text
    assert (tmp_path / "eval" / "config.json").exists()  # the full config lives there
