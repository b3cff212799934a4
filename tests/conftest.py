"""Shared test fixtures: the shared/ folder beside the checkout and a small real CIFAR-10 written from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_SCRIPT = SHARED / "data" / "cifar10.py"


# Tiny test tensors run 5-10x slower with 2 OpenMP threads on a busy 2-core box; one thread is also steadier.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _tracking_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Experiment tracking (MLflow is on by default for users) stays off in tests, subprocesses included;
    tests of tracking itself remove this with ``monkeypatch.delenv("COMPACTFL_TRACKING")``."""
    monkeypatch.setenv("COMPACTFL_TRACKING", "off")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not CIFAR_SCRIPT.is_file():
        pytest.skip(f"real CIFAR-10 needs {CIFAR_SCRIPT} (the shared/ folder beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def cifar10_root(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding real CIFAR-10 in the official python layout: 20 train + 10 test images per class."""
    root = tmp_path_factory.mktemp("cifar10")
    subprocess.run(
        [sys.executable, str(CIFAR_SCRIPT), str(root), "--per-class-train", "20", "--per-class-test", "10"],
        check=True, capture_output=True,
    )
    return root
