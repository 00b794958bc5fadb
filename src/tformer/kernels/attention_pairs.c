/* Causal self-attention over short sequences with bf16 products (AVX-512 BF16), forward and
   backward, on the CPU. The equations are attention.c's; for one head, with Q, K, V (T, D)
   and s = 1 / sqrt(D),

     S = s (Q K^T),   P = bf16(softmax(S + M)) row by row,   O = P V
     dV = P^T dO,   dP = dO V^T,   dS = bf16(P (dP - rowsum(P dP))),
     dQ = s (dS K),   dK = s (dS^T Q)

   Every product multiplies bf16 values, as the projection gives Q, K, V and dO, with P and
   dS rounded to bf16 once for theirs (as a bf16 FlashAttention kernel rounds them), and
   sums in float32: AVX-512 BF16's dot product (vdpbf16ps) multiplies sixteen pairs of bf16
   and adds both products of each pair into a float32 lane, twice the multiply-adds of a
   float32 FMA per instruction. P is kept for the backward pass in bf16, half attention.c's,
   written in streaming stores where its rows are whole cache lines (write_weights).
   (The dot product treats denormal inputs as zero and flushes a denormal sum to zero, as
   training does with flush_denormals.)

   Each product is one small kernel (`tile`): eight rows of a float32 result, sixteen columns
   wide, summed over pairs of k. A's pair for a row is one 32-bit value broadcast to every
   lane; B's pairs for the sixteen columns are one vector. So each operand is laid out with
   the two values of a pair side by side:
     - rows:        a row's consecutive elements are pairs along k (Q, dO along D; P, dS
                    along the keys), read where they are;
     - interleaved: rows 2p and 2p + 1, element by element: pair p for every column (K, Q,
                    dO, V, P and dS along T, written by `interleave`);
     - turned:      pair p of row j at column j of row p, the 32-bit transpose (K and V
                    along D, for S and dP: `turn`).
   Buffers are padded with zeros to whole blocks and pairs, and zeroed once per thread: every
   head writes the same places (what a head reads it has written, or nobody writes), as in
   attention.c.

   Built only where the compiler targets AVX-512 BF16 (with BW and VL); elsewhere the
   functions return 2 and tformer_attention_pairs_available() 0, and the choice never offers
   this path. Both functions return 0, or 1 if a thread's buffers could not be allocated. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAIRS 1

#define ROWS 8   /* result rows per tile */
#define LANES 16 /* result columns per tile: one AVX-512 register of floats */

/* out[r][l] = sum_{p < pairs} a_r,p . b_p,l for r < ROWS, l < LANES, where a_r,p is the
   pair at a[r * a_row + p * a_pair] and b_p,l the pair at b[p * b_pair + l] (32-bit
   units): both values of each pair multiplied and added in float32. */
static inline void tile(const uint32_t *a, int64_t a_row, int64_t a_pair, const uint32_t *b,
                        int64_t b_pair, int64_t pairs, float *out, int64_t ldo) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh bp = (__m512bh)_mm512_loadu_si512(b + p * b_pair);
        const uint32_t *ap = a + p * a_pair;
        for (int r = 0; r < ROWS; r++) {
            int32_t pair; /* copied: the buffers are written as bf16 */
            memcpy(&pair, ap + r * a_row, sizeof pair);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), bp);
        }
    }
    for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

/* dst[i][j] = src[i * ld + j] for i < rows, j < cols (bf16): a head's rows out of the
   projection into a buffer of dst_ld columns, whose padding stays zero. Thirty-two values a
   (masked) vector: a row of a head is a few of them, where memcpy's call cost more. */
static void copy_rows(const uint16_t *src, int64_t ld, int64_t rows, int64_t cols,
                      uint16_t *dst, int64_t dst_ld) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j += 32) {
            const __mmask32 in = cols - j >= 32 ? 0xFFFFFFFFu : (1u << (cols - j)) - 1;
            _mm512_mask_storeu_epi16(dst + i * dst_ld + j, in,
                                     _mm512_maskz_loadu_epi16(in, src + i * ld + j));
        }
}

