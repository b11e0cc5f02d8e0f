"""KV cache sizing (explicit blocks, bytes, a fraction of the available memory) and its allocation."""

from __future__ import annotations

import logging

import pytest
import torch

from mcl_runtime.engine.kv_cache import (
    GIB,
    MIN_BLOCKS,
    RESERVE_BYTES,
    allocate_kv_cache,
    check_kv_cache,
    host_available_memory,
    parse_bytes,
    plan_kv_cache,
)

CPU = torch.device("cpu")
BLOCK_BYTES = 1 << 20  # 1 MiB a block of 16 tokens


def plan(**kwargs):
    args = dict(block_bytes=BLOCK_BYTES, block_size=16, device=CPU, max_num_seqs=4, max_model_len=1 << 20)
    return plan_kv_cache(**{**args, **kwargs})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4GiB", 4 * GIB), ("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5e9", 1_500_000_000), ("4096", 4096), (7, 7)],
)
def test_parse_bytes(text, expected) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "four GiB", "4XB", "-1GiB"])
def test_parse_bytes_refuses_garbage(text) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes(text)


def test_explicit_blocks_and_bytes_win() -> None:
    assert plan(kv_cache_blocks=7).num_blocks == 7
    sized = plan(kv_cache_memory=10 * BLOCK_BYTES + 5)
    assert (sized.num_blocks, sized.num_tokens, sized.source) == (10, 160, "kv_cache_memory")


def test_default_takes_a_fraction_of_the_available_memory_less_a_reserve() -> None:
    available = 9 * GIB
    default = plan(available=available)
    assert default.num_blocks == (int(available * 0.9) - RESERVE_BYTES["cpu"]) // BLOCK_BYTES
    assert "available" in default.source
    half = plan(available=available, kv_cache_memory_fraction=0.5)
    assert half.num_blocks == (available // 2 - RESERVE_BYTES["cpu"]) // BLOCK_BYTES


def test_default_is_capped_by_what_the_sequences_can_fill_and_floored() -> None:
    capped = plan(available=100 * GIB, max_num_seqs=3, max_model_len=100)  # 3 x ceil(100 / 16) blocks
    assert capped.num_blocks == 21 and "max_num_seqs" in capped.source
    assert plan(available=GIB).num_blocks == MIN_BLOCKS  # nothing left after the reserve


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kv_cache_blocks=4, kv_cache_memory=GIB), "at most one"),
        (dict(kv_cache_memory=GIB, kv_cache_memory_fraction=0.5), "at most one"),
        (dict(kv_cache_blocks=0), "positive integer"),
        (dict(kv_cache_memory=100), "holds no block"),
        (dict(kv_cache_memory_fraction=1.5), r"in \(0, 1\]"),
        (dict(kv_cache_memory_fraction=0.0), r"in \(0, 1\]"),
    ],
)
def test_bad_options_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        plan(available=GIB, **kwargs)


def test_small_cache_warning() -> None:
    small = plan(kv_cache_blocks=100)  # 1,600 tokens
    warning = check_kv_cache(small, max_num_seqs=4, max_model_len=1 << 20)
    assert warning is not None and "1,600 tokens" in warning and "max_num_seqs=4" in warning
    assert check_kv_cache(small, max_num_seqs=4, max_model_len=400) is None  # 4 x 400 fit
    assert check_kv_cache(plan(kv_cache_blocks=512), max_num_seqs=4, max_model_len=1 << 20) is None


def test_host_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert host_available_memory(meminfo, cgroup) == 20000000 * 1024  # no cgroup files: the host's figure
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("100\n")
    assert host_available_memory(meminfo, cgroup) == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{8 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{3 * GIB}\n")
    assert host_available_memory(meminfo, cgroup) == 5 * GIB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_allocated_cache_is_zero_aligned_and_writable(dtype) -> None:
    kv = allocate_kv_cache((2, 2, 5, 16, 2, 8), dtype, CPU)
    assert kv.shape == (2, 2, 5, 16, 2, 8) and kv.dtype == dtype and kv.is_contiguous()
    assert kv.data_ptr() % 64 == 0 and not kv.any()
    kv[1, 0, 3] = 1.5
    assert kv.sum().item() == 1.5 * 16 * 2 * 8


def test_engine_logs_and_sizes_its_cache(caplog) -> None:
    from mcl_runtime.demo import demo_engine

    with caplog.at_level(logging.INFO, logger="mcl_runtime.engine.kv_cache"):
        engine = demo_engine(device="cpu", adapters={}, kv_cache_memory="8MiB", max_num_seqs=8)
    cfg = engine.model.config
    block_bytes = 2 * cfg.num_layers * engine.block_size * cfg.num_kv_heads * cfg.head_dim * 4
    assert engine.block_manager.num_blocks == (8 << 20) // block_bytes == engine.kv_plan.num_blocks
    assert engine.kv_cache.shape[2] == engine.kv_plan.num_blocks + 1
    assert f"KV cache: {engine.kv_plan.num_tokens:,} tokens" in caplog.text
    assert "fewer than max_num_seqs=8" in caplog.text
    assert engine.generate([[1, 2, 3]])[0].token_ids


@pytest.mark.parametrize("module", ["mcl_runtime.serve.__main__", "mcl_runtime.pipeline"])
def test_cli_flags(module) -> None:
    import importlib

    from mcl_runtime.engine.cli_args import kv_cache_options

    parser = importlib.import_module(module).build_parser()
    base = ["--dataset", "humaneval", "--out", "x.jsonl"] if module == "mcl_runtime.pipeline" else []
    assert kv_cache_options(parser.parse_args([*base, "--kv-cache-memory", "4GiB"])) == {"kv_cache_memory": 4 * GIB}
    assert kv_cache_options(parser.parse_args([*base, "--kv-cache-memory-fraction", "0.5"])) == {
        "kv_cache_memory_fraction": 0.5
    }
    assert kv_cache_options(parser.parse_args(base)) == {}
    for bad in (["--kv-cache-memory", "lots"], ["--kv-cache-memory", "1GiB", "--kv-cache-memory-fraction", "0.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])
