/* LayerNorm in mixed precision on the CPU: a float32 residual stream in, bfloat16 out, for a
   norm whose output only feeds matrix products (which under bf16 autocast read it in bf16
   anyway), and its backward pass from a bfloat16 gradient.

   Forward, for each row x of width C:

     mean = (1/C) sum_j x_j,   var = (1/C) sum_j (x_j - mean)^2,   r = 1 / sqrt(var + eps)
     xhat = (x - mean) r,      y = bf16(xhat gamma + beta)

   mean and r are kept for the backward pass. Backward, from dy (bf16), with g = dy gamma:

     dx     = r (g - mean_j(g) - xhat mean_j(g xhat))     (float32, the stream's dtype)
     dgamma = sum over rows of dy xhat,   dbeta = sum over rows of dy

   What torch's float32 layer_norm followed by autocast's cast to bf16 gives (and, backwards,
   the cast of dy to float32 and layer_norm's backward), but for float32 sums taken in
   another order (y within one bf16 rounding step of it): one pass instead of the norm's and
   the cast's, each way. Arithmetic is float32; bf16 is rounded to nearest even, as torch
   rounds it, and a NaN stays a NaN.

   Each row's sums are taken in AVX-512 registers where the CPU has them, sixteen lanes
   added across once at the row's end: a compiler's own vector reduction adds the lanes one
   after another, a chain of sixteen dependent adds per sum, which at a width of 128 (eight
   vectors) cost more than the sums themselves (docs/LOG.md). The plain loops are the same
   equations.

   Rows are split over the OpenMP threads in contiguous ranges when there are enough
   elements; in the backward pass each thread sums dgamma and dbeta over its rows in its own
   buffer, and the buffers are added in thread order, so the result does not depend on which
   thread finishes first. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VECTOR_SUMS 1

/* sum_j (x_j - m)^2, as common.h's masked_sum. */
static inline float vector_squares(const float *x, float m, int64_t c) {
    const __m512 mean = _mm512_set1_ps(m);
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int64_t j = 0; j < c; j += 32) {
        const __mmask16 ma = first_lanes(c - j), mb = first_lanes(c - j - 16);
        const __m512 da = _mm512_maskz_sub_ps(ma, _mm512_maskz_loadu_ps(ma, x + j), mean);
        const __m512 db = _mm512_maskz_sub_ps(mb, _mm512_maskz_loadu_ps(mb, x + j + 16), mean);
        a = _mm512_fmadd_ps(da, da, a);
        b = _mm512_fmadd_ps(db, db, b);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}
#endif

#define PARALLEL_FROM 32768 /* elements; fewer are not worth waking the threads for */

/* With `add` (not NULL): the norm of h = x + add instead of x, h written first (the
   residual add before the next sublayer's norm; add bf16, h float32). */
static void forward_rows(const float *x, const uint16_t *add, float *h, const float *gamma,
                         const float *beta, float eps, uint16_t *y, float *mean, float *rstd,
                         int64_t c, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
        const float *xi = x + i * c;
        if (add != NULL) {
            const uint16_t *ai = add + i * c;
            float *hi = h + i * c;
#pragma omp simd
            for (int64_t j = 0; j < c; j++) hi[j] = xi[j] + bf16_bits_to_float(ai[j]);
            xi = hi;
        }
#ifdef VECTOR_SUMS
        const float m = masked_sum(xi, c) / (float)c;
        const float squares = vector_squares(xi, m, c);
#else
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < c; j++) sum += xi[j];
        const float m = sum / (float)c;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t j = 0; j < c; j++) squares += (xi[j] - m) * (xi[j] - m);
#endif
        const float r = 1.0f / sqrtf(squares / (float)c + eps);
        uint16_t *yi = y + i * c;
#pragma omp simd
        for (int64_t j = 0; j < c; j++)
            yi[j] = float_to_bf16_keeping_nan((xi[j] - m) * r * gamma[j] + beta[j]);
        mean[i] = m;
        rstd[i] = r;
    }
}

