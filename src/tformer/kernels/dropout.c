/* Dropout masks on the CPU: mask[i] = 1 with probability threshold / 65536, else 0.

   Word w of a mask is splitmix64(seed + (w + 1) * golden), a counter-based generator: each
   word depends only on the seed and its index, so the threads fill their parts of the
   mask independently and the result does not depend on how many there are. Each 64-bit
   word gives four 16-bit lanes u, and mask = [u < threshold] (see tformer/nn/dropout.py).

   The mask applied, out = x m s (and the same to the gradient), in one pass, with torch's
   x.mul(m).mul_(s)'s values: x m is exact (x, a signed zero, or NaN), and the product with
   s (a float32) is rounded to float32, then for bf16 to bf16 (nearest even), as torch's. */

#include <math.h>
#include <stdint.h>

#include "common.h"

#define PARALLEL_FROM 32768 /* elements; fewer are not worth waking the threads for */

static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void tformer_dropout_mask(uint8_t *mask, int64_t n, uint64_t seed, uint32_t threshold) {
    const uint64_t golden = 0x9E3779B97F4A7C15ull;
    int64_t whole = n / 4;
#pragma omp parallel for simd schedule(static)
    for (int64_t w = 0; w < whole; w++) {
        uint64_t z = splitmix64(seed + (uint64_t)(w + 1) * golden);
        mask[4 * w + 0] = (uint32_t)(z & 0xFFFF) < threshold;
        mask[4 * w + 1] = (uint32_t)((z >> 16) & 0xFFFF) < threshold;
        mask[4 * w + 2] = (uint32_t)((z >> 32) & 0xFFFF) < threshold;
        mask[4 * w + 3] = (uint32_t)(z >> 48) < threshold;
    }
    uint64_t z = splitmix64(seed + (uint64_t)(whole + 1) * golden);
    for (int64_t i = 4 * whole; i < n; i++, z >>= 16)
        mask[i] = (uint32_t)(z & 0xFFFF) < threshold;
}

void tformer_masked_scale_f32(const float *x, const uint8_t *mask, float scale, float *out,
                              int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * (float)mask[i] * scale;
}

void tformer_masked_scale_bf16(const uint16_t *x, const uint8_t *mask, float scale,
                               uint16_t *out, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++) {
        float y = bf16_bits_to_float(x[i]) * (float)mask[i] * scale;
        out[i] = isnan(y) ? 0xFFFF : float_to_bf16_bits(y); /* torch's vectorised NaN */
    }
}
