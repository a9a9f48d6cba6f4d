"""Peak host memory and time of converting a published-checkpoint fixture (ResNet-50 1x SK).

    PYTHONPATH=. python benchmarks/bench_convert.py [--variant tf1_r50_1x_sk1]

Rebuilds the fixture checkpoint from ../shared/data/official-checkpoints (weight rule), then in
fresh processes: (1) read the variable list and plan the mapping without reading any weight
(the process's own footprint: TensorFlow, JAX, the reader), (2) the full conversion and write.
The difference of the two peak RSS figures, divided by the weight bytes, is the number of
weight copies the converter holds at its peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "data" / "official-checkpoints"

CHILD = """
import resource, sys, time, json
from simclr_jax import convert
start = time.time()
if sys.argv[1] == "plan":
    source = convert.SourceCheckpoint(sys.argv[2])
    convert.plan_conversion(source.names, source.shapes)
else:
    convert.write_workdir(convert.convert(sys.argv[2]), sys.argv[3])
usage = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, not ru_maxrss: ru_maxrss keeps the forking parent's size across exec.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({"peak_rss_mb": int(hwm) / 1024, "wall_s": time.time() - start,
                  "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def build(variant: str, directory: Path) -> tuple[str, int]:
    """Writes the fixture checkpoint; returns its prefix and the weight bytes."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_convert

    tensors = test_convert.fixture_tensors(variant, extra_keys=False)
    prefix = test_convert.save_v2(directory / "model.ckpt-0", tensors)
    weights = sum(getattr(v, "nbytes", 0) for k, v in tensors.items() if not k.startswith("_"))
    return prefix, weights


def run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True, cwd=REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="tf1_r50_1x_sk1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prefix, weights = build(args.variant, Path(tmp))
        plan = run("plan", prefix)
        full = run("full", prefix, str(Path(tmp) / "out"))
    copies = (full["peak_rss_mb"] - plan["peak_rss_mb"]) * 2**20 / weights
    print(f"{args.variant}: weights {weights / 2**20:.0f} MiB")
    print(f"plan only: peak RSS {plan['peak_rss_mb']:.0f} MiB, {plan['wall_s']:.1f} s wall")
    print(
        f"convert + write: peak RSS {full['peak_rss_mb']:.0f} MiB, {full['wall_s']:.1f} s wall, "
        f"{full['cpu_s']:.1f} s CPU; peak above plan-only = {copies:.2f} weight copies"
    )


if __name__ == "__main__":
    main()
