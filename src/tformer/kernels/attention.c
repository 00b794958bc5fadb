/* Causal self-attention over short sequences, forward and backward, on the CPU.

   For one head, with Q, K, V (T, D) and s = 1 / sqrt(D):

     S = s Q K^T,   P = softmax(S + M) row by row (M: -inf above the diagonal),   O = P V
     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(P * dP)),
     dQ = s dS K,   dK = s dS^T Q

   Each head is one task for the OpenMP threads: its Q, K, V are read from the fused
   projection (B, T, 3C) in bfloat16 and widened to float32 once, every product runs in
   float32 in the thread's own buffers (48-90 KB at T 64, D 32: within the core's cache), and
   the output is written straight into the (B, T, C) layout the output projection reads, so
   no head is ever transposed in memory. The forward pass keeps P (float32) for the backward
   pass, which writes dQ, dK, dV into the (B, T, 3C) layout of the projection's gradient.

   A thread's buffers are zeroed once and reused by each of its heads. That is safe because
   every head writes the same places: what a head reads it has written itself, or nobody
   writes (the zero padding). Where T is a whole number of blocks the forward pass forms S
   and P in the weights tensor itself (uninitialised memory: only what the head has written
   there is read) and the backward pass reads P where it is; otherwise both copy it.

   Both functions return 0, or 1 if a thread's buffers could not be allocated.

   A row's maximum and sums are taken in AVX-512 registers where the CPU has them, the
   sixteen lanes combined once at the end (a compiler's own vector reduction combines them
   one after another: sixteen dependent steps per row, more than the row's own work at
   T 64; docs/LOG.md). The plain loops are the same equations.

   Every product is the same small kernel (block8): eight rows of a float32 result, sixteen
   columns wide, summed over k, with eight independent accumulators so that consecutive
   multiply-adds do not wait for each other. Buffers are padded with zeros to whole blocks;
   padded rows and columns contribute nothing. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define ROWS 8   /* result rows per block */
#define LANES 16 /* result columns per block: one AVX-512 register of floats */

/* max_{j < n} s_j, for s of round_up(n, LANES) floats. */
static inline float row_max(const float *s, int64_t n) {
#ifdef __AVX512F__
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < n; j0 += LANES)
        m = _mm512_mask_max_ps(m, first_lanes(n - j0), m, _mm512_loadu_ps(s + j0));
    return _mm512_reduce_max_ps(m);
#else
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; j++)
        m = s[j] > m ? s[j] : m;
    return m;
#endif
}

/* sum_{j < n} s_j, for s of round_up(n, LANES) floats. */
static inline float row_sum(const float *s, int64_t n) {
#ifdef __AVX512F__
    return masked_sum(s, n);
#else
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; j++)
        sum += s[j];
    return sum;
#endif
}

/* sum_{j < n} a_j b_j, for a and b of round_up(n, LANES) floats. */
static inline float row_dot(const float *a, const float *b, int64_t n) {
#ifdef __AVX512F__
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        const __mmask16 in = first_lanes(n - j0); /* both masked: 0 x inf would be NaN */
        const __m512 x = _mm512_maskz_loadu_ps(in, a + j0), y = _mm512_maskz_loadu_ps(in, b + j0);
        sum = _mm512_fmadd_ps(x, y, sum);
    }
    return _mm512_reduce_add_ps(sum);
#else
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; j++)
        sum += a[j] * b[j];
    return sum;
#endif
}

/* out[r * ldo + l] = sum_{k < n} a[r * a_row + k * a_col] * b[k * ldb + l],
   for r < ROWS, l < LANES. */
static inline void block8(const float *a, int64_t a_row, int64_t a_col, const float *b,
                          int64_t ldb, int64_t n, float *out, int64_t ldo) {
    float acc[ROWS][LANES];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < n; k++) {
        const float *bk = b + k * ldb;
        const float *ak = a + k * a_col;
        for (int r = 0; r < ROWS; r++) {
            float w = ak[r * a_row];
#pragma omp simd
            for (int l = 0; l < LANES; l++)
                acc[r][l] += w * bk[l];
        }
    }
    for (int r = 0; r < ROWS; r++)
        memcpy(out + r * ldo, acc[r], sizeof acc[r]);
}

static inline void widen_row(const uint16_t *src, float *dst, int64_t n, float scale) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        dst[i] = bf16_bits_to_float(src[i]) * scale;
}

static inline void narrow_row(const float *src, uint16_t *dst, int64_t n, float scale) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        dst[i] = float_to_bf16_bits(src[i] * scale);
}

/* dst[j][i] = float(src[i][j]) for i < rows, j < cols: src bf16 with rows ld elements
   apart, dst float32 with rows dst_ld apart (K^T and V^T of a head, from the projection).
   Whole 16 x 16 blocks are turned in registers where the CPU has AVX2 (common.h), the
   rest one element at a time, which cost the forward pass 15% (docs/LOG.md). */
