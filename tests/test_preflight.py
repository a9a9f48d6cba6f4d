"""simclr_jax.preflight: the training step compiled ahead of time for Cloud TPU slices on a CPU
host (libtpu's compiler), and the launcher's gate built on it (through the fake gcloud)."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import preflight, preflight_env, require_libtpu

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "tpu.py"
FAKE_GCLOUD = REPO / "tests" / "fake_gcloud"
SMOKE = "configs/smoke.py:pretrain"


# ------------------------------------------------------------------ lock and packaging


def test_libtpu_is_pinned_with_its_hash_in_the_lock_and_the_test_extra():
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    pins = [line for line in lock if "==" in line]
    assert any(re.fullmatch(r"libtpu==0\.0\.42\.1 --hash=sha256:[0-9a-f]{64}", p) for p in pins)
    # pip's hash-checking mode needs a hash on every line once one line has one.
    assert all(re.search(r" --hash=sha256:[0-9a-f]{64}$", p) for p in pins), pins
    setup = (REPO / "setup.py").read_text()
    assert "\"libtpu==0.0.42.1; sys_platform == 'linux' and platform_machine == 'x86_64'\"" in setup


# ------------------------------------------------------------------ bad input (no compile)


def test_unknown_accelerator_type_lists_the_known_ones():
    result = preflight(f"--config={SMOKE}", "--tpu=v9-8")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "'v9-8' is not a known accelerator type" in line
    for known in ("v2-8", "v3-128", "v4-32", "v5litepod-16", "v5p-128", "v6e-64"):
        assert known in line


def test_accelerator_types_map_to_devices_as_jax_lists_them_on_the_slice():
    from simclr_jax import preflight as pf

    expected = {"v2-8": (8, "v2:2x2"), "v3-128": (128, "v3:8x8"), "v4-32": (16, "v4:2x2x4"),
                "v5litepod-16": (16, "v5e:4x4"), "v5p-128": (64, "v5p:4x4x4"),
                "v6e-64": (64, "v6e:8x8"), "v5e-4": (4, "v5e:2x2")}  # fmt: skip
    for name, (devices, topology) in expected.items():
        tpu = pf.parse_accelerator_type(name)
        assert (tpu.num_devices, tpu.topology_name) == (devices, topology), name
    # v2/v3 devices are TensorCores: half a chip's HBM each.
    assert pf.parse_accelerator_type("v3-8").hbm_bytes_per_device == 16 * 2**30
    assert pf.parse_accelerator_type("v4-8").hbm_bytes_per_device == 32 * 2**30


def test_missing_libtpu_gives_the_pip_command(monkeypatch, capsys):
    from simclr_jax import preflight as pf

    monkeypatch.setattr(pf.cli, "libtpu_available", lambda: False)
    assert pf.main(["preflight", f"--config={REPO}/{SMOKE}", "--tpu=v4-8"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "pip install 'libtpu==0.0.42.1'" in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train_batch_size=66", "train_batch_size=66 is not divisible by the 4 devices"),
        ("--config.mesh.model=3", "mesh.model=3 must be a positive divisor of the 4 devices"),
    ],
)
def test_batch_or_mesh_that_does_not_divide_the_slice_is_one_line(override, message):
    require_libtpu()
    result = preflight(f"--config={SMOKE}", "--tpu=v4-8", override)
    assert result.returncode == 2  # a config the trainer refuses too
    [line] = result.stderr.strip().splitlines()
    assert message in line


# ------------------------------------------------------------------ the process


def test_preflight_reruns_itself_once_under_the_hard_stack_limit():
    """libtpu's compiler overflows an 8 MiB stack on some steps (v6e): a process started under
    that soft limit re-executes itself (same command line) under the hard limit, once."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    soft = 8 * 2**20 if hard == resource.RLIM_INFINITY else min(8 * 2**20, hard)
    code = (
        "import os, resource, sys; from simclr_jax import preflight as pf; "
        "print('started', flush=True); pf.rerun_with_raised_stack_limit(); "
        "print(resource.getrlimit(resource.RLIMIT_STACK), os.environ.get(pf.STACK_RAISED_ENV))"
    )
    # The shell sets the limit: a preexec_fn would fork this multithreaded (JAX) process.
    command = f"ulimit -S -s {soft // 1024} && exec {sys.executable} -c {shlex.quote(code)}"
    result = subprocess.run(
        ["bash", "-c", command], env=preflight_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rerun = soft != hard
    expected = ["started"] * (1 + rerun) + [f"{(hard, hard)} {'1' if rerun else None}"]
    assert result.stdout.splitlines() == expected


# ------------------------------------------------------------------ distill's teacher (no compile)


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory):
    """An untrained fine-tuned checkpoint of the smoke model at width 2 (the student: width 1),
    10 classes, 16 px."""
    sys.path.insert(0, str(REPO))
    from configs import smoke
    from simclr_jax import checkpoint, loop, parallel, train_state
    from simclr_jax.models import create_model

    config = smoke.get_config("finetune")
    config.data.image_size = 16
    config.model.width_multiplier = 2
    config.model.num_classes = 10
    model = create_model(config.model, num_classes=10, mode="finetune")
    tx, _ = loop.create_optimizer(config, loop.Durations(10, 0, 1.0))
    state, _ = train_state.create_train_state(
        model, tx, parallel.create_mesh(), image_size=16, seed=0
    )
    workdir = tmp_path_factory.mktemp("teacher")
    manager = checkpoint.create_manager(workdir, keep=1)
    checkpoint.save(manager, 0, state.to_tree(), loop.checkpoint_meta(config, 0))
    manager.wait_until_finished()
    manager.close()
    return workdir


