"""The GKE launcher: its JobSets against the JobSet CRD's schema and the scheduler's rules, golden
manifests, every kubectl command run against a fake cluster (tests/fake_kubectl/kubectl) and
parsed by the real kubectl, bad input refused before anything is made, and the image's
Dockerfile installing the lock."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest
import yaml
from helpers import SHARED_DATA, require

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "gke.py"
FAKE_KUBECTL = REPO / "tests" / "fake_kubectl"
FAKE_GSUTIL = REPO / "tests" / "fake_gcloud"  # gsutil over a local directory
CRD = SHARED_DATA / "k8s" / "jobset.x-k8s.io_jobsets.yaml"
GOLDEN = REPO / "tests" / "golden"
IMAGE = "us-docker.pkg.dev/my-proj/simclr/simclr_jax:v1"
WORKDIR = "gs://my-bucket/simclr/r50"
MULTISLICE = ["--name", "simclr", "--tpu", "v5litepod-16", "--num_slices", "2", "--image", IMAGE,
              "--config", "configs/imagenet_pretrain.py:r50_1x", "--workdir", WORKDIR,
              "--env", "TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets"]  # fmt: skip
TPU7X = ["--name", "simclr-ironwood", "--tpu", "tpu7x-8", "--image", IMAGE,
         "--config", "configs/imagenet_pretrain.py:r50_1x", "--workdir", WORKDIR]  # fmt: skip


def load(path: Path, name: str):
    """A script (not part of the package) as a module."""
    spec = importlib.util.spec_from_loader(name, SourceFileLoader(name, str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gke = load(LAUNCHER, "gke_launcher")
common = sys.modules["common"]  # launch/common.py, as the launcher imported it
fake = load(FAKE_KUBECTL / "kubectl", "fake_kubectl")


@functools.cache
def crd_schema() -> dict:
    """The JobSet CRD's openAPIV3Schema as a JSON Schema (see the fake kubectl)."""
    return fake.crd_schema(str(require(CRD, "the JobSet CRD (kubernetes-sigs/jobset)")))


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the launcher as a user would."""
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def rendered(args: list[str]) -> tuple[str, dict]:
    """`render`'s YAML and the document it parses to."""
    result = launch("render", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout, yaml.safe_load(result.stdout)


def problems(document: dict) -> list[str]:
    """What the API server (schema, strict fields) and JobSet's/the Job API's checks refuse."""
    return fake.schema_errors(document, crd_schema()) + fake.semantic_errors(document)


def job_and_pod(document: dict) -> tuple[dict, dict, dict]:
    (rjob,) = document["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    return rjob, job, job["template"]["spec"]


def scheduler_action(document: dict, exit_code: int | None, disrupted: bool = False) -> str:
    """What Kubernetes and JobSet do when one pod of a slice ends (the documented semantics):
    the first pod failure policy rule that matches acts (FailJob: the Job fails with reason
    PodFailurePolicy; Ignore: a new pod; Count, or no rule: counted against backoffLimit, and
    past it the Job fails with BackoffLimitExceeded); then the first JobSet rule whose reasons
    match acts (none: RestartJobSet)."""
    if exit_code == 0:
        return "Succeeded"
    _, job, _ = job_and_pod(document)
    action = "Count"
    for rule in job.get("podFailurePolicy", {}).get("rules", []):
        if "onPodConditions" in rule:
            hit = disrupted and {"type": "DisruptionTarget"} in rule["onPodConditions"]
        else:
            codes = rule["onExitCodes"]
            inside = exit_code in codes["values"]
            hit = exit_code is not None and inside == (codes["operator"] == "In")
        if hit:
            action = rule["action"]
            break
    if action == "Ignore":
        return "NewPod"
    if action == "FailJob":
        reason = "PodFailurePolicy"
    elif job.get("backoffLimit", 6) == 0:
        reason = "BackoffLimitExceeded"
    else:
        return "NewPod"
    for rule in document["spec"]["failurePolicy"].get("rules", []):
        if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
            return rule["action"]
    return "RestartJobSet"


# ------------------------------------------------------------------ slices


@pytest.mark.parametrize(
    "name, accelerator, topology, hosts, chips_per_host, devices",
    [
        ("v5litepod-16", "tpu-v5-lite-podslice", "4x4", 4, 4, 16),
        ("v5litepod-256", "tpu-v5-lite-podslice", "16x16", 64, 4, 256),
        ("v5litepod-8", "tpu-v5-lite-podslice", "2x4", 1, 8, 8),
        ("v6e-4", "tpu-v6e-slice", "2x2", 1, 4, 4),
        ("v4-32", "tpu-v4-podslice", "2x2x4", 4, 4, 16),
        ("v5p-8", "tpu-v5p-slice", "2x2x1", 1, 4, 4),
        ("v5p-128", "tpu-v5p-slice", "4x4x4", 16, 4, 64),
        ("tpu7x-8", "tpu7x", "2x2x1", 1, 4, 8),
        ("tpu7x-128", "tpu7x", "4x4x4", 16, 4, 128),
    ],
)
def test_slice_types_use_gke_labels(name, accelerator, topology, hosts, chips_per_host, devices):
    tpu = gke.Slice(name)
    assert (tpu.accelerator, tpu.topology, tpu.hosts) == (accelerator, topology, hosts)
    assert (tpu.chips_per_host, tpu.devices) == (chips_per_host, devices)
    assert tpu.hosts * tpu.chips_per_host == tpu.chips


def test_hosts_agree_with_the_tpu_vm_launcher():
    tpu_vm = load(REPO / "launch" / "tpu.py", "tpu_launcher_for_gke")
    for generation, (_, cores, _, topologies) in gke.GENERATIONS.items():
        if generation == "tpu7x":  # no TPU VM API for TPU7x
            continue
        for chips in topologies:
            name = f"{generation}-{chips * cores}"
            assert gke.Slice(name).hosts == tpu_vm.hosts_of(name), name


def test_exit_codes_are_the_trainers():
    """gke.py takes them from launch/common.py, which tpu.py shares."""
    from simclr_jax import preemption

    assert Path(common.__file__) == REPO / "launch" / "common.py"
    assert gke.EXIT_CONFIG_ERROR == common.EXIT_CONFIG_ERROR == preemption.EXIT_CONFIG_ERROR
    assert gke.EXIT_PREEMPTED == common.EXIT_PREEMPTED == preemption.EXIT_PREEMPTED
    assert common.EXIT_FINISHED == preemption.EXIT_FINISHED


# ------------------------------------------------------------------ the manifests


def test_multislice_jobset_validates_and_says_what_the_schema_cannot():
    _, document = rendered(MULTISLICE)
    assert problems(document) == []
    assert document["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
    }
    rjob, job, pod = job_and_pod(document)
    assert rjob["replicas"] == 2  # one Job per slice
    assert job["parallelism"] == job["completions"] == 4  # one pod per host of a v5litepod-16
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["resources"]["requests"] == {"google.com/tpu": 4}
    assert container["image"] == IMAGE
    # JAX's own cluster detection: no coordinator flags; the slices' wiring in the environment.
    assert container["command"] == [
        "python", "-m", "simclr_jax.main", "--config=configs/imagenet_pretrain.py:r50_1x",
        f"--workdir={WORKDIR}",
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "simclr-slice-0-0.simclr"
    assert "job-index" in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert (
        "replicatedjob-replicas"
        in env["MEGASCALE_NUM_SLICES"]["valueFrom"]["fieldRef"]["fieldPath"]
    )
    assert env["TFDS_DATA_DIR"]["value"] == "gs://my-bucket/tensorflow_datasets"
    assert env["JAX_COMPILATION_CACHE_DIR"]["value"] == f"{WORKDIR}/jax_cache"
    assert container["workingDir"] == gke.IMAGE_WORKDIR


def test_tpu7x_jobset_validates():
    _, document = rendered(TPU7X)
    assert problems(document) == []
    rjob, job, pod = job_and_pod(document)
    assert rjob["replicas"] == 1
    assert job["parallelism"] == job["completions"] == 1
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu7x",
        "cloud.google.com/gke-tpu-topology": "2x2x1",
    }
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}


def test_spot_and_service_account():
    _, document = rendered([*MULTISLICE, "--spot", "--service_account", "simclr-trainer"])
    assert problems(document) == []
    pod = job_and_pod(document)[2]
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert pod["serviceAccountName"] == "simclr-trainer"


def test_failure_policy_restarts_preemptions_and_fails_config_errors():
    _, document = rendered(MULTISLICE)
    policy = document["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 10
    assert all(rule.get("name") for rule in policy["rules"])  # every rule named
    assert scheduler_action(document, common.EXIT_FINISHED) == "Succeeded"
    assert scheduler_action(document, gke.EXIT_PREEMPTED) == "RestartJobSet"
    assert scheduler_action(document, 137) == "RestartJobSet"  # SIGKILL: a node lost
    assert scheduler_action(document, 143) == "RestartJobSet"  # SIGTERM without a handler
    assert scheduler_action(document, gke.EXIT_CONFIG_ERROR) == "FailJobSet"
    assert scheduler_action(document, 1) == "FailJobSet"  # a crash would crash again
    assert scheduler_action(document, 1, disrupted=True) == "RestartJobSet"
    assert scheduler_action(document, None, disrupted=True) == "RestartJobSet"


def test_schema_checks_can_fail():
    _, document = rendered(MULTISLICE)

    def broken(edit) -> list[str]:
        changed = copy.deepcopy(document)
        edit(changed)
        return problems(changed)

    def pod(d):
        return job_and_pod(d)[2]

    assert any("unknownField" in e for e in broken(lambda d: pod(d).update(unknownField=1)))
    assert broken(lambda d: d["spec"]["replicatedJobs"][0].update(replicas="two"))
    assert broken(lambda d: d["spec"]["failurePolicy"]["rules"][0].update(action="Retry"))
    assert broken(lambda d: d["spec"]["failurePolicy"]["rules"][0].update(name="1 bad"))
    assert broken(lambda d: pod(d).update(restartPolicy="OnFailure"))
    rules = lambda d: job_and_pod(d)[1]["podFailurePolicy"]["rules"]  # noqa: E731
    assert broken(lambda d: rules(d)[1]["onExitCodes"].update(values=[0]))
    assert broken(lambda d: rules(d)[2]["onExitCodes"].update(values=[42, 2]))
    assert broken(lambda d: rules(d)[2]["onExitCodes"].update(containerName="main"))


@pytest.mark.parametrize("args, golden", [(MULTISLICE, "gke_v5litepod-16x2.yaml"),
                                          (TPU7X, "gke_tpu7x-8.yaml")])  # fmt: skip
def test_golden_manifests(args, golden):
    text, _ = rendered(args)
    path = GOLDEN / golden
    if os.environ.get("SIMCLR_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"render changed; review, then SIMCLR_UPDATE_GOLDEN=1 {path}"


def test_yaml_writer_round_trips_tricky_values():
    document = {
        "words": ["true", "no", "on", "null", "~", "", "4x4", "-m", "--x=y", "a: b", "#c", "1e3",
                  "0x10", "x y", "it's", 'say "hi"', "tpu-v5-lite-podslice", "*", "&a", "é"],
        "nested": [{"a": [1, 2], "b": {}, "c": []}, [True, False, 0]],
        "ints": [42, 127],
    }  # fmt: skip
    assert yaml.safe_load(gke.to_yaml(document)) == document


# ------------------------------------------------------------------ bad input


def fake_env(root: Path) -> dict[str, str]:
    """kubectl is the fake, on a cluster kept under root; python3 is this interpreter."""
    require(CRD, "the JobSet CRD (kubernetes-sigs/jobset)")
    path = f"{FAKE_KUBECTL}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "FAKE_KUBECTL_ROOT": str(root), "FAKE_KUBECTL_CRD": str(CRD),
            "PATH": path}  # fmt: skip


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (("--config.train_batch_size", "4100"), "train_batch_size=4100 does not split over the 32"),
        (("--tpu", "v5litepod-12"), "GKE has no such v5litepod slice"),
        (("--tpu", "v3-32"), "not a TPU type GKE offers"),
        (("--workdir", "/tmp/simclr"), "must go to a gs:// workdir"),
        (("--num_slices", "0"), "--num_slices=0: must be >= 1"),
        (("--config", "/etc/hostname"), "must be a file of this repository"),
        (("--name", "SimCLR_run"), "--name='SimCLR_run': use lower-case"),
        (("--name", "x" * 60), "is too long"),
        (("--env", "NO_EQUALS"), "--env 'NO_EQUALS': expected NAME=VALUE"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_made(tmp_path, change, message):
    flag, value = change
    args = (
        [*MULTISLICE, f"{flag}={value}"]
        if flag.startswith("--config.")
        else with_flag(MULTISLICE, flag, value)
    )
    result = launch("submit", *args, "--skip_preflight", env=fake_env(tmp_path))
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert "kubectl" not in result.stdout  # refused before any command
    assert not list(tmp_path.rglob("*.json"))


def test_multislice_of_single_host_slices_is_refused():
    args = with_flag(with_flag(MULTISLICE, "--tpu", "v5litepod-8"), "--num_slices", "2")
    result = launch("render", *args)
    assert result.returncode == 1 and result.stdout == ""
    assert "GKE runs multislice only on multi-host TPU slice node pools" in result.stderr


def test_batch_must_split_over_every_slice():
    """48 splits over one v5litepod-16's 16 devices, not over two slices' 32."""
    one = [*with_flag(MULTISLICE, "--num_slices", "1"), "--config.train_batch_size=48",
           "--config.eval_batch_size=64"]  # fmt: skip
    assert launch("render", *one).returncode == 0
    two = with_flag(one, "--num_slices", "2")
    result = launch("render", *two)
    assert "train_batch_size=48 does not split over the 32 data-parallel devices" in result.stderr


# ------------------------------------------------------------------ kubectl, fake and real


def test_submit_status_logs_delete_through_fake_kubectl(tmp_path):
    env = fake_env(tmp_path)
    submitted = launch("submit", *MULTISLICE, "--skip_preflight", env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "$ kubectl apply -f -" in submitted.stdout
    stored = json.loads((tmp_path / "default" / "simclr.json").read_text())
    stored.pop("status")
    assert stored == rendered(MULTISLICE)[1]

    again = launch("submit", *MULTISLICE, "--skip_preflight", env=env)
    assert again.returncode == 1 and "exists already (Running, restarts 0/10)" in again.stderr

    status = launch("status", "--name", "simclr", env=env)
    assert status.returncode == 0 and "simclr: Running, restarts 0/10" in status.stdout
    assert status.stdout.count("simclr-slice-") == 8  # 2 slices x 4 hosts

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "simclr-slice-0-0-fk00x.log").write_text("step 1\nstep 2\nstep 3\n")
    (logs / "simclr-slice-1-2-fk12x.log").write_text("slice 1 host 2\n")
    out = launch("logs", "--name", "simclr", "--no_follow", "--lines", "2", env=env)
    assert out.returncode == 0
    assert out.stdout.splitlines()[1:] == [
        "[pod/simclr-slice-0-0-fk00x/train] step 2", "[pod/simclr-slice-0-0-fk00x/train] step 3"
    ]  # fmt: skip
    other = launch("logs", "--name", "simclr", "--slice", "1", "--worker", "2", env=env)
    assert other.stdout.splitlines()[1:] == ["[pod/simclr-slice-1-2-fk12x/train] slice 1 host 2"]

    message = "jobset failed due to failure policy rule failOnConfigErrorOrCrash"
    failed = {"restarts": 3,
              "conditions": [{"type": "Failed", "status": "True", "message": message}]}  # fmt: skip
    subprocess.run(["kubectl", "fake", "status", "simclr", json.dumps(failed)], env=env, check=True)
    status = launch("status", "--name", "simclr", env=env)
    assert status.returncode == 1
    assert "Failed, restarts 3/10: jobset failed due to failure policy rule" in status.stdout

    assert launch("delete", "--name", "simclr", env=env).returncode == 0
    assert not (tmp_path / "default" / "simclr.json").exists()
    assert launch("delete", "--name", "simclr", env=env).returncode == 0  # already gone: fine
    gone = launch("status", "--name", "simclr", env=env)
    assert gone.returncode == 1 and "no JobSet 'simclr'" in gone.stderr


def test_stop_writes_the_stop_marker_before_it_deletes(tmp_path):
    """The pods' SIGTERM then reads as a deliberate stop (exit 0), not a preemption."""
    env = fake_env(tmp_path)
    env.update(FAKE_GCS_ROOT=str(tmp_path / "gcs"), PATH=f"{FAKE_GSUTIL}:{env['PATH']}")
    assert launch("submit", *MULTISLICE, "--skip_preflight", env=env).returncode == 0
    stopped = launch("stop", "--name", "simclr", env=env)
    assert stopped.returncode == 0, stopped.stderr
    marker = f"{WORKDIR}/{common.STOP_MARKER}"
    commands = [line for line in stopped.stdout.splitlines() if line.startswith("$ ")]
    assert commands[1:] == [f"$ gsutil -q cp - {marker} < 'stop'",
                            "$ kubectl delete jobset simclr --ignore-not-found"]  # fmt: skip
    assert (tmp_path / "gcs" / marker.removeprefix("gs://")).read_text() == "stop\n"
    assert not (tmp_path / "default" / "simclr.json").exists()
    again = launch("stop", "--name", "simclr", env=env)
    assert again.returncode == 1 and "no JobSet 'simclr'" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_namespace_and_context_reach_kubectl(tmp_path):
    env = fake_env(tmp_path)
    (tmp_path / "contexts").write_text("gke_my-proj_us-central2_tpus\n")
    where = ["--namespace", "training", "--context", "gke_my-proj_us-central2_tpus"]
    result = launch("submit", *TPU7X, *where, "--skip_preflight", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "training" / "simclr-ironwood.json").exists()
    wrong = launch("status", "--name", "simclr-ironwood", "--context", "elsewhere", env=env)
    assert wrong.returncode == 1 and 'context "elsewhere" does not exist' in wrong.stderr


def test_a_cluster_without_jobset_is_one_line(tmp_path):
    (tmp_path / "no_jobset_crd").write_text("")
    result = launch("submit", *TPU7X, "--skip_preflight", env=fake_env(tmp_path))
    assert result.returncode == 1
    assert 'doesn\'t have a resource type "jobset"' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fake_kubectl_rejects_what_kubectl_rejects(tmp_path):
    env = fake_env(tmp_path)
    bad = subprocess.run(["kubectl", "get", "jobset", "x", "--bogus"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and "unknown flag: --bogus" in bad.stderr
    text, document = rendered(TPU7X)
    job_and_pod(document)[2]["containers"][0]["unknownField"] = 1
    applied = subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(document),
                             env=env, capture_output=True, text=True)  # fmt: skip
    assert applied.returncode == 1 and "unknownField" in applied.stderr
    follow = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, env=env, text=True,
                            capture_output=True)  # fmt: skip
    assert follow.returncode == 0


def test_submit_runs_the_preflight_gate_for_every_slice(tmp_path, monkeypatch, capsys):
    calls = []

    def refuse(config, accelerator, overrides=(), **_):
        calls.append((config, accelerator, list(overrides)))
        raise gke.preflight_gate.PreflightRefused("step needs 17.2 GiB of 15.75 GiB HBM")

    monkeypatch.setattr(gke.preflight_gate, "check", refuse)
    for key, value in fake_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert gke.main(["submit", *MULTISLICE, "--config.train_batch_size=4096"]) == 1
    assert calls == [("configs/imagenet_pretrain.py:r50_1x", "v5litepod-16",
                      ["--config.train_batch_size=4096", "--num_slices=2"])]  # fmt: skip
    assert "17.2 GiB" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.json"))  # refused: nothing applied


def dry_run_commands(*args: str) -> list[tuple[list[str], str | None]]:
    """The kubectl command lines a dry run prints, each with the manifest it sends (or None)."""
    result = launch(*args, "--dry_run")
    assert result.returncode == 0, result.stderr
    manifest = result.stdout.split("$ ", 1)[0] or None
    commands = []
    for line in result.stdout.splitlines():
        if line.startswith("$ "):
            sends = line.endswith(" < manifest")
            argv = line[2:].removesuffix(" < manifest").split()
            commands.append((argv, manifest if sends else None))
    return commands


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs the real kubectl installed")
def test_real_kubectl_parses_every_command(tmp_path):
    """kubectl parses its flags and the manifest before it calls the API server: pointed at a
    closed port, every command must fail only at the connection."""
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}},
                     {"name": "other", "context": {"cluster": "none", "user": "none"}}],
        "users": [{"name": "none", "user": {"token": "x"}}],
    }))  # fmt: skip
    where = ["--namespace", "training", "--context", "other"]
    commands = [
        *dry_run_commands("submit", *MULTISLICE, *where),
        *dry_run_commands("status", "--name", "simclr", *where),
        *dry_run_commands("logs", "--name", "simclr", "--slice", "1", "--worker", "3", *where),
        *dry_run_commands("delete", "--name", "simclr", *where),
    ]
    verbs = [argv[3] for argv, _ in commands]
    assert verbs == ["apply", "get", "get", "logs", "delete"]
    env = {**os.environ, "KUBECONFIG": str(config)}
    for argv, stdin in commands:
        result = subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 1
        assert re.search(r"127\.0\.0\.1:9.*(refused|connect)", result.stderr), (argv, result.stderr)
        assert "unknown" not in result.stderr and "error parsing" not in result.stderr, argv


# ------------------------------------------------------------------ the image


def test_dockerfile_installs_exactly_the_lock():
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    body = "\n".join(lines).replace("\\\n", " ")
    assert re.search(r"^FROM python:3\.11[-.\w]*$", body, re.M)
    assert f"WORKDIR {gke.IMAGE_WORKDIR}" in body
    installs = [i.strip() for i in re.findall(r"pip install ([^&\n]*)", body)]
    assert installs == [
        "--require-hashes -r requirements/lock.txt -r requirements/tpu.txt",
        "--no-deps --no-build-isolation .",
    ]
    # No second list of versions: nothing pinned or named in the Dockerfile itself.
    assert not re.search(r"[A-Za-z0-9_.-]+(==|>=|~=)\d", body)
    copies = re.findall(r"^COPY (.*)$", body, re.M)
    assert copies[0] == "requirements/lock.txt requirements/tpu.txt requirements/"
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("simclr_jax", "configs", "setup.py", "requirements", "launch"):
        assert not any(p.strip("/*") == needed for p in ignored), needed
    assert ".git" in ignored
