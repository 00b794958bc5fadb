/* Causal self-attention over long sequences on the CPU's matrix units (AMX), forward and
   backward, without ever forming the (T, T) weights (FlashAttention: Dao et al., 2022;
   its backward as in FlashAttention-2, Dao, 2023).

   For one head, with Q, K, V (T, D), s = 1 / sqrt(D) and M the causal mask:

     S = s Q K^T + M,   L = logsumexp(S) row by row,   P = exp(S - L),   O = P V
     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta = rowsum(dO * O)
     dQ = s dS K,   dK = s dS^T Q

   Forward: a block of FWD_ROWS queries at a time, over the keys it may see in chunks of
   FWD_KEYS, keeping each row's running maximum m and sum l (the online softmax): a chunk's
   weights are exp(S - m), and what came before is rescaled by exp(m_old - m_new). L = m +
   log(l) is kept for the backward pass, which recomputes P from it. Backward: a block of
   BWD_KEYS keys at a time, over the query blocks that may see it, with everything laid out
   keys by queries (S^T, P^T, dS^T): then dV and dK are products of what is at hand, and
   dQ^T = K^T dS^T, summed for the whole head.

   Every product is tile_product: a 32 x 32 float32 block of four 16 x 16 tiles, summed in
   AMX's bf16 dot products (TDPBF16PS: float32 sums of bf16 products) over chunks of 32 along
   k. The right operand of TDPBF16PS comes in pairs: B[k / 2][2 n + k % 2] = B(k, n), so a
   head's Q, K, V and dO are copied once into the layouts their products read:

     rows      X (T, D) as it is, row by row (a left operand, k along D)
     columns   X^T as a right operand, k along D, 16 rows of X to a block:
               [t / 16][d / 2][2 (t % 16) + d % 2]
     pairs     X as a right operand, k along T: [t / 2][2 d + t % 2]
     blocks    X^T as a left operand, k along T, 32 rows of X to a block: [t / 32][d][t % 32]

   T is padded with zeros to a whole number of blocks: padded keys are hidden by the causal
   mask from every real query, and padded queries have L far above every score (so P = 0)
   and dO = 0.
   Inputs are read through strides, (B, H, T, D) with D contiguous, so the heads of a fused
   projection are read where they are. The output is written (B, T, H, D), the layout the
   output projection reads, and the gradient (B, T, 3, H, D), the fused projection's.

   Each head is one task for the OpenMP threads, with its own buffers; each thread loads
   the tile configuration before its first tile. The functions return 0; 1 if a thread's
   buffers could not be allocated; 2 if this CPU (or this build) has no AMX. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FWD_ROWS 32     /* queries per block of the forward pass */
#define FWD_KEYS 256    /* keys per chunk of the forward pass */
#define BWD_KEYS 64     /* keys per block of the backward pass */
#define BWD_QUERIES 64  /* queries per block of the backward pass: the same, so that a */
                        /* block of queries is either past a block of keys or on its diagonal */
#define LOG2E 1.44269504088896341f
#define PAD 64          /* T is padded to a multiple of the blocks; a forward chunk of */
                        /* keys stops at its block's last query, inside the padding */
_Static_assert(BWD_KEYS == BWD_QUERIES, "the backward pass's diagonal blocks are square");
_Static_assert(PAD % BWD_KEYS == 0 && PAD % FWD_ROWS == 0, "whole blocks");
#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux: ask for an extended state component */
#define XFEATURE_XTILEDATA 18      /* the AMX tiles' state */

/* Linux gives a process the tiles' state only when asked; 1 if granted. */
static int tiles_permitted(void) {
    static int permitted = -1;
    if (permitted < 0)
        permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return permitted;
}

/* Eight tiles of 16 rows x 64 bytes: C in tiles 0-3, A in 4-5, B in 6-7. */
static void configure_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t bytes_per_row[16];
        uint8_t rows[16];
    } __attribute__((aligned(64))) config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

