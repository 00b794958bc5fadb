/* Small-batch linear layers for decoding on the CPU:  y (M, N) = x (M, K) W(N, K)^T + b (N).

   Decoding multiplies a few activation rows (one per sequence in the batch) by every weight
   matrix. With one row the work is reading the weights: the speed is the memory bandwidth.
   With more rows each weight is used once per row, and the speed is how many multiply-adds
   the loop issues per weight and activation it loads. These loops compute a tile of
   MR x NR outputs at once, each output a vector of partial sums over K:

     acc[i][j] (LANES floats) += x[m+i, k:k+LANES] * W[n+j, k:k+LANES]    i < MR, j < NR
     y[m+i, n+j] = sum of acc[i][j]'s lanes + b[n+j]

   so every step loads NR weight vectors and MR activation vectors for MR * NR multiply-adds
   (4 x 3: 7 loads for 12, where one row at a time takes 2 for 1). The 12 accumulators, 3
   weight vectors and an activation vector fill the 16 vector registers of AVX2. The N
   output columns are split over the OpenMP threads (the runtime torch uses); a thread's NR
   weight rows stay in L1 while it runs every tile of rows over them. Activations and
   accumulation stay float32; only the stored weights are narrower:

     float32   w
     bfloat16  w = the top 16 bits of a float32 (a shift converts it back exactly)
     int8      w = q * scale[n]   with q in [-127, 127] and one scale per output row

   bfloat16 weights are read as 32-bit lanes, each holding a pair W[n, 2p] (low half) and
   W[n, 2p+1] (high half): `lane << 16` is the float W[n, 2p] and `lane & 0xFFFF0000` is
   W[n, 2p+1], two instructions for 2 * LANES weights. The activations are reordered to
   match once per call: within each block of 2 * LANES, the even positions, then the odd.

   Compiled on first use with the machine's C compiler (-O3 -march=native -fopenmp) by
   tformer/kernels/build.py; tformer.kernels.load() falls back to torch when it cannot. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define MR 4 /* activation rows per tile (column_block has a case for each of 1..MR) */
#define NR 3 /* weight rows per tile */

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t vbits __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef int8_t vint8 __attribute__((vector_size(LANES)));
typedef int32_t vint32 __attribute__((vector_size(LANES * sizeof(int32_t))));

enum weights { F32, BF16, I8 };

/* The loops below are specialised by inlining them where their arguments are constants. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

static inline vfloat load_floats(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* LANES weights as floats, from w[at]. For bfloat16 the LANES 32-bit lanes from w[at] hold
   2 * LANES weights: half 0 is the even positions, half 1 the odd ones. */
static inline vfloat load_weights(const void *w, int64_t at, int half, enum weights kind) {
    if (kind == F32) return load_floats((const float *)w + at);
    if (kind == I8) { /* widened to int32 (vpmovsxbd), then converted (vcvtdq2ps) */
#if defined(__AVX512F__)
        __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)w + at));
        return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
#elif defined(__AVX2__)
        __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + at));
        return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
#else /* GCC's generic conversion, element by element on x86 */
        vint8 q;
        memcpy(&q, (const int8_t *)w + at, sizeof q);
        return __builtin_convertvector(__builtin_convertvector(q, vint32), vfloat);
#endif
    }
    vbits bits;
    memcpy(&bits, (const uint16_t *)w + at, sizeof bits);
    bits = half == 0 ? bits << 16 : bits & 0xFFFF0000u;
    vfloat v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline float weight_at(const void *w, int64_t at, enum weights kind) {
    if (kind == F32) return ((const float *)w)[at];
    if (kind == I8) return (float)((const int8_t *)w)[at];
    return bf16_bits_to_float(((const uint16_t *)w)[at]);
}

static inline float lane_sum(vfloat v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

/* One tile, mr <= MR rows of x by nr <= NR rows of w: y[i * n_len + j] for i < mr, j < nr.
   Called with constant mr, nr and kind, so the loops unroll, the branches on kind go, and
   acc stays in registers. For bfloat16 x is reordered by split_pairs (below). `ahead`, if
   not NULL, is the next block's weights, fetched into the cache while these compute (the
   hardware's own prefetching leaves a stall at each new block; docs/LOG.md). */
ALWAYS_INLINE void tile(const float *x, const void *w, const float *scale, const float *bias,
                        float *y, int64_t n_len, int64_t k_len, int mr, int nr,
                        enum weights kind, const char *ahead) {
    const size_t width = kind == F32 ? 4 : kind == BF16 ? 2 : 1; /* bytes per weight */
    const int halves = kind == BF16 ? 2 : 1;
    vfloat acc[MR][NR] = {{{0}}};
    int64_t k = 0;
    for (; k + halves * LANES <= k_len; k += halves * LANES)
        for (int half = 0; half < halves; half++) {
            vfloat wv[NR];
            if (ahead && half == 0)
                for (int j = 0; j < nr; j++)
                    __builtin_prefetch(ahead + (size_t)(j * k_len + k) * width, 0, 2);
#pragma GCC unroll 4
            for (int j = 0; j < nr; j++) wv[j] = load_weights(w, j * k_len + k, half, kind);
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) {
                vfloat xv = load_floats(x + i * k_len + k + half * LANES);
#pragma GCC unroll 4
                for (int j = 0; j < nr; j++) acc[i][j] += xv * wv[j];
            }
        }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float s = lane_sum(acc[i][j]);
            for (int64_t t = k; t < k_len; t++)
                s += x[i * k_len + t] * weight_at(w, j * k_len + t, kind);
            if (scale) s *= scale[j];
            y[i * n_len + j] = s + (bias ? bias[j] : 0.0f);
        }
}