/* dst[p][j] = src[2p][j] | src[2p + 1][j] << 16 for p < pairs, j < cols (cols a multiple of
   LANES): src bf16, 2 pairs rows ld apart. */
static void interleave(const uint16_t *src, int64_t ld, int64_t pairs, int64_t cols,
                       uint32_t *dst) {
    for (int64_t p = 0; p < pairs; p++)
        for (int64_t j = 0; j < cols; j += LANES) {
            const __m256i lo = _mm256_loadu_si256((const __m256i *)(src + 2 * p * ld + j));
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(src + (2 * p + 1) * ld + j));
            const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                                                 _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
            _mm512_storeu_si512(dst + p * cols + j, pair);
        }
}

/* dst[p][j] = src[j][2p] | src[j][2p + 1] << 16 for j < rows, p < pairs: the 32-bit
   transpose of a head's rows copied into a buffer (ld even; rows a multiple of LANES, the
   padding zero), sixteen rows' pair p in one gather. Gathered from the copy, not from the
   projection: there each of the sixteen rows is a line from memory, and the gather waits
   for all of them (docs/LOG.md). */
static void turn(const uint16_t *src, int64_t ld, int64_t rows, int64_t pairs, uint32_t *dst,
                 int64_t tp) {
    const __m512i rows16 = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)(ld / 2)));
    for (int64_t j0 = 0; j0 < rows; j0 += LANES)
        for (int64_t p = 0; p < pairs; p++)
            _mm512_storeu_si512(dst + p * tp + j0,
                                _mm512_i32gather_epi32(rows16, src + j0 * ld + 2 * p, 4));
}

/* n float32 values rounded to bf16 (to nearest even) at dst. */
static inline void narrow(const float *src, uint16_t *dst, int64_t n, float scale) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < n; j += LANES) {
        const __mmask16 in = first_lanes(n - j);
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, src + j), s));
        _mm256_mask_storeu_epi16(dst + j, in, (__m256i)v);
    }
}

/* A thread's buffer of n bytes, zeroed; NULL, with *failed set, if there is no memory. */
static void *thread_buffer(size_t n, int *failed) {
    void *buffer = calloc(n, 1);
    if (buffer == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
    return buffer;
}

/* The sizes every head of a call shares: T and D padded to whole tiles, pairs along D. */
struct shape {
    int64_t t, d, tp, dp, d_pairs, t_pairs, row, c;
    float scale;
};

static struct shape shape_of(int64_t t, int64_t h, int64_t d) {
    struct shape s;
    s.t = t;
    s.d = d;
    s.tp = round_up(t, LANES);
    s.dp = round_up(d, LANES);
    s.d_pairs = (d + 1) / 2;
    s.t_pairs = (t + 1) / 2;
    s.c = h * d;
    s.row = 3 * s.c;
    s.scale = 1.0f / sqrtf((float)d);
    return s;
}

/* Row i of P from row i of S (s_row, float32, i + 1 scores seen): x = scale S, P = bf16(
   exp(x - max x) / sum), zeros after; into p_row (tp bf16). */
static void softmax_row(const float *s_row, int64_t i, const struct shape *sh, uint16_t *p_row,
                        float *e) {
    const int64_t n = i + 1;
    const __m512 scale = _mm512_set1_ps(sh->scale);
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += LANES) {
        const __mmask16 in = first_lanes(n - j);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, s_row + j), scale);
        _mm512_storeu_ps(e + j, x);
        m = _mm512_mask_max_ps(m, in, m, x);
    }
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += LANES) {
        const __mmask16 in = first_lanes(n - j);
        const __m512 y = _mm512_sub_ps(_mm512_loadu_ps(e + j), max);
        __m512 x = exp_neg16(y); /* 0 for a NaN y: a NaN score (or inf - inf) kept NaN */
        x = _mm512_maskz_mov_ps(in, _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), y));
        _mm512_storeu_ps(e + j, x);
        sum = _mm512_add_ps(sum, x);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < sh->tp; j += LANES) { /* lanes j >= n: e is 0 there */
        const __mmask16 in = first_lanes(n - j);
        const __m512 p = _mm512_maskz_mul_ps(in, _mm512_loadu_ps(e + j), inv);
        _mm256_storeu_si256((__m256i *)(p_row + j), (__m256i)_mm512_cvtneps_pbh(p));
    }
}

