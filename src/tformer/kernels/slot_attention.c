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
   of scores (L floats) could not be allocated.

   tformer_path_attention_f32 is the same step for rows whose earlier positions lie in
   other slots (beam search's beams share their common past, nn/kv_cache.py): row b's
   position t is in slot paths[b, t] of the cache, paths (B, L) int64, its new key and
   value stored in slot paths[b, p_b]. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* Where row b's position t of one head begins in a cache: in slot path[t], or slot b
   without a path. */
static inline int64_t position_offset(const int64_t *path, int64_t b, int64_t t,
                                      int64_t slot_stride, int64_t head_offset,
                                      int64_t d_size) {
    return (path ? path[t] : b) * slot_stride + head_offset + t * d_size;
}

static void attend_one(const float *qkv, float *k_cache, float *v_cache, float *out,
                       float *scores, int64_t b, int64_t h, int64_t position,
                       const int64_t *path, int64_t h_size, int64_t d_size, int64_t max_len) {
    const int64_t c = h_size * d_size;
    const float *q = qkv + b * 3 * c + h * d_size, *k = q + c, *v = q + 2 * c;
    const int64_t slot_stride = h_size * max_len * d_size, head_offset = h * max_len * d_size;
    const int64_t now = position_offset(path, b, position, slot_stride, head_offset, d_size);
    float *key_now = k_cache + now, *value_now = v_cache + now;
    for (int64_t d = 0; d < d_size; d++) {
        key_now[d] = k[d];
        value_now[d] = v[d];
    }
    const float scale = 1.0f / sqrtf((float)d_size);
    float highest = -INFINITY;
    for (int64_t t = 0; t <= position; t++) {
        const int64_t at = position_offset(path, b, t, slot_stride, head_offset, d_size);
        const float *key = k_cache + at;
        /* the values at t asked for while the keys are scored, so that the weighted sum
           below finds them in the cache (a quarter less time at 160 positions: LOG) */
        for (int64_t d = 0; d < d_size; d += 16) __builtin_prefetch(v_cache + at + d, 0, 3);
        scores[t] = dot8(q, key, d_size) * scale;
        highest = scores[t] > highest ? scores[t] : highest;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t <= position; t++) {
        scores[t] = exp_neg(scores[t] - highest);
        total += scores[t];
    }
    const float inverse = 1.0f / total;
    float *o = out + b * c + h * d_size;
    int64_t d = 0;
    for (; d + 8 <= d_size; d += 8) { /* eight outputs in a register over the positions */
        v8f sum = {0.0f};
        for (int64_t t = 0; t <= position; t++)
            sum += scores[t] * load8(v_cache + d +
                                     position_offset(path, b, t, slot_stride, head_offset, d_size));
        sum *= inverse;
        memcpy(o + d, &sum, sizeof sum);
    }
    for (; d < d_size; d++) {
        float sum = 0.0f;
        for (int64_t t = 0; t <= position; t++)
            sum += scores[t] *
                   v_cache[d + position_offset(path, b, t, slot_stride, head_offset, d_size)];
        o[d] = sum * inverse;
    }
}

int tformer_path_attention_f32(const float *qkv, float *k_cache, float *v_cache,
                               const int64_t *positions, const int64_t *paths, float *out,
                               int64_t b_size, int64_t h_size, int64_t d_size, int64_t max_len) {
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
            if (scores != NULL) {
                const int64_t b = task / h_size;
                attend_one(qkv, k_cache, v_cache, out, scores, b, task % h_size, positions[b],
                           paths ? paths + b * max_len : NULL, h_size, d_size, max_len);
            }
        free(scores);
    }
    return failed;
}

int tformer_slot_attention_f32(const float *qkv, float *k_cache, float *v_cache,
                               const int64_t *positions, float *out, int64_t b_size,
                               int64_t h_size, int64_t d_size, int64_t max_len) {
    return tformer_path_attention_f32(qkv, k_cache, v_cache, positions, NULL, out, b_size,
                                      h_size, d_size, max_len);
}
