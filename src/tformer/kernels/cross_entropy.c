/* Label-smoothed cross-entropy over float32 or bfloat16 logits, forward and backward, on
   the CPU.

   For each row x (V logits) with target y and smoothing eps (see tformer/train/losses.py):

     lse    = m + log sum_v exp(x_v - m)           m = max_v x_v
     loss   = lse - (1 - eps) x_y - (eps / V) sum_v x_v
     grad_v = s (exp(x_v - lse) - eps / V - (1 - eps) [v = y])      s: the row's weight

   The forward pass reads each row twice (its maximum, then the sums) and the backward pass
   reads it once and writes the gradient, in the logits' dtype, once; the arithmetic is
   float32, but for the row's sums (below). Rows are split over the OpenMP threads. exp is computed by hand (exp_neg in
   common.h) so that the loops vectorise without -ffast-math.

   Where the gradient is wanted, forward_backward does both in one visit of each row: it
   keeps e_v = exp(x_v - m) (V floats, in the thread's cache) from the sums and writes
   grad_v = s (e_v / sum_v e_v - eps / V - (1 - eps) [v = y]), the same softmax with one
   exp per logit where the two passes take two (the softmax's share of a GPT-2 step,
   docs/LOG.md).

   The two dtypes differ only in how a logit is read and a gradient written: a row's work
   is written once, with `bf16` saying which, and each exported function calls it with a
   constant inside its own parallel loop, so the compiler builds one vectorised loop per
   dtype with no test inside. Each row's sums run in float32 over blocks of SUM_BLOCK
   logits, added up in double: one float32 sum over a vocabulary of tens of thousands
   drifts visibly from the exact one (docs/LOG.md). */

#define SUM_BLOCK 1024

#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

/* Logit j of a row, in float32 or bfloat16 storage. */
static inline float load(const void *row, int64_t j, int bf16) {
    return bf16 ? bf16_bits_to_float(((const uint16_t *)row)[j]) : ((const float *)row)[j];
}

/* Row i's smoothed cross-entropy (not yet weighted) into *loss and its log-sum-exp into
   *lse; each exp(x_j - m) also into e[j] unless e is NULL. Returns sum_j exp(x_j - m). */
static inline __attribute__((always_inline)) double forward_row(const void *row, int64_t y,
                                                                int64_t v, float eps,
                                                                float *loss, float *lse,
                                                                float *e, int bf16) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < v; j++) {
        float x = load(row, j, bf16);
        m = x > m ? x : m;
    }
    double sum_exp = 0.0, sum_x = 0.0;
    for (int64_t j0 = 0; j0 < v; j0 += SUM_BLOCK) {
        const int64_t j1 = j0 + SUM_BLOCK < v ? j0 + SUM_BLOCK : v;
        float block_exp = 0.0f, block_x = 0.0f;
#pragma omp simd reduction(+ : block_exp, block_x)
        for (int64_t j = j0; j < j1; j++) {
            float x = load(row, j, bf16);
            float exp_x = exp_neg(x - m);
            if (e != NULL) e[j] = exp_x;
            block_exp += exp_x;
            block_x += x;
        }
        sum_exp += block_exp;
        sum_x += block_x;
    }
    *lse = m + (float)log(sum_exp);
    /* eps = 0: no smoothing term at all, so -inf logits (positions that cannot be the
       answer) give a finite loss instead of 0 x -inf */
    float smooth = eps > 0.0f ? (eps / (float)v) * (float)sum_x : 0.0f;
    *loss = *lse - (1.0f - eps) * load(row, y, bf16) - smooth;
    return sum_exp;
}

/* Row i's gradient s (softmax(x) - q), q the smoothed target, in the logits' dtype. */
static inline __attribute__((always_inline)) void backward_row(const void *row, int64_t y,
                                                               int64_t v, float eps,
                                                               float lse, float s, void *out,
                                                               int bf16) {
    const float uniform = eps / (float)v;
    if (bf16) {
        const uint16_t *x = row;
        uint16_t *g = out;
#pragma omp simd
        for (int64_t j = 0; j < v; j++)
            g[j] = float_to_bf16_bits(s * (exp_neg(bf16_bits_to_float(x[j]) - lse) - uniform));
        g[y] = float_to_bf16_bits(s * (exp_neg(bf16_bits_to_float(x[y]) - lse) - uniform -
                                       (1.0f - eps)));
    } else {
        const float *x = row;
        float *g = out;
#pragma omp simd
        for (int64_t j = 0; j < v; j++)
            g[j] = s * (exp_neg(x[j] - lse) - uniform);
        g[y] = s * (exp_neg(x[y] - lse) - uniform - (1.0f - eps));
    }
}

