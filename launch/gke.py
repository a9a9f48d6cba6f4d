#!/usr/bin/env python3
"""GKE launcher (stdlib only): one training run as a JobSet on TPU slice node pools.

  python3 launch/gke.py render --name simclr --tpu v5litepod-16 --num_slices 2 \
      --image us-docker.pkg.dev/PROJECT/simclr/simclr_jax:TAG \
      --config configs/imagenet_pretrain.py:r50_1x --workdir gs://BUCKET/simclr/r50 \
      --env TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets        # prints the JobSet (YAML)
  python3 launch/gke.py submit --name simclr ...same flags...   # checks, preflight, kubectl apply
  python3 launch/gke.py status --name simclr    # JobSet conditions, restarts, pods; 1 if failed
  python3 launch/gke.py logs   --name simclr    # follows process 0 (--slice/--worker: another)
  python3 launch/gke.py stop   --name simclr    # on purpose: every trainer saves and exits 0
  python3 launch/gke.py delete --name simclr

The JobSet holds one replicated Job per slice (replicas = --num_slices), each with one pod per
host of the slice (parallelism = completions = hosts) asking for all of the host's chips
(`google.com/tpu`), pinned by GKE's TPU node labels (accelerator and topology) to one node pool
per slice (JobSet's exclusive topology). Inside, `python -m simclr_jax.main` starts JAX's own
cluster detection: GKE gives each pod TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, and the JobSet sets
MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID / MEGASCALE_COORDINATOR_ADDRESS from its own labels,
so no coordinator flags are passed.

The trainer's exit status decides what the scheduler does (the contract of
simclr_jax/preemption.py): 42 (preempted, checkpoint saved) and 128+N (killed by a signal, e.g.
a node lost) fail the slice's Job through its backoff limit and JobSet restarts every slice,
which resumes from the workdir's checkpoint, at most --max_restarts times; 2 (config or data
error) and any other crash fail the Job by its pod failure policy and JobSet fails the whole run
at once: restarting would fail the same way. 0 on every pod: the JobSet completes. `stop`
writes <workdir>/stop_requested (gsutil) before it deletes the JobSet, so that the SIGTERM the
pods get reads as a deliberate stop (exit 0) in their logs, not as a preemption; `submit` with
the same workdir resumes the run.

Every subcommand prints the kubectl command it runs; --dry_run prints them (and `submit` the
manifest) only. kubectl must point at the cluster (`gcloud container clusters get-credentials`),
which must have JobSet installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import preflight_gate  # noqa: E402 - next to this script, which is not a package
from common import (  # noqa: E402 - the launchers' shared module, next to this script
    EXIT_CONFIG_ERROR,
    EXIT_PREEMPTED,
    STOP_MARKER,
    jax_cache_dir,
    parse_env,
    trainer_args,
)

# What xpk's default rules restart besides 42: 127-255 (a signal, 128+N: a pod killed from
# outside, as when its node goes away).
SIGNAL_EXITS = range(127, 256)

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "slice"  # pods are <name>-slice-<slice>-<worker>-<suffix>
CONTAINER = "train"
IMAGE_WORKDIR = "/opt/simclr_jax"  # the Dockerfile's WORKDIR: the repository's files
NODE_POOL_KEY = "cloud.google.com/gke-nodepool"
ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
TPU_RESOURCE = "google.com/tpu"
# Ports: the TPU runtime (8471), the multislice (megascale) runtime (8080), JAX's coordinator
# (8476, jax.distributed's default on Cloud TPU).
PORTS = {"tpu-runtime": 8471, "megascale": 8080, "jax-coord": 8476}
MAX_NAME = 63  # a Kubernetes name, and the pods' names built from it


class LaunchError(Exception):
    """Bad input or a failed command, reported as one line."""


# ------------------------------------------------------------------ GKE's TPU slices

# Per generation (the name gcloud uses before `-SIZE`): GKE's accelerator label value, how many
# TensorCores the SIZE counts per chip, JAX devices per chip, and the topologies GKE offers by
# chip count, each with its chips per host (GKE docs, "Plan TPUs in GKE"; TPU7x: "About
# Ironwood (TPU7x) in GKE"). v5e/v6e 2x4 is one 8-chip host (ct5lp-hightpu-8t / ct6e-standard-8t).
_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
          256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}  # fmt: skip
_PLANES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}  # fmt: skip
GENERATIONS = {
    # name: (GKE accelerator, cores per chip in SIZE, devices per chip, {chips: topology})
    "v4": ("tpu-v4-podslice", 2, 1, _CUBES),
    "v5p": ("tpu-v5p-slice", 2, 1, _CUBES),
    "v5litepod": ("tpu-v5-lite-podslice", 1, 1, _PLANES),
    "v6e": ("tpu-v6e-slice", 1, 1, _PLANES),
    "tpu7x": ("tpu7x", 2, 2, _CUBES),
}


class Slice:
    """One TPU slice type as GKE places it: label values, hosts, chips and devices."""

    def __init__(self, name: str) -> None:
        generation, _, size = name.rpartition("-")
        if generation not in GENERATIONS or not size.isdigit():
            raise LaunchError(
                f"--tpu={name!r}: not a TPU type GKE offers; use GENERATION-SIZE with a "
                f"generation of {', '.join(GENERATIONS)} (e.g. v5litepod-16, v5p-32, tpu7x-8)."
            )
        accelerator, cores, devices, topologies = GENERATIONS[generation]
        chips, rest = divmod(int(size), cores)
        if rest or chips not in topologies:
            offered = ", ".join(f"{generation}-{c * cores}" for c in sorted(topologies))
            raise LaunchError(f"--tpu={name!r}: GKE has no such {generation} slice; it offers "
                              f"{offered}.")  # fmt: skip
        self.name = name
        self.generation = generation
        self.accelerator = accelerator
        self.topology = topologies[chips]
        self.chips = chips
        self.chips_per_host = chips if chips <= (8 if topologies is _PLANES else 4) else 4
        self.hosts = chips // self.chips_per_host
        self.devices = chips * devices


# ------------------------------------------------------------------ input checks


def check_name(name: str, tpu: Slice, num_slices: int) -> None:
    """The JobSet's name is a DNS label, short enough for its pods' names."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise LaunchError(f"--name={name!r}: use lower-case letters, digits and '-', starting "
                          "with a letter (it names Kubernetes objects).")  # fmt: skip
    longest = f"{name}-{REPLICATED_JOB}-{num_slices - 1}-{tpu.hosts - 1}-abcde"
    if len(longest) > MAX_NAME:
        raise LaunchError(f"--name={name!r} is too long: its pods' names ({longest}) would pass "
                          f"{MAX_NAME} characters; use at most "
                          f"{len(name) - len(longest) + MAX_NAME} characters.")  # fmt: skip


