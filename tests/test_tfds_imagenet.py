"""The real TFDS `imagenet2012` / `imagenet2012_subset` builders, offline, end to end.

Tiny manual tars are generated in the layout the builder reads (ILSVRC2012_img_train.tar of
per-synset tars, ILSVRC2012_img_val.tar of ILSVRC2012_val_*.JPEG), prepared with TFDS's own
builder code, then pretrained, linear-evaluated and evaluated through data.source='tfds' with
the ImageNet configs' `runlocal` settings. The training images are named after entries of the
published 1% / 10% subset lists (../shared/data/imagenet-subsets), which the subset builder
reads from the manual directory instead of downloading them.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import IMAGENET_SUBSETS as SUBSETS
from helpers import require
from PIL import Image

from configs import imagenet_linear_eval, imagenet_pretrain
from simclr_jax import data, dispatch
from simclr_jax.data import pipeline, sources

REPO = Path(__file__).resolve().parents[1]
# TensorFlow as if not installed: find_spec returns None and `import tensorflow` fails (TFDS
# tells "not installed" from "blocked" by sys.modules, so sys.modules[...] = None won't do).
HIDE_TF = textwrap.dedent("""
    import sys
    class _NoTF:
        def __init__(self, inner):
            self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                return None
            return self.inner.find_spec(name, path, target)
    sys.meta_path[:] = [_NoTF(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
""")
NUM_SYNSETS, NUM_VAL = 3, 10


def _no_network(*args, **kwargs):
    raise OSError("network access attempted (this test must run offline)")


def _jpeg(rng: np.random.Generator, colour: int) -> bytes:
    """A small non-square JPEG whose colour depends on its class."""
    h, w = rng.integers(36, 64, size=2)
    image = rng.integers(0, 60, (h, w, 3)) + np.eye(3, dtype=np.int64)[colour % 3] * 180
    out = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _pick_names() -> dict[str, list[str]]:
    """Per synset: 2 names of the 1% list, 2 of the 10% list only, 1 of neither."""
    one = (SUBSETS / "1percent.txt").read_text().split()
    ten = set((SUBSETS / "10percent.txt").read_text().split())
    synsets = sorted({n.split("_")[0] for n in one})[:NUM_SYNSETS]
    picked = {}
    for s in synsets:
        ones = sorted(n for n in one if n.startswith(s + "_"))[:2]
        tens = sorted(n for n in ten if n.startswith(s + "_") and n not in set(one))[:2]
        neither = f"{s}_999999.JPEG"
        assert neither not in ten and neither not in set(one)
        picked[s] = ones + tens + [neither]
    return picked


def _write_manual_dir(manual: Path, names: dict[str, list[str]]) -> None:
    rng = np.random.default_rng(0)
    manual.mkdir(parents=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for label, (synset, files) in enumerate(names.items()):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for f in files:
                    _add(inner, f, _jpeg(rng, label))
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, NUM_VAL + 1):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, i))
    # The subset builder looks for its lists here (checksums.tsv names them) before the web.
    for name in ("1percent.txt", "10percent.txt"):
        shutil.copy(SUBSETS / name, manual / name)


def _prepare(name: str, data_dir: Path, manual: Path, file_format: str = "tfrecord") -> None:
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False)
    builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare(download_config=config)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """(data_dir, manual_dir, names per synset, ArrayRecord data_dir): imagenet2012 and both
    subsets prepared as TFRecord, imagenet2012 also as ArrayRecord (for the Grain path)."""
    require(SUBSETS / "1percent.txt", "the published ImageNet subset lists")
    root = tmp_path_factory.mktemp("imagenet")
    names = _pick_names()
    _write_manual_dir(root / "manual", names)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        for name in ("imagenet2012", "imagenet2012_subset/1pct", "imagenet2012_subset/10pct"):
            _prepare(name, root / "tfds", root / "manual")
        _prepare("imagenet2012", root / "tfds_ar", root / "manual", "array_record")
    return root / "tfds", root / "manual", names, root / "tfds_ar"


def _data_config(data_dir, **overrides):
    config = imagenet_pretrain.get_config("r50_1x,runlocal")
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.data_dir = str(data_dir)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.update(overrides)
    return config.data


def _file_names(source, split: str) -> list[str]:
    ds = source.builder.as_dataset(split=split, shuffle_files=False)
    return [ex["file_name"].decode() for ex in ds.as_numpy_iterator()]


def test_builder_splits_subsets_and_hosts(imagenet, monkeypatch):
    data_dir, _, names, _ = imagenet
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    config = _data_config(data_dir)
    info = data.get_dataset_info(config)
    every = sorted(n for files in names.values() for n in files)
    assert info.num_examples == {"train": len(every), "validation": NUM_VAL}
    assert info.num_classes == 1000
    source = sources.get_source(config, "train", supervised=True)
    assert sorted(_file_names(source, "train")) == every
    # Labels are the synsets' indices in TFDS's label list.
    label_of = source.builder.info.features["label"].str2int
    ds = source.builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator()
    assert all(ex["label"] == label_of(ex["file_name"].decode()[:9]) for ex in ds)

    # label_subset '1pct' / '10pct': exactly the generated names that the lists contain.
    for subset, list_file in (("1pct", "1percent.txt"), ("10pct", "10percent.txt")):
        listed = set((SUBSETS / list_file).read_text().split())
        sub = sources.get_source(
            _data_config(data_dir, label_subset=subset), "train", supervised=True,
            use_label_subset=True,
        )  # fmt: skip
        assert sorted(_file_names(sub, "train")) == sorted(n for n in every if n in listed)
    batch = next(
        data.make_train_iterator(
            _data_config(data_dir, label_subset="1pct"), split="train", batch_size=4,
            num_views=1, augmentation="crop_flip", seed=0,
        )
    )  # fmt: skip
    assert batch["image"].shape == (4, 32, 32, 3)

    # 2 simulated hosts: disjoint training shards covering the split, and an eval pass that
    # counts every validation example once.
    shards = [_file_names(source, s) for s in pipeline._host_tfds_splits(source, 2)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == every
    counted, labels = 0, []
    for p in range(2):
        eval_data = data.make_eval_iterator(
            config, split="validation", batch_size=8, process_index=p, process_count=2
        )
        for b in eval_data:
            counted += int(b["mask"].sum())
            labels += b["label"][b["mask"] > 0].tolist()
        host = data.make_train_iterator(
            config, split="train", batch_size=8, num_views=2, augmentation="simclr", seed=0,
            process_index=p, process_count=2,
        )  # fmt: skip
        assert next(host)["image"].shape == (4, 2, 32, 32, 3)
    val = sources.get_source(config, "validation", supervised=True)
    ds = val.builder.as_dataset(split="validation", shuffle_files=False).as_numpy_iterator()
    assert counted == NUM_VAL and sorted(labels) == sorted(int(ex["label"]) for ex in ds)


def test_unprepared_and_empty_splits_say_what_to_do(imagenet, tmp_path):
    data_dir, _, _, _ = imagenet
    with pytest.raises(ValueError, match=r"tfds build imagenet2012 --data_dir=.*--manual_dir="):
        data.get_dataset_info(_data_config(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"tfds build imagenet2012_subset/10pct"):
        data.get_dataset_info(_data_config(tmp_path / "empty", label_subset="10pct"))
    with pytest.raises(ValueError, match=r"validation\[3:3\].*selects no examples"):
        data.get_dataset_info(_data_config(data_dir, eval_split="validation[3:3]"))
    names = tmp_path / "names.txt"
    names.write_text("n00000000_1.JPEG\n")
    with pytest.raises(ValueError, match="label_subset names no image of"):
        next(
            data.make_train_iterator(
                _data_config(data_dir, label_subset=str(names)), split="train", batch_size=4,
                num_views=1, augmentation="crop_flip", seed=0,
            )
        )  # fmt: skip


def test_grain_reads_tfds_array_record_on_two_hosts(imagenet, monkeypatch):
    data_dir, _, names, ar_dir = imagenet
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    config = _data_config(ar_dir, backend="jax")
    info = data.get_dataset_info(config)
    assert info.num_examples == {"train": 15, "validation": NUM_VAL}
    source = sources.get_source(config, "train", supervised=True)
    label_of = source.builder.info.features["label"].str2int
    synset_labels = {label_of(s) for s in names}
    counted, seen = 0, []
    for p in range(2):
        host = data.make_train_iterator(
            config, split="train", batch_size=8, num_views=2, augmentation="simclr", seed=0,
            process_index=p, process_count=2,
        )  # fmt: skip
        batch = next(host)
        assert batch["image"].shape == (4, 2, 32, 32, 3) and batch["image"].dtype == np.float32
        assert set(batch["label"].tolist()) <= synset_labels
        seen.append(set(host.views.shard.tolist()))
        host.close()
        for b in data.make_eval_iterator(
            config, split="validation", batch_size=8, process_index=p, process_count=2
        ):
            counted += int(b["mask"].sum())
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(15))
    assert counted == NUM_VAL
    with pytest.raises(ValueError, match="needs ArrayRecord.*--file_format=array_record"):
        data.make_train_iterator(
            _data_config(data_dir, backend="jax"), split="train", batch_size=8, num_views=2,
            augmentation="simclr", seed=0,
        )  # fmt: skip


def test_grain_reads_tfds_where_tensorflow_is_not_installed(imagenet):
    _, _, _, ar_dir = imagenet
    code = HIDE_TF + textwrap.dedent(f"""
        import importlib.util
        assert importlib.util.find_spec("tensorflow") is None
        from simclr_jax.config import get_base_config
        from simclr_jax import data
        if __name__ == "__main__":
            c = get_base_config().data
            c.update(backend="jax", source="tfds", name="imagenet2012", data_dir={str(ar_dir)!r},
                     train_split="train", eval_split="validation", image_size=32)
            assert data.get_dataset_info(c).num_examples == {{"train": 15, "validation": 10}}
            it = data.make_train_iterator(c, split="train", batch_size=4, num_views=2,
                                          augmentation="simclr", seed=0)
            assert next(it)["image"].shape == (4, 2, 32, 32, 3)
            it.close()
            batches = data.make_eval_iterator(c, split="validation", batch_size=4)
            assert sum(int(b["mask"].sum()) for b in batches) == 10
            assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
    """)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


def _run(config, workdir):
    return dispatch.train_and_evaluate(config, str(workdir))


@pytest.mark.end_to_end
def test_runlocal_pretrain_linear_eval_and_eval(imagenet, tmp_path, monkeypatch):
    data_dir, _, names, _ = imagenet
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    num_train = sum(len(files) for files in names.values())

    def use_imagenet(config):
        config.data = _data_config(data_dir, **{
            k: v for k, v in config.data.items()
            if k not in ("source", "name", "data_dir", "train_split", "eval_split")
        })  # fmt: skip
        config.knn_eval = False
        return config

    pretrain = use_imagenet(imagenet_pretrain.get_config("r50_1x,runlocal"))
    results = _run(pretrain, tmp_path / "pretrain")
    assert results["step"] == 4 and np.isfinite(results["loss"])
    assert results["num_eval_examples"] == NUM_VAL
    linear = use_imagenet(imagenet_linear_eval.get_config("r50_1x,runlocal"))
    linear.init_checkpoint = str(tmp_path / "pretrain")
    results = _run(linear, tmp_path / "linear")
    assert results["mode"] == "linear_eval" and results["num_eval_examples"] == NUM_VAL
    assert 0.0 <= results["top1"] <= 1.0 and np.isfinite(results["eval_loss"])
    evaluation = use_imagenet(imagenet_linear_eval.get_config("r50_1x,runlocal"))
    evaluation.mode = "eval"
    evaluation.init_checkpoint = str(tmp_path / "linear")
    again = _run(evaluation, tmp_path / "eval")
    assert again["num_eval_examples"] == NUM_VAL
    assert again["top1"] == pytest.approx(results["top1"]) and num_train == 15
