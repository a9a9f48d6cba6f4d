"""Converts the published google-research/simclr checkpoints (SimCLR v1/v2, TF1 name-based
`model.ckpt-<step>` files and TF2 SavedModels) into a normal simclr_jax workdir:

    python -m simclr_jax.convert --checkpoint=PATH --workdir=OUT [--config.<field>=...]

PATH: a TF1 checkpoint prefix or directory, a TF2 SavedModel directory or its
`variables/variables` prefix, local or gs://. The architecture (depth, width, selective
kernels, head layers, output dims, classes) is inferred from the variable shapes; config
overrides are only needed where shapes cannot tell (model.ft_proj_selector of a fine-tuned
checkpoint, model.sk_ratio when every selective-kernel squeeze has the 32-channel minimum).

Variables are matched by forward order, not by name text: TF numbers `conv2d_k` and
`batch_normalization_k` in creation order, which is forward order (a block's projection
shortcut first). TF2 keys are positional, so they are first mapped to variable names through
the checkpoint's object graph (`full_name`), whatever flavour of key the export used.

From Python: `variables, config = load_tf_checkpoint(path)`, then
`build_model(config).apply(variables, images)`. TensorFlow is imported only when reading.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from simclr_jax import checkpoint, cli, models
from simclr_jax.config import get_base_config
from simclr_jax.models import create_model, model_from_config, model_mode, validate_model_config
from simclr_jax.models.heads import head_kernel_init
from simclr_jax.models.resnet import MAX_WIDTH_MULTIPLIER, STAGE_SIZES
from simclr_jax.preemption import EXIT_CONFIG_ERROR

SK_RATIO = 0.0625  # the published SimCLRv2 selective-kernel ratio
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
BN_LEAVES = {  # TF leaf -> (collection, Flax leaf)
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
# Model fields the shapes decide; a --config override must agree with them.
INFERRED_FIELDS = (
    "resnet_depth",
    "width_multiplier",
    "cifar_stem",
    "proj_head_mode",
    "num_proj_layers",
    "proj_out_dim",
)

_IGNORED = (
    (re.compile(r"^global_step$"), "global step"),
    (re.compile(r"^(save_counter|beta1_power|beta2_power)(/.*)?$"), "optimizer/saver counter"),
    (re.compile(r"/(Momentum|Adam|Adam_1|RMSProp|RMSProp_1|Adagrad)$"), "optimizer slot"),
    (re.compile(r"/ExponentialMovingAverage$"), "EMA copy"),
    (re.compile(r"^ema_model/"), "EMA copy"),
)
# TF2 training checkpoints (tf.train.Checkpoint of model + optimizer): judged by the key.
_IGNORED_KEYS = (
    (re.compile(r"/\.OPTIMIZER_SLOT/"), "optimizer slot"),
    (re.compile(r"^(optimizer|save_counter)(/|$)"), "optimizer/saver state"),
)
_CONV = re.compile(r"(?:^|/)conv2d(?:_(\d+))?/kernel$")
_BN = re.compile(
    r"(?:^|/)(?:sync_)?batch_normalization(?:_(\d+))?/(gamma|beta|moving_mean|moving_variance)$"
)
_PROJ = re.compile(r"^(?:head_contrastive|projection_head)/(n?l)_(\d+)/(.+)$")
_PROJ_DENSE = re.compile(r"(?:^|/)dense(?:_\d+)?/kernel$")
_SUP = re.compile(r"^head_supervised/linear_layer/dense(?:_\d+)?/(kernel|bias)$")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the variable or path."""


# ------------------------------------------------------------------ reading


def _tf() -> Any:
    """TensorFlow, imported on first use only (import simclr_jax never imports it)."""
    import tensorflow as tf

    return tf


def resolve_prefix(path: str) -> str:
    """A TF1 prefix or directory, SavedModel directory or variables prefix -> the prefix to read.

    ConversionError naming the path when it holds no checkpoint or cannot be read.
    """
    tf = _tf()
    path = str(path).rstrip("/")
    try:
        if tf.io.gfile.exists(path + ".index"):
            return path
        saved_model = f"{path}/variables/variables"
        if tf.io.gfile.exists(saved_model + ".index"):
            return saved_model
        if tf.io.gfile.isdir(path):
            latest = tf.train.latest_checkpoint(path)
            if latest:
                return latest
            indexes = tf.io.gfile.glob(f"{path}/*.index")
            if indexes:
                step = lambda p: int(m.group(1)) if (m := re.search(r"-(\d+)\.index$", p)) else -1
                return max(indexes, key=step)[: -len(".index")]
    except tf.errors.OpError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"--checkpoint={path} cannot be read: {first}") from None
    raise ConversionError(
        f"--checkpoint={path} holds no checkpoint: expected a TF1 prefix (model.ckpt-<step> with "
        "its .index file), a directory holding one, a TF2 SavedModel directory or its "
        "variables/variables prefix."
    )


