"""Training system: 1 vs 8 devices, exact resume, NaN stop, frozen-parameter labels, kNN."""

import jax
import numpy as np
import pytest
from helpers import IMAGE_SIZE, assert_trees_close, read_variables, tiny_config

from simclr_jax import checkpoint, dispatch, evaluate, loop, modes, parallel, step, train_state
from simclr_jax.models import create_model


def one_pretrain_step(devices, batch):
    """Initial state and one pretraining step on a mesh over `devices`."""
    config = tiny_config()
    config.model.num_classes = 10
    mesh = parallel.create_mesh(devices=devices)
    durations = loop.Durations(total_steps=10, warmup_steps=2, steps_per_epoch=1.0)
    model = create_model(config.model, num_classes=10)
    tx, schedule = loop.create_optimizer(config, durations)
    state, shardings = train_state.create_train_state(
        model, tx, mesh, image_size=IMAGE_SIZE, seed=0
    )
    # Step 0 has LR 0 during warmup; take two steps so the update is not trivially zero.
    config.loss.temperature = 0.2
    loss_fn = modes.pretrain.loss(config, model, mesh)
    train_step = step.make_step(loss_fn, tx, schedule, mesh, shardings)
    for _ in range(2):
        state, metrics = train_step(state, parallel.host_batch_to_global(batch, mesh))
    return jax.device_get((state.params, state.batch_stats, metrics))


def test_one_step_on_8_devices_equals_1_device(devices):
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((16, 2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    params1, stats1, metrics1 = one_pretrain_step(devices[:1], batch)
    params8, stats8, metrics8 = one_pretrain_step(devices, batch)
    # Looser than float32 rounding of one op: under the reference's conv init (VarianceScaling,
    # fan_in; He fan_out passed at 1e-5 / 1e-6 with the same step) the second step amplifies
    # the different reduction order of 8 devices to ~2e-5 relative in the norms and ~7e-5
    # absolute in parameters of size ~1e-2.
    assert_trees_close(metrics1, metrics8, rtol=5e-5, atol=1e-6)
    assert_trees_close(stats1, stats8, rtol=1e-5, atol=1e-6)
    assert_trees_close(params1, params8, rtol=1e-5, atol=2e-4)
    # The comparison above means something only if the step moved the parameters.
    assert metrics1["grad_norm"] > 0 and np.isfinite(metrics1["loss"])


def test_resume_is_exact(tmp_path, monkeypatch):
    """4 steps straight == 2 steps, interrupted, then resumed for 2 (deterministic data)."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    dispatch.train_and_evaluate(tiny_config(), straight)

    real_save = checkpoint.save

    def save_then_stop(manager, step, state_tree, meta):
        saved = real_save(manager, step, state_tree, meta)
        if step == 2:
            raise KeyboardInterrupt("simulated preemption after step 2")
        return saved

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        dispatch.train_and_evaluate(tiny_config(), resumed)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert checkpoint.open_for_restore(resumed)[1] == 2
    results = dispatch.train_and_evaluate(tiny_config(), resumed)
    assert results["step"] == 4
    a, b = read_variables(straight), read_variables(resumed)
    assert_trees_close(a, b, rtol=0, atol=0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_batches = modes.pretrain.data.make_train_batches

    def poisoned(*args, **kwargs):
        for index, batch in enumerate(real_batches(*args, **kwargs), start=1):
            if index == 3:
                batch = dict(batch, image=batch["image"] * np.float32(np.nan))
            yield batch

    monkeypatch.setattr(modes.pretrain.data, "make_train_batches", poisoned)
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="step 3"):
        dispatch.train_and_evaluate(tiny_config(train_steps=6), workdir)
    manager, latest = checkpoint.open_for_restore(workdir)
    assert latest == 2 and manager.all_steps() == [2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(read_variables(workdir)))
    assert not (tmp_path / "nan" / "results.json").exists()


def numpy_knn_top1(queries, bank, bank_labels, num_classes, k, temperature):
    """Independent weighted-kNN re-derivation."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    predictions = []
    for row in q @ b.T:
        nearest = np.argsort(-row)[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[bank_labels[j]] += np.exp(row[j] / temperature)
        predictions.append(np.argmax(votes))
    return np.array(predictions)


def test_knn_matches_numpy_and_ignores_padding(devices):
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(40, 6)).astype(np.float32)
    bank_labels = rng.integers(0, 4, 40).astype(np.int32)
    queries = rng.normal(size=(16, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 16).astype(np.int32)
    want = numpy_knn_top1(queries, bank[:32], bank_labels[:32], 4, k=5, temperature=0.1)
    # Rows 32.. of the bank are padding; pad them with vectors equal to the queries so that
    # they would win every vote if the mask were ignored.
    bank[32:] = queries[:8] * 10
    bank_mask = (np.arange(40) < 32).astype(np.float32)
    query_mask = (np.arange(16) < 12).astype(np.float32)
    result = evaluate.knn_accuracy(
        (bank, bank_labels, bank_mask),
        (queries, labels, query_mask),
        num_classes=4,
        k=5,
        temperature=0.1,
        query_batch=8,
    )
    expected = np.mean((want == labels)[:12])
    np.testing.assert_allclose(result["knn_top1"], expected, atol=1e-6)


def test_frozen_parameters_follow_fine_tune_after_block():
    config = tiny_config("finetune")
    config.model.num_classes = 10
    config.model.fine_tune_after_block = 2
    config.model.ft_proj_selector = 1
    model = create_model(config.model, num_classes=10, mode="finetune")
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    )["params"]
    labels = loop.param_labels(params, config)
    enc = labels["encoder"]
    assert {
        enc["stem"]["conv1"]["conv"]["kernel"],
        enc["stage2"]["block0"]["conv1"]["conv"]["kernel"],
    } == {"frozen"}
    assert enc["stage3"]["block0"]["conv1"]["conv"]["kernel"] == "trainable"
    head = labels["projection_head"]
    assert head["layer1"]["dense"]["kernel"] == "trainable"
    assert head["layer2"]["dense"]["kernel"] == "frozen"
    assert labels["classifier"]["kernel"] == "trainable"
