#include "lora_cpu.h"

#include <algorithm>
#include <vector>

namespace mcl {
namespace {

constexpr int64_t kMaxTokens = kLanes;  // tokens per block of the shrink (W <= 16: one lane each)
constexpr int64_t kCols = 64;        // output columns per pass of the expand: four vectors of sums
constexpr int64_t kChunk = 512;      // input features per pass of the shrink (a tile's rows of A and x: L1)
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
MCL_INLINE void expand_chunk_f32(T* y, const float* u, const float* bt, int64_t r, int64_t w, float scale) {
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

// Rows of A and tokens per tile of the shrink: kRowsA rows of A against W / kRowsA tokens, one
// vector of partial sums per pair (W of them). Each vector loaded serves several products: a tile
// makes kRowsA + W / kRowsA loads for W multiply-adds (one row of A against W tokens: W + 1).
constexpr int64_t kRowsA = 4;

// s[i * M + t] = a_i . x_t for the kRowsA rows a_i and the M = W / kRowsA rows x_t (D a multiple
// of W). Each pair's sum runs in the order of dot_tile's (lanes, then one butterfly), so the bits do
// not depend on the tiling.
template <int64_t W>
MCL_INLINE void dot_grid(float* s, const float* const (&a)[kRowsA], const float* const (&x)[W / kRowsA], int64_t D) {
    constexpr int64_t M = W / kRowsA;
    fvec<W> acc[W] = {};
    for (int64_t d0 = 0; d0 < D; d0 += W) {
        fvec<W> xv[M];
#pragma GCC unroll 4
        for (int64_t t = 0; t < M; ++t) xv[t] = load_vec<W>(x[t] + d0);
#pragma GCC unroll 4
        for (int64_t i = 0; i < kRowsA; ++i) {
            const fvec<W> av = load_vec<W>(a[i] + d0);
#pragma GCC unroll 4
            for (int64_t t = 0; t < M; ++t) acc[i * M + t] += av * xv[t];
        }
    }
    lane_sums<W>(acc, s, W);
}

// u[i * nR + q] = x_i . A[q] for the m <= W rows x_i = xf + i * ld (the block's tokens) and the rows q
// of A [nR, in] that are within their slice's rank (q = j*R + k, k < ranks[j]; slices R rows apart),
// in tiles of kRowsA rows of A by W / kRowsA tokens, all in float32. ``in`` is taken kChunk values
// at a time, so that a tile's rows of A and the block's x chunk stay in L1 while the tiles pass.
template <int64_t W>
MCL_INLINE void shrink(float* u, int64_t nR, const float* xf, int64_t ld, int64_t m, const float* A,
                       const int32_t* ranks, int64_t R, int64_t in) {
    constexpr int64_t M = W / kRowsA;
    const auto used = [&](int64_t q) { return q % R < ranks[q / R]; };
    if (in % W != 0) {  // (no model has such a width) W rows of A at a time
        for (int64_t j = 0; j < nR / R; ++j)
            if (ranks[j] > 0) dot_block<W>(u + j * R, nR, xf, A + j * R * in, in, in, m, ranks[j], nullptr);
        return;
    }
    for (int64_t c0 = 0; c0 < in; c0 += kChunk) {
        const int64_t len = std::min(kChunk, in - c0);
        for (int64_t q = 0; q < nR;) {
            int64_t rows[kRowsA], nq = 0;  // the tile's used rows of A
            for (; q < nR && nq < kRowsA; ++q)
                if (used(q)) rows[nq++] = q;
            if (nq == 0) break;
            const float* a[kRowsA];  // a short tile repeats its first row; those sums are dropped
            for (int64_t i = 0; i < kRowsA; ++i) a[i] = A + rows[i < nq ? i : 0] * in + c0;
            for (int64_t t0 = 0; t0 < m; t0 += M) {
                const float* x[M];
                for (int64_t t = 0; t < M; ++t) x[t] = xf + std::min(t0 + t, m - 1) * ld + c0;  // past m: dropped
                float dots[W];
                dot_grid<W>(dots, a, x, len);
                for (int64_t i = 0; i < nq; ++i)
                    for (int64_t t = 0; t < std::min(M, m - t0); ++t) {
                        float* out = u + (t0 + t) * nR + rows[i];
                        *out = c0 == 0 ? dots[i * M + t] : *out + dots[i * M + t];
                    }
            }
        }
    }
}

// Grows v to at least n values (never shrinks, never clears: callers write before they read).
MCL_INLINE float* at_least(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    return v.data();
}

// kCols output columns of one slice: the expand's unit of work.
struct ColumnChunk {
    int64_t slice, col, cols;
};

// A block of at most W tokens of one segment: the shrink's unit of work.
struct TokenBlock {
    int64_t segment, first;
};

// The float32 arithmetic: 16-bit inputs converted to float32 and float32 multiply-adds. One thread's
// scratch: a block's rows of x, one adapter's A (16-bit weights only), one chunk of B's columns. Each
// thread keeps its own between calls (a decode step makes one call per projection and layer:
// allocating and clearing it every time cost more than small calls' arithmetic).
template <int64_t W, typename T>
struct FloatArith {
    static constexpr int64_t kBlock = W;  // tokens per block of the shrink
    static constexpr int64_t row_floats(int64_t nR) { return nR; }  // of u per token
    const LoRAArgs& a;
    float *xf, *af, *bt;
    int64_t converted = -1;  // the segment whose A is in af

    explicit FloatArith(const LoRAArgs& args) : a(args) {
        thread_local std::vector<float> xf_, af_, bt_;
        xf = at_least(xf_, kMaxTokens * a.in_features);
        af = at_least(af_, std::is_same_v<T, float> ? 0 : a.num_slices * a.max_rank * a.in_features);
        bt = at_least(bt_, a.max_rank * kCols);
    }

    // u[i * nR + q] = x[t0 + i] . A[slot, q] for the block's m tokens (16-bit A converted once per
    // segment, its blocks being consecutive for a thread).
    MCL_INLINE void shrink_block(float* u, int64_t segment, int64_t t0, int64_t m) {
        const int64_t in = a.in_features, n = a.num_slices, R = a.max_rank, nR = n * R, slot = a.seg_slots[segment];
        const T* x = static_cast<const T*>(a.x) + t0 * a.x_stride;
        const float* rows = xf;  // the block's rows of x in float32, ld apart
        int64_t ld = in;
        if constexpr (std::is_same_v<T, float>) {  // read in place (the odd-width path wants them packed)
            if (in % W == 0) rows = x, ld = a.x_stride;
        }
        if (rows == xf)
            for (int64_t i = 0; i < m; ++i)
#pragma omp simd
                for (int64_t d = 0; d < in; ++d) xf[i * in + d] = to_float(x[i * a.x_stride + d]);
        const T* A = static_cast<const T*>(a.lora_a) + slot * nR * in;
        const float* Af = af;
        if constexpr (std::is_same_v<T, float>) {
            Af = A;
        } else if (converted != segment) {
#pragma omp simd
            for (int64_t e = 0; e < nR * in; ++e) af[e] = to_float(A[e]);
            converted = segment;
        }
        shrink<W>(u, nR, rows, ld, m, Af, a.ranks + slot * n, R, in);
    }

    // y[i, col:col + cols] += scale * u_i[0:r] @ Bt[slot, :r, col:col + cols] for the tokens i0..i1
    // (u_i: row i - first of u, nR floats apart, from the slice's first rank on).
    MCL_INLINE void expand_chunk(const float* u, int64_t first, int64_t slot, int64_t j, int64_t col, int64_t cols,
                                 int64_t r, int64_t i0, int64_t i1) {
        const int64_t R = a.max_rank, nR = a.num_slices * R;
        const T* Bt = static_cast<const T*>(a.lora_bt) + slot * R * a.out_features;
        load_chunk(bt, Bt + col, a.out_features, r, cols);
        for (int64_t i = i0; i < i1; ++i) {
            T* y = static_cast<T*>(a.y) + i * a.y_stride + col;
            prefetch_chunk<true>(y + kCols);
            expand_chunk_f32<W>(y, u + (i - first) * nR + j * R, bt, r, cols, a.scaling[slot]);
        }
    }
};

#if MCL_BF16_DOT
// The AVX512-BF16 arithmetic (bfloat16, bt_pairs): vdpbf16ps multiplies 32 pairs of bfloat16
// exactly and adds each pair's two products into one of 16 float32 sums. Shrink: x and A read as
// they are, 32 elements an instruction, in tiles of kRowsA rows of A by 4 tokens; each block's u is
// then rounded to bfloat16 in pairs of ranks (a slice's ranks past r as zeros), which the expand
// multiplies with Bt's pairs of rows, read as they are. The instruction counts inputs below
// bfloat16's smallest normal (~1e-38) as zero.
struct PairArith {
    static constexpr int64_t kBlock = 16;                    // tokens per block of the shrink
    static constexpr int64_t kTileTokens = kLanes / kRowsA;  // tokens per tile: kRowsA x 4 sums
    static constexpr int64_t kPrefetchAhead = 256;            // elements of a row of A (8 cache lines)
    const LoRAArgs& a;
    explicit PairArith(const LoRAArgs& args) : a(args) {}

    // The pairs of the rounded u: a token's row holds n * R / 2 of them after its nR floats, each
    // a float whose bits are the pair's two bfloat16 (the lower rank in the low half).
    template <typename F>
    MCL_INLINE F* pairs(F* u_row) const { return u_row + a.num_slices * a.max_rank; }
    static constexpr int64_t row_floats(int64_t nR) { return nR + nR / 2; }

    // u[i * ld + q] = x[t0 + i] . A[slot, q] for the block's m tokens and the used rows q of A (each
    // pair's sum in dot_tile's lane order), then each token's pairs of rounded ranks.
    MCL_BF16_DOT_TARGET void shrink_block(float* u, int64_t segment, int64_t t0, int64_t m) const {
        const int64_t in = a.in_features, n = a.num_slices, R = a.max_rank, nR = n * R, ld = row_floats(nR);
        const int64_t slot = a.seg_slots[segment];
        const int32_t* ranks = a.ranks + slot * n;
        const BF16* x = static_cast<const BF16*>(a.x) + t0 * a.x_stride;
        const BF16* A = static_cast<const BF16*>(a.lora_a) + slot * nR * in;
        const auto used = [&](int64_t q) { return q % R < ranks[q / R]; };
        for (int64_t q = 0; q < nR;) {
            int64_t rows[kRowsA], nq = 0;  // the tile's used rows of A (a short tile repeats its first)
            for (; q < nR && nq < kRowsA; ++q)
                if (used(q)) rows[nq++] = q;
            if (nq == 0) break;
            const BF16* arow[kRowsA];
            for (int64_t i = 0; i < kRowsA; ++i) arow[i] = A + rows[i < nq ? i : 0] * in;
            for (int64_t tt = 0; tt < m; tt += kTileTokens) {
                const BF16* xrow[kTileTokens];  // past m: the last token again, its sums dropped
                for (int64_t t = 0; t < kTileTokens; ++t) xrow[t] = x + std::min(tt + t, m - 1) * a.x_stride;
                fvec<kLanes> acc[kLanes] = {};
                for (int64_t d0 = 0; d0 < in; d0 += 32) {
                    if (tt == 0)  // the tile's rows of A come from memory once, ahead of their use
                        for (int64_t i = 0; i < kRowsA; ++i) __builtin_prefetch(arow[i] + d0 + kPrefetchAhead);
                    __m512bh xv[kTileTokens];
#pragma GCC unroll 4
                    for (int64_t t = 0; t < kTileTokens; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(xrow[t] + d0);
#pragma GCC unroll 4
                    for (int64_t i = 0; i < kRowsA; ++i) {
                        const __m512bh av = (__m512bh)_mm512_loadu_si512(arow[i] + d0);
#pragma GCC unroll 4
                        for (int64_t t = 0; t < kTileTokens; ++t)
                            acc[i * kTileTokens + t] = _mm512_dpbf16_ps(acc[i * kTileTokens + t], av, xv[t]);
                    }
                }
                float dots[kLanes];
                lane_sums<kLanes>(acc, dots, kLanes);
                for (int64_t i = 0; i < nq; ++i)
                    for (int64_t t = 0; t < std::min(kTileTokens, m - tt); ++t)
                        u[(tt + t) * ld + rows[i]] = dots[i * kTileTokens + t];
            }
        }
        for (int64_t t = 0; t < m; ++t) {  // each slice's ranks rounded in pairs, zero past its rank
            const float* row = u + t * ld;
            float* out = pairs(u + t * ld);
            for (int64_t j = 0; j < n; ++j)
                for (int64_t k = 0; k < R; k += 2) {
                    BF16 lo{0}, hi{0};
                    if (k < ranks[j]) store(&lo, row[j * R + k]);
                    if (k + 1 < ranks[j]) store(&hi, row[j * R + k + 1]);
                    out[(j * R + k) / 2] = from_bits(lo.bits | static_cast<uint32_t>(hi.bits) << 16);
                }
        }
    }

    // y[i, col:col + cols] += scale * sum_p up_i[p] . Bp[slot, p, col:col + cols] for the tokens
    // i0..i1 (up_i: token i's pairs of slice j's ranks), 16 columns (32 bfloat16: each column's pair)
    // a vector; the chunk of Bp stays in L1 across the tokens.
    MCL_BF16_DOT_TARGET void expand_chunk(const float* u, int64_t first, int64_t slot, int64_t j, int64_t col,
                                          int64_t cols, int64_t r, int64_t i0, int64_t i1) const {
        constexpr int64_t V = kCols / 16;
        const int64_t R = a.max_rank, nR = a.num_slices * R, ld = 2 * a.out_features, P = (r + 1) / 2;
        const BF16* Bp = static_cast<const BF16*>(a.lora_bt) + slot * (R / 2) * ld + 2 * col;  // pair 0, column col
        const float scale = a.scaling[slot];
        for (int64_t p = 0; p < P; ++p)  // the pairs' next chunk (a thread's chunks are consecutive)
            prefetch_chunk<false>(Bp + p * ld + 2 * kCols), prefetch_chunk<false>(Bp + p * ld + 3 * kCols);
        __mmask16 masks[V];  // the columns of each vector within the chunk
        for (int64_t v = 0; v < V; ++v)
            masks[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - v * 16, 0, 16)) - 1);
        for (int64_t i = i0; i < i1; ++i) {
            BF16* y = static_cast<BF16*>(a.y) + i * a.y_stride + col;
            prefetch_chunk<true>(y + kCols);
            const float* up = pairs(u + (i - first) * row_floats(nR)) + j * R / 2;
            fvec<16> acc[V] = {};
            for (int64_t p = 0; p < P; ++p) {
                const __m512bh w = (__m512bh)_mm512_set1_ps(up[p]);
#pragma GCC unroll 4
                for (int64_t v = 0; v < V; ++v)
                    acc[v] = _mm512_dpbf16_ps(acc[v], w, (__m512bh)_mm512_maskz_loadu_epi32(masks[v], Bp + p * ld + v * 32));
            }
            if (cols == kCols) {  // y + scale * sums, rounded once
#pragma GCC unroll 4
                for (int64_t v = 0; v < V; ++v) {
                    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + v * 16));
                    const __m512 yv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
                    const __m512 sum = _mm512_fmadd_ps(acc[v], _mm512_set1_ps(scale), yv);
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + v * 16), (__m256i)_mm512_cvtneps_pbh(sum));
                }
            } else {  // a slice's last, partial chunk
                float sums[kCols];
                for (int64_t v = 0; v < V; ++v) {
                    const fvec<16> sv = acc[v] * scale;
                    std::memcpy(sums + v * 16, &sv, sizeof sv);
                }
                add_row(y, sums, cols);
            }
        }
    }
};
#endif

