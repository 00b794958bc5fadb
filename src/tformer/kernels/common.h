/* What the CPU kernels share: bfloat16 <-> float32, and an exp that vectorises.

   Each kernel file includes this header; the functions are static inline, so every file
   gets its own copy and the compiler can vectorise the loops that call them (without
   -ffast-math, which would change results elsewhere). */

#ifndef TFORMER_COMMON_H
#define TFORMER_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_bits_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float32 -> bfloat16, rounding to nearest even (as torch does; no NaN inputs here). */
static inline uint16_t float_to_bf16_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* exp(x) for x <= 0, relative error below 2e-7: x = k ln 2 + r with |r| <= ln(2) / 2,
   exp(r) by its Taylor series to r^7, times 2^k built in the exponent bits. Below -87 the
   result is 0 (float32 would be denormal there). */
static inline float exp_neg(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f,
                ln2_lo = 1.42860682030941723212e-6f;
    float clamped = x < -87.0f ? -87.0f : x;
    float k = rintf(clamped * log2e);
    float r = (clamped - k * ln2_hi) - k * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t e = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &e, sizeof two_k);
    return x < -87.0f ? 0.0f : p * two_k;
}

#endif
