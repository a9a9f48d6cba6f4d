"""Where examples come from: the bundled sample, image folders, NumPy arrays and TFDS builders.

No TensorFlow here, so both backends share every listing, slicing and label rule. Split syntax
for folders, arrays and the bundled sample: '<subdir>' or '<subdir>[start:end]', sliced per
class (ints or percentages).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import io
import logging
import os
import re
from typing import Any

import numpy as np
from etils import epath

SOURCES = ("bundled", "tfds", "folder", "numpy")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
BUNDLED_FILE = "cifar10_sample.npz"
BUNDLED_SPLITS = ("train", "test")
LABEL_SUBSETS = ("1pct", "10pct")
_SPLIT_RE = re.compile(r"^(?P<name>[^\[\]]*)(\[(?P<start>[^:\[\]]*):(?P<end>[^:\[\]]*)\])?$")


class _Labelled:
    """Counts of a source with `labels` (one per example) and `class_names`."""

    @property
    def num_examples(self) -> int:
        """Number of examples in the split."""
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for unlabeled examples)."""
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class IndexedSource(_Labelled):
    """Examples read by index: `records` are file paths or encoded image bytes."""

    description: str
    records: np.ndarray  # object array of str paths or bytes
    labels: np.ndarray  # int32, -1 for unlabeled
    class_names: tuple[str, ...]
    records_are_paths: bool

    def names(self) -> np.ndarray:
        """A name per record for logs (the path, or '<description>#<index>')."""
        if self.records_are_paths:
            return self.records.astype(str)
        return np.array([f"{self.description}#{i}" for i in range(self.num_examples)])


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A TFDS builder and one split (any TFDS split syntax)."""

    builder: Any
    split: str
    num_examples: int
    num_classes: int
    name_filter: frozenset[str] | None = None  # label_subset given as a file of image names

    @property
    def description(self) -> str:
        """'tfds:<name>/<config>:<split>' for messages."""
        config = f"/{self.builder.builder_config.name}" if self.builder.builder_config else ""
        return f"tfds:{self.builder.name}{config}:{self.split}"


@dataclasses.dataclass(frozen=True)
class ArraySource(_Labelled):
    """Decoded uint8 images (N, H, W, 3), possibly memory-mapped; `rows` are this split's."""

    description: str
    images: np.ndarray
    rows: np.ndarray  # int64 rows of `images` in this split (after slicing)
    labels: np.ndarray  # int32 per row of the split, -1 for unlabeled
    class_names: tuple[str, ...]


Source = IndexedSource | ArraySource | TfdsSource


# ---------------------------------------------------------------- split syntax


def parse_split(split: str, field: str = "split") -> tuple[str, str | None, str | None]:
    """'train[4500:]' -> ('train', '4500', ''); 'train' -> ('train', None, None)."""
    match = _SPLIT_RE.match(split.strip())
    if match is None:
        raise ValueError(
            f"{field}={split!r} is not '<name>' or '<name>[start:end]' (e.g. 'train[:4500]')."
        )
    return match["name"], match["start"], match["end"]