class SourceCheckpoint:
    """Reads one TF checkpoint variable at a time; TF2 keys are named via the object graph."""

    def __init__(self, path: str) -> None:
        tf = _tf()
        self.path = path
        self.prefix = resolve_prefix(path)
        try:
            self._reader = tf.train.load_checkpoint(self.prefix)
            self.shapes = {k: tuple(v) for k, v in self._reader.get_variable_to_shape_map().items()}
            self.names = {k: k for k in self.shapes}
            self.format = "TF1"
            if OBJECT_GRAPH_KEY in self.shapes:
                self.format = "TF2"
                self.names = object_graph_names(self._reader.get_tensor(OBJECT_GRAPH_KEY))
                self.names[OBJECT_GRAPH_KEY] = OBJECT_GRAPH_KEY
        except tf.errors.OpError as e:
            first = str(e).strip().splitlines()[0]
            raise ConversionError(f"--checkpoint={path} cannot be read: {first}") from None
        for key in self.shapes:  # no full_name: classified by the key (optimizer state) or
            self.names.setdefault(key, key)  # rejected, naming the key

    def get(self, key: str) -> np.ndarray:
        """The value of one variable as a float32 NumPy array."""
        return np.asarray(self._reader.get_tensor(key), dtype=np.float32)


def object_graph_names(serialized: bytes) -> dict[str, str]:
    """checkpoint key -> variable name (full_name) from a serialized TrackableObjectGraph."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(serialized)
    return {a.checkpoint_key: a.full_name for n in graph.nodes for a in n.attributes if a.full_name}


# ------------------------------------------------------------------ classifying names


@dataclasses.dataclass(frozen=True)
class SourceVar:
    """One checkpoint variable: key, layer name, shape and its role in the model."""

    key: str
    name: str
    shape: tuple[int, ...]
    role: str  # conv | bn | proj_dense | proj_bn | sup | ignored
    index: int = 0  # conv/bn: numeric suffix; proj: layer j
    leaf: str = ""  # bn leaf, sup kernel|bias
    note: str = ""  # ignored: why

    @property
    def label(self) -> str:
        """The name, with the checkpoint key when they differ (TF2)."""
        return self.name if self.name == self.key else f"{self.name} [{self.key}]"


def classify(key: str, name: str, shape: tuple[int, ...]) -> SourceVar | None:
    """The role of one variable by its layer name; None when it has no place in SimCLR."""
    for pattern, why in _IGNORED_KEYS:
        if pattern.search(key):
            return SourceVar(key, name, shape, "ignored", note=why)
    for pattern, why in _IGNORED:
        if pattern.search(name):
            return SourceVar(key, name, shape, "ignored", note=why)
    if name == OBJECT_GRAPH_KEY:
        return SourceVar(key, name, shape, "ignored", note="TF2 object graph")
    if name.startswith("head_supervised/"):
        m = _SUP.match(name)
        return SourceVar(key, name, shape, "sup", leaf=m.group(1)) if m else None
    m = _PROJ.match(name)
    if m:
        layer, rest = int(m.group(2)), m.group(3)
        if _PROJ_DENSE.search(rest):
            return SourceVar(key, name, shape, "proj_dense", layer, leaf=m.group(1))
        bn = _BN.search(rest)
        if bn:
            return SourceVar(key, name, shape, "proj_bn", layer, leaf=bn.group(2))
        return None
    m = _CONV.search(name)
    if m:
        return SourceVar(key, name, shape, "conv", int(m.group(1) or 0))
    m = _BN.search(name)
    if m:
        return SourceVar(key, name, shape, "bn", int(m.group(1) or 0), leaf=m.group(2))
    return None


def classify_all(
    names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], where: str
) -> dict[str, list[SourceVar]]:
    """Every variable (checkpoint key -> layer name, shape) by role; ConversionError naming the
    first that fits no SimCLR layer. `where` names the checkpoint in messages."""
    groups: dict[str, list[SourceVar]] = {r: [] for r in ("conv", "bn", "proj_dense", "proj_bn")}
    groups.update(sup=[], ignored=[])
    unknown = []
    for key in sorted(shapes):
        var = classify(key, names[key], tuple(shapes[key]))
        if var is None:
            unknown.append(names[key] if names[key] == key else f"{names[key]} [{key}]")
        else:
            groups[var.role].append(var)
    if not groups["conv"]:
        listed = ", ".join(sorted(names[k] for k in shapes)[:5])
        raise ConversionError(
            f"{where} is not a SimCLR ResNet checkpoint: no conv2d*/kernel variable "
            f"(base_model/conv2d/kernel in TF1, resnet/.../conv2d/kernel in TF2); it holds "
            f"{len(shapes)} variables, e.g. {listed}"
        )
    if unknown:
        raise ConversionError(
            f"variable {unknown[0]} of {where} has no place in a SimCLR ResNet "
            f"(backbone conv2d/batch_normalization, head_contrastive, head_supervised)"
            + (f"; {len(unknown) - 1} more like it" if len(unknown) > 1 else "")
        )
    for role in ("conv", "bn"):
        groups[role].sort(key=lambda v: (v.index, v.leaf))
    return groups


# ------------------------------------------------------------------ the model's layout


def encoder_layout(depth: int, resnet_d: bool, cifar_stem: bool, sk: bool) -> list[tuple[str, str]]:
    """(conv|bn, encoder path) of every conv and BN in the reference's creation order."""
    items: list[tuple[str, str]] = []

    def conv_bn(path: str) -> None:
        items.extend([("conv", f"{path}/conv"), ("bn", f"{path}/bn")])

    stem = ["conv1"] if cifar_stem or not resnet_d else ["conv1", "conv2", "conv3"]
    for name in stem:
        conv_bn(f"stem/{name}")
    kind, sizes = STAGE_SIZES[depth]
    for i, blocks in enumerate(sizes, start=1):
        for j in range(blocks):
            block = f"stage{i}/block{j}"
            if j == 0:  # the projection shortcut is created before the main path
                conv_bn(f"{block}/shortcut")
            conv_bn(f"{block}/conv1")
            if kind == "basic":
                conv_bn(f"{block}/conv2")
                continue
            if sk:
                conv_bn(f"{block}/sk_conv/split_conv")
                conv_bn(f"{block}/sk_conv/reduce")
                items.append(("conv", f"{block}/sk_conv/expand"))
            else:
                conv_bn(f"{block}/conv2")
            conv_bn(f"{block}/conv3")
    return items