// Every adapter segment's LoRA (segs: their indices) in Arith's arithmetic, called by every thread
// of the team; each takes its share of the work ("omp for"). First the shrinks, u[t] = x[t] @
// A[slot].T for the segments' tokens t (row t - seg_starts[0] of u, u_ld floats apart), block by
// block (each thread reads only its own blocks' rows of x). Then, after the one barrier, the
// expands: per segment, pass of kExpandTokens tokens and chunk of kCols output columns of a slice,
// added to each of the pass's rows of y; the segments' rows of y are disjoint, so the threads go on
// to the next pass or segment without waiting. Each product's sum is computed the same way whatever
// thread computes it and whatever the team's size, so are the bits.
template <typename Arith>
MCL_INLINE void lora_segments(const LoRAArgs& a, const std::vector<int64_t>& segs,
                              const std::vector<TokenBlock>& blocks, float* u, const std::vector<ColumnChunk>& chunks) {
    Arith arith(a);
    const int64_t first = a.seg_starts[0], u_ld = Arith::row_floats(a.num_slices * a.max_rank);
#pragma omp for schedule(static, 1)
    for (size_t b = 0; b < blocks.size(); ++b) {
        const auto [s, t0] = blocks[b];
        arith.shrink_block(u + (t0 - first) * u_ld, s, t0, std::min(Arith::kBlock, a.seg_starts[s + 1] - t0));
    }
    for (const int64_t s : segs) {
        const int64_t slot = a.seg_slots[s];
        const int32_t* ranks = a.ranks + slot * a.num_slices;
        for (int64_t i0 = a.seg_starts[s]; i0 < a.seg_starts[s + 1]; i0 += kExpandTokens) {
            const int64_t i1 = std::min<int64_t>(a.seg_starts[s + 1], i0 + kExpandTokens);
            // The same bounds and static schedule give each thread the same chunks in every pass.
#pragma omp for schedule(static) nowait
            for (size_t c = 0; c < chunks.size(); ++c) {
                const auto [j, col, cols] = chunks[c];
                if (ranks[j] > 0) arith.expand_chunk(u, first, slot, j, col, cols, ranks[j], i0, i1);
            }
        }
    }
}

