"""Checkpoints: round trips, partial restore, architecture mismatch errors, missing dirs,
keep limit, and that an interrupted save never becomes the latest checkpoint."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from simclr_jax import checkpoint, dispatch, loop, parallel, train_state
from simclr_jax.models import create_model

SIZE = 16


def model_config(**overrides):
    return helpers.model_config(smoke.get_config("pretrain").model, **overrides)


def abstract_variables(mode="pretrain", **overrides):
    """ShapeDtypeStructs of a model's variables (nothing compiled)."""
    model = create_model(model_config(**overrides), num_classes=10, mode=mode)
    return helpers.abstract_variables(model, SIZE, train=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with an R18 state saved at steps 1..3 (keep 2), plus the saved state."""
    workdir = tmp_path_factory.mktemp("ckpt")
    config = smoke.get_config("pretrain")
    config.model.num_classes = 10
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    model = create_model(config.model, num_classes=10)
    tx, _ = loop.create_optimizer(config, loop.Durations(10, 1, 1.0))
    state, _ = train_state.create_train_state(model, tx, mesh, image_size=SIZE, seed=0)
    (workdir / "notes.txt").write_text("not a checkpoint")
    manager = checkpoint.create_manager(workdir, keep=2)
    for step in (1, 2, 3):
        state = state.replace(step=jnp.asarray(step, jnp.int32))
        checkpoint.save(manager, step, state.to_tree(), {"config": config.to_dict()})
    manager.wait_until_finished()
    manager.close()
    return workdir, jax.device_get(state)


def test_keep_limit_deletes_only_old_checkpoints(saved):
    workdir, _ = saved
    manager, latest = checkpoint.open_for_restore(workdir)
    assert latest == 3 and manager.all_steps() == [2, 3]
    assert (workdir / "notes.txt").read_text() == "not a checkpoint"
    assert checkpoint.read_meta(manager, 3)["config"]["model"]["resnet_depth"] == 18


def test_full_restore_round_trip(saved):
    workdir, state = saved
    manager, step = checkpoint.open_for_restore(workdir)
    target = jax.tree.map(jnp.zeros_like, state.to_tree())
    restored = checkpoint.restore_state(manager, step, target)
    assert int(restored["step"]) == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.to_tree()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state.opt_state)


def test_partial_restore_loads_encoder_and_reports(saved):
    workdir, state = saved
    manager, step = checkpoint.open_for_restore(workdir)
    model = create_model(model_config(fine_tune_after_block=4), num_classes=10, mode="finetune")
    init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    target = init(jax.random.key(1))
    merged, report = checkpoint.restore_variables(manager, step, target, ("encoder",))
    for got, want in zip(
        jax.tree.leaves(merged["params"]["encoder"]),
        jax.tree.leaves(state.params["encoder"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(
        merged["params"]["classifier"]["kernel"], target["params"]["classifier"]["kernel"]
    )
    assert all(k.split("/")[1] == "encoder" for k in report["loaded"])
    assert "params/classifier/kernel" in report["initialized"]
    assert "params/projection_head/layer1/dense/kernel" in report["skipped"]


@pytest.mark.parametrize(
    "overrides,path",
    [
        ({"width_multiplier": 2}, "params/encoder/stem/conv1/conv/kernel"),
        ({"resnet_depth": 34}, "params/encoder/stage1/block2"),
        ({"resnet_depth": 50}, "params/encoder/stage1/block0/conv1/conv/kernel"),
        ({"sk_ratio": 0.0625}, "params/encoder/stem/conv2"),
    ],
)
def test_architecture_mismatch_names_parameter_and_shapes(saved, overrides, path):
    workdir, _ = saved
    manager, step = checkpoint.open_for_restore(workdir)
    target = abstract_variables(**overrides)
    with pytest.raises(ValueError, match="does not match the model architecture") as err:
        checkpoint.check_compatible(manager, step, target, ("encoder",))
    assert path in str(err.value)
    if "width_multiplier" in overrides:
        assert "(7, 7, 3, 128)" in str(err.value) and "(7, 7, 3, 64)" in str(err.value)


def test_linear_eval_of_other_architecture_fails_before_compile(saved, tmp_path):
    workdir, _ = saved
    config = smoke.get_config("linear_eval")
    config.init_checkpoint = str(workdir)
    config.model.width_multiplier = 2
    with pytest.raises(ValueError, match=r"stem/conv1/conv/kernel: model \(7, 7, 3, 128\)"):
        dispatch.train_and_evaluate(config, str(tmp_path / "lin"))
    assert not (tmp_path / "lin" / "checkpoints").exists()


def test_missing_and_empty_checkpoint_dirs_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.open_for_restore(tmp_path / "nowhere")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        checkpoint.open_for_restore(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="init_checkpoint is empty"):
        checkpoint.open_for_restore("")
    config = smoke.get_config("linear_eval")
    config.init_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dispatch.train_and_evaluate(config, str(tmp_path / "lin"))


def test_unknown_step_lists_available(saved):
    workdir, _ = saved
    with pytest.raises(FileNotFoundError, match=r"available steps: \[2, 3\]"):
        checkpoint.open_for_restore(workdir, step=7)


def test_interrupted_save_is_not_the_latest(saved, tmp_path):
    """Orbax writes <step>.orbax-checkpoint-tmp-* and renames when complete: a save killed
    half way leaves only the tmp directory, which restore and resume ignore."""
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(saved[0], workdir)
    partial = workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1234" / "state"
    partial.mkdir(parents=True)
    (partial / "_METADATA").write_text("{truncated")
    assert checkpoint.open_for_restore(workdir)[1] == 3
    manager = checkpoint.create_manager(workdir, keep=2)
    assert manager.latest_step() == 3
    manager.close()
