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

   Each linear layer runs the kernel of its own weights (float32, bfloat16, int8 or int4,
   `struct tformer_linear`), over the OpenMP threads; the norms and sums are M x C, a few
   microseconds. The mean and variance are sums in order (two passes, the variance of the
   centred values), in float32 like torch's. `work` holds the step's intermediate rows:
   (M, 3C) + 3 (M, C) + (M, F) floats. */

#include <math.h>
#include <stdint.h>

#include "common.h"

enum linear_kind { LINEAR_F32 = 0, LINEAR_BF16 = 1, LINEAR_I8 = 2, LINEAR_I4 = 3 };

/* One packed linear layer: its panels (kernels.pack_linear / pack_int4), int8's row
   scales, the bias (or NULL), and its shape (N, K). */
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
void tformer_gelu_tanh_f32(const float *z, float *y, int64_t n);
void tformer_gelu_f32(const float *z, float *y, float *d, int64_t n);
int tformer_slot_attention_f32(const float *qkv, float *k_cache, float *v_cache,
                               const int64_t *positions, float *out, int64_t b_size,
                               int64_t h_size, int64_t d_size, int64_t max_len);

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
    default:
        return 2;
    }
}

/* y = LN(x) row by row, x and y (M, C). */
static void layer_norm(const float *x, const float *weight, const float *bias, float *y,
                       int64_t m, int64_t c, float eps) {
    for (int64_t i = 0; i < m; i++) {
        const float *row = x + i * c;
        float sum = 0.0f;
        for (int64_t j = 0; j < c; j++) sum += row[j];
        const float mean = sum / (float)c;
        float squares = 0.0f;
        for (int64_t j = 0; j < c; j++) squares += (row[j] - mean) * (row[j] - mean);
        const float inverse = 1.0f / sqrtf(squares / (float)c + eps);
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
        layer_norm(x, block->norm1_weight, block->norm1_bias, h, m, c, eps);
        failed |= linear(&block->qkv, h, qkv, m);
        failed |= tformer_slot_attention_f32(qkv, k_caches[i], v_caches[i], positions, a, m,
                                             heads, c / heads, max_len);
        failed |= linear(&block->out, a, o, m);
        add(x, o, m * c);
        layer_norm(x, block->norm2_weight, block->norm2_bias, h, m, c, eps);
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

/* One decoding step of the encoder-decoder's post-LN decoder layers
   (models/seq2seq_decode.py), for rows whose self-attention caches stand at the same
   position: per layer, on the residual stream x (M, C), in place,

     x = LN_1(x + SelfAttention(x) W_o^T + b_o)      keys and values into the cache at p
     x = LN_2(x + CrossAttention(x W_q^T + b_q, memory's K, V) W_co^T + b_co)
     x = LN_3(x + act(x W_1^T + b_1) W_2^T + b_2)     act: ReLU, GELU's tanh form, or GELU

   CrossAttention attends, for each row and head, over the row's source positions where
   `mask` (M, S) is 1, to the memory's keys and values computed once per sentence
   (project_memory), read with their strides: element (b, h, s, d) of K at
   k + b sb + h sh + s ss + d. The sums x + F(x) are those of the modules, in their order. */
struct tformer_cross_block {
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias, *norm3_weight,
        *norm3_bias;
    struct tformer_linear qkv, out, cross_q, cross_out, up, down;
};

enum activation { ACT_RELU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2 };

/* out[b, h D : (h+1) D] = softmax_s(q . K[b, h, s] / sqrt(D), s where mask[b, s]) V[b, h, s]
   for q = q_rows[b, h D : (h+1) D]: one task per (row, head). */
static void cross_attention(const float *q_rows, const float *keys, const float *values,
                            const int64_t *strides, const uint8_t *mask, float *out, int64_t m,
                            int64_t s_len, int64_t heads, int64_t d_size) {
    const int64_t c = heads * d_size, sb = strides[0], sh = strides[1], ss = strides[2];
    const float scale = 1.0f / sqrtf((float)d_size);
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < m * heads; task++) {
        const int64_t b = task / heads, h = task % heads;
        const float *q = q_rows + b * c + h * d_size;
        const float *k_bh = keys + b * sb + h * sh, *v_bh = values + b * sb + h * sh;
        const uint8_t *row_mask = mask + b * s_len;
        float scores[s_len > 0 ? s_len : 1];
        float highest = -INFINITY;
        for (int64_t s = 0; s < s_len; s++) {
            if (!row_mask[s]) continue;
            const float *key = k_bh + s * ss;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < d_size; d++) dot += q[d] * key[d];
            scores[s] = dot * scale;
            highest = scores[s] > highest ? scores[s] : highest;
        }
        float total = 0.0f;
        for (int64_t s = 0; s < s_len; s++) {
            if (!row_mask[s]) continue;
            scores[s] = expf(scores[s] - highest);
            total += scores[s];
        }
        float *o = out + b * c + h * d_size;
        for (int64_t d = 0; d < d_size; d++) o[d] = 0.0f;
        if (total == 0.0f) continue; /* no source position: nothing to attend to */
        const float inverse = 1.0f / total;
        for (int64_t s = 0; s < s_len; s++) {
            if (!row_mask[s]) continue;
            const float w = scores[s] * inverse, *value = v_bh + s * ss;
#pragma omp simd
            for (int64_t d = 0; d < d_size; d++) o[d] += w * value[d];
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

/* k_caches[i], v_caches[i]: layer i's self-attention caches, (M, H, L, D) float32;
   memory_k[i], memory_v[i]: its cross-attention keys and values, with `strides` (the
   batch's, the heads', the positions'; d is contiguous). work: (M, 5C + F) floats.
   Returns 0, or non-zero if a kernel failed (no memory). */
int tformer_decode_cross_blocks(const struct tformer_cross_block *blocks, int64_t n_blocks,
                                float *x, float *work, float *const *k_caches,
                                float *const *v_caches, const int64_t *positions,
                                const float *const *memory_k, const float *const *memory_v,
                                const int64_t *strides, const uint8_t *mask, int64_t s_len,
                                int64_t m, int64_t c, int64_t f, int64_t heads, int64_t max_len,
                                float eps, int64_t activation) {
    float *qkv = work, *a = qkv + m * 3 * c, *o = a + m * c, *hidden = o + m * c;
    for (int64_t i = 0; i < n_blocks; i++) {
        const struct tformer_cross_block *block = blocks + i;
        int failed = 0;
        failed |= linear(&block->qkv, x, qkv, m);
        failed |= tformer_slot_attention_f32(qkv, k_caches[i], v_caches[i], positions, a, m,
                                             heads, c / heads, max_len);
        failed |= linear(&block->out, a, o, m);
        add(o, x, m * c); /* x + F(x): the same sum either way round */
        layer_norm(o, block->norm1_weight, block->norm1_bias, x, m, c, eps);
        failed |= linear(&block->cross_q, x, a, m);
        cross_attention(a, memory_k[i], memory_v[i], strides, mask, o, m, s_len, heads,
                        c / heads);
        failed |= linear(&block->cross_out, o, a, m);
        add(a, x, m * c);
        layer_norm(a, block->norm2_weight, block->norm2_bias, x, m, c, eps);
        failed |= linear(&block->up, x, hidden, m);
        activate(hidden, m * f, activation);
        failed |= linear(&block->down, hidden, o, m);
        add(o, x, m * c);
        layer_norm(o, block->norm3_weight, block->norm3_bias, x, m, c, eps);
        if (failed) return failed;
    }
    return 0;
}
