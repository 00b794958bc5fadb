/* One decoding step of a stack of pre-LN GPT-2 blocks, for rows whose key/value caches
   stand at the same position, in one call: what the model's modules compute for one new
   token per row, without a Python call per operation (docs/LOG.md: at batch 1 those calls
   took as long as reading the weights).

   For each block, on the residual stream x (M, C), in place:

     h = LN_1(x)                       LayerNorm: (x - mean) / sqrt(var + eps) * w + b
     qkv = h W_qkv^T + b_qkv           the packed weights' kernel (linear.c)
     a = attention(qkv, cache, p)      keys and values stored at position p, attention over
                                       0..p (slot_attention.c), heads side by side
     x = x + a W_o^T + b_o
     h = LN_2(x)
     x = x + GELU(h W_1^T + b_1) W_2^T + b_2

   Each linear layer runs the kernel of its own weights (float32, bfloat16, int8, int4, or
   w8a8's and w4a8's integer products, integer_linear.c; `struct tformer_linear`), over the
   OpenMP threads; the norms and sums are M x C, a few microseconds, split over the threads for
   large batches. The mean and variance are
   sums in eight lanes (two passes, the variance of the centred values), in float32 like
   torch's, in an order that does not depend on the batch. `work` holds the step's intermediate rows:
   (M, 3C) + 3 (M, C) + (M, F) floats. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

enum linear_kind {
    LINEAR_F32 = 0,
    LINEAR_BF16 = 1,
    LINEAR_I8 = 2,
    LINEAR_I4 = 3,
    LINEAR_W8A8 = 4,
    LINEAR_W4A8 = 5
};

/* One packed linear layer: its panels (kernels.pack_linear / pack_int4 / pack_w8a8 /
   pack_w4a8), int8's and w8a8's row scales, the bias (or NULL), and its shape (N, K). */
struct tformer_linear {
    const void *panels;
    const float *scale;
    const float *bias;
    int64_t n, k;
    int64_t kind;
};

/* One block's weights. */
struct tformer_block {
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias;
    struct tformer_linear qkv, out, up, down;
};

/* The other kernel files' entry points, in the same library. */
void tformer_linear_f32(const float *x, const float *panels, const float *bias, float *y,
                        int64_t m_len, int64_t n_len, int64_t k_len);
void tformer_linear_bf16(const float *x, const uint16_t *panels, const float *bias, float *y,
                         int64_t m_len, int64_t n_len, int64_t k_len);
void tformer_linear_i8(const float *x, const int8_t *panels, const float *scale,
                       const float *bias, float *y, int64_t m_len, int64_t n_len,
                       int64_t k_len);
int tformer_linear_i4(const float *x, const uint8_t *panels, const float *bias, float *y,
                      int64_t m_len, int64_t n_len, int64_t k_len);
int tformer_linear_w4a8(const float *x, const uint8_t *panels, const float *bias, float *y,
                        int64_t m_len, int64_t n_len, int64_t k_len);
int tformer_linear_w8a8(const float *x, const int8_t *panels, const float *s_w,
                        const float *bias, float *y, int64_t m_len, int64_t n_len,
                        int64_t k_len);
void tformer_gelu_tanh_f32(const float *z, float *y, int64_t n);
void tformer_gelu_f32(const float *z, float *y, float *d, int64_t n);
int tformer_slot_attention_f32(const float *qkv, float *k_cache, float *v_cache,
                               const int64_t *positions, float *out, int64_t b_size,
                               int64_t h_size, int64_t d_size, int64_t max_len);
int tformer_path_attention_f32(const float *qkv, float *k_cache, float *v_cache,
                               const int64_t *positions, const int64_t *paths, float *out,
                               int64_t b_size, int64_t h_size, int64_t d_size, int64_t max_len);

static int linear(const struct tformer_linear *layer, const float *x, float *y, int64_t m) {
    switch (layer->kind) {
    case LINEAR_F32:
        tformer_linear_f32(x, layer->panels, layer->bias, y, m, layer->n, layer->k);
        return 0;
    case LINEAR_BF16:
        tformer_linear_bf16(x, layer->panels, layer->bias, y, m, layer->n, layer->k);
        return 0;
    case LINEAR_I8:
        tformer_linear_i8(x, layer->panels, layer->scale, layer->bias, y, m, layer->n, layer->k);
        return 0;
    case LINEAR_I4:
        return tformer_linear_i4(x, layer->panels, layer->bias, y, m, layer->n, layer->k);
    case LINEAR_W8A8:
        return tformer_linear_w8a8(x, layer->panels, layer->scale, layer->bias, y, m, layer->n,
                                   layer->k);
    case LINEAR_W4A8:
        return tformer_linear_w4a8(x, layer->panels, layer->bias, y, m, layer->n, layer->k);
    default:
        return 2;
    }
}

