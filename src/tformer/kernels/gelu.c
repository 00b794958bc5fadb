/* GELU with GPT-2's tanh approximation, forward and backward, on the CPU.

     y     = 0.5 z (1 + tanh(u)),        u = sqrt(2 / pi) (z + 0.044715 z^3)
           = z s,                        s = sigmoid(2u) = 1 / (1 + exp(-2u))
     dy/dz = s + 2 z s (1 - s) sqrt(2 / pi) (1 + 3 0.044715 z^2)

   using 0.5 (1 + tanh(u)) = sigmoid(2u) and 1 - tanh(u)^2 = 4 s (1 - s). torch's CPU
   kernels spend most of their time in tanh (docs/LOG.md: 3-5 ms for 3.1M values on Zen 4,
   against 0.4 ms for a multiply); here each value costs one exp (exp_neg, which
   vectorises) and one division. Arithmetic is float32 throughout; bfloat16 results are
   rounded to nearest even, as torch rounds its own. Elements are split over the OpenMP
   threads when there are enough of them. */

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "common.h"

#define SQRT_2_OVER_PI 0.7978845608028654f
#define KAPPA 0.044715f
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

/* Each function below runs its loop over [begin, end); the exported ones split [0, n)
   into one range per OpenMP thread, or run it whole when n is small. (A loop under
   `omp parallel for simd if (...)` is not vectorised when the condition is false.) */

static void forward_f32(const float *z, float *y, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++)
        y[i] = z[i] * gelu_gate(z[i]);
}

static void backward_f32(const float *grad, const float *z, float *out, int64_t begin,
                         int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++)
        out[i] = grad[i] * gelu_derivative(z[i]);
}

static void forward_bf16(const uint16_t *z, uint16_t *y, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float x = bf16_bits_to_float(z[i]);
        y[i] = float_to_bf16_bits(x * gelu_gate(x));
    }
}

static void backward_bf16(const uint16_t *grad, const uint16_t *z, uint16_t *out,
                          int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float x = bf16_bits_to_float(z[i]);
        out[i] = float_to_bf16_bits(bf16_bits_to_float(grad[i]) * gelu_derivative(x));
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

void tformer_gelu_tanh_backward_f32(const float *grad, const float *z, float *out, int64_t n) {
    OVER_THREADS(n, backward_f32(grad, z, out, begin, end));
}

void tformer_gelu_tanh_bf16(const uint16_t *z, uint16_t *y, int64_t n) {
    OVER_THREADS(n, forward_bf16(z, y, begin, end));
}

void tformer_gelu_tanh_backward_bf16(const uint16_t *grad, const uint16_t *z, uint16_t *out,
                                     int64_t n) {
    OVER_THREADS(n, backward_bf16(grad, z, out, begin, end));
}
