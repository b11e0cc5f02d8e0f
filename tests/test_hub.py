"""Hub ids resolved offline from a cache laid out as huggingface_hub lays it out (blobs, snapshots,
refs); a local folder wins; a repo that is not cached is a clear error, never a network wait."""

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from mcl_runtime import AdapterLoadError, AsyncEngine, Engine, ModelLoadError, SamplingParams
from mcl_runtime.hub import resolve_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """``folder``'s files as ``hf download`` leaves them: content-addressed blobs, a snapshot of
    relative symlinks per commit, and ``refs/<ref>`` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, qwen_family):
    cache = tmp_path / "hf" / "hub"
    base, adapters = qwen_family
    add_to_cache(cache, "tiny-org/qwen2", base)
    add_to_cache(cache, "tiny-org/a8", adapters["a8"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_model_and_adapter_by_hub_id_offline(hub_cache, qwen_family):
    base, adapters = qwen_family
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    by_id = Engine("tiny-org/qwen2", adapters={"a8": "tiny-org/a8"}, device="cpu", kv_cache_blocks=64)
    local = Engine(str(base), adapters={"a8": str(adapters["a8"])}, device="cpu", kv_cache_blocks=64)
    assert by_id.model_name == "tiny-org/qwen2" and local.model_name == base.name
    outs = [[o.token_ids for o in e.generate(prompts, params, adapter=["a8", None])] for e in (by_id, local)]
    assert outs[0] == outs[1]


def test_revision_and_hf_home(tmp_path, monkeypatch, qwen_family):
    base, _ = qwen_family
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = "f" * 40
    add_to_cache(tmp_path / "home" / "hub", "tiny-org/qwen2", base)
    snapshot = add_to_cache(tmp_path / "home" / "hub", "tiny-org/qwen2", base, commit=other, ref="v2")
    assert resolve_path("tiny-org/qwen2", revision="v2") == snapshot
    assert resolve_path("tiny-org/qwen2").name == COMMIT


def test_local_folder_wins(hub_cache, tmp_path, monkeypatch, qwen_family):
    base, _ = qwen_family
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base, tmp_path / "tiny-org" / "qwen2")
    assert resolve_path("tiny-org/qwen2") == Path("tiny-org/qwen2")


def test_missing_repo_offline_is_a_clear_error(hub_cache):
    with pytest.raises(ModelLoadError) as err:
        Engine("tiny-org/absent", device="cpu")
    assert "tiny-org/absent" in str(err.value) and str(hub_cache) in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)
    with pytest.raises(AdapterLoadError, match="adapter 'tiny-org/no-adapter'"):
        resolve_path("tiny-org/no-adapter", AdapterLoadError, "adapter")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_path("/no/such/folder")


def test_serve_cli_and_load_lora_adapter_take_hub_ids(hub_cache):
    serve = pytest.importorskip("mcl_runtime.serve.__main__")
    args = serve.build_parser().parse_args(
        ["--model", "tiny-org/qwen2", "--lora", "a8=tiny-org/a8", "--device", "cpu", "--kv-cache-blocks", "32"]
    )
    aeng = AsyncEngine(serve.build_engine(args))
    try:
        assert aeng.engine.model_name == "tiny-org/qwen2" and aeng.adapters == ("a8",)
        asyncio.run(aeng.load_adapter("again", "tiny-org/a8"))  # what /v1/load_lora_adapter calls
        assert "again" in aeng.adapters
        with pytest.raises(AdapterLoadError, match="tiny-org/absent"):
            asyncio.run(aeng.load_adapter("x", "tiny-org/absent"))
    finally:
        aeng.shutdown()