def _count(items: list[tuple[str, str]], what: str) -> int:
    return sum(1 for kind, _ in items if kind == what)


@dataclasses.dataclass
class Architecture:
    """What the shapes say: encoder and head hyper-parameters."""

    depth: int
    width: int
    sk: bool
    cifar_stem: bool
    proj_head_mode: str
    num_proj_layers: int
    proj_out_dim: int
    num_classes: int | None


def _fail_shape(var: SourceVar, what: str) -> ConversionError:
    return ConversionError(f"variable {var.label} has shape {list(var.shape)}: {what}")


def infer_encoder(convs: list[SourceVar], bns: list[SourceVar]) -> tuple[int, int, bool, bool]:
    """(depth, width, sk, cifar_stem) from the backbone's conv kernels in forward order."""
    for group, what in (
        (convs, "conv2d"),
        (sorted({v.index: v for v in bns}.values(), key=lambda v: v.index), "batch_normalization"),
    ):
        indices = [v.index for v in group]
        if len(set(indices)) != len(indices):
            dup = next(v for v in group if indices.count(v.index) > 1)
            raise ConversionError(
                f"variable {dup.label}: two {what} layers share index {dup.index}"
            )
        for prev, var in zip(group, group[1:], strict=False):
            if var.index != prev.index + 1:
                raise ConversionError(
                    f"a {what} layer is missing between {prev.label} and {var.label} (indices "
                    f"{prev.index} -> {var.index}); the checkpoint is incomplete"
                )
    for var in convs:
        if len(var.shape) != 4 or var.shape[0] != var.shape[1]:
            raise _fail_shape(var, "a conv kernel must be [k, k, in, out]")
    first = convs[0]
    if first.shape[2] != 3:
        raise _fail_shape(first, "the first conv must read 3 RGB channels")
    k, out = first.shape[0], first.shape[3]
    second = convs[1].shape if len(convs) > 1 else (0,)
    resnet_d = k == 3 and second[0] == 3
    cifar_stem = k == 3 and not resnet_d
    if k not in (3, 7):
        raise _fail_shape(first, "the stem conv must be 7x7 (ResNet) or 3x3 (ResNet-D, CIFAR)")
    stem_out = 2 * out if resnet_d else out
    width = stem_out // 64
    if stem_out % 64 or not 1 <= width <= MAX_WIDTH_MULTIPLIER:
        raise _fail_shape(
            first,
            f"the stem width {stem_out} is not 64 x an integer width in 1..{MAX_WIDTH_MULTIPLIER}",
        )
    # SimCLRv2 switches selective kernels and the ResNet-D stem on together (ResNet-18/34 get
    # only the stem); a CIFAR stem hides it, there a BN-less conv per block tells.
    sk = resnet_d or (cifar_stem and len(convs) > len({v.index for v in bns}))
    n_stem = 3 if resnet_d else 1
    shortcut = convs[n_stem] if len(convs) > n_stem else None
    if shortcut is None or shortcut.shape[:3] != (1, 1, 64 * width):
        raise _fail_shape(
            shortcut or first,
            f"expected the first block's 1x1 shortcut conv from {64 * width} channels",
        )
    kind = {4 * 64 * width: "bottleneck", 64 * width: "basic"}.get(shortcut.shape[3])
    if kind is None:
        raise _fail_shape(
            shortcut,
            f"a first-block shortcut must output {64 * width} (basic) or {256 * width} "
            "(bottleneck) channels",
        )
    candidates = {
        d: _count(encoder_layout(d, resnet_d, cifar_stem, sk), "conv")
        for d, (block_kind, _) in STAGE_SIZES.items()
        if block_kind == kind
    }
    depth = min(candidates, key=lambda d: (abs(candidates[d] - len(convs)), d))
    expected = candidates[depth]
    if len(convs) > expected:
        raise ConversionError(
            f"variable {convs[expected].label} has no place in the inferred ResNet-{depth} "
            f"(it has {expected} conv kernels, the checkpoint {len(convs)}); conv kernels per "
            f"depth: {candidates}"
        )
    if len(convs) < expected:
        raise ConversionError(
            f"the checkpoint has {len(convs)} conv kernels, after {convs[-1].label}; the nearest "
            f"{kind} ResNet, depth {depth}, has {expected} (conv kernels per depth: {candidates}): "
            "the checkpoint is incomplete or not a SimCLR ResNet"
        )
    return depth, width, sk, cifar_stem


