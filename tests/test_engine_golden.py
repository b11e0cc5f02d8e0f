"""Golden equality with transformers + peft: fp32 greedy tokens, mixed adapters in one batch, and
invariance under block size, chunked prefill, preemption, prefix caching and slot eviction."""

import functools

import pytest
import torch
from tiny_models import hf_generate

from mcl_runtime import Engine, SamplingParams
from mcl_runtime.kernels import HAS_CPU_ATTENTION
from mcl_runtime.model.cpu_backend import HAS_ONEDNN_LINEAR, CPUBackend, KernelGroup

MAX_NEW = 32
LENGTHS = [5, 17, 33, 3, 40, 9, 16, 25, 12, 12, 12]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in LENGTHS]
    prompts[9] = prompts[10] = prompts[8]  # the same prompt under several adapters
    return prompts


PROMPTS = _prompts()
NAMES = {
    "qwen2": ["a4", None, "a8", "a16", "a4", None, "a8", "a16", "a4", "a8", None],
    "llama": ["l8", None, "l16", "l8", None, "l16", "l8", None, "l8", "l16", None],
    "qwen3": ["q8", None, "q4", "q8", None, "q4", "q8", None, "q8", "q4", None],
    "mistral": ["m8", "m16", None, "m8", "m16", None, "m8", None, "m8", "m16", None],
}


@functools.cache
def _reference(family: str, base, adapters_items) -> tuple[tuple[int, ...], ...]:
    outs = hf_generate(base, dict(adapters_items), PROMPTS, NAMES[family], MAX_NEW)
    return tuple(map(tuple, outs))


@pytest.fixture(params=list(NAMES))
def family(request, model_family):
    base, adapters = model_family(request.param)
    ref = _reference(request.param, base, tuple(sorted(adapters.items())))
    return request.param, base, adapters, [list(r) for r in ref]


def _run(base, adapters, names, **engine_kwargs):
    engine = Engine(
        str(base), adapters={k: str(v) for k, v in adapters.items()}, device="cpu", dtype="float32", **engine_kwargs
    )
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True), adapter=names)
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_golden_mixed_batch(family, overlap):
    name, base, adapters, ref = family
    tokens, _ = _run(base, adapters, NAMES[name], kv_cache_blocks=512, overlap=overlap)
    assert tokens == ref
    # The same prompt under different adapters gives each adapter's own tokens.
    assert len({tuple(tokens[i]) for i in (8, 9, 10)}) == 3


@pytest.mark.parametrize("family", ["qwen2", "llama"], indirect=True)  # batching is architecture-blind
@pytest.mark.parametrize(
    "knobs",
    [
        dict(block_size=1, kv_cache_blocks=4096),
        dict(block_size=16, kv_cache_blocks=64),
        dict(block_size=4, max_num_batched_tokens=7, kv_cache_blocks=256),  # chunked prefill
        dict(block_size=4, max_num_seqs=2, kv_cache_blocks=256),  # small batches
        dict(block_size=4, kv_cache_blocks=40),  # preemption
        dict(block_size=8, max_loras=1, kv_cache_blocks=256),  # slot eviction
        dict(block_size=4, enable_prefix_caching=False, kv_cache_blocks=256),
        dict(block_size=4, max_num_batched_tokens=7, kv_cache_blocks=256, overlap=True),
        dict(block_size=4, kv_cache_blocks=40, overlap=True),
        dict(block_size=8, max_loras=1, kv_cache_blocks=256, overlap=True),
    ],
    ids=[
        "bs1",
        "bs16",
        "chunked",
        "max2seqs",
        "preempt",
        "1slot",
        "nocache",
        "chunked-overlap",
        "preempt-overlap",
        "1slot-overlap",
    ],
)
def test_tokens_do_not_depend_on_batching(family, knobs):
    name, base, adapters, ref = family
    tokens, engine = _run(base, adapters, NAMES[name], **knobs)
    assert tokens == ref
    if knobs.get("kv_cache_blocks") == 40:
        assert engine.stats()["num_preemptions"] > 0
    if knobs.get("max_loras") == 1:
        assert engine.stats()["adapter_slot_loads"] >= len(adapters)