/* The sum of x[0..n), in eight lanes (x[j] into lane j mod 8), then the lanes in order:
   the same order for every row whatever the batch, and it vectorises. */
static float lane_sum(const float *x, int64_t n) {
    float lanes[8] = {0.0f};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) lanes[l] += x[j + l];
    for (; j < n; j++) lanes[j % 8] += x[j];
    float sum = 0.0f;
    for (int l = 0; l < 8; l++) sum += lanes[l];
    return sum;
}

/* y = LN(x + r) row by row (r NULL: LN(x)), x, r, y (M, C); y may be x or r. The mean,
   then the variance of the centred values (two passes, as torch), each a lane_sum. The
   rows are split over the threads when there are enough of them to pay for it. */
static void add_layer_norm(const float *x, const float *r, const float *weight,
                           const float *bias, float *y, int64_t m, int64_t c, float eps) {
#pragma omp parallel for schedule(static) if (m * c >= 16384)
    for (int64_t i = 0; i < m; i++) {
        float row[c], centred[c];
        for (int64_t j = 0; j < c; j++) row[j] = r ? x[i * c + j] + r[i * c + j] : x[i * c + j];
        const float mean = lane_sum(row, c) / (float)c;
        for (int64_t j = 0; j < c; j++) centred[j] = (row[j] - mean) * (row[j] - mean);
        const float inverse = 1.0f / sqrtf(lane_sum(centred, c) / (float)c + eps);
        for (int64_t j = 0; j < c; j++)
            y[i * c + j] = (row[j] - mean) * inverse * weight[j] + bias[j];
    }
}

