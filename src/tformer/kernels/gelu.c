/* GELU on the CPU, forward and backward: GPT-2's tanh approximation, and the exact GELU.

   The tanh approximation:

     y     = 0.5 z (1 + tanh(u)),        u = sqrt(2 / pi) (z + 0.044715 z^3)
           = z s,                        s = sigmoid(2u) = 1 / (1 + exp(-2u))
     dy/dz = s + 2 z s (1 - s) sqrt(2 / pi) (1 + 3 0.044715 z^2)

   using 0.5 (1 + tanh(u)) = sigmoid(2u) and 1 - tanh(u)^2 = 4 s (1 - s). torch's CPU
   kernels spend most of their time in tanh (docs/LOG.md); here each value costs one exp
   (exp_neg, which vectorises) and one division. In training the forward pass writes dy/dz
   too, in float32, and the backward pass only multiplies the gradient by it.

   The exact GELU, with Phi and phi the standard normal's distribution and density:

     y     = z Phi(z),                   dy/dz = Phi(z) + z phi(z),
     phi(z) = exp(-z^2 / 2) / sqrt(2 pi),
     Phi(z) = 1 - erfc(a) / 2 for z >= 0, erfc(a) / 2 below,   a = |z| / sqrt(2),
     erfc(a) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-a^2),   t = 1 / (1 + p a)

   (Abramowitz and Stegun, 7.1.26: absolute error below 1.5e-7; the formula torch's
   vectorised erf uses). Written for erfc, Phi does not cancel to 0 in the left tail as
   0.5 (1 + erf) does (there its relative error grows, to ~4% at z = -13, where y ~ 1e-37;
   with denormals flushed, y is 0 below z ~ -12.95). Phi and phi share the one exp,
   exp(-a^2) = exp(-z^2 / 2), so the forward pass can write the derivative, in z's dtype
   (the memory torch's gelu would keep z in), for almost nothing, and the backward pass only
   multiplies the gradient by it, where torch's gelu_backward computes erf and exp again.

   Arithmetic is float32 throughout; bfloat16 results are rounded to nearest even, as torch
   rounds its own. Elements are split over the OpenMP threads when there are enough of
   them. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define SQRT_2_OVER_PI 0.7978845608028654f
#define KAPPA 0.044715f
#define INV_SQRT_2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f
#define PARALLEL_FROM 32768 /* elements; fewer are not worth waking the threads for */

/* s = sigmoid(2u), from exp of a non-positive argument only (no overflow). */
static inline float gelu_gate(float z) {
    float v = 2.0f * SQRT_2_OVER_PI * (z + KAPPA * z * z * z);
    float e = exp_neg(-fabsf(v));
    float inverse = 1.0f / (1.0f + e);
    return v >= 0.0f ? inverse : e * inverse;
}

static inline float gelu_derivative(float z) {
    float s = gelu_gate(z);
    float w = s * (1.0f - s); /* 0 far from the origin, where z^2 may be inf */
    float slope = 2.0f * z * w * SQRT_2_OVER_PI * (1.0f + 3.0f * KAPPA * z * z);
    return s + (w > 0.0f ? slope : 0.0f);
}

/* Phi(z), from e = exp(-z^2 / 2). */
static inline float normal_cdf(float z, float e) {
    const float p = 0.3275911f, a1 = 0.254829592f, a2 = -0.284496736f, a3 = 1.421413741f,
                a4 = -1.453152027f, a5 = 1.061405429f;
    float t = 1.0f / (1.0f + p * (fabsf(z) * INV_SQRT_2));
    float half_erfc = 0.5f * t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * e;
    return z >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

/* Each function below runs its loop over [begin, end); the exported ones split [0, n)
   into one range per OpenMP thread, or run it whole when n is small. (A loop under
   `omp parallel for simd if (...)` is not vectorised when the condition is false.) */

static void forward_f32(const float *z, float *y, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++)
        y[i] = z[i] * gelu_gate(z[i]);
}

static void forward_bf16(const uint16_t *z, uint16_t *y, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float x = bf16_bits_to_float(z[i]);
        y[i] = float_to_bf16_bits(x * gelu_gate(x));
    }
}

/* The tanh GELU y and its derivative dy/dz in float32, d: the backward pass then only
   multiplies (scale_bf16), where recomputing the derivative from a z long out of the
   cache took twice as long (docs/LOG.md). */
static void forward_derivative_f32(const float *z, float *y, float *d, int64_t begin,
                                   int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        y[i] = z[i] * gelu_gate(z[i]);
        d[i] = gelu_derivative(z[i]);
    }
}

static void forward_derivative_bf16(const uint16_t *z, uint16_t *y, float *d, int64_t begin,
                                    int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float x = bf16_bits_to_float(z[i]);
        y[i] = float_to_bf16_bits(x * gelu_gate(x));
        d[i] = gelu_derivative(x);
    }
}

/* out = grad * d, rounded to bf16 once: the gradient through the GELU, from its saved d. */
static void scale_bf16(const uint16_t *grad, const float *d, uint16_t *out, int64_t begin,
                       int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++)
        out[i] = float_to_bf16_bits(bf16_bits_to_float(grad[i]) * d[i]);
}

/* scale_bf16 over rows [begin, end) of a (rows, cols) gradient, adding each row of out (the
   bf16 values written, widened) into sums (cols): the bias gradient of the layer before the
   GELU comes out of the same pass. d is float32, or bf16 where d_bf16 (the exact GELU's
   saved derivative): each product is then rounded once, as torch's bf16 multiply. */
