/* Causal self-attention over long sequences in float32 on the CPU's vector units, forward
   and backward, without ever forming the (T, T) weights (FlashAttention: Dao et al., 2022;
   its backward as in FlashAttention-2, Dao, 2023). The float32 counterpart of
   flash_attention.c, which runs bf16 on AMX tiles.

   For one head, with Q, K, V (T, D), s = 1 / sqrt(D) and M the causal mask:

     S = s Q K^T + M,   L = logsumexp(S) row by row,   P = exp(S - L),   O = P V
     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta = rowsum(dO * O)
     dQ = s dS K,   dK = s dS^T Q

   Forward: a block of FWD_ROWS queries at a time, over the keys it may see in chunks of
   FWD_KEYS, keeping each row's running maximum m and sum l (the online softmax): a chunk's
   weights are exp(S - m), and what came before is rescaled by exp(m_old - m_new). L = m +
   log(l) is kept for the backward pass, which recomputes P from it. Backward: a block of
   BWD_BLOCK keys at a time (dK, dV summed for it), over the blocks of as many queries that
   may see it; dQ is summed for the whole head.

   Every product is `product`: ROWS rows of a float32 result, WIDE columns, in registers,
   summed over k by fused multiply-adds of a broadcast element of the left operand and a row
   of the right. The left operand is read through two strides, so that P^T and dS^T are P
   and dS read by columns; the right operand's rows are contiguous, so a head's Q (scaled by
   s), K, V and dO are copied once as rows and K, V also as their transposes, in blocks of
   WIDE keys. The
   scale s rides in the copy of Q: S = (s Q) K^T and dK = dS^T (s Q); dQ is scaled as it is
   written.

   T is padded with zeros to whole blocks: padded keys are hidden by the causal mask from
   every real query, and padded queries have L = +inf (so P = 0) and dO = 0. Inputs are
   read through strides, (B, H, T, D) with D contiguous, so the heads of a fused projection
   are read where they are. The output is written (B, T, H, D), the layout the output
   projection reads, and the gradient (B, T, 3, H, D), the fused projection's.

   Each head is one task for the OpenMP threads, with its own buffers. The functions return
   0, or 1 if a thread's buffers could not be allocated. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define ROWS 8          /* result rows of a product block */
#define WIDE 32         /* result columns of a product block: D is a multiple of it */
#define FWD_ROWS 64     /* queries per block of the forward pass */
#define FWD_KEYS 256    /* keys per chunk of the forward pass */
#define BWD_BLOCK 64    /* keys per block, and queries per block, of the backward pass */
#define PAD 256         /* T is padded to a multiple of every block */
_Static_assert(PAD % FWD_ROWS == 0 && PAD % FWD_KEYS == 0 && PAD % BWD_BLOCK == 0, "blocks");

/* out[r][l] (rows ldo apart) = [out +] sum_{k < n} a[r a_row + k a_col] b[k ldb + l], for
   r < ROWS and l < WIDE. */
