"""The smoke pipeline end to end on the bundled data: one pretraining run (shared by the
tests here), then linear eval (against a random encoder), and SimCLRv2's chain fine-tune (10%
labels) -> eval-only restore -> distill.

Its own file so that pytest-xdist (--dist loadfile) runs it beside tests/test_train.py.
"""

import json

import numpy as np
import pytest

from configs import smoke
from simclr_jax import checkpoint, dispatch, evaluate, loop, parallel, train_state
from simclr_jax.models import create_model


def run(mode, workdir, **overrides):
    """One phase of launch/run_local.sh's chain (configs/smoke.py) in workdir."""
    config = smoke.get_config(mode)
    config.update_from_flattened_dict(overrides)
    results = dispatch.train_and_evaluate(config, str(workdir))
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["mode"] == mode and on_disk["step"] == results["step"]
    return results


def save_random_encoder(workdir):
    """A checkpoint of the smoke model straight from its initializer (no training)."""
    config = smoke.get_config("pretrain")
    config.model.num_classes = 10
    model = create_model(config.model, num_classes=10)
    tx, _ = loop.create_optimizer(config, loop.Durations(10, 1, 1.0))
    state, _ = train_state.create_train_state(
        model, tx, parallel.create_mesh(), image_size=config.data.image_size, seed=1
    )
    manager = checkpoint.create_manager(workdir, keep=1)
    checkpoint.save(manager, 0, state.to_tree(), loop.checkpoint_meta(config, 0))
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(workdir, results) of the smoke pretraining run the tests below start from."""
    workdir = tmp_path_factory.mktemp("pretrain")
    return workdir, run("pretrain", workdir)


@pytest.mark.end_to_end
def test_pretrain_then_linear_eval_beats_a_random_encoder(pretrained, tmp_path):
    """Smoke pretrain -> embed -> linear eval, plus the random-encoder baseline.

    Observed on 2 shared CPU cores (reference init, probe outside LARS at 0.2x the LR): linear-
    eval top-1 0.364 after 150 pretraining steps vs 0.160 for the same protocol on a randomly
    initialized encoder (chance 0.10), online probe 0.299 (0.307 at the config's 0.1x in a
    separate run). The asserted margins (> 0.2 absolute, > random + 0.05, probe >= 75% of the
    linear eval) leave room for platform noise.
    """
    workdir, pre = pretrained
    assert np.isfinite(pre["loss"]) and pre["knn_top1"] > 0.1
    embed, saved_config = evaluate.load_embedder(str(workdir))
    size = saved_config.data.image_size
    h = embed(np.random.default_rng(0).random((3, size, size, 3), dtype=np.float32))
    assert h.shape == (3, 512) and np.isfinite(h).all()
    lin = run("linear_eval", tmp_path / "linear", init_checkpoint=str(workdir))
    save_random_encoder(tmp_path / "random")
    base = run(
        "linear_eval",
        tmp_path / "linear_random",
        init_checkpoint=str(tmp_path / "random"),
    )
    print(f"linear eval top-1: pretrained {lin['top1']:.3f} vs random {base['top1']:.3f}")
    # The encoder is frozen (BN in inference mode too): its kNN accuracy cannot change.
    np.testing.assert_allclose(lin["knn_top1"], pre["knn_top1"], atol=1e-6)
    assert lin["top1"] > 0.1 + 0.1
    assert lin["top1"] > base["top1"] + 0.05
    # The online probe (outside LARS, as the reference) nearly matches a frozen linear eval of
    # the same encoder; with the classifier under the trust ratio it reached 40% of it.
    print(f"online probe top-1 {pre['top1']:.3f} vs frozen linear eval {lin['top1']:.3f}")
    assert pre["top1"] >= 0.75 * lin["top1"]


@pytest.mark.end_to_end
def test_finetune_eval_and_distill_chain(pretrained, tmp_path):
    """The README's v2 chain: smoke pretrain -> fine-tune on 10% of the labels (the teacher;
    eval-only restore of it gives the same top-1) -> distill on all 3000 training images. The
    student reaches the teacher (within 0.02) and is not worse than the same student fine-tuned
    on the labelled subset alone for the same steps, batch and learning rate, beyond the eval
    set's sampling noise (two standard errors).

    At smoke scale the gap is within that noise: from a fresh clone's main job on 1 CPU
    device, teacher 0.287, student 0.292, labelled subset only 0.290; in a clean-clone suite run
    on 8 simulated devices, teacher 0.294, student 0.296, labelled subset only 0.300. "Student
    above the labelled-only student" is therefore asserted up to the noise, not
    strictly."""
    workdir = str(pretrained[0])
    teacher = run("finetune", tmp_path / "finetune", init_checkpoint=workdir, knn_eval=False)
    again = run(
        "eval", tmp_path / "eval", init_checkpoint=str(tmp_path / "finetune"), knn_eval=False
    )
    assert again["checkpoint_mode"] == "finetune"
    np.testing.assert_allclose(again["top1"], teacher["top1"], atol=1e-6)
    student = run(
        "distill",
        tmp_path / "distill",
        init_checkpoint=workdir,
        knn_eval=False,
        **{"distill.teacher_checkpoint": str(tmp_path / "finetune")},
    )
    distill_config = smoke.get_config("distill")
    labels_only = run(
        "finetune",
        tmp_path / "labels_only",
        init_checkpoint=workdir,
        knn_eval=False,
        train_steps=distill_config.train_steps,
        train_batch_size=distill_config.train_batch_size,
        **{"optim.learning_rate": distill_config.optim.learning_rate},
    )
    print(
        f"top-1: teacher {teacher['top1']:.3f}, distilled student {student['top1']:.3f}, "
        f"labelled subset only {labels_only['top1']:.3f}"
    )
    np.testing.assert_allclose(student["teacher_top1"], teacher["top1"], atol=1e-6)
    assert student["top1"] >= teacher["top1"] - 0.02
    eval_images = student["num_eval_examples"]
    noise = 2 * np.sqrt(labels_only["top1"] * (1 - labels_only["top1"]) / eval_images)
    assert student["top1"] > labels_only["top1"] - noise
