/* One decoding step of causal self-attention over a slot cache, on the CPU.

   Row b of the batch is the sequence in slot b of the cache (nn/slot_cache.py), at its own
   position p_b. With the row's new query, key and value q, k, v for head h (D wide, read
   from the fused projection (B, 3C)) and s = 1 / sqrt(D):

     K[b, h, p_b] = k,   V[b, h, p_b] = v
     a_t = s q . K[b, h, t]                      t = 0..p_b
     w_t = exp(a_t - max a) / sum_t' exp(a_t' - max a)
     out[b, h] = sum_t w_t V[b, h, t]

   Each (row, head) is one task for the OpenMP threads. It reads its own positions 0..p_b
   once each and nothing beyond them, where a batched attention reads every row up to the
   longest one and masks the rest: at a decoding step the work is reading the cache, so
   what is not read is time saved. The output goes straight into the (B, C) layout the
   output projection reads, heads side by side.

   The cache is (slots, H, L, D) float32, contiguous. Returns 0, or 1 if a thread's buffer
   of scores (L floats) could not be allocated. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

static void attend_one(const float *qkv, float *k_cache, float *v_cache, float *out,
                       float *scores, int64_t b, int64_t h, int64_t position, int64_t h_size,
                       int64_t d_size, int64_t max_len) {
    const int64_t c = h_size * d_size;
    const float *q = qkv + b * 3 * c + h * d_size, *k = q + c, *v = q + 2 * c;
    float *keys = k_cache + (b * h_size + h) * max_len * d_size;
    float *values = v_cache + (b * h_size + h) * max_len * d_size;
    for (int64_t d = 0; d < d_size; d++) {
        keys[position * d_size + d] = k[d];
        values[position * d_size + d] = v[d];
    }
    const float scale = 1.0f / sqrtf((float)d_size);
    float highest = -INFINITY;
    for (int64_t t = 0; t <= position; t++) {
        const float *key = keys + t * d_size;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < d_size; d++) dot += q[d] * key[d];
        scores[t] = dot * scale;
        highest = scores[t] > highest ? scores[t] : highest;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t <= position; t++) {
        scores[t] = exp_neg(scores[t] - highest);
        total += scores[t];
    }
    float *o = out + b * c + h * d_size;
    for (int64_t d = 0; d < d_size; d++) o[d] = 0.0f;
    for (int64_t t = 0; t <= position; t++) {
        const float *value = values + t * d_size;
        const float w = scores[t] / total;
#pragma omp simd
        for (int64_t d = 0; d < d_size; d++) o[d] += w * value[d];
    }
}

int tformer_slot_attention_f32(const float *qkv, float *k_cache, float *v_cache,
                               const int64_t *positions, float *out, int64_t b_size,
                               int64_t h_size, int64_t d_size, int64_t max_len) {
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc((size_t)max_len * sizeof(float));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < b_size * h_size; task++)
            if (scores != NULL)
                attend_one(qkv, k_cache, v_cache, out, scores, task / h_size, task % h_size,
                           positions[task / h_size], h_size, d_size, max_len);
        free(scores);
    }
    return failed;
}