using SegmentsFn = void (*)(const LoRAArgs&, const std::vector<int64_t>&, const std::vector<TokenBlock>&, float*,
                            const std::vector<ColumnChunk>&);
#define MCL_SEGMENTS(NAME, T, W)                                                                               \
    MCL_CLONES void NAME(const LoRAArgs& a, const std::vector<int64_t>& segs, const std::vector<TokenBlock>& blocks, \
                         float* u, const std::vector<ColumnChunk>& chunks) {                                  \
        lora_segments<FloatArith<W, T>>(a, segs, blocks, u, chunks);                                          \
    }
MCL_SEGMENTS(segments_f32_8, float, 8)
MCL_SEGMENTS(segments_f16_8, F16, 8)
MCL_SEGMENTS(segments_bf16_8, BF16, 8)
MCL_SEGMENTS(segments_f32_16, float, 16)
MCL_SEGMENTS(segments_f16_16, F16, 16)
MCL_SEGMENTS(segments_bf16_16, BF16, 16)

#if MCL_BF16_DOT
// Flattened so that PairArith's methods, compiled for the instructions they use, are inlined.
MCL_BF16_DOT_TARGET __attribute__((flatten)) void segments_bf16_pairs(const LoRAArgs& a, const std::vector<int64_t>& segs,
                                                                      const std::vector<TokenBlock>& blocks, float* u,
                                                                      const std::vector<ColumnChunk>& chunks) {
    lora_segments<PairArith>(a, segs, blocks, u, chunks);
}
#endif

