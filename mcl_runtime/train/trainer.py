"""``SFTTrainer``: TRL's ``SFTTrainer`` with five changes that cut the work of training; none changes
the loss of a batch, its gradients or the metrics logged.

- The LM head. TRL patches the model with a fused LM head (``trl.trainer.utils.add_fused_lm_head``): a
  forward called with ``fused_lm_head=True`` returns, per next-token label, its log-probability, the
  entropy of the distribution and whether the label is the top-1 token (zero where the label is -100);
  TRL's ``compute_loss`` takes the loss from the first and the ``entropy`` and ``mean_token_accuracy``
  metrics from the other two. With Triton (CUDA, XPU) that head projects only the labelled positions;
  elsewhere, the CPU included, it projects every position of the batch (prompt and padding too) over
  the whole vocabulary. There, ``add_answer_head`` gives the same outputs from the LM head run on the
  labelled positions only. TRL's ``compute_loss`` stays as it is (the loss summed over the labels and
  divided by ``num_items_in_batch``, scaled for ``average_tokens_across_devices``, its metrics), and
  the forward is still called through the model and what wraps it (PEFT, DDP).
- The batches. transformers' ``group_by_length`` sorts the examples within four mega-batches of the
  epoch (at most 50 batches each) and moves the longest example to the first batch, which leaves more
  padding than sorting over larger groups. ``LengthBuckets`` sorts within groups of 64 optimizer
  steps and shuffles the steps, so a step's examples are those of the same global step whatever the
  split into processes, micro-batches and accumulation steps.
- The FLOPs estimate (``total_flos``): transformers counts the model's parameters, walking every
  module, on every step; they are counted once.
- The heap on the CPU. glibc's malloc gives the free top of its heap back to the system once it
  exceeds a threshold (by default twice the largest block it has had to map on its own, ~20 MB
  here); the activations freed at the end of a step are often that top, and the next step faults
  them in again page by page (measured on the demo model at batch 8: 280-420k page faults and
  0.7-1.0 s of system time in 16 steps against ~100k and 0.2 s, 35-45 ms a step, depending on where
  the last live blocks of a step happen to lie, which differs from run to run and from the
  hand-written loop's). ``train()`` on the CPU sets the thresholds (``keep_freed_heap``): blocks up to
  32 MB come from the heap and up to ``HEAP_KEPT`` of freed heap is kept for the next step. The
  setting is the process's and stays after training (the training command's process).
- The garbage collection at the start of ``train()``: transformers' loop begins with accelerate's
  ``free_memory()``, whose ``gc.collect()`` walks every object of the process (about 0.3 s on two cores
  with torch, transformers and TRL imported, whatever the model). ``train()`` freezes the objects that
  exist when it starts (``gc.freeze``) and unfreezes them when it ends, so that collection, and any
  automatic one during training, walks only the objects training creates. Garbage from before
  ``train()`` (a previous trainer's model, say) is therefore freed after training, not before:
  ``sft.train_agents`` collects between adapters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import types
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import pyarrow.compute
import torch
import trl
from torch.utils.data import Sampler
from transformers.utils import is_triton_available
from trl.trainer.utils import FusedCausalLMOutput

from mcl_runtime.train.data import IGNORE_INDEX

# glibc's mallopt parameters (malloc.h) and the values keep_freed_heap sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit
HEAP_KEPT = 1 << 30  # freed heap kept for reuse rather than given back to the system
BUCKET_STEPS = 64  # optimizer steps whose examples are sorted by length together
# Config fields with which a model transforms its logits after the LM head (scaling, soft-capping):
# TRL's head applies them, ``add_answer_head`` does not, so such models keep TRL's
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def add_answer_head(model: Any) -> None:
    """Wrap ``model``'s fused LM head (TRL's, already on this causal LM, not on its PEFT wrapper) so that
    ``fused_lm_head=True`` projects only the positions with a label. The calls it does not cover go to
    TRL's head: no ``fused_lm_head``, pre-shifted ``shift_labels`` (context or sequence parallelism),
    MoE router logits, models that scale or soft-cap their logits."""
    fused_forward = model.forward
    config = model.config.get_text_config()
    plain_logits = all(getattr(config, name, None) is None for name in LOGIT_TRANSFORMS)

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        router_logits = kwargs.get("output_router_logits") or getattr(config, "output_router_logits", False)
        covered = fused_lm_head and labels is not None and "shift_labels" not in kwargs
        if not covered or not plain_logits or router_logits:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        rows = targets[mask]
        log_softmax = self.get_output_embeddings()(hidden[mask]).float().log_softmax(-1)
        log_probs = log_softmax.gather(-1, rows.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():  # metrics only: TRL's compute_loss detaches them
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            is_top1 = log_softmax.argmax(-1) == rows  # the first maximum, as TRL counts ties

        def per_position(values: torch.Tensor) -> torch.Tensor:
            # zero where the label is -100; masked_scatter keeps a batch without labels in the graph
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        log_probs = per_position(log_probs)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=per_position(entropy),
            is_top1=per_position(is_top1),
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


def keep_freed_heap() -> bool:
    """Make glibc's malloc serve blocks up to 32 MB from its heap and keep up to ``HEAP_KEPT`` of freed
    heap instead of giving it back to the system (and faulting it in again) after every training step;
    False where the C library is not glibc (no ``mallopt``), which is then left as it is. Setting a
    threshold turns off glibc's own adjustment of both, so both are set."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_KEPT))