#if defined(__AVX512F__)
/* (The same in AVX-512 registers: sixteen accumulators, two rows of b per k.) */
static inline void product(float *out, int64_t ldo, int accumulate, const float *a,
                           int64_t a_row, int64_t a_col, const float *b, int64_t ldb,
                           int64_t n) {
    __m512 c[ROWS][2];
    for (int r = 0; r < ROWS; r++) {
        c[r][0] = accumulate ? _mm512_loadu_ps(out + r * ldo) : _mm512_setzero_ps();
        c[r][1] = accumulate ? _mm512_loadu_ps(out + r * ldo + 16) : _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < n; k++) {
        const __m512 b0 = _mm512_loadu_ps(b + k * ldb), b1 = _mm512_loadu_ps(b + k * ldb + 16);
        const float *ak = a + k * a_col;
        for (int r = 0; r < ROWS; r++) {
            const __m512 w = _mm512_set1_ps(ak[r * a_row]);
            c[r][0] = _mm512_fmadd_ps(w, b0, c[r][0]);
            c[r][1] = _mm512_fmadd_ps(w, b1, c[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(out + r * ldo, c[r][0]);
        _mm512_storeu_ps(out + r * ldo + 16, c[r][1]);
    }
}
#else
static inline void product(float *out, int64_t ldo, int accumulate, const float *a,
                           int64_t a_row, int64_t a_col, const float *b, int64_t ldb,
                           int64_t n) {
    float acc[ROWS][WIDE];
    for (int r = 0; r < ROWS; r++)
#pragma omp simd
        for (int l = 0; l < WIDE; l++)
            acc[r][l] = accumulate ? out[r * ldo + l] : 0.0f;
    for (int64_t k = 0; k < n; k++) {
        const float *bk = b + k * ldb, *ak = a + k * a_col;
        for (int r = 0; r < ROWS; r++) {
            const float w = ak[r * a_row];
#pragma omp simd
            for (int l = 0; l < WIDE; l++)
                acc[r][l] += w * bk[l];
        }
    }
    for (int r = 0; r < ROWS; r++)
        memcpy(out + r * ldo, acc[r], sizeof acc[r]);
}
#endif

struct heads {
    const float *q, *k, *v, *grad_out; /* (B, H, T, D) through strides */
    const int64_t *strides;            /* (b, h, t) for q, k, v, grad_out */
    int64_t b_size, t_size, h_size, d_size;
};

static const float *head_rows(const float *x, const int64_t *st, int64_t b, int64_t h) {
    return x + b * st[0] + h * st[1];
}

/* A head's rows src (row t at src + t st, D contiguous), times scale, into tp padded rows
   dst (tp, D). */
static void copy_rows(const float *src, int64_t st, int64_t t_size, int64_t tp, int64_t d_size,
                      float scale, float *dst) {
    for (int64_t t = 0; t < t_size; t++)
#pragma omp simd
        for (int64_t d = 0; d < d_size; d++)
            dst[t * d_size + d] = src[t * st + d] * scale;
    memset(dst + t_size * d_size, 0, (tp - t_size) * d_size * sizeof *dst);
}

/* The same rows' transpose in blocks of WIDE rows, dst (tp / WIDE, D, WIDE): a product's
   right operand for WIDE keys is then one contiguous (D, WIDE) block, where the rows of a
   whole (D, tp) transpose, 4 KiB apart at T = 1024, would contend for the same few sets of
   the core's cache. */
static void copy_transposed(const float *src, int64_t st, int64_t t_size, int64_t tp,
                            int64_t d_size, float *dst) {
    for (int64_t t0 = 0; t0 < tp; t0 += WIDE) {
        float *block = dst + t0 * d_size;
#if defined(__AVX512F__)
        /* sixteen rows' element d gathered at once (the offsets fit 32 bits: the bindings
           check 16 row strides do) */
        const __m512i rows = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32((int32_t)st));
        for (int64_t half = 0; half < WIDE; half += 16) {
            const __mmask16 real = first_lanes(t_size - t0 - half);
            const float *from = src + (t0 + half) * st;
            for (int64_t d = 0; d < d_size; d++)
                _mm512_storeu_ps(block + d * WIDE + half,
                                 _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, rows,
                                                          from + d, 4));
        }
#else
        for (int64_t d = 0; d < d_size; d++)
            for (int64_t t = 0; t < WIDE; t++)
                block[d * WIDE + t] = t0 + t < t_size ? src[(t0 + t) * st + d] : 0.0f;
#endif
    }
}

/* One row's chunk of n scores s (n a multiple of 16), of which the first `visible` are not
   masked: updates its running maximum *m and sum *l, rescales its output row o (D floats)
   by exp(m_old - m_new), and overwrites s with exp(s - m_new) (zeros where masked). */
static void online_softmax(float *s, int64_t n, int64_t visible, float *m, float *l, float *o,
                           int64_t d_size) {
    if (visible <= 0) { /* a chunk wholly after this query: it sees none of it */
        memset(s, 0, n * sizeof *s);
        return;
    }
    if (visible > n) visible = n;
#if defined(__AVX512F__)
    __m512 top16 = _mm512_set1_ps(*m);
    for (int64_t j = 0; j < visible; j += 16) {
        const __mmask16 seen = first_lanes(visible - j);
        top16 = _mm512_mask_max_ps(top16, seen, top16, _mm512_maskz_loadu_ps(seen, s + j));
    }
    const float top = _mm512_reduce_max_ps(top16);
    const __m512 shift = _mm512_set1_ps(top);
    __m512 sum16 = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 seen = first_lanes(visible - j);
        const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(seen, s + j), shift);
        const __m512 e = _mm512_maskz_mov_ps(seen, exp_neg16(x));
        sum16 = _mm512_add_ps(sum16, e);
        _mm512_storeu_ps(s + j, e);
    }
    const float sum = _mm512_reduce_add_ps(sum16);
