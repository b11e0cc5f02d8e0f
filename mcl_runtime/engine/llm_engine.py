"""The engine: requests in, one batched step at a time, outputs out. Knows no HTTP and no agents."""
from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Sequence as Seq

import numpy as np
import torch

from mcl_runtime.engine.adapter_manager import AdapterManager
from mcl_runtime.engine.block_manager import BlockManager
from mcl_runtime.engine.model_runner import ModelRunner
from mcl_runtime.engine.params import RequestOutput, SamplingParams
from mcl_runtime.engine.scheduler import Scheduler
from mcl_runtime.engine.sequence import Request, Sequence, Status
from mcl_runtime.engine.structured import GrammarMasker, Grammars, accept
from mcl_runtime.errors import ContextLengthError, InvalidRequestError
from mcl_runtime.model.backends import make_backend
from mcl_runtime.model.loader import load_model
from mcl_runtime.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_KV_CACHE_BYTES = 256 << 20


def _resolve_model(model: str | Path | None, adapters: dict | None) -> tuple[Path, dict, str]:
    """Model folder, adapters and served name; no model (or its name) means the demo model."""
    from mcl_runtime.demo import DEMO_MODEL_NAME, demo_adapter_dirs, demo_model_dir

    if model is None or str(model) == DEMO_MODEL_NAME:
        return demo_model_dir() / "base", demo_adapter_dirs() if adapters is None else adapters, DEMO_MODEL_NAME
    path = Path(model)
    is_demo = path.name == "base" and path.parent.name == DEMO_MODEL_NAME
    return path, adapters or {}, DEMO_MODEL_NAME if is_demo else path.name