class LengthBuckets(Sampler[int]):
    """An epoch of example indices in optimizer steps of ``step_size`` examples (the batches of every
    process and accumulation step) of similar lengths: shuffled, sorted by length within groups of
    ``BUCKET_STEPS`` steps, cut into steps, the steps shuffled (a shorter last step stays last, where
    the data loader expects it); seeded, reshuffled each epoch."""

    def __init__(self, lengths: Sequence[int], step_size: int, seed: int) -> None:
        self.lengths, self.step_size, self.seed, self.epoch = list(lengths), step_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=rng).tolist()
        group = self.step_size * BUCKET_STEPS
        steps = []
        for start in range(0, len(order), group):
            by_length = sorted(order[start : start + group], key=self.lengths.__getitem__)
            steps += [by_length[i : i + self.step_size] for i in range(0, len(by_length), self.step_size)]
        last = [steps.pop()] if steps and len(steps[-1]) < self.step_size else []
        steps = [steps[i] for i in torch.randperm(len(steps), generator=rng).tolist()] + last
        return iter([i for step in steps for i in step])


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose LM head projects only the labelled positions where TRL's has no Triton
    kernel (``add_answer_head``), whose ``group_by_length`` batches come from ``LengthBuckets`` and
    which counts the parameters for its FLOPs estimate once and whose ``train()`` keeps the freed heap
    between steps on the CPU and leaves the objects that exist before it out of its garbage collections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parameters_counted: int | None = None
        if not (self.args.device.type in ("cuda", "xpu") and is_triton_available()):
            add_answer_head(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``train()`` with, on the CPU, glibc's heap kept between steps (``keep_freed_heap``)
        and the objects that exist when it starts frozen out of garbage collection until it ends (see the
        module's docstring): the same training, without refaulting the heap or walking every object."""
        if self.args.device.type == "cpu":
            keep_freed_heap()
        gc.freeze()
        try:
            return super().train(*args, **kwargs)
        finally:
            gc.unfreeze()

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        # transformers' estimate (6 x tokens x non-embedding parameters), the parameters counted once
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameters_counted is None:
            self._parameters_counted = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameters_counted

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, datasets.Dataset):
            return super()._get_train_sampler(train_dataset)
        # the lengths from the Arrow column, without turning every row's tokens into Python lists
        lengths = pyarrow.compute.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()
        args = self.args
        step_size = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        return LengthBuckets(lengths, step_size, args.seed if args.data_seed is None else args.data_seed)
