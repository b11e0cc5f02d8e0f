// RMSNorm over the rows of a [T, N] tensor on the CPU, optionally after adding a residual (the
// fused "add + norm" of a decoder layer). csrc/bindings.cpp exposes it as mcl_runtime._C.rms_norm;
// mcl_runtime/kernels/cpu.py wraps it for torch tensors.
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

}  // namespace mcl
