"""benchmarks/accelerator.sh (the GPU/TPU script) runs as a user would run it, at the tiny
size its TINY=1 switch gives, and its batch search picks the largest batch under a budget."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CIFAR_TARBALL

from benchmarks import bench_augment_step, profile_step

REPO = Path(__file__).resolve().parents[1]


def run_on_one_device(command: list[str], env: dict[str, str], timeout: float):
    """Runs a benchmark command as a user would, from the repository root, with one CPU device
    (without conftest's 8, as on a single-chip machine); fails showing its output."""
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **env}
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.multiprocess
def test_accelerator_script_writes_both_tables(tmp_path):
    env = {"TINY": "1", "PYTHON": sys.executable}
    run_on_one_device(["bash", "benchmarks/accelerator.sh", str(tmp_path)], env, timeout=900)
    report = (tmp_path / "accelerator.md").read_text()
    if CIFAR_TARBALL.exists():  # as in CI
        assert "not found" not in report, "the CIFAR-10 JPEG branch was not taken"
    for timing in ("step", "augment", "augment \\+ step"):
        row = re.search(rf"^\| {timing} \| ([\d.,]+) \| ([\d.,]+) \|", report, re.M)
        assert row and float(row.group(2).replace(",", "")) > 0, (timing, report)
    rates = re.findall(r"^\| (\d+) \| ([\d.,]+) \|$", report, re.M)
    assert [int(step) for step, _ in rates] == [1, 2, 3, 4], report
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates)


def test_batch_search_stops_at_the_budget(devices):
    # Two compiles in all (8 and 16 images; each batch's step is compiled once and shared).
    fits = bench_augment_step.planned_bytes("r18_32", 8, "float32")
    search = bench_augment_step.largest_fitting_batch
    assert search("r18_32", "float32", start=8, limit=64, budget=fits) == 8
    with pytest.raises(SystemExit, match="not even --batch 16 fits"):
        search("r18_32", "float32", start=16, limit=64, budget=fits)


def test_profile_step_categories_cover_the_traced_step(devices):
    """benchmarks/profile_step.py's XLA side on a tiny step (1 device, batch 2, 16 px): every
    traced op gets a category, the categories add up to the time ops ran, and the three kinds
    of convolution work are found."""
    from bench_step import build_config, build_step, synthetic_batches  # on profile_step's path

    from simclr_jax import parallel

    config = build_config("r18_32", 2, "auto")
    config.data.image_size = 16
    mesh = parallel.create_mesh(devices=devices[:1])
    state, step = build_step(config, mesh)
    batch = next(synthetic_batches(config, mesh))
    compiled = step.lower(state, batch).compile()
    step_s, trace_dir = profile_step.trace_step(compiled, state, batch)
    seconds, ops, gaps = profile_step.categorize_xla(compiled.as_text(), trace_dir)

    instructions, _ = profile_step.parse_hlo(compiled.as_text())
    spans = sorted(profile_step.xla_trace_spans(trace_dir, instructions))
    assert ops == len(spans) > 0
    busy, reached = 0.0, spans[0][0]  # time in which at least one op ran
    for start, end, _ in spans:
        busy += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    assert sum(seconds.values()) == pytest.approx(busy, rel=1e-6)
    assert busy + sum(gaps.values()) == pytest.approx(reached - spans[0][0], rel=1e-6)
    assert busy <= step_s
    assert set(seconds) <= set(profile_step.CATEGORIES)
    for kind in ("conv forward", "conv input grad", "conv kernel grad", "batch norm (fwd+bwd)"):
        assert seconds.get(kind, 0) > 0, (kind, seconds)
    assert seconds.get("other", 0) < 0.05 * busy, seconds


@pytest.mark.multiprocess
def test_profile_step_command_prints_the_table():
    """The README's command, jax side only (torch is an optional extra), at batch 2: a fresh
    subprocess traces the step and the table has the step and the convolution rows."""
    command = [sys.executable, "benchmarks/profile_step.py", "--impls", "jax", "--batch", "2"]
    result = run_on_one_device(command, {}, timeout=600)
    for row in ("conv forward", "conv kernel grad", "step \\(host wall time, traced\\)"):
        match = re.search(rf"^\| {row} \| \**([\d,]+)\** \|", result.stdout, re.M)
        assert match and int(match.group(1).replace(",", "")) > 0, (row, result.stdout)


def test_preflight_benchmarks_build_configs_the_trainer_accepts(devices):
    """benchmarks/calibration.py (MLPerf's supervised ResNet-50) and preflight_table.py (every
    row of the paper table): each config passes the trainer's validation on a mesh, with
    nothing compiled (the benchmarks compile them for TPU slices, minutes each)."""
    from benchmarks import calibration, preflight_table
    from simclr_jax import parallel
    from simclr_jax.preflight import core

    mesh = parallel.create_mesh(devices=devices)
    config, _ = core.prepare_config(calibration.mlperf_config(16, len(devices)), mesh)
    assert config.mode == "finetune" and config.model.proj_head_mode == "none"
    assert config.train_batch_size == 128 and config.data.image_size == 224
    for _, spec, _, overrides, _ in preflight_table.ROWS:
        row = preflight_table.load_config(spec, overrides, "bfloat16")
        row.train_batch_size = row.eval_batch_size = 8 * len(devices)
        core.prepare_config(row, mesh)