class RecordingCPUBackend(CPUBackend):
    """The cpu backend, recording its choices: each step's set of attention group kinds (kernel or
    not), every length split asked for (power, parts), and how often LoRA plans of each kind were built."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.kinds: list[set[bool]] = []
        self.splits: list[tuple[int, list | None]] = []
        self.tiles = self.slot_ranges = 0

    def prepare(self, attn, lora) -> None:
        super().prepare(attn, lora)
        self.kinds.append({isinstance(g, KernelGroup) for g in attn.plan})

    def _split(self, lengths, power):
        parts = super()._split(lengths, power)
        self.splits.append((power, parts))
        return parts

    def _lora_tiles(self, lora):
        self.tiles += 1
        return super()._lora_tiles(lora)

    def _lora_slots(self, lora, lo, hi):
        self.slot_ranges += 1
        return super()._lora_slots(lora, lo, hi)


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)
def test_cpu_padded_attention_keeps_the_tokens(family):
    """Without the C++ CPU attention (the case past ``KERNEL_MAX_THREADS`` torch threads) the cpu backend
    attends in padded groups and splits decodes of spread-out context lengths, and prompts of spread-out
    lengths, into groups (LENGTHS spread from 3 to 40): the golden tokens, and with splitting off (one
    padded group of each kind) the same."""
    name, base, adapters, ref = family
    backend = RecordingCPUBackend(attention_kernel=False)
    assert _run(base, adapters, NAMES[name], kv_cache_blocks=512, backend=backend)[0] == ref
    assert backend.kinds and all(kinds == {False} for kinds in backend.kinds)
    for power in (1, 2):  # decodes, prompts
        assert any(p == power and parts is not None and len(parts) > 1 for p, parts in backend.splits)
    backend = RecordingCPUBackend(attention_kernel=False)
    backend.SPLIT_GAIN = 0.0  # never worth splitting
    assert _run(base, adapters, NAMES[name], kv_cache_blocks=512, backend=backend)[0] == ref
    assert backend.splits and all(parts is None for _, parts in backend.splits)


@pytest.mark.parametrize("lora_path", ["tiles", "slot-range"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"], indirect=True)
def test_cpu_torch_layer_ops_keep_the_tokens(family, lora_path):
    """Without the C++ layer ops (LoRA, RMSNorm, rotary embedding: the torch paths that a build
    without the extension takes) the golden tokens, with LoRA through gather + bmm tiles and through
    the GEMMs over the step's slot range."""
    name, base, adapters, ref = family
    backend = RecordingCPUBackend(layer_kernels=False)
    backend.LORA_RANGE_MAX_SLOTS = 0 if lora_path == "tiles" else 1 << 10
    assert _run(base, adapters, NAMES[name], kv_cache_blocks=512, backend=backend)[0] == ref
    assert (backend.tiles, backend.slot_ranges)[lora_path == "slot-range"]


@pytest.mark.parametrize("mkl_rows", [float("inf"), 16], ids=["packed-only", "prefills-on-mkl"])
def test_cpu_lora_kernel_and_onednn_linear_keep_the_tokens(family, mkl_rows, monkeypatch):
    """Every LoRA product through the C++ kernel and every linear layer (projections, LM head)
    through oneDNN's inner product on the weights it packed at start, whatever the sizes, with the
    plain weights freed; or, with ``MKL_MIN_ROWS`` within the step budget, both copies kept and the
    prefill steps' projections (184 rows) through MKL on the plain weights, the decodes' (11 rows)
    on the packed ones: the golden tokens."""
    name, base, adapters, ref = family
    backend = RecordingCPUBackend()
    backend.LORA_KERNEL_MAX_WORK = float("inf")
    backend.ONEDNN_MIN_WEIGHT = 0
    backend.MKL_MIN_ROWS = mkl_rows
    plain_rows = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: plain_rows.append(len(x)) or linear(x, *a))
    tokens, engine = _run(base, adapters, NAMES[name], kv_cache_blocks=512, backend=backend)
    assert tokens == ref
    assert bool(backend._packed) == HAS_ONEDNN_LINEAR  # every projection and the LM head packed
    *projections, lm_head = engine.model.linear_weights()
    freed = HAS_ONEDNN_LINEAR and mkl_rows == float("inf")
    assert all(w.numel() == 0 for w in projections) == freed
    tied = engine.model.config.tie_word_embeddings
    assert lm_head.numel() == (0 if freed and not tied else engine.model.embed_tokens.weight.numel())
    if HAS_ONEDNN_LINEAR:
        assert set(plain_rows) == (set() if freed else {sum(LENGTHS)})


def test_golden_reference_backend(family):
    """The reference backend (plain torch, the semantics the others are tested against) gives the
    tokens of transformers + peft."""
    name, base, adapters, ref = family
    assert _run(base, adapters, NAMES[name], kv_cache_blocks=512, backend="reference")[0] == ref


