"""benchmarks/accelerator.sh (issue 17's GPU script) runs as a user would run it, at the tiny
size its TINY=1 switch gives, and its batch search picks the largest batch under a budget."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_augment_step

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accelerator_script_writes_both_tables(tmp_path):
    env = {**os.environ, "TINY": "1", "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a single-chip machine
    result = subprocess.run(
        ["bash", "benchmarks/accelerator.sh", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "accelerator.md").read_text()
    if (REPO.parent / "shared/data/cifar10-train-jpeg.tar.gz").exists():  # as in CI
        assert "not found" not in report, "the CIFAR-10 JPEG branch was not taken"
    for timing in ("step", "augment", "augment \\+ step"):
        row = re.search(rf"^\| {timing} \| ([\d.,]+) \| ([\d.,]+) \|", report, re.M)
        assert row and float(row.group(2).replace(",", "")) > 0, (timing, report)
    rates = re.findall(r"^\| (\d+) \| ([\d.,]+) \|$", report, re.M)
    assert [int(step) for step, _ in rates] == [1, 2, 3, 4], report
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates)


def test_batch_search_stops_at_the_budget(devices):
    fits = bench_augment_step.planned_bytes("r18_32", 16, "float32")  # compiled once per batch
    search = bench_augment_step.largest_fitting_batch
    assert search("r18_32", "float32", start=8, limit=64, budget=fits) == 16
    with pytest.raises(SystemExit, match="not even --batch 32 fits"):
        search("r18_32", "float32", start=32, limit=64, budget=fits)