/* x (M, K) -> the same values with each whole block of 2 * LANES as its even positions,
   then its odd ones; the positions past the last whole block stay in place. */
static void split_pairs(const float *x, float *out, int64_t m_len, int64_t k_len) {
    int64_t whole = k_len - k_len % (2 * LANES);
    for (int64_t m = 0; m < m_len; m++) {
        const float *row = x + m * k_len;
        float *dst = out + m * k_len;
        for (int64_t k = 0; k < whole; k += 2 * LANES)
            for (int p = 0; p < LANES; p++) {
                dst[k + p] = row[k + 2 * p];
                dst[k + LANES + p] = row[k + 2 * p + 1];
            }
        memcpy(dst + whole, row + whole, (size_t)(k_len - whole) * sizeof(float));
    }
}

/* One block of NR output columns (the last block may be narrower), every tile of rows
   over it: each (mr, nr) case is a call with constants, which the compiler specialises; the
   ragged edge of N % NR columns goes one column at a time. Each entry point below runs the
   blocks over its OpenMP threads with its own constant kind, which is why this is inlined
   into each: a parallel loop's body becomes a function of its own before inlining, so one
   shared loop would not see a constant kind. */
ALWAYS_INLINE void column_block(const float *x, const void *w, const float *scale,
                                const float *bias, float *y, int64_t m_len, int64_t n_len,
                                int64_t k_len, int64_t n, enum weights kind) {
    const size_t width = kind == F32 ? 4 : kind == BF16 ? 2 : 1; /* bytes per weight */
    const char *wn = (const char *)w + (size_t)(n * k_len) * width;
    const float *sn = scale ? scale + n : NULL, *bn = bias ? bias + n : NULL;
    for (int64_t m = 0; m < m_len; m += MR) {
        const float *xm = x + m * k_len;
        float *ym = y + m * n_len + n;
        int64_t mr = m_len - m < MR ? m_len - m : MR;
        const char *ahead = m == 0 && n + 2 * NR <= n_len ? wn + NR * k_len * width : NULL;
        if (n + NR > n_len) {
            for (int64_t j = 0; j < n_len - n; j++)
                for (int64_t i = 0; i < mr; i++)
                    tile(xm + i * k_len, wn + (size_t)(j * k_len) * width, sn ? sn + j : NULL,
                         bn ? bn + j : NULL, ym + i * n_len + j, n_len, k_len, 1, 1, kind, NULL);
        } else if (mr == MR) {
            tile(xm, wn, sn, bn, ym, n_len, k_len, MR, NR, kind, ahead);
        } else if (mr == 3) {
            tile(xm, wn, sn, bn, ym, n_len, k_len, 3, NR, kind, ahead);
        } else if (mr == 2) {
            tile(xm, wn, sn, bn, ym, n_len, k_len, 2, NR, kind, ahead);
        } else {
            tile(xm, wn, sn, bn, ym, n_len, k_len, 1, NR, kind, ahead);
        }
    }
}

void tformer_linear_f32(const float *x, const float *w, const float *bias, float *y,
                        int64_t m_len, int64_t n_len, int64_t k_len) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_len; n += NR)
        column_block(x, w, NULL, bias, y, m_len, n_len, k_len, n, F32);
}

void tformer_linear_i8(const float *x, const int8_t *w, const float *scale, const float *bias,
                       float *y, int64_t m_len, int64_t n_len, int64_t k_len) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_len; n += NR)
        column_block(x, w, scale, bias, y, m_len, n_len, k_len, n, I8);
}

/* Returns 0, or -1 where the reordered copy of x could not be allocated (y untouched). */
int tformer_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                        int64_t m_len, int64_t n_len, int64_t k_len) {
    if (m_len == 0 || n_len == 0) return 0;
    float *split = malloc((size_t)(m_len * k_len) * sizeof(float));
    if (split == NULL) return -1;
    split_pairs(x, split, m_len, k_len);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_len; n += NR)
        column_block(split, w, NULL, bias, y, m_len, n_len, k_len, n, BF16);
    free(split);
    return 0;
}

/* What the build can report: 1 when the loops use AVX-512 (16 floats a vector). */
int tformer_has_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