// Below this many multiply-adds per thread, starting one costs more than it saves. Counted with the
// buffers coming from memory, as in the engine (a layer's adapters are out of cache by the next
// step), where a second thread also fetches them: at 0.5B's projections and 8-60 decode tokens, a
// quarter of 2^20 was as fast or faster than 2^20 at every point, up to 2.8x (float32 gate/up, 8
// tokens).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;

}  // namespace

bool can_lora_pairs(DType dtype, int64_t max_rank, int64_t in_features) {
    return dtype == DType::bf16 && max_rank % 2 == 0 && in_features % 32 == 0 && has_bf16_dot();
}

// The parallel region stays out of the cloned functions (its outlined body would be compiled for
// the baseline only); the work is one call of the function picked for the machine and arithmetic.
void lora_apply(const LoRAArgs& a, DType dtype, int num_threads, int lanes) {
    const int64_t nR = a.num_slices * a.max_rank;
    int64_t W = lanes ? lanes : dot_lanes(), row_floats = nR;  // tokens per shrink block; floats of u per token
    const bool wide = W == 16;
    SegmentsFn segments = dtype == DType::f32   ? (wide ? segments_f32_16 : segments_f32_8)
                        : dtype == DType::f16 ? (wide ? segments_f16_16 : segments_f16_8)
                                              : (wide ? segments_bf16_16 : segments_bf16_8);
#if MCL_BF16_DOT
    if (a.bt_pairs) {
        segments = segments_bf16_pairs;
        W = PairArith::kBlock;
        row_floats = PairArith::row_floats(nR);
    }
#endif
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
    std::vector<TokenBlock> blocks;
    for (const int64_t s : segs)
        for (int64_t t0 = a.seg_starts[s]; t0 < a.seg_starts[s + 1]; t0 += W) blocks.push_back({s, t0});
    std::vector<ColumnChunk> chunks;
    for (int64_t j = 0; j < a.num_slices; ++j)
        for (int64_t c = a.offsets[j]; c < a.offsets[j + 1]; c += kCols)
            chunks.push_back({j, c, std::min(kCols, a.offsets[j + 1] - c)});
    // The shrink's output, one row per token from the first segment's on (the calling thread's
    // buffer, kept between calls; the shrink writes every value the expand reads).
    thread_local std::vector<float> u_;
    float* u = at_least(u_, (a.seg_starts[segs.back() + 1] - a.seg_starts[0]) * row_floats);
    if (threads == 1) return segments(a, segs, blocks, u, chunks);  // (the worksharing loops then run whole, with no team)
#pragma omp parallel num_threads(threads)
    segments(a, segs, blocks, u, chunks);
}

}  // namespace mcl