class Engine:
    """Multi-LoRA generation over a shared paged KV cache. See docs/internals.md for the API."""

    def __init__(self, model: str | Path | None = None, adapters: dict[str, str | Path] | None = None,
                 device: str | None = None, dtype: str | None = None, backend: str | None = None,
                 max_loras: int = 8, max_lora_rank: int = 64, kv_cache_blocks: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, seed: int = 0,
                 served_model_name: str | None = None, load_format: str = "auto") -> None:
        model_dir, adapters, default_name = _resolve_model(model, adapters)
        self.model_name = served_model_name or default_name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        for knob, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank), ("block_size", block_size),
                            ("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{knob} must be a positive integer, got {value!r}")
        self.dtype = _DTYPES[dtype]
        self.model = load_model(model_dir, max_loras, max_lora_rank, self.dtype, self.device, load_format)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        cfg = self.model.config
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.block_size = block_size
        num_blocks = kv_cache_blocks or self._default_kv_blocks(max_num_seqs)
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=self.dtype, device=self.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.adapter_manager = AdapterManager(self.model, max_loras, max_lora_rank)
        self.scheduler = Scheduler(self.block_manager, self.adapter_manager, max_num_seqs, max_num_batched_tokens)
        self.backend = make_backend(backend or ("triton" if self.device.type == "cuda" else "torch"))
        self.runner = ModelRunner(self.model, self.backend, self.kv_cache, self.block_manager,
                                  self.adapter_manager.slot_ranks, self.tokenizer.eos_token_ids)
        self._grammars = None   # structured.Grammars, built with the first constrained request
        self._eos = set(self.tokenizer.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._stats = {"steps": 0, "prompt_tokens_total": 0, "generation_tokens_total": 0,
                       "max_batch_size_seen": 0, "requests_total": 0, "batched_tokens_total": 0,
                       "batched_seqs_total": 0}
        self.requests_per_adapter: dict[str, int] = {}
        for name, path in adapters.items():
            self.load_adapter(name, path)

    def _default_kv_blocks(self, max_num_seqs: int) -> int:
        cfg = self.model.config
        block_bytes = 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.9) - (2 << 30)
        else:
            budget = CPU_KV_CACHE_BYTES
        wanted = max_num_seqs * math.ceil(self.max_model_len / self.block_size)
        return max(min(budget // block_bytes, wanted), 16)

    # ---- adapters ----------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return self.adapter_manager.names

    def load_adapter(self, name: str, path: str | Path) -> None:
        self.adapter_manager.load(name, path)

    def unload_adapter(self, name: str) -> None:
        self.adapter_manager.unload(name)

    @property
    def grammars(self) -> Grammars:
        """The compiler of structured-output constraints for this engine's tokenizer (built on first use)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
            self.runner.grammar = GrammarMasker(self.model.config.vocab_size)
        return self._grammars

    # ---- requests ----------------------------------------------------------------------------
    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if ids and not 0 <= min(ids) <= max(ids) < self.model.config.vocab_size:
                raise InvalidRequestError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        else:
            raise InvalidRequestError("a prompt is a string or a list of token ids")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        capacity = self.block_manager.num_blocks * self.block_size
        if len(ids) >= min(self.max_model_len, capacity):
            limit = min(self.max_model_len, capacity)
            raise ContextLengthError(f"This model's maximum context length is {limit} tokens, but the prompt has "
                                     f"{len(ids)} tokens (it needs room for at least one generated token)")
        return ids

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    adapter: str | None = None) -> str:
        """Queue a request; raises ``InvalidRequestError``/``AdapterNotFoundError`` for bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        uid = 0 if adapter is None else self.adapter_manager.uid(adapter)
        ids = self._tokenize(prompt)
        matcher = self.grammars.matcher(params.structured) if params.structured is not None else None
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        if params.seed is None:
            seeds = [int(s) for s in self._rng.integers(0, 2**63, size=params.n)]
        else:
            seeds = [(params.seed * 0x9E3779B97F4A7C15 + i) % 2**64 for i in range(params.n)]
        req = Request(request_id, ids, params, adapter, uid, max_tokens, seeds)
        seq = Sequence(req, 0, list(ids), seeds[0])
        seq.detok = IncrementalDetokenizer(self.tokenizer, ids)
        seq.matcher = matcher
        req.seqs.append(seq)
        self._requests[request_id] = req
        self.scheduler.add(seq)
        self._stats["requests_total"] += 1
        self._stats["prompt_tokens_total"] += len(ids)
        key = adapter or self.model_name
        self.requests_per_adapter[key] = self.requests_per_adapter.get(key, 0) + 1
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(str(request_id), None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return self._unstick()
        self._stats["steps"] += 1
        self._stats["batched_tokens_total"] += batch.num_tokens
        self._stats["batched_seqs_total"] += len(batch.seqs)
        self._stats["max_batch_size_seen"] = max(self._stats["max_batch_size_seen"], len(batch.seqs))
        sampled = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
        touched: dict[str, Request] = {}
        for seq, tokens in sampled:
            if len(tokens) > 1:
                self._fork(seq, len(tokens))
            for target, token in zip(seq.request.seqs if len(tokens) > 1 else [seq], tokens):
                self._append_token(target, token)
            touched[seq.request.request_id] = seq.request
        return [self._emit(req) for req in touched.values()]

    def _unstick(self) -> list[RequestOutput]:
        """Nothing could be scheduled although work waits: the head sequence needs more KV blocks
        than the whole cache holds. It ends with finish_reason "length"."""
        if not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting[0]
        seq.finish_reason = "length"
        self.scheduler.finish(seq)
        return [self._emit(seq.request)]

    def _fork(self, parent: Sequence, n: int) -> None:
        req = parent.request
        for i in range(1, n):
            child = Sequence(req, i, list(parent.token_ids), req.seeds[i])
            child.num_computed = parent.num_computed
            child.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
            child.matcher = parent.matcher.fork() if parent.matcher is not None else None
            child.slot = self.adapter_manager.acquire(req.adapter)
            child.status = Status.RUNNING
            self.block_manager.fork(parent.seq_id, child.seq_id)
            self.scheduler.running.append(child)
            req.seqs.append(child)

    def _append_token(self, seq: Sequence, token: int) -> None:
        req, params = seq.request, seq.request.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        seq.token_ids.append(token)
        delta = seq.detok.add([token])
        seq.text += delta
        self._stats["generation_tokens_total"] += 1
        reason, truncated = None, False
        if seq.matcher is not None and accept(seq.matcher, token):
            reason = "stop"
        elif (token in self._eos and not params.ignore_eos) or token in (params.stop_token_ids or ()):
            reason = "stop"
        elif params.stop_strings and self._truncate_at_stop(seq, len(delta)):
            reason, truncated = "stop", True
        elif seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            if not truncated:
                seq.text += seq.detok.flush()
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    @staticmethod
    def _truncate_at_stop(seq: Sequence, delta_len: int) -> bool:
        for stop in seq.request.params.stop_strings:
            at = seq.text.find(stop, max(0, len(seq.text) - delta_len - len(stop) + 1))
            if at >= 0:
                seq.text = seq.text[:at]
                return True
        return False

    def _emit(self, req: Request) -> RequestOutput:
        out = req.output()
        if not out.finished:
            for o, seq in zip(out.outputs, sorted(req.seqs, key=lambda s: s.index)):
                if not seq.finished:
                    o.text = _hold_back_stop_prefix(o.text, req.params.stop_strings)
        if req.finished:
            self._requests.pop(req.request_id, None)
        return out

    # ---- batch API -----------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 adapter: str | None | Seq[str | None] = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (batched together); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params_list) != n or len(adapters) != n:
            raise InvalidRequestError(f"{n} prompts need as many params and adapters "
                                      f"(got {len(params_list)} and {len(adapters)})")
        ids = [self.add_request(None, p, sp, a) for p, sp, a in zip(prompts, params_list, adapters)]
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=n, desc="generate")
        try:
            while len(results) < n:
                for out in self.step():
                    if out.finished:
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
        bm = self.block_manager
        return {**self._stats,
                "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_blocks_total": bm.num_blocks, "kv_blocks_free": bm.num_free_blocks,
                "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
                "prefix_cache_hit_tokens": self.scheduler.num_cached_tokens,
                "num_preemptions": self.scheduler.num_preemptions,
                "adapter_slot_loads": self.adapter_manager.num_slot_loads,
                "requests_per_adapter": dict(self.requests_per_adapter)}


def _hold_back_stop_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Text safe to show while running: a suffix that may begin a stop string is held back."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[:len(text) - hold] if hold else text