/* c (32 x 32 floats, rows ldc apart) = [c +] a b, summed over `chunks` chunks of 32 along k.
   a: 32 rows lda bf16 apart, chunk kc at a + kc a_step. b: pairs, chunk kc's columns 0-15 at
   b + kc b_step and 16-31 at b_half further, rows ldb bf16 apart. */
static inline void tile_product(float *c, int64_t ldc, int accumulate, const uint16_t *a,
                                int64_t lda, int64_t a_step, const uint16_t *b, int64_t ldb,
                                int64_t b_step, int64_t b_half, int64_t chunks) {
    if (accumulate) {
        _tile_loadd(0, c, ldc * 4);
        _tile_loadd(1, c + 16, ldc * 4);
        _tile_loadd(2, c + 16 * ldc, ldc * 4);
        _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t kc = 0; kc < chunks; kc++) {
        const uint16_t *ak = a + kc * a_step, *bk = b + kc * b_step;
        _tile_loadd(4, ak, lda * 2);
        _tile_loadd(5, ak + 16 * lda, lda * 2);
        _tile_loadd(6, bk, ldb * 2);
        _tile_loadd(7, bk + b_half, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

/* 2^x lane by lane for finite x <= 0 (a little above is fine): 2^x = 2^k 2^f, k the
   nearest integer, |f| <= 1/2, 2^f = e^(f ln 2) by its series to f^5, a relative error
   below 3e-6: far inside the bf16 rounding every weight meets before it is used. The
   softmax's exponents come in base 2 (log2(e) rides in the scale, the maximum and L), which
   saves a change of base per lane. Lanes far below float32's range come out 0 or, where
   denormals are not flushed, denormal. */
static inline __m512 exp2_16(__m512 x) {
    const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, k);
    __m512 p = _mm512_set1_ps(1.3333558146428443e-3f); /* ln(2)^5 / 120 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f)); /* ln(2)^4 / 24 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f)); /* ln(2)^3 / 6 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022650695910071f));  /* ln(2)^2 / 2 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718055994531f));  /* ln(2) */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

static inline void store_bf16(uint16_t *dst, __m512 x) {
    _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(x));
}

/* Two rows of 16 floats, even and odd, as 16 bf16 pairs: [e0, o0, e1, o1, ...]. */
static inline void store_pairs(uint16_t *dst, __m512 even, __m512 odd) {
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25,
                                           9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2,
                                           17, 1, 16, 0);
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even); /* even low, odd high */
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(order, both));
}

/* l st for the 16 lanes l: where 16 rows, st bf16 apart, start. */
static inline __m512i row_offsets(int64_t st) {
    return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                               2, 1, 0),
                              _mm512_set1_epi32((int32_t)st));
}

/* The layouts of the header, from a head's rows src (row t at src + t st, D contiguous)
   into tp padded rows. */
static void copy_rows(const uint16_t *src, int64_t st, int64_t t_size, int64_t tp,
                      int64_t d_size, uint16_t *dst) {
    for (int64_t t = 0; t < t_size; t++)
        memcpy(dst + t * d_size, src + t * st, d_size * sizeof *dst);
    memset(dst + t_size * d_size, 0, (tp - t_size) * d_size * sizeof *dst);
}

static void copy_columns(const uint16_t *src, int64_t st, int64_t t_size, int64_t tp,
                         int64_t d_size, uint16_t *dst) {
    /* A pair (d, d + 1) of one row is one 32-bit word: 16 rows' words are gathered into
       16 consecutive ones. */
    const __m512i rows = row_offsets(st);
    for (int64_t t0 = 0; t0 < tp; t0 += 16) {
        const __mmask16 real = first_lanes(t_size - t0);
        uint16_t *block = dst + t0 * d_size;
        for (int64_t d = 0; d < d_size; d += 2)
            _mm512_storeu_si512(block + 16 * d,
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, rows,
                                                            src + t0 * st + d, 2));
    }
}