/* dx for rows [begin, end); dgamma and dbeta of those rows added to sums (2C floats). With
   `residual` (not NULL), dx is the norm's gradient plus residual (the gradient reaching x
   by the residual path), and dx_bf16 (where not NULL) gets it rounded to bf16 as well. */
static void backward_rows(const uint16_t *dy, const float *x, const float *mean,
                          const float *rstd, const float *gamma, const float *residual,
                          float *dx, uint16_t *dx_bf16, float *sums, int64_t c, int64_t begin,
                          int64_t end) {
    float *dgamma = sums, *dbeta = sums + c;
    for (int64_t i = begin; i < end; i++) {
        const uint16_t *dyi = dy + i * c;
        const float *xi = x + i * c;
        const float m = mean[i], r = rstd[i];
        float g_sum = 0.0f, gx_sum = 0.0f;
#ifdef VECTOR_SUMS
        {
            const __m512 mean_v = _mm512_set1_ps(m), r_v = _mm512_set1_ps(r);
            __m512 gs = _mm512_setzero_ps(), gxs = _mm512_setzero_ps();
            for (int64_t j = 0; j < c; j += 16) { /* lanes beyond c: d, g, xhat all 0 */
                const __mmask16 in = first_lanes(c - j);
                const __m512 d = load_bf16x16(dyi + j, in);
                const __m512 x = _mm512_maskz_loadu_ps(in, xi + j);
                const __m512 xhat = _mm512_mul_ps(_mm512_maskz_sub_ps(in, x, mean_v), r_v);
                const __m512 g = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(in, gamma + j));
                gs = _mm512_add_ps(gs, g);
                gxs = _mm512_fmadd_ps(g, xhat, gxs);
                const __m512 dg = _mm512_maskz_loadu_ps(in, dgamma + j);
                const __m512 db = _mm512_maskz_loadu_ps(in, dbeta + j);
                _mm512_mask_storeu_ps(dgamma + j, in, _mm512_fmadd_ps(d, xhat, dg));
                _mm512_mask_storeu_ps(dbeta + j, in, _mm512_add_ps(db, d));
            }
            g_sum = _mm512_reduce_add_ps(gs);
            gx_sum = _mm512_reduce_add_ps(gxs);
        }
#else
#pragma omp simd reduction(+ : g_sum, gx_sum)
        for (int64_t j = 0; j < c; j++) {
            const float d = bf16_bits_to_float(dyi[j]), xhat = (xi[j] - m) * r;
            const float g = d * gamma[j];
            g_sum += g;
            gx_sum += g * xhat;
            dgamma[j] += d * xhat;
            dbeta[j] += d;
        }
#endif
        const float g_mean = g_sum / (float)c, gx_mean = gx_sum / (float)c;
        float *dxi = dx + i * c;
#pragma omp simd
        for (int64_t j = 0; j < c; j++) {
            const float xhat = (xi[j] - m) * r;
            dxi[j] = r * (bf16_bits_to_float(dyi[j]) * gamma[j] - g_mean - xhat * gx_mean);
        }
        if (residual != NULL && dx_bf16 != NULL) {
            const float *ri = residual + i * c;
            uint16_t *bi = dx_bf16 + i * c;
#pragma omp simd
            for (int64_t j = 0; j < c; j++) {
                dxi[j] += ri[j];
                bi[j] = float_to_bf16_keeping_nan(dxi[j]);
            }
        } else if (residual != NULL) {
            const float *ri = residual + i * c;
#pragma omp simd
            for (int64_t j = 0; j < c; j++)
                dxi[j] += ri[j];
        }
    }
}