def infer_heads(groups: Mapping[str, list[SourceVar]]) -> tuple[str, int, int, int | None]:
    """(proj_head_mode, num_proj_layers, proj_out_dim, num_classes or None)."""
    dense = sorted(groups["proj_dense"], key=lambda v: v.index)
    num_classes = None
    for var in groups["sup"]:
        if var.leaf == "kernel":
            if len(var.shape) != 2:
                raise _fail_shape(var, "the supervised head kernel must be [features, classes]")
            num_classes = var.shape[1]
    if not dense:
        if groups["proj_bn"]:
            raise ConversionError(
                f"variable {groups['proj_bn'][0].label} is a projection-head batch norm without "
                "its dense layer"
            )
        return "none", 3, 128, num_classes
    for j, var in enumerate(dense):
        if var.index != j:
            raise ConversionError(
                f"projection head layer {j} is missing (found {var.label} next); layers must be "
                "numbered 0, 1, ..."
            )
        if len(var.shape) != 2:
            raise _fail_shape(var, "a projection-head kernel must be [in, out]")
    kinds = {v.leaf for v in dense}
    if kinds == {"l"} and len(dense) == 1:
        return "linear", 1, dense[0].shape[1], num_classes
    if kinds != {"nl"}:
        raise ConversionError(
            f"variable {dense[-1].label}: a head mixes linear (l_j) and nonlinear (nl_j) layers"
        )
    return "nonlinear", len(dense), dense[-1].shape[1], num_classes


def infer_architecture(groups: Mapping[str, list[SourceVar]]) -> Architecture:
    """Everything the variable shapes decide about the model."""
    depth, width, sk, cifar_stem = infer_encoder(groups["conv"], groups["bn"])
    mode, layers, out_dim, classes = infer_heads(groups)
    return Architecture(depth, width, sk, cifar_stem, mode, layers, out_dim, classes)