/* The head's P (T rows of p, tp apart) into its weights (T, T). Where each row is whole
   64-byte lines, in streaming stores: the weights are read only by the backward pass, long
   after, and a plain store would first read each line from memory (this tensor's memory is
   whatever the allocator last freed). */
static void write_weights(const uint16_t *p, const struct shape *sh, uint16_t *weights) {
    const int64_t t = sh->t;
    if (t % 32 == 0 && ((uintptr_t)weights & 63) == 0) {
        for (int64_t i = 0; i < t; i++)
            for (int64_t j = 0; j < t; j += 32)
                _mm512_stream_si512((void *)(weights + i * t + j),
                                    _mm512_loadu_si512(p + i * sh->tp + j));
    } else {
        for (int64_t i = 0; i < t; i++) memcpy(weights + i * t, p + i * sh->tp, t * 2);
    }
}

/* The forward pass's buffers, in bytes (forward_head's layout). */
static size_t forward_bytes(const struct shape *s) {
    return 3 * (size_t)(s->tp * s->dp) * 2     /* Q, K, V rows (bf16) */
           + (size_t)(s->d_pairs * s->tp) * 4  /* K turned */
           + (size_t)(s->tp / 2 * s->dp) * 4   /* V interleaved */
           + (size_t)(s->tp * s->tp) * 4       /* S (float32) */
           + (size_t)(s->tp * s->tp) * 2       /* P (bf16) */
           + (size_t)(s->tp * s->dp) * 4       /* O (float32) */
           + (size_t)s->tp * 4;                /* a row's exponentials */
}

/* One head (b, h) of the forward pass in `buffer`: qkv (B, T, 3C) -> out (B, T, C) and
   weights (T, T) of this head, bf16. */
static void forward_head(const uint16_t *qkv, uint16_t *out, uint16_t *weights, char *buffer,
                         int64_t b, int64_t h, const struct shape *sh) {
    const int64_t t = sh->t, d = sh->d, tp = sh->tp, dp = sh->dp, row = sh->row, c = sh->c;
    const uint16_t *base = qkv + b * t * row + h * d;
    uint16_t *q = (uint16_t *)buffer, *k = q + tp * dp, *v = k + tp * dp;
    uint32_t *k_turned = (uint32_t *)(v + tp * dp), *v_pairs = k_turned + sh->d_pairs * tp;
    float *s = (float *)(v_pairs + tp / 2 * dp);
    uint16_t *p = (uint16_t *)(s + tp * tp);
    float *o = (float *)(p + tp * tp), *e = o + tp * dp;
    copy_rows(base, row, t, d, q, dp);
    copy_rows(base + c, row, t, d, k, dp);
    copy_rows(base + 2 * c, row, t, d, v, dp);
    turn(k, dp, tp, sh->d_pairs, k_turned, tp);
    interleave(v, dp, tp / 2, dp, v_pairs);
    for (int64_t i0 = 0; i0 < t; i0 += ROWS) /* S = Q K^T, the blocks on or below the diagonal */
        for (int64_t j0 = 0; j0 < i0 + ROWS && j0 < t; j0 += LANES)
            tile((const uint32_t *)(q + i0 * dp), dp / 2, 1, k_turned + j0, tp, sh->d_pairs,
                 s + i0 * tp + j0, tp);
    for (int64_t i = 0; i < t; i++)
        softmax_row(s + i * tp, i, sh, p + i * tp, e);
    write_weights(p, sh, weights);
    for (int64_t i0 = 0; i0 < t; i0 += ROWS) { /* O = P V over the keys up to the block's last */
        const int64_t keys = i0 + ROWS < t ? i0 + ROWS : t, pairs = (keys + 1) / 2;
        for (int64_t d0 = 0; d0 < d; d0 += LANES)
            tile((const uint32_t *)(p + i0 * tp), tp / 2, 1, v_pairs + d0, dp, pairs,
                 o + i0 * dp + d0, dp);
    }
    for (int64_t i = 0; i < t; i++)
        narrow(o + i * dp, out + (b * t + i) * c + h * d, d, 1.0f);
}

