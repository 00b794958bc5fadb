/* The causal softmax of a block of attention scores, and its gradient, in bfloat16.

   A block of n queries a, ..., a + n - 1 attends to keys 0, ..., e - 1 (e = a + n, no
   cache). Row r of the block's scores S (query a + r) may see the keys j <= a + r, so with
   m_r the largest of those scores,

     P_rj = exp(S_rj - m_r) / sum_{j' <= a + r} exp(S_rj' - m_r)   for j <= a + r, 0 beyond,

   and backwards, from the weights' gradient dP (the same rows),

     dS_rj = P_rj (dP_rj - sum_j' P_rj' dP_rj').

   S, P, dP and dS are bfloat16, rows of `cols` (= e) elements: batch x heads x n of them,
   the block's query r being row r mod n. The exponentials and the sums are taken in
   float32 and each result is rounded to bfloat16 once, as torch's bf16 softmax and its
   backward kernel do. Where torch fills the hidden scores in with -inf and then runs its
   softmax into a new tensor, and its backward kernel reads whole rows, these read each
   row's visible part once from memory and write it back in place (a row's float32 copy
   stays in the core's cache).

   The forward pass returns 0, or 1 if a thread's row buffer could not be allocated. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* How many keys row `row` of a block sees: first + (row mod n) + 1, at most cols. */
static inline int64_t seen_keys(int64_t row, int64_t n, int64_t first, int64_t cols) {
    const int64_t seen = first + row % n + 1;
    return seen < cols ? seen : cols;
}

#define BF16_NAN 0x7FC0 /* a quiet NaN */

/* A row with a NaN score, or with an infinite largest one (+inf, or no finite score): NaN
   over the keys it sees, zeros after. torch's softmax makes such a row NaN (the hidden
   keys too: P V is NaN either way), where the exponentials would read NaN here. */
static void nan_row(uint16_t *s, int64_t seen, int64_t cols) {
    for (int64_t j = 0; j < seen; j++)
        s[j] = BF16_NAN;
    memset(s + seen, 0, (size_t)(cols - seen) * sizeof(uint16_t));
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VECTOR_ROWS 1 /* the rows below in AVX-512, sixteen lanes at a time */

/* The lanes `m` of x rounded to bf16 (to nearest even, a NaN kept a NaN) at p. */
static inline void store_bf16x16(uint16_t *p, __m512 x, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}
#endif

/* One row in place: s (cols bf16) -> its softmax over the first `seen`, zeros after;
   e a buffer of `seen` floats rounded up to sixteen. */
static void softmax_row(uint16_t *s, int64_t seen, int64_t cols, float *e) {
#ifdef VECTOR_ROWS
    __m512 largest = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t j = 0; j < seen; j += 16) {
        const __mmask16 in = first_lanes(seen - j);
        const __m512 x = load_bf16x16(s + j, in);
        _mm512_storeu_ps(e + j, x);
        largest = _mm512_mask_max_ps(largest, in, largest, x);
        nan |= _mm512_mask_cmp_ps_mask(in, x, x, _CMP_UNORD_Q);
    }
    const float top = _mm512_reduce_max_ps(largest);
    if (nan || isinf(top)) {
        nan_row(s, seen, cols);
        return;
    }
    const __m512 m = _mm512_set1_ps(top);
    __m512 sums = _mm512_setzero_ps();
    for (int64_t j = 0; j < seen; j += 16) {
        const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(e + j), m);
        const __m512 y = _mm512_maskz_mov_ps(first_lanes(seen - j), exp_neg16(x));
        _mm512_storeu_ps(e + j, y);
        sums = _mm512_add_ps(sums, y);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sums));
    for (int64_t j = 0; j < seen; j += 16)
        store_bf16x16(s + j, _mm512_mul_ps(_mm512_loadu_ps(e + j), inv), first_lanes(seen - j));
#else
    float m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < seen; j++) {
        e[j] = bf16_bits_to_float(s[j]);
        m = e[j] > m ? e[j] : m;
        nan |= e[j] != e[j];
    }
    if (nan || isinf(m)) {
        nan_row(s, seen, cols);
        return;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < seen; j++) {
        e[j] = exp_neg(e[j] - m);
        sum += e[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < seen; j++)
        s[j] = float_to_bf16_keeping_nan(e[j] * inv);
#endif
    memset(s + seen, 0, (size_t)(cols - seen) * sizeof(uint16_t));
}

/* One row's gradient in place: g holds dP (cols bf16) -> dS, from the row's weights p. */
static void softmax_backward_row(const uint16_t *p, uint16_t *g, int64_t seen, int64_t cols) {
#ifdef VECTOR_ROWS
    __m512 dots = _mm512_setzero_ps();
    for (int64_t j = 0; j < seen; j += 16) {
        const __mmask16 in = first_lanes(seen - j);
        dots = _mm512_fmadd_ps(load_bf16x16(p + j, in), load_bf16x16(g + j, in), dots);
    }
    const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(dots));
    for (int64_t j = 0; j < seen; j += 16) {
        const __mmask16 in = first_lanes(seen - j);
        const __m512 d = _mm512_sub_ps(load_bf16x16(g + j, in), dot);
        store_bf16x16(g + j, _mm512_mul_ps(load_bf16x16(p + j, in), d), in);
    }
#else
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < seen; j++)
        dot += bf16_bits_to_float(p[j]) * bf16_bits_to_float(g[j]);
#pragma omp simd
    for (int64_t j = 0; j < seen; j++)
        g[j] = float_to_bf16_keeping_nan(bf16_bits_to_float(p[j]) *
                                         (bf16_bits_to_float(g[j]) - dot));
#endif
    memset(g + seen, 0, (size_t)(cols - seen) * sizeof(uint16_t)); /* P is 0 there */
}

/* scores (rows, cols) bf16, rows = batch x n, in place -> the block's weights P. */
int tformer_causal_softmax_bf16(uint16_t *scores, int64_t rows, int64_t n, int64_t cols,
                                int64_t first) {
    int failed = 0;
#pragma omp parallel
    {
        float *e = malloc((size_t)(cols + 15) / 16 * 16 * sizeof(float));
        if (e == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        int64_t begin, end;
        my_share(rows, &begin, &end);
        for (int64_t row = begin; row < end && e != NULL; row++)
            softmax_row(scores + row * cols, seen_keys(row, n, first, cols), cols, e);
        free(e);
    }
    return failed;
}

/* weights P and grad (rows, cols) bf16: grad holds dP, in place -> dS. */
void tformer_causal_softmax_backward_bf16(const uint16_t *weights, uint16_t *grad, int64_t rows,
                                          int64_t n, int64_t cols, int64_t first) {
#pragma omp parallel
    {
        int64_t begin, end;
        my_share(rows, &begin, &end);
        for (int64_t row = begin; row < end; row++)
            softmax_backward_row(weights + row * cols, grad + row * cols,
                                 seen_keys(row, n, first, cols), cols);
    }
}
