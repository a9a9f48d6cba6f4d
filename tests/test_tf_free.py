"""The TF-free path (data.backend='jax'): loader sharding, determinism and padded eval, the
device augmentation wired to it on 1 and 8 devices, its agreement in distribution with tf.data,
metrics without TensorFlow, and a smoke pretraining run where TensorFlow cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from simclr_jax import data, metrics, parallel
from simclr_jax.config import get_base_config
from simclr_jax.data import common, grain_pipeline, jax_augment, numpy_pipeline, sources, spec

REPO = Path(__file__).resolve().parents[1]
# What "TensorFlow is not installed" looks like to Python: `import tensorflow` raises
# ImportError and importlib.util.find_spec('tensorflow') returns None.
BLOCK_TF = 'import sys\nsys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None\n'


def _jax_config(**overrides):
    config = get_base_config().data
    config.backend = "jax"
    config.source = "bundled"
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 16
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def array_dir(tmp_path_factory):
    """37 train / 23 test 8x8 images whose every pixel is their row (so rows can be traced
    through any crop and resize)."""
    root = tmp_path_factory.mktemp("arrays")
    for split, n in (("train", 37), ("test", 23)):
        images = (
            np.zeros((n, 8, 8, 3), np.uint8) + np.arange(n, dtype=np.uint8)[:, None, None, None]
        )
        np.save(root / f"{split}_images.npy", images)
        np.save(root / f"{split}_labels.npy", np.arange(n) % 3)
    return str(root)


def _rows(batch):
    """The row each example's crop came from (its pixels are row / 255)."""
    return np.round(batch["image"].reshape(len(batch["image"]), -1)[:, 0] * 255).astype(int)


# ------------------------------------------------------------------ the loader


def test_imports_do_not_load_tensorflow():
    # TensorFlow is installed here: importing the library must still not load it.
    code = textwrap.dedent("""
        import sys
        import simclr_jax, simclr_jax.dispatch, simclr_jax.main, simclr_jax.data
        from simclr_jax.data import numpy_pipeline, jax_augment, backends, grain_pipeline
        import grain
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow",
                        "tensorflow_datasets"))
        assert not loaded, loaded
    """)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("processes", [1, 3])
