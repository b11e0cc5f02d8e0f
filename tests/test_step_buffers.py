"""Persistent step buffers: fields round-trip at fixed addresses, 64-bit fields stay 64-bit."""
import numpy as np
import torch

from mcl_runtime.engine.step_buffers import StepBuffers


def test_fields_round_trip_at_fixed_addresses() -> None:
    buf = StepBuffers(max_tokens=8, max_seqs=3, max_blocks=4, device=torch.device("cpu"))
    pointers = None
    for step in range(2):
        slots = np.array([5, 2 ** 40 + step, 7], dtype=np.int64)
        tables = np.array([[1, 2], [3, 4 + step]], dtype=np.int32)
        buf.write("slot_mapping", slots)
        buf.write("block_tables", tables)
        buf.write("cu_seqlens_q", np.array([0, 1, 3], dtype=np.int32))
        buf.commit()
        views = [buf.view("slot_mapping", 3), buf.view("block_tables", 2), buf.view("cu_seqlens_q", 3)]
        assert views[0].dtype == torch.int64 and views[0].tolist() == slots.tolist()
        assert views[1].shape == (2, 4) and views[1][:, :2].tolist() == tables.tolist()
        assert views[2].dtype == torch.int32 and views[2].tolist() == [0, 1, 3]
        now = [v.data_ptr() for v in views]
        assert pointers is None or now == pointers  # what a captured CUDA graph relies on
        pointers = now
