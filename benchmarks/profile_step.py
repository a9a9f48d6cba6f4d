"""Where one warm SimCLR step spends its time, per kind of op: this project's step (jax.profiler
trace of the trainer's step) beside PyTorch's (torch.profiler, NCHW and channels-last).

    python benchmarks/profile_step.py [--works r18_32] [--batch 32] [--impls jax,torch,torch_cl]

The step of each side is compare_peers.py's (the same work: ResNet, 3-layer head, probe,
NT-Xent, float32); every (work, implementation) runs in a fresh subprocess. One table per work:
milliseconds and % of the traced step per category. The step total is the host's wall time of
the traced step (profiler on, so a little above an untraced step); time in which no traced op
runs is its own row: PyTorch's Python; on XLA's side the runtime between thunks and the
asynchronous part of plain `dot` thunks (see gaps_after), which a line under the table splits
by the op that ended just before.

How the ops are counted:
- XLA: the trace's events on XLA's CPU threads are HLO instructions of the compiled step
  (entry and while-loop bodies), named as in `compiled.as_text()`. Several run at once on
  different threads, so wall time is split: every instant of the step is shared equally among
  the ops running then, and the categories add up to the step. Each instruction is put in a
  category by the rules of `xla_category` (from its opcode, the ops a fusion contains and the
  jax name stack in its metadata).
- PyTorch: self CPU time of every profiler event (all run on the calling thread; oneDNN's
  worker threads are inside their op's span), put in a category by op name (`torch_category`).
  PyTorch computes a conv's input and kernel gradients in one op (aten::convolution_backward),
  so only their sum is comparable: the "conv backward (input + kernel)" row.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

from compare_peers import (  # noqa: E402
    IMPLS,
    PEERS_MISSING,
    WORKS,
    in_subprocess,
    machine,
    works_and_impls,
)

CATEGORIES = (
    "conv forward",
    "conv input grad",
    "conv kernel grad",
    "conv backward (input + kernel)",
    "batch norm (fwd+bwd)",
    "elementwise/other fusions",
    "matmul/dense",
    "optimizer",
    "loss",
    "copies/transposes",
    "other",
    "no op running",
)
# Ops that only move or reshape data: a fusion made only of these is a copy.
DATA_MOVEMENT = {
    "bitcast", "broadcast", "concatenate", "constant", "copy", "dynamic-slice",
    "dynamic-update-slice", "get-tuple-element", "iota", "pad", "parameter", "reshape",
    "reverse", "slice", "transpose", "tuple",
}  # fmt: skip
CONTAINERS = {"while", "call", "conditional"}  # their bodies' ops are traced on their own

# ---------------------------------------------------------------- XLA: HLO text -> categories

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9_-]*)\((.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """(instruction name -> fields, computation name -> its instructions) of an HLO module.
    Fields: op (opcode), shape, op_name (jax name stack), calls (fused or body computations),
    window / dim_labels (convolutions), parent (computation)."""
    instructions, computations, parent = {}, collections.defaultdict(list), ""
    for line in text.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            if line.endswith("{") and COMPUTATION.match(line):
                parent = COMPUTATION.match(line).group(1)
            continue
        name, shape, op, rest = match.groups()
        instruction = {
            "op": op, "shape": shape, "parent": parent,
            "op_name": _field(r'op_name="([^"]*)"', rest),
            "calls": re.findall(r"(?:calls|body|to_apply)=%([\w.-]+)", rest),
            "window": _field(r"window=\{size=([\dx]+)", rest),
            "dim_labels": _field(r"dim_labels=(\S+?),", rest),
        }  # fmt: skip
        instructions[name] = instruction
        computations[parent].append(instruction)
    return instructions, computations


def _field(pattern: str, text: str) -> str:
    """The first group of pattern's first match in text, or ''."""
    match = re.search(pattern, text)
    return match.group(1) if match else ""


