"""Prints the newest complete checkpoint step of a workdir (run on a worker by tpu.py status).

python launch/last_checkpoint.py WORKDIR        # WORKDIR local or gs://
"""

from __future__ import annotations

import sys

from etils import epath


def complete_steps(workdir: str) -> list[int]:
    """Steps under WORKDIR/checkpoints that finished writing (orbax renames them at commit;
    on gs://, where renames are not atomic, it writes commit_success.txt)."""
    root = epath.Path(workdir) / "checkpoints"
    if not root.exists():
        return []
    steps = []
    for path in root.iterdir():
        if path.name.isdigit() and ("://" not in workdir or (path / "commit_success.txt").exists()):
            steps.append(int(path.name))
    return sorted(steps)


def main(argv: list[str]) -> int:
    """One line: the last complete checkpoint step, or that there is none."""
    if len(argv) != 1:
        print("usage: python launch/last_checkpoint.py WORKDIR", file=sys.stderr)
        return 2
    steps = complete_steps(argv[0])
    print(f"last checkpoint: step {steps[-1]} in {argv[0]}" if steps else
          f"last checkpoint: none in {argv[0]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
