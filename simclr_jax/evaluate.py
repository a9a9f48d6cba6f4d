"""Evaluation: top-1/top-5 over padded eval batches, weighted kNN on h, and embedding functions;
evaluate_model is what every mode runs on its eval split (and pretraining's periodic eval).

Every host runs the same number of eval batches; padding rows carry mask 0 and are excluded
from every sum, so each example of the split counts exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import checkpoint, data, losses, parallel
from simclr_jax.models import model_from_config, variables_init

Variables = dict[str, Any]


def make_eval_step(model: Any, mesh: jax.sharding.Mesh, num_classes: int) -> Callable:
    """jit(variables, batch) -> (masked sums: loss, top-1, top-5 hits, example count; h)."""
    top5 = min(5, num_classes)

    def eval_step(variables: Variables, batch: dict[str, jax.Array]):
        out = model.apply(variables, batch["image"], train=False)
        logits, labels, mask = out["logits"], batch["label"], batch["mask"]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        sums = {
            "loss": jnp.sum(nll * mask),
            "top1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
            "top5": jnp.sum(losses.topk_correct(logits, labels, top5) * mask),
            "count": jnp.sum(mask),
        }
        return sums, out["h"]

    # Variables keep whatever sharding the state has (replicated or FSDP); batches arrive
    # already sharded on 'data' from host_batch_to_global.
    return jax.jit(
        eval_step, out_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh))
    )


def evaluate_split(
    eval_step: Callable,
    variables: Variables,
    eval_data: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    keep_features: bool = False,
) -> tuple[dict[str, float], tuple[jax.Array, jax.Array, jax.Array] | None]:
    """Top-1/top-5 accuracy and mean loss over one full pass of an eval split, plus, when
    keep_features, its (h, labels, mask) for kNN, so the split is decoded and run once."""
    totals: dict[str, float] = {}
    feats, labels, masks = [], [], []
    for host_batch in eval_data:
        batch = parallel.host_batch_to_global(host_batch, mesh)
        sums, h = eval_step(variables, batch)
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + float(value)
        if keep_features:
            feats.append(h)
            labels.append(batch["label"])
            masks.append(batch["mask"])
    count = max(totals.get("count", 0.0), 1.0)
    metrics = {
        "eval_loss": totals.get("loss", 0.0) / count,
        "top1": totals.get("top1", 0.0) / count,
        "top5": totals.get("top5", 0.0) / count,
        "num_eval_examples": int(totals.get("count", 0.0)),
    }
    return metrics, (_concat(feats, labels, masks, mesh) if keep_features else None)


def _concat(
    feats: list[jax.Array], labels: list[jax.Array], masks: list[jax.Array], mesh: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-batch global arrays -> whole-split global arrays sharded on 'data'."""
    concat = jax.jit(
        lambda xs: jnp.concatenate(xs, axis=0), out_shardings=parallel.batch_sharding(mesh)
    )
    return concat(feats), concat(labels), concat(masks)


def make_embed_fn(model: Any, mesh: jax.sharding.Mesh) -> Callable:
    """jit(variables, images) -> representation h (N, C) float32, batch sharded on 'data'."""

    def embed(variables: Variables, images: jax.Array) -> jax.Array:
        return model.apply(variables, images, train=False)["h"]

    return jax.jit(embed, out_shardings=parallel.batch_sharding(mesh))