/* forward_row and backward_row in one visit of row i, for weight s: each exp(x_v - m) is
   computed once and kept in e (v floats). */
static inline __attribute__((always_inline)) void forward_backward_row(
    const void *row, int64_t y, int64_t v, float eps, float s, float *loss, float *lse,
    float *e, void *out, int bf16) {
    const double sum_exp = forward_row(row, y, v, eps, loss, lse, e, bf16);
    const float inverse = (float)(1.0 / sum_exp), uniform = eps / (float)v;
    if (bf16) {
        uint16_t *g = out;
#pragma omp simd
        for (int64_t j = 0; j < v; j++)
            g[j] = float_to_bf16_bits(s * (e[j] * inverse - uniform));
        g[y] = float_to_bf16_bits(s * (e[y] * inverse - uniform - (1.0f - eps)));
    } else {
        float *g = out;
#pragma omp simd
        for (int64_t j = 0; j < v; j++)
            g[j] = s * (e[j] * inverse - uniform);
        g[y] = s * (e[y] * inverse - uniform - (1.0f - eps));
    }
}

/* loss_rows[i] = the smoothed cross-entropy of row i (not yet weighted), lse_rows[i] its
   log-sum-exp. */
void tformer_smoothed_ce_forward_f32(const float *logits, const int64_t *targets,
                                     float *loss_rows, float *lse_rows, int64_t n, int64_t v,
                                     float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        forward_row(logits + i * v, targets[i], v, eps, loss_rows + i, lse_rows + i, NULL, 0);
}

void tformer_smoothed_ce_forward_bf16(const uint16_t *logits, const int64_t *targets,
                                      float *loss_rows, float *lse_rows, int64_t n, int64_t v,
                                      float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        forward_row(logits + i * v, targets[i], v, eps, loss_rows + i, lse_rows + i, NULL, 1);
}

/* grad (N, V) = row_scale[i] (softmax(x_i) - q_i), in the logits' dtype. */
void tformer_smoothed_ce_backward_f32(const float *logits, const int64_t *targets,
                                      const float *lse_rows, const float *row_scale,
                                      float *grad, int64_t n, int64_t v, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        backward_row(logits + i * v, targets[i], v, eps, lse_rows[i], row_scale[i],
                     grad + i * v, 0);
}

void tformer_smoothed_ce_backward_bf16(const uint16_t *logits, const int64_t *targets,
                                       const float *lse_rows, const float *row_scale,
                                       uint16_t *grad, int64_t n, int64_t v, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        backward_row(logits + i * v, targets[i], v, eps, lse_rows[i], row_scale[i],
                     grad + i * v, 1);
}

/* The forward pass's loss_rows and lse_rows and the backward pass's grad (for row_scale)
   in one visit of each row, on at most `threads` threads, thread k keeping its row's
   exponentials in scratch + k stride (stride >= v, a whole number of cache lines, so that
   no two threads write one line). */
void tformer_smoothed_ce_forward_backward_f32(const float *logits, const int64_t *targets,
                                              const float *row_scale, float *loss_rows,
                                              float *lse_rows, float *grad, float *scratch,
                                              int64_t stride, int64_t threads, int64_t n,
                                              int64_t v, float eps) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++)
        forward_backward_row(logits + i * v, targets[i], v, eps, row_scale[i], loss_rows + i,
                             lse_rows + i, scratch + omp_get_thread_num() * stride,
                             grad + i * v, 0);
}

void tformer_smoothed_ce_forward_backward_bf16(const uint16_t *logits, const int64_t *targets,
                                               const float *row_scale, float *loss_rows,
                                               float *lse_rows, uint16_t *grad, float *scratch,
                                               int64_t stride, int64_t threads, int64_t n,
                                               int64_t v, float eps) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++)
        forward_backward_row(logits + i * v, targets[i], v, eps, row_scale[i], loss_rows + i,
                             lse_rows + i, scratch + omp_get_thread_num() * stride,
                             grad + i * v, 1);
}