def distill_config(teacher: Path):
    """The smoke distill config at 16 px, batch 16, with this teacher."""
    sys.path.insert(0, str(REPO))
    from configs import smoke

    config = smoke.get_config("distill")
    config.data.image_size = 16
    config.train_batch_size = 16
    config.distill.teacher_checkpoint = str(teacher)
    return config


def abstract_teacher(teacher: Path) -> tuple[str, int]:
    """(where the preflight took the teacher's architecture from, its variables' bytes)."""
    import jax

    from simclr_jax import parallel
    from simclr_jax import preflight as pf

    mesh = parallel.create_mesh(devices=jax.devices()[:4])
    config, info = pf.core.prepare_config(distill_config(teacher), mesh)
    _, args, notes = pf.core.abstract_step(config, mesh, info)
    return notes["teacher"], pf.core._parameter_bytes(args[2])


def test_distill_preflight_takes_the_teacher_architecture_when_one_is_there(tmp_path, wide_teacher):
    source, teacher_bytes = abstract_teacher(wide_teacher)
    assert source == str(wide_teacher)
    # Nothing at the path on this host: the student's architecture (self-distillation).
    source, student_bytes = abstract_teacher(tmp_path / "not_here")
    assert source == "the student's architecture"
    assert teacher_bytes > 3 * student_bytes  # width 2: four times the convolution weights


@pytest.mark.parametrize(
    "damage, message",
    [
        ("pretrain", r"mode='pretrain', not a fine-tuned classifier"),
        ("unparsable", r"\(step 0\) is not a readable checkpoint \(JSONDecodeError"),
    ],
)
def test_distill_preflight_refuses_a_teacher_it_cannot_use(tmp_path, wide_teacher, damage, message):
    import shutil

    import jax

    from simclr_jax import preflight as pf

    teacher = tmp_path / "teacher"
    shutil.copytree(wide_teacher, teacher)
    [meta] = teacher.glob("checkpoints/0/meta/metadata")
    if damage == "pretrain":
        saved = json.loads(meta.read_text())
        saved["config"]["mode"] = "pretrain"
        meta.write_text(json.dumps(saved))
    else:
        meta.write_text("{not json")
    with pytest.raises(ValueError, match=message):
        pf.run_preflight(
            distill_config(teacher), pf.parse_accelerator_type("v4-8"), devices=jax.devices()[:4]
        )


# ------------------------------------------------------------------ compiled for TPU