def check_layout(args: argparse.Namespace, tpu: Slice) -> None:
    """Refuses slice counts and workdirs a JobSet run cannot use."""
    if args.num_slices < 1:
        raise LaunchError(f"--num_slices={args.num_slices}: must be >= 1.")
    if args.num_slices > 1 and tpu.hosts == 1:
        raise LaunchError(
            f"--num_slices={args.num_slices} with --tpu={tpu.name}: GKE runs multislice only "
            f"on multi-host TPU slice node pools and {tpu.name} is one host; use one slice, "
            "or a multi-host type (e.g. v5litepod-16)."
        )
    if not args.workdir.startswith("gs://"):
        raise LaunchError(
            f"--workdir={args.workdir}: a GKE pod's disk vanishes with it, so checkpoints and "
            "results must go to a gs:// workdir every pod shares; use gs://BUCKET/DIR."
        )
    args.config = image_config(args.config)


def image_config(config: str) -> str:
    """The config as the pods name it: a file of this repository (the image holds its files),
    relative to the repository, with its `:arg`."""
    path, sep, arg = config.partition(":")
    resolved = Path(path).resolve()
    if not resolved.is_file() or not resolved.is_relative_to(REPO):
        raise LaunchError(
            f"--config={config}: the pods read the config from the image, so it must be a file "
            f"of this repository ({REPO}), e.g. configs/smoke.py."
        )
    return str(resolved.relative_to(REPO)) + sep + arg


