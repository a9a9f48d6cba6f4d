"""The shared test data beside the repository (../shared/data; each part has a README there).

A test that needs a part of it skips on a user's machine without it, and fails under CI, which
must run it (`.ci/run` sets CI=1)."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_TARBALL = SHARED_DATA / "cifar10-train-jpeg.tar.gz"  # train/<class>/<n>.jpg
OFFICIAL_CHECKPOINTS = SHARED_DATA / "official-checkpoints"  # with the reference's outputs
IMAGENET_SUBSETS = SHARED_DATA / "imagenet-subsets"  # the published 1% / 10% lists


def require(path: Path, what: str) -> Path:
    """path, if it exists; else skips the test (fails it under CI) naming what is missing."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {what} at {path}")
        pytest.skip(f"{what} not found at {path} (the shared test data is not present)")
    return path
