#include "lora_cpu.h"

#include <vector>

namespace mcl {
namespace {

constexpr int64_t kTokens = kLanes;  // tokens per block of the shrink: one lane each
constexpr int64_t kCols = 64;        // output columns per pass of the expand: four vectors of sums

MCL_INLINE int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// y[0:w] += acc[0:w], the sum in float32 and y rounded once.
template <typename T>
MCL_INLINE void add_row(T* y, const float* acc, int64_t w) {
    if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (int64_t l = 0; l < w; ++l) y[l] += acc[l];
    } else {
        for (int64_t l = 0; l < w; ++l) store(y + l, to_float(y[l]) + acc[l]);
    }
}

// y[0:w] += scale * u[0:r] @ bt[0:r, 0:w], bt's rows `stride` (a multiple of kCols) floats apart
// and zero past w.
template <typename T>
MCL_INLINE void expand_row(T* y, const float* u, const float* bt, int64_t stride, int64_t r, int64_t w, float scale) {
    for (int64_t o0 = 0; o0 < w; o0 += kCols) {
        f32x16 acc[kCols / kLanes] = {};
        for (int64_t k = 0; k < r; ++k) {
            const float uk = u[k];
#pragma GCC unroll 4
            for (int64_t v = 0; v < kCols / kLanes; ++v) acc[v] += uk * load16(bt + k * stride + o0 + v * kLanes);
        }
        float sums[kCols];
        for (int64_t v = 0; v < kCols / kLanes; ++v) {
            const f32x16 s = acc[v] * scale;
            std::memcpy(sums + v * kLanes, &s, sizeof s);
        }
        add_row(y + o0, sums, std::min(kCols, w - o0));
    }
}

// u[i * nR + j*R + k] = x_i . A[j*R + k] for the first m rows x_i of xf [16, in] (the block's tokens;
// the other rows are computed and ignored) and the r_j rows of each slice j. A 16-bit row of A is
// converted into af [in] first.
template <typename T>
MCL_INLINE void shrink(float* u, int64_t nR, const float* xf, int64_t m, const T* A, const int32_t* ranks, int64_t n,
                       int64_t R, int64_t in, float* af) {
    for (int64_t j = 0; j < n; ++j) {
        if (ranks[j] == 0) continue;
        if (in % kLanes != 0) {
            dot_block(u + j * R, nR, xf, A + j * R * in, in, in, m, ranks[j], af);
            continue;
        }
        for (int64_t k = 0; k < ranks[j]; ++k) {
            const T* row = A + (j * R + k) * in;
            const float* a = nullptr;
            if constexpr (std::is_same_v<T, float>) {
                a = row;
            } else {
#pragma omp simd
                for (int64_t d = 0; d < in; ++d) af[d] = to_float(row[d]);
                a = af;
            }
            float dots[kLanes];
            dot_tile<true>(dots, a, xf, in, in, kLanes);
            for (int64_t i = 0; i < m; ++i) u[i * nR + j * R + k] = dots[i];
        }
    }
}

// Per call: float32 scratch, and where each slice's transposed B lives in bt (R rows of wp[j] >= its
// width floats, a multiple of kCols, zero past the width).
struct Scratch {
    std::vector<float> xf, u, af, bt;
    std::vector<int64_t> bt_at, wp;
    explicit Scratch(const LoRAArgs& a) : xf(kTokens * a.in_features), u(kTokens * a.num_slices * a.max_rank),
                                          af(kLanes * a.in_features) {
        for (int64_t j = 0; j < a.num_slices; ++j) {
            bt_at.push_back(static_cast<int64_t>(bt.size()));
            wp.push_back(round_up(a.offsets[j + 1] - a.offsets[j], kCols));
            bt.resize(bt.size() + a.max_rank * wp.back());
        }
    }
};

template <typename T>
MCL_INLINE void lora_segment(const LoRAArgs& a, int64_t begin, int64_t end, int64_t slot, Scratch& w) {
    const int64_t in = a.in_features, n = a.num_slices, R = a.max_rank, nR = n * R;
    const T* A = static_cast<const T*>(a.lora_a) + slot * nR * in;
    const T* B = static_cast<const T*>(a.lora_b) + slot * a.out_features * R;
    const int32_t* ranks = a.ranks + slot * n;
    for (int64_t j = 0; j < n; ++j)  // the slot's B, transposed once per segment
        for (int64_t k = 0; k < ranks[j]; ++k) {
            float* row = &w.bt[w.bt_at[j] + k * w.wp[j]];
            const T* col = B + a.offsets[j] * R + k;
            for (int64_t o = 0; o < a.offsets[j + 1] - a.offsets[j]; ++o) row[o] = to_float(col[o * R]);
        }
    float *xf = w.xf.data(), *u = w.u.data();
    for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
        const int64_t mt = std::min(kTokens, end - t0);
        for (int64_t i = 0; i < mt; ++i) {  // the block's rows of x in float32
            const T* row = static_cast<const T*>(a.x) + (t0 + i) * a.x_stride;
#pragma omp simd
            for (int64_t d = 0; d < in; ++d) xf[i * in + d] = to_float(row[d]);
        }
        shrink(u, nR, xf, mt, A, ranks, n, R, in, w.af.data());
        for (int64_t i = 0; i < mt; ++i) {
            T* y = static_cast<T*>(a.y) + (t0 + i) * a.y_stride;
            for (int64_t j = 0; j < n; ++j)
                if (ranks[j] > 0)
                    expand_row(y + a.offsets[j], u + i * nR + j * R, &w.bt[w.bt_at[j]], w.wp[j], ranks[j],
                               a.offsets[j + 1] - a.offsets[j], a.scaling[slot]);
        }
    }
}

template <typename T>
MCL_INLINE void lora_all(const LoRAArgs& a) {
    Scratch w(a);
    for (int64_t s = 0; s < a.num_segments; ++s)
        if (a.seg_slots[s] >= 0) lora_segment<T>(a, a.seg_starts[s], a.seg_starts[s + 1], a.seg_slots[s], w);
}

MCL_CLONES void lora_f32(const LoRAArgs& a) { lora_all<float>(a); }
MCL_CLONES void lora_f16(const LoRAArgs& a) { lora_all<F16>(a); }
MCL_CLONES void lora_bf16(const LoRAArgs& a) { lora_all<BF16>(a); }

}  // namespace

void lora_apply(const LoRAArgs& a, DType dtype) {
    (dtype == DType::f32 ? lora_f32 : dtype == DType::f16 ? lora_f16 : lora_bf16)(a);
}

}  // namespace mcl
