#!/usr/bin/env python3
"""Cloud TPU VM pod launcher: create, install, run, logs, delete (stdlib only).

Every subcommand prints the exact gcloud commands it runs; --dry_run prints them only.

  python3 launch/tpu.py create  --name simclr --zone us-central2-b --accelerator v4-32 --spot
  python3 launch/tpu.py install --name simclr --zone us-central2-b
  python3 launch/tpu.py run     --name simclr --zone us-central2-b \
      --config configs/imagenet_pretrain.py:r50_1x --workdir gs://BUCKET/simclr/r50 \
      --tfds_data_dir gs://BUCKET/tensorflow_datasets
  python3 launch/tpu.py logs    --name simclr --zone us-central2-b
  python3 launch/tpu.py delete  --name simclr --zone us-central2-b
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

# Software versions per TPU generation (Cloud TPU docs, "TPU software versions").
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "~/simclr_jax"
REMOTE_LOG = "~/simclr_jax_run.log"
ARCHIVE = "/tmp/simclr_jax_src.tar.gz"


def runtime_version(accelerator: str) -> str:
    """Default TPU VM software version for an accelerator type such as v4-32."""
    generation = accelerator.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise SystemExit(
            f"--accelerator={accelerator!r}: unknown TPU generation {generation!r}; use one of "
            f"{', '.join(sorted(RUNTIME_VERSIONS))} (e.g. v4-32) or pass --runtime_version."
        )
    return RUNTIME_VERSIONS[generation]


def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args),
        f"--worker={worker}", f"--command={command}",
    ]  # fmt: skip


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    """A pod slice: on-demand, spot, or a queued resource (optionally spot)."""
    version = args.runtime_version or runtime_version(args.accelerator)
    spot = ["--spot"] if args.spot else []
    if args.queued:
        return [[
            "gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr",
            f"--node-id={args.name}", *_location(args), f"--accelerator-type={args.accelerator}",
            f"--runtime-version={version}", *spot,
        ]]  # fmt: skip
    return [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_location(args),
        f"--accelerator-type={args.accelerator}", f"--version={version}", *spot,
    ]]  # fmt: skip


def install_commands(args: argparse.Namespace) -> list[list[str]]:
    """Copies this checkout to every worker and installs it with the TPU build of JAX."""
    setup = (
        f"mkdir -p {REMOTE_DIR} && tar xzf ~/simclr_jax_src.tar.gz -C {REMOTE_DIR} && "
        f"cd {REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'"
    )
    return [
        ["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            ARCHIVE,
            f"{args.name}:~/",
            *_location(args),
            "--worker=all",
        ],  # fmt: skip
        _ssh(args, setup),
    ]


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    """Starts the same command on every worker (JAX finds its peers on a TPU VM slice)."""
    env = f"TFDS_DATA_DIR={shlex.quote(args.tfds_data_dir)} " if args.tfds_data_dir else ""
    overrides = " ".join(shlex.quote(o) for o in args.override)
    train = (
        f"{env}python3 -m simclr_jax.main --config={shlex.quote(args.config)} "
        f"--workdir={shlex.quote(args.workdir)} {overrides}"
    ).strip()
    # nohup: the run must survive the ssh session; logs stay on each worker.
    return [_ssh(args, f"cd {REMOTE_DIR} && nohup {train} > {REMOTE_LOG} 2>&1 &")]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
    """Streams process 0's log (the only process that writes metrics)."""
    return [_ssh(args, f"tail -n 100 -f {REMOTE_LOG}", worker=str(args.worker))]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    """Deletes the slice (and its queued resource, if it was made as one)."""
    if args.queued:
        return [[
            "gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr",
            *_location(args), "--force", "--quiet",
        ]]  # fmt: skip
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args),
             "--quiet"]]  # fmt: skip


COMMANDS = {
    "create": create_commands,
    "install": install_commands,
    "run": run_commands,
    "logs": logs_commands,
    "delete": delete_commands,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the launcher's command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, builder in COMMANDS.items():
        p = sub.add_parser(name, help=builder.__doc__)
        p.add_argument("--name", required=True, help="TPU VM (node) name")
        p.add_argument("--zone", required=True, help="e.g. us-central2-b for v4")
        p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
        p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        p.add_argument("--queued", action="store_true", help="the slice is a queued resource")
        if name == "create":
            p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v4-32")
            p.add_argument("--runtime_version", default="", help="default: by generation")
            p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
        if name == "run":
            p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
            p.add_argument("--workdir", required=True, help="shared path, gs://BUCKET/DIR")
            p.add_argument("--tfds_data_dir", default="", help="gs:// path of prepared tfds data")
            p.add_argument("override", nargs="*", help="extra --config.field=value flags")
        if name == "logs":
            p.add_argument("--worker", type=int, default=0)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command == "run":
        args.override = [*args.override, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run" and not args.workdir.startswith("gs://"):
        print(
            f"warning: --workdir={args.workdir} is not a gs:// path; on a multi-host slice every "
            "worker must write checkpoints to the same shared location.",
            file=sys.stderr,
        )
    return args


def main(argv: list[str]) -> int:
    """Prints and (unless --dry_run) runs the commands of one subcommand."""
    args = parse_args(argv)
    for command in COMMANDS[args.command](args):
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
