"""The cross-device collectives of a compiled TPU program, read from its HLO text."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
# Synchronous ops, and the op of an async pair that carries the result shape.
_COLLECTIVE_OPS = {
    "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce",
    "all-gather": "all-gather",
    "all-gather-done": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-done": "collective-permute",
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


def parse_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Every cross-device collective of a compiled HLO module: kind, result shapes, bytes.

    The TPU compiler writes a reduce-scatter as an all-reduce inside a computation named
    all-reduce-scatter (then keeps only this device's part); it is counted as reduce-scatter,
    with the bytes it reduces."""
    found, computation = [], ""
    for raw in hlo_text.splitlines():
        line = _COMMENT.sub("", raw)
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.search(line)
        if not match or match.group(2) not in _COLLECTIVE_OPS:
            continue
        kind = _COLLECTIVE_OPS[match.group(2)]
        if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
            kind = "reduce-scatter"
        shapes = [
            (dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _SHAPE.findall(match.group(1))
        ]
        found.append(
            {
                "kind": kind,
                "shapes": [f"{dtype}[{','.join(map(str, dims))}]" for dtype, dims in shapes],
                "dims": [list(dims) for _, dims in shapes],
                "bytes": sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes),
            }
        )
    return found


def sum_by_kind(collectives: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Bytes per collective kind."""
    totals: dict[str, int] = {}
    for c in collectives:
        totals[c["kind"]] = totals.get(c["kind"], 0) + c["bytes"]
    return totals
