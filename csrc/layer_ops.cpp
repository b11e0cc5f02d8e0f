#include "layer_ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace mcl {
namespace {

template <typename T>
MCL_INLINE T rounded(float x) {
    T r;
    store(&r, x);
    return r;
}

template <typename T>
MCL_INLINE void norm_rows(const RMSNormArgs& a) {
    const int64_t N = a.cols;
    const T* w = static_cast<const T*>(a.weight);
    for (int64_t t = 0; t < a.rows; ++t) {
        const T* x = static_cast<const T*>(a.x) + t * a.x_stride;
        T* res = a.residual ? static_cast<T*>(a.residual) + t * a.residual_stride : nullptr;
        T* out = static_cast<T*>(a.out) + t * a.out_stride;
        const T* h = x;
        if (res) {  // the new residual, in the dtype
#pragma omp simd
            for (int64_t i = 0; i < N; ++i) res[i] = rounded<T>(to_float(x[i]) + to_float(res[i]));
            h = res;
        }
        float part[kLanes] = {};
        int64_t i0 = 0;
        for (; i0 + kLanes <= N; i0 += kLanes)
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) part[l] += to_float(h[i0 + l]) * to_float(h[i0 + l]);
        for (int64_t i = i0; i < N; ++i) part[i - i0] += to_float(h[i]) * to_float(h[i]);
        float sum = 0.f;
        for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
        const float inv = 1.f / std::sqrt(sum / static_cast<float>(N) + a.eps);
#pragma omp simd
        for (int64_t i = 0; i < N; ++i)
            store(out + i, to_float(w[i]) * to_float(rounded<T>(to_float(h[i]) * inv)));
    }
}

template <typename T>
MCL_INLINE void rope_rows(const RopeArgs& a) {
    const int64_t half = a.head_dim / 2;
    for (int64_t t = 0; t < a.tokens; ++t) {
        const T* c = static_cast<const T*>(a.cos) + t * a.head_dim;
        const T* s = static_cast<const T*>(a.sin) + t * a.head_dim;
        for (int64_t h = 0; h < a.heads; ++h) {
            T* x = static_cast<T*>(a.x) + t * a.x_stride_t + h * a.x_stride_h;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
                const auto r = [](float v) { return to_float(rounded<T>(v)); };
                store(x + i, r(x1 * to_float(c[i])) + r(-x2 * to_float(s[i])));
                store(x + i + half, r(x2 * to_float(c[i + half])) + r(x1 * to_float(s[i + half])));
            }
        }
    }
}

// Elements of a SiLU-and-multiply per work item: a piece of one row (a multiple of kLanes), so
// that a few long rows still split over threads.
constexpr int64_t kSiluPiece = 2048;
// Below this many elements per thread, starting one costs more than it saves.
constexpr int64_t kSiluMinPerThread = int64_t{1} << 14;

// silu(x) = x / (1 + exp(-x)) of each of the 65536 values of a 16-bit T, computed in double and
// rounded to T, held as floats (256 KiB, built on first use): in 16-bit dtypes the SiLU is one
// lookup per element instead of a vector exp and a division, and correctly rounded.
template <typename T>
const float* silu_table() {
    static const std::vector<float> table = [] {
        std::vector<float> t(65536);
        for (uint32_t b = 0; b < 65536; ++b) {
            const double x = to_float(T{static_cast<uint16_t>(b)});
            t[b] = to_float(rounded<T>(static_cast<float>(x / (1.0 + std::exp(-x)))));
        }
        return t;
    }();
    return table.data();
}

