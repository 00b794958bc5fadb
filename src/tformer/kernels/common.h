/* What the CPU kernels share: bfloat16 <-> float32, an exp that vectorises, a vector of
   eight floats and a thread's share of a parallel loop; where the build has AVX2, a 16 x 16
   block of 16-bit elements transposed in registers (transpose.c's, and attention.c's K^T
   and V^T); where it has AVX-512, the same exp on sixteen lanes, the mask of a vector's
   first lanes, a row's sum and a masked load of sixteen bf16 values.

   Each kernel file includes this header; the functions are static inline, so every file
   gets its own copy and the compiler can vectorise the loops that call them (without
   -ffast-math, which would change results elsewhere). */

#ifndef TFORMER_COMMON_H
#define TFORMER_COMMON_H

#include <math.h>
#include <omp.h>
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

/* float_to_bf16_bits with a NaN kept a NaN (its quiet bit set): for values that a
   diverging run may make NaN, whose NaN must reach the loss, which the trainer checks. */
static inline uint16_t float_to_bf16_keeping_nan(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return float_to_bf16_bits(f);
}

/* n rounded up to a multiple of `to`. */
static inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* Inside an OpenMP parallel region: this thread's contiguous share [*begin, *end) of n
   items (rows, elements), the shares in thread order. */
static inline void my_share(int64_t n, int64_t *begin, int64_t *end) {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t chunk = (n + threads - 1) / threads;
    *begin = me * chunk < n ? me * chunk : n;
    *end = *begin + chunk < n ? *begin + chunk : n;
}

/* float16 -> float32 by its bits: sign, exponent rebiased, mantissa (or subnormal); for
   CPUs without F16C's conversion. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    float f;
    if (e == 0) f = (float)m * 0x1p-24f;
    else if (e == 31) f = m ? __builtin_nanf("") : __builtin_inff();
    else {
        const uint32_t bits = ((e + 112) << 23) | (m << 13);
        memcpy(&f, &bits, sizeof f);
    }
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits |= sign;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Eight floats as one vector, for loops the compiler would not vectorise as they stand
   (AVX2 and AVX-512 alike); load8 reads them from any address. */