#else
    float top = *m;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < visible; j++)
        top = s[j] > top ? s[j] : top;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < visible; j++) {
        s[j] = exp_neg(s[j] - top);
        sum += s[j];
    }
    memset(s + visible, 0, (n - visible) * sizeof *s);
#endif
    const float alpha = exp_neg(*m - top); /* 0 for the first chunk, where *m = -inf */
    *l = *l * alpha + sum;
    *m = top;
    if (alpha != 1.0f)
#pragma omp simd
        for (int64_t d = 0; d < d_size; d++)
            o[d] *= alpha;
}

/* Floats of one head's forward buffers: Q, V (tp, D), K^T (tp / WIDE, D, WIDE), a chunk of
   scores (FWD_ROWS, FWD_KEYS) and the block's output (FWD_ROWS, D). */
static size_t forward_work(int64_t tp, int64_t d_size) {
    return 3 * tp * d_size + FWD_ROWS * FWD_KEYS + FWD_ROWS * d_size;
}

/* One head's forward pass, in `work`. out (B, T, H, D), lse (B, H, T). */
static void forward_head(const struct heads *x, int64_t b, int64_t h, float *out, float *lse,
                         float *work) {
    const int64_t t_size = x->t_size, d_size = x->d_size, tp = round_up(t_size, PAD);
    const int64_t *st = x->strides;
    float *q = work, *v = q + tp * d_size, *kt = v + tp * d_size, *s = kt + tp * d_size;
    float *o = s + FWD_ROWS * FWD_KEYS;
    const float scale = 1.0f / sqrtf((float)d_size);
    copy_rows(head_rows(x->q, st, b, h), st[2], t_size, tp, d_size, scale, q);
    copy_rows(head_rows(x->v, st + 6, b, h), st[8], t_size, tp, d_size, 1.0f, v);
    copy_transposed(head_rows(x->k, st + 3, b, h), st[5], t_size, tp, d_size, kt);
    for (int64_t i0 = 0; i0 < t_size; i0 += FWD_ROWS) {
        float m[FWD_ROWS], l[FWD_ROWS];
        for (int r = 0; r < FWD_ROWS; r++) m[r] = -INFINITY, l[r] = 0.0f;
        memset(o, 0, FWD_ROWS * d_size * sizeof *o);
        const int64_t end = i0 + FWD_ROWS; /* the block's queries see keys < end <= tp */
        for (int64_t k0 = 0; k0 < end; k0 += FWD_KEYS) {
            const int64_t n = end - k0 < FWD_KEYS ? end - k0 : FWD_KEYS;
            for (int64_t r0 = 0; r0 < FWD_ROWS; r0 += ROWS) /* S = (s Q) K^T */
                for (int64_t j = 0; j < n && k0 + j <= i0 + r0 + ROWS - 1; j += WIDE)
                    product(s + r0 * FWD_KEYS + j, FWD_KEYS, 0, q + (i0 + r0) * d_size, d_size,
                            1, kt + (k0 + j) * d_size, WIDE, d_size);
            for (int r = 0; r < FWD_ROWS; r++) /* query i0 + r sees keys <= i0 + r */
                online_softmax(s + r * FWD_KEYS, n, i0 + r + 1 - k0, m + r, l + r,
                               o + r * d_size, d_size);
            for (int64_t r0 = 0; r0 < FWD_ROWS; r0 += ROWS) { /* O += P V */
                /* rows r0 .. r0 + ROWS - 1 see no key past i0 + r0 + ROWS - 1 */
                const int64_t seen = i0 + r0 + ROWS - k0;
                if (seen <= 0) continue;
                for (int64_t d = 0; d < d_size; d += WIDE)
                    product(o + r0 * d_size + d, d_size, 1, s + r0 * FWD_KEYS, FWD_KEYS, 1,
                            v + k0 * d_size + d, d_size, seen < n ? seen : n);
            }
        }
        const int64_t c = x->h_size * d_size;
        for (int r = 0; r < FWD_ROWS && i0 + r < t_size; r++) {
            const float inv = 1.0f / l[r];
            float *row = out + (b * t_size + i0 + r) * c + h * d_size;
#pragma omp simd
            for (int64_t d = 0; d < d_size; d++)
                row[d] = o[r * d_size + d] * inv;
            lse[(b * x->h_size + h) * t_size + i0 + r] = m[r] + logf(l[r]);
        }
    }
}