// out[i] = silu(g[i]) * u[i] for i < m <= kLanes, silu rounded to T before the product (the lanes
// past m are computed on zeros and not stored). 16-bit T: silu from ``table`` (silu_table<T>).
template <typename T>
MCL_INLINE void silu_mul_lanes(T* out, const T* g, const T* u, int64_t m, const float* table) {
    constexpr int64_t W = kLanes;
    fvec<W> gv = {}, uv = {};
    if (m == W) {
        if constexpr (std::is_same_v<T, float>) gv = load_float<W>(g);
        uv = load_float<W>(u);
    } else {
        for (int64_t l = 0; l < m; ++l) uv[l] = to_float(u[l]);
        if constexpr (std::is_same_v<T, float>)
            for (int64_t l = 0; l < m; ++l) gv[l] = g[l];
    }
    fvec<W> s;
    if constexpr (std::is_same_v<T, float>) {
        s = gv / (1.f + vexp<W>(-gv));
    } else {
        for (int64_t l = 0; l < W; ++l) s[l] = table[l < m ? g[l].bits : 0];
    }
    store_float<W>(out, s * uv, m);
}

template <typename T>
MCL_INLINE void silu_mul_items(const SiluAndMulArgs& a, int64_t begin, int64_t end, const float* table) {
    const int64_t I = a.cols, pieces = (I + kSiluPiece - 1) / kSiluPiece;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / pieces, i0 = item % pieces * kSiluPiece, i1 = std::min(I, i0 + kSiluPiece);
        const T* g = static_cast<const T*>(a.x) + t * a.x_stride;
        T* out = static_cast<T*>(a.out) + t * a.out_stride;
        for (int64_t i = i0; i < i1; i += kLanes)
            silu_mul_lanes(out + i, g + i, g + I + i, std::min(kLanes, i1 - i), table);
    }
}

MCL_CLONES void norm_f32(const RMSNormArgs& a) { norm_rows<float>(a); }
MCL_CLONES void norm_f16(const RMSNormArgs& a) { norm_rows<F16>(a); }
MCL_CLONES void norm_bf16(const RMSNormArgs& a) { norm_rows<BF16>(a); }
MCL_CLONES void rope_f32(const RopeArgs& a) { rope_rows<float>(a); }
MCL_CLONES void rope_f16(const RopeArgs& a) { rope_rows<F16>(a); }
MCL_CLONES void rope_bf16(const RopeArgs& a) { rope_rows<BF16>(a); }
MCL_CLONES void silu_f32(const SiluAndMulArgs& a, int64_t lo, int64_t hi, const float* table) {
    silu_mul_items<float>(a, lo, hi, table);
}
MCL_CLONES void silu_f16(const SiluAndMulArgs& a, int64_t lo, int64_t hi, const float* table) {
    silu_mul_items<F16>(a, lo, hi, table);
}
MCL_CLONES void silu_bf16(const SiluAndMulArgs& a, int64_t lo, int64_t hi, const float* table) {
    silu_mul_items<BF16>(a, lo, hi, table);
}

}  // namespace

void rms_norm(const RMSNormArgs& a, DType dtype) {
    (dtype == DType::f32 ? norm_f32 : dtype == DType::f16 ? norm_f16 : norm_bf16)(a);
}

void rope(const RopeArgs& a, DType dtype) {
    (dtype == DType::f32 ? rope_f32 : dtype == DType::f16 ? rope_f16 : rope_bf16)(a);
}

void silu_and_mul(const SiluAndMulArgs& a, DType dtype, int num_threads) {
    const auto run = dtype == DType::f32 ? silu_f32 : dtype == DType::f16 ? silu_f16 : silu_bf16;
    const float* table = dtype == DType::f32 ? nullptr : dtype == DType::f16 ? silu_table<F16>() : silu_table<BF16>();
    const int64_t items = a.rows * ((a.cols + kSiluPiece - 1) / kSiluPiece);
    if (items == 0) return;
    const int64_t parts = std::clamp<int64_t>(a.rows * a.cols / kSiluMinPerThread, 1, std::max(num_threads, 1));
#ifdef _OPENMP
    // torch's OpenMP runtime (the extension links the same libgomp): its idle workers take the parts.
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int64_t p = 0; p < parts; ++p) run(a, items * p / parts, items * (p + 1) / parts, table);
#else
    run(a, 0, items, table);
#endif
}

}  // namespace mcl