static void widen_transposed(const uint16_t *src, int64_t ld, int64_t rows, int64_t cols,
                             float *dst, int64_t dst_ld) {
    int64_t rows_whole = 0, cols_whole = 0;
#if defined(__AVX2__)
    rows_whole = rows / 16 * 16;
    cols_whole = cols / 16 * 16;
    for (int64_t i = 0; i < rows_whole; i += 16)
        for (int64_t j = 0; j < cols_whole; j += 16)
            block_16x16_to_f32(src + i * ld + j, ld, dst + j * dst_ld + i, dst_ld);
#endif
    for (int64_t j = 0; j < cols; j++)
        for (int64_t i = j < cols_whole ? rows_whole : 0; i < rows; i++)
            dst[j * dst_ld + i] = bf16_bits_to_float(src[i * ld + j]);
}

/* A thread's buffer of n floats, zeroed; NULL, with *failed set, if there is no memory. */
static float *thread_buffer(int64_t n, int *failed) {
    float *buffer = calloc(n, sizeof(float));
    if (buffer == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
    return buffer;
}

/* One head of the forward pass, in buffer (4 tp dp + tp tp floats). qkv (B, T, 3C) bf16,
   C = H D: head h's q, k, v at columns h D, C + h D, 2C + h D. out (B, T, C) bf16; p_out
   (T, T) float32, this head's P with zeros above the diagonal. Where T is a whole number
   of blocks (T = tp), S and P are formed in p_out itself, with no copy. */
static void forward_head(const uint16_t *qkv, uint16_t *out, float *p_out, float *buffer,
                         int64_t b, int64_t h, int64_t t_size, int64_t h_size,
                         int64_t d_size) {
    const int64_t c = h_size * d_size, row = 3 * c;
    const int64_t tp = round_up(t_size, LANES), dp = round_up(d_size, LANES);
    const float scale = 1.0f / sqrtf((float)d_size);
    const uint16_t *base = qkv + b * t_size * row + h * d_size;
    float *q = buffer, *kt = q + tp * dp, *v = kt + dp * tp, *s = v + tp * dp;
    float *o = s + tp * tp;
    if (t_size == tp)
        s = p_out;
    for (int64_t j = 0; j < t_size; j++) {
        widen_row(base + j * row, q + j * dp, d_size, scale);
        widen_row(base + j * row + 2 * c, v + j * dp, d_size, 1.0f);
    }
    widen_transposed(base + c, row, t_size, d_size, kt, tp); /* K^T: row d is K's column d */
    for (int64_t i0 = 0; i0 < t_size; i0 += ROWS) /* S = (s Q) K^T, causal blocks */
        for (int64_t j0 = 0; j0 < i0 + ROWS && j0 < t_size; j0 += LANES)
            block8(q + i0 * dp, dp, 1, kt + j0, tp, d_size, s + i0 * tp + j0, tp);
    for (int64_t i = 0; i < t_size; i++) { /* P = softmax over j <= i; 0 beyond */
        float *si = s + i * tp;
        const int64_t n = i + 1, whole = round_up(n, LANES);
        const float m = row_max(si, n);
        /* Whole vectors, lanes j >= n zero: no scalar remainder loop per row. */
        for (int64_t j0 = 0; j0 < whole; j0 += LANES)
#pragma omp simd
            for (int64_t l = 0; l < LANES; l++)
                si[j0 + l] = j0 + l < n ? exp_neg(si[j0 + l] - m) : 0.0f;
        float inv = 1.0f / row_sum(si, n);
#pragma omp simd
        for (int64_t j = 0; j < whole; j++)
            si[j] = j < n ? si[j] * inv : 0.0f;
        /* the rest of the row zero, written without reading what was there */
        memset(si + whole, 0, (tp - whole) * sizeof(float));
        if (s != p_out)
            memcpy(p_out + i * t_size, si, t_size * sizeof(float));
    }
    for (int64_t i0 = 0; i0 < t_size; i0 += ROWS) { /* O = P V */
        int64_t n = i0 + ROWS < t_size ? i0 + ROWS : t_size;
        for (int64_t d0 = 0; d0 < d_size; d0 += LANES)
            block8(s + i0 * tp, tp, 1, v + d0, dp, n, o + i0 * dp + d0, dp);
    }
    for (int64_t i = 0; i < t_size; i++)
        narrow_row(o + i * dp, out + (b * t_size + i) * c + h * d_size, d_size, 1.0f);
}

/* qkv (B, T, 3C) bf16 -> out (B, T, C) bf16 and weights (B, H, T, T) float32. */
int tformer_causal_attention_bf16(const uint16_t *qkv, uint16_t *out, float *weights,
                                  int64_t b_size, int64_t t_size, int64_t h_size,
                                  int64_t d_size) {
    const int64_t tp = round_up(t_size, LANES), dp = round_up(d_size, LANES);
    int failed = 0;
#pragma omp parallel
    {
        float *buffer = thread_buffer(4 * tp * dp + tp * tp, &failed);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < b_size * h_size; task++)
            if (buffer != NULL)
                forward_head(qkv, out, weights + task * t_size * t_size, buffer,
                             task / h_size, task % h_size, t_size, h_size, d_size);
        free(buffer);
    }
    return failed;
}

