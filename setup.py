"""Build: the Python package plus the optional C++ block manager ``mcl_runtime._C`` (CMake + pybind11).

Without CMake or a C++ compiler, or with ``MCL_NO_EXT=1``, the extension is skipped with a warning
and ``mcl_runtime`` uses its pure-Python reference block manager.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def run(self) -> None:
        if os.environ.get("MCL_NO_EXT") == "1":
            warnings.warn(
                "MCL_NO_EXT=1: skipping the C++ extension; the Python block manager will be used", stacklevel=2
            )
            return
        try:
            super().run()
        except (ImportError, OSError, subprocess.CalledProcessError) as exc:
            warnings.warn(
                f"could not build the C++ extension ({exc}); the Python block manager will be used", stacklevel=2
            )

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        subprocess.check_call(
            [
                "cmake",
                ext.source_dir,
                f"-DCMAKE_BUILD_TYPE={cfg}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            ],
            cwd=build_dir,
        )
        subprocess.check_call(["cmake", "--build", ".", "--config", cfg, "-j2"], cwd=build_dir)


# Replicas behind one endpoint (python -m mcl_runtime.serve --replicas N). The floor is the version tested:
# its request-router API (alpha), consistent-hash router and DeploymentHandle.broadcast are used.
CLUSTER = ["ray[serve]>=2.60"]
packages = find_packages(include=["mcl_runtime", "mcl_runtime.*"])
# Floors: the oldest version of each that the test suite (CI's Python 3.11 environment) or the GPU
# run's CPU preflight (benchmarks/run_gpu.sh --cpu-preflight in the device image's versions: Python
# 3.12, torch 2.11.0, triton 3.6.0, transformers 5.17.0) has passed on. Nothing older was tried.

setup(
    name="mcl_runtime",
    version="0.1.0",
    description="Multi-LoRA serving and training runtime for MapCoder-Lite agents on one base model",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=packages,
    package_data={"mcl_runtime.agents": ["data/*.jsonl", "data/*.md"]},
    ext_modules=[CMakeExtension("mcl_runtime._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system=='Linux'",
        "numpy>=2.4.6",
        "safetensors>=0.8",
        "tokenizers>=0.23.2",
        "transformers>=5.17",
        "peft>=0.21.2",
        "jinja2>=3.1.6",
        "fastapi>=0.165",
        "uvicorn>=0.54",
        "pydantic>=2.13.4",
        "prometheus_client>=0.26",
        "openai>=3.57",
        "httpx>=0.28.1",
        "tqdm>=4.70.1",
        "matplotlib>=3.11.2",
        "xgrammar>=0.2.9",
        "trl>=1.16",  # train sft: SFTTrainer
        "datasets>=5.2",  # its data sets
        "accelerate>=1.16",  # train sft on several processes or GPUs (accelerate launch)
    ],
    extras_require={
        "flash": ["flash-attn"],
        "cluster": CLUSTER,
        # the tests cover the replicas too (marked ray: pytest -m "not ray" leaves them out)
        "test": ["pytest>=9.0.3", "pytest-timeout>=2.4", "jsonschema>=4.26", "schemathesis", "ruff>=0.17.5", *CLUSTER],
    },
    entry_points={
        "console_scripts": [
            "mcl-serve=mcl_runtime.serve.__main__:main",
            "mcl-pipeline=mcl_runtime.pipeline:main",
            "mcl-train=mcl_runtime.train.__main__:main",
        ]
    },
)
