"""SimCLR ResNet (v1/v2) in PyTorch: the module file `python -m simclr_jax.export --format=torch`
copies into its output directory as simclr_resnet.py, beside model.safetensors and config.json.

Self-contained (torch and safetensors only). Load an export in three lines:

    import sys; sys.path.insert(0, EXPORT_DIR)
    import simclr_resnet
    model = simclr_resnet.load(EXPORT_DIR)  # float32, eval mode

`model(images)` takes (N, 3, H, W) RGB in [0, 1] (no mean/std normalisation) and returns a dict:
h (N, C) the pooled encoder output, z the projection head's output (h when there is no head),
logits the classifier's, and hiddens, the head's layer outputs (hiddens[0] = h).

The layers and their names follow simclr_jax/models (state_dict key = the Flax parameter path,
'/' -> '.', kernel/scale -> weight, mean/var -> running_mean/running_var), and every operation
is the JAX model's: fixed conv padding (k - 1) // 2, the 3x3/2 stem max-pool with TensorFlow's
'SAME' padding (one row/column at the end of even-sized maps, torchvision pads both sides),
ResNet-D shortcuts (2x2 average pool before the 1x1 conv) and stem with selective kernels,
selective-kernel convs, squeeze-excitation, the CIFAR stem (3x3/1, no pool), projection head
layers whose last batch norm has no bias (kept at zero and frozen here).
This file is not imported by simclr_jax; the tests run it against the JAX model.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STAGE_SIZES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
SK_MIN_DIM = 32
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class Norm:
    """Batch-norm constants shared by every layer (torch momentum = 1 - Flax momentum)."""

    def __init__(self, epsilon: float, momentum: float) -> None:
        self.epsilon = epsilon
        self.momentum = momentum

    def bn2d(self, channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, eps=self.epsilon, momentum=self.momentum)


class ConvBN(nn.Module):
    """Conv (no bias, padding (k - 1) // 2) -> BatchNorm -> optional ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, norm: Norm, relu: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=False)
        self.bn = norm.bn2d(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3/2 max-pool with TensorFlow's 'SAME' padding: (0, 1) on even sizes, (1, 1) on odd."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad lists the last dimension first
        total = max(((size + 1) // 2 - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, 2)


def avg_pool_resnet_d(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The ResNet-D shortcut's 2x2 average pool: strided, one zero row/column at the end that
    counts in the mean; or stride 1 'SAME', where the padding does not count."""
    padded = F.pad(x, (0, 1, 0, 1))
    if stride > 1:
        return F.avg_pool2d(padded, 2, stride)
    sums = F.avg_pool2d(padded, 2, 1, divisor_override=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(x[:, :1]), (0, 1, 0, 1)), 2, 1, divisor_override=1)
    return sums / counts


class Shortcut(nn.Module):
    """Projection shortcut: (ResNet-D: 2x2 average pool, then) 1x1 conv + BN, no ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, resnet_d: bool, norm: Norm) -> None:
        super().__init__()
        self.stride = stride
        self.resnet_d = resnet_d
        self.conv = nn.Conv2d(cin, cout, 1, 1 if resnet_d else stride, bias=False)
        self.bn = norm.bn2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resnet_d:
            x = avg_pool_resnet_d(x, self.stride)
        return self.bn(self.conv(x))


class SelectiveKernelConv(nn.Module):
    """SimCLRv2 selective-kernel 3x3 conv: two streams mixed by a softmax over global context."""

    def __init__(self, cin: int, features: int, stride: int, sk_ratio: float, norm: Norm) -> None:
        super().__init__()
        mid = max(int(features * sk_ratio), SK_MIN_DIM)
        self.split_conv = ConvBN(cin, 2 * features, 3, stride, norm)
        self.reduce = ConvBN(features, mid, 1, 1, norm)
        self.expand = nn.Conv2d(mid, 2 * features, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.split_conv(x), 2, dim=1)
        context = (a + b).mean(dim=(2, 3), keepdim=True)
        mixing = torch.softmax(torch.stack(torch.chunk(self.expand(self.reduce(context)), 2, 1)), 0)
        return a * mixing[0] + b * mixing[1]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.expand(F.relu(self.reduce(gates)))) * x


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first); relu(residual + shortcut)."""

    def __init__(
        self, cin: int, filters: int, stride: int, projection: bool, cfg: dict, norm: Norm
    ) -> None:
        super().__init__()
        resnet_d = cfg["sk_ratio"] > 0
        if projection:
            self.shortcut = Shortcut(cin, filters, stride, resnet_d, norm)
        self.conv1 = ConvBN(cin, filters, 3, stride, norm)
        self.conv2 = ConvBN(filters, filters, 3, 1, norm, relu=False)
        if cfg["se_ratio"] > 0:
            self.se = SqueezeExcite(filters, max(1, int(filters * cfg["se_ratio"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        y = self.conv2(self.conv1(x))
        if hasattr(self, "se"):
            y = self.se(y)
        return F.relu(y + shortcut)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided; selective kernels when sk_ratio > 0) -> 1x1 to 4 * filters."""

    def __init__(
        self, cin: int, filters: int, stride: int, projection: bool, cfg: dict, norm: Norm
    ) -> None:
        super().__init__()
        sk_ratio = cfg["sk_ratio"]
        if projection:
            self.shortcut = Shortcut(cin, 4 * filters, stride, sk_ratio > 0, norm)
        self.conv1 = ConvBN(cin, filters, 1, 1, norm)
        if sk_ratio > 0:
            self.sk_conv = SelectiveKernelConv(filters, filters, stride, sk_ratio, norm)
        else:
            self.conv2 = ConvBN(filters, filters, 3, stride, norm)
        self.conv3 = ConvBN(filters, 4 * filters, 1, 1, norm, relu=False)
        if cfg["se_ratio"] > 0:
            self.se = SqueezeExcite(4 * filters, max(1, int(filters * cfg["se_ratio"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        y = self.conv1(x)
        y = self.sk_conv(y) if hasattr(self, "sk_conv") else self.conv2(y)
        y = self.conv3(y)
        if hasattr(self, "se"):
            y = self.se(y)
        return F.relu(y + shortcut)


class Stem(nn.Module):
    """7x7/2 conv + 3x3/2 max-pool; ResNet-D (with selective kernels) three 3x3 convs + pool;
    or the CIFAR stem, one 3x3/1 conv and no pool."""

    def __init__(self, width: int, cifar_stem: bool, resnet_d: bool, norm: Norm) -> None:
        super().__init__()
        self.pool = not cifar_stem
        if cifar_stem:
            self.conv1 = ConvBN(3, width, 3, 1, norm)
        elif resnet_d:
            self.conv1 = ConvBN(3, width // 2, 3, 2, norm)
            self.conv2 = ConvBN(width // 2, width // 2, 3, 1, norm)
            self.conv3 = ConvBN(width // 2, width, 3, 1, norm)
        else:
            self.conv1 = ConvBN(3, width, 7, 2, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if hasattr(self, "conv2"):
            x = self.conv3(self.conv2(x))
        return max_pool_same(x) if self.pool else x


class ResNet(nn.Module):
    """The encoder: images (N, 3, H, W) in [0, 1] -> globally averaged features h (N, C)."""

    def __init__(self, cfg: dict, norm: Norm) -> None:
        super().__init__()
        kind, sizes = STAGE_SIZES[cfg["resnet_depth"]]
        block = BasicBlock if kind == "basic" else BottleneckBlock
        expansion = 1 if kind == "basic" else 4
        width = 64 * cfg["width_multiplier"]
        self.stem = Stem(width, cfg["cifar_stem"], cfg["sk_ratio"] > 0, norm)
        cin = width
        for i, num_blocks in enumerate(sizes, start=1):
            filters = width * 2 ** (i - 1)
            blocks = OrderedDict()
            for j in range(num_blocks):
                stride = 2 if i > 1 and j == 0 else 1
                blocks[f"block{j}"] = block(cin, filters, stride, j == 0, cfg, norm)
                cin = filters * expansion
            setattr(self, f"stage{i}", nn.Sequential(blocks))
        self.num_features = cin

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
        return x.mean(dim=(2, 3))


class DenseBN(nn.Module):
    """Linear without bias -> BatchNorm1d (center=False: its bias stays zero and frozen)."""

    def __init__(self, cin: int, cout: int, center: bool, norm: Norm) -> None:
        super().__init__()
        self.dense = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout, eps=norm.epsilon, momentum=norm.momentum)
        if not center:
            nn.init.zeros_(self.bn.bias)
            self.bn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.dense(x))


class ProjectionHead(nn.Module):
    """g(h): layer1..layerL; middle layers keep the width, BN and ReLU; the last maps to out_dim
    with a bias-free BN and no ReLU ('linear': that layer alone; 'none': no layers)."""

    def __init__(self, cin: int, cfg: dict, norm: Norm) -> None:
        super().__init__()
        mode = cfg["proj_head_mode"]
        self.num_layers = {"none": 0, "linear": 1, "nonlinear": cfg["num_proj_layers"]}[mode]
        for j in range(1, self.num_layers + 1):
            last = j == self.num_layers
            cout = cfg["proj_out_dim"] if last else cin
            setattr(self, f"layer{j}", DenseBN(cin, cout, not last, norm))
            cin = cout
        self.out_dim = cin

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """[h, output of layer 1, ..., z]."""
        hiddens = [h]
        for j in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{j}")(hiddens[-1])
            hiddens.append(x if j == self.num_layers else F.relu(x))
        return hiddens


class SimCLRResNet(nn.Module):
    """Encoder, projection head and the linear classifier (on hiddens[classifier_input])."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = dict(cfg)
        norm = Norm(float(cfg["bn_epsilon"]), 1.0 - float(cfg["bn_momentum"]))
        self.encoder = ResNet(cfg, norm)
        self.projection_head = ProjectionHead(self.encoder.num_features, cfg, norm)
        self.classifier_input = int(cfg["classifier_input"])
        widths = [self.encoder.num_features]
        for j in range(1, self.projection_head.num_layers + 1):
            widths.append(getattr(self.projection_head, f"layer{j}").dense.out_features)
        self.classifier = nn.Linear(widths[self.classifier_input], cfg["num_classes"])

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """images (N, 3, H, W) RGB in [0, 1] -> dict(h, z, logits, hiddens)."""
        h = self.encoder(images)
        hiddens = self.projection_head(h)
        logits = self.classifier(hiddens[self.classifier_input])
        return {"h": h, "z": hiddens[-1], "logits": logits, "hiddens": hiddens}


def load(directory: str, device: str = "cpu") -> SimCLRResNet:
    """The exported model with its weights (strict: every tensor must match), in eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = json.load(f)["model"]
    model = SimCLRResNet(cfg)
    model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE), device=device))
    return model.to(device).eval()
