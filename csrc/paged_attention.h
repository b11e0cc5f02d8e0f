// Paged attention on the CPU: every query row of a step (decodes and prefill chunks) over its
// sequence's paged KV cache, read in place through the block table (no gather, no padding).
// Semantics are mcl_runtime.kernels.paged_prefill_attention's; csrc/bindings.cpp exposes it as
// mcl_runtime._C.PagedAttentionPlan and mcl_runtime/kernels/cpu.py wraps it for torch tensors.
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace mcl {

// Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (q_len of them); row i of them sits
// at position p = context_lens[b] - q_len + i and attends to its sequence's keys 0..p:
//   out[row, h] = softmax(scale * q[row, h] @ K_b[:p+1, h / G].T) @ V_b[:p+1, h / G]
// with K_b[t] = k_cache[block_tables[b, t / block_size], t % block_size] and G = Hq / Hkv
// (a row with p < 0, e.g. a decode of context 0, gets zeros).
// Strides are in elements; q, out: [T, Hq, D] with unit stride along D; caches
// [num_blocks, block_size, Hkv, D] contiguous; block_tables [B, M] with unit stride along M.
// q, caches and out share one dtype; scores and sums are float32.
struct PagedAttentionArgs {
    void* out;
    int64_t out_stride_t, out_stride_h;
    const void* q;
    int64_t q_stride_t, q_stride_h;
    const void* k_cache;
    const void* v_cache;
    const int32_t* block_tables;
    int64_t block_tables_stride;
    const int32_t* context_lens;
    const int32_t* cu_seqlens_q;
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
};

// The query rows are cut into at most num_threads ranges of about equal work (keys read), each
// worth a thread, run on OpenMP threads (torch's runtime, the same libgomp) where built with it.
// lanes: the width of the dot-product tiles, 8 or 16 (0: dot_lanes(), the machine's); the results
// differ only in rounding.
void paged_attention(const PagedAttentionArgs& args, DType dtype, int num_threads, int lanes = 0);

}  // namespace mcl