# ------------------------------------------------------------------ config


def default_config() -> ml_collections.ConfigDict:
    """The converted workdir's config before inference: the schema's defaults (ImageNet data at
    224 px, the reference's batch-norm constants) with what a converted checkpoint is; every
    model field inferred from the shapes is overwritten."""
    config = get_base_config()
    config.mode = "finetune"  # the classifier reads hiddens[ft_proj_selector], as the reference
    config.knn_eval = False
    config.model.cifar_stem = False  # inferred from the stem's shapes
    # What converted workdirs have always recorded: the reference's 90-epoch schedule and no
    # blur (converted checkpoints are evaluated or fine-tuned, never pretrained further).
    config.train_epochs = 90
    config.data.blur_prob = 0.0
    return config


def make_config(arch: Architecture, overrides: Any = None) -> ml_collections.ConfigDict:
    """default_config() + the user's overrides + the inferred architecture; ConversionError
    when an override contradicts what the shapes say."""
    defaults = default_config()
    config = ml_collections.ConfigDict(defaults.to_dict())
    overrides = dict(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides or {})
    dotted = {k: v for k, v in overrides.items() if "." in k}
    nested = {k: v for k, v in overrides.items() if "." not in k}
    try:
        config.lock()  # an unknown field raises instead of being added
        config.update_from_flattened_dict(traverse_util.flatten_dict(nested, sep="."))
        config.update_from_flattened_dict(dotted)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise ConversionError(f"bad config override: {str(e).splitlines()[0]}") from None
    config.unlock()
    inferred = dict(
        resnet_depth=arch.depth,
        width_multiplier=arch.width,
        cifar_stem=arch.cifar_stem,
        proj_head_mode=arch.proj_head_mode,
        num_proj_layers=arch.num_proj_layers,
        proj_out_dim=arch.proj_out_dim,
    )
    for field, value in inferred.items():
        given = config.model[field]
        if given != defaults.model[field] and given != value:
            raise ConversionError(
                f"--config.model.{field}={given!r} contradicts the checkpoint, whose shapes say "
                f"{value!r}; drop the override"
            )
        config.model[field] = value
    if arch.num_classes is not None:
        given = config.model.num_classes
        if given != defaults.model.num_classes and given != arch.num_classes:
            raise ConversionError(
                f"--config.model.num_classes={given} contradicts head_supervised, which has "
                f"{arch.num_classes} classes; drop the override"
            )
        config.model.num_classes = arch.num_classes
    if arch.sk and not config.model.sk_ratio:
        config.model.sk_ratio = SK_RATIO
    if not arch.sk and config.model.sk_ratio:
        raise ConversionError(
            f"--config.model.sk_ratio={config.model.sk_ratio} but the checkpoint has no "
            "selective kernels (every backbone conv has a batch norm); drop the override"
        )
    return config


def build_model(config: ml_collections.ConfigDict, mode: str | None = None) -> Any:
    """The SimCLR module a converted config describes (classifier on hiddens[ft_proj_selector])."""
    if mode is None:
        return model_from_config(config)
    return create_model(config.model, num_classes=config.model.num_classes, mode=mode)


def abstract_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """'params/encoder/...' -> ShapeDtypeStruct of every model variable (nothing allocated)."""
    tree = models.abstract_variables(build_model(config), 64)
    return traverse_util.flatten_dict(dict(tree), sep="/")


# ------------------------------------------------------------------ the mapping


@dataclasses.dataclass(frozen=True)
class Plan:
    """source key -> destination path, plus what is ignored and what gets initialized."""

    pairs: list[tuple[SourceVar, str]]
    ignored: list[SourceVar]
    initialized: list[str]


def _bn_pairs(
    bn_vars: list[SourceVar], dest: str, needs_beta: bool, place: str
) -> Iterator[tuple[SourceVar, str]]:
    """The 3 or 4 leaves of one TF batch norm -> Flax paths under dest ('encoder/.../bn')."""
    by_leaf = {v.leaf: v for v in bn_vars}
    wanted = ["gamma", "moving_mean", "moving_variance"] + (["beta"] if needs_beta else [])
    for leaf in wanted:
        if leaf not in by_leaf:
            some = bn_vars[0].name.rsplit("/", 1)[0]
            raise ConversionError(f"variable {some}/{leaf} is missing ({place} needs it)")
    for leaf, var in by_leaf.items():
        if leaf not in wanted:
            raise ConversionError(f"variable {var.label} has no place: {place} has no {leaf}")
        collection, flax_leaf = BN_LEAVES[leaf]
        yield var, f"{collection}/{dest}/{flax_leaf}"