# Reads the batch sizes the trainer will check, with the trainer's own config parsing
# (absl + ml_collections, no JAX); unknown non-config flags are left to the trainer.
_CONFIG_PROBE = """
import json, sys
from absl import flags
from ml_collections import config_flags
flag = config_flags.DEFINE_config_file("config", None, "")
flags.FLAGS(sys.argv, known_only=True)
c = flag.value
print(json.dumps({"train_batch_size": c.train_batch_size, "eval_batch_size": c.eval_batch_size,
                  "mesh_model": c.mesh.model}))
"""


def config_batches(config: str, overrides: Sequence[str]) -> dict | None:
    """The config's batch sizes and model axis, or None where this Python cannot read configs."""
    try:
        import absl  # noqa: F401
        import ml_collections  # noqa: F401
    except ImportError:
        print("batch check skipped: this Python has no absl/ml_collections to read the config "
              "(`pip install -e .` adds them); the trainer checks it at start.",
              file=sys.stderr)  # fmt: skip
        return None
    flags = [f for f in overrides if f.startswith("--config.")]
    result = subprocess.run(
        [sys.executable, "-c", _CONFIG_PROBE, f"--config={config}", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise LaunchError(f"--config={config}: {lines[-1] if lines else 'could not be read'}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_batches(batches: dict, tpu: Slice, num_slices: int) -> None:
    """Every global batch must split evenly over the data axis and the processes (hosts)."""
    devices, hosts = tpu.devices * num_slices, tpu.hosts * num_slices
    model = int(batches.get("mesh_model") or 1)
    replicas = devices // model if model >= 1 and devices % model == 0 else devices
    where = f"{num_slices} x {tpu.name}" if num_slices > 1 else tpu.name
    for field in ("train_batch_size", "eval_batch_size"):
        size = batches[field]
        for unit, what in ((replicas, f"{replicas} data-parallel devices"),
                           (hosts, f"{hosts} hosts")):  # fmt: skip
            if not isinstance(size, int) or size <= 0 or size % unit:
                raise LaunchError(
                    f"config.{field}={size} does not split over the {what} of {where}; use a "
                    f"multiple of {unit} (--config.{field}=...)."
                )


# ------------------------------------------------------------------ the JobSet


def train_command(config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    """The worker's command: the trainer, with JAX's own cluster detection (no coordinator
    flags: GKE and the JobSet set the TPU_WORKER_* and MEGASCALE_* variables)."""
    return ["python", *trainer_args(config, workdir, overrides)]


def container_env(args: argparse.Namespace) -> list[dict]:
    """The container's variables: the slice wiring from the JobSet's labels, the compilation
    cache in the workdir, then --env (which wins where it repeats a name)."""

    def label(key: str) -> dict:
        return {
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['jobset.sigs.k8s.io/{key}']"}}
        }

    env: dict[str, dict] = {
        "MEGASCALE_NUM_SLICES": label("replicatedjob-replicas"),
        "MEGASCALE_SLICE_ID": label("job-index"),
        # Process 0: pod 0 of slice 0, by its JobSet DNS name (<pod hostname>.<subdomain>).
        "MEGASCALE_COORDINATOR_ADDRESS": {"value": f"{args.name}-{REPLICATED_JOB}-0-0.{args.name}"},
    }  # fmt: skip
    cache = jax_cache_dir(args.workdir, args.jax_cache)
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = {"value": cache}
    for name, value in parse_env(args.env):
        env[name] = {"value": value}
    return [{"name": name, **spec} for name, spec in env.items()]


def pod_failure_policy() -> dict:
    """Exit statuses -> the slice's Job: a config error or a crash fails it for good
    (PodFailurePolicy), a preemption or a signal counts against backoffLimit 0 (the Job fails
    with BackoffLimitExceeded, which JobSet restarts)."""
    restartable = [EXIT_PREEMPTED, *SIGNAL_EXITS]
    return {
        "rules": [
            # Evicted, or its node taken away (spot reclaim, maintenance): whatever the exit
            # status, the disruption explains it.
            {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                             "values": [EXIT_CONFIG_ERROR]}},
            {"action": "Count",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                             "values": restartable}},
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn",
                             "values": restartable}},
        ]
    }  # fmt: skip