def _slice_bound(value: str | None, n: int, field: str, split: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        if value.endswith("%"):
            return int(round(float(value[:-1]) * n / 100.0))
        return int(value)
    except ValueError:
        raise ValueError(
            f"{field}={split!r}: slice bound {value!r} must be an int or a percentage."
        ) from None


def slice_per_class(
    files: list, start: str | None, end: str | None, field: str, split: str
) -> list:
    """Applies a '[start:end]' slice to one class's files sorted by name."""
    n = len(files)
    return files[_slice_bound(start, n, field, split) : _slice_bound(end, n, field, split)]


def _rows_per_class(
    labels: np.ndarray, start: str | None, end: str | None, field: str, split: str, where: str
) -> np.ndarray:
    """Sorted rows of the '[start:end]' slice of every class, rows taken in file order."""
    keep: list[int] = []
    for label in np.unique(labels):
        keep += slice_per_class(list(np.flatnonzero(labels == label)), start, end, field, split)
    if not keep:
        raise ValueError(f"{field}={split!r} selects no examples of {where}; widen the slice.")
    return np.array(sorted(keep), dtype=np.int64)


# ---------------------------------------------------------------- bundled sample


@functools.lru_cache(maxsize=1)
def load_bundled_arrays() -> dict[str, np.ndarray]:
    """The bundled sample's arrays, read from package files only (no network)."""
    resource = importlib.resources.files("simclr_jax.data") / "bundled" / BUNDLED_FILE
    with resource.open("rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}


def bundled_source(split: str, field: str = "split") -> IndexedSource:
    """The offline CIFAR-10 sample; splits 'train' (300/class) and 'test' (100/class)."""
    name, start, end = parse_split(split, field)
    if name not in BUNDLED_SPLITS:
        raise ValueError(
            f"{field}={split!r}: the bundled sample has splits {BUNDLED_SPLITS} "
            "(with optional per-class slicing such as 'train[:200]')."
        )
    arrays = load_bundled_arrays()
    offsets, blob = arrays[f"{name}_offsets"], arrays[f"{name}_jpeg"].tobytes()
    labels = arrays[f"{name}_labels"].astype(np.int32)
    keep_array = _rows_per_class(labels, start, end, field, split, "the bundled sample")
    records = np.array([blob[offsets[i] : offsets[i + 1]] for i in keep_array], dtype=object)
    return IndexedSource(
        description=f"bundled:{split}",
        records=records,
        labels=labels[keep_array],
        class_names=tuple(str(c) for c in arrays["class_names"]),
        records_are_paths=False,
    )


# ---------------------------------------------------------------- image folders


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@functools.lru_cache(maxsize=16)
def _list_folder(directory: str) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(loose image files, {class subdir: sorted image files}) of one directory; epath, not
    tf.io.gfile, so that listing needs no TensorFlow (epath uses gfile for gs:// if present)."""
    entries = sorted(epath.Path(directory).iterdir(), key=lambda p: p.name)
    subdirs = [e.name for e in entries if e.is_dir()]
    loose = tuple(e.name for e in entries if _is_image(e.name))
    classes = {
        d: tuple(sorted(f.name for f in epath.Path(directory, d).iterdir() if _is_image(f.name)))
        for d in subdirs
    }
    return loose, {d: files for d, files in classes.items() if files}


def folder_source(
    data_dir: str, split: str, *, supervised: bool, field: str = "split"
) -> IndexedSource:
    """Image folder data_dir/<subdir>/<class>/*.jpg|png (labels = sorted class index), or a
    flat folder of images (unlabeled, label -1, pretraining only)."""
    if not data_dir:
        raise ValueError("data.data_dir is empty; source='folder' needs the image-folder root.")
    name, start, end = parse_split(split, field)
    directory = os.path.join(data_dir, name) if name else data_dir
    if not epath.Path(directory).is_dir():
        # CIFAR-10 folders are often unpacked with train/ only: name the protocol that fits.
        hint = (
            " With training images only, use the ':val' protocol (e.g. "
            "configs/cifar10_pretrain.py:val: train[:4500] -> train[4500:])."
            if name == "test"
            else ""
        )
        raise ValueError(
            f"{field}={split!r}: folder {directory!r} does not exist; expected "
            f"data.data_dir/<split>/<class>/<image> (or a flat folder of images).{hint}"
        )
    loose, classes = _list_folder(directory)
    if classes:
        class_names = tuple(sorted(classes))
        per_class = [
            (c, slice_per_class(list(classes[c]), start, end, field, split)) for c in class_names
        ]
        empty = [c for c, files in per_class if not files]
        if empty and (start or end):
            raise ValueError(
                f"{field}={split!r}: class {empty[0]!r} has {len(classes[empty[0]])} images in "
                f"{directory!r} and none fall in this slice; every class needs more images than "
                "the slice start (the ':val' protocol, train[:4500] / train[4500:], needs more "
                "than 4500 per class, as CIFAR-10's 5000)."
            )
        paths = [os.path.join(directory, c, f) for c, files in per_class for f in files]
        labels = [label for label, (_, files) in enumerate(per_class) for _ in files]
    else:
        class_names = ()
        files = slice_per_class(list(loose), start, end, field, split)
        paths = [os.path.join(directory, f) for f in files]
        labels = [-1] * len(paths)
    if not paths:
        raise ValueError(
            f"{field}={split!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {directory!r}"
            f"{' for this slice' if start or end else ''}; point data.data_dir at a folder "
            "laid out as <split>/<class>/<image>."
        )
    if supervised and len(class_names) < 2:
        raise ValueError(
            f"{field}={split!r}: {directory!r} has {len(class_names)} class folder(s); "
            "supervised training/eval needs at least 2 (<split>/<class>/<image>). An unlabeled "
            "or one-class folder can only be used for pretraining."
        )
    return IndexedSource(
        description=f"folder:{directory}",
        records=np.array(paths, dtype=object),
        labels=np.array(labels, dtype=np.int32),
        class_names=class_names,
        records_are_paths=True,
    )


# ---------------------------------------------------------------- NumPy arrays


@functools.lru_cache(maxsize=4)
def _load_arrays(data_dir: str, name: str) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """(images, labels or None, class names) of split `name`; .npy files memory-mapped."""
    path = epath.Path(data_dir)
    if data_dir.endswith(".npz") and path.is_file():
        with path.open("rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        labels = arrays.get(f"{name}_labels")
        names = tuple(str(c) for c in arrays.get("class_names", ()))
        return arrays.get(f"{name}_images"), labels, names
    if path.is_dir() and (path / f"{name}_images.npy").exists():
        images = np.load(str(path / f"{name}_images.npy"), mmap_mode="r")
        labels_path = path / f"{name}_labels.npy"
        labels = np.load(str(labels_path)) if labels_path.exists() else None
        return images, labels, ()
    return None, None, ()


def array_source(data_dir: str, split: str, *, supervised: bool, field: str = "split"):
    """Decoded images from a .npz file or a folder of .npy files (see the module docstring)."""
    name, start, end = parse_split(split, field)
    images, labels, class_names = _load_arrays(data_dir, name) if data_dir else (None, None, ())
    if images is None:
        raise ValueError(
            f"{field}={split!r}: data.source='numpy' found no {name}_images array in "
            f"data.data_dir={data_dir!r}; give a .npz file with '{name}_images' / "
            f"'{name}_labels' or a folder with {name}_images.npy / {name}_labels.npy."
        )
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{field}={split!r}: {name}_images has shape {images.shape} and dtype "
            f"{images.dtype}; expected uint8 RGB images (N, H, W, 3)."
        )
    if labels is None:
        labels = np.full(len(images), -1, np.int32)
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"{field}={split!r}: {name}_labels has shape {labels.shape}, expected "
            f"({len(images)},), one label per image."
        )
    labels = labels.astype(np.int32)
    rows = _rows_per_class(labels, start, end, field, split, f"data.data_dir={data_dir!r}")
    if not class_names and labels.max(initial=-1) >= 0:
        class_names = tuple(str(c) for c in range(int(labels.max()) + 1))
    if supervised and len(class_names) < 2:
        raise ValueError(
            f"{field}={split!r}: {name}_labels names {len(class_names)} class(es); supervised "
            "training/eval needs labelled arrays with at least 2 classes."
        )
    return ArraySource(f"numpy:{data_dir}:{split}", images, rows, labels[rows], class_names)


# ---------------------------------------------------------------- TFDS


def _tfds_builder(name: str, data_dir: str, label_subset: str):
    import tensorflow_datasets as tfds

    if label_subset in LABEL_SUBSETS:
        if not name.startswith("imagenet2012"):
            raise ValueError(
                f"data.label_subset={label_subset!r} is only defined for imagenet2012 "
                f"(data.name={name!r}); use a file of image names instead."
            )
        name = f"imagenet2012_subset/{label_subset}"
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # DatasetNotFoundError and friends
        raise ValueError(
            f"data.name={name!r} is not a TFDS dataset that can be loaded "
            f"(data_dir={data_dir!r}): {str(error).splitlines()[0]}. Check the name "
            "(tfds.list_builders()) and data.data_dir."
        ) from None


def build_command(builder: Any, data_dir: str) -> str:
    """The `tfds build` command line that prepares `builder` in data_dir."""
    config = f"/{builder.builder_config.name}" if builder.builder_config else ""
    manual = (
        " --manual_dir=<folder with the downloaded tars>"
        if builder.MANUAL_DOWNLOAD_INSTRUCTIONS
        else ""
    )
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return f"tfds build {builder.name}{config} --data_dir={where}{manual}"


def read_name_list(path: str) -> frozenset[str]:
    """Image names (one per line, e.g. 'n01440764_10026.JPEG') from a label_subset file."""
    if not epath.Path(path).exists():
        raise ValueError(
            f"data.label_subset={path!r} is neither {LABEL_SUBSETS} nor an existing file "
            "listing image names (one per line)."
        )
    with epath.Path(path).open() as f:
        names = frozenset(os.path.basename(line.strip()) for line in f if line.strip())
    if not names:
        raise ValueError(f"data.label_subset={path!r} lists no image names.")
    return names


def tfds_source(
    name: str, data_dir: str, split: str, *, label_subset: str = "", field: str = "split"
) -> TfdsSource:
    """A TFDS split (any slicing syntax, e.g. 'train[:90%]'), validated up front."""
    subset = label_subset if label_subset in LABEL_SUBSETS else ""
    builder = _tfds_builder(name, data_dir, subset)
    splits = builder.info.splits
    if not splits:
        command = build_command(builder, data_dir)
        raise ValueError(
            f"data.name={name!r}{f' (label_subset {subset!r})' if subset else ''} is not "
            f"prepared in data_dir={data_dir!r}; prepare it with `{command}`"
            " (README 'Preparing ImageNet'), then copy data_dir to where the run reads it."
        )
    try:
        num_examples = splits[split].num_examples
    except Exception as error:
        raise ValueError(
            f"{field}={split!r} is not a valid split of {builder.name!r} "
            f"(splits: {sorted(splits.keys())}; slicing like 'train[:90%]'): {error}"
        ) from None
    if num_examples == 0:
        raise ValueError(
            f"{field}={split!r} selects no examples of {builder.name!r} (splits: "
            f"{ {k: v.num_examples for k, v in splits.items()} }); widen the slice."
        )
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"data.name={builder.name!r} lacks 'image'/'label' features.")
    name_filter = None
    if label_subset and label_subset not in LABEL_SUBSETS:
        if "file_name" not in features:
            raise ValueError(
                f"data.label_subset={label_subset!r} (a file of names) needs a 'file_name' "
                f"feature, which {builder.name!r} lacks."
            )
        name_filter = read_name_list(label_subset)
        num_examples = min(num_examples, len(name_filter))
    return TfdsSource(
        builder=builder,
        split=split,
        num_examples=int(num_examples),
        num_classes=int(features["label"].num_classes),
        name_filter=name_filter,
    )


# ---------------------------------------------------------------- dispatch


def get_source(
    data_config: Any,
    split: str,
    *,
    supervised: bool,
    field: str = "split",
    use_label_subset: bool = False,
) -> Source:
    """The source named by data_config.source for one split (validated, nothing decoded);
    data.label_subset applies only with use_label_subset (the training split, never eval)."""
    kind = data_config.source
    subset = data_config.get("label_subset", "") if use_label_subset else ""
    if kind == "bundled":
        if subset:
            raise ValueError("data.label_subset is not supported for data.source='bundled'.")
        return bundled_source(split, field)
    if kind == "folder":
        source = folder_source(data_config.data_dir, split, supervised=supervised, field=field)
        return _filter_by_names(source, read_name_list(subset)) if subset else source
    if kind == "numpy":
        if subset:
            raise ValueError("data.label_subset is not supported for data.source='numpy'.")
        return array_source(data_config.data_dir, split, supervised=supervised, field=field)
    if kind == "tfds":
        return tfds_source(
            data_config.name, data_config.data_dir, split, label_subset=subset, field=field
        )
    raise ValueError(f"data.source={kind!r}; allowed: {SOURCES}.")


def _filter_by_names(source: IndexedSource, names: frozenset[str]) -> IndexedSource:
    keep = np.array([os.path.basename(p) in names for p in source.records], dtype=bool)
    if not keep.any():
        raise ValueError(f"data.label_subset matches no file of {source.description}.")
    logging.info("label_subset keeps %d of %d files", keep.sum(), len(keep))
    return dataclasses.replace(source, records=source.records[keep], labels=source.labels[keep])
