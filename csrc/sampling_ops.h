// Row reductions of the sampler on the CPU: the greedy token of each row of logits.
// csrc/bindings.cpp exposes it as mcl_runtime._C.argmax_rows; mcl_runtime/kernels/cpu.py wraps it.
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace mcl {

// out[t] = the index of the first maximum of row t of x [T, V] (rows x_stride elements apart, unit
// stride along V, V >= 1), NaN counting as the maximum (the first NaN): numpy's and torch's argmax.
// 16-bit rows are compared as their exact float32 values. Up to num_threads OpenMP threads split
// the rows where there are enough of them.
struct ArgmaxArgs {
    int64_t* out;
    const void* x;
    int64_t x_stride;
    int64_t rows, cols;
};

void argmax_rows(const ArgmaxArgs& args, DType dtype, int num_threads);

}  // namespace mcl
