// The elementwise steps of a decoder layer on the CPU, each one pass over its rows: RMSNorm
// (optionally after adding the residual: the fused "add + norm"), the rotary embedding (in place)
// and the MLP's SiLU-and-multiply. csrc/bindings.cpp exposes them as mcl_runtime._C.rms_norm / rope /
// silu_and_mul; mcl_runtime/kernels/cpu.py wraps them for torch tensors.
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace mcl {

// For each row t: h = x[t] (+ residual[t], then written back to residual[t]: the new residual),
//   out[t] = weight * (h / sqrt(mean(h^2) + eps))
// with float32 statistics; in a 16-bit dtype the sum h and the normalised row are rounded to it
// before the weight is applied (as transformers does), the product rounded again. Rows are
// `*_stride` elements apart with unit stride along N; residual may be null.
struct RMSNormArgs {
    void* out;
    int64_t out_stride;
    const void* x;
    int64_t x_stride;
    void* residual;
    int64_t residual_stride;
    const void* weight;
    int64_t rows, cols;
    float eps;
};

void rms_norm(const RMSNormArgs& args, DType dtype);

// In place, for each token t and head h of x [T, H, D] (half = D / 2, c = cos[t], s = sin[t]):
//   x[:half]  = x[:half] * c[:half] - x[half:] * s[:half]
//   x[half:]  = x[half:] * c[half:] + x[:half] * s[half:]
// each product and the sum rounded to the dtype in turn, as torch's ops do (transformers'
// rotate_half). x has unit stride along D; cos and sin [T, D] are contiguous, in x's dtype.
struct RopeArgs {
    void* x;
    int64_t x_stride_t, x_stride_h;
    const void* cos;
    const void* sin;
    int64_t tokens, heads, head_dim;
};

void rope(const RopeArgs& args, DType dtype);

// For each row t of x [T, 2I] (gate | up, as the fused gate_up projection writes them) and i < I:
//   out[t, i] = silu(x[t, i]) * x[t, I + i],   silu(g) = g / (1 + exp(-g))
// in float32 (exp to about 1 ulp: vexp in cpu_common.h); in a 16-bit dtype silu(g) is rounded to it
// before the product (transformers' act_fn(gate) * up), the product rounded again, and comes from
// a table of every 16-bit value's silu computed in double (correctly rounded). Rows are
// `*_stride` elements apart with unit stride along the columns. Up to num_threads OpenMP threads
// split the rows (and long rows' columns) where the work is worth them.
struct SiluAndMulArgs {
    void* out;
    int64_t out_stride;
    const void* x;
    int64_t x_stride;
    int64_t rows, cols;  // cols = I
};

void silu_and_mul(const SiluAndMulArgs& args, DType dtype, int num_threads);

}  // namespace mcl