def failure_policy(max_restarts: int) -> dict:
    """The JobSet's rules on its Jobs' failure reasons, every rule named."""
    return {
        "maxRestarts": max_restarts,
        "rules": [
            {"name": "failOnConfigErrorOrCrash", "action": "FailJobSet",
             "onJobFailureReasons": ["PodFailurePolicy"]},
            {"name": "restartOnPreemption", "action": "RestartJobSet",
             "onJobFailureReasons": ["BackoffLimitExceeded"]},
        ],
    }  # fmt: skip


def render(args: argparse.Namespace, tpu: Slice) -> dict:
    """The JobSet of the run, as a dict."""
    selectors = {ACCELERATOR_LABEL: tpu.accelerator, TOPOLOGY_LABEL: tpu.topology}
    if args.spot:
        selectors["cloud.google.com/gke-spot"] = "true"
    container = {
        "name": CONTAINER,
        "image": args.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": IMAGE_WORKDIR,
        "command": train_command(args.config, args.workdir, args.override),
        "env": container_env(args),
        "ports": [{"name": n, "containerPort": p} for n, p in PORTS.items()],
        "resources": {
            "requests": {TPU_RESOURCE: tpu.chips_per_host},
            "limits": {TPU_RESOURCE: tpu.chips_per_host},
        },
    }
    pod = {
        "restartPolicy": "Never",
        # DCN traffic between slices goes over the host's network (GKE's multislice setup).
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": selectors,
        # The trainer saves a checkpoint on SIGTERM before it exits with 42.
        "terminationGracePeriodSeconds": args.grace_s,
        "containers": [container],
    }
    if args.service_account:
        pod["serviceAccountName"] = args.service_account
    job = {
        "parallelism": tpu.hosts,
        "completions": tpu.hosts,
        "completionMode": "Indexed",
        "backoffLimit": 0,
        "podFailurePolicy": pod_failure_policy(),
        "template": {"spec": pod},
    }
    labels = {"app.kubernetes.io/name": "simclr-jax", "simclr-jax/tpu": tpu.name}
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": {
            "name": args.name,
            "labels": labels,
            # One slice's pods share a node pool; different slices never do.
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": NODE_POOL_KEY},
        },
        "spec": {
            "failurePolicy": failure_policy(args.max_restarts),
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {"name": REPLICATED_JOB, "replicas": args.num_slices, "template": {"spec": job}}
            ],
        },
    }


# ------------------------------------------------------------------ YAML out (stdlib only)

_PLAIN = re.compile(r"[A-Za-z_/.][A-Za-z0-9_./:=@-]*\Z")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"}


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _yaml_lines(value, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, list) and item and all(type(i) is int for i in item):
                # Exit-code lists: one line.
                lines.append(f"{pad}{_scalar(key)}: [{', '.join(map(str, item))}]")
            elif isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_scalar(key)}:")
                lines += _yaml_lines(item, indent + 2)
            else:
                lines.append(f"{pad}{_scalar(key)}: {_flow(item)}")
        return lines
    lines = []
    for item in value:
        if isinstance(item, (dict, list)) and item:
            inner = _yaml_lines(item, indent + 2)
            lines.append(f"{pad}- {inner[0][indent + 2 :]}")
            lines += inner[1:]
        else:
            lines.append(f"{pad}- {_flow(item)}")
    return lines


