"""Every entry point starts from the repository root, where ``python -m`` puts the checkout first on
``sys.path``: nothing at the top level of the checkout may shadow an installed package (a top-level
``kernels/`` once hid Hugging Face's ``kernels``, which transformers imports, and ``train sft`` failed
there with an ImportError). ``tests/test_train_sft.py`` also runs ``train sft`` itself from the root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _top_level_modules() -> list[str]:
    """What ``import NAME`` finds at the top of the checkout: packages and modules (a folder without
    ``__init__.py`` is a namespace portion, which any installed package of that name wins over)."""
    names = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    return sorted(names + [p.stem for p in ROOT.glob("*.py")])


def test_no_top_level_module_of_the_checkout_shadows_an_installed_one(tmp_path) -> None:
    names = [n for n in _top_level_modules() if n not in ("mcl_runtime", "setup")]
    assert names == [], f"top-level modules besides the package and setup.py: {names}"
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mcl_runtime') is None)"
    assert _run("-c", probe, cwd=tmp_path).returncode == 0  # the package is importable away from the root


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "mcl_runtime.serve", "--help"],
        ["-m", "mcl_runtime.pipeline", "--help"],
        ["-m", "mcl_runtime.train", "sft", "--help"],
        ["-m", "mcl_runtime.demo"],
        ["-c", "import mcl_runtime.kernels, transformers.integrations.hub_kernels"],
    ],
    ids=["serve", "pipeline", "train", "demo", "kernels"],
)
def test_entry_points_start_from_the_repository_root(args) -> None:
    proc = _run(*args)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
