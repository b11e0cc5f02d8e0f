"""Adapters by name: host copies of every loaded adapter, a fixed number of device slots (LRU).

Each load of an adapter gets a new uid, its identity everywhere below the name: a request takes the
uid of its adapter's name when it is added, and its sequences hold that uid until they finish (the
prefix cache keys blocks by it too). Replacing an adapter (``load(..., replace=True)``) points the
name at a new uid: new requests get the new weights, sequences already added finish on the old ones,
and no prefix-cache block is shared between the two. An adapter unloaded or replaced while sequences
hold it stops taking new requests at once and is dropped when the last of them finishes.

A slot is pinned while sequences that use it are running; a pinned slot is never evicted.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

from mcl_runtime.errors import AdapterLoadError, AdapterNotFoundError
from mcl_runtime.model.decoder import DecoderLM
from mcl_runtime.model.lora import LoRAAdapter, load_peft_adapter

BASE_UID = 0  # the base model in prefix-cache keys and holds


class AdapterManager:
    def __init__(self, model: DecoderLM, num_slots: int, max_rank: int) -> None:
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self._uids: dict[str, int] = {}  # name -> the uid new requests get
        self._adapters: dict[int, LoRAAdapter] = {}  # uid -> host copy, while named or held
        self._holds: Counter[int] = Counter()  # uid -> sequences that will run on it
        self._next_uid = itertools.count(BASE_UID + 1)
        self._slot_of: dict[int, int] = {}  # uid -> resident slot
        self._lru: OrderedDict[int, int] = OrderedDict()  # resident slot -> uid, least recent first
        self._pins = [0] * num_slots
        self.slot_ranks = np.zeros(num_slots, dtype=np.int64)  # largest rank of each slot's adapter
        self.num_slot_loads = 0

    @property
    def names(self) -> list[str]:
        return list(self._uids)

    @property
    def resident(self) -> list[str]:
        """Names of the adapters in a device slot now, least recently used first (a replaced or
        unloaded adapter still finishing its requests has no name)."""
        names = {uid: name for name, uid in self._uids.items()}
        return [names[uid] for uid in self._lru.values() if uid in names]

    def uid(self, name: str) -> int:
        if name not in self._uids:
            known = ", ".join(sorted(self._uids)) or "none"
            raise AdapterNotFoundError(f"unknown adapter {name!r} (loaded: {known})")
        return self._uids[name]

    def load(self, name: str, path: str | Path, replace: bool = False) -> None:
        """Load a PEFT adapter as ``name``; ``replace``: an adapter of that name is swapped for it
        (new requests get it, running ones finish on the old weights). A failed load changes nothing."""
        if not isinstance(name, str) or not name:
            raise AdapterLoadError("an adapter needs a non-empty name")
        if self.num_slots == 0:
            raise AdapterLoadError(f"cannot load adapter {name!r}: this engine was started with max_loras=0 (no LoRA)")
        if name in self._uids and not replace:
            raise AdapterLoadError(
                f"an adapter named {name!r} is already loaded; unload it first or load it in place (replace)"
            )
        adapter = load_peft_adapter(name, path, self.model.config, self.max_rank)
        old = self._uids.get(name)
        uid = self._uids[name] = next(self._next_uid)
        self._adapters[uid] = adapter
        if old is not None:
            self._retire(old)

    def unload(self, name: str) -> None:
        uid = self.uid(name)
        del self._uids[name]
        self._retire(uid)

    def hold(self, uid: int) -> None:
        """A sequence will run on adapter ``uid`` (taken from ``uid(name)``): keep its weights."""
        if uid != BASE_UID:
            self._holds[uid] += 1

    def unhold(self, uid: int) -> None:
        """A sequence held with ``hold(uid)`` ended."""
        if uid == BASE_UID:
            return
        self._holds[uid] -= 1
        if self._holds[uid] == 0:
            del self._holds[uid]
            if uid not in self._uids.values():
                self._drop(uid)

    def acquire(self, uid: int) -> int | None:
        """Pin the slot of adapter ``uid`` (held), loading it (evicting the least recently used unpinned
        slot) if needed. Returns the slot, -1 for the base model, or None if every slot is pinned."""
        if uid == BASE_UID:
            return -1
        slot = self._slot_of.get(uid)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._write_slot(slot, self._adapters[uid])
            self._slot_of[uid] = slot
            self._lru[slot] = uid
        self._lru.move_to_end(slot)
        self._pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot >= 0:
            self._pins[slot] -= 1

    def _retire(self, uid: int) -> None:
        """``uid`` takes no new requests: dropped now, or when its last holder ends."""
        if self._holds[uid] == 0:
            self._drop(uid)

    def _free_slot(self) -> int | None:
        used = set(self._lru)
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        for slot, uid in self._lru.items():
            if self._pins[slot] == 0:
                del self._lru[slot]
                del self._slot_of[uid]
                return slot
        return None

    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        for i in range(self.model.config.num_layers):
            targets = adapter.layers[i]
            for mod_name, module in self.model.lora_modules(i).items():
                if mod_name in targets:
                    slices, scaling = targets[mod_name]
                    module.set_slot(slot, slices, scaling)
                else:
                    module.clear_slot(slot)
        self.slot_ranks[slot] = adapter.rank
        self.num_slot_loads += 1

    def _drop(self, uid: int) -> None:
        self._holds.pop(uid, None)
        self._adapters.pop(uid, None)
        slot = self._slot_of.pop(uid, None)
        if slot is not None:
            del self._lru[slot]