def _flow(value) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(document: dict) -> str:
    """A block-style YAML document of dicts, lists, strings, ints and booleans."""
    return "\n".join(_yaml_lines(document, 0)) + "\n"


# ------------------------------------------------------------------ kubectl


def kubectl(args: argparse.Namespace, *rest: str) -> list[str]:
    """A kubectl command line with the chosen context and namespace."""
    flags = []
    if args.context:
        flags.append(f"--context={args.context}")
    if args.namespace:
        flags.append(f"--namespace={args.namespace}")
    return ["kubectl", *flags, *rest]


def job_selector(args: argparse.Namespace, slice_index: int | None = None,
                 worker: int | None = None) -> str:  # fmt: skip
    """Label selector of the run's pods (optionally one slice, one worker)."""
    terms = [f"jobset.sigs.k8s.io/jobset-name={args.name}"]
    if slice_index is not None:
        terms.append(f"jobset.sigs.k8s.io/job-index={slice_index}")
    if worker is not None:
        terms.append(f"batch.kubernetes.io/job-completion-index={worker}")
    return ",".join(terms)


Runner = Callable[..., subprocess.CompletedProcess]


def execute(
    args: argparse.Namespace,
    command: list[str],
    *,
    stdin: str | None = None,
    stdin_label: str = "manifest",
    capture: bool = False,
    runner: Runner = subprocess.run,
) -> subprocess.CompletedProcess:
    """Prints the command, runs it; a failure is a LaunchError with the command's last line."""
    print(
        f"$ {shlex.join(command)}" + (f" < {stdin_label}" if stdin is not None else ""), flush=True
    )
    if args.dry_run:
        return subprocess.CompletedProcess(command, 0, "", "")
    if shutil.which(command[0]) is None:
        raise LaunchError(f"{command[0]} is not on PATH: install it (`gcloud components install "
                          f"{command[0]}`), or use --dry_run to print the commands.")  # fmt: skip
    stdout = subprocess.PIPE if capture else None
    result = runner(command, input=stdin, text=True, stdout=stdout, stderr=subprocess.PIPE)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
        raise LaunchError(f"{shlex.join(command[:4])}... failed (exit {result.returncode}): "
                          f"{lines[-1] if lines else 'no message'}")  # fmt: skip
    if result.stderr:
        print(result.stderr, end="", file=sys.stderr, flush=True)
    return result


def get_jobset(args: argparse.Namespace) -> dict | None:
    """The JobSet as the cluster has it, or None."""
    result = execute(args, kubectl(args, "get", "jobset", args.name, "-o", "json",
                                   "--ignore-not-found"), capture=True)  # fmt: skip
    text = (result.stdout or "").strip()
    return json.loads(text) if text else None


# ------------------------------------------------------------------ subcommands


def checked_slice(args: argparse.Namespace) -> Slice:
    """Every input check of render/submit, in the order a user fixes them; nothing is made."""
    tpu = Slice(args.tpu)
    check_layout(args, tpu)
    check_name(args.name, tpu, args.num_slices)
    try:
        parse_env(args.env)
    except ValueError as error:
        raise LaunchError(str(error)) from None
    if args.max_restarts < 0:
        raise LaunchError(f"--max_restarts={args.max_restarts}: must be >= 0 (0: never restart)")
    if not args.skip_batch_check:
        batches = config_batches(args.config, args.override)
        if batches is not None:
            check_batches(batches, tpu, args.num_slices)
    return tpu


def do_render(args: argparse.Namespace) -> None:
    """Writes the JobSet (YAML) to --out or stdout."""
    tpu = checked_slice(args)
    text = to_yaml(render(args, tpu))
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")


def preflight(args: argparse.Namespace, tpu: Slice) -> None:
    """The launchers' memory gate: compiles the step for the slice(s) here, refuses a misfit."""
    if args.skip_preflight:
        return
    extra = [f"--num_slices={args.num_slices}"] if args.num_slices > 1 else []
    preflight_gate.check(args.config, tpu.name, [*args.override, *extra])


