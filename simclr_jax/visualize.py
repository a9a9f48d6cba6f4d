"""Pictures of a run. Commands:

    # preview: original images and two augmented views each, from a config
    python -m simclr_jax.visualize preview --config configs/cifar10_pretrain.py[:arg] \
        --out grid.png [--num_images 8] [--seed 0] [--scale 0] [--set data.data_dir=DIR]
    # curves: loss, contrastive, probe and eval accuracy, learning rate vs step (metrics.jsonl)
    python -m simclr_jax.visualize curves --workdir W --out curves.png
    # retrieval: eval-split queries and their k nearest bank images by cosine similarity of h
    python -m simclr_jax.visualize retrieval --workdir W --out retrieval.png [--num_queries 8] \
        [--k 8] [--split SPLIT] [--bank_split SPLIT] [--max_bank 2000] [--seed 0] [--scale 0] \
        [--step -1]

Retrieval reads the checkpoint's own config and data: the queries are a seeded random sample of
data.eval_split, the bank one of at most max_bank images of data.train_split (both splits can
be changed; when they are the same, a query is never its own neighbour); a neighbour is framed
green when its label equals the query's, red otherwise. curves needs matplotlib (the 'plots'
extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
from typing import Any

import numpy as np

from simclr_jax import cli

GRID_PAD = 2  # pixels of white between tiles
OUTLINE = 3  # pixels of the green / red frame of a retrieval neighbour
GREEN, RED = (0, 170, 0), (220, 0, 0)
READ_BATCH = 256  # images per eval-iterator batch and per forward pass in `retrieval`

# curves: (panel title, metrics.jsonl keys); 'final/*' keys are the end-of-run evaluation.
CURVE_PANELS = (
    ("loss", ("loss", "contrast_loss", "probe_loss", "eval/eval_loss", "final/eval_loss")),
    ("contrastive accuracy", ("contrast_acc",)),
    (
        "probe / eval accuracy",
        ("probe_acc", "train_acc", "eval/top1", "eval/knn_top1", "final/top1", "final/knn_top1"),
    ),
    ("learning rate", ("learning_rate",)),
)
CURVE_KEYS = ("loss", "contrast_acc", "probe_acc", "train_acc")  # at least one must be logged
CURVES_FIGSIZE = (10.0, 7.0)  # inches; at CURVES_DPI the PNG is 1000 x 700 pixels
CURVES_DPI = 100


def preview_scale(image_size: int) -> int:
    """Integer upscaling that makes small images visible (>= 96 px tiles)."""
    return max(1, 96 // image_size)


def preview_grid(
    data_config: Any, num_images: int = 8, seed: int = 0, scale: int = 1
) -> np.ndarray:
    """uint8 (H, W, 3) grid: one row per image, [original, view 1, view 2], of the config's
    train split with its pretraining augmentation; tiles are image_size * scale pixels."""
    import tensorflow as tf

    from simclr_jax.data import augment, pipeline, sources, spec

    if num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be >= 1.")
    params = spec.augment_params(data_config)
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
            top, left = _tile_origin(r, c, tile)
            grid[top : top + tile, left : left + tile] = pixels
    return grid


def _tile_origin(row: int, col: int, tile: int) -> tuple[int, int]:
    """(top, left) pixel of a tile of the grid _assemble makes."""
    return GRID_PAD + row * (tile + GRID_PAD), GRID_PAD + col * (tile + GRID_PAD)


def _outline(grid: np.ndarray, row: int, col: int, tile: int, color: tuple[int, ...]) -> None:
    """Paints an OUTLINE-pixel frame inside a tile (the grid keeps its size)."""
    top, left = _tile_origin(row, col, tile)
    box = grid[top : top + tile, left : left + tile]
    width = min(OUTLINE, tile // 2)
    box[:width] = box[-width:] = box[:, :width] = box[:, -width:] = color


# ---------------------------------------------------------------- curves


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} from workdir/metrics.jsonl; FileNotFoundError naming the
    file when it is missing, ValueError when it has none of CURVE_KEYS."""
    from etils import epath

    from simclr_jax.metrics import METRICS_FILE

    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: curves reads the {METRICS_FILE} a training run writes "
            "into its workdir (is --workdir the run's workdir?)."
        )
    series: dict[str, list[tuple[int, float]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}, is not JSON: {error}") from None
        if "step" not in record:  # hparams lines
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((int(record["step"]), float(value)))
    if not any(key in series for key in CURVE_KEYS):
        raise ValueError(
            f"{path} has none of the training metrics {CURVE_KEYS} (keys found: "
            f"{sorted(series) or 'none'}); is it a training run's {METRICS_FILE}?"
        )
    return series


def plot_curves(series: dict[str, list[tuple[int, float]]], out: str, title: str = "") -> None:
    """Writes a CURVES_FIGSIZE x CURVES_DPI PNG: one panel per CURVE_PANELS entry vs step."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "curves draws with matplotlib: pip install matplotlib (or the 'plots' extra)."
        ) from error

    figure = Figure(figsize=CURVES_FIGSIZE, dpi=CURVES_DPI)
    FigureCanvasAgg(figure)
    for axes, (name, keys) in zip(figure.subplots(2, 2).ravel(), CURVE_PANELS, strict=True):
        _plot_panel(axes, name, {key: series[key] for key in keys if key in series})
    if title:
        figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(str(out), format="png", dpi=CURVES_DPI)


def _plot_panel(axes: Any, name: str, panel: dict[str, list[tuple[int, float]]]) -> None:
    """Lines for logged metrics, stars for the end-of-run evaluation ('final/*')."""
    axes.set_title(name)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if not panel:
        axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
        return
    for key, points in panel.items():
        steps, values = zip(*sorted(points), strict=True)
        if key.startswith("final/"):
            axes.scatter(steps, values, marker="*", s=90, zorder=3, label=key)
        else:
            axes.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
    axes.legend(fontsize="small")


# ---------------------------------------------------------------- retrieval


def retrieval_grid(
    workdir: str,
    *,
    num_queries: int = 8,
    k: int = 8,
    split: str | None = None,
    bank_split: str | None = None,
    max_bank: int = 2000,
    seed: int = 0,
    scale: int = 0,
    step: int = -1,
) -> np.ndarray:
    """uint8 grid: one row per query, [query, its k nearest bank images by cosine similarity of
    h], neighbours framed green (same label) or red; tiles image_size * scale pixels."""
    from simclr_jax import evaluate

    for name, value in (("num_queries", num_queries), ("k", k), ("max_bank", max_bank)):
        if value < 1:
            raise ValueError(f"{name}={value!r} must be >= 1.")
    embed, config = evaluate.load_embedder(workdir, step)
    split, bank_split = split or config.data.eval_split, bank_split or config.data.train_split
    rng = np.random.default_rng(seed)
    if split == bank_split:  # one pass; a query is never its own neighbour
        queries, bank = _sample_split(config.data, split, [num_queries, max_bank], rng)
        exclude = queries[2][:, None] == bank[2][None, :]
    else:
        (queries,) = _sample_split(config.data, split, [num_queries], rng)
        (bank,) = _sample_split(config.data, bank_split, [max_bank], rng)
        exclude = None
    (q_images, q_labels, _), (b_images, b_labels, _) = queries, bank
    h = _embed_all(embed, np.concatenate([q_images, b_images]))  # one compiled batch shape
    found = nearest_neighbours(h[: len(q_images)], h[len(q_images) :], k, exclude)
    rows = [[q_images[q], *b_images[found[q]]] for q in range(len(found))]
    size = int(q_images.shape[1])
    scale = scale or preview_scale(size)
    grid = _assemble(rows, size, scale)
    for q, neighbours in enumerate(found):
        for col, index in enumerate(neighbours, start=1):
            color = GREEN if b_labels[index] == q_labels[q] else RED
            _outline(grid, q, col, size * scale, color)
    return grid


def nearest_neighbours(
    queries: np.ndarray, bank: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """(Q, k) bank indices by descending cosine similarity; exclude (Q, N) True pairs (a query
    that is itself in the bank) are never neighbours. ValueError when the bank is too small."""
    available = bank.shape[0] - (int(exclude.sum(axis=1).max()) if exclude is not None else 0)
    if k > available:
        raise ValueError(
            f"k={k} neighbours asked for but the bank has {available} candidate images per "
            "query; lower --k or raise --max_bank."
        )
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    similarity = unit(queries.astype(np.float64)) @ unit(bank.astype(np.float64)).T
    if exclude is not None:
        similarity[exclude] = -np.inf
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def _sample_split(
    data_config: Any, split: str, sizes: list[int], rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each size, (images, labels, positions) of that many examples of split drawn at
    random without repeats (all of them when the split is smaller), in one eval pass."""
    from simclr_jax import data

    eval_data = data.make_eval_iterator(data_config, split=split, batch_size=READ_BATCH)
    total = int(eval_data.num_examples)
    if total < 1:
        raise ValueError(f"split {split!r} has no examples.")
    picks = [np.sort(rng.choice(total, min(size, total), replace=False)) for size in sizes]
    images, labels, positions = _read_positions(eval_data, np.unique(np.concatenate(picks)))
    if not len(positions):
        raise ValueError(f"split {split!r} yielded no readable images.")
    return [(images[m], labels[m], positions[m]) for m in (np.isin(positions, p) for p in picks)]


def _read_positions(eval_data: Any, wanted: np.ndarray):
    """(images, labels, positions) of the real (mask 1) rows at the sorted positions wanted;
    stops reading after the last one."""
    images, labels, positions, seen = [], [], [], 0
    for batch in eval_data:
        keep = batch["mask"] > 0
        index = np.arange(seen, seen + int(keep.sum()))
        take = np.isin(index, wanted)
        images.append(batch["image"][keep][take])
        labels.append(batch["label"][keep][take])
        positions.append(index[take])
        seen = index[-1] + 1 if len(index) else seen
        if seen > wanted[-1]:
            break
    return np.concatenate(images), np.concatenate(labels), np.concatenate(positions)


def _embed_all(embed: Any, images: np.ndarray) -> np.ndarray:
    """h of images, READ_BATCH at a time."""
    chunks = [embed(images[i : i + READ_BATCH]) for i in range(0, len(images), READ_BATCH)]
    return np.concatenate(chunks)


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
    if not _has_field(config, key):
        raise ValueError(f"--set {item!r}: the config has no field {key!r}.")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _has_field(config: Any, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def write_png(grid: np.ndarray, out: str | pathlib.Path) -> None:
    """Writes a uint8 (H, W, 3) array as PNG."""
    from PIL import Image

    Image.fromarray(grid).save(str(out), format="PNG")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    if args.command == "preview":
        config = load_config(args.config)
        for item in args.set:
            apply_override(config, item)
        data_config = config.data if "data" in config else config
        scale = args.scale or preview_scale(int(data_config.image_size))
        grid = preview_grid(data_config, args.num_images, args.seed, scale)
    elif args.command == "curves":
        plot_curves(read_metrics(args.workdir), args.out, title=args.workdir)
        print(f"wrote {args.out}")
        return
    else:
        grid = retrieval_grid(
            args.workdir,
            num_queries=args.num_queries,
            k=args.k,
            split=args.split,
            bank_split=args.bank_split,
            max_bank=args.max_bank,
            seed=args.seed,
            scale=args.scale,
            step=args.step,
        )
    write_png(grid, args.out)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="simclr_jax.visualize")
    commands = parser.add_subparsers(dest="command", required=True)
    preview = commands.add_parser("preview", help="original images and two augmented views")
    preview.add_argument("--config", required=True, help="configs/X.py[:arg]")
    preview.add_argument("--num_images", type=int, default=8)
    preview.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set data.data_dir=/data/cifar10 (repeatable)",
    )
    curves = commands.add_parser("curves", help="training curves from WORKDIR/metrics.jsonl")
    retrieval = commands.add_parser("retrieval", help="nearest neighbours by cosine of h")
    retrieval.add_argument("--num_queries", type=int, default=8)
    retrieval.add_argument("--k", type=int, default=8, help="neighbours per query")
    retrieval.add_argument("--split", default=None, help="query split; default data.eval_split")
    retrieval.add_argument(
        "--bank_split", default=None, help="neighbour split; default data.train_split"
    )
    retrieval.add_argument("--max_bank", type=int, default=2000, help="bank sample size")
    retrieval.add_argument("--step", type=int, default=-1, help="checkpoint step; -1 = latest")
    for command in (curves, retrieval):
        command.add_argument("--workdir", required=True, help="a training run's workdir")
    for command in (preview, curves, retrieval):
        command.add_argument("--out", required=True, help="output PNG path")
    for command in (preview, retrieval):
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--scale", type=int, default=0, help="tile upscaling; 0 = auto")
    return parser


if __name__ == "__main__":
    cli.select_platforms()
    cli.call(main, prog="simclr_jax.visualize")
