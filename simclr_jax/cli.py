"""The command-line edge every entry point shares (main, preflight, convert, embed,
frozen_eval, visualize): flags parsed with one-line errors, a quiet console, and JAX's platform
chosen before it starts.

- A config or argument error (an unknown or misspelled flag or --config.<field>, a bad value, a
  config file that is missing or refuses its argument, a ValueError / FileNotFoundError raised
  while the run is set up) is one line on stderr, `<prog>: error: ...`, and exit status
  EXIT_CONFIG_ERROR (2), without a traceback; `-v 1` adds the traceback.
- At the default verbosity the console shows this package's INFO lines (progress, results) and
  other libraries' warnings and errors; orbax, clu and absl INFO lines (and orbax's warnings
  about its own options) appear with `-v 1` (absl's --verbosity).
- On a machine without a TPU, JAX is told to use the CPU (unless JAX_PLATFORMS says otherwise or
  a GPU plugin is installed), so an installed libtpu does not probe for TPUs and print about it.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import importlib.metadata
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags

from simclr_jax.preemption import EXIT_CONFIG_ERROR

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Third-party sources whose warnings are about their own options (orbax: "read_only=True,
# setting save_interval_steps=0", "Given directory is read only"): shown with -v 1 only.
_QUIET_WARNINGS = (f"{os.sep}orbax{os.sep}",)
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus of a TPU VM or GKE TPU node


class UsageError(Exception):
    """A config or argument error the user can fix: one line, exit status 2."""


# Raised while a run is set up (config validation, missing checkpoints or data): exit 2.
CONFIG_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, FileNotFoundError)


def fail(prog: str, message: str) -> NoReturn:
    """Prints `<prog>: error: <message>` (its first line) to stderr and exits 2."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"{prog}: error: {first}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG_ERROR)


def verbose() -> bool:
    """True when absl's -v/--verbosity is 1 or more (parsed flags only)."""
    return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1


# ------------------------------------------------------------------ flags


def parse_flags(
    argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS, *, prog: str
) -> list[str]:
    """Parses argv into flag_values and loads every config file flag; a bad flag, override or
    config file ends the process with one line and exit status 2."""
    try:
        rest = flag_values(list(argv))
        for name in list(flag_values):
            flag = flag_values[name]
            if config_flags.is_config_flag(flag) and flag.value is not None:
                # A config file that failed to load raises on first use: make that here.
                hasattr(flag.value, "keys")
    except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as error:
        fail(prog, flag_error_message(error, argv))
    return rest


def flag_error_message(error: BaseException, argv: Sequence[str]) -> str:
    """One line for a flag-parsing error: which flag, what is wrong, what is accepted."""
    text = str(error)
    if isinstance(error, (AttributeError, KeyError)):
        # ml_collections: "'trian_steps'\nDid you mean "train_steps" instead of "trian_steps"?"
        suggestion = re.search(r'Did you mean \\?"(\w+)\\?" instead of \\?"(\w+)', text)
        leaf = suggestion.group(2) if suggestion else re.findall(r"\w+", text)[0]
        flag = next(
            (a.split("=", 1)[0] for a in argv if re.match(rf"--config\.(\w+\.)*{leaf}\b", a)),
            f"--config.{leaf}",
        )
        hint = f"; did you mean {flag[: -len(leaf)]}{suggestion.group(1)}?" if suggestion else ""
        return f"{flag}: the config has no field {leaf!r}{hint}"
    unknown = re.match(r"Unknown command line flag '(config\.\S+)'", text)
    if unknown:
        return f"--{unknown.group(1)}: an override needs --config=<config file> first"
    if "Configuration is not available" in text or isinstance(error, OSError):
        return _config_file_message(text)
    if "Traceback (most recent call last)" in text:
        # ml_collections puts the config file's own traceback in the message: keep what the
        # config file said (the last line), without the exception's class name.
        first = text.splitlines()[0].replace(" Error whilst parsing config file:", "")
        last = [line for line in text.splitlines() if line.strip()][-1]
        said = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
        return f"{first.removeprefix('flag ')} {said}"
    return text.removeprefix("flag ").splitlines()[0]


def _config_file_message(text: str) -> str:
    """'--config=PATH: no such file; ...' naming the config files that do exist there."""
    path = re.search(r"No such file or directory: '([^']+)'", text)
    if not path:
        return " ".join(line.strip() for line in text.splitlines()[:2])
    directory = os.path.dirname(path.group(1)) or "."
    known = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.py")))
    known = [k for k in known if not k.startswith("_")]
    close = difflib.get_close_matches(os.path.basename(path.group(1)), known, n=1)
    accepted = f"did you mean {close[0]}? " if close else ""
    listing = f"{directory}/ holds {', '.join(known)}" if known else "pass configs/<name>.py"
    return f"--config={path.group(1)}: no such config file; {accepted}{listing}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2 (argparse prints usage first)."""

    def error(self, message: str) -> NoReturn:
        """Prints `<prog>: error: <message>` and exits 2."""
        fail(self.prog, message)


# ------------------------------------------------------------------ console and platform


class ConsoleFilter(logging.Filter):
    """Passes this package's records, and other libraries' warnings and errors (orbax's
    warnings about its own options excepted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True for the records the default console shows."""
        if record.pathname.startswith(_PACKAGE_DIR) or record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING:
            return not any(part in record.pathname for part in _QUIET_WARNINGS)
        return False


def configure_console(verbose_output: bool) -> None:
    """Filters absl's handler (every Python log record ends there) unless verbose; TensorFlow's
    C++ INFO and WARNING lines are off unless verbose or TF_CPP_MIN_LOG_LEVEL is set."""
    handler = absl_logging.get_absl_handler()
    for existing in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
        handler.removeFilter(existing)
    if not verbose_output:
        handler.addFilter(ConsoleFilter())
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tpu_present() -> bool:
    """Whether this machine has TPU chips (Google PCI devices, or TPU device files)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _gpu_plugin_installed() -> bool:
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def select_platforms() -> None:
    """On a machine with neither TPU chips nor a JAX GPU plugin, runs JAX on the CPU, so an
    installed libtpu does not look for TPUs (it prints about it, and takes a lock file). Must
    run before JAX starts its backends; JAX_PLATFORMS, when set, wins."""
    import jax

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if tpu_present() or _gpu_plugin_installed():
        return
    jax.config.update("jax_platforms", "cpu")


# ------------------------------------------------------------------ entry points


def run(main: Callable[[list[str]], Any], *, prog: str) -> NoReturn:
    """absl's app.run with this module's flag errors, console and platform; errors of
    CONFIG_ERRORS raised by main are one line and exit status 2."""

    def wrapped(argv: list[str]) -> Any:
        configure_console(verbose())
        select_platforms()
        return call(main, argv, prog=prog)

    app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, prog=prog))
    raise AssertionError("app.run returns only by exiting")  # pragma: no cover


def call(main: Callable[..., Any], *args: Any, prog: str) -> Any:
    """main(*args); an error of CONFIG_ERRORS becomes one line and exit status 2 (-v 1 also
    prints the traceback)."""
    try:
        return main(*args)
    except CONFIG_ERRORS as error:
        if verbose():
            traceback.print_exc()
        fail(prog, str(error) or type(error).__name__)
