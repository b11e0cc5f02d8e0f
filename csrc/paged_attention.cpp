#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

// The inner loops are compiled for AVX-512 and AVX2+FMA next to the baseline; the loader picks one
// for the machine (GCC >= 11 function multi-versioning on x86-64; elsewhere only the baseline).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MCL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MCL_CLONES
#endif
#define MCL_INLINE inline __attribute__((always_inline))

namespace mcl {
namespace {

// 16-bit floats as their bits (no compiler extension needed): bfloat16 and IEEE half.
struct BF16 {
    uint16_t bits;
};
struct F16 {
    uint16_t bits;
};

MCL_INLINE float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
MCL_INLINE uint32_t to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

MCL_INLINE float to_float(float x) { return x; }
MCL_INLINE float to_float(BF16 x) { return from_bits(static_cast<uint32_t>(x.bits) << 16); }
MCL_INLINE float to_float(F16 x) {
    const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16, exp = (x.bits >> 10) & 0x1fu,
                   mant = x.bits & 0x3ffu;
    if (exp == 0) return from_bits(sign | to_bits(static_cast<float>(mant) * 0x1p-24f));  // zero, subnormal
    if (exp == 31) return from_bits(sign | 0x7f800000u | (mant << 13));                     // inf, NaN
    return from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

MCL_INLINE void store(float* p, float x) { *p = x; }
MCL_INLINE void store(BF16* p, float x) {  // round to nearest even, as torch does
    const uint32_t u = to_bits(x);
    p->bits = std::isnan(x) ? uint16_t{0x7fc0} : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
MCL_INLINE void store(F16* p, float x) {  // round to nearest even; overflow to inf
    uint32_t u = to_bits(x);
    const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u >= 0x7f800000u) {
        p->bits = sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u);
    } else if (u >= 0x477ff000u) {  // >= 65520 rounds to inf
        p->bits = sign | 0x7c00u;
    } else if (u < 0x38800000u) {   // below the smallest normal half: a multiple of 2^-24
        p->bits = sign | static_cast<uint16_t>(std::nearbyint(from_bits(u) * 0x1p24f));
    } else {
        p->bits = sign | static_cast<uint16_t>((u + 0xfffu + ((u >> 13) & 1u) - (112u << 23)) >> 13);
    }
}

// exp(x) for x <= 0 (a score minus the row's maximum) in plain arithmetic, so that its loop is
// vectorised: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial; about 1 ulp).
MCL_INLINE float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = (x * 1.44269504089f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
    const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    return y * from_bits(bits);
}

constexpr int64_t kLanes = 16;  // keys scored at once: one AVX-512 register of float32

// s[j] = q . kt[:, j] for the m keys of one block, kt [D, stride] (the keys transposed): the
// products are summed along D in registers, kLanes keys at a time, with no horizontal reduction.
MCL_INLINE void scores_tile(float* s, const float* q, const float* kt, int64_t D, int64_t stride, int64_t m) {
    for (int64_t j0 = 0; j0 < m; j0 += kLanes) {
        float acc[kLanes] = {};
        for (int64_t d = 0; d < D; ++d) {
            const float qd = q[d];
            const float* row = kt + d * stride + j0;
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) acc[l] += qd * row[l];
        }
        for (int64_t l = 0, e = std::min(kLanes, m - j0); l < e; ++l) s[j0 + l] = acc[l];
    }
}

// acc[0:D] += sum_j p[j] * v_j for the m value rows v_j = v + j * stride of one block, kLanes
// columns at a time with the partial sums in registers.
template <typename T>
MCL_INLINE void weighted_sum(float* acc, const float* p, const T* v, int64_t stride, int64_t D, int64_t m) {
    int64_t d0 = 0;
    for (; d0 + kLanes <= D; d0 += kLanes) {
        float part[kLanes] = {};
        for (int64_t j = 0; j < m; ++j) {
            const float pj = p[j];
            const T* row = v + j * stride + d0;
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) part[l] += pj * to_float(row[l]);
        }
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[d0 + l] += part[l];
    }
    for (int64_t j = 0; j < m && d0 < D; ++j)  // the last D % kLanes columns
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

// Work items begin..end of (query row, KV head) pairs, item = row * Hkv + kv_head.
template <typename T>
MCL_INLINE void attend_range(const PagedAttentionArgs& a, int64_t begin, int64_t end) {
    const int64_t Hkv = a.num_kv_heads, D = a.head_dim, G = a.num_heads / Hkv, bs = a.block_size;
    const int64_t row_stride = Hkv * D;  // between consecutive tokens of one cache block
    const T* q = static_cast<const T*>(a.q);
    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    T* out = static_cast<T*>(a.out);
    const int32_t* cu = a.cu_seqlens_q;
    const int64_t bs_pad = (bs + kLanes - 1) / kLanes * kLanes;
    std::vector<float> qf(G * D), acc(G * D), inv_sum(G), kt(D * bs_pad), scores;
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
        for (int64_t t0 = 0; t0 < n; t0 += bs) {
            const int64_t m = std::min(bs, n - t0);
            if (t0 + bs < n) prefetch_rows(block(k_cache, t0 + bs), std::min(bs, n - t0 - bs), row_stride, D);
            prefetch_rows(block(v_cache, t0), m, row_stride, D);
            const T* k = block(k_cache, t0);
            for (int64_t j = 0; j < m; ++j, k += row_stride)  // the block's keys, transposed: kt[d, j]
                for (int64_t d = 0; d < D; ++d) kt[d * bs_pad + j] = to_float(k[d]);
            for (int64_t g = 0; g < G; ++g) scores_tile(&scores[g * n + t0], &qf[g * D], kt.data(), D, bs_pad, m);
        }
        for (int64_t g = 0; g < G; ++g) {
            float* s = &scores[g * n];
            const float mx = *std::max_element(s, s + n);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < n; ++t) sum += (s[t] = exp_nonpositive(s[t] - mx));
            inv_sum[g] = 1.f / sum;
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t0 = 0; t0 < n; t0 += bs) {
            const T* v = block(v_cache, t0);
            const int64_t m = std::min(bs, n - t0);
            for (int64_t g = 0; g < G; ++g) weighted_sum(&acc[g * D], &scores[g * n + t0], v, row_stride, D, m);
        }
        for (int64_t g = 0; g < G; ++g)
            for (int64_t d = 0; d < D; ++d) store(o + g * a.out_stride_h + d, acc[g * D + d] * inv_sum[g]);
    }
}

