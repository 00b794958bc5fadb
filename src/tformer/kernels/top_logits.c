/* A beam search step's reduction of the logits, row by row, in one pass over them:

     lse = log sum_v exp(x_v)          (x_v - lse is log p(v), the log-softmax)
     the n largest x_v, best first, with their ids

   so that the search adds a beam's score to n log-probabilities instead of to all V of
   them, and picks a sentence's best candidates among K n instead of K V (the n best of
   the sentence are among the n best of their own beams). Ties keep the lower id first.
   The sum of exponentials runs in eight lanes (x_v into lane v mod 8) with exp_neg, then
   the lanes in order: an order that does not depend on the batch. Rows are split over
   the OpenMP threads. Without lse (NULL) only the n largest: greedy search's argmax. */

#include <math.h>
#include <stdint.h>

#include "common.h"

/* Put x_v among the n best so far (values, ids: best first, `held` of them), after every
   value at least as large; the last one drops out when all n are held. */
static void insert(float x, int64_t v, float *values, int64_t *ids, int64_t *held, int64_t n) {
    if (*held == n && x <= values[n - 1]) return;
    if (*held < n) (*held)++;
    int64_t i = *held - 1;
    while (i > 0 && values[i - 1] < x) {
        values[i] = values[i - 1];
        ids[i] = ids[i - 1];
        i--;
    }
    values[i] = x;
    ids[i] = v;
}

static void top_of_row(const float *x, int64_t v_len, int64_t n, float *lse, float *values,
                       int64_t *ids) {
    int64_t held = 0, v = 0;
    for (; v < v_len && held < n; v++) insert(x[v], v, values, ids, &held, n);
    for (; v + 32 <= v_len; v += 32) { /* most blocks have none above the n-th best */
        const v8f a = load8(x + v), b = load8(x + v + 8), c = load8(x + v + 16),
                  d = load8(x + v + 24);
        if (max8(vmax8(vmax8(a, b), vmax8(c, d))) > values[n - 1])
            for (int l = 0; l < 32; l++) insert(x[v + l], v + l, values, ids, &held, n);
    }
    for (; v < v_len; v++) insert(x[v], v, values, ids, &held, n);
    if (!lse) return;
    const float highest = values[0];
    if (highest == -INFINITY) { /* every logit -inf: no token can follow */
        *lse = -INFINITY;
        return;
    }
    float lanes[8] = {0.0f};
    for (v = 0; v + 8 <= v_len; v += 8)
        for (int l = 0; l < 8; l++) lanes[l] += exp_neg(x[v + l] - highest);
    for (; v < v_len; v++) lanes[v % 8] += exp_neg(x[v] - highest);
    float total = 0.0f;
    for (int l = 0; l < 8; l++) total += lanes[l];
    *lse = highest + logf(total);
}

/* logits (M, V) float32 -> lse (M,) (unless NULL), values (M, n) float32 and ids (M, n)
   int64, n <= V. */
void tformer_top_logits(const float *logits, int64_t m, int64_t v_len, int64_t n, float *lse,
                        float *values, int64_t *ids) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < m; r++)
        top_of_row(logits + r * v_len, v_len, n, lse ? lse + r : NULL, values + r * n,
                   ids + r * n);
}
