#include "lora_cpu.h"

#include <vector>

namespace mcl {
namespace {

constexpr int64_t kTokens = 32;  // tokens per block: each B tile transposed once serves all of them

template <typename T>
MCL_INLINE void lora_segment(const LoRAArgs& a, int64_t begin, int64_t end, int64_t slot, std::vector<float>& xf,
                             std::vector<float>& u, std::vector<float>& kf, std::vector<float>& bt) {
    const int64_t in = a.in_features, n = a.num_slices, R = a.max_rank, nR = n * R;
    const T* A = static_cast<const T*>(a.lora_a) + slot * nR * in;
    const T* B = static_cast<const T*>(a.lora_b) + slot * a.out_features * R;
    const int32_t* ranks = a.ranks + slot * n;
    const float scale = a.scaling[slot];
    for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
        const int64_t mt = std::min(kTokens, end - t0);
        for (int64_t i = 0; i < mt; ++i) {  // the block's rows of x in float32
            const T* row = static_cast<const T*>(a.x) + (t0 + i) * a.x_stride;
#pragma omp simd
            for (int64_t d = 0; d < in; ++d) xf[i * in + d] = to_float(row[d]);
        }
        // shrink: u[i, j*R + k] = x[t0 + i] . A[j*R + k] for the r rows of each slice
        for (int64_t j = 0; j < n; ++j)
            if (ranks[j] > 0) dot_block(&u[j * R], nR, xf.data(), A + j * R * in, in, in, mt, ranks[j], kf.data());
        // expand, 16 output columns at a time: B's tile transposed into bt [r, 16]
        for (int64_t j = 0; j < n; ++j) {
            const int64_t r = ranks[j];
            if (r == 0) continue;
            for (int64_t o0 = a.offsets[j]; o0 < a.offsets[j + 1]; o0 += kLanes) {
                const int64_t w = std::min(kLanes, a.offsets[j + 1] - o0);
                for (int64_t k = 0; k < r; ++k)
                    for (int64_t l = 0; l < kLanes; ++l) bt[k * kLanes + l] = l < w ? to_float(B[(o0 + l) * R + k]) : 0.f;
                for (int64_t i = 0; i < mt; ++i) {
                    float acc[kLanes] = {};
                    const float* ui = &u[i * nR + j * R];
                    for (int64_t k = 0; k < r; ++k) {
#pragma omp simd
                        for (int64_t l = 0; l < kLanes; ++l) acc[l] += ui[k] * bt[k * kLanes + l];
                    }
                    T* y = static_cast<T*>(a.y) + (t0 + i) * a.y_stride + o0;
                    for (int64_t l = 0; l < w; ++l) store(y + l, to_float(y[l]) + scale * acc[l]);
                }
            }
        }
    }
}

template <typename T>
MCL_INLINE void lora_all(const LoRAArgs& a) {
    std::vector<float> xf(kTokens * a.in_features), u(kTokens * a.num_slices * a.max_rank),
        kf(kLanes * a.in_features), bt(a.max_rank * kLanes);
    for (int64_t s = 0; s < a.num_segments; ++s)
        if (a.seg_slots[s] >= 0) lora_segment<T>(a, a.seg_starts[s], a.seg_starts[s + 1], a.seg_slots[s], xf, u, kf, bt);
}

MCL_CLONES void lora_f32(const LoRAArgs& a) { lora_all<float>(a); }
MCL_CLONES void lora_f16(const LoRAArgs& a) { lora_all<F16>(a); }
MCL_CLONES void lora_bf16(const LoRAArgs& a) { lora_all<BF16>(a); }

}  // namespace

void lora_apply(const LoRAArgs& a, DType dtype) {
    (dtype == DType::f32 ? lora_f32 : dtype == DType::f16 ? lora_f16 : lora_bf16)(a);
}

}  // namespace mcl