def plan_mapping(
    groups: Mapping[str, list[SourceVar]],
    config: ml_collections.ConfigDict,
    shapes: Mapping[str, Any],
) -> Plan:
    """Pairs every source variable with a model variable and checks their shapes."""
    c = config.model
    layout = encoder_layout(int(c.resnet_depth), c.sk_ratio > 0, bool(c.cifar_stem), c.sk_ratio > 0)
    convs = [p for kind, p in layout if kind == "conv"]
    bn_paths = [p for kind, p in layout if kind == "bn"]
    bn_groups: dict[int, list[SourceVar]] = {}
    for var in groups["bn"]:
        bn_groups.setdefault(var.index, []).append(var)
    if len(bn_groups) != len(bn_paths):
        extra = sorted(bn_groups)[len(bn_paths)] if len(bn_groups) > len(bn_paths) else None
        raise ConversionError(
            (
                f"variable {bn_groups[extra][0].label} has no place"
                if extra is not None
                else f"{len(bn_paths) - len(bn_groups)} batch norm(s) missing"
            )
            + f": the inferred ResNet-{c.resnet_depth} has {len(bn_paths)} backbone batch norms, "
            f"the checkpoint {len(bn_groups)}"
        )
    pairs = [
        (var, f"params/encoder/{path}/kernel")
        for var, path in zip(groups["conv"], convs, strict=True)
    ]
    for (_, bn_vars), path in zip(sorted(bn_groups.items()), bn_paths, strict=True):
        pairs.extend(_bn_pairs(bn_vars, f"encoder/{path}", True, f"encoder/{path}"))
    proj_bns: dict[int, list[SourceVar]] = {}
    for var in groups["proj_bn"]:
        proj_bns.setdefault(var.index, []).append(var)
    dense = sorted(groups["proj_dense"], key=lambda v: v.index)
    for var in dense:
        j = var.index + 1
        pairs.append((var, f"params/projection_head/layer{j}/dense/kernel"))
        if var.index not in proj_bns:
            raise ConversionError(
                f"the batch norm of projection-head layer {var.index} ({var.name}) is missing"
            )
        last = var.index == len(dense) - 1
        pairs.extend(
            _bn_pairs(
                proj_bns.pop(var.index),
                f"projection_head/layer{j}/bn",
                not last,
                f"projection head layer {var.index}",
            )
        )
    if proj_bns:
        stray = proj_bns[min(proj_bns)][0]
        raise ConversionError(
            f"variable {stray.label} has no place: its head layer has no dense kernel"
        )
    for var in groups["sup"]:
        pairs.append((var, f"params/classifier/{var.leaf}"))
    for var, dest in pairs:
        if dest not in shapes:
            raise ConversionError(f"variable {var.label} has no place in the model ({dest})")
        want = tuple(shapes[dest].shape)
        if tuple(var.shape) != want:
            raise ConversionError(
                f"variable {var.label} has shape {list(var.shape)} but the inferred "
                f"{describe(config)} expects {list(want)} at {dest}"
            )
    taken = {dest for _, dest in pairs}
    initialized = [p for p in shapes if p not in taken]
    missing = [p for p in initialized if not p.startswith("params/classifier/")]
    if missing:
        raise ConversionError(
            f"no checkpoint variable for {missing[0]} of the inferred {describe(config)}"
        )
    return Plan(pairs, groups["ignored"], initialized)


def describe(config: ml_collections.ConfigDict) -> str:
    """'ResNet-50 1x SK (sk_ratio 0.0625), 3-layer nonlinear head -> 128, 1000 classes'."""
    c = config.model
    sk = f" SK (sk_ratio {c.sk_ratio})" if c.sk_ratio else ""
    head = (
        "no projection head"
        if c.proj_head_mode == "none"
        else f"{c.num_proj_layers}-layer {c.proj_head_mode} head -> {c.proj_out_dim}"
    )
    stem = " CIFAR stem" if c.cifar_stem else ""
    return (
        f"ResNet-{c.resnet_depth} {c.width_multiplier}x{sk}{stem}, {head}, {c.num_classes} classes"
    )


