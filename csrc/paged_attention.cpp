#include "paged_attention.h"

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

namespace mcl {
namespace {

// s[t] = exp(s[t] - max(s[0:n])) for t < n (n >= 1); returns their sum. The last n % W scores
// through one vector padded with -87 (whose exps are not added).
template <int64_t W>
MCL_INLINE float softmax_numerators(float* s, int64_t n) {
    float mx = s[0];
    int64_t t = 0;
    if (n >= W) {
        fvec<W> m = load_vec<W>(s);
        for (t = W; t + W <= n; t += W) {
            const fvec<W> v = load_vec<W>(s + t);
            m = v > m ? v : m;
        }
        for (int64_t l = 0; l < W; ++l) mx = std::max(mx, m[l]);
    }
    for (; t < n; ++t) mx = std::max(mx, s[t]);
    fvec<W> sum = {};
    for (t = 0; t + W <= n; t += W) {
        const fvec<W> e = vexp<W>(load_vec<W>(s + t) - mx);
        std::memcpy(s + t, &e, sizeof e);
        sum += e;
    }
    float total = 0.f;
    for (int64_t l = 0; l < W; ++l) total += sum[l];
    if (t < n) {
        fvec<W> tail = {};
        tail -= 87.f;
        std::memcpy(&tail, s + t, (n - t) * sizeof(float));
        const fvec<W> e = vexp<W>(tail - mx);
        std::memcpy(s + t, &e, (n - t) * sizeof(float));
        for (int64_t l = 0; l < n - t; ++l) total += e[l];
    }
    return total;
}

// acc[0:kVecs * W] += sum_j p[j] * v_j[0:kVecs * W] for the m value rows v_j = v + j * stride: the
// partial sums in registers, two rows at a time into two sets (FMA latency).
template <int64_t W, int64_t kVecs, typename T>
MCL_INLINE void weighted_columns(float* acc, const float* p, const T* v, int64_t stride, int64_t m) {
    fvec<W> even[kVecs] = {}, odd[kVecs] = {};
    int64_t j = 0;
    for (; j + 2 <= m; j += 2) {
        const T* row = v + j * stride;
#pragma GCC unroll 4
        for (int64_t c = 0; c < kVecs; ++c) {
            even[c] += p[j] * load_float<W>(row + c * W);
            odd[c] += p[j + 1] * load_float<W>(row + stride + c * W);
        }
    }
    if (j < m)
#pragma GCC unroll 4
        for (int64_t c = 0; c < kVecs; ++c) even[c] += p[j] * load_float<W>(v + j * stride + c * W);
#pragma GCC unroll 4
    for (int64_t c = 0; c < kVecs; ++c) {
        const fvec<W> sum = load_vec<W>(acc + c * W) + (even[c] + odd[c]);
        std::memcpy(acc + c * W, &sum, sizeof sum);
    }
}

// acc[0:D] += sum_j p[j] * v_j for the m value rows v_j = v + j * stride of one block: 4W columns
// at a time, then W, then one.
template <int64_t W, typename T>
MCL_INLINE void weighted_sum(float* acc, const float* p, const T* v, int64_t stride, int64_t D, int64_t m) {
    int64_t d0 = 0;
    for (; d0 + 4 * W <= D; d0 += 4 * W) weighted_columns<W, 4>(acc + d0, p, v + d0, stride, m);
    for (; d0 + W <= D; d0 += W) weighted_columns<W, 1>(acc + d0, p, v + d0, stride, m);
    for (int64_t j = 0; j < m && d0 < D; ++j)
        for (int64_t d = d0; d < D; ++d) acc[d] += p[j] * to_float(v[j * stride + d]);
}

// Asks for the D elements of each of m rows (stride apart) to be brought into the cache: the next
// block's rows while this one is computed, since blocks lie anywhere in a cache larger than L3.
template <typename T>
MCL_INLINE void prefetch_rows(const T* rows, int64_t m, int64_t stride, int64_t D) {
    for (int64_t j = 0; j < m; ++j)
        for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(T)); byte += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(rows + j * stride) + byte);
}