def test_process_shards_are_disjoint_and_cover_every_example(array_dir, processes):
    config = _jax_config(source="numpy", data_dir=array_dir)
    seen = []
    for p in range(processes):
        it = grain_pipeline.make_train_iterator(
            config, split="train", batch_size=4 * processes, seed=1,
            process_index=p, process_count=processes,
        )  # fmt: skip
        epoch = len(it.views.shard)
        rows = np.concatenate([_rows(next(it)) for _ in range(-(-2 * epoch // 4))])
        # Every epoch of a process is a permutation of its shard.
        assert sorted(rows[:epoch]) == sorted(it.views.shard) == sorted(rows[epoch : 2 * epoch])
        assert not np.array_equal(rows[:epoch], rows[epoch : 2 * epoch])  # reshuffled
        seen.append(set(rows[:epoch]))
        it.close()
    assert sum(len(s) for s in seen) == 37 and set().union(*seen) == set(range(37))


def test_batch_k_depends_only_on_seed_and_k_and_grain_state_resumes(array_dir):
    config = _jax_config(source="numpy", data_dir=array_dir)
    make = lambda seed, start=0, **kw: grain_pipeline.make_train_iterator(
        config, split="train", batch_size=8, seed=seed, start_step=start, num_views=2, **kw
    )
    first = make(3)
    stream = [next(first) for _ in range(7)]  # crosses an epoch boundary (37 examples)
    resumed = make(3, start=5)
    restored = make(3)
    probe = make(3)
    for _ in range(3):
        next(probe)
    restored.set_state(json.loads(json.dumps(probe.get_state())))  # as the checkpoint has it
    for k in (5, 6):
        batch = next(resumed)
        for key in ("image", "label", "id"):
            np.testing.assert_array_equal(batch[key], stream[k][key])
    for k in (3, 4):
        np.testing.assert_array_equal(next(restored)["image"], stream[k]["image"])
    # A state saved with another layout (here: worker count) is ignored: start_step rules.
    relayout = make(3, start=5)
    relayout.set_state({**probe.get_state(), "workers": 5})  # would be batch 3 if applied
    np.testing.assert_array_equal(next(relayout)["image"], stream[5]["image"])
    relayout.close()
    assert not np.array_equal(next(make(4))["image"], stream[0]["image"])
    image = stream[0]["image"]
    assert image.shape == (8, 2, 16, 16, 3) and image.dtype == np.float32
    assert stream[0]["id"].dtype == np.uint32
    # Each view is a constant crop of one row's image; the two views come from one example
    # (equal up to the float rounding of resizing windows of different sizes).
    np.testing.assert_allclose(image[:, 0], image[:, 1], atol=1e-6)
    ids = np.concatenate([b["id"] for b in stream])
    np.testing.assert_array_equal(ids, np.arange(56))  # global positions, one process
    for it in (first, resumed, restored, probe):
        it.close()


@pytest.mark.parametrize("processes,batch_size", [(1, 10), (2, 8), (3, 9)])
def test_padded_eval_counts_each_example_once(array_dir, processes, batch_size):
    config = _jax_config(source="numpy", data_dir=array_dir, image_size=8)
    counts, num_batches = np.zeros(23, int), set()
    for p in range(processes):
        eval_data = data.make_eval_iterator(
            config, split="test", batch_size=batch_size, process_index=p,
            process_count=processes,
        )  # fmt: skip
        batches = list(eval_data)
        num_batches.add(len(batches))
        assert len(batches) == len(eval_data)
        for batch in batches:
            assert batch["image"].shape == (batch_size // processes, 8, 8, 3)
            keep = batch["mask"] > 0
            rows = np.round(batch["image"][keep, 0, 0, 0] * 255).astype(int)
            np.add.at(counts, rows, 1)
            np.testing.assert_array_equal(batch["label"][keep], rows % 3)
            assert np.all(batch["image"][~keep] == 0) and np.all(batch["label"][~keep] == 0)
    assert len(num_batches) == 1  # every process runs the same number of batches
    np.testing.assert_array_equal(counts, 1)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/<class>/*.png of mixed sizes (3 classes x 5) plus one corrupt file."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name in ["cat", "dog", "emu"]:
        (root / "train" / name).mkdir(parents=True)
        for i in range(5):
            size = (12 + 4 * i, 20 - 2 * i)
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    (root / "train" / "dog" / "2b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return str(root)


def test_folder_reads_lazily_crops_to_one_shape_and_skips_corrupt(image_folder, monkeypatch):
    decoded = []
    real_decode = common.pil_to_rgb_uint8
    monkeypatch.setattr(common, "pil_to_rgb_uint8", lambda b: decoded.append(1) or real_decode(b))
    config = _jax_config(source="folder", data_dir=image_folder, grain_threads=1)
    it = data.make_train_iterator(
        config, split="train[:4]", batch_size=2, seed=0, num_views=2, augmentation="simclr"
    )
    batch = next(it)
    # Lazy: only the batches in flight were decoded, never the whole folder (13 files).
    assert len(decoded) <= 2 * 4
    assert batch["image"].shape == (2, 2, 16, 16, 3) and batch["image"].dtype == np.float32
    labels = np.concatenate([batch["label"]] + [next(it)["label"] for _ in range(6)])
    assert set(labels) == {0, 1, 2}
    assert {Path(p).name for p in it.skipped_files} == {"2b.png"}
    it.close()
    info = data.get_dataset_info(
        _jax_config(
            source="folder", data_dir=image_folder, train_split="train[:4]", eval_split="train[4:]"
        )
    )
    assert info.num_classes == 3 and info.class_names == ("cat", "dog", "emu")
    assert info.num_examples == {"train[:4]": 12, "train[4:]": 4}  # dog/2b.png is the 4th dog


def test_host_eval_transform_matches_tf():
    tf = pytest.importorskip("tensorflow")
    from simclr_jax.data import augment

    image = np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    ours = numpy_pipeline.eval_transform(image, 24)
    # TF's bicubic kernel reads its weights from a 1024-entry table; ours (like jax_augment's)
    # are exact, so they differ by the table's quantization (< 1e-3), not by the method.
    np.testing.assert_allclose(ours, augment.eval_transform(tf.constant(image), 24), atol=1e-3)


def test_grain_crops_match_tf_data_on_a_large_non_square_image():
    """2,000 crop windows of a 500 x 375 image: area fraction and aspect ratio from the Grain
    path's sampler and from tf.data's (tf.image.stateless_sample_distorted_bounding_box) pass a
    two-sample KS test; the resized view of one box matches tf.image.resize bicubic to 1e-3."""
    tf = pytest.importorskip("tensorflow")
    stats = pytest.importorskip("scipy.stats")
    from simclr_jax.data import augment

    height, width, n = 375, 500, 2000
    ours = np.array(
        [
            grain_pipeline.crop_window_from_uniforms(
                grain_pipeline.view_uniforms(0, i, 0), height, width
            )
            for i in range(n)
        ]
    )
    sample = tf.function(
        lambda s: augment.sample_crop_window(tf.constant([height, width, 3]), s)[1]
    )
    theirs = np.array([sample(tf.constant([7, i])).numpy() for i in range(n)])
    for name, f in [
        ("area", lambda h, w: h * w / (height * width)),
        ("aspect", lambda h, w: w / h),
    ]:
        a, b = f(ours[:, 2], ours[:, 3]), f(theirs[:, 0], theirs[:, 1])
        assert stats.ks_2samp(a, b).pvalue > 0.01, (name, a.mean(), b.mean())
    assert (ours[:, 2] * ours[:, 3]).min() >= 0.1 * height * width  # min_object_covered
    assert len(np.unique(ours[:, 2:], axis=0)) > n // 4  # really random

    image = np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8)
    y, x, h, w = ours[0]
    view = grain_pipeline.crop_resize(image, (y, x, h, w), 224)
    crop = tf.image.convert_image_dtype(tf.constant(image[y : y + h, x : x + w]), tf.float32)
    reference = tf.image.resize(crop, (224, 224), method="bicubic").numpy()
    np.testing.assert_allclose(view, reference, atol=1e-3)


def test_grain_ships_the_tf_data_crop_unrounded_into_the_jitter():
    """The Grain path's crop of a fixed window, as shipped to the device (before colour
    jitter), equals tf.data's crop of that window (augment.crop_resize) within 1e-5: float32,
    not rounded to uint8 and not clipped (the reference clips only after the jitter). The
    window's scale (28 x 21 -> 14) puts every bicubic tap on TF's 1024-entry weight table, so
    the two resizes agree to float rounding."""
    tf = pytest.importorskip("tensorflow")
    from simclr_jax.data import augment

    image = np.random.default_rng(5).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    window = (5, 7, 28, 21)
    theirs = augment.crop_resize(tf.constant(image), window[:2], window[2:], 14).numpy()
    ours = grain_pipeline.crop_resize(image, window, 14)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert theirs.min() < 0 or theirs.max() > 1  # bicubic overshoot: uint8 would clip it
    rounded = np.round(np.clip(theirs, 0, 1) * 255) / 255
    assert np.abs(rounded - theirs).max() > 1e-3  # what rounding to uint8 would have cost

    # HostViews ships exactly that function's output for its sampled window.
    source = sources.ArraySource("test", image[None], np.arange(1), np.zeros(1, np.int32), ())
    params = spec.AugmentParams(image_size=14)
    views = grain_pipeline.HostViews(
        source, np.arange(1), seed=3, process_index=0, process_count=1, num_views=2,
        params=params, skip_corrupt=False,
    )(0)["image"]  # fmt: skip
    for v in range(2):
        uniforms = grain_pipeline.view_uniforms(3, 0, v)
        sampled = grain_pipeline.crop_window_from_uniforms(uniforms, 40, 36)
        np.testing.assert_array_equal(views[v], grain_pipeline.crop_resize(image, sampled, 14))


def test_bad_backend_and_source_combinations_are_named():
    with pytest.raises(ValueError, match="data.backend='torch'"):
        data.get_dataset_info(_jax_config(backend="torch"))
    with pytest.raises(ValueError, match="set data.backend='jax'"):
        data.get_dataset_info(_jax_config(backend="tfdata", source="numpy", data_dir="/x"))
    with pytest.raises(ValueError, match=r"train\[5:5\]' selects no examples of the bundled"):
        data.get_dataset_info(_jax_config(train_split="train[5:5]"))
    with pytest.raises(ValueError, match="found no train_images"):
        data.get_dataset_info(_jax_config(source="numpy", data_dir="/nonexistent"))


def test_json_lines_writer_keeps_lines_across_restarts(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = metrics.JsonLinesWriter(path)
    writer.write_scalars(1, {"loss": np.float32(2.5), "acc": 0.5})
    metrics.JsonLinesWriter(path).write_scalars(2, {"loss": 1.5})  # a resumed run appends
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 1, "acc": 0.5, "loss": 2.5}, {"step": 2, "loss": 1.5}]


def test_json_lines_writer_rewrites_object_store_files_at_flush(tmp_path):
    path = tmp_path / "metrics.jsonl"  # rewrite=True: what a gs:// path gets
    writer = metrics.JsonLinesWriter(path, rewrite=True)
    writer.write_scalars(1, {"loss": 2.0})
    writer.write_scalars(2, {"loss": 1.0})
    assert not path.exists()  # buffered: one rewrite per REWRITE_SECONDS, not one per line
    writer.flush()
    resumed = metrics.JsonLinesWriter(path, rewrite=True)
    resumed.write_scalars(3, {"loss": 0.5})
    resumed.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------ device augmentation


def test_wired_views_are_the_same_on_one_and_eight_devices(devices):
    config = _jax_config()
    views = {}
    for name, mesh in [
        ("one", parallel.create_mesh(devices=devices[:1])),
        ("eight", parallel.create_mesh()),
    ]:
        batches = data.make_train_batches(
            config, mesh, split="train", batch_size=16, num_views=2, augmentation="simclr",
            seed=0, start_step=2,
        )  # fmt: skip
        batch = next(batches)
        assert set(batch) == {"image", "label"}
        image = batch["image"]
        assert image.shape == (16, 2, 16, 16, 3) and image.dtype == np.float32
        assert image.sharding.is_equivalent_to(parallel.batch_sharding(mesh), image.ndim)
        views[name] = np.asarray(image)
    # Each of the 8 devices holds (and so augmented) its own 2 examples.
    assert {shard.data.shape[0] for shard in image.addressable_shards} == {2}
    np.testing.assert_allclose(views["eight"], views["one"], atol=1e-5)
    assert views["one"].min() >= 0 and views["one"].max() <= 1


# ------------------------------------------------------------------ agreement with tf.data


def _brightness_and_saturation(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-view mean pixel value and mean HSV saturation."""
    value, low = views.max(axis=-1), views.min(axis=-1)
    saturation = np.where(value > 0, (value - low) / np.maximum(value, 1e-12), 0.0)
    return views.mean(axis=(1, 2, 3)), saturation.mean(axis=(1, 2))


def _assert_same_distribution(ours, theirs, what, spread_tolerance):
    n = len(ours)
    tolerance = 4 * np.sqrt((ours.var() + theirs.var()) / n)  # 4 standard errors
    assert abs(ours.mean() - theirs.mean()) < tolerance, (what, ours.mean(), theirs.mean())
    assert abs(ours.std() / theirs.std() - 1) < spread_tolerance, (what, ours.std(), theirs.std())


def test_views_agree_in_distribution_with_tf_data():
    """2048 views of 1024 bundled images (ImageNet-strength jitter, blur on, 32 px) from both
    paths: the mean of per-view brightness and saturation agree within 4 standard errors and
    their spread within 10%; crop areas of 2048 windows on a 224 x 180 image likewise."""
    tf = pytest.importorskip("tensorflow")
    from simclr_jax.data import augment

    config = _jax_config(image_size=32)  # defaults: strength 1.0, blur 0.5, grayscale 0.2
    reader = numpy_pipeline.Reader(sources.bundled_source("train"), skip_corrupt=True)
    images = np.stack([reader.image(i) for i in range(0, 3000, 3)][:1024])
    n = 2 * len(images)

    params = spec.augment_params(config)
    crops = np.stack(
        [
            [
                grain_pipeline.crop_resize(
                    image,
                    grain_pipeline.crop_window_from_uniforms(
                        grain_pipeline.view_uniforms(0, i, v), *image.shape[:2]
                    ),
                    32,
                )
                for v in range(2)
            ]
            for i, image in enumerate(images)
        ]
    )
    augment_fn = jax_augment.make_augment_fn(params)
    ours = np.asarray(augment_fn(jax.random.key(0), crops, np.arange(len(images))))
    ds = tf.data.Dataset.from_tensor_slices((np.repeat(images, 2, axis=0), np.arange(n)))
    view = lambda image, i: augment.simclr_view(image, tf.stack([i, i * 7 + 1]), params)
    theirs = np.stack(list(ds.map(view, num_parallel_calls=2).as_numpy_iterator()))

    ours_b, ours_s = _brightness_and_saturation(ours.reshape(n, 32, 32, 3))
    theirs_b, theirs_s = _brightness_and_saturation(theirs)
    _assert_same_distribution(ours_b, theirs_b, "brightness", 0.1)
    _assert_same_distribution(ours_s, theirs_s, "saturation", 0.1)

    sample = grain_pipeline.crop_window_from_uniforms
    windows = [sample(grain_pipeline.view_uniforms(1, i, 0), 224, 180) for i in range(n)]
    _, _, h, w = np.array(windows).T
    sample = tf.function(lambda s: augment.sample_crop_window(tf.constant([224, 180, 3]), s)[1])
    tf_sizes = np.array([sample(tf.constant([2, i])).numpy() for i in range(n)])
    _assert_same_distribution(
        h * w / (224 * 180), tf_sizes.prod(axis=1) / (224 * 180), "crop area", 0.1
    )
    assert ours_b.std() > 0.05 and ours_s.std() > 0.05  # both paths really augment


# ------------------------------------------------------------------ end to end without TF


@pytest.mark.end_to_end
def test_smoke_pretraining_runs_where_tensorflow_cannot_be_imported(tmp_path):
    workdir = tmp_path / "run"
    code = BLOCK_TF + textwrap.dedent(f"""
        from absl import app
        from simclr_jax import main
        sys.argv = ["main", "--config=configs/smoke.py:pretrain", "--workdir={workdir}",
                    "--config.data.backend=jax", "--config.train_steps=3",
                    "--config.train_batch_size=16", "--config.warmup_steps=1",
                    "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
                    "--config.data.eval_split=test[:20]", "--config.knn_eval=False"]
        try:
            app.run(main.main)
        except SystemExit as exit:
            assert not exit.code, exit.code
        assert sys.modules["tensorflow"] is None  # nobody managed to import it
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=600)
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == 3 and results["num_eval_examples"] == 200
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
    assert not list(workdir.glob("events.out.tfevents*"))  # no TensorBoard without TF


def test_a_dead_grain_worker_is_a_clear_error(array_dir):
    psutil = pytest.importorskip("psutil")
    config = _jax_config(source="numpy", data_dir=array_dir, grain_workers=2)
    it = grain_pipeline.make_train_iterator(config, split="train", batch_size=4, seed=0)
    reference = grain_pipeline.make_train_iterator(
        _jax_config(source="numpy", data_dir=array_dir), split="train", batch_size=4, seed=0
    )
    # Worker processes give the same batches as threads.
    np.testing.assert_array_equal(next(it)["image"], next(reference)["image"])
    workers = [
        p
        for p in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    workers[0].kill()
    with pytest.raises(RuntimeError, match="Grain input pipeline failed.*terminated.*resume"):
        for _ in range(1000):
            next(it)
    it.close()
    reference.close()


def test_grain_workers_die_with_a_sigkilled_trainer(array_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "trainer.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from simclr_jax.config import get_base_config
        from simclr_jax.data import grain_pipeline
        if __name__ == "__main__":
            c = get_base_config().data
            c.update(backend="jax", source="numpy", data_dir={array_dir!r}, image_size=16,
                     train_split="train", eval_split="test", grain_workers=2)
            it = grain_pipeline.make_train_iterator(c, split="train", batch_size=4, seed=0)
            next(it)
            print("ready", flush=True)
            time.sleep(600)
        """)
    )
    trainer = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout.readline().strip() == "ready"
        workers = [
            p
            for p in psutil.Process(trainer.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
    finally:
        trainer.kill()
        trainer.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [p.pid for p in alive]


@pytest.mark.end_to_end  # two short training runs: about 2.5 minutes on 2 busy cores
def test_input_failure_mid_run_keeps_the_checkpoints_and_resume_finishes(tmp_path, monkeypatch):
    from configs import smoke
    from simclr_jax import checkpoint, dispatch

    config = smoke.get_config("pretrain")
    config.data.update(backend="jax", image_size=16, eval_split="test[:2]")
    config.update(
        train_batch_size=16, eval_batch_size=16, train_steps=5, warmup_steps=1,
        log_every_steps=1, checkpoint_every_steps=2, knn_eval=False,
    )  # fmt: skip
    real_call = grain_pipeline.HostViews.__call__

    def failing(self, position):
        if position >= 3 * 16:  # the batch of step 4
            raise OSError("simulated read failure (e.g. a vanished file or dead worker)")
        return real_call(self, position)

    monkeypatch.setattr(grain_pipeline.HostViews, "__call__", failing)
    workdir = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="Grain input pipeline failed.*resume"):
        dispatch.train_and_evaluate(config, workdir)
    manager, latest = checkpoint.open_for_restore(workdir)
    assert latest == 2 and checkpoint.read_meta(manager, 2)["data_state"]["next_step"] == 2
    monkeypatch.setattr(grain_pipeline.HostViews, "__call__", real_call)
    assert dispatch.train_and_evaluate(config, workdir)["step"] == 5