def do_submit(args: argparse.Namespace) -> None:
    """Checks the input, runs the preflight gate, then `kubectl apply`s the JobSet."""
    tpu = checked_slice(args)
    manifest = to_yaml(render(args, tpu))
    if args.dry_run:
        print(manifest, end="")
    else:
        preflight(args, tpu)
        existing = get_jobset(args)
        if existing is not None:
            raise LaunchError(
                f"a JobSet {args.name!r} exists already ({summary(existing)}); `delete` it "
                "first (its workdir is kept), or choose another --name."
            )
    execute(args, kubectl(args, "apply", "-f", "-"), stdin=manifest)
    per_slice = f"{tpu.hosts} pod(s) per slice, {tpu.chips_per_host} chips each"
    print(f"submitted {args.name}: {args.num_slices} x {tpu.name} ({per_slice}); watch it with "
          "`status` and `logs`")  # fmt: skip


def summary(jobset: dict) -> str:
    """One line: the JobSet's terminal condition (or running) and its restarts."""
    status = jobset.get("status", {})
    conditions = {c.get("type"): c for c in status.get("conditions", [])
                  if c.get("status") == "True"}  # fmt: skip
    state = next((t for t in ("Completed", "Failed", "Suspended") if t in conditions), "Running")
    restarts = status.get("restarts", 0)
    limit = jobset.get("spec", {}).get("failurePolicy", {}).get("maxRestarts", 0)
    line = f"{state}, restarts {restarts}/{limit}"
    if state in conditions and conditions[state].get("message"):
        line += f": {conditions[state]['message']}"
    return line


def do_status(args: argparse.Namespace) -> None:
    """The JobSet's state, restarts, per-slice Job counts and its pods; exit 1 when failed."""
    jobset = get_jobset(args)
    if args.dry_run:
        execute(args, kubectl(args, "get", "pods", "-l", job_selector(args), "-o", "wide"))
        return
    if jobset is None:
        raise LaunchError(f"no JobSet {args.name!r} in this cluster/namespace (`submit` makes it)")
    print(f"{args.name}: {summary(jobset)}")
    for job in jobset.get("status", {}).get("replicatedJobsStatus", []):
        counts = ", ".join(f"{k} {job.get(k, 0)}" for k in ("ready", "active", "succeeded",
                                                              "failed", "suspended"))  # fmt: skip
        print(f"  jobs of {job.get('name')}: {counts}")
    execute(args, kubectl(args, "get", "pods", "-l", job_selector(args), "-o", "wide"))
    if summary(jobset).startswith("Failed"):
        raise LaunchError(f"{args.name} failed: {summary(jobset)}")


def do_logs(args: argparse.Namespace) -> None:
    """Prints (follows) one worker's log: slice 0, worker 0 (process 0) by default."""
    selector = job_selector(args, args.slice, args.worker)
    command = kubectl(args, "logs", "-l", selector, "-c", CONTAINER, f"--tail={args.lines}",
                      "--prefix")  # fmt: skip
    if not args.no_follow:
        command.append("--follow")
    execute(args, command)


def workdir_of(jobset: dict) -> str:
    """The --workdir the JobSet's trainers were started with."""
    for job in jobset.get("spec", {}).get("replicatedJobs", []):
        for container in job["template"]["spec"]["template"]["spec"].get("containers", []):
            for arg in container.get("command", []):
                if arg.startswith("--workdir="):
                    return arg.partition("=")[2]
    name = jobset["metadata"]["name"]
    raise LaunchError(
        f"the JobSet {name!r} has no --workdir in its trainers' command: it was not made by "
        "this launcher; use `delete`"
    )