static void add(float *x, const float *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* gelu: 0 the tanh approximation, 1 exact. k_caches[i], v_caches[i]: block i's caches,
   (M, H, L, D) float32. Returns 0, or non-zero if a kernel failed (no memory). */
int tformer_decode_blocks(const struct tformer_block *blocks, int64_t n_blocks, float *x,
                          float *work, float *const *k_caches, float *const *v_caches,
                          const int64_t *positions, int64_t m, int64_t c, int64_t f,
                          int64_t heads, int64_t max_len, float eps, int64_t gelu) {
    float *qkv = work, *h = qkv + m * 3 * c, *a = h + m * c, *o = a + m * c, *hidden = o + m * c;
    for (int64_t i = 0; i < n_blocks; i++) {
        const struct tformer_block *block = blocks + i;
        int failed = 0;
        add_layer_norm(x, NULL, block->norm1_weight, block->norm1_bias, h, m, c, eps);
        failed |= linear(&block->qkv, h, qkv, m);
        failed |= tformer_slot_attention_f32(qkv, k_caches[i], v_caches[i], positions, a, m,
                                             heads, c / heads, max_len);
        failed |= linear(&block->out, a, o, m);
        add(x, o, m * c);
        add_layer_norm(x, NULL, block->norm2_weight, block->norm2_bias, h, m, c, eps);
        failed |= linear(&block->up, h, hidden, m);
        if (gelu == 0)
            tformer_gelu_tanh_f32(hidden, hidden, m * f);
        else
            tformer_gelu_f32(hidden, hidden, NULL, m * f);
        failed |= linear(&block->down, hidden, o, m);
        add(x, o, m * c);
        if (failed) return failed;
    }
    return 0;
}

/* The whole step before the output head, for GPT-2 with learned positions: the
   embeddings x[i] = E[ids[i]] + P[positions[i]] (the modules' one float32 sum), the blocks
   (tformer_decode_blocks), and the final LayerNorm, x in place. One call where the
   embeddings and the norm were three more torch calls a token, each slow with the caches
   cold after a token's weights (docs/LOG.md). ids must be token ids of E's vocabulary and
   positions rows of P (the caller checks). */
int tformer_decode_step(const struct tformer_block *blocks, int64_t n_blocks, const int64_t *ids,
                        const float *token_embedding, const float *position_embedding,
                        const float *final_weight, const float *final_bias, float *x,
                        float *work, float *const *k_caches, float *const *v_caches,
                        const int64_t *positions, int64_t m, int64_t c, int64_t f,
                        int64_t heads, int64_t max_len, float eps, int64_t gelu) {
    for (int64_t i = 0; i < m; i++) {
        const float *e = token_embedding + ids[i] * c, *p = position_embedding + positions[i] * c;
        for (int64_t j = 0; j < c; j++) x[i * c + j] = e[j] + p[j];
    }
    const int failed = tformer_decode_blocks(blocks, n_blocks, x, work, k_caches, v_caches,
                                             positions, m, c, f, heads, max_len, eps, gelu);
    if (failed) return failed;
    add_layer_norm(x, NULL, final_weight, final_bias, x, m, c, eps); /* row by row: in place */
    return 0;
}

/* One decoding step of the encoder-decoder's post-LN decoder layers
   (models/seq2seq_decode.py), for rows whose self-attention caches stand at the same
   position: per layer, on the residual stream x (M, C), in place,

     x = LN_1(x + SelfAttention(x) W_o^T + b_o)      keys and values into the cache at p
     x = LN_2(x + CrossAttention(x W_q^T + b_q, memory's K, V) W_co^T + b_co)
     x = LN_3(x + act(x W_1^T + b_1) W_2^T + b_2)     act: ReLU, GELU's tanh form, or GELU

   CrossAttention attends, for each row and head, over its sentence's source positions
   where `mask` (M / G, S) is 1, to the memory's keys and values computed once per
   sentence (project_memory), read with their strides: element (b, h, s, d) of K at
   k + b sb + h sh + s ss + d. Each sentence has G consecutive rows (`group`: beam
   search's G beams, or 1), which read its keys and values together. The sums x + F(x) are those of the modules, in their order. */
struct tformer_cross_block {
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias, *norm3_weight,
        *norm3_bias;
    struct tformer_linear qkv, out, cross_q, cross_out, up, down;
};

enum activation { ACT_RELU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2 };

/* Queries of one task taken together: each value row read serves them all. */
enum { QUERY_CHUNK = 4 };

/* out[r, h D : (h+1) D] = softmax_s(q . K[b, h, s] / sqrt(D), s where mask[b, s]) V[b, h, s]
   for q = q_rows[r, h D : (h+1) D] (rows q_stride apart) and b = r / group: the rows come
   in groups of `group` consecutive rows that read one memory row (beam search's beams of
   one sentence; an encoder's positions of one sentence). A row whose every position is
   masked gets zeros. One task per (memory row, head, QUERY_CHUNK of the group's rows)
   reads the keys and values once for its queries; the weighted sum of values keeps each
   query's eight outputs in registers while it runs over the positions. */
static void cross_attention(const float *q_rows, int64_t q_stride, const float *keys,
                            const float *values, const int64_t *strides, const uint8_t *mask,
                            float *out, int64_t m, int64_t group, int64_t s_len, int64_t heads,
                            int64_t d_size) {
    const int64_t c = heads * d_size, sb = strides[0], sh = strides[1], ss = strides[2];
    const float scale = 1.0f / sqrtf((float)d_size);
    const int64_t chunks = (group + QUERY_CHUNK - 1) / QUERY_CHUNK; /* of a group's rows */
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < m / group * heads * chunks; task++) {
        const int64_t b = task / (heads * chunks), h = task / chunks % heads;
        const float *k_bh = keys + b * sb + h * sh, *v_bh = values + b * sb + h * sh;
        const uint8_t *row_mask = mask + b * s_len;
        float weights[QUERY_CHUNK][s_len > 0 ? s_len : 1];
        const int64_t first = b * group + task % chunks * QUERY_CHUNK;
        const int64_t left = (b + 1) * group - first;
        const int64_t n = left < QUERY_CHUNK ? left : QUERY_CHUNK;
        const float *q[QUERY_CHUNK];
        float *o[QUERY_CHUNK];
        for (int64_t j = 0; j < n; j++) {
            q[j] = q_rows + (first + j) * q_stride + h * d_size;
            o[j] = out + (first + j) * c + h * d_size;
        }
        for (int64_t s = 0; s < s_len; s++)
            for (int64_t j = 0; j < n; j++)
                weights[j][s] = row_mask[s] ? dot8(q[j], k_bh + s * ss, d_size) * scale
                                            : -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            float highest = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < s_len; s++)
                highest = weights[j][s] > highest ? weights[j][s] : highest;
            if (highest == -INFINITY) { /* no source position: nothing to attend to */
                for (int64_t s = 0; s < s_len; s++) weights[j][s] = 0.0f;
                continue;
            }
#pragma omp simd reduction(+ : total)
            for (int64_t s = 0; s < s_len; s++) {
                weights[j][s] = exp_neg(weights[j][s] - highest); /* masked: 0 */
                total += weights[j][s];
            }
            const float inverse = 1.0f / total;
#pragma omp simd
            for (int64_t s = 0; s < s_len; s++) weights[j][s] *= inverse;
        }
        int64_t d = 0;
        for (; d + 8 <= d_size; d += 8) {
            v8f sums[QUERY_CHUNK] = {{0.0f}};
            for (int64_t s = 0; s < s_len; s++) {
                if (!row_mask[s]) continue;
                const v8f value = load8(v_bh + s * ss + d);
                for (int64_t j = 0; j < n; j++) sums[j] += weights[j][s] * value;
            }
            for (int64_t j = 0; j < n; j++) memcpy(o[j] + d, &sums[j], sizeof sums[j]);
        }
        for (; d < d_size; d++)
            for (int64_t j = 0; j < n; j++) {
                float sum = 0.0f;
                for (int64_t s = 0; s < s_len; s++)
                    if (row_mask[s]) sum += weights[j][s] * v_bh[s * ss + d];
                o[j][d] = sum;
            }
    }
}