static void copy_pairs(const uint16_t *src, int64_t st, int64_t t_size, int64_t tp,
                       int64_t d_size, uint16_t *dst) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                         40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                         1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int64_t t = 0; t < tp; t += 2) {
        uint16_t *row = dst + t * d_size; /* row t / 2 of 2D */
        for (int64_t d = 0; d < d_size; d += 32) {
            const __m512i even = t < t_size ? _mm512_loadu_si512(src + t * st + d)
                                            : _mm512_setzero_si512();
            const __m512i odd = t + 1 < t_size ? _mm512_loadu_si512(src + (t + 1) * st + d)
                                               : _mm512_setzero_si512();
            _mm512_storeu_si512(row + 2 * d, _mm512_permutex2var_epi16(even, low, odd));
            _mm512_storeu_si512(row + 2 * d + 32, _mm512_permutex2var_epi16(even, high, odd));
        }
    }
}

static void copy_blocks(const uint16_t *src, int64_t st, int64_t t_size, int64_t tp,
                        int64_t d_size, uint16_t *dst) {
    /* 16 rows' pairs (d, d + 1) gathered as words, twice (rows 0-15, 16-31), then split
       into d's 32 values and d + 1's. */
    const __m512i rows = row_offsets(st);
    const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38,
                                          36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12,
                                          10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t t0 = 0; t0 < tp; t0 += 32) {
        const __mmask16 low_real = first_lanes(t_size - t0);
        const __mmask16 high_real = first_lanes(t_size - t0 - 16);
        uint16_t *block = dst + t0 * d_size;
        for (int64_t d = 0; d < d_size; d += 2) {
            const __m512i low = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), low_real,
                                                            rows, src + t0 * st + d, 2);
            const __m512i high = _mm512_mask_i32gather_epi32(
                _mm512_setzero_si512(), high_real, rows, src + (t0 + 16) * st + d, 2);
            _mm512_storeu_si512(block + 32 * d, _mm512_permutex2var_epi16(low, even, high));
            _mm512_storeu_si512(block + 32 * (d + 1), _mm512_permutex2var_epi16(low, odd, high));
        }
    }
}

/* 16 bf16 as floats. */
static inline __m512 load_bf16(const uint16_t *src) {
    const __m256i bits = _mm256_loadu_si256((const __m256i *)src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* One row's chunk of n scores s (unscaled), of which the first `visible` (>= 1) are not
   masked: updates its running maximum *m and sum *l, rescales its output row o (D floats)
   by exp(m_old - m_new), and writes exp(scale s - m_new) in bf16 to p (zeros where
   masked). Vectors wholly seen (every chunk but the diagonal's last) skip the masks, and
   the maximum is taken unscaled (scale > 0), the scale riding in one fused multiply-add. */
static inline void online_softmax(const float *s, int64_t n, int64_t visible, float scale,
                                  float *m, float *l, uint16_t *p, float *o, int64_t d_size) {
    const int64_t whole = visible >= n ? n : visible / 16 * 16; /* lanes all seen below */
    __m512 top = _mm512_set1_ps(-INFINITY), top2 = top, top3 = top, top4 = top;
    int64_t j = 0;
    for (; j + 64 <= whole; j += 64) { /* four maxima apart: no wait on the one before */
        top = _mm512_max_ps(top, _mm512_loadu_ps(s + j));
        top2 = _mm512_max_ps(top2, _mm512_loadu_ps(s + j + 16));
        top3 = _mm512_max_ps(top3, _mm512_loadu_ps(s + j + 32));
        top4 = _mm512_max_ps(top4, _mm512_loadu_ps(s + j + 48));
    }
    top = _mm512_max_ps(_mm512_max_ps(top, top2), _mm512_max_ps(top3, top4));
    for (; j < whole; j += 16)
        top = _mm512_max_ps(top, _mm512_loadu_ps(s + j));
    for (; j < n; j += 16)
        top = _mm512_mask_max_ps(top, first_lanes(visible - j), top, _mm512_loadu_ps(s + j));
    const float m_new = fmaxf(*m, scale * _mm512_reduce_max_ps(top));
    const float alpha = expf(*m - m_new); /* 0 for the first chunk, where *m = -inf */
    /* exp(scale s - m_new) = 2^(s log2(e) scale - log2(e) m_new) */
    const __m512 scale16 = _mm512_set1_ps(scale * LOG2E), shift = _mm512_set1_ps(m_new * LOG2E);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j < whole; j += 16) {
        const __m512 e = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale16, shift));
        sum = _mm512_add_ps(sum, e);
        store_bf16(p + j, e);
    }
    for (; j < n; j += 16) {
        const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale16, shift);
        const __m512 e = _mm512_maskz_mov_ps(first_lanes(visible - j), exp2_16(x));
        sum = _mm512_add_ps(sum, e);
        store_bf16(p + j, e);
    }
    const int first = *m == -INFINITY; /* o holds nothing yet: the product overwrites it */
    *l = *l * alpha + _mm512_reduce_add_ps(sum);
    *m = m_new;
    if (alpha != 1.0f && !first) {
        const __m512 a = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < d_size; d += 16)
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), a));
    }
}

