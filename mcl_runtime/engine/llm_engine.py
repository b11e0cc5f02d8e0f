"""The engine: requests in, one batched step at a time, outputs out. Knows no HTTP and no agents.

``add_request`` validates a request (every check a request gets is made here, once) and hands it
to the scheduler, which owns it from then on. ``step`` is schedule -> run -> postprocess: the
scheduler picks the step's work, the model runner launches the forward pass and the sampling, and
the scheduler records the sampled tokens. With ``overlap`` the step launched now is postprocessed
by the next ``step`` call, after that one has launched its own (one step of lag; the same tokens).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcl_runtime.engine.adapter_manager import AdapterManager
from mcl_runtime.engine.block_manager import BlockManager
from mcl_runtime.engine.kv_cache import KVCachePlan, allocate_kv_cache, log_kv_cache, parse_bytes, plan_kv_cache
from mcl_runtime.engine.model_runner import ModelRunner, SampledTokens
from mcl_runtime.engine.outputs import TextStream, request_outputs
from mcl_runtime.engine.params import RequestOutput, SamplingParams
from mcl_runtime.engine.scheduler import Scheduler, default_step_tokens
from mcl_runtime.engine.seq_table import SequenceTable
from mcl_runtime.engine.sequence import Request, Sequence
from mcl_runtime.errors import ContextLengthError, InvalidRequestError
from mcl_runtime.hub import display_name, resolve_path
from mcl_runtime.model.backends import Backend, make_backend
from mcl_runtime.model.config import load_config
from mcl_runtime.model.cpu_backend import NATIVE_BF16_GEMM
from mcl_runtime.model.loader import load_model
from mcl_runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from mcl_runtime.engine.structured import Grammars

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device, checkpoint_dtype: str | None) -> str:
    """The dtype an engine runs in when none is given (``"auto"``): bfloat16 on CUDA; on the CPU a
    bfloat16 checkpoint's own dtype where torch's bfloat16 GEMMs are oneDNN's (AVX-512 / AMX; as
    vLLM's and transformers' ``auto`` keep it), else float32 (a float32 or float16 checkpoint, or a
    CPU where torch's bfloat16 GEMM is a generic loop)."""
    if device.type == "cuda":
        return "bfloat16"
    return "bfloat16" if checkpoint_dtype == "bfloat16" and NATIVE_BF16_GEMM else "float32"


# A text prompt longer than this many characters per context token is first measured by a prefix
# of that length, so that a huge prompt is refused without tokenizing all of it.
_PREFIX_CHARS_PER_TOKEN = 8
_PREFIX_SLACK = 64  # tokens a cut in mid-word may add


class Engine:
    """Multi-LoRA generation over a shared paged KV cache. See docs/architecture.md."""

    def __init__(
        self,
        model: str | Path,
        adapters: dict[str, str | Path] | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: str | Backend | None = None,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        kv_cache_blocks: int | None = None,
        kv_cache_memory: int | str | None = None,
        kv_cache_memory_fraction: float | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        served_model_name: str | None = None,
        load_format: str = "auto",
        revision: str | None = None,
        overlap: bool | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        cuda_graphs: bool | None = None,
    ) -> None:
        """``dtype``: float32, float16 or bfloat16; None or "auto" for ``default_dtype`` (the
        checkpoint's bfloat16 on a CPU with native bfloat16 GEMMs, else float32 on the CPU; bfloat16 on
        CUDA). ``max_num_batched_tokens``: the tokens of one step (None: ``scheduler.default_step_tokens``,
        2048 on a GPU, fewer on the CPU). ``compile_backend``: torch.compile's backend for
        ``compile=True`` ("aot_eager" traces the same graph without generating code)."""
        model_dir = resolve_path(model, revision=revision)
        self.model_name = served_model_name or display_name(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if compile and self.device.type == "cpu":
            # The compiled decode runs Inductor's code in place of the cpu backend's C++ kernels
            # (benchmarks/README.md, run history: several times slower than eager on the CPU).
            logger.warning(
                "compile=True on the CPU: the compiled decode step replaces the C++ kernels of the eager "
                "path and is several times slower than eager decoding; leave it off on the CPU for speed"
            )
        config = load_config(model_dir)
        if dtype in (None, "auto"):
            dtype = default_dtype(self.device, config.checkpoint_dtype)
            logger.info("dtype: %s (checkpoint: %s)", dtype, config.checkpoint_dtype or "not given")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        if not isinstance(max_loras, int) or max_loras < 0:
            raise ValueError(f"max_loras must be a non-negative integer (0: no adapters), got {max_loras!r}")
        for knob, value in (
            ("max_lora_rank", max_lora_rank),
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", 1 if max_num_batched_tokens is None else max_num_batched_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{knob} must be a positive integer, got {value!r}")
        self.dtype = _DTYPES[dtype]
        self.max_model_len = config.context_len(max_model_len)
        self.model = load_model(model_dir, max_loras, max_lora_rank, self.dtype, self.device, load_format)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        cfg = self.model.config
        if max_num_batched_tokens is None:
            widest = max(2 * cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size) * self.dtype.itemsize
            max_num_batched_tokens = default_step_tokens(self.device.type, widest, max_num_seqs)
        logger.info("step token budget: max_num_batched_tokens=%d", max_num_batched_tokens)
        self.block_size = block_size
        self.backend = make_backend(backend or ("triton" if self.device.type == "cuda" else "cpu"))
        # Before sizing the KV cache. Compiled graphs read the plain weights; eager steps need only
        # the backend's copies, unless it keeps the plain ones for steps of its budget's size. The
        # plain tensors it no longer reads are freed one weight at a time (the two copies of such a
        # weight never coexist).
        for weight in self.model.linear_weights():
            released = self.backend.prepare_weights([weight], keep_plain=compile, max_rows=max_num_batched_tokens)
            self.model.release_weights(released)
        self.kv_plan = self._kv_cache_plan(max_num_seqs, kv_cache_blocks, kv_cache_memory, kv_cache_memory_fraction)
        num_blocks = self.kv_plan.num_blocks
        # One block more than the block manager hands out: the scratch block of padded decode rows.
        self.kv_cache = allocate_kv_cache(
            (cfg.num_layers, 2, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim), self.dtype, self.device
        )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.adapter_manager = AdapterManager(self.model, max_loras, max_lora_rank)
        self.table = SequenceTable(cfg.vocab_size, self.tokenizer.eos_token_ids, max_num_seqs)
        self.scheduler = Scheduler(
            self.block_manager, self.adapter_manager, self.table, max_num_seqs, max_num_batched_tokens
        )
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.backend.name == "triton"
        elif cuda_graphs and (self.device.type != "cuda" or self.backend.name != "triton"):
            raise ValueError("cuda_graphs=True needs device='cuda' and the triton backend")
        self.runner = ModelRunner(
            self.model,
            self.backend,
            self.kv_cache,
            self.block_manager,
            self.table,
            self.adapter_manager.slot_ranks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            compile=compile,
            compile_backend=compile_backend,
            cuda_graphs=cuda_graphs,
        )
        self._grammars = None  # structured.Grammars, built with the first constrained request
        # Launch step N + 1 before postprocessing step N (one step of lag; same tokens), except
        # after a step that forks or masks a constrained row (see step()).
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        self._inflight: SampledTokens | None = None
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._stats = {
            "steps": 0,
            "prompt_tokens_total": 0,
            "generation_tokens_total": 0,
            "max_batch_size_seen": 0,
            "requests_total": 0,
            "batched_tokens_total": 0,
            "batched_seqs_total": 0,
        }
        self.requests_per_adapter: dict[str, int] = {}
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    def _kv_cache_plan(
        self,
        max_num_seqs: int,
        blocks: int | None,
        memory: int | str | None,
        fraction: float | None,
    ) -> KVCachePlan:
        """The KV cache's size (``kv_cache.plan_kv_cache``), logged with a warning when it bounds the batch."""
        cfg = self.model.config
        block_bytes = 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        plan = plan_kv_cache(
            block_bytes,
            self.block_size,
            self.device,
            max_num_seqs,
            self.max_model_len,
            kv_cache_blocks=blocks,
            kv_cache_memory=None if memory is None else parse_bytes(memory),
            kv_cache_memory_fraction=fraction,
        )
        log_kv_cache(plan, max_num_seqs, self.max_model_len)
        return plan

    # ---- adapters ----------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return self.adapter_manager.names

    def load_adapter(self, name: str, path: str | Path, replace: bool = False) -> None:
        """``replace``: swap an adapter of that name in place (new requests get the new weights,
        running ones finish on the old; the prefix cache never mixes them)."""
        self.adapter_manager.load(name, path, replace)

    def unload_adapter(self, name: str) -> None:
        self.adapter_manager.unload(name)

    @property
    def grammars(self) -> Grammars:
        """The compiler of structured-output constraints for this engine's tokenizer (built on first
        use: xgrammar is imported only by engines that serve a constrained request)."""
        if self._grammars is None:
            try:
                from mcl_runtime.engine.structured import GrammarMasker, Grammars
            except ImportError as exc:
                raise InvalidRequestError(
                    f"structured outputs need xgrammar, which could not be imported ({exc})"
                ) from exc
            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
            self.runner.grammar = GrammarMasker(self.model.config.vocab_size)
        return self._grammars

    # ---- requests ----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text prompt; a text far beyond the context is refused from a prefix,
        without tokenizing all of it (``add_request`` checks the exact length). Safe to call from
        any thread."""
        if not isinstance(text, str):
            raise InvalidRequestError("a prompt is a string or a list of token ids", param="prompt")
        cut = _PREFIX_CHARS_PER_TOKEN * self.max_model_len
        if len(text) > cut and len(self.tokenizer.encode(text[:cut])) > self.max_model_len + _PREFIX_SLACK:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has more."
            )
        return self.tokenizer.encode(text)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if ids and not 0 <= min(ids) <= max(ids) < self.model.config.vocab_size:
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {self.model.config.vocab_size})", param="prompt"
                )
        else:
            raise InvalidRequestError("a prompt is a string or a list of token ids", param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        limit = min(self.max_model_len, self.block_manager.num_blocks * self.block_size)
        if len(ids) >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{len(ids)} tokens (it needs room for at least one generated token)"
            )
        return ids

    def _request(
        self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None, adapter: str | None
    ) -> Request:
        """The validated request: every check a request gets is made here."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        if params.n > self.scheduler.max_num_seqs:
            raise InvalidRequestError(
                f"n={params.n} completions exceed max_num_seqs={self.scheduler.max_num_seqs}, "
                "the sequences one step can hold",
                param="n",
            )
        if params.max_tokens is not None and params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens ({params.max_tokens}) exceeds the model's context length ({self.max_model_len} tokens)",
                param="max_tokens",
            )
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        uid = 0 if adapter is None else self.adapter_manager.uid(adapter)
        ids = self._prompt_ids(prompt)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.seed is None:
            seeds = [int(s) for s in self._rng.integers(0, 2**63, size=params.n)]
        else:
            seeds = [(params.seed * 0x9E3779B97F4A7C15 + i) % 2**64 for i in range(params.n)]
        return Request(request_id, ids, params, adapter, uid, max_tokens, seeds)

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        stream: bool = False,
    ) -> str:
        """Queue a request; raises ``InvalidRequestError`` (``ContextLengthError``,
        ``AdapterNotFoundError``) for bad input. ``stream=True``: its text is built every step
        (incrementally), for a reader of every output; ``output_kind="delta"`` implies it."""
        req = self._request(request_id, prompt, params, adapter)
        params = req.params
        matcher = self.grammars.matcher(params.structured) if params.structured is not None else None
        detok = stream or params.output_kind == "delta" or bool(params.stop_strings)
        text = TextStream(self.tokenizer, req.prompt_token_ids, params.stop_strings) if detok else None
        self.scheduler.add(req, text, matcher)
        self._stats["requests_total"] += 1
        self._stats["prompt_tokens_total"] += req.num_prompt_tokens
        key = adapter or self.model_name
        self.requests_per_adapter[key] = self.requests_per_adapter.get(key, 0) + 1
        return req.request_id

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests) or self._inflight is not None

    # ---- the step ----------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Schedule and launch a step, then postprocess the step before it (overlap) or this one;
        returns the outputs of the requests that progressed (cheap snapshots, text built when
        read), or with ``finished_only`` only of those that ended (what ``generate`` reads).

        A step that forks (its sequences multiply) or that masks a constrained row (the next mask
        depends on the token its matcher accepts) is postprocessed at once, before the next step is
        scheduled: such a step is synchronous, whatever ``overlap`` says."""
        batch = self.scheduler.schedule()
        launched = None
        if batch.num_seqs:
            prev = self._inflight.tokens if self._inflight is not None else None
            launched = self.runner.run(batch, prev)
            self._count(batch)
        previous, self._inflight = self._inflight, launched
        done = [previous] if previous is not None else []
        if launched is not None and (not self.overlap or batch.forks or launched.constrained):
            done.append(launched)
            self._inflight = None
        progressed: list[Sequence] = list(batch.finished)
        for sampled in done:
            seqs = self.scheduler.postprocess(sampled.rows, sampled.seq_ids, sampled.counts, sampled.host())
            self._stats["generation_tokens_total"] += len(seqs)
            progressed += seqs
        if not self.scheduler.requests:  # whatever is still in flight belongs to ended requests
            self._inflight = None
        if finished_only:
            reqs: Iterable[Request] = dict.fromkeys(s.request for s in progressed if s.request.finished)
        elif len(progressed) > 1:  # a request's completions share its output
            reqs = dict.fromkeys(s.request for s in progressed)
        else:
            reqs = [s.request for s in progressed]
        return request_outputs(reqs, self.tokenizer)

    def _count(self, batch) -> None:
        stats = self._stats
        stats["steps"] += 1
        stats["batched_tokens_total"] += batch.num_tokens
        stats["batched_seqs_total"] += batch.num_seqs
        stats["max_batch_size_seen"] = max(stats["max_batch_size_seen"], batch.num_seqs)

    # ---- batch API -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | None | Seq[str | None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (batched together); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params_list) != n or len(adapters) != n:
            raise InvalidRequestError(
                f"{n} prompts need as many params and adapters (got {len(params_list)} and {len(adapters)})"
            )
        ids = [self.add_request(None, p, sp, a) for p, sp, a in zip(prompts, params_list, adapters)]
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="generate")
        try:
            while len(results) < n:
                for out in self.step(finished_only=True):
                    results[out.request_id] = out
                    if bar:
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [results[rid] for rid in ids]

    def stats(self) -> dict:
        bm, scheduler = self.block_manager, self.scheduler
        return {
            **self._stats,
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "prefix_cache_hit_tokens": scheduler.num_cached_tokens,
            "num_preemptions": scheduler.num_preemptions,
            "adapter_slot_loads": self.adapter_manager.num_slot_loads,
            "requests_per_adapter": dict(self.requests_per_adapter),
        }

    def lora_stats(self) -> dict:
        """Adapter state for routers, computed on demand (not every step): the number of device slots,
        the adapters resident in them, and the running and waiting requests per adapter."""
        running = Counter(
            req.adapter for req in {self.table.seqs[row].request for row in self.scheduler.running} if req.adapter
        )
        waiting = Counter(req.adapter for req in {seq.request for seq in self.scheduler.waiting} if req.adapter)
        return {
            "max_loras": self.adapter_manager.num_slots,
            "lora_resident": self.adapter_manager.resident,
            "lora_running": dict(running),
            "lora_waiting": dict(waiting),
        }
