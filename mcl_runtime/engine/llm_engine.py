"""The engine: requests in, one batched step at a time, outputs out. Knows no HTTP and no agents."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcl_runtime.engine.adapter_manager import AdapterManager
from mcl_runtime.engine.block_manager import BlockManager
from mcl_runtime.engine.model_runner import ModelRunner, SampledTokens
from mcl_runtime.engine.outputs import TextStream, request_outputs
from mcl_runtime.engine.params import RequestOutput, SamplingParams
from mcl_runtime.engine.scheduler import ScheduledBatch, Scheduler
from mcl_runtime.engine.seq_table import FINISH_REASONS, STOPPED, SequenceTable
from mcl_runtime.engine.sequence import PENDING, Request, Sequence
from mcl_runtime.errors import ContextLengthError, InvalidRequestError
from mcl_runtime.hub import display_name, resolve_path
from mcl_runtime.model.backends import make_backend
from mcl_runtime.model.config import load_config
from mcl_runtime.model.loader import load_model
from mcl_runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from mcl_runtime.engine.structured import Grammars

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_KV_CACHE_BYTES = 256 << 20


class Engine:
    """Multi-LoRA generation over a shared paged KV cache. See docs/internals.md for the API."""

    def __init__(
        self,
        model: str | Path,
        adapters: dict[str, str | Path] | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: str | None = None,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        kv_cache_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        served_model_name: str | None = None,
        load_format: str = "auto",
        revision: str | None = None,
        overlap: bool | None = None,
        compile: bool = False,
        cuda_graphs: bool | None = None,
    ) -> None:
        model_dir = resolve_path(model, revision=revision)
        self.model_name = served_model_name or display_name(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        for knob, value in (
            ("max_loras", max_loras),
            ("max_lora_rank", max_lora_rank),
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{knob} must be a positive integer, got {value!r}")
        self.dtype = _DTYPES[dtype]
        self.max_model_len = load_config(model_dir).context_len(max_model_len)
        self.model = load_model(model_dir, max_loras, max_lora_rank, self.dtype, self.device, load_format)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        cfg = self.model.config
        self.block_size = block_size
        num_blocks = kv_cache_blocks or self._default_kv_blocks(max_num_seqs)
        # One block more than the block manager hands out: the scratch block of padded decode rows.
        self.kv_cache = torch.zeros(
            cfg.num_layers,
            2,
            num_blocks + 1,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.adapter_manager = AdapterManager(self.model, max_loras, max_lora_rank)
        self.table = SequenceTable(cfg.vocab_size, self.tokenizer.eos_token_ids, max_num_seqs)
        self.scheduler = Scheduler(
            self.block_manager, self.adapter_manager, self.table, max_num_seqs, max_num_batched_tokens
        )
        self.backend = make_backend(backend or ("triton" if self.device.type == "cuda" else "cpu"))
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.backend.name == "triton"
        elif cuda_graphs and (self.device.type != "cuda" or self.backend.name != "triton"):
            raise ValueError("cuda_graphs=True needs device='cuda' and the triton backend")
        self.runner = ModelRunner(
            self.model,
            self.backend,
            self.kv_cache,
            self.block_manager,
            self.adapter_manager.slot_ranks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            compile=compile,
            cuda_graphs=cuda_graphs,
        )
        self._grammars = None  # structured.Grammars, built with the first constrained request
        # Launch step N + 1 before processing step N's tokens (one step of lag; same tokens), except
        # after a step that forks or masks a constrained row (see step()).
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        self._inflight: SampledTokens | None = None
        self._requests: dict[str, Request] = {}
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
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{len(ids)} tokens (it needs room for at least one generated token)"
            )
        return ids

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        stream: bool = False,
    ) -> str:
        """Queue a request; raises ``InvalidRequestError``/``AdapterNotFoundError`` for bad input.
        ``stream=True``: its text is built every step (incrementally), for a reader of every output."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        if params.n > self.scheduler.max_num_seqs:
            raise InvalidRequestError(
                f"n={params.n} completions exceed max_num_seqs={self.scheduler.max_num_seqs}, "
                "the sequences one step can hold"
            )
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
        req = Request(request_id, ids, params, adapter, uid, max_tokens, seeds, stream)
        detok = stream or bool(params.stop_strings)
        seq = self.scheduler.add(req, detok, matcher)
        if detok:
            seq.text = TextStream(self.tokenizer, ids, params.stop_strings)
        self._requests[request_id] = req
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
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or self._inflight is not None

    # ---- the step ----------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Schedule and launch a step, then process the tokens of the step before it (overlap) or
        of this one; returns the requests that progressed (cheap snapshots, text built when read),
        or with ``finished_only`` only those that ended (what ``generate`` reads).

        A step that forks (its sequences multiply) or that masks a constrained row (the next mask
        depends on the token its matcher accepts) is processed at once, before the next step is
        scheduled: such a step is synchronous, whatever ``overlap`` says. Unconstrained steps overlap."""
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch.seqs else None
        previous, self._inflight = self._inflight, launched
        outs = self._process(previous, finished_only) if previous is not None else []
        if launched is not None and (not self.overlap or batch.forks or launched.constrained):
            self._inflight = None
            outs += self._process(launched, finished_only)
        if not self._requests:  # whatever is still in flight belongs to ended requests
            self._inflight = None
        if launched is None and previous is None:
            return self._unstick()
        return outs

    def _launch(self, batch: ScheduledBatch) -> SampledTokens:
        self._stats["steps"] += 1
        self._stats["batched_tokens_total"] += batch.num_tokens
        self._stats["batched_seqs_total"] += len(batch.seqs)
        self._stats["max_batch_size_seen"] = max(self._stats["max_batch_size_seen"], len(batch.seqs))
        prev = self._inflight.tokens if self._inflight is not None else None
        sampled = self.runner.run(batch, prev)
        num_new = sampled.num_new
        if len(sampled.seqs) < len(batch.seqs):  # mid-prefill chunks sample nothing
            for seq, n in zip(batch.seqs, batch.num_new):
                seq.num_computed += n
            num_new = itertools.repeat(0)
        positions = sampled.positions
        for k, n, seq in zip((np.cumsum(sampled.counts) - sampled.counts).tolist(), num_new, sampled.seqs):
            seq.num_computed += n
            ids = seq.token_ids
            positions.append(len(ids))
            ids.append(PENDING)
            seq.pending_row = k
        self.table.num_sampled[sampled.rows] += 1
        return sampled

    def _process(self, sampled: SampledTokens, finished_only: bool = False) -> list[RequestOutput]:
        """Record a launched step's tokens: values, finish checks (vectorised), grammar matchers and
        text only for the rows that have them."""
        tokens = sampled.host()
        seqs, positions, rows = sampled.seqs, sampled.positions, sampled.rows
        seq_ids = sampled.seq_ids
        if len(tokens) > len(seqs):
            seqs, positions = self._fork(sampled)
            rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
            seq_ids = np.fromiter((s.seq_id for s in seqs), dtype=np.int64, count=len(seqs))
        live = self.table.seq_id[rows] == seq_ids  # a sequence that ended after the launch freed its row
        if not live.all():
            keep = np.flatnonzero(live).tolist()
            seqs, positions, tokens, rows = (
                [seqs[i] for i in keep],
                [positions[i] for i in keep],
                tokens[keep],
                rows[keep],
            )
        if not seqs:
            return []
        values = tokens.tolist()
        for seq, p, t in zip(seqs, positions, values):
            seq.token_ids[p] = t
        codes = self.table.record(rows, tokens)
        for i in np.flatnonzero(self.table.constrained[rows]).tolist():
            if self._grammars.accept(seqs[i].matcher, values[i]):  # the grammar is complete (or rejected the token)
                codes[i] = STOPPED
        for i in np.flatnonzero(self.table.detok[rows]).tolist():
            if seqs[i].text.add(values[i]):
                codes[i] = STOPPED
        self._stats["generation_tokens_total"] += len(seqs)
        ended = np.flatnonzero(codes).tolist()
        for i in ended:
            seq = seqs[i]
            del seq.token_ids[positions[i] + 1 :]  # a token launched after the end is dropped
            if seq.text is not None:
                seq.text.finish()
            self._finish(seq, FINISH_REASONS[int(codes[i])])
        if finished_only:
            reqs = dict.fromkeys(req for req in (seqs[i].request for i in ended) if req.finished)
        elif (self.table.n[rows] > 1).any():  # a request's completions share its output
            reqs = dict.fromkeys(s.request for s in seqs)
        else:
            reqs = [s.request for s in seqs]
        return self._outputs(reqs)

    def _fork(self, sampled: SampledTokens) -> tuple[list[Sequence], list[int]]:
        """Sequences and token positions of each sample; a request's n first samples fork it."""
        seqs, positions = [], []
        for seq, p, c in zip(sampled.seqs, sampled.positions, sampled.counts.tolist()):
            positions += [p] * c
            if c == 1 or seq.finished:
                seqs += [seq] * c
                continue
            children = self.scheduler.fork(seq)
            if seq.text is not None:
                for child in children:
                    child.text = TextStream(self.tokenizer, seq.request.prompt_token_ids, seq.text.stops)
            seqs += [seq] + children
        return seqs, positions

    def _outputs(self, reqs: Iterable[Request]) -> list[RequestOutput]:
        return request_outputs(reqs, self.tokenizer)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if seq.request.finished:
            self._requests.pop(seq.request.request_id, None)

    def _unstick(self) -> list[RequestOutput]:
        """Nothing could be scheduled although work waits: the head sequence needs more KV blocks
        than the whole cache holds. It ends with finish_reason "length"."""
        if not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting[0]
        if seq.text is not None:
            seq.text.finish()
        self._finish(seq, "length")
        return self._outputs([seq.request])

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
        return {
            **self._stats,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "prefix_cache_hit_tokens": self.scheduler.num_cached_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "adapter_slot_loads": self.adapter_manager.num_slot_loads,
            "requests_per_adapter": dict(self.requests_per_adapter),
        }
