"""Sources and pipelines: folders, the bundled sample, sharding, eval padding, determinism,
bad input and the preview."""

import hashlib
import io
import shutil
import socket
import subprocess
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import CIFAR_TARBALL, require
from PIL import Image

from simclr_jax import visualize
from simclr_jax.config import get_base_config
from simclr_jax.data import (
    common,
    get_dataset_info,
    make_eval_iterator,
    make_train_iterator,
    sources,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
CLASSES.append("truck")


def _data_config(**overrides):
    config = get_base_config().data
    config.source = "bundled"
    config.image_size = 32
    config.blur_prob = 0.0
    config.color_jitter_strength = 0.5
    config.train_split = "train"
    config.eval_split = "test"
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """The CIFAR-10 JPEG folder extracted once per session."""
    tarball = require(CIFAR_TARBALL, "the CIFAR-10 JPEG tarball")
    root = tmp_path_factory.mktemp("cifar10")
    if shutil.which("tar"):  # much faster than tarfile for 50,000 members
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(root)], check=True)
    else:
        with tarfile.open(tarball) as tar:
            tar.extractall(root, filter="data")
    return str(root)


def _hashes(images):
    return sorted(
        hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images
    )


# ---------------------------------------------------------------- CIFAR-10 folder


def test_folder_classes_and_labels(cifar_root):
    source = sources.folder_source(cifar_root, "train", supervised=True)
    assert source.class_names == tuple(CLASSES)
    assert source.num_examples == 50_000
    assert np.bincount(source.labels).tolist() == [5000] * 10
    for i in [0, 12_345, 27_500, 49_999]:
        path = Path(source.records[i])
        assert path.parent.name == CLASSES[source.labels[i]]
        assert path.exists()


def test_folder_per_class_slicing(cifar_root):
    train = sources.folder_source(cifar_root, "train[:4500]", supervised=True)
    val = sources.folder_source(cifar_root, "train[4500:]", supervised=True)
    assert (train.num_examples, val.num_examples) == (45_000, 5_000)
    assert set(train.records).isdisjoint(val.records)
    assert np.bincount(val.labels).tolist() == [500] * 10
    assert all(Path(p).name >= "4500.jpg" for p in val.records)
    # frozen_eval's default classifier / kNN bank split (the CIFAR-10 proof) is training data.
    probe = sources.folder_source(cifar_root, "train[:1000]", supervised=True)
    assert set(probe.records) <= set(train.records)
    config = _data_config(
        source="folder", data_dir=cifar_root, train_split="train[:4500]", eval_split="train[4500:]"
    )
    info = get_dataset_info(config)
    assert info.num_classes == 10
    assert info.num_examples == {"train[:4500]": 45_000, "train[4500:]": 5_000}


def test_process_shards_disjoint_and_cover(cifar_root):
    source = sources.folder_source(cifar_root, "train", supervised=True)
    shards = [set(common.train_shard(source, p, 2)) for p in range(2)]
    assert shards[0].isdisjoint(shards[1])
    assert shards[0] | shards[1] == set(range(source.num_examples))
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_eval_counts_each_example_once_on_two_hosts(cifar_root):
    config = _data_config(source="folder", data_dir=cifar_root)
    split, batch = "train[4800:]", 96  # 2000 examples; 48 rows per host do not divide 1000
    reference = [
        b
        for b in make_eval_iterator(
            config, split=split, batch_size=batch // 2, process_index=0, process_count=1
        )
    ]
    ref_images = [im for b in reference for im, m in zip(b["image"], b["mask"], strict=True) if m]
    assert len(ref_images) == 2000
    per_host, batches = [], []
    for p in range(2):
        data = make_eval_iterator(
            config, split=split, batch_size=batch, process_index=p, process_count=2
        )
        got = list(data)
        batches.append((data.num_batches, len(got)))
        assert all(b["image"].shape == (48, 32, 32, 3) for b in got)
        per_host.append(
            [
                (im, lab)
                for b in got
                for im, lab, m in zip(b["image"], b["label"], b["mask"], strict=True)
                if m
            ]
        )
        assert list(data) and len(list(data)) == data.num_batches  # re-iterable
    assert batches[0] == batches[1] == (21, 21)  # ceil(1000 / 48)
    assert len(per_host[0]) + len(per_host[1]) == 2000
    combined = [im for host in per_host for im, _ in host]
    assert _hashes(combined) == _hashes(ref_images)
    labels = np.array([lab for host in per_host for _, lab in host])
    assert np.bincount(labels).tolist() == [200] * 10


