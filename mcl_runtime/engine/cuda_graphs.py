"""CUDA graphs of the static decode step: one per batch-size bucket, captured on first use.

A static step reads only the persistent step buffers (fixed addresses for a bucket), the KV cache,
the weights and the backend's workspace, and sizes every launch from the bucket, so replaying the
graph recorded for the bucket is the step. Capture happens after one eager run of the same shapes
(Triton JIT, workspace sizing), all graphs share one memory pool, and the output tensor of each
graph is reused by every replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class DecodeGraphs:
    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        self.forward = forward
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def run(self, bucket: int, *args) -> torch.Tensor:
        graph = self.graphs.get(bucket)
        if graph is None:
            self.forward(*args)  # warm-up on the exact shapes
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bucket] = self.forward(*args)
            self.pool = graph.pool()
            self.graphs[bucket] = graph
        graph.replay()
        return self.outputs[bucket]