@pytest.fixture
def one_thread():
    """One torch thread: the cpu backend then attends through the C++ CPU kernel."""
    if not HAS_CPU_ATTENTION:
        pytest.skip("the C++ extension mcl_runtime._C is not built")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_golden_through_the_cpu_attention_kernel(family, one_thread):
    name, base, adapters, ref = family
    backend = RecordingCPUBackend()
    backend.PADDED_SMALL = backend.PADDED_SMALL_PROMPTS = 1 << 16  # every prefill group through the kernel too
    assert _run(base, adapters, NAMES[name], kv_cache_blocks=512, backend=backend)[0] == ref
    assert backend.kinds and all(True in kinds for kinds in backend.kinds)


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)
@pytest.mark.parametrize("n", [1, 2])
def test_last_layer_finishes_only_the_sampling_rows(family, n):
    """Past the last layer's attention only the rows that sample are computed: with chunked prefill
    over mixed adapters each eager forward returns one row per sampling sequence (one row when none
    samples), fewer than its tokens in the prefill steps; the golden tokens (n = 1), and with n = 2
    the same completions as forwards that finish every row."""
    name, base, adapters, ref = family
    knobs = dict(block_size=4, max_num_batched_tokens=7, kv_cache_blocks=256, seed=0)
    params = SamplingParams(max_tokens=8, n=n, temperature=0 if n == 1 else 1.0, seed=3, ignore_eos=True)

    def run(keep: bool) -> tuple[list, list[tuple[int, int]]]:
        engine = Engine(
            str(base), adapters={k: str(v) for k, v in adapters.items()}, device="cpu", dtype="float32", **knobs
        )
        shapes = []  # (tokens in, rows out) of each forward
        engine.model.register_forward_hook(lambda m, args, out: shapes.append((len(args[0]), len(out))))
        if not keep:
            engine.runner._kept_seqs = lambda which, num_tokens: None
        outs = engine.generate(PROMPTS, params, adapter=NAMES[name])
        return [[c.token_ids for c in o.outputs] for o in outs], shapes

    tokens, shapes = run(keep=True)
    if n == 1:
        assert tokens == [[r[:8]] for r in ref]
    else:
        assert tokens == run(keep=False)[0]
    assert any(rows < t for t, rows in shapes) and all(rows >= 1 for _, rows in shapes)


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)
def test_kernel_and_padded_attention_groups_in_one_step_keep_the_tokens(family, one_thread):
    """The decodes go to the C++ kernel and each prefill group to it or to the padded path by size;
    with the threshold moved so that both kinds meet in steps (chunked prefill over cached
    prefixes), the golden tokens."""
    name, base, adapters, ref = family
    backend = RecordingCPUBackend()
    backend.PADDED_SMALL = backend.PADDED_SMALL_PROMPTS = 150
    knobs = dict(block_size=4, max_num_batched_tokens=23, kv_cache_blocks=256, backend=backend)
    assert _run(base, adapters, NAMES[name], **knobs)[0] == ref
    assert {True, False} in backend.kinds


