"""Adapters by name: host copies of every loaded adapter, a fixed number of device slots (LRU).

A slot is pinned while sequences that use it are running; a pinned slot is never evicted. An
adapter unloaded while in use stops taking new requests at once and is dropped when its last
sequence finishes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path

import numpy as np

from mcl_runtime.errors import AdapterLoadError, AdapterNotFoundError
from mcl_runtime.model.decoder import DecoderLM
from mcl_runtime.model.lora import LoRAAdapter, load_peft_adapter


class AdapterManager:
    def __init__(self, model: DecoderLM, num_slots: int, max_rank: int) -> None:
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self._adapters: dict[str, LoRAAdapter] = {}
        self._uids: dict[str, int] = {}
        self._next_uid = itertools.count(1)  # 0 is the base model in prefix-cache keys
        self._slot_of: dict[str, int] = {}
        self._lru: OrderedDict[int, str] = OrderedDict()  # resident slots, least recent first
        self._pins = [0] * num_slots
        self.slot_ranks = np.zeros(num_slots, dtype=np.int64)  # largest rank of each slot's adapter
        self._unloading: set[str] = set()
        self.num_slot_loads = 0

    @property
    def names(self) -> list[str]:
        return [n for n in self._adapters if n not in self._unloading]

    @property
    def resident(self) -> list[str]:
        """Adapters in a device slot now, least recently used first."""
        return list(self._lru.values())

    def uid(self, name: str) -> int:
        if name not in self._adapters or name in self._unloading:
            known = ", ".join(sorted(self.names)) or "none"
            raise AdapterNotFoundError(f"unknown adapter {name!r} (loaded: {known})")
        return self._uids[name]

    def load(self, name: str, path: str | Path) -> None:
        if not isinstance(name, str) or not name:
            raise AdapterLoadError("an adapter needs a non-empty name")
        if name in self._unloading:
            raise AdapterLoadError(
                f"adapter {name!r} is still being unloaded (its requests are running); load it again when they finish"
            )
        if name in self._adapters:
            raise AdapterLoadError(f"an adapter named {name!r} is already loaded; unload it first")
        self._adapters[name] = load_peft_adapter(name, path, self.model.config, self.max_rank)
        self._uids[name] = next(self._next_uid)

    def unload(self, name: str) -> None:
        self.uid(name)
        slot = self._slot_of.get(name)
        if slot is not None and self._pins[slot] > 0:
            self._unloading.add(name)
        else:
            self._drop(name)

    def acquire(self, name: str | None) -> int | None:
        """Pin ``name``'s slot, loading it (evicting the least recently used unpinned slot) if needed.
        Returns the slot, -1 for the base model, or None if every slot is pinned."""
        if name is None:
            return -1
        slot = self._slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._write_slot(slot, self._adapters[name])
            self._slot_of[name] = slot
            self._lru[slot] = name
        self._lru.move_to_end(slot)
        self._pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot < 0:
            return
        self._pins[slot] -= 1
        name = self._lru.get(slot)
        if self._pins[slot] == 0 and name in self._unloading:
            self._drop(name)

    def _free_slot(self) -> int | None:
        used = set(self._lru)
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        for slot, name in self._lru.items():
            if self._pins[slot] == 0:
                del self._lru[slot]
                del self._slot_of[name]
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

    def _drop(self, name: str) -> None:
        self._unloading.discard(name)
        self._adapters.pop(name, None)
        self._uids.pop(name, None)
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            del self._lru[slot]