static void activate(float *z, int64_t n, int64_t activation) {
    if (activation == ACT_GELU_TANH) {
        tformer_gelu_tanh_f32(z, z, n);
    } else if (activation == ACT_GELU) {
        tformer_gelu_f32(z, z, NULL, n);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) z[i] = z[i] > 0.0f ? z[i] : 0.0f;
    }
}

/* k_caches[i], v_caches[i]: layer i's self-attention caches, (slots, H, L, D) float32,
   row b's position t in slot paths[b, t] (paths (M, L) int64, the same for every layer),
   or in slot b where paths is NULL;
   memory_k[i], memory_v[i]: its cross-attention keys and values, with `strides` (the
   batch's, the heads', the positions'; d is contiguous), M / group sentences of them.
   work: (M, 5C + F) floats.
   Returns 0, or non-zero if a kernel failed (no memory). */
int tformer_decode_cross_blocks(const struct tformer_cross_block *blocks, int64_t n_blocks,
                                float *x, float *work, float *const *k_caches,
                                float *const *v_caches, const int64_t *positions,
                                const int64_t *paths,
                                const float *const *memory_k, const float *const *memory_v,
                                const int64_t *strides, const uint8_t *mask, int64_t s_len,
                                int64_t group, int64_t m, int64_t c, int64_t f, int64_t heads,
                                int64_t max_len, float eps, int64_t activation) {
    float *qkv = work, *a = qkv + m * 3 * c, *o = a + m * c, *hidden = o + m * c;
    for (int64_t i = 0; i < n_blocks; i++) {
        const struct tformer_cross_block *block = blocks + i;
        int failed = 0;
        failed |= linear(&block->qkv, x, qkv, m);
        failed |= tformer_path_attention_f32(qkv, k_caches[i], v_caches[i], positions, paths,
                                             a, m, heads, c / heads, max_len);
        failed |= linear(&block->out, a, o, m);
        /* x + F(x): the same sum either way round */
        add_layer_norm(o, x, block->norm1_weight, block->norm1_bias, x, m, c, eps);
        failed |= linear(&block->cross_q, x, a, m);
        cross_attention(a, c, memory_k[i], memory_v[i], strides, mask, o, m, group, s_len,
                        heads, c / heads);
        failed |= linear(&block->cross_out, o, a, m);
        add_layer_norm(a, x, block->norm2_weight, block->norm2_bias, x, m, c, eps);
        failed |= linear(&block->up, x, hidden, m);
        activate(hidden, m * f, activation);
        failed |= linear(&block->down, hidden, o, m);
        add_layer_norm(o, x, block->norm3_weight, block->norm3_bias, x, m, c, eps);
        if (failed) return failed;
    }
    return 0;
}

/* Self-attention over whole padded sequences (an encoder layer's), every head at once:
   qkv (B, T, 3C) the fused projection, mask (B, T) 1 where a position is a real token,
   -> out (B, T, C). Each sentence's T queries attend over its own unmasked positions:
   cross_attention with the sentence's keys and values inside qkv (strides T 3C, D, 3C)
   and its T rows as one group. */
void tformer_padded_attention_f32(const float *qkv, const uint8_t *mask, float *out,
                                  int64_t b_size, int64_t t_len, int64_t heads, int64_t d_size) {
    if (b_size == 0 || t_len == 0) return;
    const int64_t c = heads * d_size;
    const int64_t strides[3] = {t_len * 3 * c, d_size, 3 * c};
    cross_attention(qkv, 3 * c, qkv + c, qkv + 2 * c, strides, mask, out, b_size * t_len, t_len,
                    t_len, heads, d_size);
}