def test_single_request_equals_batched(qwen_family):
    base, adapters = qwen_family
    engine = Engine(str(base), adapters={k: str(v) for k, v in adapters.items()}, device="cpu", kv_cache_blocks=256)
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    batched = engine.generate(PROMPTS, params, adapter=NAMES["qwen2"])
    for i in (0, 3, 8):
        alone = engine.generate([PROMPTS[i]], params, adapter=[NAMES["qwen2"][i]])[0]
        assert alone.token_ids == batched[i].token_ids


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_prefix_cache_hits_are_exact_and_per_adapter(qwen_family, overlap):
    base, adapters = qwen_family
    engine = Engine(
        str(base),
        adapters={k: str(v) for k, v in adapters.items()},
        device="cpu",
        kv_cache_blocks=256,
        block_size=4,
        overlap=overlap,
    )
    prefix = PROMPTS[4]  # 40 tokens
    prompts = [prefix + [7, 8, 9], prefix + [10]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = engine.generate(prompts, params, adapter=["a8", "a8"])
    hits = engine.stats()["prefix_cache_hit_tokens"]
    assert hits >= 36  # the second prompt reused the first one's full blocks (same step)
    again = engine.generate(prompts, params, adapter=["a8", "a8"])
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert engine.stats()["prefix_cache_hit_tokens"] > hits
    before = engine.stats()["prefix_cache_hit_tokens"]
    other = engine.generate([prompts[0]], params, adapter=["a4"])[0]
    assert engine.stats()["prefix_cache_hit_tokens"] == before  # never shared across adapters
    ref = hf_generate(base, {"a4": adapters["a4"], "a8": adapters["a8"]}, [prompts[0], prompts[0]], ["a4", "a8"], 12)
    assert other.token_ids == ref[0] and first[0].token_ids == ref[1]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_load_and_unload_while_requests_run(qwen_family, overlap):
    base, adapters = qwen_family
    engine = Engine(
        str(base), adapters={"a8": str(adapters["a8"])}, device="cpu", kv_cache_blocks=256, max_loras=2, overlap=overlap
    )
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    engine.add_request("r0", PROMPTS[2], params, "a8")
    engine.add_request("r1", PROMPTS[1], params, None)
    results = {}

    def drain(steps):
        for _ in range(steps):
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.token_ids

    drain(3)
    engine.load_adapter("a16", str(adapters["a16"]))
    engine.add_request("r2", PROMPTS[3], params, "a16")
    drain(2)
    engine.unload_adapter("a8")  # r0 still running: finishes with a8's weights
    assert "a8" not in engine.adapters
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_request("r3", PROMPTS[0], params, "a8")
    engine.load_adapter("a4", str(adapters["a4"]))
    engine.add_request("r4", PROMPTS[0], params, "a4")
    while engine.has_unfinished_requests():
        drain(1)
    ref = hf_generate(
        base, adapters, [PROMPTS[2], PROMPTS[1], PROMPTS[3], PROMPTS[0]], ["a8", None, "a16", "a4"], MAX_NEW
    )
    assert [results[r] for r in ("r0", "r1", "r2", "r4")] == ref
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_replace_swaps_an_adapter_in_place(qwen_family, overlap):
    """``load_adapter(name, path, replace=True)`` while requests of ``name`` run and wait: requests added
    before the swap finish on the old weights (a waiting one still hits the old prefix-cache blocks),
    requests after it get the new weights, and no prefix-cache lookup crosses the swap. A replaced or
    unloaded adapter that waiting requests still use stays until they finish."""
    base, adapters = qwen_family
    engine = Engine(
        str(base),
        adapters={"x": str(adapters["a8"]), "y": str(adapters["a4"])},
        device="cpu",
        kv_cache_blocks=256,
        block_size=4,
        max_num_seqs=1,
        overlap=overlap,
    )
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    prompt = PROMPTS[2]
    engine.add_request("old_running", prompt, params, "x")
    engine.add_request("y_waiting", PROMPTS[0], params, "y")
    results = {}

    def drain(steps=None):
        while engine.has_unfinished_requests() and (steps is None or steps > 0):
            steps = None if steps is None else steps - 1
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.token_ids

    drain(3)
    old_uid = engine.adapter_manager.uid("x")
    engine.add_request("old_waiting", prompt, params, "x")  # max_num_seqs=1: waits for old_running
    engine.load_adapter("x", str(adapters["a16"]), replace=True)
    engine.unload_adapter("y")  # its only request still waits
    new_uid = engine.adapter_manager.uid("x")
    assert new_uid != old_uid and engine.adapters == ["x"]
    engine.add_request("new", prompt, params, "x")
    drain()
    ref_old, ref_y, ref_new = hf_generate(base, adapters, [prompt, PROMPTS[0], prompt], ["a8", "a4", "a16"], MAX_NEW)
    assert results == {"old_running": ref_old, "old_waiting": ref_old, "y_waiting": ref_y, "new": ref_new}
    # Only old_waiting found cached blocks (old_running's prompt); new, admitted last, found none of
    # the blocks of the same prompt computed with the old weights.
    assert engine.scheduler.num_cached_tokens == len(prompt) // 4 * 4
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter("x", str(adapters["a8"]))
    assert engine.stats()["kv_blocks_used"] == 0


def test_golden_triton_backend(family):
    """The Triton kernels (interpreted on CPU) give the same tokens: decodes and chunked prefills mixed."""
    name, base, adapters, ref = family
    engine = Engine(
        str(base),
        adapters={k: str(v) for k, v in adapters.items()},
        device="cpu",
        backend="triton",
        kv_cache_blocks=128,
        block_size=4,
        max_num_batched_tokens=48,
    )
    n = 6
    outs = engine.generate(PROMPTS[:8], SamplingParams(max_tokens=n, ignore_eos=True), adapter=NAMES[name][:8])
    assert [o.token_ids for o in outs] == [r[:n] for r in ref[:8]]
