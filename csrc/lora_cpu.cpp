#include "lora_cpu.h"

#include <algorithm>
#include <vector>

namespace mcl {
namespace {

constexpr int64_t kMaxTokens = kLanes;  // tokens per block of the shrink (W <= 16: one lane each)
constexpr int64_t kCols = 64;        // output columns per pass of the expand: four vectors of sums
constexpr int64_t kChunk = 2048;     // input features per pass of the shrink (a block's x chunk: 128 KB)
// Tokens per pass of the expand of 16-bit y: each pass walks its tokens' rows of y chunk by chunk
// rather than one chunk of every token's row (a page apart each). Float32 keeps one pass over all
// tokens: there the transposes, repeated per pass, cost more than the order saves.
constexpr int64_t kExpandTokens = 32;

// y[0:w] += acc[0:w], the sum in float32 and y rounded once.
template <typename T>
MCL_INLINE void add_row(T* y, const float* acc, int64_t w) {
    if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (int64_t l = 0; l < w; ++l) y[l] += acc[l];
    } else {
#pragma omp simd
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

// y[0:w] += scale * u[0:r] @ bt[0:r, 0:w] for one chunk (bt: r rows of kCols floats), in kCols / W
// vectors of sums.
template <int64_t W, typename T>
MCL_INLINE void expand_chunk(T* y, const float* u, const float* bt, int64_t r, int64_t w, float scale) {
    fvec<W> acc[kCols / W] = {};
    for (int64_t k = 0; k < r; ++k) {
        const float uk = u[k];
#pragma GCC unroll 8
        for (int64_t v = 0; v < kCols / W; ++v) acc[v] += uk * load_vec<W>(bt + k * kCols + v * W);
    }
    float sums[kCols];
    for (int64_t v = 0; v < kCols / W; ++v) {
        const fvec<W> s = acc[v] * scale;
        std::memcpy(sums + v * W, &s, sizeof s);
    }
    add_row(y, sums, w);
}

// u[i * nR + q] = x_i . A[q] for the m <= W rows x_i of xf [m, in] (the block's tokens) and the rows
// q in lo..hi of A that are within their slice's rank (q = j*R + k, k < ranks[j]; slices R rows apart). ``in`` is taken
// kChunk values at a time, so that the block's x chunk stays in L2 while the rows of A pass (a 7B
// down projection's x rows are 74 KB each). A 16-bit chunk of a row of A is converted into af first.
template <int64_t W, typename T>
MCL_INLINE void shrink(float* u, int64_t nR, const float* xf, int64_t m, const T* A, const int32_t* ranks, int64_t R,
                       int64_t lo, int64_t hi, int64_t in, float* af) {
    const auto used = [&](int64_t q) { return q % R < ranks[q / R]; };
    if (in % W != 0) {  // (no model has such a width) all rows by the first part, W at a time
        for (int64_t j = 0; lo == 0 && j < nR / R; ++j)
            if (ranks[j] > 0) dot_block<W>(u + j * R, nR, xf, A + j * R * in, in, in, m, ranks[j], af);
        return;
    }
    for (int64_t c0 = 0; c0 < in; c0 += kChunk) {
        const int64_t len = std::min(kChunk, in - c0);
        for (int64_t q = lo; q < hi; ++q) {
            if (!used(q)) continue;
            const T* row = A + q * in + c0;
            const float* a = nullptr;
            if constexpr (std::is_same_v<T, float>) {
                a = row;
            } else {
#pragma omp simd
                for (int64_t d = 0; d < len; ++d) af[d] = to_float(row[d]);
                a = af;
            }
            float dots[W];
            if (m == W)
                dot_tile<W, true>(dots, a, xf + c0, in, len, W);
            else
                dot_tile<W>(dots, a, xf + c0, in, len, m);
            float* out = u + q;
            for (int64_t i = 0; i < m; ++i) out[i * nR] = c0 == 0 ? dots[i] : out[i * nR] + dots[i];
        }
    }
}

// One thread's float32 scratch: a block's rows of x, a row of A, one chunk of transposed B.
struct Scratch {
    std::vector<float> xf, af, bt;
    explicit Scratch(const LoRAArgs& a) : xf(kMaxTokens * a.in_features), af(kLanes * a.in_features),
                                          bt(a.max_rank * kCols) {}
};

// kCols output columns of one slice: the expand's unit of work.
struct ColumnChunk {
    int64_t slice, col, cols;
};

// The shrink, u = x @ A.T for a segment's tokens (blocks of W), in parts of rows of A; then
// per chunk of kCols output columns of a slice the chunk of B transposed once (it stays in L1) and
// added to every token's y. B is read once per segment, whatever its size (a 7B gate_up B is
// 4.8 MB a slot). Called by every thread of the team: each takes its parts and chunks ("omp for");
// each thread's share of the arithmetic is the same whatever the team's size, so are the bits.
template <int64_t W, typename T>
MCL_INLINE void lora_segment(const LoRAArgs& a, int64_t begin, int64_t end, int64_t slot, float* u,
                             const std::vector<ColumnChunk>& chunks, int64_t parts, Scratch& w) {
    const int64_t in = a.in_features, n = a.num_slices, R = a.max_rank, nR = n * R;
    const T* A = static_cast<const T*>(a.lora_a) + slot * nR * in;
    const T* B = static_cast<const T*>(a.lora_b) + slot * a.out_features * R;
    const int32_t* ranks = a.ranks + slot * n;
    const float scale = a.scaling[slot];
    const int64_t per = (nR + parts - 1) / parts;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < parts; ++p)
        for (int64_t t0 = begin; t0 < end; t0 += W) {
            const int64_t mt = std::min(W, end - t0);
            for (int64_t i = 0; i < mt; ++i) {  // the block's rows of x in float32
                const T* row = static_cast<const T*>(a.x) + (t0 + i) * a.x_stride;
#pragma omp simd
                for (int64_t d = 0; d < in; ++d) w.xf[i * in + d] = to_float(row[d]);
            }
            shrink<W>(u + (t0 - begin) * nR, nR, w.xf.data(), mt, A, ranks, R, p * per, std::min(nR, (p + 1) * per), in,
                   w.af.data());
        }
    T* y = static_cast<T*>(a.y) + begin * a.y_stride;
    const int64_t pass = std::is_same_v<T, float> ? std::max<int64_t>(end - begin, 1) : kExpandTokens;
    for (int64_t i0 = 0; i0 < end - begin; i0 += pass) {
        const int64_t i1 = std::min(end - begin, i0 + pass);
        // The same bounds and static schedule give each thread the same chunks in every pass.
#pragma omp for schedule(static) nowait
        for (size_t c = 0; c < chunks.size(); ++c) {
            const auto [j, col, cols] = chunks[c];
            const int64_t r = ranks[j];
            if (r == 0) continue;
            transpose_chunk(w.bt.data(), B + col * R, R, r, cols);
            for (int64_t i = i0; i < i1; ++i)
                expand_chunk<W>(y + i * a.y_stride + col, u + i * nR + j * R, w.bt.data(), r, cols, scale);
        }
    }
#pragma omp barrier
}

using SegmentFn = void (*)(const LoRAArgs&, int64_t, float*, const std::vector<ColumnChunk>&, int64_t, Scratch&);
#define MCL_SEGMENT(NAME, T, W)                                                                              \
    MCL_CLONES void NAME(const LoRAArgs& a, int64_t s, float* u, const std::vector<ColumnChunk>& chunks,     \
                         int64_t parts, Scratch& w) {                                                       \
        lora_segment<W, T>(a, a.seg_starts[s], a.seg_starts[s + 1], a.seg_slots[s], u, chunks, parts, w); \
    }
MCL_SEGMENT(segment_f32_8, float, 8)
MCL_SEGMENT(segment_f16_8, F16, 8)
MCL_SEGMENT(segment_bf16_8, BF16, 8)
MCL_SEGMENT(segment_f32_16, float, 16)
MCL_SEGMENT(segment_f16_16, F16, 16)
MCL_SEGMENT(segment_bf16_16, BF16, 16)

// Below this many multiply-adds per thread, starting one costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;

}  // namespace

// The parallel region stays out of the cloned functions (its outlined body would be compiled for
// the baseline only); each segment's work is one call of the clone picked for the machine.
void lora_apply(const LoRAArgs& a, DType dtype, int num_threads, int lanes) {
    const bool wide = (lanes ? lanes : dot_lanes()) == 16;
    const SegmentFn segment = dtype == DType::f32   ? (wide ? segment_f32_16 : segment_f32_8)
                            : dtype == DType::f16 ? (wide ? segment_f16_16 : segment_f16_8)
                                                  : (wide ? segment_bf16_16 : segment_bf16_8);
    const int64_t nR = a.num_slices * a.max_rank;
    int64_t longest = 0, tokens = 0;
    for (int64_t s = 0; s < a.num_segments; ++s)
        if (a.seg_slots[s] >= 0) {
            longest = std::max<int64_t>(longest, a.seg_starts[s + 1] - a.seg_starts[s]);
            tokens += a.seg_starts[s + 1] - a.seg_starts[s];
        }
    const int64_t work = tokens * nR * (a.in_features + a.out_features / a.num_slices);
    const int threads = static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::max(num_threads, 1)));
    std::vector<ColumnChunk> chunks;
    for (int64_t j = 0; j < a.num_slices; ++j)
        for (int64_t c = a.offsets[j]; c < a.offsets[j + 1]; c += kCols)
            chunks.push_back({j, c, std::min(kCols, a.offsets[j + 1] - c)});
    std::vector<float> u(longest * nR);
    const auto run = [&] {
        Scratch w(a);
        for (int64_t s = 0; s < a.num_segments; ++s)
            if (a.seg_slots[s] >= 0) segment(a, s, u.data(), chunks, threads, w);
    };
    if (threads == 1) return run();   // (the worksharing loops then run whole, with no team)
#pragma omp parallel num_threads(threads)
    run();
}

}  // namespace mcl