struct heads {
    const uint16_t *q, *k, *v, *grad_out; /* (B, H, T, D) through strides */
    const int64_t *strides;               /* (b, h, t) for q, k, v, grad_out */
    int64_t b_size, t_size, h_size, d_size;
};

static const uint16_t *head_rows(const uint16_t *x, const int64_t *st, int64_t b, int64_t h) {
    return x + b * st[0] + h * st[1];
}

/* One head's forward pass, in `work` (forward_work's bytes). out (B, T, H, D) bf16, lse
   (B, H, T) float32. */
static void forward_head(const struct heads *x, int64_t b, int64_t h, uint16_t *out,
                         float *lse, void *work) {
    const int64_t t_size = x->t_size, d_size = x->d_size, tp = round_up(t_size, PAD);
    const int64_t *st = x->strides;
    const float scale = 1.0f / sqrtf((float)d_size);
    uint16_t *q = work, *k = q + tp * d_size, *v = k + tp * d_size;
    float *s = (float *)(v + tp * d_size), *o = s + FWD_ROWS * FWD_KEYS;
    uint16_t *p = (uint16_t *)(o + FWD_ROWS * d_size);
    copy_rows(head_rows(x->q, st, b, h), st[2], t_size, tp, d_size, q);
    copy_columns(head_rows(x->k, st + 3, b, h), st[5], t_size, tp, d_size, k);
    copy_pairs(head_rows(x->v, st + 6, b, h), st[8], t_size, tp, d_size, v);
    for (int64_t i0 = 0; i0 < t_size; i0 += FWD_ROWS) {
        float m[FWD_ROWS], l[FWD_ROWS];
        for (int r = 0; r < FWD_ROWS; r++) m[r] = -INFINITY, l[r] = 0.0f;
        /* the block's queries see keys < end <= tp; a chunk stops there */
        const int64_t end = i0 + FWD_ROWS;
        for (int64_t k0 = 0; k0 < end; k0 += FWD_KEYS) {
            const int64_t n = end - k0 < FWD_KEYS ? end - k0 : FWD_KEYS;
            for (int64_t j = 0; j < n; j += 32) /* S = Q K^T (unscaled), 32 keys a time */
                tile_product(s + j, FWD_KEYS, 0, q + i0 * d_size, d_size, 32,
                             k + (k0 + j) * d_size, 32, 16 * 32, 16 * d_size, d_size / 32);
            for (int r = 0; r < FWD_ROWS; r++) /* query i0 + r sees keys <= i0 + r */
                online_softmax(s + r * FWD_KEYS, n, i0 + r + 1 - k0, scale, m + r, l + r,
                               p + r * FWD_KEYS, o + r * d_size, d_size);
            for (int64_t d = 0; d < d_size; d += 32) /* O = P V, then O += P V */
                tile_product(o + d, d_size, k0 > 0, p, FWD_KEYS, 32, v + k0 * d_size + 2 * d,
                             2 * d_size, 32 * d_size, 32, n / 32);
        }
        const int64_t c = x->h_size * d_size;
        for (int r = 0; r < FWD_ROWS && i0 + r < t_size; r++) {
            const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
            uint16_t *row = out + (b * t_size + i0 + r) * c + h * d_size;
            for (int64_t d = 0; d < d_size; d += 16)
                store_bf16(row + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * d_size + d), inv));
            lse[(b * x->h_size + h) * t_size + i0 + r] = m[r] + logf(l[r]);
        }
    }
}

