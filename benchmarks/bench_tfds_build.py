"""How fast TFDS's own imagenet2012 builder prepares a dataset from the manual tars here.

    PYTHONPATH=. python benchmarks/bench_tfds_build.py [--images 2000] [--format tfrecord]

Generates `--images` JPEGs of 500x375 (ImageNet's typical size in pixels; upscaled bundled
images are smooth, so they are ~17 KB where ImageNet's average ~110 KB) in 10 per-synset
tars inside ILSVRC2012_img_train.tar plus a 100-image ILSVRC2012_img_val.tar, runs
download_and_prepare offline, and prints images/s and MB/s of tar input, with the
extrapolation to ImageNet's 1,331,167 images.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

IMAGENET_IMAGES = 1_281_167 + 50_000


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_tars(manual: Path, count: int) -> int:
    """Writes the two tars; returns their total size in bytes."""
    import tensorflow_datasets as tfds
    from PIL import Image

    from simclr_jax.data import numpy_pipeline, sources

    reader = numpy_pipeline.Reader(sources.bundled_source("train"), skip_corrupt=False)
    synsets = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()[:10]

    def jpeg(i: int) -> bytes:
        out = io.BytesIO()
        image = Image.fromarray(reader.image(i % 3000)).resize((500, 375), Image.BICUBIC)
        image.save(out, format="JPEG", quality=90)
        return out.getvalue()

    manual.mkdir(parents=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for s, synset in enumerate(synsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(s, count, len(synsets)):
                    _add(inner, f"{synset}_{i}.JPEG", jpeg(i))
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, 101):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(i))
    return sum(p.stat().st_size for p in manual.iterdir())


def main() -> None:
    """Builds once and prints the rates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--format", default="tfrecord", choices=["tfrecord", "array_record"])
    args = parser.parse_args()
    import tensorflow_datasets as tfds

    root = Path(tempfile.mkdtemp(prefix="bench_tfds_build_"))
    try:
        size = make_tars(root / "manual", args.images)
        config = tfds.download.DownloadConfig(
            manual_dir=str(root / "manual"), try_download_gcs=False
        )
        builder = tfds.builder("imagenet2012", data_dir=str(root / "tfds"), file_format=args.format)
        start = time.perf_counter()
        builder.download_and_prepare(download_config=config)
        seconds = time.perf_counter() - start
        images = args.images + 100
        built = sum(p.stat().st_size for p in (root / "tfds").rglob("*") if p.is_file())
        rate = images / seconds
        print(
            f"\n{images} images ({size / 1e6:.0f} MB of tars -> {built / 1e6:.0f} MB {args.format})"
            f" in {seconds:.1f} s: {rate:.0f} images/s, {size / 1e6 / seconds:.1f} MB/s; "
            f"ImageNet's {IMAGENET_IMAGES:,} images at this rate: "
            f"{IMAGENET_IMAGES / rate / 3600:.1f} h"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
