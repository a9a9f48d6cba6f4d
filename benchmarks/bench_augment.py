"""Views per second: the JAX path (TF-free loader + on-device augmentation) beside tf.data.

    PYTHONPATH=. python benchmarks/bench_augment.py [--seconds 5] [--cases 32,224] [--no_tf]

Sources: 32 px, the bundled CIFAR-10 sample (3000 JPEGs; CIFAR settings: jitter 0.5, no
blur); 224 px with blur (ImageNet settings), a temp folder of 256x256 JPEGs made by upscaling
bundled images. Rows:
- jax, augment only: make_augment_fn on a device-resident uint8 batch (the accelerator's
  share of the work; on this CPU the "device" is the same 2 cores);
- jax, end to end: numpy_pipeline host batches -> global arrays -> device augmentation
  (the host resizes 256 px folder images to 224 so they batch; the crop runs on the device);
- tfdata, end to end: pipeline.make_train_iterator (decode + augment on the host).
Views are counted (two per image).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402


def make_256px_folder(out: pathlib.Path, count: int) -> None:
    """`count` 256x256 JPEGs (quality 90) upscaled from bundled images, 10 class folders."""
    from PIL import Image

    from simclr_jax.data import numpy_pipeline, sources

    reader = numpy_pipeline.Reader(sources.bundled_source("train"), skip_corrupt=False)
    for i in range(count):
        target = out / "train" / f"class{reader.labels[i]}"
        target.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(reader.image(i)).resize((256, 256), Image.BICUBIC)
        image.save(target / f"{i}.jpg", quality=90)


def timed(next_batch, views_per_batch: int, seconds: float, warmup: int = 2) -> float:
    """Views per second of repeated next_batch() calls (each blocks until its views exist)."""
    for _ in range(warmup):
        next_batch()
    start, views = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next_batch()
        views += views_per_batch
    return views / (time.perf_counter() - start)


def bench_case(config, batch: int, seconds: float, with_tf: bool) -> dict[str, float]:
    """views/s of the three rows for one data config."""
    from simclr_jax import data, parallel
    from simclr_jax.data import jax_augment, numpy_pipeline

    mesh = parallel.create_mesh()
    rates = {}
    host = numpy_pipeline.make_train_iterator(config, split="train", batch_size=batch, seed=0)
    sample = next(host)
    augment = jax_augment.make_augment_fn(config, mesh, image_size=int(config.image_size))
    batch_sharding = parallel.batch_sharding(mesh)
    images = jax.device_put(sample["image"], batch_sharding)
    ids = jax.device_put(sample["id"], batch_sharding)
    key = jax.random.key(0)
    rates["jax, augment only"] = timed(
        lambda: augment(key, images, ids).block_until_ready(), 2 * batch, seconds
    )
    batches = data.make_train_batches(
        config, mesh, split="train", batch_size=batch, num_views=2, augmentation="simclr", seed=0
    )
    rates["jax, end to end"] = timed(
        lambda: next(batches)["image"].block_until_ready(), 2 * batch, seconds
    )
    host.close()
    if with_tf:
        from simclr_jax.data import pipeline

        tf_config = config.copy_and_resolve_references()
        tf_config.backend = "tfdata"
        it = pipeline.make_train_iterator(
            tf_config, split="train", batch_size=batch, num_views=2, augmentation="simclr", seed=0
        )
        rates["tfdata, end to end"] = timed(lambda: next(it), 2 * batch, seconds)
    return rates


def main() -> None:
    """Runs the cases and prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cases", default="32,224")
    parser.add_argument("--no_tf", action="store_true", help="skip the tf.data rows")
    parser.add_argument("--batch32", type=int, default=256)
    parser.add_argument("--batch224", type=int, default=32)
    args = parser.parse_args()

    from configs.common import get_base_config

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_augment_"))
    rows = []
    try:
        for size in [int(s) for s in args.cases.split(",")]:
            config = get_base_config().data
            config.update(backend="jax", train_split="train", image_size=size)
            if size <= 32:
                config.update(source="bundled", color_jitter_strength=0.5, blur_prob=0.0)
                batch, what = args.batch32, "bundled CIFAR-10 JPEGs, no blur"
            else:
                make_256px_folder(tmp / "big", 4 * args.batch224)
                config.update(source="folder", data_dir=str(tmp / "big"), blur_prob=0.5)
                batch, what = args.batch224, "256 px JPEGs, blur p=0.5"
            for row, rate in bench_case(config, batch, args.seconds, not args.no_tf).items():
                rows.append((f"{size} px, {what}", batch, row, rate))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    device = f"{jax.devices()[0].platform} x{jax.device_count()}"
    print(f"\nViews/s (2 per image), {os.cpu_count()} CPU cores, JAX devices: {device}\n")
    print("| case | batch (images) | path | views/s |")
    print("|---|---|---|---|")
    for case, batch, row, rate in rows:
        print(f"| {case} | {batch} | {row} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
