"""Views per second: the JAX path (Grain loader + on-device augmentation) beside tf.data.

    PYTHONPATH=. python benchmarks/bench_augment.py [--seconds 5] [--cases 32,224] [--no_tf]
        [--workers 2]

Sources: 32 px, the bundled CIFAR-10 sample (3000 JPEGs; CIFAR settings: jitter 0.5, no
blur); 224 px with blur (ImageNet settings), a temp folder of 500x375 JPEGs (ImageNet's
typical size) made by upscaling bundled images. Rows:
- grain host, threads / N workers: grain_pipeline host batches alone (decode, crop on the
  full-resolution image, bicubic resize to image_size, float32), in-process threads or N
  worker processes (data.grain_workers), with the workers' resident memory;
- jax, device augment only: make_augment_fn on device-resident host-cropped float32 views
  (flip, jitter, grayscale, blur: the accelerator's share; on this CPU the "device" is the
  same 2 cores);
- jax, end to end: data.make_train_batches (Grain -> global arrays -> device augmentation);
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


def make_big_folder(out: pathlib.Path, count: int) -> None:
    """`count` 500x375 JPEGs (quality 90) upscaled from bundled images, 10 class folders."""
    from PIL import Image

    from simclr_jax.data import numpy_pipeline, sources

    reader = numpy_pipeline.Reader(sources.bundled_source("train"), skip_corrupt=False)
    for i in range(count):
        target = out / "train" / f"class{reader.source.labels[i]}"
        target.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(reader.image(i)).resize((500, 375), Image.BICUBIC)
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


def worker_memory_mib() -> list[float]:
    """Resident memory (MiB) of each Grain worker process of this process."""
    import psutil

    children = psutil.Process().children(recursive=True)
    workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    return [p.memory_info().rss / 2**20 for p in workers]


def bench_case(config, batch: int, seconds: float, with_tf: bool, workers: int):
    """views/s of every row for one data config, and the Grain workers' memory (MiB)."""
    from simclr_jax import data, parallel
    from simclr_jax.data import grain_pipeline, jax_augment

    mesh = parallel.create_mesh()
    rates, memory = {}, []
    for count in (0, workers) if workers else (0,):
        host_config = config.copy_and_resolve_references()
        host_config.grain_workers = count
        host = grain_pipeline.make_train_iterator(
            host_config, split="train", batch_size=batch, seed=0, num_views=2
        )
        label = f"{count} workers" if count else "threads"
        rates[f"grain host, {label}"] = timed(host.__next__, 2 * batch, seconds)
        if count:
            memory = worker_memory_mib()
        sample = next(host)
        host.close()
    augment = jax_augment.make_augment_fn(data.augment_params(config), mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    images = jax.device_put(sample["image"], batch_sharding)
    ids = jax.device_put(sample["id"], batch_sharding)
    key = jax.random.key(0)
    rates["jax, device augment only"] = timed(
        lambda: augment(key, images, ids).block_until_ready(), 2 * batch, seconds
    )
    end_config = config.copy_and_resolve_references()
    end_config.grain_workers = workers
    batches = data.make_train_batches(
        end_config, mesh, split="train", batch_size=batch, num_views=2, augmentation="simclr",
        seed=0,
    )  # fmt: skip
    rates[f"jax, end to end ({workers} workers)"] = timed(
        lambda: next(batches)["image"].block_until_ready(), 2 * batch, seconds
    )
    batches.close()
    if with_tf:
        from simclr_jax.data import pipeline

        tf_config = config.copy_and_resolve_references()
        tf_config.backend = "tfdata"
        it = pipeline.make_train_iterator(
            tf_config, split="train", batch_size=batch, num_views=2, augmentation="simclr", seed=0
        )
        rates["tfdata, end to end"] = timed(lambda: next(it), 2 * batch, seconds)
    return rates, memory


def main() -> None:
    """Runs the cases and prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cases", default="32,224")
    parser.add_argument("--no_tf", action="store_true", help="skip the tf.data rows")
    parser.add_argument("--batch32", type=int, default=256)
    parser.add_argument("--batch224", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="Grain worker processes")
    args = parser.parse_args()

    from simclr_jax.config import get_base_config

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
                make_big_folder(tmp / "big", 4 * args.batch224)
                config.update(source="folder", data_dir=str(tmp / "big"), blur_prob=0.5)
                batch, what = args.batch224, "500x375 JPEGs, blur p=0.5"
            rates, memory = bench_case(config, batch, args.seconds, not args.no_tf, args.workers)
            for row, rate in rates.items():
                rows.append((f"{size} px, {what}", batch, row, rate))
            if memory:
                print(f"{size} px: Grain worker RSS (MiB): {', '.join(f'{m:.0f}' for m in memory)}")
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
