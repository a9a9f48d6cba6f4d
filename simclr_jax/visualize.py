"""Visual checks. `preview`: a grid of original images and two augmented views each.

    python -m simclr_jax.visualize preview --config configs/cifar10_pretrain.py[:arg] \
        --out grid.png [--num_images 8] [--seed 0] [--scale 0] [--set data.data_dir=DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
from typing import Any

import numpy as np

GRID_PAD = 2  # pixels of white between tiles


def preview_scale(image_size: int) -> int:
    """Integer upscaling that makes small images visible (>= 96 px tiles)."""
    return max(1, 96 // image_size)


def preview_grid(
    data_config: Any, num_images: int = 8, seed: int = 0, scale: int = 1
) -> np.ndarray:
    """uint8 (H, W, 3) grid: one row per image, [original, view 1, view 2], of the config's
    train split with its pretraining augmentation; tiles are image_size * scale pixels."""
    import tensorflow as tf

    from simclr_jax.data import augment, pipeline, sources

    if num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be >= 1.")
    params = augment.AugmentParams.from_config(data_config)
    source = sources.get_source(
        data_config, data_config.train_split, supervised=False, field="data.train_split"
    )
    skipped = pipeline.SkippedFiles()
    decode = pipeline.make_decoder(True, skipped)
    rows = []
    for row, (contents, name) in enumerate(_encoded_images(source, num_images)):
        image, ok = decode(contents, name)
        if not bool(ok):
            continue
        seeds = augment.split_seed(tf.constant([seed, row], tf.int64), 2)
        tiles = [augment.resize(image, params.image_size)]
        tiles += [augment.simclr_view(image, seeds[v], params) for v in range(2)]
        rows.append([np.asarray(t) for t in tiles])
    return _assemble(rows, params.image_size, scale)


def _encoded_images(source: Any, num_images: int):
    """(encoded bytes, name) of num_images examples spread over the split (first ones for TFDS)."""
    import tensorflow as tf

    from simclr_jax.data import sources

    if isinstance(source, sources.TfdsSource):
        import tensorflow_datasets as tfds

        ds = source.builder.as_dataset(
            split=source.split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        for example in ds.take(num_images):
            yield example["image"], example.get("file_name", tf.constant("tfds-example"))
        return
    picks = np.linspace(0, source.num_examples - 1, num_images).round().astype(np.int64)
    names = source.names()
    for index in picks:
        record = source.records[index]
        contents = tf.io.read_file(record) if source.records_are_paths else tf.constant(record)
        yield contents, tf.constant(str(names[index]))


def _assemble(rows: list[list[np.ndarray]], size: int, scale: int) -> np.ndarray:
    tile = size * scale
    height = len(rows) * (tile + GRID_PAD) + GRID_PAD
    width = len(rows[0]) * (tile + GRID_PAD) + GRID_PAD
    grid = np.full((height, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
            pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = GRID_PAD + r * (tile + GRID_PAD), GRID_PAD + c * (tile + GRID_PAD)
            grid[top : top + tile, left : left + tile] = pixels
    return grid


def load_config(spec: str) -> Any:
    """Loads 'path/to/config.py[:arg]' by calling its get_config(arg)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(
            f"--config={spec!r}: {path!r} is not a file (expected configs/X.py[:arg])."
        )
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def apply_override(config: Any, item: str) -> None:
    """Applies 'a.b.c=value' to a ConfigDict (value parsed as a Python literal if it is one)."""
    import ast

    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"--set {item!r} must look like data.data_dir=/path.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def write_png(grid: np.ndarray, out: str | pathlib.Path) -> None:
    """Writes a uint8 (H, W, 3) array as PNG."""
    from PIL import Image

    Image.fromarray(grid).save(str(out), format="PNG")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m simclr_jax.visualize")
    commands = parser.add_subparsers(dest="command", required=True)
    preview = commands.add_parser("preview", help="original images and two augmented views")
    preview.add_argument("--config", required=True, help="configs/X.py[:arg]")
    preview.add_argument("--out", required=True, help="output PNG path")
    preview.add_argument("--num_images", type=int, default=8)
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--scale", type=int, default=0, help="tile upscaling; 0 = auto")
    preview.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set data.data_dir=/data/cifar10 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.command == "preview":
        config = load_config(args.config)
        for item in args.set:
            apply_override(config, item)
        data_config = config.data if "data" in config else config
        scale = args.scale or preview_scale(int(data_config.image_size))
        grid = preview_grid(data_config, args.num_images, args.seed, scale)
        write_png(grid, args.out)
        print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
