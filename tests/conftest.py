"""Test-session settings: CPU runs Triton kernels in the interpreter; the demo model and other
cached artefacts go to a per-session temporary folder unless MCL_CACHE is set."""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MCL_CACHE", os.path.join(tempfile.gettempdir(), f"mcl_cache_tests_{os.getuid()}"))
torch.set_num_threads(min(2, torch.get_num_threads()))


SERVER_STACK = ("fastapi", "uvicorn", "pydantic", "openai")


def pytest_runtest_setup(item):
    """Tests marked ``server_stack`` (they start the OpenAI-compatible server or use the openai client)
    are skipped where one of its modules is missing: the GPU image has none of them."""
    import pytest

    if item.get_closest_marker("server_stack"):
        for module in SERVER_STACK:
            pytest.importorskip(module)


def pytest_collection_modifyitems(config, items):
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


import pytest  # noqa: E402

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory):
    """Tiny Qwen2 with three PEFT adapters: rank 4 on q/v, rank 8 on everything, rank 16 rsLoRA on o/MLP."""
    from tiny_models import make_adapter, make_model

    root = tmp_path_factory.mktemp("qwen2")
    base = make_model(root / "base", "qwen2", seed=0)
    adapters = {
        "a4": make_adapter(base, root / "a4", 4, 8, ["q_proj", "v_proj"], seed=1),
        "a8": make_adapter(base, root / "a8", 8, 16, ALL_PROJ, seed=2),
        "a16": make_adapter(base, root / "a16", 16, 32, ["o_proj", "gate_proj", "up_proj", "down_proj"], seed=3,
                            rslora=True),
    }
    return base, adapters


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """Tiny Llama (tied embeddings) with two adapters of different target sets and alphas."""
    from tiny_models import make_adapter, make_model

    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", "llama", seed=5, tie=True)
    adapters = {
        "l8": make_adapter(base, root / "l8", 8, 8, ["q_proj", "k_proj", "gate_proj", "down_proj"], seed=6),
        "l16": make_adapter(base, root / "l16", 16, 64, ALL_PROJ, seed=7),
    }
    return base, adapters