/* The backward pass's buffers, in bytes (backward_head's layout). */
static size_t backward_bytes(const struct shape *s) {
    return 4 * (size_t)(s->tp * s->dp) * 2     /* Q, K, V, dO rows (bf16) */
           + 3 * (size_t)(s->tp / 2 * s->dp) * 4 /* the same interleaved */
           + (size_t)(s->d_pairs * s->tp) * 4  /* V turned */
           + 2 * (size_t)(s->tp * s->tp) * 2   /* P, dS rows (bf16) */
           + 2 * (size_t)(s->tp / 2 * s->tp) * 4 /* the same interleaved */
           + (size_t)(s->tp * s->tp) * 4       /* dP (float32) */
           + 3 * (size_t)(s->tp * s->dp) * 4;  /* dQ, dK, dV (float32) */
}

/* One head (b, h) of the backward pass in `buffer`: from qkv, the head's P (T, T) and
   grad_out (B, T, C), into grad_qkv (B, T, 3C), all bf16. */
static void backward_head(const uint16_t *qkv, const uint16_t *weights, const uint16_t *grad_out,
                          uint16_t *grad_qkv, char *buffer, int64_t b, int64_t h,
                          const struct shape *sh) {
    const int64_t t = sh->t, d = sh->d, tp = sh->tp, dp = sh->dp, row = sh->row, c = sh->c;
    const uint16_t *base = qkv + b * t * row + h * d;
    uint16_t *q = (uint16_t *)buffer, *k = q + tp * dp, *v = k + tp * dp, *go = v + tp * dp;
    uint32_t *q_pairs = (uint32_t *)(go + tp * dp), *k_pairs = q_pairs + tp / 2 * dp;
    uint32_t *go_pairs = k_pairs + tp / 2 * dp, *v_turned = go_pairs + tp / 2 * dp;
    uint16_t *p = (uint16_t *)(v_turned + sh->d_pairs * tp), *ds = p + tp * tp;
    uint32_t *p_pairs = (uint32_t *)(ds + tp * tp), *ds_pairs = p_pairs + tp / 2 * tp;
    float *grad_p = (float *)(ds_pairs + tp / 2 * tp), *dq = grad_p + tp * tp, *dk = dq + tp * dp;
    float *dv = dk + tp * dp;
    copy_rows(base, row, t, d, q, dp);
    copy_rows(base + c, row, t, d, k, dp);
    copy_rows(base + 2 * c, row, t, d, v, dp);
    copy_rows(grad_out + b * t * c + h * d, c, t, d, go, dp);
    copy_rows(weights, t, t, t, p, tp);
    turn(v, dp, tp, sh->d_pairs, v_turned, tp);
    for (int64_t i0 = 0; i0 < t; i0 += ROWS) /* dP = dO V^T, on or below the diagonal */
        for (int64_t j0 = 0; j0 < i0 + ROWS && j0 < t; j0 += LANES)
            tile((const uint32_t *)(go + i0 * dp), dp / 2, 1, v_turned + j0, tp, sh->d_pairs,
                 grad_p + i0 * tp + j0, tp);
    for (int64_t i = 0; i < t; i++) { /* dS = P (dP - rowsum(P dP)), rounded to bf16 */
        const int64_t n = i + 1;
        const uint16_t *pi = p + i * tp;
        const float *di = grad_p + i * tp;
        __m512 r = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += LANES) {
            const __mmask16 in = first_lanes(n - j);
            r = _mm512_fmadd_ps(load_bf16x16(pi + j, in), _mm512_maskz_loadu_ps(in, di + j), r);
        }
        const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(r));
        for (int64_t j = 0; j < tp; j += LANES) {
            const __mmask16 in = first_lanes(n - j);
            const __m512 g = _mm512_maskz_sub_ps(in, _mm512_maskz_loadu_ps(in, di + j), sum);
            const __m512 x = _mm512_mul_ps(load_bf16x16(pi + j, in), g);
            _mm256_storeu_si256((__m256i *)(ds + i * tp + j), (__m256i)_mm512_cvtneps_pbh(x));
        }
    }
    interleave(q, dp, tp / 2, dp, q_pairs);
    interleave(k, dp, tp / 2, dp, k_pairs);
    interleave(go, dp, tp / 2, dp, go_pairs);
    interleave(p, tp, tp / 2, tp, p_pairs);
    interleave(ds, tp, tp / 2, tp, ds_pairs);
    for (int64_t i0 = 0; i0 < t; i0 += ROWS) { /* dQ = dS K over the keys up to the block's last */
        const int64_t keys = i0 + ROWS < t ? i0 + ROWS : t, pairs = (keys + 1) / 2;
        for (int64_t d0 = 0; d0 < d; d0 += LANES)
            tile((const uint32_t *)(ds + i0 * tp), tp / 2, 1, k_pairs + d0, dp, pairs,
                 dq + i0 * dp + d0, dp);
    }
    for (int64_t j0 = 0; j0 < t; j0 += ROWS) { /* dK = dS^T Q, dV = P^T dO: queries i >= j0 */
        const int64_t first = j0 / 2, pairs = sh->t_pairs - first;
        for (int64_t d0 = 0; d0 < d; d0 += LANES) {
            tile(ds_pairs + first * tp + j0, 1, tp, q_pairs + first * dp + d0, dp, pairs,
                 dk + j0 * dp + d0, dp);
            tile(p_pairs + first * tp + j0, 1, tp, go_pairs + first * dp + d0, dp, pairs,
                 dv + j0 * dp + d0, dp);
        }
    }
    for (int64_t i = 0; i < t; i++) {
        uint16_t *g = grad_qkv + (b * t + i) * row + h * d;
        narrow(dq + i * dp, g, d, sh->scale);
        narrow(dk + i * dp, g + c, d, sh->scale);
        narrow(dv + i * dp, g + 2 * c, d, 1.0f);
    }
}
#endif

