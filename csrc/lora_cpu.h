// Multi-LoRA on the CPU: every adapter segment of a step's tokens in one call (punica's SGMV
// semantics, shrink and expand fused per segment). csrc/bindings.cpp exposes it as
// mcl_runtime._C.lora_apply; mcl_runtime/kernels/cpu.py wraps it for torch tensors.
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace mcl {

// For each segment s with slot = seg_slots[s] >= 0 (tokens seg_starts[s]:seg_starts[s+1]) and each
// slice j of the fused projection (output columns offsets[j]:offsets[j+1], rank r = ranks[slot, j]):
//   y[seg, offsets[j]:offsets[j+1]] += scaling[slot] * x[seg] @ A[slot, j*R : j*R + r].T @ Bt[slot, :r, offsets[j]:offsets[j+1]]
// with x [T, in] and y [T, out] (unit stride along features; y updated in place), A [S, n*R, in]
// and Bt [S, R, out] (B transposed: row k holds column k of B over every output) contiguous, in
// one dtype; scaling [S] float32, ranks [S, n] int32. Sums in float32; y is rounded once, after its
// delta is added.
// Two arithmetics. Float32 multiply-adds, 16-bit inputs converted (Bt as above). Or, with
// bt_pairs, AVX512-BF16's pair dot products (bfloat16 only, R even, `in` a multiple of 32, a CPU
// with has_bf16_dot()): Bt's rows come in pairs, [S, R/2, out, 2] with element (i, o, p) =
// B[o, 2i + p]; x and A are multiplied as they are, the shrink's result u is rounded to bfloat16
// (as a bfloat16 x @ A.T rounds it) and its pairs multiplied with Bt's, all products summed in
// float32.
struct LoRAArgs {
    void* y;
    int64_t y_stride;
    const void* x;
    int64_t x_stride;
    const void* lora_a;
    const void* lora_bt;
    const float* scaling;
    const int32_t* ranks;
    const int64_t* offsets;  // n + 1 output column offsets of the slices
    const int32_t* seg_starts;
    const int32_t* seg_slots;
    int64_t num_segments, num_slices, max_rank, in_features, out_features;
    bool bt_pairs;
};

// With num_threads > 1, where the work is worth it, the blocks of tokens (shrink) and the output
// columns (expand) are shared out over OpenMP threads (torch's runtime); the bits do not depend on
// the thread count.
// lanes: tokens per block of the shrink and width of its dot-product tiles in the float32
// arithmetic, 8 or 16 (0: dot_lanes(), the machine's; the pair arithmetic's are 16); the results
// differ only in rounding.
void lora_apply(const LoRAArgs& args, DType dtype, int num_threads, int lanes = 0);

// Whether lora_apply can take the pair arithmetic for weights of this dtype, rank and input width.
bool can_lora_pairs(DType dtype, int64_t max_rank, int64_t in_features);

}  // namespace mcl
