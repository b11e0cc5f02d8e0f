"""Persistent step buffers: fields round-trip at fixed addresses, 64-bit fields stay 64-bit."""

import numpy as np
import torch

from mcl_runtime.engine.step_buffers import StepBuffers, metadata_fields, sampling_fields


def test_fields_round_trip_at_fixed_addresses() -> None:
    buf = StepBuffers(metadata_fields(max_tokens=8, max_seqs=3, max_blocks=4), torch.device("cpu"))
    pointers = None
    for step in range(2):
        slots = np.array([5, 2**40 + step, 7], dtype=np.int64)
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


def test_sampling_fields_keep_their_dtypes() -> None:
    buf = StepBuffers(sampling_fields(4), torch.device("cpu"))
    temps, seeds = np.array([0.0, 0.7, 1.5], dtype=np.float32), np.array([-1, 2**62, 3], dtype=np.int64)
    buf.write("temperatures", temps)
    buf.write("seeds", seeds)
    buf.write("top_ks", np.array([5, 6, 7]))
    buf.commit()
    assert buf.view("temperatures", 3).dtype == torch.float32 and buf.view("temperatures", 3).tolist() == temps.tolist()
    assert buf.view("seeds", 3).tolist() == seeds.tolist() and buf.view("top_ks", 3).tolist() == [5, 6, 7]
    assert buf.fields["seeds"][0] == (4,)