static void scale_bf16_rows(const uint16_t *grad, const void *d, int d_bf16, uint16_t *out,
                            float *sums, int64_t cols, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
        const uint16_t *g = grad + r * cols;
        uint16_t *o = out + r * cols;
        if (d_bf16) {
            const uint16_t *dr = (const uint16_t *)d + r * cols;
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) {
                o[j] = float_to_bf16_bits(bf16_bits_to_float(g[j]) * bf16_bits_to_float(dr[j]));
                sums[j] += bf16_bits_to_float(o[j]);
            }
        } else {
            const float *dr = (const float *)d + r * cols;
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) {
                o[j] = float_to_bf16_bits(bf16_bits_to_float(g[j]) * dr[j]);
                sums[j] += bf16_bits_to_float(o[j]);
            }
        }
    }
}

/* The exact GELU: y, and with d (not NULL) dy/dz, in z's dtype. */
static void exact_f32(const float *z, float *y, float *d, int64_t begin, int64_t end) {
    if (d == NULL) {
#pragma omp simd
        for (int64_t i = begin; i < end; i++)
            y[i] = z[i] * normal_cdf(z[i], exp_neg(-0.5f * z[i] * z[i]));
        return;
    }
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float x = z[i], e = exp_neg(-0.5f * x * x), cdf = normal_cdf(x, e);
        y[i] = x * cdf;
        d[i] = cdf + x * e * INV_SQRT_2PI;
    }
}

static void exact_bf16(const uint16_t *z, uint16_t *y, uint16_t *d, int64_t begin,
                       int64_t end) {
    if (d == NULL) {
#pragma omp simd
        for (int64_t i = begin; i < end; i++) {
            float x = bf16_bits_to_float(z[i]);
            y[i] = float_to_bf16_bits(x * normal_cdf(x, exp_neg(-0.5f * x * x)));
        }
        return;
    }
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float x = bf16_bits_to_float(z[i]), e = exp_neg(-0.5f * x * x), cdf = normal_cdf(x, e);
        y[i] = float_to_bf16_bits(x * cdf);
        d[i] = float_to_bf16_bits(cdf + x * e * INV_SQRT_2PI);
    }
}

/* Run CALL (which uses begin and end) over [0, n): split over the threads when n is large. */
#define OVER_THREADS(n, CALL)                                                                  \
    do {                                                                                       \
        if ((n) < PARALLEL_FROM) {                                                             \
            int64_t begin = 0, end = (n);                                                      \
            CALL;                                                                              \
        } else {                                                                               \
            _Pragma("omp parallel") {                                                          \
                int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();            \
                int64_t chunk = ((n) + threads - 1) / threads;                                 \
                chunk = (chunk + 15) / 16 * 16; /* whole vectors per thread */                 \
                int64_t begin = me * chunk < (n) ? me * chunk : (n);                           \
                int64_t end = begin + chunk < (n) ? begin + chunk : (n);                       \
                CALL;                                                                          \
            }                                                                                  \
        }                                                                                      \
    } while (0)

void tformer_gelu_tanh_f32(const float *z, float *y, int64_t n) {
    OVER_THREADS(n, forward_f32(z, y, begin, end));
}

void tformer_gelu_tanh_bf16(const uint16_t *z, uint16_t *y, int64_t n) {
    OVER_THREADS(n, forward_bf16(z, y, begin, end));
}

void tformer_gelu_f32(const float *z, float *y, float *d, int64_t n) {
    OVER_THREADS(n, exact_f32(z, y, d, begin, end));
}

void tformer_gelu_bf16(const uint16_t *z, uint16_t *y, uint16_t *d, int64_t n) {
    OVER_THREADS(n, exact_bf16(z, y, d, begin, end));
}

void tformer_gelu_tanh_derivative_f32(const float *z, float *y, float *d, int64_t n) {
    OVER_THREADS(n, forward_derivative_f32(z, y, d, begin, end));
}

void tformer_gelu_tanh_derivative_bf16(const uint16_t *z, uint16_t *y, float *d, int64_t n) {
    OVER_THREADS(n, forward_derivative_bf16(z, y, d, begin, end));
}

void tformer_scale_bf16(const uint16_t *grad, const float *d, uint16_t *out, int64_t n) {
    OVER_THREADS(n, scale_bf16(grad, d, out, begin, end));
}

/* grad (rows, cols) bf16 and d float32 (bf16 where d_bf16) -> out = grad * d in bf16 and
   sums (cols) float32, each column of out summed over the rows. Returns 1 if the threads'
   sums could not be allocated. */
int tformer_scale_bf16_column_sums(const uint16_t *grad, const void *d, int64_t d_bf16,
                                   uint16_t *out, float *sums, int64_t rows, int64_t cols) {
    const int threads = rows * cols < PARALLEL_FROM ? 1 : omp_get_max_threads();
    float *partial = calloc((size_t)threads * cols, sizeof *partial);
    if (partial == NULL) return 1;
    if (threads == 1) {
        scale_bf16_rows(grad, d, (int)d_bf16, out, partial, cols, 0, rows);
    } else {
#pragma omp parallel num_threads(threads)
        {
            const int64_t me = omp_get_thread_num(), team = omp_get_num_threads();
            const int64_t chunk = (rows + team - 1) / team;
            const int64_t begin = me * chunk < rows ? me * chunk : rows;
            const int64_t end = begin + chunk < rows ? begin + chunk : rows;
            scale_bf16_rows(grad, d, (int)d_bf16, out, partial + me * cols, cols, begin, end);
        }
    }
    for (int64_t j = 0; j < cols; j++) {
        float sum = 0.0f;
        for (int t = 0; t < threads; t++) sum += partial[t * cols + j];
        sums[j] = sum;
    }
    free(partial);
    return 0;
}