def do_stop(args: argparse.Namespace) -> None:
    """Stops the run on purpose: writes <workdir>/stop_requested, then deletes the JobSet (its
    pods save a checkpoint and exit 0); `submit` with the same workdir resumes it."""
    jobset = get_jobset(args)
    if jobset is None and not args.dry_run:
        raise LaunchError(f"no JobSet {args.name!r} in this cluster/namespace: nothing to stop")
    workdir = workdir_of(jobset) if jobset else "gs://WORKDIR"
    marker = f"{workdir.rstrip('/')}/{STOP_MARKER}"
    execute(args, ["gsutil", "-q", "cp", "-", marker], stdin="stop\n", stdin_label="'stop'")
    do_delete(args)
    print(f"stopped {args.name}: {marker} written, JobSet deleted; the workdir keeps the "
          "checkpoints")  # fmt: skip


def do_delete(args: argparse.Namespace) -> None:
    """Deletes the JobSet and its pods (SIGTERM: the trainer saves, then exits); the workdir
    stays."""
    execute(args, kubectl(args, "delete", "jobset", args.name, "--ignore-not-found"))


COMMANDS = {
    "render": do_render,
    "submit": do_submit,
    "status": do_status,
    "logs": do_logs,
    "stop": do_stop,
    "delete": do_delete,
}


def add_job_flags(p: argparse.ArgumentParser) -> None:
    """Flags that define the run: render and submit."""
    p.add_argument("--tpu", required=True, help="slice type, e.g. v5litepod-16, v5p-32, tpu7x-8")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN")
    p.add_argument("--image", required=True, help="the image built from ./Dockerfile")
    p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/DIR shared by every pod")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable of the run (repeatable)")  # fmt: skip
    p.add_argument("--tfds_data_dir", default="", help="same as --env TFDS_DATA_DIR=...")
    p.add_argument(
        "--jax_cache", default="", help="compilation cache (default <workdir>/jax_cache; 'none')"
    )
    p.add_argument(
        "--max_restarts", type=int, default=10, help="JobSet restarts before the run fails"
    )
    p.add_argument("--spot", action="store_true", help="run on spot TPU node pools")
    p.add_argument(
        "--service_account",
        default="",
        help="Kubernetes service account of the pods (Workload Identity access to the bucket)",
    )
    p.add_argument("--grace_s", type=int, default=300,
                   help="seconds a pod has to save after SIGTERM")  # fmt: skip
    p.add_argument("--skip_batch_check", action="store_true",
                   help="do not read the config here to check the batch sizes")  # fmt: skip
    p.add_argument("override", nargs="*", help="extra --config.field=value flags")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses the launcher's command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, action in COMMANDS.items():
        p = sub.add_parser(name, help=action.__doc__)
        p.add_argument("--name", required=True, help="the JobSet's name (a DNS label)")
        p.add_argument("--namespace", default="", help="Kubernetes namespace (kubectl's default)")
        p.add_argument("--context", default="", help="kubectl context (the current one)")
        p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        if name in ("render", "submit"):
            add_job_flags(p)
        if name == "render":
            p.add_argument("--out", default="", help="write the YAML here instead of stdout")
        if name == "submit":
            p.add_argument("--skip_preflight", action="store_true",
                           help="do not compile the step for the slice here first")  # fmt: skip
        if name == "logs":
            p.add_argument("--slice", type=int, default=0, help="slice index")
            p.add_argument("--worker", type=int, default=0, help="host index within the slice")
            p.add_argument("--lines", type=int, default=100, help="lines of history")
            p.add_argument("--no_follow", action="store_true", help="print and return")
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command in ("render", "submit"):
        args.override = [*args.override, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("render", "submit") and args.tfds_data_dir:
        args.env.append(f"TFDS_DATA_DIR={args.tfds_data_dir}")
    return args


def main(argv: Sequence[str]) -> int:
    """Runs one subcommand; failures are one line on stderr and exit status 1."""
    try:
        args = parse_args(argv)
        COMMANDS[args.command](args)
    except (LaunchError, preflight_gate.PreflightRefused) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted (a submitted JobSet goes on; `status` shows it)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