static size_t forward_work(int64_t tp, int64_t d_size) {
    return 3 * tp * d_size * 2 + FWD_ROWS * (FWD_KEYS + d_size) * 4 + FWD_ROWS * FWD_KEYS * 2;
}

/* The lanes j of a diagonal block's row r that a query may see: query j sees key r when
   j >= r; lanes c0 .. c0 + 15. */
static inline __mmask16 at_or_after(int64_t r, int64_t c0) {
    const int64_t first = r - c0; /* the first lane that sees key r */
    return first <= 0 ? 0xFFFF : first >= 16 ? 0 : (__mmask16)(0xFFFFu << first);
}

/* One head's backward pass in `work` (backward_work's bytes). out (B, T, H, D) bf16 and
   lse (B, H, T) from the forward pass; grad (B, T, 3, H, D) bf16. */
static void backward_head(const struct heads *x, int64_t b, int64_t h, const uint16_t *out,
                          const float *lse, uint16_t *grad, void *work) {
    const int64_t t_size = x->t_size, d_size = x->d_size, h_size = x->h_size;
    const int64_t tp = round_up(t_size, PAD), c = h_size * d_size, *st = x->strides;
    const float scale = 1.0f / sqrtf((float)d_size);
    const int64_t n = tp * d_size;
    uint16_t *k_rows = work, *v_rows = k_rows + n, *q_columns = v_rows + n;
    uint16_t *go_columns = q_columns + n, *go_pairs = go_columns + n, *q_pairs = go_pairs + n;
    uint16_t *k_blocks = q_pairs + n, *pt = k_blocks + n, *dst = pt + BWD_KEYS * BWD_QUERIES;
    uint16_t *ds_pairs = dst + BWD_KEYS * BWD_QUERIES;
    float *dqt = (float *)(ds_pairs + BWD_KEYS * BWD_QUERIES), *l = dqt + n, *delta = l + tp;
    float *s = delta + tp, *dp = s + BWD_KEYS * BWD_QUERIES, *dk = dp + BWD_KEYS * BWD_QUERIES;
    float *dv = dk + BWD_KEYS * d_size;
    const uint16_t *q = head_rows(x->q, st, b, h), *k = head_rows(x->k, st + 3, b, h);
    const uint16_t *v = head_rows(x->v, st + 6, b, h), *go = head_rows(x->grad_out, st + 9, b, h);
    copy_rows(k, st[5], t_size, tp, d_size, k_rows);
    copy_rows(v, st[8], t_size, tp, d_size, v_rows);
    copy_columns(q, st[2], t_size, tp, d_size, q_columns);
    copy_columns(go, st[11], t_size, tp, d_size, go_columns);
    copy_pairs(go, st[11], t_size, tp, d_size, go_pairs);
    copy_pairs(q, st[2], t_size, tp, d_size, q_pairs);
    copy_blocks(k, st[5], t_size, tp, d_size, k_blocks);
    for (int64_t i = 0; i < tp; i++) {
        float sum = 0.0f;
        if (i < t_size) {
            const uint16_t *oi = out + (b * t_size + i) * c + h * d_size, *gi = go + i * st[11];
            __m512 products = _mm512_setzero_ps();
            for (int64_t d = 0; d < d_size; d += 16)
                products = _mm512_fmadd_ps(load_bf16(oi + d), load_bf16(gi + d), products);
            sum = _mm512_reduce_add_ps(products);
        }
        delta[i] = sum;
        /* L in base 2 (P = 2^(S s log2(e) - L log2(e))); padded queries far below every
           score, so that P = 0 (a finite value: exp2_16 takes no infinities) */
        l[i] = i < t_size ? lse[(b * h_size + h) * t_size + i] * LOG2E : 1e30f;
    }
    const __m512 scale16 = _mm512_set1_ps(scale), scale2 = _mm512_set1_ps(scale * LOG2E);
    for (int64_t j0 = 0; j0 < t_size; j0 += BWD_KEYS) {
        for (int64_t i0 = j0; i0 < t_size; i0 += BWD_QUERIES) {
            /* S^T = K Q^T and dP^T = V dO^T, keys by queries, 32 x 32 at a time */
            for (int64_t r = 0; r < BWD_KEYS; r += 32)
                for (int64_t j = 0; j < BWD_QUERIES; j += 32) {
                    tile_product(s + r * BWD_QUERIES + j, BWD_QUERIES, 0,
                                 k_rows + (j0 + r) * d_size, d_size, 32,
                                 q_columns + (i0 + j) * d_size, 32, 16 * 32, 16 * d_size,
                                 d_size / 32);
                    tile_product(dp + r * BWD_QUERIES + j, BWD_QUERIES, 0,
                                 v_rows + (j0 + r) * d_size, d_size, 32,
                                 go_columns + (i0 + j) * d_size, 32, 16 * 32, 16 * d_size,
                                 d_size / 32);
                }
            /* P^T = exp(s S^T - L) (in base 2), dS^T = P^T * (dP^T - delta): a row is a key,
               a lane a query; on the diagonal block a key is hidden from the queries before
               it */
            const int diagonal = i0 == j0;
            for (int64_t r = 0; r < BWD_KEYS; r += 2) {
                for (int64_t j = 0; j < BWD_QUERIES; j += 16) {
                    __m512 ds2[2];
                    for (int64_t e = 0; e < 2; e++) {
                        const int64_t at = (r + e) * BWD_QUERIES + j;
                        __m512 x16 = _mm512_fmsub_ps(_mm512_loadu_ps(s + at), scale2,
                                                     _mm512_loadu_ps(l + i0 + j));
                        __m512 p16 = exp2_16(x16);
                        if (diagonal) p16 = _mm512_maskz_mov_ps(at_or_after(r + e, j), p16);
                        __m512 d16 = _mm512_sub_ps(_mm512_loadu_ps(dp + at),
                                                   _mm512_loadu_ps(delta + i0 + j));
                        ds2[e] = _mm512_mul_ps(p16, d16);
                        store_bf16(pt + at, p16);
                        store_bf16(dst + at, ds2[e]);
                    }
                    /* dS^T as pairs of keys for dQ^T: 16 queries a block */
                    store_pairs(ds_pairs + (j / 16) * (BWD_KEYS / 2) * 32 + (r / 2) * 32,
                                ds2[0], ds2[1]);
                }
            }
            for (int64_t r = 0; r < BWD_KEYS; r += 32) /* dV += P^T dO, dK += dS^T Q */
                for (int64_t d = 0; d < d_size; d += 32) {
                    tile_product(dv + r * d_size + d, d_size, i0 > j0, pt + r * BWD_QUERIES,
                                 BWD_QUERIES, 32, go_pairs + i0 * d_size + 2 * d, 2 * d_size,
                                 32 * d_size, 32, BWD_QUERIES / 32);
                    tile_product(dk + r * d_size + d, d_size, i0 > j0, dst + r * BWD_QUERIES,
                                 BWD_QUERIES, 32, q_pairs + i0 * d_size + 2 * d, 2 * d_size,
                                 32 * d_size, 32, BWD_QUERIES / 32);
                }
            for (int64_t d = 0; d < d_size; d += 32) /* dQ^T += K^T dS^T */
                for (int64_t j = 0; j < BWD_QUERIES; j += 32)
                    tile_product(dqt + (i0 + j) * d_size + d * 32, 32, j0 > 0,
                                 k_blocks + j0 * d_size + d * 32, 32, 32 * d_size,
                                 ds_pairs + (j / 16) * (BWD_KEYS / 2) * 32, 32, 16 * 32,
                                 (BWD_KEYS / 2) * 32, BWD_KEYS / 32);
        }
        for (int64_t r = 0; r < BWD_KEYS && j0 + r < t_size; r++) {
            uint16_t *row = grad + ((b * t_size + j0 + r) * 3) * c + h * d_size;
            for (int64_t d = 0; d < d_size; d += 16) {
                store_bf16(row + c + d, _mm512_mul_ps(_mm512_loadu_ps(dk + r * d_size + d), scale16));
                store_bf16(row + 2 * c + d, _mm512_loadu_ps(dv + r * d_size + d));
            }
        }
    }
    const __m512i columns = row_offsets(32); /* 16 d's places in a block of dQ^T */
    for (int64_t i = 0; i < t_size; i++) { /* dQ = s (dQ^T)^T */
        uint16_t *row = grad + (b * t_size + i) * 3 * c + h * d_size;
        const float *block = dqt + (i / 32) * 32 * d_size + i % 32;
        for (int64_t d = 0; d < d_size; d += 16)
            store_bf16(row + d, _mm512_mul_ps(_mm512_i32gather_ps(columns, block + d * 32, 4),
                                              scale16));
    }
}