// All keys and values (every KV head) of a sequence of n tokens, towards L2: the next sequence's,
// while this one is computed, since a decode spends too little time per block to hide a miss.
template <typename T>
MCL_INLINE void prefetch_sequence(const T* k_cache, const T* v_cache, const int32_t* table, int64_t n, int64_t bs,
                                  int64_t row_stride) {
    for (int64_t t0 = 0; t0 < n; t0 += bs)
        for (const T* cache : {k_cache, v_cache}) {
            const char* p = reinterpret_cast<const char*>(cache + table[t0 / bs] * bs * row_stride);
            for (int64_t byte = 0; byte < std::min(bs, n - t0) * row_stride * static_cast<int64_t>(sizeof(T)); byte += 64)
                __builtin_prefetch(p + byte, 0, 2);
        }
}

// Work items begin..end of (query row, KV head) pairs, item = row * Hkv + kv_head; scores W keys at a time.
template <typename T, int64_t kDim, int64_t W>
MCL_INLINE void attend_range(const PagedAttentionArgs& a, int64_t begin, int64_t end) {
    const int64_t Hkv = a.num_kv_heads, D = kDim ? kDim : a.head_dim, G = a.num_heads / Hkv, bs = a.block_size;
    const int64_t row_stride = Hkv * D;  // between consecutive tokens of one cache block
    const T* q = static_cast<const T*>(a.q);
    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    T* out = static_cast<T*>(a.out);
    const int32_t* cu = a.cu_seqlens_q;
    std::vector<float> qf(G * D), acc(G * D), inv_sum(G), kf(kLanes * D), scores;
    int64_t b = std::upper_bound(cu, cu + a.num_seqs + 1, begin / Hkv) - cu - 1;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t row = item / Hkv, h = item % Hkv;
        while (cu[b + 1] <= row) ++b;
        const int64_t n = a.context_lens[b] - (cu[b + 1] - cu[b]) + (row - cu[b]) + 1;  // keys 0..n-1
        T* o = out + row * a.out_stride_t + h * G * a.out_stride_h;
        if (n <= 0) {
            for (int64_t g = 0; g < G; ++g)
                for (int64_t d = 0; d < D; ++d) store(o + g * a.out_stride_h + d, 0.f);
            continue;
        }
        const T* qrow = q + row * a.q_stride_t + h * G * a.q_stride_h;
        for (int64_t g = 0; g < G; ++g)
            for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(qrow[g * a.q_stride_h + d]) * a.scale;
        scores.resize(G * n);
        const int32_t* table = a.block_tables + b * a.block_tables_stride;
        const auto block = [&](const T* cache, int64_t t0) { return cache + (table[t0 / bs] * bs * Hkv + h) * D; };
        prefetch_rows(block(k_cache, 0), std::min(bs, n), row_stride, D);
        if (h == 0 && cu[b + 1] == row + 1 && b + 1 < a.num_seqs)  // the next sequence's keys and values, into L2
            prefetch_sequence(k_cache, v_cache, a.block_tables + (b + 1) * a.block_tables_stride, a.context_lens[b + 1],
                              bs, row_stride);
        for (int64_t t0 = 0; t0 < n; t0 += bs) {
            const int64_t m = std::min(bs, n - t0);
            if (t0 + bs < n) prefetch_rows(block(k_cache, t0 + bs), std::min(bs, n - t0 - bs), row_stride, D);
            prefetch_rows(block(v_cache, t0), m, row_stride, D);
            dot_block<W>(&scores[t0], n, qf.data(), block(k_cache, t0), row_stride, D, G, m, kf.data());
        }
        for (int64_t g = 0; g < G; ++g) inv_sum[g] = 1.f / softmax_numerators<W>(&scores[g * n], n);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t0 = 0; t0 < n; t0 += bs) {
            const T* v = block(v_cache, t0);
            const int64_t m = std::min(bs, n - t0);
            for (int64_t g = 0; g < G; ++g) weighted_sum<W>(&acc[g * D], &scores[g * n + t0], v, row_stride, D, m);
        }
        for (int64_t g = 0; g < G; ++g)
            for (int64_t d = 0; d < D; ++d) store(o + g * a.out_stride_h + d, acc[g * D + d] * inv_sum[g]);
    }
}

using AttendFn = void (*)(const PagedAttentionArgs&, int64_t, int64_t);

// One clone set per dtype, head dim compiled in (0: any head dim, read at run time) and dot lanes.
#define MCL_ATTEND(T, DIM)                                                                       \
    MCL_CLONES void attend_##T##_##DIM##_8(const PagedAttentionArgs& a, int64_t lo, int64_t hi) {  \
        attend_range<T, DIM, 8>(a, lo, hi);                                                      \
    }                                                                                            \
    MCL_CLONES void attend_##T##_##DIM##_16(const PagedAttentionArgs& a, int64_t lo, int64_t hi) { \
        attend_range<T, DIM, 16>(a, lo, hi);                                                     \
    }