# ------------------------------------------------------------------ conversion


@dataclasses.dataclass
class Conversion:
    """The result: Flax variables, the full config and the mapping table."""

    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    plan: Plan
    source: str

    def table(self) -> str:
        """Every source variable -> destination, then what was ignored and initialized."""
        lines = [f"# {self.source}: {describe(self.config)}", f"# {len(self.plan.pairs)} converted"]
        width = min(max((len(v.label) for v, _ in self.plan.pairs), default=0), 72)
        for var, dest in self.plan.pairs:
            lines.append(f"{var.label:<{width}}  {str(list(var.shape)):<22} -> {dest}")
        lines.append(f"# {len(self.plan.ignored)} ignored")
        for var in self.plan.ignored:
            lines.append(f"{var.label}  {list(var.shape)}  ignored ({var.note})")
        lines.append(f"# {len(self.plan.initialized)} initialized (not in the checkpoint)")
        for path in self.plan.initialized:
            lines.append(f"{path}  initialized (seed {self.config.seed})")
        return "\n".join(lines) + "\n"


def plan_conversion(
    names: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    overrides: Any = None,
    where: str = "the checkpoint",
) -> tuple[ml_collections.ConfigDict, Plan, dict[str, Any]]:
    """(config, plan, model variable shapes) from names and shapes alone (no values read)."""
    groups = classify_all(names, shapes, where)
    config = make_config(infer_architecture(groups), overrides)
    try:
        validate_model_config(
            config.model, num_classes=config.model.num_classes, mode=model_mode(config.mode)
        )
    except ValueError as e:  # an override the model rejects, e.g. ft_proj_selector out of range
        raise ConversionError(str(e).splitlines()[0]) from None
    model_shapes = abstract_variables(config)
    return config, plan_mapping(groups, config, model_shapes), model_shapes


def convert(path: str, overrides: ml_collections.ConfigDict | Mapping | None = None) -> Conversion:
    """Reads and maps a published checkpoint; nothing is written. Raises ConversionError."""
    source = SourceCheckpoint(path)
    config, plan, shapes = plan_conversion(source.names, source.shapes, overrides, source.prefix)
    flat: dict[str, Any] = {}
    # One variable at a time, straight into a jax.Array: the only full copy is `flat`, and
    # orbax saves jax.Arrays with about one more copy in flight (NumPy leaves cost two).
    for var, dest in plan.pairs:
        flat[dest] = jax.device_put(source.get(var.key))
    rng = jax.random.key(config.seed)
    for dest in plan.initialized:
        shape = shapes[dest].shape
        value = head_kernel_init(rng, shape) if dest.endswith("kernel") else jnp.zeros(shape)
        flat[dest] = jnp.asarray(value, jnp.float32)
    variables = traverse_util.unflatten_dict(flat, sep="/")
    return Conversion(variables, config, plan, source.prefix)


def load_tf_checkpoint(
    path: str, overrides: Mapping | None = None
) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """(Flax variables {'params', 'batch_stats'}, config) of a published checkpoint; the
    model is build_model(config), its inferred settings are config.model."""
    result = convert(path, overrides)
    return result.variables, result.config


def write_workdir(result: Conversion, workdir: str) -> epath.Path:
    """Writes the orbax checkpoint (step 0), config.json and conversion.txt into workdir.

    Local workdirs are written to a temporary sibling and renamed when complete; a gs://
    workdir is written in place after the conversion is complete in memory (orbax commits its
    checkpoint atomically, config.json comes last)."""
    out = epath.Path(workdir)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(
            f"--workdir={workdir} already exists and is not empty; choose a new one"
        )
    local = "://" not in str(workdir)
    target = out.parent / f".{out.name}.converting-{os.getpid()}" if local else out
    try:
        if local and target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        manager = checkpoint.create_manager(target, keep=1, use_async=False)
        meta = {
            "config": result.config.to_dict(),
            "step": 0,
            "data_position": 0,
            "mode": result.config.mode,
            "converted_from": result.source,
        }
        tree = {"step": np.zeros((), np.int32), **result.variables}
        checkpoint.save(manager, 0, tree, meta)
        manager.wait_until_finished()
        manager.close()
        (target / "conversion.txt").write_text(result.table())
        (target / "config.json").write_text(result.config.to_json(indent=2))
        if local:
            if out.exists():
                out.rmdir()
            os.replace(target, out)
    except BaseException:
        if local and target.exists():
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------ checking outputs


