"""Writes the representation h of every image of a split to .npy:

    python -m simclr_jax.embed --workdir=W --split=test --out=x.npy [--step=-1]

Reads the checkpoint's own config (data source, image size, architecture); --split picks the
split of that data source. Labels go to <out>_labels.npy next to the embeddings.
"""

from __future__ import annotations

import numpy as np
from absl import flags, logging
from etils import epath

from simclr_jax import cli, evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints/).")
_SPLIT = flags.DEFINE_string("split", "test", "Split of the checkpoint's data source.")
_OUT = flags.DEFINE_string("out", None, "Output .npy path for the (N, C) embeddings.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")
flags.mark_flags_as_required(["workdir", "out"])


def embed_split(workdir: str, split: str, *, step: int = -1, batch_size: int = 256):
    """(embeddings (N, C), labels (N,)) of every example of `split`, in the split's order."""
    embed, config = evaluate.load_embedder(workdir, step)
    return evaluate.split_features(embed, config.data, split, batch_size)


def main(argv: list[str]) -> None:
    """Embeds the split and writes the .npy files."""
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
    features, labels = embed_split(
        _WORKDIR.value, _SPLIT.value, step=_STEP.value, batch_size=_BATCH.value
    )
    out = epath.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        np.save(f, features)
    with out.with_name(out.stem + "_labels.npy").open("wb") as f:
        np.save(f, labels)
    logging.info("Wrote %s embeddings of shape %s to %s.", _SPLIT.value, features.shape, out)


if __name__ == "__main__":
    cli.run(main, prog="simclr_jax.embed")