def contents(instruction: dict, computations: dict[str, list[dict]]) -> list[dict]:
    """The instruction and every instruction of the computations it fuses (not loop bodies)."""
    if instruction["op"] in CONTAINERS:
        return [instruction]
    found = [instruction]
    for called in instruction["calls"]:
        for inner in computations.get(called, []):
            found += contents(inner, computations)
    return found


def loop_scopes(instructions: dict[str, dict]) -> dict[str, str]:
    """Body computation -> op_name of the while that runs it (body ops often have none)."""
    return {
        called: i["op_name"]
        for i in instructions.values()
        if i["op"] == "while"
        for called in i["calls"]
    }


def conv_category(conv: dict) -> str:
    """Forward unless the name stack says backward ('transpose(jvp(SimCLR))'). A backward conv
    whose output is spatially smaller than its window computes a kernel gradient (window =
    the output gradient's map, output = the kernel); otherwise it is an input gradient."""
    if "transpose(jvp(SimCLR" not in conv["op_name"]:
        return "conv forward"
    out_labels = conv["dim_labels"].split("->")[-1]
    dims = [int(d) for d in re.findall(r"\d+", conv["shape"].split("{")[0])]
    window = [int(w) for w in conv["window"].split("x")] if conv["window"] else []
    spatial = [dims[out_labels.index(str(k))] for k in range(len(window))]
    smaller = window and all(s < w for s, w in zip(spatial, window, strict=True))
    return "conv kernel grad" if smaller else "conv input grad"


def xla_category(instruction: dict, computations: dict, scopes: dict[str, str]) -> str:
    """One HLO instruction's category; the first rule that matches wins."""
    ops = contents(instruction, computations)
    # The name stack: the instruction's own, else one inside it, else its loop's.
    name = next((i["op_name"] for i in ops if i["op_name"]), "") or scopes.get(
        instruction["parent"], ""
    )
    convs = [i for i in ops if i["op"] == "convolution"]
    if convs:
        return conv_category(convs[0])
    # models/conv.py's im2col kernel gradient: every backward op in a conv's scope that is not
    # part of the input gradient (named '.../conv/transpose(jvp())/...'): the padded input
    # (XLA fuses the forward's BN + ReLU into that pad, recomputing them), the lax.scan and its
    # body (patch slices, concatenation, the patches^T @ dy dot), the final sum.
    backward = "transpose(jvp(SimCLR" in name
    if backward and "/conv/" in name and "/conv/transpose(jvp())" not in name:
        return "conv kernel grad"
    if any(i["op"] == "dot" for i in ops):
        if "SimCLR" in name:  # model dots: the head's and probe's Dense layers
            return "conv kernel grad" if "/conv/" in name else "matmul/dense"
        return "loss" if "jvp(" in name else "optimizer"
    if all(i["op"] in DATA_MOVEMENT or i is instruction and i["op"] == "fusion" for i in ops):
        return "copies/transposes"  # layout copies, kernel reversal, padding
    if "SimCLR" in name:  # the model; BatchNorm layers are all named 'bn'
        return "batch norm (fwd+bwd)" if "/bn/" in name else "elementwise/other fusions"
    if "jvp(" in name:  # differentiated but outside the model: NT-Xent and the probe's loss
        return "loss"
    if name.startswith("jit("):  # in the step, after the gradient: LARS, norms, the schedule
        return "optimizer"
    return "other"  # XLA-made ops with no name stack, collectives