static size_t backward_work(int64_t tp, int64_t d_size) {
    const size_t block = BWD_KEYS * BWD_QUERIES;
    return 7 * tp * d_size * 2 + 3 * block * 2 + tp * d_size * 4 + 2 * tp * 4 + 2 * block * 4 +
           2 * BWD_KEYS * d_size * 4;
}

int tformer_flash_attention_available(void) { return tiles_permitted(); }

/* Every head's forward pass (out, lse written) or backward pass (grad written, from
   out_in and lse), a head a task for the threads. */
static int run_heads(const struct heads *x, int backward, const uint16_t *out_in, uint16_t *out,
                     float *lse, uint16_t *grad) {
    if (!tiles_permitted()) return 2;
    const int64_t tp = round_up(x->t_size, PAD);
    const size_t bytes = round_up(backward ? backward_work(tp, x->d_size)
                                           : forward_work(tp, x->d_size), 64);
    int failed = 0;
#pragma omp parallel
    {
        void *work = aligned_alloc(64, bytes);
        if (work == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        configure_tiles();
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < x->b_size * x->h_size; task++) {
            if (work == NULL) continue;
            const int64_t b = task / x->h_size, h = task % x->h_size;
            if (backward) backward_head(x, b, h, out_in, lse, grad, work);
            else forward_head(x, b, h, out, lse, work);
        }
        _tile_release();
        free(work);
    }
    return failed;
}
#else
int tformer_flash_attention_available(void) { return 0; }
#endif