/* Floats of one head's backward buffers: s Q, K, dO, dQ (tp, D), K^T, V^T (tp / WIDE, D,
   WIDE), L and delta (tp), P and dS (BWD_BLOCK, BWD_BLOCK), dK and dV (BWD_BLOCK, D). */
static size_t backward_work(int64_t tp, int64_t d_size) {
    return 6 * tp * d_size + 2 * tp + 2 * BWD_BLOCK * BWD_BLOCK + 2 * BWD_BLOCK * d_size;
}

/* One head's backward pass, in `work`: grad (B, T, 3, H, D) from grad_out and the forward
   pass's out (B, T, H, D) and lse (B, H, T). */
static void backward_head(const struct heads *x, int64_t b, int64_t h, const float *out,
                          const float *lse, float *grad, float *work) {
    const int64_t t_size = x->t_size, d_size = x->d_size, tp = round_up(t_size, PAD);
    const int64_t *st = x->strides, c = x->h_size * d_size;
    const float scale = 1.0f / sqrtf((float)d_size);
    float *q = work, *k = q + tp * d_size, *go = k + tp * d_size, *dq = go + tp * d_size;
    float *kt = dq + tp * d_size, *vt = kt + tp * d_size, *big_l = vt + tp * d_size;
    float *delta = big_l + tp, *p = delta + tp, *ds = p + BWD_BLOCK * BWD_BLOCK;
    float *dk = ds + BWD_BLOCK * BWD_BLOCK, *dv = dk + BWD_BLOCK * d_size;
    copy_rows(head_rows(x->q, st, b, h), st[2], t_size, tp, d_size, scale, q);
    copy_rows(head_rows(x->k, st + 3, b, h), st[5], t_size, tp, d_size, 1.0f, k);
    copy_rows(head_rows(x->grad_out, st + 9, b, h), st[11], t_size, tp, d_size, 1.0f, go);
    copy_transposed(head_rows(x->k, st + 3, b, h), st[5], t_size, tp, d_size, kt);
    copy_transposed(head_rows(x->v, st + 6, b, h), st[8], t_size, tp, d_size, vt);
    memset(dq, 0, tp * d_size * sizeof *dq);
    for (int64_t i = 0; i < tp; i++) {
        float sum = 0.0f;
        if (i < t_size) {
            const float *o = out + (b * t_size + i) * c + h * d_size;
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < d_size; d++)
                sum += go[i * d_size + d] * o[d];
        }
        delta[i] = sum;
        big_l[i] = i < t_size ? lse[(b * x->h_size + h) * t_size + i] : INFINITY;
    }
    const int64_t nb = BWD_BLOCK;
    for (int64_t j0 = 0; j0 < t_size; j0 += nb) {
        memset(dk, 0, nb * d_size * sizeof *dk);
        memset(dv, 0, nb * d_size * sizeof *dv);
        for (int64_t i0 = j0; i0 < t_size; i0 += nb) {
            for (int64_t r0 = 0; r0 < nb; r0 += ROWS) /* S = (s Q) K^T, into p */
                for (int64_t j = 0; j < nb; j += WIDE)
                    product(p + r0 * nb + j, nb, 0, q + (i0 + r0) * d_size, d_size, 1,
                            kt + (j0 + j) * d_size, WIDE, d_size);
            for (int64_t r0 = 0; r0 < nb; r0 += ROWS) /* dP = dO V^T, into ds */
                for (int64_t j = 0; j < nb; j += WIDE)
                    product(ds + r0 * nb + j, nb, 0, go + (i0 + r0) * d_size, d_size, 1,
                            vt + (j0 + j) * d_size, WIDE, d_size);
            for (int64_t r = 0; r < nb; r++) { /* P = exp(S - L), dS = P (dP - delta) */
                const int64_t visible = i0 + r + 1 - j0; /* query i0 + r sees keys <= it */
                const float l_r = big_l[i0 + r], delta_r = delta[i0 + r];
                float *pr = p + r * nb, *dsr = ds + r * nb;
#if defined(__AVX512F__)
                const __m512 l16 = _mm512_set1_ps(l_r), delta16 = _mm512_set1_ps(delta_r);
                for (int64_t j = 0; j < nb; j += 16) {
                    const __m512 e = _mm512_maskz_mov_ps(
                        first_lanes(visible - j),
                        exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(pr + j), l16)));
                    _mm512_storeu_ps(pr + j, e);
                    const __m512 dp16 = _mm512_sub_ps(_mm512_loadu_ps(dsr + j), delta16);
                    _mm512_storeu_ps(dsr + j, _mm512_mul_ps(e, dp16));
                }
#else
#pragma omp simd
                for (int64_t j = 0; j < nb; j++) {
                    const float e = j < visible ? exp_neg(pr[j] - l_r) : 0.0f;
                    pr[j] = e;
                    dsr[j] = e * (dsr[j] - delta_r);
                }
#endif
            }
            for (int64_t r0 = 0; r0 < nb; r0 += ROWS)
                for (int64_t d = 0; d < d_size; d += WIDE) {
                    /* dV += P^T dO, dK += dS^T (s Q): keys r0.., summed over the queries */
                    product(dv + r0 * d_size + d, d_size, 1, p + r0, 1, nb,
                            go + i0 * d_size + d, d_size, nb);
                    product(dk + r0 * d_size + d, d_size, 1, ds + r0, 1, nb,
                            q + i0 * d_size + d, d_size, nb);
                    /* dQ += dS K (s applied as it is written) */
                    product(dq + (i0 + r0) * d_size + d, d_size, 1, ds + r0 * nb, nb, 1,
                            k + j0 * d_size + d, d_size, nb);
                }
        }
        for (int64_t j = j0; j < j0 + nb && j < t_size; j++) {
            float *g = grad + ((b * t_size + j) * 3 * x->h_size + h) * d_size;
            memcpy(g + c, dk + (j - j0) * d_size, d_size * sizeof *g);
            memcpy(g + 2 * c, dv + (j - j0) * d_size, d_size * sizeof *g);
        }
    }
    for (int64_t i = 0; i < t_size; i++) {
        float *g = grad + ((b * t_size + i) * 3 * x->h_size + h) * d_size;
#pragma omp simd
        for (int64_t d = 0; d < d_size; d++)
            g[d] = dq[i * d_size + d] * scale;
    }
}