#define MCL_HEAD_DIMS(X, T) X(T, 0) X(T, 16) X(T, 32) X(T, 64) X(T, 128) X(T, 256)
MCL_HEAD_DIMS(MCL_ATTEND, float)
MCL_HEAD_DIMS(MCL_ATTEND, F16)
MCL_HEAD_DIMS(MCL_ATTEND, BF16)

template <typename T>
AttendFn attend_for(int64_t head_dim, int64_t lanes);
#define MCL_CASE(T, DIM) \
    if (head_dim == DIM) return lanes == 16 ? attend_##T##_##DIM##_16 : attend_##T##_##DIM##_8;
#define MCL_DISPATCH(T)                                                     \
    template <>                                                             \
    AttendFn attend_for<T>(int64_t head_dim, int64_t lanes) {               \
        MCL_HEAD_DIMS(MCL_CASE, T)                                          \
        return lanes == 16 ? attend_##T##_0_16 : attend_##T##_0_8;          \
    }
MCL_DISPATCH(float)
MCL_DISPATCH(F16)
MCL_DISPATCH(BF16)

// Below this much work per thread (multiply-adds: (G + 1) * D per key and KV head, the scores of
// G query heads, their weighted values and the key's load), starting one costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;

// Query rows cu_seqlens_q[0]..cu_seqlens_q[num_seqs] cut into at most num_threads ranges of about
// equal work (keys read, plus one per row), each worth a thread: cuts[i]..cuts[i+1].
std::vector<int64_t> cut_rows(const PagedAttentionArgs& a, int num_threads) {
    const int32_t* cu = a.cu_seqlens_q;
    const auto row_keys = [&](int64_t b, int64_t i) {  // row i of sequence b attends to keys 0..n-1
        return std::max<int64_t>(0, a.context_lens[b] - (cu[b + 1] - cu[b]) + i + 1) + 1;
    };
    int64_t total = 0;
    for (int64_t b = 0; b < a.num_seqs; ++b) {
        const int64_t q = cu[b + 1] - cu[b], first = row_keys(b, 0);
        total += q * first + q * (q - 1) / 2;  // (clamped rows, p < 0, only lower the true work)
    }
    const int64_t work = total * a.num_kv_heads * (a.num_heads / a.num_kv_heads + 1) * a.head_dim;
    const int64_t threads = std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::max(num_threads, 1));
    std::vector<int64_t> cuts{cu[0]};
    int64_t done = 0;
    for (int64_t b = 0; b < a.num_seqs && static_cast<int64_t>(cuts.size()) < threads; ++b)
        for (int64_t i = 0; i < cu[b + 1] - cu[b]; ++i) {
            done += row_keys(b, i);
            if (done * threads >= total * static_cast<int64_t>(cuts.size()) && cu[b] + i + 1 < cu[a.num_seqs])
                cuts.push_back(cu[b] + i + 1);
        }
    cuts.push_back(cu[a.num_seqs]);
    return cuts;
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a, DType dtype, int num_threads, int lanes) {
    if (a.cu_seqlens_q[a.num_seqs] <= a.cu_seqlens_q[0] || a.num_heads == 0) return;
    const int64_t w = lanes ? lanes : dot_lanes();
    const AttendFn attend = dtype == DType::f32   ? attend_for<float>(a.head_dim, w)
                          : dtype == DType::f16 ? attend_for<F16>(a.head_dim, w)
                                                : attend_for<BF16>(a.head_dim, w);
    const std::vector<int64_t> cuts = cut_rows(a, num_threads);
    const int64_t parts = static_cast<int64_t>(cuts.size()) - 1;
    const auto part = [&](int64_t i) { attend(a, cuts[i] * a.num_kv_heads, cuts[i + 1] * a.num_kv_heads); };
#ifdef _OPENMP
    // torch's OpenMP runtime (the extension links the same libgomp): its idle workers take the parts.
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int64_t i = 0; i < parts; ++i) part(i);
#else
    std::vector<std::thread> pool;
    for (int64_t i = 1; i < parts; ++i) pool.emplace_back(part, i);
    part(0);
    for (auto& t : pool) t.join();
#endif
}

}  // namespace mcl