@pytest.mark.parametrize("tpu, fsdp_min_size", [("v4-8", 0), ("v5litepod-4", 2**16)])
def test_smoke_pretraining_step_compiles_for_a_slice(tmp_path, tpu, fsdp_min_size):
    require_libtpu()
    out = tmp_path / "report.json"
    result = preflight(
        f"--config={SMOKE}", f"--tpu={tpu}", f"--config.mesh.fsdp_min_size={fsdp_min_size}",
        f"--out={out}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower()  # libtpu kept quiet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing else written
    report = json.loads(out.read_text())
    assert report["tpu"] == tpu and report["num_devices"] == 4 and report["fits"] is True
    per_chip = report["bytes_per_chip"]
    assert 0 < per_chip["total"] <= report["hbm_per_chip_gib"] * 2**30
    assert per_chip["arguments"] > 0 and per_chip["temporaries"] > 0
    assert report["flops_per_step"] > 0 and report["step_seconds_estimate"] > 0
    assert report["roofline_bound"] in ("compute", "memory")
    assert report["run_hours_estimate"] > 0 and 0 < report["mfu_estimate"] <= 1
    kinds = {c["kind"] for c in report["collectives"]}
    # NT-Xent's negatives: every device gathers z of the global batch (64 images x 64 dims).
    assert any(c["kind"] == "all-gather" and c["shapes"] == ["f32[64,64]"]
               for c in report["collectives"])  # fmt: skip
    gradient_bytes = report["state_bytes_whole"] / 2  # LARS: params + one momentum each
    if fsdp_min_size:
        assert "reduce-scatter" in kinds  # FSDP: each device reduces its shard of the gradient
    else:
        assert report["collective_bytes"]["all-reduce"] >= 0.9 * gradient_bytes
    # The image batch stays where it is: no collective moves (…, 16, 16, 3) arrays.
    for c in report["collectives"]:
        assert not any(s.endswith(",16,16,3]") for s in c["shapes"]), c


def test_resnet152_3x_sk_at_4096_on_v5litepod_8_without_fsdp_does_not_fit():
    require_libtpu()
    result = preflight(
        "--config=configs/imagenet_pretrain.py:r152_3x_sk", "--tpu=v5litepod-8",
        "--config.mesh.fsdp_min_size=0",
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "16.0 GiB" in line and "decided before compiling" in line
    needed = re.search(r"need ([\d.]+) GiB", line)
    assert needed and float(needed.group(1)) > 16


# HBM per chip small enough that the smoke model (0.12 GiB replicated, 0.06 GiB with FSDP at
# batch 64 on v5litepod-4) reaches it at a modest batch, so that every compile is quick.
MAX_BATCH_HBM_GIB = {"replicated": 0.1225, "fsdp": 0.0575}


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_max_batch_is_the_largest_multiple_of_the_devices_that_fits(tmp_path, layout):
    require_libtpu()
    out, hbm_gib = tmp_path / "max_batch.json", MAX_BATCH_HBM_GIB[layout]
    result = preflight(
        f"--config={SMOKE}", "--tpu=v5litepod-4", "--max_batch", f"--max_batch_for={layout}",
        f"--hbm_gib={hbm_gib}", "--max_compiles=10", f"--out={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["max_batch"]) == [layout]
    search = report["max_batch"][layout]
    batch, trials = search["max_batch"], {t["batch"]: t for t in search["trials"]}
    assert search["closed"] and batch > 0 and batch % 4 == 0  # 4 devices on the data axis
    assert trials[batch]["fits"] and trials[batch]["total_bytes"] <= hbm_gib * 2**30
    above = trials[batch + 4]  # the next multiple was compiled and is over the limit
    assert not above["fits"] and above["total_bytes"] > hbm_gib * 2**30
    assert all(t["fits"] == (b <= batch) for b, t in trials.items())
    # One progress line per compile, then the answer.
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(trials) + 1 and len(trials) <= 10
    assert all(line.startswith(f"  [{layout}] global batch ") for line in lines[:-1])
    assert lines[-1].startswith(f"v5litepod-4: largest global batch that fits ({layout}")
    assert f": {batch} (" in lines[-1] and f"{batch + 4} does not fit" in lines[-1]


def simulated_search(monkeypatch, bytes_per_chip, hbm_gib=1.0, max_compiles=8, start=64):
    """max_batch over 4 CPU devices with the compiles replaced by bytes_per_chip(batch)."""
    import jax

    from simclr_jax import preflight as pf

    compiled = []

    def fake_preflight(config, tpu, *, devices):
        batch = int(config.train_batch_size)
        compiled.append(batch)
        total = bytes_per_chip(batch)
        fits = total <= tpu.hbm_bytes_per_device
        report = {"bytes_per_chip": {"total": total}, "state_bytes_per_chip": 2**26}
        return pf.Result(fits, "fits" if fits else "does not fit", report)

    monkeypatch.setattr(pf.search, "run_preflight", fake_preflight)
    sys.path.insert(0, str(REPO))
    from configs import smoke

    config = smoke.get_config("pretrain")
    config.train_batch_size = start
    tpu = pf.with_hbm(pf.parse_accelerator_type("v5litepod-4"), hbm_gib)
    search = pf.max_batch(config, tpu, jax.devices()[:4], max_compiles=max_compiles)
    return search, compiled, pf.max_batch_line(tpu, "replicated", 0, search)


def test_byte_figures_print_one_decimal_or_four_significant_digits():
    from simclr_jax import preflight as pf

    assert pf.gib(12.34 * 2**30) == "12.3 GiB" and pf.gib(2**29) == "0.5 GiB"
    assert pf.gib(15.934 * 2**30, 4) == "15.93 GiB" and pf.gib(0.12191 * 2**30, 4) == "0.1219 GiB"
    trial = pf.Trial(256, False, int(16.5 * 2**30), 41.6, "does not fit")
    assert pf.search._trial_line("fsdp", trial, 16 * 2**30) == (
        "  [fsdp] global batch 256: does not fit, needs 16.5 GiB of 16 GiB, 42 s"
    )


@pytest.mark.parametrize(
    "name, bytes_per_chip, bound",
    [
        # Only the state (2**26, the fake report's) is fixed: the first estimate is right.
        ("exact", lambda b: 2**26 + b * 2**17, 4),
        # Fixed buffers beyond the state make each estimate err low (the next one less so).
        ("linear", lambda b: 2**28 + b * 2**30 * 3 // 4 // 4672, 10),  # 1 GiB at batch 4672
        ("step", lambda b: 2**28 + b * 2**17 + (2**26 if b >= 2000 else 0), 11),  # bends
        ("concave", lambda b: 2**28 + int(2**21 * b**0.8), 10),  # grows slower than a line
        ("over", lambda b: 2**28 + b * 2**22, 8),  # the first compile is far over
    ],
)
def test_max_batch_search_closes_its_bracket_within_the_compile_bound(
    monkeypatch, name, bytes_per_chip, bound
):
    expected = max(b for b in range(4, 40_000, 4) if bytes_per_chip(b) <= 2**30)
    search, compiled, line = simulated_search(
        monkeypatch, bytes_per_chip, start=256, max_compiles=12
    )
    assert search.closed and search.batch == expected, (name, compiled)
    assert search.batch + 4 in compiled and len(compiled) <= bound, (name, compiled)
    # Compiles never more than 8x beyond the largest batch known to fit.
    assert all(b <= 8 * max([256, *(c for c in compiled[:i] if bytes_per_chip(c) <= 2**30)])
               for i, b in enumerate(compiled)), compiled  # fmt: skip
    assert len(set(compiled)) == len(compiled), compiled  # no batch compiled twice
    assert f"): {expected} (" in line and f"{expected + 4} does not fit" in line


def test_max_batch_search_that_runs_out_of_compiles_says_at_least(monkeypatch):
    search, compiled, line = simulated_search(
        monkeypatch, lambda b: 2**28 + b * 2**17, max_compiles=2
    )
    assert len(compiled) == 2 and not search.closed and search.batch in compiled
    assert f"at least {search.batch}" in line and "raise --max_compiles" in line


def test_bad_max_batch_arguments_are_one_line():
    for args, message in (
        (["--hbm_gib=0"], "--hbm_gib=0.0 must be a positive number"),
        (["--max_batch", "--max_batch_for=sharded"], "--max_batch_for=sharded is not a layout"),
        (["--max_batch", "--max_compiles=0"], "--max_compiles=0 must be at least 1"),
    ):
        result = preflight(f"--config={SMOKE}", "--tpu=v4-8", *args)
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert message in line, line


@pytest.mark.tpu_compile
@pytest.mark.parametrize("mode", ["linear_eval", "finetune", "distill", "eval"])
def test_every_mode_compiles(tmp_path, mode):
    require_libtpu()
    out = tmp_path / "r.json"
    # Checkpoints this host cannot reach are not read: the run reads them on the slice.
    elsewhere = ["--config.init_checkpoint=/not/on/this/host"]
    if mode == "distill":
        elsewhere.append("--config.distill.teacher_checkpoint=/not/on/this/host/either")
    result = preflight(
        f"--config=configs/smoke.py:{mode}", "--tpu=v4-8", f"--out={out}", *elsewhere
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == mode and report["fits"] and report["flops_per_step"] > 0
    if mode == "distill":
        # The frozen teacher's variables are arguments of the step too.
        assert report["bytes_per_chip"]["arguments"] > report["state_bytes_per_chip"]


@pytest.mark.tpu_compile
def test_resnet50_on_v5e_holds_its_state_and_block_remat_halves_the_temporaries(tmp_path):
    """ResNet-50/224 on v5litepod-4, float32, 8 images per chip, replicated: what each chip
    holds as arguments is the parameter tree twice (weights, LARS momentum), the BN statistics
    and its shard of the batch; recomputing each residual block (model.remat='block') cuts the
    temporaries, which hold the activations, to about half (measured 686 of 1406 MiB) for a
    third more FLOPs."""
    require_libtpu()
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO))
    from configs import imagenet_pretrain
    from simclr_jax.models import create_model

    config = imagenet_pretrain.get_config("r50_1x")
    model = create_model(config.model, num_classes=1000, mode="pretrain")
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )

    def nbytes(tree):
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))

    batch, reports = 32, {}
    for policy in ("none", "block"):
        out = tmp_path / f"{policy}.json"
        result = preflight(
            "--config=configs/imagenet_pretrain.py:r50_1x", "--tpu=v5litepod-4",
            f"--config.train_batch_size={batch}", f"--config.model.remat={policy}",
            f"--out={out}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        reports[policy] = json.loads(out.read_text())
    per_chip_batch = batch // 4 * (2 * 224 * 224 * 3 * 4 + 4)
    expected = 2 * nbytes(variables["params"]) + nbytes(variables["batch_stats"]) + per_chip_batch
    for report in reports.values():
        # TPU layouts pad small dimensions (e.g. the stem's 3 input channels) to tiles.
        assert report["bytes_per_chip"]["arguments"] == pytest.approx(expected, rel=0.02)
    temporaries = {k: r["bytes_per_chip"]["temporaries"] for k, r in reports.items()}
    assert 0.44 < temporaries["block"] / temporaries["none"] < 0.54, temporaries
    flops = {k: r["flops_per_step"] for k, r in reports.items()}
    assert 1.25 < flops["block"] / flops["none"] < 1.40, flops  # measured 1.32


# ------------------------------------------------------------------ the launcher's gate


def test_launcher_refuses_a_run_that_does_not_fit_before_any_ssh(tmp_path):
    require_libtpu()
    env = {**preflight_env(), "PATH": f"{FAKE_GCLOUD}:{os.environ['PATH']}",
           "FAKE_GCLOUD_ROOT": str(tmp_path), "FAKE_GCLOUD_WORKER_ENV": "{}"}  # fmt: skip
    pod = ("--name", "simclr-v4", "--zone", "us-central2-b")

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(LAUNCHER), *args], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    assert launch("create", *pod, "--accelerator", "v4-8").returncode == 0
    result = launch("run", *pod, "--config", SMOKE, "--workdir", str(tmp_path / "w"),
                    "--config.train_batch_size=1048576")  # fmt: skip
    assert result.returncode == 1, result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: v4-8: does not fit in 32.0 GiB HBM per chip")
    assert "--skip_preflight" in line
    assert "simclr_jax.preflight" in result.stdout and "--tpu=v4-8" in result.stdout
    assert "[worker" not in result.stdout and " ssh " not in result.stdout  # nothing ran there
    assert not (tmp_path / "w").exists()
    assert launch("delete", *pod).returncode == 0


def test_launcher_without_jax_says_how_to_run_the_preflight_elsewhere(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "preflight_gate", REPO / "launch" / "preflight_gate.py"
    )
    gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate)
    monkeypatch.setattr(gate.importlib.util, "find_spec", lambda name: None)
    ran = []
    gate.check(
        SMOKE, "v4-8", ["--config.train_batch_size=64"], runner=lambda *a, **k: ran.append(a)
    )
    [line] = capsys.readouterr().err.strip().splitlines()
    assert not ran  # nothing is attempted: the launch goes ahead
    assert "no JAX" in line and "python -m simclr_jax.preflight" in line and "--tpu=v4-8" in line