/* Every head's forward pass (out, lse written) or backward pass (grad written, from
   out_in and lse), a head a task for the threads. */
static int run_heads(const struct heads *x, int backward, const float *out_in, float *out,
                     float *lse, float *grad) {
    const int64_t tp = round_up(x->t_size, PAD);
    const size_t floats = backward ? backward_work(tp, x->d_size) : forward_work(tp, x->d_size);
    const size_t bytes = round_up(floats * sizeof(float), 64);
    int failed = 0;
#pragma omp parallel
    {
        float *work = aligned_alloc(64, bytes);
        if (work == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < x->b_size * x->h_size; task++) {
            if (work == NULL) continue;
            const int64_t b = task / x->h_size, h = task % x->h_size;
            if (backward) backward_head(x, b, h, out_in, lse, grad, work);
            else forward_head(x, b, h, out, lse, work);
        }
        free(work);
    }
    return failed;
}

/* q, k, v (B, H, T, D) float32 through strides[0..9): (b, h, t) of each, D contiguous ->
   out (B, T, H, D) and lse (B, H, T). */
int tformer_flash_attention_f32(const float *q, const float *k, const float *v,
                                const int64_t *strides, float *out, float *lse, int64_t b_size,
                                int64_t t_size, int64_t h_size, int64_t d_size) {
    const struct heads x = {q, k, v, NULL, strides, b_size, t_size, h_size, d_size};
    return run_heads(&x, 0, NULL, out, lse, NULL);
}

/* The gradient of every head, grad (B, T, 3, H, D), from q, k, v and grad_out (B, H, T, D)
   through strides[0..12) and the forward pass's out and lse. */
int tformer_flash_attention_backward_f32(const float *q, const float *k, const float *v,
                                         const float *grad_out, const int64_t *strides,
                                         const float *out, const float *lse, float *grad,
                                         int64_t b_size, int64_t t_size, int64_t h_size,
                                         int64_t d_size) {
    const struct heads x = {q, k, v, grad_out, strides, b_size, t_size, h_size, d_size};
    return run_heads(&x, 1, out, NULL, (float *)lse, grad);
}