def named_outputs(
    variables: Mapping[str, Any], config: ml_collections.ConfigDict, images: Any
) -> dict[str, np.ndarray]:
    """The reference's named tensors for images (N, H, W, 3) in [0, 1], inference mode:
    final_avg_pool (h), proj_hidden_j, proj_head_output (z), logits_sup (classifier on h),
    logits_sup_ft1 (on the first head layer), block_group{1..4}_mean, initial_conv_mean and
    initial_max_pool_mean (per-channel means), to compare with the TF code's outputs."""
    model = build_model(config, mode="finetune")
    images = jnp.asarray(images, jnp.float32)
    h, inter = model.apply(
        dict(variables),
        images,
        train=False,
        method=lambda m, x, train: m.encoder(x, train=train),
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    enc = inter["intermediates"]["encoder"]
    _, hiddens = model.apply(
        dict(variables), h, method=lambda m, x: m.projection_head(x, train=False)
    )
    stem_conv = "conv1" if config.model.cifar_stem or not config.model.sk_ratio else "conv3"
    mean = lambda x: np.asarray(jnp.mean(x, axis=(0, 1, 2)))
    out = {
        "final_avg_pool": np.asarray(h),
        "initial_conv_mean": mean(enc["stem"][stem_conv]["conv"]["__call__"][0]),
        "initial_max_pool_mean": mean(enc["stem"]["__call__"][0]),
    }
    for i in range(1, 5):
        out[f"block_group{i}_mean"] = mean(enc[f"stage{i}"]["__call__"][0])
    if len(hiddens) > 1:
        out["proj_head_output"] = np.asarray(hiddens[-1])
        for j, hidden in enumerate(hiddens[1:-1]):
            out[f"proj_hidden_{j}"] = np.asarray(hidden)
    kernel = variables["params"]["classifier"]["kernel"]
    bias = variables["params"]["classifier"]["bias"]
    logits = lambda x: np.asarray(jnp.dot(x, kernel, precision="highest") + bias)
    out["logits_sup"] = logits(hiddens[0])
    if len(hiddens) > 2 and hiddens[1].shape[-1] == kernel.shape[0]:
        out["logits_sup_ft1"] = logits(hiddens[1])
    return out


# ------------------------------------------------------------------ command line


def run_cli(checkpoint_path: str, workdir: str, overrides: Any = None) -> int:
    """Converts, writes the workdir and prints the table; a ConversionError is one stderr line
    and exit status 2 (nothing written)."""
    try:
        result = convert(checkpoint_path, overrides)
        write_workdir(result, workdir)
    except ConversionError as e:
        print(f"simclr_jax.convert: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    sys.stdout.write(result.table())
    if "finetuned" in str(checkpoint_path) and not result.config.model.ft_proj_selector:
        print(
            "simclr_jax.convert: note: the published finetuned_* checkpoints were trained with "
            "the classifier on the first head layer; pass --config.model.ft_proj_selector=1",
            file=sys.stderr,
        )
    print(f"Wrote {workdir}: {describe(result.config)}; --config.init_checkpoint={workdir}")
    return 0


def main(argv: list[str]) -> None:
    """absl entry point (flags defined only when run as a script, next to main.py's)."""
    from absl import flags

    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
    f = flags.FLAGS
    raise SystemExit(run_cli(f.checkpoint, f.workdir, f.config))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("checkpoint", None, "TF1 prefix/dir or TF2 SavedModel, local or gs://.")
    flags.DEFINE_string("workdir", None, "Output workdir (new or empty).")
    try:  # a config dict flag applies the command line's overrides when it is defined
        config_flags.DEFINE_config_dict(
            "config", default_config(), "Overrides, e.g. --config.model.ft_proj_selector=1."
        )
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        cli.fail("simclr_jax.convert", cli.flag_error_message(error, sys.argv))
    flags.mark_flags_as_required(["checkpoint", "workdir"])
    cli.run(main, prog="simclr_jax.convert")


__all__ = [
    "ConversionError",
    "Conversion",
    "convert",
    "load_tf_checkpoint",
    "write_workdir",
    "build_model",
    "named_outputs",
    "default_config",
    "encoder_layout",
    "object_graph_names",
    "classify",
    "resolve_prefix",
    "run_cli",
]
