"""Test-session settings: CPU runs Triton kernels in the interpreter; the demo model and other
cached artefacts go to a per-session temporary folder unless MCL_CACHE is set."""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test waits on the network
os.environ.setdefault("MCL_CACHE", os.path.join(tempfile.gettempdir(), f"mcl_cache_tests_{os.getuid()}"))
torch.set_num_threads(min(2, torch.get_num_threads()))


SERVER_STACK = ("fastapi", "uvicorn", "pydantic", "openai")


def pytest_runtest_setup(item):
    """Tests marked ``server_stack`` (they start the OpenAI-compatible server or use the openai client)
    are skipped where one of its modules is missing: the GPU image has none of them. Tests marked
    ``ray`` are skipped without Ray Serve (the cluster extra)."""
    import pytest

    if item.get_closest_marker("server_stack"):
        for module in SERVER_STACK:
            pytest.importorskip(module)
    if item.get_closest_marker("ray"):
        pytest.importorskip("ray.serve", reason="Ray Serve is the cluster extra: pip install -e '.[cluster]'")


def pytest_collection_modifyitems(config, items):
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


import pytest  # noqa: E402

from mcl_runtime.model.arch import PROJECTION_NAMES  # noqa: E402

ALL_PROJ = list(PROJECTION_NAMES)

# Tiny model families: (arch, seed, tied embeddings, {adapter: (rank, alpha, targets, seed, rsLoRA)}).
FAMILIES = {
    # rank 4 on q/v, rank 8 on everything, rank 16 rsLoRA on o/MLP
    "qwen2": (
        "qwen2",
        0,
        False,
        {
            "a4": (4, 8, ["q_proj", "v_proj"], 1, False),
            "a8": (8, 16, ALL_PROJ, 2, False),
            "a16": (16, 32, ["o_proj", "gate_proj", "up_proj", "down_proj"], 3, True),
        },
    ),
    # tied embeddings, two adapters of different target sets and alphas
    "llama": (
        "llama",
        5,
        True,
        {"l8": (8, 8, ["q_proj", "k_proj", "gate_proj", "down_proj"], 6, False), "l16": (16, 64, ALL_PROJ, 7, False)},
    ),
    "qwen3": (
        "qwen3",
        11,
        False,
        {"q8": (8, 16, ALL_PROJ, 12, False), "q4": (4, 16, ["k_proj", "o_proj", "down_proj"], 13, True)},
    ),
    "mistral": (
        "mistral",
        21,
        False,
        {"m8": (8, 16, ["q_proj", "v_proj", "up_proj"], 22, False), "m16": (16, 32, ALL_PROJ, 23, True)},
    ),
}


@pytest.fixture(scope="session")
def model_family(tmp_path_factory):
    """``model_family(name)`` -> (base folder, {adapter: folder}), built once per session."""
    from tiny_models import make_adapter, make_model

    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            arch, seed, tie, specs = FAMILIES[name]
            root = tmp_path_factory.mktemp(name)
            base = make_model(root / "base", arch, seed=seed, tie=tie)
            built[name] = (
                base,
                {
                    a: make_adapter(base, root / a, r, alpha, targets, seed=s, rslora=rs)
                    for a, (r, alpha, targets, s, rs) in specs.items()
                },
            )
        return built[name]

    return get


@pytest.fixture(scope="session")
def qwen_family(model_family):
    return model_family("qwen2")


@pytest.fixture(scope="session")
def llama_family(model_family):
    return model_family("llama")
