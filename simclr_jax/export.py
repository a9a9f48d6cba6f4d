"""Exports a workdir's model to PyTorch (no torch needed to write it):

    python -m simclr_jax.export --workdir=W [--step=N] --out=DIR [--format=torch|torchvision]

W is a workdir of any mode (pretrain, linear_eval, finetune, distill) or one simclr_jax.convert
wrote from a published checkpoint; --step defaults to the latest. DIR must be new or empty; it
is written to a temporary sibling and renamed when complete, so a failed export leaves nothing.

--format=torch (default), every architecture: simclr_resnet.py (a self-contained PyTorch module
file, torch + safetensors only), model.safetensors (its state_dict), config.json, README.md.
The module computes what the JAX model computes (tests/test_export.py: within 1e-5).

--format=torchvision, ResNet-50/101/152 1x without selective kernels or squeeze-excitation,
ImageNet stem: resnet<D>.safetensors and resnet<D>.pth, a state_dict that
torchvision.models.resnet<D>(num_classes=K) loads with strict=True (the classifier in fc when it
reads h), projection_head.safetensors (an nn.Sequential of Linear / BatchNorm1d / ReLU), and
classifier.safetensors when the classifier reads a projection-head layer. torchvision's stem
max-pool pads (1, 1) where this ResNet's 'SAME' pool pads (0, 1) on even-sized maps; DIR's
README.md states the resulting error and the one-line patch that removes it.

Images: RGB in [0, 1], no mean/std normalisation, NCHW in PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import struct
import sys
import zipfile
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from simclr_jax import checkpoint
from simclr_jax.convert import model_mode
from simclr_jax.models import create_model, feature_dim, num_head_outputs, resolve_cifar_stem

FORMATS = ("torch", "torchvision")
TORCHVISION_DEPTHS = (50, 101, 152)
TORCHVISION_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default, which torchvision keeps
MODULE_TEMPLATE = "export_torch_module.py"
MODULE_FILE = "simclr_resnet.py"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "projection_head.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
EXIT_BAD_INPUT = 2
# torchvision's own stem max-pool against this model's: max |h_torchvision - h| / max |h| on the
# bundled CIFAR-10 test images, at 224 px (upsampled) and at their own 32 px, for the converted
# ResNet-50 of the published-checkpoint fixtures (docs/checkpoints.md has the measurements;
# tests/test_export.py asserts these bounds).
TORCHVISION_H_ERROR = {224: 0.015, 32: 0.16}


class ExportError(ValueError):
    """Bad input: the message is one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A restored checkpoint: its config, Flax variables (NumPy, float32) and where it came from."""

    config: ml_collections.ConfigDict
    variables: dict[str, Any]
    workdir: str
    step: int


# ------------------------------------------------------------------ reading the workdir


def open_workdir(workdir: str, step: int = -1) -> tuple[Any, int, ml_collections.ConfigDict]:
    """(read-only checkpoint manager, step, the checkpoint's config); ExportError when the
    workdir, its checkpoints or the step are missing."""
    if not workdir:
        raise ExportError("--workdir is empty; pass a training workdir or a converted one")
    if "://" not in workdir and not os.path.isdir(workdir):
        raise ExportError(
            f"--workdir={workdir} does not exist; pass a training workdir (holding "
            "checkpoints/<step>/) or one simclr_jax.convert wrote"
        )
    try:
        manager, latest = checkpoint.open_for_restore(workdir, -1, field="--workdir")
    except FileNotFoundError as e:
        raise ExportError(str(e).splitlines()[0]) from None
    steps = sorted(manager.all_steps())
    if step == -1:
        step = latest
    elif step not in steps:
        raise ExportError(
            f"--step={step} is not in {workdir}; available steps: {steps} (leave --step out "
            "for the latest)"
        )
    config = ml_collections.ConfigDict(checkpoint.read_meta(manager, step)["config"])
    return manager, step, config


def module_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The exported module's constructor arguments (config.json 'model'): the architecture
    with the CIFAR stem resolved and the classifier's input as an index into the head's
    outputs (0 = h; the online probe of a pretraining workdir always reads h)."""
    m = config.model
    num_outputs = num_head_outputs(m.proj_head_mode, int(m.num_proj_layers))
    selector = 0 if model_mode(config) == "pretrain" else int(m.ft_proj_selector) % num_outputs
    return {
        "resnet_depth": int(m.resnet_depth),
        "width_multiplier": int(m.width_multiplier),
        "sk_ratio": float(m.sk_ratio),
        "se_ratio": float(m.se_ratio),
        "cifar_stem": resolve_cifar_stem(m.cifar_stem, config.data.image_size),
        "bn_epsilon": float(m.bn_epsilon),
        "bn_momentum": float(m.bn_momentum),
        "proj_head_mode": str(m.proj_head_mode),
        "num_proj_layers": int(m.num_proj_layers),
        "proj_out_dim": int(m.proj_out_dim),
        "num_classes": int(m.num_classes),
        "classifier_input": selector,
    }


def describe(cfg: Mapping[str, Any]) -> str:
    """'ResNet-50 2x with selective kernels, CIFAR stem' and the like."""
    parts = [f"ResNet-{cfg['resnet_depth']} {cfg['width_multiplier']}x"]
    if cfg["sk_ratio"] > 0:
        parts.append(f"selective kernels (sk_ratio={cfg['sk_ratio']:g})")
    if cfg["se_ratio"] > 0:
        parts.append(f"squeeze-excitation (se_ratio={cfg['se_ratio']:g})")
    parts.append("CIFAR stem" if cfg["cifar_stem"] else "ImageNet stem")
    return ", ".join(parts)


def check_format(fmt: str, cfg: Mapping[str, Any]) -> None:
    """ExportError when the architecture cannot be written in format `fmt`."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt} is not supported; choose one of {', '.join(FORMATS)}")
    if fmt == "torchvision" and (
        cfg["resnet_depth"] not in TORCHVISION_DEPTHS
        or cfg["width_multiplier"] != 1
        or cfg["sk_ratio"] > 0
        or cfg["se_ratio"] > 0
        or cfg["cifar_stem"]
    ):
        raise ExportError(
            f"--format=torchvision needs a ResNet-50/101/152 1x with the ImageNet stem and no "
            f"selective kernels or squeeze-excitation, this workdir has {describe(cfg)}; "
            "use --format=torch"
        )


def restore(manager: Any, step: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The checkpoint's params and batch_stats as float32 NumPy trees (shapes checked against
    the model its config describes; nothing is initialized or compiled)."""
    model = create_model(
        config.model, num_classes=config.model.num_classes, mode=model_mode(config)
    )
    size = int(config.data.image_size)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    target = {k: target[k] for k in ("params", "batch_stats")}
    variables, _ = checkpoint.restore_variables(
        manager, step, target, prefixes=("encoder", "projection_head", "classifier")
    )
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), variables)