int tformer_attention_pairs_available(void) {
#ifdef PAIRS
    return 1;
#else
    return 0;
#endif
}

/* qkv (B, T, 3C) bf16 -> out (B, T, C) bf16 and weights (B, H, T, T) bf16. */
int tformer_causal_attention_pairs(const uint16_t *qkv, uint16_t *out, uint16_t *weights,
                                   int64_t b_size, int64_t t_size, int64_t h_size,
                                   int64_t d_size) {
#ifdef PAIRS
    const struct shape sh = shape_of(t_size, h_size, d_size);
    int failed = 0;
#pragma omp parallel
    {
        char *buffer = thread_buffer(forward_bytes(&sh), &failed);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < b_size * h_size; task++)
            if (buffer != NULL)
                forward_head(qkv, out, weights + task * t_size * t_size, buffer, task / h_size,
                             task % h_size, &sh);
        _mm_sfence(); /* the streaming stores seen by whoever reads the weights next */
        free(buffer);
    }
    return failed;
#else
    (void)qkv, (void)out, (void)weights, (void)b_size, (void)t_size, (void)h_size, (void)d_size;
    return 2;
#endif
}

/* grad_out (B, T, C) bf16 and the forward pass's weights -> grad_qkv (B, T, 3C) bf16. */
int tformer_causal_attention_pairs_backward(const uint16_t *qkv, const uint16_t *weights,
                                            const uint16_t *grad_out, uint16_t *grad_qkv,
                                            int64_t b_size, int64_t t_size, int64_t h_size,
                                            int64_t d_size) {
#ifdef PAIRS
    const struct shape sh = shape_of(t_size, h_size, d_size);
    int failed = 0;
#pragma omp parallel
    {
        char *buffer = thread_buffer(backward_bytes(&sh), &failed);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < b_size * h_size; task++)
            if (buffer != NULL)
                backward_head(qkv, weights + task * t_size * t_size, grad_out, grad_qkv, buffer,
                              task / h_size, task % h_size, &sh);
        free(buffer);
    }
    return failed;
#else
    (void)qkv, (void)weights, (void)grad_out, (void)grad_qkv, (void)b_size, (void)t_size;
    (void)h_size, (void)d_size;
    return 2;
#endif
}