/* q, k, v (B, H, T, D) bf16 through strides[0..9): (b, h, t) of each, D contiguous ->
   out (B, T, H, D) bf16 and lse (B, H, T) float32. */
int tformer_flash_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                 const int64_t *strides, uint16_t *out, float *lse,
                                 int64_t b_size, int64_t t_size, int64_t h_size,
                                 int64_t d_size) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    const struct heads x = {q, k, v, NULL, strides, b_size, t_size, h_size, d_size};
    return run_heads(&x, 0, NULL, out, lse, NULL);
#else
    (void)q, (void)k, (void)v, (void)strides, (void)out, (void)lse;
    (void)b_size, (void)t_size, (void)h_size, (void)d_size;
    return 2;
#endif
}

/* The gradient of every head, grad (B, T, 3, H, D) bf16, from q, k, v and grad_out (B, H,
   T, D) through strides[0..12) and the forward pass's out and lse. */
int tformer_flash_attention_backward_bf16(const uint16_t *q, const uint16_t *k,
                                          const uint16_t *v, const uint16_t *grad_out,
                                          const int64_t *strides, const uint16_t *out,
                                          const float *lse, uint16_t *grad, int64_t b_size,
                                          int64_t t_size, int64_t h_size, int64_t d_size) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    const struct heads x = {q, k, v, grad_out, strides, b_size, t_size, h_size, d_size};
    return run_heads(&x, 1, out, NULL, (float *)lse, grad);
#else
    (void)q, (void)k, (void)v, (void)grad_out, (void)strides, (void)out, (void)lse;
    (void)grad, (void)b_size, (void)t_size, (void)h_size, (void)d_size;
    return 2;
#endif
}