def extract_features(
    embed_fn: Callable,
    variables: Variables,
    eval_data: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(h, labels, mask) of a whole split as global arrays sharded on 'data' (padding kept)."""
    feats, labels, masks = [], [], []
    for host_batch in eval_data:
        batch = parallel.host_batch_to_global(host_batch, mesh)
        feats.append(embed_fn(variables, batch["image"]))
        labels.append(batch["label"])
        masks.append(batch["mask"])
    return _concat(feats, labels, masks, mesh)


def knn_class_scores(
    queries: jax.Array,
    bank: jax.Array,
    bank_labels: jax.Array,
    bank_mask: jax.Array,
    *,
    num_classes: int,
    k: int,
    temperature: float,
) -> jax.Array:
    """Weighted kNN votes (Q, num_classes): the k most cosine-similar bank rows each vote for
    their label with weight exp(similarity / temperature); masked bank rows never vote."""
    queries = losses.l2_normalize(queries.astype(jnp.float32))
    bank = losses.l2_normalize(bank.astype(jnp.float32))
    similarity = jnp.einsum("qd,nd->qn", queries, bank, precision=jax.lax.Precision.HIGHEST)
    similarity = jnp.where(bank_mask[None, :] > 0, similarity, -jnp.inf)
    top_sim, top_idx = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_sim / temperature)  # exp(-inf) = 0 for padding rows
    votes = jax.nn.one_hot(bank_labels[top_idx], num_classes, dtype=jnp.float32)
    return jnp.sum(votes * weights[..., None], axis=1)


def knn_accuracy(
    train_features: tuple[jax.Array, jax.Array, jax.Array],
    eval_features: tuple[jax.Array, jax.Array, jax.Array],
    *,
    num_classes: int,
    k: int,
    temperature: float,
    query_batch: int = 1024,
) -> dict[str, float]:
    """kNN top-1/top-5 of eval features against the train-split bank, in query chunks."""
    bank, bank_labels, bank_mask = train_features
    queries, labels, mask = eval_features
    k = int(min(k, int(jnp.sum(bank_mask))))
    top5 = min(5, num_classes)

    @jax.jit
    def chunk_hits(q, y, m, bank, bank_labels, bank_mask):
        scores = knn_class_scores(
            q, bank, bank_labels, bank_mask, num_classes=num_classes, k=k, temperature=temperature
        )
        hits1 = jnp.sum(losses.topk_correct(scores, y, 1) * m)
        hits5 = jnp.sum(losses.topk_correct(scores, y, top5) * m)
        return hits1, hits5

    hits1 = hits5 = 0.0
    for start in range(0, queries.shape[0], query_batch):
        sl = slice(start, start + query_batch)
        hits = chunk_hits(queries[sl], labels[sl], mask[sl], bank, bank_labels, bank_mask)
        h1, h5 = jax.device_get(hits)
        hits1, hits5 = hits1 + float(h1), hits5 + float(h5)
    count = max(float(jnp.sum(mask)), 1.0)
    return {"knn_top1": hits1 / count, "knn_top5": hits5 / count}


def load_embedder(
    workdir: str,
    step: int = -1,
    mesh: jax.sharding.Mesh | None = None,
    *,
    random_init: bool = False,
) -> tuple[Callable[[Any], np.ndarray], ml_collections.ConfigDict]:
    """Restores a checkpoint -> (fn(images (N,H,W,3) in [0,1]) -> h as NumPy, its config).

    Any batch size works: the batch is padded to a multiple of the data-axis size and cut back.
    random_init keeps the checkpoint's architecture but not its weights (a baseline encoder).
    """
    mesh = mesh or parallel.create_mesh()
    manager, step = checkpoint.open_for_restore(workdir, step)
    config = ml_collections.ConfigDict(checkpoint.read_meta(manager, step)["config"])
    model, variables = restore_model(manager, step, config, mesh, random_init=random_init)
    embed = make_embed_fn(model, mesh)
    replicas = parallel.data_axis_size(mesh)

    def embed_images(images: Any) -> np.ndarray:
        images = np.asarray(images, np.float32)
        pad = (-images.shape[0]) % replicas
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
        h = embed(variables, parallel.host_batch_to_global({"x": padded}, mesh)["x"])
        return np.asarray(jax.device_get(h))[: images.shape[0]]

    logging.info("Embedder from %s step %d (%s).", workdir, step, config.model.to_dict())
    return embed_images, config


def split_features(
    embed: Callable[[Any], np.ndarray], data_config: Any, split: str, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(embed(images) (N, C), labels (N,)) of every example of split, padding rows dropped."""
    eval_data = data.make_eval_iterator(data_config, split=split, batch_size=batch_size)
    features, labels = [], []
    for batch in eval_data:
        keep = batch["mask"] > 0
        features.append(embed(batch["image"])[keep])
        labels.append(batch["label"][keep])
    return np.concatenate(features), np.concatenate(labels)


def restore_model(
    manager: Any,
    step: int,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    random_init: bool = False,
) -> tuple[Any, Variables]:
    """Builds the model a checkpoint was trained with and loads its params and batch stats
    (or, with random_init, keeps the fresh initialization: seed config.seed)."""
    model = model_from_config(config)
    init = jax.jit(
        variables_init(model, config.data.image_size), out_shardings=parallel.replicated(mesh)
    )
    target = init(jax.random.key(config.seed))
    if random_init:
        return model, target
    variables, _ = checkpoint.restore_variables(
        manager, step, target, prefixes=("encoder", "projection_head", "classifier")
    )
    return model, variables


def evaluate_model(
    model: Any,
    variables: dict[str, Any],
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    knn: bool,
) -> dict[str, float]:
    """Top-1/top-5 of the classifier (the online probe when pretraining) on the eval split,
    plus weighted kNN on h (train split as the bank) when `knn`."""
    num_classes = config.model.num_classes
    eval_data = data.make_eval_iterator(
        config.data, split=config.data.eval_split, batch_size=config.eval_batch_size
    )
    eval_step = make_eval_step(model, mesh, num_classes)
    results, eval_features = evaluate_split(
        eval_step, variables, eval_data, mesh, keep_features=knn
    )
    if knn:
        embed = make_embed_fn(model, mesh)
        bank_data = data.make_eval_iterator(
            config.data, split=config.data.train_split, batch_size=config.eval_batch_size
        )
        results |= knn_accuracy(
            extract_features(embed, variables, bank_data, mesh),
            eval_features,
            num_classes=num_classes,
            k=config.knn_k,
            temperature=config.knn_temperature,
        )
    return results
