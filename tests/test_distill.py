"""mode 'distill' (SimCLRv2 stage 3): the loss against NumPy, gradients reach the student only,
the teacher stays bit-identical, 1 vs 8 devices, resume / preemption / eval, bad input. The
bundled-data chain pretrain -> fine-tune (10% labels) -> distill is in tests/test_end_to_end.py
(it shares that file's pretraining run)."""

import hashlib
import os
import signal

import helpers
import jax
import numpy as np
import pytest
from helpers import IMAGE_SIZE, np_softmax, read_variables

from simclr_jax import (
    checkpoint,
    dispatch,
    loop,
    losses,
    modes,
    parallel,
    preemption,
    step,
    train_state,
)
from simclr_jax.models import create_model
from simclr_jax.modes import distill

# ------------------------------------------------------------------ the loss


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_distillation_loss(student, teacher, tau, labeled=None, labels=None, alpha=1.0):
    """Paper eq. 3 with means and the reference's tau^2 weight (add_kd_loss):
    -alpha tau^2 E_x sum_y P_T log P_S - (1 - alpha) E log P_S(y)."""
    p_teacher = np.exp(np_log_softmax(teacher.astype(np.float64) / tau))
    cross_entropy = -(p_teacher * np_log_softmax(student.astype(np.float64) / tau)).sum(-1)
    distill_term = tau**2 * cross_entropy.mean()
    if alpha == 1.0:
        return distill_term
    log_p = np_log_softmax(labeled.astype(np.float64))
    labeled_term = -log_p[np.arange(len(labels)), labels].mean()
    return alpha * distill_term + (1 - alpha) * labeled_term


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.0])
def test_loss_matches_numpy(tau, alpha):
    rng = np.random.default_rng(int(tau * 10) + int(alpha * 100))
    student = rng.normal(0, 3, (12, 7)).astype(np.float32)
    teacher = rng.normal(0, 3, (12, 7)).astype(np.float32)
    labeled = rng.normal(0, 3, (6, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 6)
    loss, metrics = losses.distillation_loss(
        student,
        teacher,
        temperature=tau,
        labeled_logits=None if alpha == 1.0 else labeled,
        labels=None if alpha == 1.0 else labels,
        alpha=alpha,
    )
    expected = np_distillation_loss(student, teacher, tau, labeled, labels, alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    agree = (student.argmax(-1) == teacher.argmax(-1)).mean()
    np.testing.assert_allclose(float(metrics["teacher_agreement"]), agree)
    # The labelled term changes the loss: the test above would notice a dropped term.
    if alpha < 1.0:
        assert abs(expected - np_distillation_loss(student, teacher, tau)) > 1e-3


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_loss_and_student_gradient_carry_the_tau_squared_weight(tau):
    """The reference's add_kd_loss is softmax_cross_entropy(softmax(teacher / tau),
    student / tau, weights=tau**2): loss tau^2 x CE, gradient on the student's logits
    tau x (P_S - P_T) / batch, both against NumPy in float64."""
    rng = np.random.default_rng(7)
    student = rng.normal(0, 3, (16, 10)).astype(np.float32)
    teacher = rng.normal(0, 3, (16, 10)).astype(np.float32)
    s64, t64 = student.astype(np.float64), teacher.astype(np.float64)
    p_teacher, p_student = np_softmax(t64 / tau), np_softmax(s64 / tau)
    want_loss = tau**2 * -(p_teacher * np.log(p_student)).sum(-1).mean()
    want_grad = tau * (p_student - p_teacher) / len(student)

    def loss_fn(logits):
        return losses.distillation_loss(logits, teacher, temperature=tau)[0]

    loss, grad = jax.value_and_grad(loss_fn)(student)
    assert abs(float(loss) - want_loss) / abs(want_loss) < 1e-5
    grad = np.asarray(grad, np.float64)
    assert np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad) < 1e-5
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-9)
    # The teacher's logits get no gradient: its probabilities are constants.
    teacher_grad = jax.grad(lambda t: losses.distillation_loss(student, t, temperature=tau)[0])
    np.testing.assert_array_equal(np.asarray(teacher_grad(teacher)), 0.0)


