"""model.remat recomputes residual blocks in the backward pass and changes nothing else: on 8
devices in float32 one step with each policy gives the loss, gradients and updated BatchNorm
statistics of the step without it (the statistics move once per step, not once per
recomputation), the parameters agree after 3 steps, and bad settings are one-line errors."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import preflight, require_libtpu

from simclr_jax import config as schema
from simclr_jax import loop, modes, parallel, step, train_state
from simclr_jax.models import create_model, resnet, validate_model_config

NUM_IMAGES, IMAGE_SIZE, NUM_CLASSES = 16, 16, 10
TOLERANCE = 1e-6
REPO = Path(__file__).resolve().parents[1]
SMOKE = f"{REPO}/configs/smoke.py:pretrain"


def tiny_config(mode, remat):
    """The smoke model (ResNet-18, standard stem) at 16 px, float32, with model.remat, trained
    by plain gradient descent at learning rate 1: the first update is minus the gradient."""
    config = schema.get_base_config()
    config.mode = mode
    config.train_batch_size = NUM_IMAGES
    config.optim.update(
        optimizer="momentum", momentum=0.0, learning_rate=1.0, lr_scaling="none", weight_decay=0.0
    )
    config.model.update(
        resnet_depth=18,
        proj_out_dim=32,
        num_proj_layers=2,
        cifar_stem=False,
        num_classes=NUM_CLASSES,
        remat=remat,
        # finetune: the stem and stage 1 frozen, so remat meets a frozen part too.
        fine_tune_after_block=1 if mode == "finetune" else -1,
    )
    return config


def batch_for(mode):
    rng = np.random.default_rng(0)
    shape = (NUM_IMAGES, 2) if mode == "pretrain" else (NUM_IMAGES,)
    return {
        "image": rng.random((*shape, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32),
        "label": rng.integers(0, NUM_CLASSES, NUM_IMAGES).astype(np.int32),
    }


def run(mode, remat, devices):
    """Through the training step on 8 devices: the first step's loss, gradients (the first
    update: LR 1, no momentum, no decay) and BN statistics, and the params after 3 steps."""
    config = tiny_config(mode, remat)
    mesh = parallel.create_mesh(devices=devices)
    model_mode = "pretrain" if mode == "pretrain" else "finetune"
    model = create_model(config.model, num_classes=NUM_CLASSES, mode=model_mode)
    durations = loop.Durations(total_steps=1000, warmup_steps=0, steps_per_epoch=1.0)
    tx, schedule = loop.create_optimizer(config, durations)
    state, shardings = train_state.create_train_state(
        model, tx, mesh, image_size=IMAGE_SIZE, seed=0
    )
    batch = parallel.host_batch_to_global(batch_for(mode), mesh)
    train_step = step.make_step(
        modes.get(config.mode).loss(config, model, mesh), tx, schedule, mesh, shardings
    )
    params0 = jax.device_get(state.params)
    state, metrics = train_step(state, batch)
    first = jax.device_get((state.params, state.batch_stats, metrics["loss"]))
    grads = jax.tree.map(lambda before, after: before - after, params0, first[0])
    for _ in range(2):
        state, _ = train_step(state, batch)
    return (first[2], grads, first[1]), jax.device_get(state.params)


def assert_close(a, b):
    flat_a, tree_a = jax.tree.flatten_with_path(a)[0], jax.tree.structure(a)
    flat_b, tree_b = jax.tree.flatten_with_path(b)[0], jax.tree.structure(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=TOLERANCE, atol=TOLERANCE, err_msg=str(path)
        )


@pytest.fixture(scope="module")
def baseline(devices):
    return {mode: run(mode, "none", devices) for mode in ("pretrain", "finetune")}


@pytest.mark.parametrize(
    "mode,remat",
    [
        ("pretrain", "block"),
        pytest.param("pretrain", "conv_outputs", marks=pytest.mark.slow),
        ("finetune", "block"),
    ],
)
def test_step_with_remat_equals_step_without(baseline, devices, mode, remat):
    (loss, grads, stats), after3 = run(mode, remat, devices)
    (loss0, grads0, stats0), after3_0 = baseline[mode]
    assert_close(loss, loss0)
    assert_close(grads, grads0)
    # Equal statistics after one step: the recomputation did not apply BN's update again
    # (from the initial mean 0, two updates would give 0.19 x the batch mean, not 0.1 x).
    assert_close(stats, stats0)
    assert_close(after3, after3_0)
    # The comparisons mean something only if the step moved the statistics and parameters.
    assert max(float(np.abs(m).max()) for m in jax.tree.leaves(stats0)) > 1e-3
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1e-3


def test_remat_keeps_parameter_paths_and_keeps_fewer_residuals():
    """Same variable tree under every policy (checkpoints move between settings), and fewer
    activations kept for the backward pass of two selective-kernel bottleneck blocks."""
    x = jax.ShapeDtypeStruct((2, 16, 16, 64), jnp.float32)

    def tree_and_residual_bytes(remat):
        stage = resnet.Stage(
            "bottleneck",
            16,
            2,
            2,
            resnet_d=True,
            sk_ratio=0.0625,
            settings=resnet.LayerSettings(remat=remat),
        )
        v = jax.eval_shape(lambda images: stage.init(jax.random.key(0), images, False), x)

        def residuals(params, stats, images):
            def loss(p):
                variables = {"params": p, "batch_stats": stats}
                return stage.apply(variables, images, True, mutable=["batch_stats"])[0].sum()

            return jax.vjp(loss, params)[1]

        vjp = jax.eval_shape(residuals, v["params"], v["batch_stats"], x)
        shapes = jax.tree.map(lambda s: s.shape, v)
        return shapes, sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp))

    trees, sizes = zip(*(tree_and_residual_bytes(r) for r in resnet.REMAT_POLICIES), strict=True)
    assert all(tree == trees[0] for tree in trees)
    sizes = dict(zip(resnet.REMAT_POLICIES, sizes, strict=True))
    assert sizes["block"] < sizes["conv_outputs"] < sizes["none"], sizes


def test_unknown_policy_lists_the_known_ones():
    config = tiny_config("pretrain", "everything")
    with pytest.raises(ValueError) as raised:
        validate_model_config(config.model, num_classes=NUM_CLASSES)
    message = str(raised.value)
    assert "\n" not in message and "model.remat='everything'" in message
    for known in resnet.REMAT_POLICIES:
        assert repr(known) in message


def test_remat_on_a_frozen_encoder_is_one_line():
    config = tiny_config("linear_eval", "block")
    config.model.fine_tune_after_block = 4
    config.init_checkpoint = "/nonexistent"
    with pytest.raises(ValueError) as raised:
        modes.validate_config(config)
    message = str(raised.value)
    assert "\n" not in message and "model.remat='none'" in message
    assert "fine_tune_after_block=4" in message


# ------------------------------------------------------------------ the preflight's --fit


def test_fit_tries_the_ways_in_order_of_cost_and_stops_at_the_first_that_fits(monkeypatch):
    """--fit's decisions on a simulated memory model (no compile): the state shrinks with
    FSDP, the activations with remat; FSDP alone is not enough, remat is."""
    from configs import smoke
    from simclr_jax import preflight as pf
    from simclr_jax.preflight.core import prepare_config

    tried = []

    def fake_preflight(config, tpu, *, devices):
        fsdp, remat = int(config.mesh.fsdp_min_size) > 0, config.model.remat
        tried.append((fsdp, remat))
        state = 20 if fsdp else 60
        activations = {"none": 80, "conv_outputs": 60, "block": 30}[remat]
        total = (state + activations) * 2**20
        fits = total <= tpu.hbm_bytes_per_device
        report = {"bytes_per_chip": {"total": total}, "step_seconds_estimate": 0.01,
                  "flops_per_step": 1e12}  # fmt: skip
        return pf.Result(fits, "fits" if fits else "does not fit", report)

    monkeypatch.setattr(pf.fit_module, "run_preflight", fake_preflight)
    config = smoke.get_config("pretrain")
    tpu = pf.with_hbm(pf.parse_accelerator_type("v5litepod-4"), 95 / 1024)
    result = pf.fit(config, tpu, jax.devices()[:4])
    assert tried == [(False, "none"), (True, "none"), (False, "conv_outputs"), (False, "block")]
    assert result.chosen.label == "remat=block" and result.chosen.changes == {
        "model.remat": "block"
    }
    line = pf.fit_line(tpu, config, result)
    assert "cheapest that fits: --config.model.remat=block" in line
    # Recomputation's FLOPs: the smoke model's lowered programs with and without remat, per
    # device (64 images, two views each, over 4 devices), times the 4 devices: about 29% more.
    prepared, _ = prepare_config(config, parallel.create_mesh(devices=jax.devices()[:4]))
    without = pf.fit_module.backward_flops(prepared, 2 * config.train_batch_size // 4) * 4
    assert 0.25 < result.recompute_flops / without < 0.33, line
    assert "recomputation adds" in line
    # A config that already has FSDP and remat tries only itself, then the batch search.
    config.mesh.fsdp_min_size, config.model.remat = 2**16, "block"
    assert [label for label, _ in pf.fit_candidates(config, ("conv_outputs", "block"))] == [
        "as configured"
    ]


@pytest.mark.tpu_compile
def test_fit_compiles_its_way_to_remat_where_fsdp_alone_does_not_fit(tmp_path):
    """The smoke model at 64 px, batch 512, on v5litepod-4 under 0.5 GiB per chip: as
    configured 610 MiB, with FSDP 614 (the gathered weights cost what sharding saves: the
    activations dominate), with remat=conv_outputs 489 (measured); three compiles."""
    require_libtpu()
    out = tmp_path / "fit.json"
    result = preflight(
        f"--config={SMOKE}", "--tpu=v5litepod-4", "--config.data.image_size=64",
        "--config.train_batch_size=512", "--hbm_gib=0.5", "--fit", f"--out={out}",
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # does not fit as configured
    report = json.loads(out.read_text())["fit"]
    tried = [(c["label"], c["fits"]) for c in report["candidates"]]
    assert tried == [("as configured", False), ("fsdp", False), ("remat=conv_outputs", True)]
    assert report["chosen"]["changes"] == {"model.remat": "conv_outputs"}
    assert report["chosen"]["total_bytes"] <= 0.5 * 2**30
    assert report["recompute_flops_per_step"] > 0
    answer = result.stderr.strip().splitlines()[-1]
    assert "--config.model.remat=conv_outputs" in answer and "recomputation adds" in answer


def test_bad_fit_policy_is_one_line():
    result = preflight(f"--config={SMOKE}", "--tpu=v4-8", "--fit", "--fit_remat=block,everything")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "--fit_remat=everything is not a remat policy" in line and "conv_outputs" in line


def test_report_carries_measured_over_estimate_for_calibrated_generations():
    """v3 and v4 reports carry MLPerf's measured rate over the estimate (decided before
    compiling here: the smoke model at a batch far over HBM, so nothing compiles)."""
    from configs import smoke
    from simclr_jax import preflight as pf

    assert pf.hardware.CALIBRATION["v3"].measured_over_estimate == pytest.approx(1954 / 3320)
    assert pf.hardware.CALIBRATION["v4"].measured_over_estimate == pytest.approx(3479 / 3507)
    config = smoke.get_config("pretrain")
    config.train_batch_size = 2**22
    for name, expected in (("v4-8", 0.99), ("v3-8", 0.59), ("v5litepod-4", None)):
        tpu = pf.parse_accelerator_type(name)
        # CPU devices stand in for the slice's: nothing is compiled for them.
        result = pf.run_preflight(config, tpu, devices=jax.devices()[: tpu.num_devices])
        assert not result.ok and "decided before compiling" in result.reason
        assert result.report.get("measured_over_estimate") == expected, name


@pytest.mark.tpu_compile
@pytest.mark.alone
@pytest.mark.timeout(3600)
def test_resnet152_3x_sk_at_4096_fits_v4_128_with_block_remat(tmp_path):
    """SimCLRv2's largest model at the paper's batch on 64 v4 chips: without remat its 64
    images per chip need 120-160 GiB of a chip's 32 (docs/preflight.md); recomputing each
    residual block fits it. One compile: about 10 minutes on an idle 2-core machine, and
    20 GB of host memory."""
    require_libtpu()
    out = tmp_path / "report.json"
    result = preflight(
        "--config=configs/imagenet_pretrain.py:r152_3x_sk", "--tpu=v4-128",
        "--config.model.dtype=bfloat16", "--config.model.remat=block", f"--out={out}",
        timeout=3300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["global_batch"] == 4096 and report["num_devices"] == 64 and report["fits"]
    memory = report["bytes_per_chip"]
    assert memory["total"] <= 32 * 2**30
    # What is left besides the state (parameters and LARS momentum, arguments and aliased
    # outputs) is the recomputed step's working set: measured 13.2 GiB of temporaries, below
    # the 17 GiB of residuals the traced model keeps (benchmarks/README.md).
    assert memory["temporaries"] < report["activation_bytes_per_chip"]
    assert report["step_seconds_estimate"] > 0 and "fits" in result.stdout