def share_wall_time(spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Seconds per category when every instant is split equally among the spans running then
    (ops on several threads at once); the result sums to the time any span runs."""
    edges = sorted([(s, 1, c) for s, _, c in spans] + [(e, -1, c) for _, e, c in spans])
    running, totals, last = collections.Counter(), collections.Counter(), None
    for time_s, change, category in edges:
        active = sum(running.values())
        if last is not None and active:
            for name, count in running.items():
                totals[name] += (time_s - last) * count / active
        running[category] += change
        last = time_s
    return dict(totals)


def gaps_after(spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Seconds in which no span runs, per category of the span that ended last before. XLA:CPU
    runs a plain `dot` (Eigen) asynchronously: its event covers the launch, the product is
    computed afterwards with no event, so that time shows up as a gap right after the dot
    (e.g. in the im2col scan, a 1024x576 @ 1024x64 dot's event lasts ~0.1 ms, the gap after it
    ~0.55 ms). Other gaps are the runtime handing ops between threads."""
    gaps, reached, last = collections.Counter(), None, ""
    for start, end, category in sorted(spans):
        if reached is not None and start > reached:
            gaps[last] += start - reached
        if reached is None or end > reached:
            reached, last = end, category
    return dict(gaps)


def xla_trace_spans(trace_dir: str, instructions: dict) -> list[tuple[float, float, str]]:
    """(start s, end s, instruction name) of every HLO instruction event on XLA's threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF ships the XSpace proto

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    space = xplane_pb2.XSpace()
    space.ParseFromString(pathlib.Path(path).read_bytes())
    spans = []
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name in instructions and instructions[name]["op"] not in CONTAINERS:
                    start = (line.timestamp_ns * 1000 + event.offset_ps) / 1e12
                    spans.append((start, start + event.duration_ps / 1e12, name))
    return spans


def categorize_xla(hlo_text: str, trace_dir: str) -> tuple[dict[str, float], int, dict]:
    """(seconds per category of the traced XLA step, wall time shared among concurrent ops;
    number of op executions traced; gaps_after)."""
    instructions, computations = parse_hlo(hlo_text)
    scopes = loop_scopes(instructions)
    spans = [
        (start, end, xla_category(instructions[name], computations, scopes))
        for start, end, name in xla_trace_spans(trace_dir, instructions)
    ]
    return share_wall_time(spans), len(spans), gaps_after(spans)


def trace_step(compiled: Any, state: Any, batch_arrays: Any) -> tuple[float, str]:
    """(host wall seconds, trace folder) of one compiled step traced after two warm-up steps."""
    import jax

    for _ in range(2):  # first-call allocation, thread pools
        state, metrics = compiled(state, batch_arrays)
        jax.block_until_ready(metrics)
    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    step_s = time.perf_counter() - start
    jax.profiler.stop_trace()
    return step_s, trace_dir


def jax_profile(work: str, batch: int) -> dict[str, Any]:
    """Traces one warm step of the trainer's step (built as compare_peers.jax_step builds it)."""
    from bench_step import build_config, build_step, synthetic_batches

    from simclr_jax import parallel

    config = build_config(work, batch, "auto")
    mesh = parallel.create_mesh()
    state, step = build_step(config, mesh)
    batch_arrays = next(synthetic_batches(config, mesh))
    compiled = step.lower(state, batch_arrays).compile()
    step_s, trace_dir = trace_step(compiled, state, batch_arrays)
    seconds, ops, gaps = categorize_xla(compiled.as_text(), trace_dir)
    return {"step_s": step_s, "seconds": seconds, "ops": ops, "gaps": gaps}


# ---------------------------------------------------------------- PyTorch: op names -> categories

TORCH_RULES = (  # (category, regex on the aten op name), first match wins
    ("conv backward (input + kernel)", r"^aten::convolution_backward"),
    ("conv forward", r"^aten::.*conv"),
    ("batch norm (fwd+bwd)", r"^aten::.*batch_norm"),
    ("loss", r"^aten::.*(softmax|nll_loss|cross_entropy|masked_fill|linalg_vector_norm)"),
    ("matmul/dense", r"^aten::(mm|addmm|bmm|matmul|linear)$"),
    ("copies/transposes", r"^aten::(copy_|contiguous|clone|to|_to_copy|t|transpose|permute)$"),
    ("elementwise/other fusions", r"^aten::"),  # add, relu (clamp_min_), threshold_backward, ...
)


def torch_category(event: Any) -> str:
    """Category of one torch.profiler event: under Optimizer.* (zero_grad, step) it is the
    optimizer; else by the aten op name (TORCH_RULES: 'loss' by the names of the loss's own
    ops, an approximation); autograd nodes and engine events are 'other'."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    for category, pattern in TORCH_RULES:
        if re.search(pattern, event.name):
            return category
    return "other"


def torch_profile(work: str, batch: int, channels_last: bool) -> dict[str, Any]:
    """Profiles one warm step of compare_peers.torch_step."""
    import torch
    from compare_peers import torch_step

    run = torch_step(work, batch, channels_last)
    for _ in range(2):
        run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        run()
        step_s = time.perf_counter() - start
    seconds, events = collections.Counter(), profile.events()
    for event in events:
        seconds[torch_category(event)] += event.self_cpu_time_total / 1e6
    return {"step_s": step_s, "seconds": dict(seconds), "ops": len(events)}


# ---------------------------------------------------------------- driver


def profile(impl: str, work: str, batch: int) -> dict[str, Any]:
    """One implementation's categories, with the untraced remainder as 'no op running'."""
    if impl == "jax":
        result = jax_profile(work, batch)
    else:
        result = torch_profile(work, batch, channels_last=impl == "torch_cl")
    seconds = result["seconds"]
    seconds["no op running"] = max(0.0, result["step_s"] - sum(seconds.values()))
    if impl == "jax":  # the sum PyTorch's one backward op is compared with (not added again)
        seconds["conv backward (input + kernel)"] = sum(
            seconds.get(c, 0.0) for c in ("conv input grad", "conv kernel grad")
        )
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: ms and % of the step per category, one column per implementation."""
    impls = list(results)
    lines = [
        "| category | " + " | ".join(f"{impl} ms | {impl} %" for impl in impls) + " |",
        "|---|" + "---|---|" * len(impls),
    ]
    for category in CATEGORIES:
        cells = []
        for impl in impls:
            seconds, total = results[impl]["seconds"], results[impl]["step_s"]
            value = seconds.get(category)
            cells += ["-", "-"] if value is None else [f"{value * 1e3:.0f}", f"{value / total:.0%}"]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    totals = [f"**{results[impl]['step_s'] * 1e3:.0f}** | 100%" for impl in impls]
    lines.append("| step (host wall time, traced) | " + " | ".join(totals) + " |")
    counts = [f"{results[impl]['ops']:,} | " for impl in impls]
    lines.append(
        "| op executions traced (XLA thunks; PyTorch events, nested) | " + " | ".join(counts) + " |"
    )
    return "\n".join(lines)


def main() -> None:
    """Parses flags, profiles each (work, implementation) in a fresh process, prints tables."""
    import json

    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        impl, work, batch = sys.argv[2:]
        result = profile(impl, work, int(batch))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--works", default="r18_32")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--batch", type=int, default=None, help="images (default: the work's)")
    args = parser.parse_args()
    works, impls = works_and_impls(parser, args)
    if any(i != "jax" for i in impls):
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit(PEERS_MISSING)
    print(f"machine: {machine()}\nload average before: {os.getloadavg()}", flush=True)
    for work in works:
        batch = args.batch or WORKS[work][3]
        results = {}
        for impl in impls:
            results[impl] = in_subprocess(impl, work, str(batch), script=HERE)
            print(f"{work} batch {batch} {impl}: {results[impl]['step_s']:.2f} s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        print(f"\n{work}, batch {batch} (two views each):\n\n{table(results)}\n", flush=True)
        if "jax" in results:
            gaps = sorted(results["jax"]["gaps"].items(), key=lambda item: -item[1])
            listed = ", ".join(f"{c} {s * 1e3:.0f} ms" for c, s in gaps[:4])
            print(f"XLA's no-op-running time in the step, by the op that ended before: {listed}\n")
    print(
        "Approximations: XLA rows split concurrent ops' wall time equally; a fusion counts "
        "whole under its first-matching rule (a BN+ReLU fusion is batch norm if named in 'bn', "
        "else elementwise); PyTorch's 'loss' row is by op name and its conv input and kernel "
        "gradients are one op (row 'conv backward'); XLA's 'conv backward' is the sum of its two."
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
