"""Per-conv timings on this machine: forward, input gradient, and the kernel gradient as XLA
computes it and as models/conv.py does (im2col matmul), for the conv shapes of ResNet-18 with
the CIFAR stem at batch 128 x 2 views (and the R50 224 px stem), beside a large matmul.

    python benchmarks/bench_conv.py [--batch 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import median_time  # noqa: E402
from simclr_jax.models import conv  # noqa: E402

# name -> (spatial size, in channels, out channels, kernel, stride); batch from --batch.
SHAPES = {
    "r18 cifar stem 3x3 3->64 @32": (32, 3, 64, 3, 1),
    "r18 stage1 3x3 64->64 @32": (32, 64, 64, 3, 1),
    "r18 stage2 3x3/2 64->128 @32": (32, 64, 128, 3, 2),
    "r18 stage2 3x3 128->128 @16": (16, 128, 128, 3, 1),
    "r18 stage3 3x3 256->256 @8": (8, 256, 256, 3, 1),
    "r18 stage4 3x3 512->512 @4": (4, 512, 512, 3, 1),
}


def seconds(fn, args: tuple, repeats: int) -> float:
    return median_time(lambda: jax.block_until_ready(fn(*args)), repeats)


def time_conv(batch: int, size: int, cin: int, cout: int, kernel: int, stride: int, repeats: int):
    """GFLOP/s of forward, input gradient, XLA kernel gradient, im2col kernel gradient."""
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout)) * 0.05
    before = (kernel - 1) // 2
    pads = ((before, kernel - 1 - before),) * 2
    forward = jax.jit(lambda x, w: conv._native(x, w, (stride, stride), pads))
    dy = jnp.ones_like(forward(x, w))
    flops = 2 * dy.size * kernel * kernel * cin
    input_grad = jax.jit(lambda x, dy: jax.vjp(lambda x: forward(x, w), x)[1](dy)[0])
    xla_kernel_grad = jax.jit(lambda x, dy: jax.vjp(lambda w: forward(x, w), w)[1](dy)[0])
    im2col_kernel_grad = jax.jit(
        lambda x, dy: conv.kernel_grad_im2col(x, dy, w.shape, (stride, stride), pads)
    )
    cases = [(forward, (x, w)), (input_grad, (x, dy))]
    cases += [(xla_kernel_grad, (x, dy)), (im2col_kernel_grad, (x, dy))]
    return [flops / seconds(fn, args, repeats) / 1e9 for fn, args in cases]


def matmul_gflops(repeats: int, n: int = 4096) -> float:
    """float32 n x n x n matmul rate: the machine's practical peak under XLA."""
    a = jnp.ones((n, n), jnp.float32)
    return 2 * n**3 / seconds(jax.jit(jnp.matmul), (a, a), repeats) / 1e9


def main() -> None:
    """Prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="images per conv (2 x 128 views)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}; load average before: {os.getloadavg()}")
    print(f"float32 4096^3 matmul: {matmul_gflops(args.repeats):.0f} GFLOP/s\n")
    columns = "forward | input grad | kernel grad, XLA | kernel grad, im2col"
    print(f"| conv (batch {args.batch}) | {columns} |")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        rates = time_conv(args.batch, *shape, repeats=args.repeats)
        print(f"| {name} | " + " | ".join(f"{r:.0f} GFLOP/s" for r in rates) + " |", flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
