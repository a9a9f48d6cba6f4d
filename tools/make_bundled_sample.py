"""Builds the bundled offline sample (simclr_jax/data/bundled/cifar10_sample.npz).

Takes real CIFAR-10 images from the shared JPEG tarball (layout train/<class>/<NNNN>.jpg):
per class, the first `--train_per_class` files by sorted name become split 'train' and the last
`--test_per_class` become split 'test' (disjoint; the test files lie inside the usual
validation carve-out of the last 500 images per class). The original JPEG bytes are stored
unchanged (no re-encoding), concatenated into one uint8 array per split with offsets.

    python tools/make_bundled_sample.py --tarball ../shared/data/cifar10-train-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import pathlib
import tarfile

import numpy as np

DEFAULT_OUT = pathlib.Path(__file__).parents[1] / "simclr_jax/data/bundled/cifar10_sample.npz"


def read_class_files(tarball: pathlib.Path) -> dict[str, dict[str, bytes]]:
    """Maps class name -> {file name: JPEG bytes} for every train/<class>/<file> member."""
    classes: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] != "train":
                continue
            data = tar.extractfile(member).read()
            classes.setdefault(parts[1], {})[parts[2]] = data
    if not classes:
        raise ValueError(f"{tarball} holds no train/<class>/<file> images.")
    return classes


def pack_split(items: list[tuple[str, int, bytes]]) -> dict[str, np.ndarray]:
    """Concatenates JPEG bytes into one uint8 array with offsets, labels and file names."""
    lengths = np.array([len(data) for _, _, data in items], dtype=np.int64)
    return {
        "jpeg": np.frombuffer(b"".join(data for _, _, data in items), dtype=np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "labels": np.array([label for _, label, _ in items], dtype=np.int32),
        "files": np.array([name for name, _, _ in items]),
    }


def build_sample(
    tarball: pathlib.Path, train_per_class: int, test_per_class: int
) -> dict[str, np.ndarray]:
    """The arrays of the sample: class_names plus <split>_{jpeg,offsets,labels,files}."""
    classes = read_class_files(tarball)
    class_names = sorted(classes)
    splits: dict[str, list[tuple[str, int, bytes]]] = {"train": [], "test": []}
    for label, name in enumerate(class_names):
        files = sorted(classes[name])
        if len(files) < train_per_class + test_per_class:
            raise ValueError(f"class {name} has only {len(files)} files.")
        for split, chosen in (
            ("train", files[:train_per_class]),
            ("test", files[len(files) - test_per_class :]),
        ):
            splits[split] += [(f"{name}/{f}", label, classes[name][f]) for f in chosen]
    arrays = {"class_names": np.array(class_names)}
    for split, items in splits.items():
        arrays.update({f"{split}_{k}": v for k, v in pack_split(items).items()})
    return arrays


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--train_per_class", type=int, default=300)
    parser.add_argument("--test_per_class", type=int, default=100)
    args = parser.parse_args()
    arrays = build_sample(args.tarball, args.train_per_class, args.test_per_class)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)  # JPEG bytes do not compress further
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