def test_loss_is_minimal_when_student_equals_teacher():
    """Cross entropy >= entropy of the targets, with equality at student == teacher."""
    rng = np.random.default_rng(1)
    teacher = rng.normal(0, 2, (8, 5)).astype(np.float32)
    at_teacher, _ = losses.distillation_loss(teacher, teacher, temperature=0.5)
    other, _ = losses.distillation_loss(
        teacher + rng.normal(0, 1, (8, 5)), teacher, temperature=0.5
    )
    assert float(at_teacher) < float(other)
    grad = jax.grad(lambda s: losses.distillation_loss(s, teacher, temperature=0.5)[0])(teacher)
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)


# ------------------------------------------------------------------ step, gradients, devices


def tiny_config(mode="distill", **overrides):
    """helpers.tiny_config with small splits, no warmup and a labelled split for distill."""
    small = {
        "data.train_split": "train[:50]",
        "data.eval_split": "test[:10]",
        "data.shuffle_buffer": 500,
        "warmup_steps": 0,
        "distill.labeled_split": "train[:5]",
    }
    return helpers.tiny_config(mode, **{**small, **overrides})


def models():
    """A student and a teacher of different architectures (the student: classifier on h, no
    projection head; the teacher: classifier on the first of 3 head layers), 10 classes."""
    student_cfg = tiny_config().model
    student_cfg.proj_head_mode = "none"
    student_cfg.ft_proj_selector = 0
    student_cfg.zero_init_logits_layer = False
    teacher_cfg = tiny_config().model
    teacher_cfg.num_proj_layers = 3
    teacher_cfg.zero_init_logits_layer = False
    student = create_model(student_cfg, num_classes=10, mode="finetune")
    teacher = create_model(teacher_cfg, num_classes=10, mode="finetune")
    return student, teacher


def init_variables(model, seed):
    x = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    return jax.jit(lambda r: model.init(r, x, train=False))(jax.random.key(seed))


