#include "layer_ops.h"

#include <cmath>

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

MCL_CLONES void norm_f32(const RMSNormArgs& a) { norm_rows<float>(a); }
MCL_CLONES void norm_f16(const RMSNormArgs& a) { norm_rows<F16>(a); }
MCL_CLONES void norm_bf16(const RMSNormArgs& a) { norm_rows<BF16>(a); }
MCL_CLONES void rope_f32(const RopeArgs& a) { rope_rows<float>(a); }
MCL_CLONES void rope_f16(const RopeArgs& a) { rope_rows<F16>(a); }
MCL_CLONES void rope_bf16(const RopeArgs& a) { rope_rows<BF16>(a); }

}  // namespace

void rms_norm(const RMSNormArgs& a, DType dtype) {
    (dtype == DType::f32 ? norm_f32 : dtype == DType::f16 ? norm_f16 : norm_bf16)(a);
}

void rope(const RopeArgs& a, DType dtype) {
    (dtype == DType::f32 ? rope_f32 : dtype == DType::f16 ? rope_f16 : rope_bf16)(a);
}

}  // namespace mcl
