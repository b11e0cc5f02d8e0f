// Shared by the CPU kernels: 16-bit floats as their bits and their conversions to and from
// float32 (torch's rounding: nearest even), and the function multi-versioning of inner loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// The inner loops are compiled for AVX-512 and AVX2+FMA next to the baseline; the loader picks one
// for the machine (GCC >= 11 function multi-versioning on x86-64; elsewhere only the baseline).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MCL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MCL_CLONES
#endif
#define MCL_INLINE inline __attribute__((always_inline))

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

}  // namespace mcl