# ---------------------------------------------------------------- bundled sample


def test_bundled_sample_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the bundled sample must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    sources.load_bundled_arrays.cache_clear()
    info = get_dataset_info(_data_config())
    assert info.num_classes == 10 and info.class_names == tuple(CLASSES)
    assert info.num_examples == {"train": 3000, "test": 1000}
    train, test = sources.bundled_source("train"), sources.bundled_source("test")
    assert np.bincount(train.labels).tolist() == [300] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    arrays = sources.load_bundled_arrays()
    assert set(arrays["train_files"]).isdisjoint(arrays["test_files"])
    size = sum(a.nbytes for a in arrays.values())
    assert size < 5e6
    batch = next(iter(make_eval_iterator(_data_config(), split="test", batch_size=8)))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 32, 32, 3)
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.05  # real pictures, not padding
    assert len(sources.bundled_source("train[:50]").labels) == 500


def test_train_batches_shape_and_views():
    config = _data_config()
    it = make_train_iterator(
        config, split="train", batch_size=16, num_views=2, augmentation="simclr", seed=0
    )
    batch = next(it)
    assert batch["image"].shape == (16, 2, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert not np.allclose(batch["image"][:, 0], batch["image"][:, 1])
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    single = next(
        make_train_iterator(
            config,
            split="train",
            batch_size=8,
            num_views=1,
            augmentation="crop_flip",
            seed=0,
            process_index=1,
            process_count=2,
        )
    )
    assert single["image"].shape == (4, 32, 32, 3)


# ---------------------------------------------------------------- determinism


def _first_batches(config, seed, n, start_step=0, split="train"):
    it = make_train_iterator(
        config,
        split=split,
        batch_size=16,
        num_views=2,
        augmentation="simclr",
        seed=seed,
        start_step=start_step,
    )
    return [next(it) for _ in range(n)]


def test_deterministic_mode_reproduces_and_resumes():
    config = _data_config(deterministic=True)
    first, second = _first_batches(config, 3, 3), _first_batches(config, 3, 3)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    resumed = _first_batches(config, 3, 1, start_step=2)[0]
    np.testing.assert_array_equal(resumed["image"], first[2]["image"])
    # Resuming past an epoch boundary (200 examples = 12.5 batches of 16).
    far = _first_batches(config, 3, 14, split="train[:20]")
    resumed = _first_batches(config, 3, 1, start_step=13, split="train[:20]")[0]
    np.testing.assert_array_equal(resumed["image"], far[13]["image"])
    np.testing.assert_array_equal(resumed["label"], far[13]["label"])
    other = _first_batches(config, 4, 1)[0]
    assert not np.allclose(other["image"], first[0]["image"])


# ---------------------------------------------------------------- bad input


def _save(img, path, fmt, **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """Two classes with every odd image kind, two corrupt files, one tiny image."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    root = tmp_path / "messy"
    a, b = root / "train" / "a", root / "train" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    expected = {}
    _save(Image.fromarray(rgb), a / "rgb.png", "PNG")
    expected["a/rgb.png"] = rgb
    _save(Image.fromarray(rgb[..., 0]), a / "gray.png", "PNG")
    expected["a/gray.png"] = np.repeat(rgb[..., :1], 3, axis=-1)
    _save(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), a / "rgba.png", "PNG")
    expected["a/rgba.png"] = rgb
    palette = Image.fromarray(rgb).convert("P")
    _save(palette, a / "palette.png", "PNG")
    expected["a/palette.png"] = np.asarray(palette.convert("RGB"))
    sixteen = rgb[..., 1].astype(np.uint16) * 257
    _save(Image.fromarray(sixteen), b / "sixteen.png", "PNG")
    expected["b/sixteen.png"] = np.repeat(rgb[..., 1:2], 3, axis=-1)
    smooth = np.repeat(np.repeat(rgb[::8, ::8], 8, 0), 8, 1)  # JPEG-friendly
    cmyk = Image.fromarray(smooth).convert("CMYK")
    _save(cmyk, b / "cmyk.jpg", "JPEG", quality=95)
    jpeg = _save(Image.fromarray(smooth), b / "good.jpg", "JPEG", quality=95)
    _save(Image.fromarray(smooth).convert("L"), b / "grayjpeg.jpg", "JPEG", quality=95)
    for name in ("cmyk.jpg", "good.jpg", "grayjpeg.jpg"):  # lossy: compare with Pillow's decode
        with Image.open(b / name) as img:
            expected[f"b/{name}"] = np.asarray(img.convert("RGB"))
    _save(Image.fromarray(rgb[:8, :6]), b / "tiny.png", "PNG")  # smaller than the crop
    (b / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (a / "garbage.jpg").write_bytes(b"this is not an image at all")
    # Passes the cheap end-marker test but breaks the in-graph decoder (safety net).
    (a / "damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 100 + b"\xff\xd9")
    return root, expected


def test_bad_images_converted_and_corrupt_skipped(messy_folder, caplog):
    root, expected = messy_folder
    config = _data_config(source="folder", data_dir=str(root))
    data = make_eval_iterator(config, split="train", batch_size=4)
    rows = [(im, m) for batch in data for im, m in zip(batch["image"], batch["mask"], strict=True)]
    kept = [im for im, m in rows if m]
    assert len(kept) == 9  # 12 files, 3 corrupt
    assert data.num_batches == 3 and len(rows) == 12
    assert sorted(Path(p).name for p in data.skipped_files) == ["garbage.jpg", "truncated.jpg"]
    assert "truncated.jpg" in caplog.text and "garbage.jpg" in caplog.text
    source = sources.folder_source(str(root), "train", supervised=True)
    names = [str(Path(p).relative_to(root / "train")) for p in source.records]
    good = [n for n in names if n not in ("a/damaged.jpg", "a/garbage.jpg", "b/truncated.jpg")]
    assert len(good) == len(kept)
    for name, image in zip(good, kept, strict=True):
        if name == "b/tiny.png":
            assert image.shape == (32, 32, 3)  # resized up
            continue
        tol = 8 / 255 if name.endswith(".jpg") else 1e-6
        np.testing.assert_allclose(image, expected[name] / 255.0, atol=tol, err_msg=name)
    train = make_train_iterator(
        config, split="train", batch_size=4, num_views=2, augmentation="simclr", seed=0
    )
    for _ in range(4):
        assert next(train)["image"].shape == (4, 2, 32, 32, 3)


def test_corrupt_is_hard_error_when_not_skipping(messy_folder):
    root, _ = messy_folder
    config = _data_config(source="folder", data_dir=str(root), skip_corrupt=False)
    with pytest.raises(ValueError, match=r"(damaged|garbage|truncated)\.jpg.*skip_corrupt"):
        list(make_eval_iterator(config, split="train", batch_size=4))
    for name in ("damaged.jpg", "garbage.jpg", "truncated.jpg"):
        only = root / "only" / name.split(".")[0]
        only.mkdir(parents=True)
        shutil.copy(next(root.glob(f"train/*/{name}")), only / name)
        shutil.copy(root / "train" / "b" / "good.jpg", only / "good.jpg")
        config = _data_config(source="folder", data_dir=str(only), skip_corrupt=False)
        train = make_train_iterator(
            config, split="", batch_size=2, num_views=2, augmentation="simclr", seed=0
        )
        with pytest.raises(ValueError, match=rf"{name}.*skip_corrupt"):
            for _ in range(5):  # out-of-order parallel map: the error may come a batch later
                next(train)


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    config = _data_config(source="folder", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no images"):
        make_eval_iterator(config, split="empty", batch_size=4)
    with pytest.raises(ValueError, match="does not exist"):
        make_eval_iterator(config, split="missing", batch_size=4)
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    for i in range(3):
        _save(Image.new("RGB", (8, 8), (i, 0, 0)), one / f"{i}.png", "PNG")
    with pytest.raises(ValueError, match="1 class folder"):
        make_eval_iterator(config, split="one", batch_size=4)
    with pytest.raises(ValueError, match="1 class folder"):
        make_train_iterator(
            config, split="one", batch_size=2, num_views=1, augmentation="crop_flip", seed=0
        )
    pretrain = make_train_iterator(
        config, split="one", batch_size=2, num_views=2, augmentation="simclr", seed=0
    )
    assert next(pretrain)["image"].shape == (2, 2, 32, 32, 3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _save(Image.new("RGB", (8, 8), (0, i, 0)), flat / f"{i}.jpg", "JPEG")
    batch = next(
        make_train_iterator(
            config, split="flat", batch_size=2, num_views=2, augmentation="simclr", seed=0
        )
    )
    assert batch["label"].tolist() == [-1, -1]  # unlabeled folder for pretraining
    with pytest.raises(ValueError, match="data.data_dir"):
        make_eval_iterator(_data_config(source="folder", data_dir=""), split="x", batch_size=4)


def test_config_and_batch_errors():
    config = _data_config()
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        make_train_iterator(
            config,
            split="train",
            batch_size=16,
            num_views=2,
            augmentation="simclr",
            seed=0,
            process_index=0,
            process_count=3,
        )
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        make_eval_iterator(config, split="test", batch_size=16, process_index=2, process_count=3)
    with pytest.raises(ValueError, match="bundled sample has splits"):
        make_eval_iterator(config, split="validation", batch_size=8)
    with pytest.raises(ValueError, match="data.source"):
        get_dataset_info(_data_config(source="s3"))
    with pytest.raises(ValueError, match="augmentation"):
        make_train_iterator(
            config, split="train", batch_size=8, num_views=2, augmentation="mixup", seed=0
        )
    with pytest.raises(ValueError, match="data.eval_split"):
        get_dataset_info(_data_config(eval_split="train[a:b]"))


def _fake_tfds_builder(num_examples=100):
    """A stand-in for a prepared TFDS builder (no TFDS data can be downloaded offline): real
    split arithmetic (SplitDict) over JPEG bytes from the bundled sample."""
    import tensorflow_datasets as tfds

    template = tfds.core.ShardedFileTemplate(
        data_dir="/nonexistent", dataset_name="fake", split="train", filetype_suffix="tfrecord"
    )
    splits = tfds.core.SplitDict(
        [
            tfds.core.SplitInfo(
                name="train", shard_lengths=[num_examples], num_bytes=0, filename_template=template
            )
        ]
    )
    test = sources.bundled_source("test")
    images = [bytes(r) for r in test.records[:num_examples]]
    labels = test.labels[:num_examples].astype(np.int64)

    def as_dataset(split, shuffle_files, read_config, decoders):
        assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
        (instruction,) = splits[split].file_instructions
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        return ds.skip(instruction.skip).take(instruction.take)

    features = {"image": None, "label": tfds.features.ClassLabel(num_classes=10)}
    info = types.SimpleNamespace(splits=splits, features=features)
    return types.SimpleNamespace(name="fake", info=info, as_dataset=as_dataset)


def test_tfds_pipeline_eval_exact_and_train(monkeypatch):
    monkeypatch.setattr(sources, "_tfds_builder", lambda *args: _fake_tfds_builder())
    config = _data_config(source="tfds", name="fake", train_split="train", eval_split="train")
    assert get_dataset_info(config).num_examples == {"train": 100}
    labels, num_batches = [], set()
    for p in range(3):  # 34 / 33 / 33 examples, 4 rows per host
        data = make_eval_iterator(
            config, split="train", batch_size=12, process_index=p, process_count=3
        )
        got = list(data)
        num_batches.add((data.num_batches, len(got)))
        labels += [lab for b in got for lab, m in zip(b["label"], b["mask"], strict=True) if m]
    assert num_batches == {(9, 9)}
    expected = sources.bundled_source("test").labels[:100]
    assert sorted(labels) == sorted(expected.tolist())
    batch = next(
        make_train_iterator(
            config, split="train", batch_size=8, num_views=2, augmentation="simclr", seed=0
        )
    )
    assert batch["image"].shape == (8, 2, 32, 32, 3) and batch["label"].dtype == np.int32


def test_tfds_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        sources.tfds_source("no_such_dataset_xyz", str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"not prepared .*`tfds build mnist --data_dir="):
        sources.tfds_source("mnist", str(tmp_path), "train")
    monkeypatch.setattr(sources, "_tfds_builder", lambda *args: _fake_tfds_builder())
    source = sources.tfds_source("fake", "", "train[:90%]")
    assert (source.num_examples, source.num_classes) == (90, 10)
    with pytest.raises(ValueError, match="'bogus' is not a valid split"):
        sources.tfds_source("fake", "", "bogus")


def test_label_subset_file_keeps_only_listed_images(cifar_root, tmp_path):
    listed = ["0001.jpg", "0042.jpg"]  # names exist in every class folder
    names = tmp_path / "subset.txt"
    names.write_text("\n".join(listed) + "\n")
    config = _data_config(source="folder", data_dir=cifar_root, label_subset=str(names))
    subset = sources.get_source(config, "train", supervised=True, use_label_subset=True)
    assert subset.num_examples == 20
    assert sorted({Path(p).name for p in subset.records}) == listed
    assert np.bincount(subset.labels).tolist() == [2] * 10
    # The eval split is never filtered.
    full = sources.get_source(config, "train", supervised=True)
    assert full.num_examples == 50_000
    names.write_text("nothing_like_this.jpg\n")
    with pytest.raises(ValueError, match="label_subset matches no file"):
        sources.get_source(config, "train", supervised=True, use_label_subset=True)


def test_imagenet_percent_subsets_use_the_subset_builder(monkeypatch):
    import tensorflow_datasets as tfds

    requested = []
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir: requested.append(name))
    sources._tfds_builder("imagenet2012", "", "10pct")
    sources._tfds_builder("imagenet2012", "", "")
    assert requested == ["imagenet2012_subset/10pct", "imagenet2012"]
    with pytest.raises(ValueError, match="only defined for imagenet2012"):
        sources._tfds_builder("cifar10", "", "1pct")


# ---------------------------------------------------------------- preview


def test_preview_writes_png(tmp_path):
    grid = visualize.preview_grid(_data_config(), num_images=3, seed=0, scale=2)
    tile = 32 * 2 + visualize.GRID_PAD
    assert grid.shape == (3 * tile + visualize.GRID_PAD, 3 * tile + visualize.GRID_PAD, 3)
    assert grid.dtype == np.uint8
    out = tmp_path / "grid.png"
    visualize.write_png(grid, out)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (grid.shape[1], grid.shape[0])
        np.testing.assert_array_equal(np.asarray(img), grid)


def test_preview_cli(tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from simclr_jax.config import get_base_config\n"
        "def get_config(arg=None):\n"
        "    c = get_base_config()\n"
        "    c.data.source, c.data.image_size, c.data.blur_prob = 'bundled', 32, 0.0\n"
        "    return c\n"
    )
    out = tmp_path / "cli.png"
    args = ["preview", "--config", str(config_file), "--out", str(out), "--num_images", "2"]
    visualize.main([*args, "--set", "data.image_size=16", "--set", "data.eval_split=test"])
    with Image.open(out) as img:
        tile = 16 * visualize.preview_scale(16) + visualize.GRID_PAD
        assert img.size == (3 * tile + visualize.GRID_PAD, 2 * tile + visualize.GRID_PAD)


def test_tf_stays_on_cpu():
    assert not tf.config.list_physical_devices("GPU")