/* x (N, C) float32, gamma and beta (C) float32 -> y (N, C) bf16, mean and rstd (N). */
static void forward(const float *x, const uint16_t *add, float *h, const float *gamma,
                    const float *beta, float eps, uint16_t *y, float *mean, float *rstd,
                    int64_t n, int64_t c) {
    if (n * c < PARALLEL_FROM) {
        forward_rows(x, add, h, gamma, beta, eps, y, mean, rstd, c, 0, n);
        return;
    }
#pragma omp parallel
    {
        int64_t begin, end;
        my_share(n, &begin, &end);
        forward_rows(x, add, h, gamma, beta, eps, y, mean, rstd, c, begin, end);
    }
}

void tformer_layer_norm_bf16_out(const float *x, const float *gamma, const float *beta,
                                 float eps, uint16_t *y, float *mean, float *rstd, int64_t n,
                                 int64_t c) {
    forward(x, NULL, NULL, gamma, beta, eps, y, mean, rstd, n, c);
}

/* h = x + add (N, C) float32, add bf16, then y = LayerNorm(h) in bf16 as above (the
   residual add of one sublayer and the next one's norm, in one pass). */
void tformer_add_layer_norm_bf16_out(const float *x, const uint16_t *add, const float *gamma,
                                     const float *beta, float eps, float *h, uint16_t *y,
                                     float *mean, float *rstd, int64_t n, int64_t c) {
    forward(x, add, h, gamma, beta, eps, y, mean, rstd, n, c);
}

/* From dy (N, C) bf16 and the forward pass's x, mean, rstd and gamma: dx (N, C) float32,
   dgamma and dbeta (C) float32. Returns 1 if the threads' sums could not be allocated. */
static int backward(const uint16_t *dy, const float *x, const float *mean, const float *rstd,
                    const float *gamma, const float *residual, float *dx, uint16_t *dx_bf16,
                    float *dgamma, float *dbeta, int64_t n, int64_t c) {
    if (c == 0) return 0;
    const int threads = n * c < PARALLEL_FROM ? 1 : omp_get_max_threads();
    float *sums = calloc((size_t)threads * 2 * c, sizeof *sums);
    if (sums == NULL) return 1;
    if (threads == 1) {
        backward_rows(dy, x, mean, rstd, gamma, residual, dx, dx_bf16, sums, c, 0, n);
    } else {
#pragma omp parallel num_threads(threads)
        {
            int64_t begin, end;
            my_share(n, &begin, &end);
            backward_rows(dy, x, mean, rstd, gamma, residual, dx, dx_bf16,
                          sums + omp_get_thread_num() * 2 * c, c, begin, end);
        }
    }
    for (int64_t j = 0; j < c; j++) {
        float g = 0.0f, b = 0.0f;
        for (int t = 0; t < threads; t++) {
            g += sums[t * 2 * c + j];
            b += sums[t * 2 * c + c + j];
        }
        dgamma[j] = g;
        dbeta[j] = b;
    }
    free(sums);
    return 0;
}

int tformer_layer_norm_backward_bf16(const uint16_t *dy, const float *x, const float *mean,
                                     const float *rstd, const float *gamma, float *dx,
                                     float *dgamma, float *dbeta, int64_t n, int64_t c) {
    return backward(dy, x, mean, rstd, gamma, NULL, dx, NULL, dgamma, dbeta, n, c);
}

/* The backward pass of tformer_add_layer_norm_bf16_out: from dy (the norm's output's
   gradient, bf16) and dh (h's own, float32, from the residual path), the gradient of x,
   dx = dh + the norm's (float32), the same in bf16 for `add` (dx_bf16; NULL: not written),
   dgamma and dbeta.
   h, mean and rstd are the forward pass's. Returns 1 if the threads' sums could not be
   allocated. */
int tformer_add_layer_norm_backward_bf16(const uint16_t *dy, const float *dh, const float *h,
                                         const float *mean, const float *rstd,
                                         const float *gamma, float *dx, uint16_t *dx_bf16,
                                         float *dgamma, float *dbeta, int64_t n, int64_t c) {
    return backward(dy, h, mean, rstd, gamma, dh, dx, dx_bf16, dgamma, dbeta, n, c);
}