typedef float v8f __attribute__((vector_size(8 * sizeof(float))));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The eight lanes' sum, pairwise in a fixed order. */
static inline float sum8(v8f v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

typedef int32_t v8i __attribute__((vector_size(8 * sizeof(int32_t))));

/* Lane by lane, the larger of a and b (b where they are unordered). */
static inline v8f vmax8(v8f a, v8f b) {
    const v8i a_larger = a > b;
    return (v8f)(((v8i)a & a_larger) | ((v8i)b & ~a_larger));
}

static inline float max8(v8f v) {
    float m = v[0];
    for (int l = 1; l < 8; l++) m = v[l] > m ? v[l] : m;
    return m;
}

/* q . key over d_size floats, eight lanes at a time in two chains, then the rest. */
static inline float dot8(const float *q, const float *key, int64_t d_size) {
    v8f even = {0.0f}, odd = {0.0f};
    int64_t d = 0;
    for (; d + 16 <= d_size; d += 16) {
        even += load8(q + d) * load8(key + d);
        odd += load8(q + d + 8) * load8(key + d + 8);
    }
    if (d + 8 <= d_size) {
        even += load8(q + d) * load8(key + d);
        d += 8;
    }
    float total = sum8(even + odd);
    for (; d < d_size; d++) total += q[d] * key[d];
    return total;
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

#if defined(__AVX2__)
#include <immintrin.h>

/* dst[j][i] = src[i][j] for i, j < 16, with rows ld (src) and dst_ld (dst) elements apart.
   After round r, each 2^r-element unit of a register holds one column of src over 2^r
   consecutive rows; each 128-bit half of a register keeps to its half of the columns
   (0-7 or 8-15) until the last round joins the halves. */
static inline void block_16x16(const uint16_t *src, int64_t ld, uint16_t *dst, int64_t dst_ld) {
    __m256i a[16], b[16];
    for (int k = 0; k < 16; k++)
        a[k] = _mm256_loadu_si256((const __m256i *)(src + k * ld));
    /* rows 2p, 2p+1 -> b[2p]: columns 0-3 | 8-11, b[2p+1]: columns 4-7 | 12-15 */
    for (int p = 0; p < 8; p++) {
        b[2 * p] = _mm256_unpacklo_epi16(a[2 * p], a[2 * p + 1]);
        b[2 * p + 1] = _mm256_unpackhi_epi16(a[2 * p], a[2 * p + 1]);
    }
    /* rows 4q..4q+3 -> a[4q + m]: columns {2m, 2m+1} | {2m+8, 2m+9}, m = 0..3 */
    for (int q = 0; q < 4; q++)
        for (int h = 0; h < 2; h++) { /* h: b's columns 0-3 (0) or 4-7 (1) */
            __m256i x = b[4 * q + h], y = b[4 * q + 2 + h];
            a[4 * q + 2 * h] = _mm256_unpacklo_epi32(x, y);
            a[4 * q + 2 * h + 1] = _mm256_unpackhi_epi32(x, y);
        }
    /* rows 8o..8o+7 -> b[8o + c]: column c | column c + 8, c = 0..7 */
    for (int o = 0; o < 2; o++)
        for (int m = 0; m < 4; m++) {
            __m256i x = a[8 * o + m], y = a[8 * o + 4 + m];
            b[8 * o + 2 * m] = _mm256_unpacklo_epi64(x, y);
            b[8 * o + 2 * m + 1] = _mm256_unpackhi_epi64(x, y);
        }
    /* column c: rows 0-7 from b[c], rows 8-15 from b[8 + c]; the same for column c + 8 */
    for (int c = 0; c < 8; c++) {
        _mm256_storeu_si256((__m256i *)(dst + c * dst_ld),
                            _mm256_permute2x128_si256(b[c], b[8 + c], 0x20));
        _mm256_storeu_si256((__m256i *)(dst + (c + 8) * dst_ld),
                            _mm256_permute2x128_si256(b[c], b[8 + c], 0x31));
    }
}

/* dst[j][i] = float(src[i][j]) for i, j < 16: the block turned in bf16 (block_16x16, into
   the stack), then each row of it widened to float32. */
static inline void block_16x16_to_f32(const uint16_t *src, int64_t ld, float *dst,
                                      int64_t dst_ld) {
    uint16_t turned[16 * 16];
    block_16x16(src, ld, turned, 16);
    for (int c = 0; c < 16; c++) {
        const __m256i row = _mm256_loadu_si256((const __m256i *)(turned + c * 16));
        const __m128i first = _mm256_castsi256_si128(row);
        const __m128i second = _mm256_extracti128_si256(row, 1);
        const __m256i low = _mm256_slli_epi32(_mm256_cvtepu16_epi32(first), 16);
        const __m256i high = _mm256_slli_epi32(_mm256_cvtepu16_epi32(second), 16);
        _mm256_storeu_si256((__m256i *)(dst + c * dst_ld), low);
        _mm256_storeu_si256((__m256i *)(dst + c * dst_ld + 8), high);
    }
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp_neg lane by lane (the same series and error), 0 below -87 and for -inf. */
static inline __m512 exp_neg16(__m512 x) {
    const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(kept, p, k);
}

/* Lanes 0 .. n - 1 of 16 (none for n <= 0, all for n >= 16). */
static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

/* sum_{j < n} x_j, reading no x_j past n: two accumulators (the adds' latency), the lanes
   added across once at the end. */
static inline float masked_sum(const float *x, int64_t n) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 32) {
        a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(first_lanes(n - j), x + j));
        b = _mm512_add_ps(b, _mm512_maskz_loadu_ps(first_lanes(n - j - 16), x + j + 16));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* The lanes `m` of sixteen bf16 values at p, widened to float32; the other lanes 0 (and
   not read). */
static inline __m512 load_bf16x16(const uint16_t *p, __mmask16 m) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif
#endif

#endif
