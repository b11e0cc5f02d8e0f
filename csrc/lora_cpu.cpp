#include "lora_cpu.h"

#include <vector>

namespace mcl {
namespace {

constexpr int64_t kTokens = kLanes;  // tokens per block of the shrink: one lane each
constexpr int64_t kCols = 64;        // output columns per pass of the expand: four vectors of sums
constexpr int64_t kChunk = 2048;     // input features per pass of the shrink (a block's x chunk: 128 KB)

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

// bt[k * kCols + o] = B[o, k] for the w <= kCols rows of B (R values apart) and k < r; zero past w.
template <typename T>
MCL_INLINE void transpose_chunk(float* bt, const T* B, int64_t R, int64_t r, int64_t w) {
    for (int64_t o = 0; o < w; ++o)
        for (int64_t k = 0; k < r; ++k) bt[k * kCols + o] = to_float(B[o * R + k]);
    for (int64_t k = 0; k < r; ++k)
        for (int64_t o = w; o < kCols; ++o) bt[k * kCols + o] = 0.0f;
}

// y[0:w] += scale * u[0:r] @ bt[0:r, 0:w] for one chunk (bt: r rows of kCols floats).
template <typename T>
MCL_INLINE void expand_chunk(T* y, const float* u, const float* bt, int64_t r, int64_t w, float scale) {
    f32x16 acc[kCols / kLanes] = {};
    for (int64_t k = 0; k < r; ++k) {
        const float uk = u[k];
#pragma GCC unroll 4
        for (int64_t v = 0; v < kCols / kLanes; ++v) acc[v] += uk * load16(bt + k * kCols + v * kLanes);
    }
    float sums[kCols];
    for (int64_t v = 0; v < kCols / kLanes; ++v) {
        const f32x16 s = acc[v] * scale;
        std::memcpy(sums + v * kLanes, &s, sizeof s);
    }
    add_row(y, sums, w);
}

// u[i * nR + j*R + k] = x_i . A[j*R + k] for the m rows x_i of xf [m, in] (the block's tokens) and
// the r_j rows of each slice j. ``in`` is taken kChunk values at a time, so that the block's x chunk
// stays in L2 while every row of A passes (a 7B down projection's x rows are 74 KB each). A 16-bit
// chunk of a row of A is converted into af first.
template <typename T>
MCL_INLINE void shrink(float* u, int64_t nR, const float* xf, int64_t m, const T* A, const int32_t* ranks, int64_t n,
                       int64_t R, int64_t in, float* af) {
    if (in % kLanes != 0) {
        for (int64_t j = 0; j < n; ++j)
            if (ranks[j] > 0) dot_block(u + j * R, nR, xf, A + j * R * in, in, in, m, ranks[j], af);
        return;
    }
    for (int64_t c0 = 0; c0 < in; c0 += kChunk) {
        const int64_t len = std::min(kChunk, in - c0);
        for (int64_t j = 0; j < n; ++j)
            for (int64_t k = 0; k < ranks[j]; ++k) {
                const T* row = A + (j * R + k) * in + c0;
                const float* a = nullptr;
                if constexpr (std::is_same_v<T, float>) {
                    a = row;
                } else {
#pragma omp simd
                    for (int64_t d = 0; d < len; ++d) af[d] = to_float(row[d]);
                    a = af;
                }
                float dots[kLanes];
                if (m == kTokens)
                    dot_tile<true>(dots, a, xf + c0, in, len, kLanes);
                else
                    dot_tile(dots, a, xf + c0, in, len, m);
                float* out = u + j * R + k;
                for (int64_t i = 0; i < m; ++i) out[i * nR] = c0 == 0 ? dots[i] : out[i * nR] + dots[i];
            }
    }
}

// Per call: float32 scratch (a block's rows of x; the longest segment's shrunk u; one chunk of
// transposed B).
struct Scratch {
    std::vector<float> xf, u, af, bt;
    explicit Scratch(const LoRAArgs& a) : xf(kTokens * a.in_features), af(kLanes * a.in_features),
                                          bt(a.max_rank * kCols) {
        int64_t longest = 0;
        for (int64_t s = 0; s < a.num_segments; ++s)
            longest = std::max<int64_t>(longest, a.seg_starts[s + 1] - a.seg_starts[s]);
        u.resize(longest * a.num_slices * a.max_rank);
    }
};

// One segment: u = x @ A.T for its tokens (blocks of kTokens), then per slice and chunk of kCols
// output columns the chunk of B transposed once (it stays in L1) and added to every token's y. B is
// read once per segment, whatever its size (a 7B gate_up B is 4.8 MB a slot).
template <typename T>
MCL_INLINE void lora_segment(const LoRAArgs& a, int64_t begin, int64_t end, int64_t slot, Scratch& w) {
    const int64_t in = a.in_features, n = a.num_slices, R = a.max_rank, nR = n * R;
    const T* A = static_cast<const T*>(a.lora_a) + slot * nR * in;
    const T* B = static_cast<const T*>(a.lora_b) + slot * a.out_features * R;
    const int32_t* ranks = a.ranks + slot * n;
    const float scale = a.scaling[slot];
    float *xf = w.xf.data(), *u = w.u.data(), *bt = w.bt.data();
    for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
        const int64_t mt = std::min(kTokens, end - t0);
        for (int64_t i = 0; i < mt; ++i) {  // the block's rows of x in float32
            const T* row = static_cast<const T*>(a.x) + (t0 + i) * a.x_stride;
#pragma omp simd
            for (int64_t d = 0; d < in; ++d) xf[i * in + d] = to_float(row[d]);
        }
        shrink(u + (t0 - begin) * nR, nR, xf, mt, A, ranks, n, R, in, w.af.data());
    }
    T* y = static_cast<T*>(a.y) + begin * a.y_stride;
    for (int64_t j = 0; j < n; ++j) {
        const int64_t r = ranks[j], width = a.offsets[j + 1] - a.offsets[j];
        for (int64_t o0 = 0; r > 0 && o0 < width; o0 += kCols) {
            const int64_t cols = std::min(kCols, width - o0), col = a.offsets[j] + o0;
            transpose_chunk(bt, B + col * R, R, r, cols);
            for (int64_t i = 0; i < end - begin; ++i)
                expand_chunk(y + i * a.y_stride + col, u + i * nR + j * R, bt, r, cols, scale);
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