/* One head of the backward pass, in buffer (7 tp dp + 2 tp tp floats): from qkv, the
   head's P (T, T) p_in and grad_out (B, T, C) bf16 into grad_qkv (B, T, 3C) bf16. Where T
   is a whole number of blocks, P is read where it is, not copied. */
static void backward_head(const uint16_t *qkv, const float *p_in, const uint16_t *grad_out,
                          uint16_t *grad_qkv, float *buffer, int64_t b, int64_t h,
                          int64_t t_size, int64_t h_size, int64_t d_size) {
    const int64_t c = h_size * d_size, row = 3 * c;
    const int64_t tp = round_up(t_size, LANES), dp = round_up(d_size, LANES);
    const float scale = 1.0f / sqrtf((float)d_size);
    const uint16_t *base = qkv + b * t_size * row + h * d_size;
    float *q = buffer, *k = q + tp * dp, *vt = k + tp * dp, *go = vt + dp * tp;
    float *copy = go + tp * dp, *ds = copy + tp * tp, *dq = ds + tp * tp, *dk = dq + tp * dp;
    float *dv = dk + tp * dp;
    const float *p = t_size == tp ? p_in : copy;
    for (int64_t j = 0; j < t_size; j++) {
        widen_row(base + j * row, q + j * dp, d_size, scale);
        widen_row(base + j * row + c, k + j * dp, d_size, 1.0f);
        widen_row(grad_out + (b * t_size + j) * c + h * d_size, go + j * dp, d_size, 1.0f);
        if (p == copy)
            memcpy(copy + j * tp, p_in + j * t_size, t_size * sizeof(float));
    }
    widen_transposed(base + 2 * c, row, t_size, d_size, vt, tp); /* V^T: row d is V's column d */
    for (int64_t i0 = 0; i0 < t_size; i0 += ROWS) /* dP = dO V^T, into ds */
        for (int64_t j0 = 0; j0 < i0 + ROWS && j0 < t_size; j0 += LANES)
            block8(go + i0 * dp, dp, 1, vt + j0, tp, d_size, ds + i0 * tp + j0, tp);
    for (int64_t i = 0; i < t_size; i++) { /* dS = P (dP - rowsum(P dP)) */
        const float *pi = p + i * tp;
        float *di = ds + i * tp;
        const int64_t n = i + 1;
        const float r = row_dot(pi, di, n);
#pragma omp simd
        for (int64_t j = 0; j < tp; j++)
            di[j] = j < n ? pi[j] * (di[j] - r) : 0.0f;
    }
    for (int64_t i0 = 0; i0 < t_size; i0 += ROWS) { /* dQ = s dS K */
        int64_t n = i0 + ROWS < t_size ? i0 + ROWS : t_size;
        for (int64_t d0 = 0; d0 < d_size; d0 += LANES)
            block8(ds + i0 * tp, tp, 1, k + d0, dp, n, dq + i0 * dp + d0, dp);
    }
    for (int64_t j0 = 0; j0 < t_size; j0 += ROWS) /* dK = dS^T (s Q), dV = P^T dO */
        for (int64_t d0 = 0; d0 < d_size; d0 += LANES) {
            int64_t n = t_size - j0; /* queries i >= j0; dS, P are 0 for i < j */
            block8(ds + j0 * tp + j0, 1, tp, q + j0 * dp + d0, dp, n, dk + j0 * dp + d0, dp);
            block8(p + j0 * tp + j0, 1, tp, go + j0 * dp + d0, dp, n, dv + j0 * dp + d0, dp);
        }
    for (int64_t i = 0; i < t_size; i++) {
        uint16_t *g = grad_qkv + (b * t_size + i) * row + h * d_size;
        narrow_row(dq + i * dp, g, d_size, scale);
        narrow_row(dk + i * dp, g + c, d_size, 1.0f);
        narrow_row(dv + i * dp, g + 2 * c, d_size, 1.0f);
    }
}

/* grad_out (B, T, C) bf16 and the forward's weights -> grad_qkv (B, T, 3C) bf16. */
int tformer_causal_attention_backward_bf16(const uint16_t *qkv, const float *weights,
                                           const uint16_t *grad_out, uint16_t *grad_qkv,
                                           int64_t b_size, int64_t t_size, int64_t h_size,
                                           int64_t d_size) {
    const int64_t tp = round_up(t_size, LANES), dp = round_up(d_size, LANES);
    int failed = 0;
#pragma omp parallel
    {
        float *buffer = thread_buffer(7 * tp * dp + 2 * tp * tp, &failed);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < b_size * h_size; task++)
            if (buffer != NULL)
                backward_head(qkv, weights + task * t_size * t_size, grad_out, grad_qkv,
                              buffer, task / h_size, task % h_size, t_size, h_size, d_size);
        free(buffer);
    }
    return failed;
}