def read_source(workdir: str, step: int = -1) -> Source:
    """Restores a workdir's checkpoint for export."""
    manager, step, config = open_workdir(workdir, step)
    return Source(config, restore(manager, step, config), workdir, step)


# ------------------------------------------------------------------ state dicts

_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """state_dict of simclr_resnet.SimCLRResNet: Flax path '/' -> '.', conv kernels HWIO ->
    OIHW, dense kernels transposed, BN scale/mean/var -> weight/running_mean/running_var (plus
    num_batches_tracked, and a zero bias where the Flax BN has none)."""
    flat = traverse_util.flatten_dict(
        {k: variables[k] for k in ("params", "batch_stats") if k in variables}, sep="/"
    )
    out: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        _, *path, leaf = key.split("/")
        if leaf not in _LEAVES:
            raise ExportError(f"variable {key} has no PyTorch counterpart")
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        module = ".".join(path)
        out[f"{module}.{_LEAVES[leaf]}"] = np.ascontiguousarray(value)
        if leaf == "mean":
            out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
            if f"{'/'.join(['params', *path])}/bias" not in flat:
                out[f"{module}.bias"] = np.zeros_like(value)
    return dict(sorted(out.items()))


_TORCHVISION_RULES = (
    (r"encoder\.stem\.conv1\.conv\.(.+)", r"conv1.\1"),
    (r"encoder\.stem\.conv1\.bn\.(.+)", r"bn1.\1"),
    (r"encoder\.stage(\d)\.block(\d+)\.conv(\d)\.conv\.(.+)", r"layer\1.\2.conv\3.\4"),
    (r"encoder\.stage(\d)\.block(\d+)\.conv(\d)\.bn\.(.+)", r"layer\1.\2.bn\3.\4"),
    (r"encoder\.stage(\d)\.block(\d+)\.shortcut\.conv\.(.+)", r"layer\1.\2.downsample.0.\3"),
    (r"encoder\.stage(\d)\.block(\d+)\.shortcut\.bn\.(.+)", r"layer\1.\2.downsample.1.\3"),
)
_HEAD_KEY = re.compile(r"projection_head\.layer(\d+)\.(dense|bn)\.(.+)")


