"""Linear and kNN evaluation of a frozen encoder on its features (the CIFAR-10 proof's protocol):

    python -m simclr_jax.frozen_eval --workdir=W [--random_init] \
        [--train_split='train[:1000]'] [--eval_split='train[4500:]'] [--out=W/frozen_eval.json]

Embeds both splits of the checkpoint's data source once, without augmentation. Linear: an
L2-regularized multinomial logistic regression on standardized train features, fitted by
full-batch L-BFGS, the L2 weight picked on a tenth of the train features held out, then refit
on all of them. kNN: the weighted vote of the k nearest train features (k and temperature from
the checkpoint's config). --random_init keeps the checkpoint's architecture with fresh weights:
the baseline a pretrained encoder has to beat. Cheaper than the linear_eval mode (one forward
pass per image instead of one per augmented image per epoch): encoders compare in minutes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from etils import epath

from simclr_jax import cli, evaluate, metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (or its checkpoints/).")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "Fresh weights, checkpoint architecture.")
_TRAIN_SPLIT = flags.DEFINE_string(
    "train_split", "train[:1000]", "Split the classifier and the kNN bank are fitted on."
)
_EVAL_SPLIT = flags.DEFINE_string("eval_split", "", "Scored split; default: the config's.")
_OUT = flags.DEFINE_string("out", "", "Results JSON; default W/frozen_eval[_random].json.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
flags.mark_flags_as_required(["workdir"])

L2_WEIGHTS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
LBFGS_STEPS = 200


def fit_linear_classifier(
    features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float, steps: int = LBFGS_STEPS
):
    """fn(features) -> logits of a multinomial logistic regression with weight penalty
    l2 * |W|^2, on features standardized with the train mean and standard deviation."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = jnp.asarray((features - mean) / std, jnp.float32)
    params = _lbfgs_fit(x, jnp.asarray(labels), jnp.float32(l2), num_classes, steps)
    return lambda f: np.asarray(((f - mean) / std) @ params["w"] + params["b"])


@partial(jax.jit, static_argnums=(3, 4))
def _lbfgs_fit(x: jax.Array, y: jax.Array, l2: jax.Array, num_classes: int, steps: int):
    """Full-batch L-BFGS; l2 is traced, so the sweep over L2_WEIGHTS compiles once per shape."""

    def loss(params):
        logits = x @ params["w"] + params["b"]
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return xent + l2 * jnp.sum(params["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
    return params


def linear_accuracy(train, evaluation, num_classes: int) -> tuple[float, float]:
    """(top-1 on evaluation, chosen l2): l2 picked on the last tenth of the (shuffled) train
    features, then the classifier refit on all of them."""
    (train_x, train_y), (eval_x, eval_y) = train, evaluation
    order = np.random.default_rng(0).permutation(len(train_y))
    held = order[: max(1, len(order) // 10)]
    fit = order[len(held) :]
    accuracy = lambda classify, x, y: float(np.mean(np.argmax(classify(x), 1) == y))  # noqa: E731
    scores = {
        l2: accuracy(
            fit_linear_classifier(train_x[fit], train_y[fit], num_classes, l2),
            train_x[held],
            train_y[held],
        )
        for l2 in L2_WEIGHTS
    }
    best = max(scores, key=scores.get)
    classify = fit_linear_classifier(train_x, train_y, num_classes, best)
    return accuracy(classify, eval_x, eval_y), best


def frozen_eval(
    workdir: str,
    *,
    random_init: bool = False,
    train_split: str = "train[:1000]",
    eval_split: str = "",
    step: int = -1,
) -> dict[str, float | int | str | bool]:
    """Linear and kNN top-1 of the (pretrained or random) encoder's h on eval_split."""
    embed, config = evaluate.load_embedder(workdir, step, random_init=random_init)
    eval_split = eval_split or config.data.eval_split
    batch = config.eval_batch_size
    train = evaluate.split_features(embed, config.data, train_split, batch)
    evaluation = evaluate.split_features(embed, config.data, eval_split, batch)
    num_classes = config.model.num_classes
    linear_top1, l2 = linear_accuracy(train, evaluation, num_classes)
    as_arrays = lambda f, y: (jnp.asarray(f), jnp.asarray(y), jnp.ones(len(y)))  # noqa: E731
    knn = evaluate.knn_accuracy(
        as_arrays(*train),
        as_arrays(*evaluation),
        num_classes=num_classes,
        k=config.knn_k,
        temperature=config.knn_temperature,
    )
    return {
        "encoder": "random" if random_init else "pretrained",
        "train_split": train_split,
        "eval_split": eval_split,
        "num_train": int(len(train[1])),
        "num_eval": int(len(evaluation[1])),
        "linear_top1": linear_top1,
        "linear_l2": l2,
        "knn_top1": float(knn["knn_top1"]),
        "knn_k": config.knn_k,
    }


def main(argv: list[str]) -> None:
    """Evaluates and writes the results JSON."""
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
    results = frozen_eval(
        _WORKDIR.value,
        random_init=_RANDOM_INIT.value,
        train_split=_TRAIN_SPLIT.value,
        eval_split=_EVAL_SPLIT.value,
        step=_STEP.value,
    )
    name = "frozen_eval_random.json" if _RANDOM_INIT.value else "frozen_eval.json"
    out = _OUT.value or str(epath.Path(_WORKDIR.value) / name)
    metrics.write_json(out, results)
    logging.info("Frozen eval of %s -> %s", _WORKDIR.value, out)
    print(results)


if __name__ == "__main__":
    cli.run(main, prog="simclr_jax.frozen_eval")
