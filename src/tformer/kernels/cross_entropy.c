/* Label-smoothed cross-entropy over bfloat16 logits, forward and backward, on the CPU.

   For each row x (V logits) with target y and smoothing eps (see tformer/train/losses.py):

     lse    = m + log sum_v exp(x_v - m)           m = max_v x_v
     loss   = lse - (1 - eps) x_y - (eps / V) sum_v x_v
     grad_v = s (exp(x_v - lse) - eps / V - (1 - eps) [v = y])      s: the row's weight

   The forward pass reads each row twice (its maximum, then the sums) and the backward pass
   reads it once and writes the bfloat16 gradient once; all arithmetic is float32. Rows are
   split over the OpenMP threads. exp is computed by hand (exp_neg in common.h) so that the
   loops vectorise without -ffast-math. */

#include <math.h>
#include <stdint.h>

#include "common.h"

/* loss_rows[i] = the smoothed cross-entropy of row i (not yet weighted). */
void tformer_smoothed_ce_forward_bf16(const uint16_t *logits, const int64_t *targets,
                                      float *loss_rows, float *lse_rows, int64_t n, int64_t v,
                                      float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = logits + i * v;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < v; j++) {
            float x = bf16_bits_to_float(row[j]);
            m = x > m ? x : m;
        }
        float sum_exp = 0.0f, sum_x = 0.0f;
#pragma omp simd reduction(+ : sum_exp, sum_x)
        for (int64_t j = 0; j < v; j++) {
            float x = bf16_bits_to_float(row[j]);
            sum_exp += exp_neg(x - m);
            sum_x += x;
        }
        float lse = m + logf(sum_exp);
        float x_y = bf16_bits_to_float(row[targets[i]]);
        lse_rows[i] = lse;
        /* eps = 0: no smoothing term at all, so -inf logits (positions that cannot be the
           answer) give a finite loss instead of 0 x -inf */
        float smooth = eps > 0.0f ? (eps / (float)v) * sum_x : 0.0f;
        loss_rows[i] = lse - (1.0f - eps) * x_y - smooth;
    }
}

/* grad (N, V) bfloat16 = row_scale[i] (softmax(x_i) - q_i), q_i the smoothed target. */
void tformer_smoothed_ce_backward_bf16(const uint16_t *logits, const int64_t *targets,
                                       const float *lse_rows, const float *row_scale,
                                       uint16_t *grad, int64_t n, int64_t v, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = logits + i * v;
        uint16_t *out = grad + i * v;
        float lse = lse_rows[i], s = row_scale[i], uniform = eps / (float)v;
#pragma omp simd
        for (int64_t j = 0; j < v; j++) {
            float p = exp_neg(bf16_bits_to_float(row[j]) - lse);
            out[j] = float_to_bf16_bits(s * (p - uniform));
        }
        int64_t y = targets[i];
        float p_y = exp_neg(bf16_bits_to_float(row[y]) - lse);
        out[y] = float_to_bf16_bits(s * (p_y - uniform - (1.0f - eps)));
    }
}
