"""The cross-device collectives of a compiled TPU program, read from its HLO text, and which
network each one crosses: ICI inside a slice, DCN between the slices of a multislice."""

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
# Device groups: listed ({{0,1},{2,3}}), XLA's iota form ([2,4]<=[4,2]T(1,0): iota over the
# second shape, transposed, reshaped to the first; rows are groups) or permute pairs.
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?\s*)*)\}")


def device_groups(instruction: str) -> list[list[int]] | None:
    """The groups of devices (positions in the program's device assignment) one collective
    instruction runs over; None when it names none (every device is one group)."""
    iota = _GROUPS_IOTA.search(instruction)
    if iota:
        dims = [int(x) for x in iota.group(1).split(",")]
        shape = [int(x) for x in iota.group(2).split(",")]
        order = [int(x) for x in iota.group(3).split(",")] if iota.group(3) else None
        ids = _transpose(list(range(math.prod(shape))), shape, order)
        size = math.prod(dims[1:])
        return [ids[i : i + size] for i in range(0, len(ids), size)]
    listed = _GROUPS_LIST.search(instruction)
    if listed:
        groups = [
            [int(x) for x in group.split(",") if x.strip()]
            for group in re.findall(r"\{([\d,\s]*)\}", listed.group(1))
        ]
        return [g for g in groups if g] or None
    pairs = _PAIRS.search(instruction)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
    return None


def _transpose(flat: list[int], shape: list[int], order: list[int] | None) -> list[int]:
    """Row-major elements of `flat` viewed as `shape` and transposed by `order`."""
    if not order:
        return flat
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    out_shape = [shape[axis] for axis in order]
    out = []
    for index in range(len(flat)):
        position, rest = 0, index
        for axis, size in zip(reversed(order), reversed(out_shape), strict=True):
            rest, coordinate = divmod(rest, size)
            position += coordinate * strides[axis]
        out.append(flat[position])
    return out


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def parse_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Every cross-device collective of a compiled HLO module: kind, result shapes, bytes.

    The TPU compiler writes a reduce-scatter as an all-reduce inside a computation named
    all-reduce-scatter (then keeps only this device's part); it is counted as reduce-scatter,
    with the bytes it reduces.

    For a multislice, libtpu compiles one slice's program: its collectives run over that
    slice's devices (ICI), and each collective's cross-slice stage is a host transfer to the
    megascale runtime (a `send` with `_xla_megascale_transfer_type` ALL_REDUCE, ALL_GATHER,
    ...), which goes over DCN: counted as that kind, network 'dcn', with the bytes sent."""
    found, computation = [], ""
    started: dict[str, list[list[int]] | None] = {}  # async -start: its groups, by name
    for raw in hlo_text.splitlines():
        line = _COMMENT.sub("", raw)
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.search(line)
        megascale = _MEGASCALE.search(line)
        if match and match.group(2) == "send" and megascale:
            dtype, dims = _SHAPE.findall(match.group(1))[0]  # (buffer, context, token)
            shape = tuple(int(d) for d in dims.split(",") if d)
            found.append(
                {
                    "kind": megascale.group(1).lower().replace("_", "-"),
                    "shapes": [f"{dtype}[{','.join(map(str, shape))}]"],
                    "dims": [list(shape)],
                    "bytes": _DTYPE_BYTES[dtype] * math.prod(shape),
                    "groups": None,
                    "network": "dcn",
                }
            )
            continue
        if match and match.group(2).endswith("-start"):
            started[line.split("=")[0].split()[-1]] = device_groups(line)
        if not match or match.group(2) not in _COLLECTIVE_OPS:
            continue
        groups = device_groups(line)
        if match.group(2).endswith("-done"):  # the groups are on the -start it waits for
            operand = re.search(r"-done\(.*?(%[\w.\-]+)", line)
            groups = started.get(operand.group(1)) if operand else None
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
                "groups": groups,
            }
        )
    return found


# Bytes one device sends over DCN per byte of a collective's result, for a group spanning n
# slices (ring algorithms between slices): an estimate, not what the runtime schedules.
_DCN_FACTOR = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,  # counted with the bytes it reduces
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}


def by_network(collectives: Sequence[dict[str, Any]], devices: Sequence[Any]) -> None:
    """Marks each collective 'ici' or 'dcn' (in place): DCN when it is a megascale transfer
    (parse_collectives), or when one of its groups holds devices of more than one slice
    (`slice_index`; `devices` in the program's device assignment order, the mesh's); with
    `slices` (how many slices it spans) and `dcn_bytes`, the estimated bytes one device sends
    between slices."""
    slice_of = [getattr(d, "slice_index", 0) or 0 for d in devices]
    for c in collectives:
        if c.get("network") == "dcn":  # a megascale transfer: between all the slices
            spans = max(len(set(slice_of)), 2)
        else:
            groups = c.get("groups") or [list(range(len(devices)))]
            spans = max(len({slice_of[i] for i in g if i < len(slice_of)}) for g in groups)
        c["network"] = "dcn" if spans > 1 else "ici"
        c["slices"] = spans
        c["dcn_bytes"] = _DCN_FACTOR[c["kind"]](spans) * c["bytes"] if spans > 1 else 0.0


def sum_by_kind(
    collectives: Sequence[dict[str, Any]], network: str | None = None
) -> dict[str, int]:
    """Bytes per collective kind (of one network's collectives, 'ici' or 'dcn', if given)."""
    totals: dict[str, int] = {}
    for c in collectives:
        if network is None or c.get("network") == network:
            totals[c["kind"]] = totals.get(c["kind"], 0) + c["bytes"]
    return totals
