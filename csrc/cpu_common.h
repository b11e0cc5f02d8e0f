// Shared by the CPU kernels: 16-bit floats as their bits and their conversions to and from
// float32 (torch's rounding: nearest even), the function multi-versioning of inner loops, and
// blocks of dot products (8 or 16 at a time, summed across vector lanes by one butterfly), vector
// loads and stores of any of the three float dtypes and a vector exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// The inner loops are compiled for AVX-512 and AVX2+FMA next to the baseline; the loader picks one
// for the machine (GCC >= 11 function multi-versioning on x86-64; elsewhere only the baseline).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MCL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MCL_CLONES
#endif
#define MCL_INLINE inline __attribute__((always_inline))

// Functions that use AVX512-BF16's pair dot products (vdpbf16ps) are compiled for those instructions
// and called only where the CPU has them (has_bf16_dot; GCC >= 11 on x86-64, elsewhere never).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MCL_BF16_DOT 1
#define MCL_BF16_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#include <immintrin.h>
#else
#define MCL_BF16_DOT 0
#endif

namespace mcl {

enum class DType { f32, f16, bf16 };

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

constexpr int64_t kLanes = 16;  // the widest dot-product tile: one AVX-512 register of float32

// GCC/Clang vectors of W floats (int32 lane indices, float and 16-bit float bits): lowered per
// clone's ISA. (GCC drops the attribute from an alias template, hence the struct.)
template <int64_t W>
struct Vectors {
    typedef float f __attribute__((vector_size(W * sizeof(float))));
    typedef int32_t i __attribute__((vector_size(W * sizeof(int32_t))));
    typedef uint32_t u __attribute__((vector_size(W * sizeof(uint32_t))));
    typedef uint16_t h __attribute__((vector_size(W * sizeof(uint16_t))));  // 16-bit floats' bits
};
template <int64_t W>
using fvec = typename Vectors<W>::f;
template <int64_t W>
using ivec = typename Vectors<W>::i;

template <int64_t W>
MCL_INLINE fvec<W> load_vec(const float* p) {  // W floats from p, any alignment
    fvec<W> v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// W floats from p (converted from 16 bits where T is).
template <int64_t W, typename T>
MCL_INLINE fvec<W> load_float(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
        return load_vec<W>(p);
    } else {
        fvec<W> v;
        for (int64_t l = 0; l < W; ++l) v[l] = to_float(p[l]);
        return v;
    }
}

// The W floats of v rounded to T and back (store's rounding; bfloat16 as whole vectors).
template <int64_t W, typename T>
MCL_INLINE fvec<W> round_to(fvec<W> v) {
    if constexpr (std::is_same_v<T, float>) {
        return v;
    } else if constexpr (std::is_same_v<T, BF16>) {
        typename Vectors<W>::u u;
        std::memcpy(&u, &v, sizeof u);
        u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        u = v != v ? typename Vectors<W>::u{} + 0x7fc00000u : u;  // NaN
        std::memcpy(&v, &u, sizeof v);
        return v;
    } else {
        for (int64_t l = 0; l < W; ++l) {
            T r;
            store(&r, v[l]);
            v[l] = to_float(r);
        }
        return v;
    }
}

// The first m <= W lanes of v into p, rounded to T (bfloat16 as whole vectors: v rounded with round_to).
template <int64_t W, typename T>
MCL_INLINE void store_float(T* p, fvec<W> v, int64_t m) {
    if constexpr (std::is_same_v<T, BF16>) {
        typename Vectors<W>::u u;
        const fvec<W> r = round_to<W, T>(v);
        std::memcpy(&u, &r, sizeof u);
        const typename Vectors<W>::h bits = __builtin_convertvector(u >> 16, typename Vectors<W>::h);
        std::memcpy(p, &bits, m * sizeof(T));
    } else if constexpr (std::is_same_v<T, float>) {
        std::memcpy(p, &v, m * sizeof(float));
    } else {
        for (int64_t l = 0; l < m; ++l) store(p + l, v[l]);
    }
}

// exp(x), W lanes at a time in plain vector arithmetic: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2,
// degree-5 polynomial; about 1 ulp). x is clamped to [-87, 88], where 2^n stays a normal float:
// below, the result is exp(-87) ~ 1.6e-38 instead of a smaller or zero one; above, exp(88) ~ 1.7e38
// instead of a larger or infinite one.
template <int64_t W>
MCL_INLINE fvec<W> vexp(fvec<W> x) {
    const fvec<W> zero = {};
    x = x < -87.f ? zero - 87.f : x;
    x = x > 88.f ? zero + 88.f : x;
    const fvec<W> n = (x * 1.44269504089f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
    const fvec<W> r = x - n * 0.693359375f - n * -2.12194440e-4f;
    fvec<W> p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const fvec<W> y = p * r * r + r + 1.f;
    const ivec<W> bits = (__builtin_convertvector(n, ivec<W>) + 127) << 23;  // 2^n
    fvec<W> two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
}

template <int64_t W>
MCL_INLINE fvec<W> shuffle(fvec<W> x, fvec<W> y, ivec<W> lanes) {  // lane l: lanes[l] of x's and then y's lanes
#if defined(__clang__)
    fvec<W> r;
    for (int l = 0; l < W; ++l) r[l] = lanes[l] < W ? x[lanes[l]] : y[lanes[l] - W];
    return r;
#else
    return __builtin_shuffle(x, y, lanes);
#endif
}

// Lanes (and rows) of the dot-product tiles below: 16 where the machine has AVX-512 (32 vector
// registers hold the 16 vectors of partial sums), else 8 (AVX2's 16 registers would spill 16
// vectors of 16 floats on every step). Picked once per call by the kernels' dispatchers.
inline int64_t dot_lanes() {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512f") ? 16 : 8;
#else
    return 8;
#endif
}

// Whether this build and CPU have the AVX512-BF16 arithmetic (MCL_BF16_DOT_TARGET functions).
inline bool has_bf16_dot() {
#if MCL_BF16_DOT
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

// Shuffle masks of lane_sums<W>: step s pairs the halves of every 2w-lane group (w = W >> (s + 1)).
template <int64_t W>
struct Butterfly;
template <>
struct Butterfly<16> {
    static constexpr ivec<16> lo[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                       {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                                       {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                                       {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
    static constexpr ivec<16> hi[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                                       {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                                       {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                                       {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
    static constexpr ivec<16> bitreverse = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
};
template <>
struct Butterfly<8> {
    static constexpr ivec<8> lo[3] = {{0, 1, 2, 3, 8, 9, 10, 11}, {0, 1, 8, 9, 4, 5, 12, 13}, {0, 8, 2, 10, 4, 12, 6, 14}};
    static constexpr ivec<8> hi[3] = {{4, 5, 6, 7, 12, 13, 14, 15}, {2, 3, 10, 11, 6, 7, 14, 15}, {1, 9, 3, 11, 5, 13, 7, 15}};
    static constexpr ivec<8> bitreverse = {0, 4, 2, 6, 1, 5, 3, 7};
};

// The W lane sums of v[0..W) into out[0..m): a butterfly of W - 1 shuffle-and-add steps on whole
// vectors. Each step adds the two halves of every 2w-lane group of a pair (x, y), x's sums in the
// group's first w lanes and y's in the last; after w = W/2, ..., 1 lane l holds the sum of
// v[bitreverse(l)].
template <int64_t W>
MCL_INLINE void lane_sums(fvec<W> (&v)[W], float* out, int64_t m) {
    using B = Butterfly<W>;
    constexpr int kSteps = W == 16 ? 4 : 3;
#pragma GCC unroll 4
    for (int step = 0; step < kSteps; ++step)
#pragma GCC unroll 8
        for (int i = 0; i < (W >> (step + 1)); ++i)
            v[i] = shuffle<W>(v[2 * i], v[2 * i + 1], B::lo[step]) + shuffle<W>(v[2 * i], v[2 * i + 1], B::hi[step]);
    const fvec<W> sums = shuffle<W>(v[0], v[0], B::bitreverse);
    std::memcpy(out, &sums, m * sizeof(float));
}

// s[j] = q . k_j for the m <= W rows k_j = k + j * stride (D a multiple of W): one vector of
// partial sums per row, summed across lanes all at once. kFull: m is W, known when compiling, so
// that the W sums stay in registers.
template <int64_t W, bool kFull = false>
MCL_INLINE void dot_tile(float* s, const float* q, const float* k, int64_t stride, int64_t D, int64_t m) {
    const int64_t rows = kFull ? W : m;
    fvec<W> acc[W] = {};
    for (int64_t d0 = 0; d0 < D; d0 += W) {
        const fvec<W> qv = load_vec<W>(q + d0);
#pragma GCC unroll 16
        for (int64_t j = 0; j < rows; ++j) acc[j] += qv * load_vec<W>(k + j * stride + d0);
    }
    lane_sums<W>(acc, s, rows);
}

// s[g * n + j] = q[g] . k_j for the G rows q [G, D] (float32) and the m rows k_j = k + j * stride (in
// attention: the query heads of one KV head and the keys of one cache block), W rows k_j at a time.
// 16-bit rows k_j are converted once into kf [W, D] per W of them, for all G rows of q.
template <int64_t W, typename T>
MCL_INLINE void dot_block(float* s, int64_t n, const float* q, const T* k, int64_t stride, int64_t D, int64_t G,
                          int64_t m, float* kf) {
    for (int64_t j0 = 0; j0 < m; j0 += W) {
        const int64_t mt = std::min(W, m - j0);
        const float* keys = nullptr;
        int64_t key_stride = D;
        if constexpr (std::is_same_v<T, float>) {
            keys = k + j0 * stride;
            key_stride = stride;
        } else {
            for (int64_t j = 0; j < mt; ++j)
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) kf[j * D + d] = to_float(k[(j0 + j) * stride + d]);
            keys = kf;
        }
        if (D % W == 0) {
            for (int64_t g = 0; g < G; ++g)
                if (mt == W)
                    dot_tile<W, true>(s + g * n + j0, q + g * D, keys, key_stride, D, mt);
                else
                    dot_tile<W>(s + g * n + j0, q + g * D, keys, key_stride, D, mt);
            continue;
        }
        for (int64_t j = 0; j < mt; ++j)  // other lengths: one dot product at a time
            for (int64_t g = 0; g < G; ++g) {
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; ++d) dot += q[g * D + d] * keys[j * key_stride + d];
                s[g * n + j0 + j] = dot;
            }
    }
}

}  // namespace mcl
