"""Input-pipeline throughput: pretraining images/s (two augmented views each) on this host.

    python benchmarks/bench_input.py [--cifar_dir DIR] [--seconds 10] [--sizes 32 224]
        [--deterministic both|true|false]

Cases: CIFAR-10 JPEG folder at 32 px without blur (the shared tarball, extracted to a temp dir
unless --cifar_dir is given); 224 px with blur on 256x256 JPEGs made by upscaling CIFAR-10 images
(bicubic, quality 90) into a temp folder, so decode cost is that of a real 256 px JPEG.
Prints a markdown table; benchmarks/compare_peers.py sets it beside lightly's DataLoader.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

TARBALL = (
    pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-train-jpeg.tar.gz"
)


def extract_cifar(tmp: pathlib.Path) -> pathlib.Path:
    """Extracts the CIFAR-10 JPEG tarball; returns the folder root (holding train/)."""
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "xzf", str(TARBALL), "-C", str(tmp)], check=True)
    return tmp


def make_256px_folder(cifar_root: pathlib.Path, out: pathlib.Path, per_class: int) -> None:
    """Writes per_class upscaled 256x256 JPEGs per class under out/train/<class>/."""
    from PIL import Image

    for class_dir in sorted((cifar_root / "train").iterdir()):
        target = out / "train" / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(class_dir.iterdir())[:per_class]:
            with Image.open(path) as img:
                img.convert("RGB").resize((256, 256), Image.BICUBIC).save(
                    target / path.name, quality=90
                )


def measure(data_config, batch_size: int, seconds: float, warmup_batches: int = 3):
    """(images/s wall clock, images per CPU-second) of make_train_iterator, pretraining mode.

    Images per CPU-second (user + system time of this process) is what a host with more cores
    can scale, and is less disturbed than wall time when other jobs share the machine.
    """
    from simclr_jax.data import make_train_iterator

    it = make_train_iterator(
        data_config,
        split="train",
        batch_size=batch_size,
        num_views=2,
        augmentation="simclr",
        seed=0,
        process_index=0,
        process_count=1,
    )
    for _ in range(warmup_batches):
        next(it)
    cpu_start, start, images = _cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        images += next(it)["image"].shape[0]
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return images / wall, images / cpu


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    """Runs both cases and prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar_dir", type=pathlib.Path, default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--per_class_256", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", choices=(32, 224), default=(32, 224))
    parser.add_argument("--deterministic", choices=("both", "true", "false"), default="both")
    args = parser.parse_args()
    modes = {"both": (False, True), "true": (True,), "false": (False,)}[args.deterministic]

    from simclr_jax.config import get_base_config

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_input_"))
    try:
        cifar = args.cifar_dir or extract_cifar(tmp / "cifar")
        big = tmp / "big"
        if 224 in args.sizes:
            make_256px_folder(cifar, big, args.per_class_256)
        rows = []
        cases = [(32, cifar, 0.0, 256), (224, big, 0.5, 64)]
        cases = [case for case in cases if case[0] in args.sizes]
        for (size, root, blur, batch), deterministic in itertools.product(cases, modes):
            config = get_base_config().data
            config.update(
                source="folder",
                data_dir=str(root),
                image_size=size,
                blur_prob=blur,
                color_jitter_strength=0.5 if size == 32 else 1.0,
                deterministic=deterministic,
            )
            rate, per_cpu_second = measure(config, batch, args.seconds)
            rows.append((size, blur, batch, deterministic, rate, per_cpu_second))
        print(f"\nInput pipeline, pretraining (2 views/image), {os.cpu_count()} CPU cores\n")
        print("| case | batch | deterministic | images/s | images per CPU-second |")
        print("|---|---|---|---|---|")
        for size, blur, batch, deterministic, rate, per_cpu_second in rows:
            case = f"{size} px, {'blur' if blur else 'no blur'}"
            source = "CIFAR-10 JPEG folder" if size == 32 else "256 px JPEGs (upscaled CIFAR)"
            print(
                f"| {case}, {source} | {batch} | {deterministic} | {rate:,.0f} | "
                f"{per_cpu_second:,.0f} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
