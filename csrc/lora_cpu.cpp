#include "lora_cpu.h"

#include <algorithm>
#include <vector>

namespace mcl {
namespace {

constexpr int64_t kMaxTokens = kLanes;  // tokens per block of the shrink (W <= 16: one lane each)
constexpr int64_t kCols = 64;        // output columns per pass of the expand: four vectors of sums
constexpr int64_t kChunk = 2048;     // input features per pass of the shrink (a block's x chunk: 128 KB)
// Tokens per pass of the expand: each pass walks its tokens' rows of y chunk by chunk rather than one
// chunk of every token's row (a page apart each), and converts each chunk of B once.
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

// Asks for the kCols values from p on (a row's next chunk of y or Bt) ahead of their use: the rows
// are a page or more apart, more streams than the hardware prefetcher follows.
template <bool kWrite, typename T>
MCL_INLINE void prefetch_chunk(const T* p) {
    for (size_t byte = 0; byte < kCols * sizeof(T); byte += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(p) + byte, kWrite);
}

// bt[k * kCols + o] = Bt[k * ld + o] in float32 for k < r and o < w <= kCols (rows of B transposed,
// ld values apart); zero past w. A contiguous copy per row: no 4K-aliasing of rows a page apart.
// The rows' next chunk is asked for meanwhile (a thread's chunks are consecutive).
template <typename T>
MCL_INLINE void load_chunk(float* bt, const T* Bt, int64_t ld, int64_t r, int64_t w) {
    for (int64_t k = 0; k < r; ++k) {
        prefetch_chunk<false>(Bt + k * ld + kCols);
#pragma omp simd
        for (int64_t o = 0; o < w; ++o) bt[k * kCols + o] = to_float(Bt[k * ld + o]);
        for (int64_t o = w; o < kCols; ++o) bt[k * kCols + o] = 0.0f;
    }
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

// One thread's float32 scratch: a block's rows of x, a row of A, one chunk of B's columns.
struct Scratch {
    std::vector<float> xf, af, bt;
    explicit Scratch(const LoRAArgs& a) : xf(kMaxTokens * a.in_features), af(kLanes * a.in_features),
                                          bt(a.max_rank * kCols) {}
};

// kCols output columns of one slice: the expand's unit of work.
struct ColumnChunk {
    int64_t slice, col, cols;
};

// Every adapter segment's LoRA (segs: their indices), called by every thread of the team; each takes
// its share of the work ("omp for"). First the shrinks, u[t] = x[t] @ A[slot].T for the segments'
// tokens t (blocks of W; row t - seg_starts[0] of u, nR floats apart), in parts of rows of A: thread
// p computes part p of every segment. Then, after the one barrier, the expands: per segment, pass of
// kExpandTokens tokens and chunk of kCols output columns of a slice, the chunk of Bt converted once
// (it stays in L1) and added to each of the pass's rows of y; the segments' rows of y are disjoint,
// so the threads go on to the next pass or segment without waiting. Each thread's share of the
// arithmetic is the same whatever the team's size, so are the bits.
template <int64_t W, typename T>
MCL_INLINE void lora_segments(const LoRAArgs& a, const std::vector<int64_t>& segs, float* u,
                              const std::vector<ColumnChunk>& chunks, int64_t parts, Scratch& w) {
    const int64_t in = a.in_features, n = a.num_slices, R = a.max_rank, nR = n * R, first = a.seg_starts[0];
    const int64_t per = (nR + parts - 1) / parts, items = static_cast<int64_t>(segs.size()) * parts;
#pragma omp for schedule(static, 1)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t s = segs[item / parts], p = item % parts, slot = a.seg_slots[s];
        const T* A = static_cast<const T*>(a.lora_a) + slot * nR * in;
        for (int64_t t0 = a.seg_starts[s]; t0 < a.seg_starts[s + 1]; t0 += W) {
            const int64_t mt = std::min(W, a.seg_starts[s + 1] - t0);
            for (int64_t i = 0; i < mt; ++i) {  // the block's rows of x in float32
                const T* row = static_cast<const T*>(a.x) + (t0 + i) * a.x_stride;
#pragma omp simd
                for (int64_t d = 0; d < in; ++d) w.xf[i * in + d] = to_float(row[d]);
            }
            shrink<W>(u + (t0 - first) * nR, nR, w.xf.data(), mt, A, a.ranks + slot * n, R, p * per,
                      std::min(nR, (p + 1) * per), in, w.af.data());
        }
    }
    for (const int64_t s : segs) {
        const int64_t slot = a.seg_slots[s];
        const T* Bt = static_cast<const T*>(a.lora_bt) + slot * R * a.out_features;
        const int32_t* ranks = a.ranks + slot * n;
        const float scale = a.scaling[slot];
        for (int64_t i0 = a.seg_starts[s]; i0 < a.seg_starts[s + 1]; i0 += kExpandTokens) {
            const int64_t i1 = std::min<int64_t>(a.seg_starts[s + 1], i0 + kExpandTokens);
            // The same bounds and static schedule give each thread the same chunks in every pass.
#pragma omp for schedule(static) nowait
            for (size_t c = 0; c < chunks.size(); ++c) {
                const auto [j, col, cols] = chunks[c];
                const int64_t r = ranks[j];
                if (r == 0) continue;
                load_chunk(w.bt.data(), Bt + col, a.out_features, r, cols);
                for (int64_t i = i0; i < i1; ++i) {
                    T* y = static_cast<T*>(a.y) + i * a.y_stride + col;
                    prefetch_chunk<true>(y + kCols);
                    expand_chunk<W>(y, u + (i - first) * nR + j * R, w.bt.data(), r, cols, scale);
                }
            }
        }
    }
}

using SegmentsFn = void (*)(const LoRAArgs&, const std::vector<int64_t>&, float*, const std::vector<ColumnChunk>&,
                            int64_t, Scratch&);
#define MCL_SEGMENTS(NAME, T, W)                                                                          \
    MCL_CLONES void NAME(const LoRAArgs& a, const std::vector<int64_t>& segs, float* u,                   \
                         const std::vector<ColumnChunk>& chunks, int64_t parts, Scratch& w) {             \
        lora_segments<W, T>(a, segs, u, chunks, parts, w);                                                \
    }
MCL_SEGMENTS(segments_f32_8, float, 8)
MCL_SEGMENTS(segments_f16_8, F16, 8)
MCL_SEGMENTS(segments_bf16_8, BF16, 8)
MCL_SEGMENTS(segments_f32_16, float, 16)
MCL_SEGMENTS(segments_f16_16, F16, 16)
MCL_SEGMENTS(segments_bf16_16, BF16, 16)

// Below this many multiply-adds per thread, starting one costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;

}  // namespace

// The parallel region stays out of the cloned functions (its outlined body would be compiled for
// the baseline only); the work is one call of the clone picked for the machine.
void lora_apply(const LoRAArgs& a, DType dtype, int num_threads, int lanes) {
    const bool wide = (lanes ? lanes : dot_lanes()) == 16;
    const SegmentsFn segments = dtype == DType::f32   ? (wide ? segments_f32_16 : segments_f32_8)
                              : dtype == DType::f16 ? (wide ? segments_f16_16 : segments_f16_8)
                                                    : (wide ? segments_bf16_16 : segments_bf16_8);
    const int64_t nR = a.num_slices * a.max_rank;
    std::vector<int64_t> segs;
    int64_t tokens = 0;
    for (int64_t s = 0; s < a.num_segments; ++s)
        if (a.seg_slots[s] >= 0 && a.seg_starts[s + 1] > a.seg_starts[s]) {
            segs.push_back(s);
            tokens += a.seg_starts[s + 1] - a.seg_starts[s];
        }
    if (segs.empty()) return;
    const int64_t work = tokens * nR * (a.in_features + a.out_features / a.num_slices);
    const int threads = static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::max(num_threads, 1)));
    std::vector<ColumnChunk> chunks;
    for (int64_t j = 0; j < a.num_slices; ++j)
        for (int64_t c = a.offsets[j]; c < a.offsets[j + 1]; c += kCols)
            chunks.push_back({j, c, std::min(kCols, a.offsets[j + 1] - c)});
    std::vector<float> u((a.seg_starts[segs.back() + 1] - a.seg_starts[0]) * nR);
    const auto run = [&] {
        Scratch w(a);
        segments(a, segs, u.data(), chunks, threads, w);
    };
    if (threads == 1) return run();   // (the worksharing loops then run whole, with no team)
#pragma omp parallel num_threads(threads)
    run();
}

}  // namespace mcl
