#include "sampling_ops.h"

#include <algorithm>
#include <limits>

namespace mcl {
namespace {

// Below this many elements per thread, starting one costs more than it saves.
constexpr int64_t kMinPerThread = int64_t{1} << 16;

// One pass over the row: each lane keeps its largest value and where it first saw it (a strictly
// larger value moves it); the row's answer is the smallest such index among the lanes holding the
// largest. NaN never compares larger, so a row with one is scanned again for its first.
template <typename T>
MCL_INLINE int64_t argmax_row(const T* x, int64_t V) {
    constexpr int64_t W = kLanes;
    using iv = ivec<W>;
    fvec<W> best = {};
    best -= std::numeric_limits<float>::infinity();
    iv where = {}, nan = {};
    iv lane = {};
    for (int64_t l = 0; l < W; ++l) lane[l] = static_cast<int32_t>(l);
    int64_t i = 0;
    for (; i + W <= V; i += W) {
        const fvec<W> v = load_float<W>(x + i);
        const iv larger = v > best;
        best = larger ? v : best;
        where = larger ? lane + static_cast<int32_t>(i) : where;
        nan |= v != v;
    }
    float top = -std::numeric_limits<float>::infinity();
    int64_t arg = 0;
    bool any_nan = false;
    for (int64_t l = 0; l < W; ++l) {
        any_nan |= nan[l] != 0;
        if (best[l] > top || (best[l] == top && where[l] < arg)) top = best[l], arg = where[l];
    }
    for (; i < V; ++i) {  // the tail, after every lane's index
        const float v = to_float(x[i]);
        any_nan |= v != v;
        if (v > top) top = v, arg = i;
    }
    if (any_nan)
        for (int64_t j = 0; j < V; ++j)
            if (to_float(x[j]) != to_float(x[j])) return j;
    return arg;
}

template <typename T>
MCL_INLINE void argmax_range(const ArgmaxArgs& a, int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) a.out[t] = argmax_row(static_cast<const T*>(a.x) + t * a.x_stride, a.cols);
}

MCL_CLONES void argmax_f32(const ArgmaxArgs& a, int64_t lo, int64_t hi) { argmax_range<float>(a, lo, hi); }
MCL_CLONES void argmax_f16(const ArgmaxArgs& a, int64_t lo, int64_t hi) { argmax_range<F16>(a, lo, hi); }
MCL_CLONES void argmax_bf16(const ArgmaxArgs& a, int64_t lo, int64_t hi) { argmax_range<BF16>(a, lo, hi); }

}  // namespace

void argmax_rows(const ArgmaxArgs& a, DType dtype, int num_threads) {
    const auto run = dtype == DType::f32 ? argmax_f32 : dtype == DType::f16 ? argmax_f16 : argmax_bf16;
    const int64_t parts =
        std::clamp<int64_t>(std::min(a.rows, a.rows * a.cols / kMinPerThread), 1, std::max(num_threads, 1));
#ifdef _OPENMP
    // torch's OpenMP runtime (the extension links the same libgomp): its idle workers take the parts.
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int64_t p = 0; p < parts; ++p) run(a, a.rows * p / parts, a.rows * (p + 1) / parts);
#else
    run(a, 0, a.rows);
#endif
}

}  // namespace mcl
