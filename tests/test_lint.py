"""Style and types as part of the test run: ruff on everything, mypy on the code that must stand without
TensorRT or a GPU to run it (engine/, the kernels, the TensorRT backend, doctor)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TYPED = ["dynllava/engine", "dynllava/kernels", "dynllava/runtime/backends/tensorrt.py", "dynllava/doctor.py"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_passes():
    if shutil.which("ruff", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    proc = _run("ruff", "check", "dynllava", "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_passes_on_the_tensorrt_code():
    pytest.importorskip("mypy")
    proc = _run("mypy", *TYPED)
    assert proc.returncode == 0, proc.stdout + proc.stderr