def random_batch(seed=0, n=8, labeled=True):
    rng = np.random.default_rng(seed)
    batch = {"image": rng.random((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)}
    if labeled:
        batch["labeled_image"] = rng.random((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
        batch["labeled_label"] = rng.integers(0, 10, n).astype(np.int32)
    return batch


def test_gradients_reach_the_student_only():
    student, teacher = models()
    s_vars, t_vars = init_variables(student, 0), init_variables(teacher, 1)
    batch = random_batch()

    def loss(student_params, teacher_vars):
        return distill.distill_loss_fn(
            student,
            teacher,
            student_params,
            s_vars["batch_stats"],
            teacher_vars,
            batch,
            temperature=0.5,
            alpha=0.5,
        )[0]

    g_student, g_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(s_vars["params"], t_vars)
    teacher_leaves = jax.tree.leaves(g_teacher)
    assert teacher_leaves and all(not np.any(np.asarray(g)) for g in teacher_leaves)
    norms = {
        k: float(jax.tree.reduce(lambda a, g: a + np.sum(np.square(g)), v, 0.0))
        for k, v in g_student.items()
    }
    assert norms["encoder"] > 0 and norms["classifier"] > 0


def distill_steps(devices, batches, alpha):
    """Two distillation steps on a mesh over `devices`; returns (state, metrics, teacher
    variables before, teacher variables after) as NumPy."""
    config = tiny_config()
    config.model.num_classes = 10
    mesh = parallel.create_mesh(devices=devices)
    student, teacher = models()
    t_vars = jax.device_put(init_variables(teacher, 1), parallel.replicated(mesh))
    before = jax.device_get(t_vars)
    tx, schedule = loop.create_optimizer(config, loop.Durations(10, 0, 1.0))
    state, shardings = train_state.create_train_state(
        student, tx, mesh, image_size=IMAGE_SIZE, seed=0
    )
    t_shardings = jax.tree.map(lambda _: parallel.replicated(mesh), t_vars)
    config.distill.temperature, config.distill.alpha = 0.5, alpha
    loss_fn = distill.loss(config, student, mesh, teacher=teacher)
    train_step = step.make_step(loss_fn, tx, schedule, mesh, shardings, (t_shardings,))
    for batch in batches:
        state, metrics = train_step(state, parallel.host_batch_to_global(batch, mesh), t_vars)
    return (
        jax.device_get((state.params, state.batch_stats, metrics)),
        before,
        jax.device_get(t_vars),
    )


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_8_devices_equal_1_device_and_teacher_is_untouched(devices):
    batches = [random_batch(0), random_batch(1)]
    one, before1, after1 = distill_steps(devices[:1], batches, alpha=0.5)
    eight, before8, after8 = distill_steps(devices, batches, alpha=0.5)
    params1, stats1, metrics1 = one
    params8, stats8, metrics8 = eight
    assert_trees_equal(metrics1, metrics8, rtol=1e-5, atol=1e-6)
    assert_trees_equal(stats1, stats8, rtol=1e-5, atol=1e-6)
    assert_trees_equal(params1, params8, rtol=1e-5, atol=1e-6)
    assert metrics1["grad_norm"] > 0 and np.isfinite(metrics1["loss"])
    assert "labeled_loss" in metrics1 and metrics1["labeled_loss"] > 0
    # Bit-identical teacher: same arrays after two steps that read them.
    assert_trees_equal(before1, after1)
    assert_trees_equal(before8, after8)


# ------------------------------------------------------------------ runs: resume, eval, errors


def save_random_checkpoint(workdir, mode, num_classes=10, depth=18, seed=1):
    """An untrained checkpoint of the smoke architecture written as if by `mode`."""
    config = tiny_config("finetune" if mode == "finetune" else "pretrain")
    config.mode = mode
    config.model.resnet_depth = depth
    config.model.num_classes = num_classes
    config.model.zero_init_logits_layer = False
    model_mode = "pretrain" if mode == "pretrain" else "finetune"
    model = create_model(config.model, num_classes=num_classes, mode=model_mode)
    tx, _ = loop.create_optimizer(config, loop.Durations(10, 0, 1.0))
    state, _ = train_state.create_train_state(
        model, tx, parallel.create_mesh(), image_size=IMAGE_SIZE, seed=seed
    )
    manager = checkpoint.create_manager(workdir, keep=1)
    checkpoint.save(manager, 0, state.to_tree(), loop.checkpoint_meta(config, 0))
    manager.wait_until_finished()
    manager.close()
    return str(workdir)


def tree_digest(path):
    """sha256 over every file's relative path and bytes under path."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """A fine-tuned-classifier checkpoint (ResNet-34: teacher and student differ)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("teacher"), "finetune", depth=34)


@pytest.mark.parametrize("backend", ["tfdata", "jax"])
def test_resume_after_preemption_is_exact_and_eval_reads_the_student(
    tmp_path, monkeypatch, teacher_workdir, tiny_pretrain_workdir, backend
):
    """4 steps straight == SIGTERM after step 2 (saved, Preempted), then resumed for 2, on
    either input backend (Grain: both streams' iterator states travel in the checkpoint); the
    eval mode restores the student; the teacher's checkpoint is not written."""
    overrides = {
        "distill.teacher_checkpoint": teacher_workdir,
        "init_checkpoint": str(tiny_pretrain_workdir),
        "distill.alpha": 0.5,
        "data.backend": backend,
    }
    teacher_before = tree_digest(teacher_workdir)
    straight = dispatch.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "straight"))
    assert straight["mode"] == "distill" and straight["step"] == 4
    assert np.isfinite(straight["loss"]) and 0 <= straight["teacher_top1"] <= 1

    real_make = step.make_step

    def make_then_sigterm(*args, **kwargs):
        jitted = real_make(*args, **kwargs)

        def stepped(state, batch, *extra):
            new_state, metrics = jitted(state, batch, *extra)
            if int(jax.device_get(new_state.step)) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return new_state, metrics

        return stepped

    monkeypatch.setattr(step, "make_step", make_then_sigterm)
    resumed_dir = str(tmp_path / "resumed")
    with pytest.raises(preemption.Preempted):
        dispatch.train_and_evaluate(tiny_config(**overrides), resumed_dir)
    monkeypatch.setattr(step, "make_step", real_make)
    manager, saved_step = checkpoint.open_for_restore(resumed_dir)
    data_state = checkpoint.read_meta(manager, saved_step)["data_state"]
    assert saved_step == 2 and data_state["next_step"] == data_state["labeled"]["next_step"] == 2
    if backend == "jax":  # Grain's own iterator state, for the unlabeled and labelled streams
        assert data_state["host"] and data_state["labeled"]["host"], data_state
    resumed = dispatch.train_and_evaluate(tiny_config(**overrides), resumed_dir)
    assert resumed["step"] == 4
    np.testing.assert_allclose(resumed["top1"], straight["top1"], atol=0)
    assert_trees_equal(read_variables(tmp_path / "straight"), read_variables(resumed_dir))

    evaluated = dispatch.train_and_evaluate(
        tiny_config("eval", init_checkpoint=resumed_dir), str(tmp_path / "eval")
    )
    assert evaluated["checkpoint_mode"] == "distill"
    np.testing.assert_allclose(evaluated["top1"], resumed["top1"], atol=1e-6)
    assert tree_digest(teacher_workdir) == teacher_before


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if training gets as far as building a train state or a teacher."""

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the bad input was reported")

    monkeypatch.setattr(loop, "create_train_state", refuse)
    monkeypatch.setattr(distill, "restore_teacher", refuse)


def test_pretraining_workdir_as_teacher_is_rejected(tmp_path, tiny_pretrain_workdir, no_compile):
    config = tiny_config(**{"distill.teacher_checkpoint": str(tiny_pretrain_workdir)})
    with pytest.raises(ValueError, match="mode='pretrain', not a fine-tuned classifier"):
        dispatch.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_teacher_names_the_teacher_field(tmp_path, teacher_workdir, no_compile):
    config = tiny_config(**{"distill.teacher_checkpoint": str(tmp_path / "nowhere")})
    with pytest.raises(
        FileNotFoundError, match="does not exist; config.distill.teacher_checkpoint"
    ):
        dispatch.train_and_evaluate(config, str(tmp_path / "run"))
    config = tiny_config(
        **{"distill.teacher_checkpoint": teacher_workdir, "distill.teacher_checkpoint_step": 7}
    )
    with pytest.raises(FileNotFoundError, match=r"config.distill.teacher_checkpoint_step=7 is not"):
        dispatch.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_teacher_with_other_classes_is_rejected(tmp_path, monkeypatch):
    teacher = save_random_checkpoint(tmp_path / "teacher5", "finetune", num_classes=5)
    monkeypatch.setattr(loop, "create_train_state", lambda *a, **k: pytest.fail("compiled"))
    config = tiny_config(**{"distill.teacher_checkpoint": teacher})
    with pytest.raises(ValueError, match="predicts 5 classes but data bundled:train.* has 10"):
        dispatch.train_and_evaluate(config, str(tmp_path / "run"))


def test_student_that_cannot_restore_init_checkpoint_is_rejected(
    tmp_path, teacher_workdir, tiny_pretrain_workdir, no_compile
):
    config = tiny_config(
        **{
            "distill.teacher_checkpoint": teacher_workdir,
            "init_checkpoint": str(tiny_pretrain_workdir),
            "model.width_multiplier": 2,
        }
    )
    with pytest.raises(ValueError, match="does not match the model architecture"):
        dispatch.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"distill.teacher_checkpoint": ""}, "distill.teacher_checkpoint"),
        ({"distill.temperature": 0.0}, "distill.temperature"),
        ({"distill.alpha": 1.5}, "distill.alpha"),
        ({"distill.alpha": 0.5, "distill.labeled_split": ""}, "distill.labeled_split"),
        ({"data.label_subset": "10pct"}, "distill.label_subset"),
    ],
)
def test_bad_distill_fields_name_the_field(overrides, match):
    config = tiny_config(**{"distill.teacher_checkpoint": "/some/finetune", **overrides})
    with pytest.raises(ValueError, match=match):
        modes.validate_config(config)