def torchvision_state_dicts(
    state: Mapping[str, np.ndarray], cfg: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(backbone for torchvision.models.resnet<D>, projection head as an nn.Sequential
    [Linear, BatchNorm1d, ReLU, ...], classifier as an nn.Linear) from torch_state_dict().

    The classifier goes into the backbone's fc when it reads h, else into the third dict. A
    batch-norm epsilon other than torchvision's 1e-5 is folded into running_var."""
    backbone, head, classifier = {}, {}, {}
    shift = cfg["bn_epsilon"] - TORCHVISION_BN_EPSILON
    for key, value in state.items():
        if key.startswith("encoder."):
            for pattern, replacement in _TORCHVISION_RULES:
                if re.fullmatch(pattern, key):
                    name = re.sub(pattern, replacement, key)
                    break
            else:
                raise ExportError(f"{key} has no place in torchvision's ResNet; use --format=torch")
            if name.endswith("running_var") and shift:
                value = (value.astype(np.float64) + shift).astype(np.float32)
            backbone[name] = value
        elif key.startswith("classifier."):
            leaf = key.removeprefix("classifier.")
            if cfg["classifier_input"] == 0:
                backbone[f"fc.{leaf}"] = value
            else:
                classifier[leaf] = value
        elif match := _HEAD_KEY.fullmatch(key):
            layer, part, leaf = match.groups()
            index = 3 * (int(layer) - 1) + (part == "bn")
            head[f"{index}.{leaf}"] = value
        else:
            raise ExportError(f"{key} has no place in the torchvision export; use --format=torch")
    return backbone, head, classifier


# ------------------------------------------------------------------ file writers


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict) -> None:
    """safetensors file of NumPy arrays (torch-format metadata so loaders treat it as such)."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), path, metadata={"format": "pt", **metadata})


_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _pickle_state_dict(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The data.pkl torch.save writes for an OrderedDict of CPU tensors (pickle protocol 2;
    storage i is the archive's data/i), built opcode by opcode: no torch needed."""
    out = io.BytesIO()
    write = out.write

    def global_(module: str, name: str) -> None:
        write(b"c" + f"{module}\n{name}\n".encode())

    def string(text: str) -> None:
        data = text.encode()
        write(b"X" + struct.pack("<I", len(data)) + data)

    def integer(value: int) -> None:
        if -(2**31) <= value < 2**31:
            write(b"J" + struct.pack("<i", value))
        else:
            data = value.to_bytes(9, "little", signed=True)
            write(b"\x8a" + bytes([len(data)]) + data)

    def int_tuple(values: tuple[int, ...]) -> None:
        write(b"(")
        for value in values:
            integer(value)
        write(b"t")

    def empty_ordered_dict() -> None:
        global_("collections", "OrderedDict")
        write(b")R")

    write(b"\x80\x02")
    empty_ordered_dict()
    write(b"(")
    for index, (key, array) in enumerate(tensors.items()):
        string(key)
        global_("torch._utils", "_rebuild_tensor_v2")
        write(b"((")  # the argument tuple, then the storage's persistent id
        string("storage")
        global_("torch", _STORAGES[array.dtype])
        string(str(index))
        string("cpu")
        integer(array.size)
        write(b"tQ")  # BINPERSID
        integer(0)  # storage offset
        int_tuple(array.shape)
        int_tuple(tuple(s // array.itemsize for s in array.strides))
        write(b"\x89")  # requires_grad False
        empty_ordered_dict()  # backward hooks
        write(b"tR")
    write(b"u.")
    return out.getvalue()


def save_pth(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """What torch.save(state_dict, path) writes (the zip format, records 64-byte aligned as
    torch writes them), for float32/int64 arrays; torch.load(path, weights_only=True) reads it."""
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    arrays = {
        k: np.require(np.asarray(v, np.asarray(v).dtype.newbyteorder("<")), requirements="C")
        for k, v in tensors.items()
    }
    for key, array in arrays.items():
        if array.dtype not in _STORAGES:
            raise ExportError(f"{key}: dtype {array.dtype} cannot go into a .pth here")
    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    records = [
        ("data.pkl", _pickle_state_dict(arrays)),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
        *((f"data/{i}", a.tobytes()) for i, a in enumerate(arrays.values())),
        ("version", b"3\n"),
    ]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            # Pad the local header's extra field so the data starts on a 64-byte boundary.
            header = 30 + len(info.filename.encode()) + 4
            pad = -(archive.fp.tell() + header) % 64
            info.extra = struct.pack("<HH", 0x4B46, pad) + b"Z" * pad
            archive.writestr(info, data)


def _copy_module_file(directory: str) -> None:
    text = resources.files("simclr_jax").joinpath(MODULE_TEMPLATE).read_text()
    with open(os.path.join(directory, MODULE_FILE), "w") as f:
        f.write(text)


# ------------------------------------------------------------------ README of an export


def _provenance(source: Source, cfg: Mapping[str, Any]) -> str:
    mode = source.config.get("mode", "?")
    converted = ""
    if source.config.get("init_checkpoint") and mode == "finetune":
        converted = f", initialised from {source.config.init_checkpoint}"
    classifier = (
        "h"
        if cfg["classifier_input"] == 0
        else f"the output of projection-head layer {cfg['classifier_input']}"
    )
    return (
        f"Exported from workdir `{os.path.abspath(source.workdir)}` at step {source.step} "
        f"(mode `{mode}`{converted}): {describe(cfg)}, projection head "
        f"`{cfg['proj_head_mode']}`"
        + (f" with {cfg['num_proj_layers']} layers" if cfg["proj_head_mode"] == "nonlinear" else "")
        + f" to {cfg['proj_out_dim']} dims, a {cfg['num_classes']}-class classifier on "
        f"{classifier}, batch-norm epsilon {cfg['bn_epsilon']:g}."
    )


INPUT_CONVENTION = (
    "Input: float32 images (N, 3, H, W), RGB in [0, 1], **no mean/std normalisation** "
    "(unlike torchvision's ImageNet weights), evaluated as the model was: ImageNet models at "
    "224 px (center crop of 0.875 of the shorter side, bicubic resize), CIFAR models at 32 px. "
    "The model is in eval mode: batch norm uses its running statistics."
)


def torch_readme(source: Source, cfg: Mapping[str, Any], directory: str) -> str:
    """README.md of a --format=torch export."""
    dim = feature_dim(cfg["resnet_depth"], cfg["width_multiplier"])
    return f"""# SimCLR model exported from simclr_jax (PyTorch module)

{_provenance(source, cfg)}

| file | what it is |
|---|---|
| `{MODULE_FILE}` | the model, a self-contained PyTorch module (`torch` + `safetensors`) |
| `{WEIGHTS_FILE}` | its `state_dict`, float32 |
| `{CONFIG_FILE}` | the architecture (`model`: the module's arguments) and where it came from |
| `README.md` | this file |

Load it in three lines:

```python
import sys; sys.path.insert(0, "{directory}")
import simclr_resnet
model = simclr_resnet.load("{directory}")  # float32, eval mode
```

`out = model(images)` gives `out["h"]` (N, {dim}) the encoder's pooled features, \
`out["z"]` the projection head's output (h when there is none), `out["logits"]` \
(N, {cfg["num_classes"]}) the classifier's and \
`out["hiddens"]` every head layer's output (`hiddens[0]` = h). Without the helper: \
`model = simclr_resnet.SimCLRResNet(json.load(open("{CONFIG_FILE}"))["model"])`, then \
`model.load_state_dict(safetensors.torch.load_file("{WEIGHTS_FILE}"))`.

{INPUT_CONVENTION}

The module performs the JAX model's operations one for one, TensorFlow's 'SAME' padding of the
stem max-pool included; simclr_jax's tests check that its h, z and logits equal the JAX model's
to 1e-5 of their largest magnitude (ResNet-18/50/101, 1x and 2x, with and without selective
kernels, CIFAR and ImageNet stems).
"""


def _head_code(cfg: Mapping[str, Any]) -> str:
    """The nn.Sequential that projection_head.safetensors loads into."""
    layers = {"none": 0, "linear": 1, "nonlinear": cfg["num_proj_layers"]}[cfg["proj_head_mode"]]
    dim = feature_dim(cfg["resnet_depth"], cfg["width_multiplier"])
    eps = f", eps={cfg['bn_epsilon']:g}" if cfg["bn_epsilon"] != TORCHVISION_BN_EPSILON else ""
    lines = []
    for j in range(1, layers + 1):
        out = cfg["proj_out_dim"] if j == layers else dim
        lines.append(f"nn.Linear({dim}, {out}, bias=False), nn.BatchNorm1d({out}{eps}),")
        if j < layers:
            lines.append("nn.ReLU(),")
        dim = out
    return "\n".join("    " + line for line in lines)


def torchvision_readme(
    source: Source, cfg: Mapping[str, Any], name: str, files: Mapping[str, str], directory: str
) -> str:
    """README.md of a --format=torchvision export."""
    depth, classes = cfg["resnet_depth"], cfg["num_classes"]
    rows = "\n".join(f"| `{f}` | {what} |" for f, what in files.items())
    fc = (
        f"`fc` holds the classifier ({classes} classes, on h)."
        if cfg["classifier_input"] == 0
        else (
            "The classifier reads projection-head layer "
            f"{cfg['classifier_input']}, not h, so it is in `{CLASSIFIER_FILE}` (an "
            "`nn.Linear`) and the backbone has no `fc`: set `model.fc = torch.nn.Identity()` "
            f"before loading and compute `classifier(head[:{3 * cfg['classifier_input']}](h))`."
        )
    )
    make = (
        f"torchvision.models.resnet{depth}(num_classes={classes})"
        if cfg["classifier_input"] == 0
        else f"torchvision.models.resnet{depth}()"
    )
    fc_line = "" if cfg["classifier_input"] == 0 else "model.fc = torch.nn.Identity()\n"
    k = cfg["classifier_input"]
    if k == 0:
        uses = (
            "classifier, model.fc = model.fc, nn.Identity()  # model(images) is now h\n"
            "h = model(images); z, logits = head(h), classifier(h)"
        )
    else:
        uses = (
            "h = model(images)  # model.fc is nn.Identity()\n"
            f"z, logits = head(h), classifier(head[:{3 * k}](h))  # classifier: {CLASSIFIER_FILE}"
        )
    head = ""
    if HEAD_FILE in files:
        head = f"""
The projection head (`{HEAD_FILE}`) is an `nn.Sequential`; its last batch norm has no bias in
the model (here a zero bias; freeze it to fine-tune as the model was):

```python
from torch import nn
head = nn.Sequential(
{_head_code(cfg)}
).eval()
head.load_state_dict(safetensors.torch.load_file("{directory}/{HEAD_FILE}"))
{uses}
```
"""
    eps_note = ""
    if cfg["bn_epsilon"] != TORCHVISION_BN_EPSILON:
        eps_note = (
            f"\nThe model's batch-norm epsilon {cfg['bn_epsilon']:g} is folded into the "
            "backbone's `running_var` (torchvision's is 1e-5), which gives the same output.\n"
        )
    return f"""# SimCLR model exported from simclr_jax (torchvision layout)

{_provenance(source, cfg)}

| file | what it is |
|---|---|
{rows}

Load it in three lines (strict: every tensor matches a torchvision parameter or buffer):

```python
import safetensors.torch, torch, torchvision
model = {make}.eval()
{fc_line}model.load_state_dict(safetensors.torch.load_file("{directory}/{name}.safetensors"))
```

or `torch.load("{directory}/{name}.pth")` in place of the safetensors file. {fc}
{head}{eps_note}
{INPUT_CONVENTION}

**Not quite the same network.** torchvision's stem max-pool (3x3, stride 2) pads one pixel on
each side; this model's pool pads TensorFlow's 'SAME' way, one pixel at the end only, when the
stem's output is even-sized (224 px input: 112 px maps). Every window is then one pixel off, and
h differs: measured with a converted ResNet-50 of simclr_jax's tests, by up to
{TORCHVISION_H_ERROR[224]:.1%} of h's largest value at 224 px and {TORCHVISION_H_ERROR[32]:.0%} at
32 px (simclr_jax's docs/checkpoints.md). For the exact model, after loading:

```python
model.maxpool = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.MaxPool2d(3, 2))
```

(exact for even-sized stem outputs, e.g. 224 px input; the pool follows a ReLU, so zero padding
equals -inf padding; on odd-sized ones both pools agree and the patch is not needed). Otherwise
the layers are the same: ResNet v1.5 (stride on the 3x3 conv), conv padding, batch norm.
"""


# ------------------------------------------------------------------ the export


def check_out_dir(out: str) -> None:
    """ExportError unless --out is a new or empty local directory."""
    if not out:
        raise ExportError("--out is empty; pass a new directory for the export")
    if "://" in out:
        raise ExportError(f"--out={out} is not local; export to a local directory and copy it")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"--out={out} exists and is not an empty directory; choose a new one")


def write_files(source: Source, directory: str, fmt: str, final: str | None = None) -> list[str]:
    """Writes the export's files into directory (which exists; the READMEs name `final`, where
    the files will be, default directory); returns their names."""
    final = os.path.abspath(final or directory)
    cfg = module_config(source.config)
    meta = {"source_workdir": os.path.abspath(source.workdir), "step": str(source.step)}
    state = torch_state_dict(source.variables)
    info = {
        "model": cfg,
        "format": fmt,
        "source_workdir": os.path.abspath(source.workdir),
        "step": source.step,
        "mode": source.config.get("mode"),
        "image_size": int(source.config.data.image_size),
    }
    if fmt == "torch":
        _copy_module_file(directory)
        save_safetensors(os.path.join(directory, WEIGHTS_FILE), state, meta)
        readme = torch_readme(source, cfg, final)
    else:
        name = f"resnet{cfg['resnet_depth']}"
        backbone, head, classifier = torchvision_state_dicts(state, cfg)
        files = {
            f"{name}.safetensors": f"`torchvision.models.{name}` state_dict, float32",
            f"{name}.pth": "the same, as `torch.save` writes it",
        }
        save_safetensors(os.path.join(directory, f"{name}.safetensors"), backbone, meta)
        save_pth(os.path.join(directory, f"{name}.pth"), backbone)
        if head:
            save_safetensors(os.path.join(directory, HEAD_FILE), head, meta)
            files[HEAD_FILE] = "the projection head, an `nn.Sequential` state_dict"
        if classifier:
            save_safetensors(os.path.join(directory, CLASSIFIER_FILE), classifier, meta)
            files[CLASSIFIER_FILE] = "the classifier, an `nn.Linear` state_dict"
        files[CONFIG_FILE] = "the architecture and where it came from"
        files["README.md"] = "this file"
        readme = torchvision_readme(source, cfg, name, files, final)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(readme)
    return sorted(os.listdir(directory))


def export(workdir: str, out: str, fmt: str = "torch", step: int = -1) -> list[str]:
    """Checks everything that can be checked before reading weights, restores the checkpoint
    and writes the export into out (new or empty); returns the file names written."""
    check_out_dir(out)
    if fmt not in FORMATS:
        check_format(fmt, {})
    manager, step, config = open_workdir(workdir, step)
    check_format(fmt, module_config(config))
    source = Source(config, restore(manager, step, config), workdir, step)
    out = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.exporting-{os.getpid()}")
    try:
        os.makedirs(tmp)
        files = write_files(source, tmp, fmt, out)
        check_out_dir(out)  # nothing appeared there meanwhile
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"simclr_jax.export: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def main(argv: list[str] | None = None) -> int:
    """Command line; bad input is one stderr line and exit status 2, with nothing written."""
    parser = _Parser(prog="python -m simclr_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="workdir (or converted checkpoint)")
    parser.add_argument("--out", required=True, help="new or empty output directory")
    parser.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    parser.add_argument("--format", default="torch", help=" | ".join(FORMATS))
    args = parser.parse_args(argv)
    # Orbax warns that a read-only manager is read-only; only the export's own errors matter.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        files = export(args.workdir, args.out, args.format, args.step)
    except ValueError as e:  # ExportError, or a checkpoint that does not match its config
        print(f"simclr_jax.export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        absl_logger.setLevel(level)
    print(f"Wrote {args.out} ({args.format}): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ExportError",
    "FORMATS",
    "Source",
    "export",
    "module_config",
    "read_source",
    "save_pth",
    "torch_state_dict",
    "torchvision_state_dicts",
    "write_files",
]