MCL_CLONES void attend_f32(const PagedAttentionArgs& a, int64_t lo, int64_t hi) { attend_range<float>(a, lo, hi); }
MCL_CLONES void attend_f16(const PagedAttentionArgs& a, int64_t lo, int64_t hi) { attend_range<F16>(a, lo, hi); }
MCL_CLONES void attend_bf16(const PagedAttentionArgs& a, int64_t lo, int64_t hi) { attend_range<BF16>(a, lo, hi); }

// Below this many (row, KV head) items per thread, starting a thread costs more than it saves.
constexpr int64_t kMinItemsPerThread = 64;

}  // namespace

void paged_attention(const PagedAttentionArgs& a, DType dtype, int num_threads) {
    const int64_t begin = a.cu_seqlens_q[0] * a.num_kv_heads;
    const int64_t end = a.cu_seqlens_q[a.num_seqs] * a.num_kv_heads;
    if (end <= begin || a.num_heads == 0) return;
    auto* attend = dtype == DType::f32 ? attend_f32 : dtype == DType::f16 ? attend_f16 : attend_bf16;
    const int64_t threads = std::clamp<int64_t>((end - begin) / kMinItemsPerThread, 1, std::max(num_threads, 1));
    std::vector<std::thread> pool;
    const int64_t per = (end - begin + threads - 1) / threads;
    for (int64_t i = 1; i < threads; ++i)
        pool.emplace_back(attend, std::cref(a), begin + i * per, std::min(end, begin + (i + 1) * per));
    attend(a, begin, std::min(end, begin + per));
    for (auto& t : pool) t.join();
}

}  // namespace mcl
