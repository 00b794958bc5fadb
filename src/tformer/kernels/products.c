/* Matrix products of bf16 values for a small model's training step on the CPU, each thread
   keeping to its own rows. With A (M, K) bf16,

     C = A B + bias     C (M, N) bf16: a layer's output, B = W^T for its weight W (N, K) as
                        stored (x W^T + b), or its input's gradient, B = W (dy W)
     dW = dY^T X        dW (N, K) float32: a layer's weight gradient, from dY (M, N) and the
                        layer's input X (M, K)

   Every product of two bf16 values is summed in float32 (AVX-512 BF16's vdpbf16ps, as in
   attention_pairs.c); C is rounded to bf16 once, the bias added before; dW is not rounded.

   The point is where the rows live. The step's other kernels (LayerNorm, GELU, attention,
   the casts) give each thread a contiguous share of the rows (common.h's my_share), so the
   next kernel finds its rows in its own core's cache. oneDNN splits a product's work
   otherwise, and the kernel after it reads half its rows from the other core (docs/LOG.md).
   Here A's and C's rows are split as the kernels split them; B, a layer's weight, is small
   and every thread reads all of it. dW sums over the rows: each thread sums its own into
   float32 partial sums, and the threads' sums are added in thread order at the end (its
   last bits depend on the thread count, as LayerNorm's dgamma's do).

   vdpbf16ps multiplies sixteen pairs of bf16 values and adds both products of each pair into
   a float32 lane. A's pair (two consecutive k of a row) is one 32-bit value broadcast to
   every lane; B's pairs for sixteen columns are one vector, so B is first laid out in panels
   of sixteen columns, pair p of the panel's column i at word 16 p + i (`pack_transposed`
   from W (N, K), `pack_rows` from W (K, N)), the threads laying out a share of the panels
   each. For dW, each thread lays out its own rows: A = dY^T with rows 2p and 2p + 1 of dY
   interleaved (`pair_rows`: pair p of column j at word p N + j), B = X in panels. Where K
   (or a thread's rows, for dW) is odd, the last pair's second value is 0.

   The tile: six rows by four panels (64 columns), 24 float32 vectors of sums, as many as the
   registers hold beside B's four and A's broadcast. The denormal rule is vdpbf16ps's
   (denormal inputs read as zero, as training has them with flush_denormals).

   Built only where the compiler targets AVX-512 BF16 (with BW and VL); elsewhere the
   functions return 2 and tformer_products_available() 0. They return 0, or 1 if a buffer
   could not be allocated. */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PRODUCTS 1

#define LANES 16      /* columns of a panel: one AVX-512 register of floats */
#define TILE_ROWS 6   /* result rows per tile */
#define TILE_PANELS 4 /* panels per tile */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* 64-byte aligned memory for `words` 32-bit values, or NULL. */
static uint32_t *words_buffer(int64_t words) {
    return aligned_alloc(64, (size_t)round_up(words * 4 > 0 ? words * 4 : 64, 64));
}

/* Sixteen 32-bit pairs (lo[i], hi[i]) from the lanes `m` of two rows of bf16 (hi NULL: 0). */
static inline __m512i pairs16(const uint16_t *lo, const uint16_t *hi, __mmask16 m) {
    const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo));
    if (hi == NULL) return low;
    const __m512i high = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi));
    return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

/* Panels [j0, j1) of B = W^T, W (N, K) row-major: word 16 p + i of panel j is
   (W[16 j + i][2p], W[16 j + i][2p + 1]), 0 past N (and past K in the last pair). */
static void pack_transposed(const uint16_t *w, int64_t n, int64_t k, int64_t j0, int64_t j1,
                            uint32_t *out) {
    const int64_t pairs = (k + 1) / 2, whole = k / 2;
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)k));
    for (int64_t j = j0; j < j1; j++) {
        uint32_t *panel = out + j * pairs * LANES;
        const uint16_t *first = w + j * LANES * k;
        const int64_t cols = min64(LANES, n - j * LANES);
        const __mmask16 m = first_lanes(cols);
        for (int64_t p = 0; p < whole; p++) { /* pair p of each row: 32 bits at 2p (bf16 units) */
            const __m512i at = _mm512_add_epi32(rows, _mm512_set1_epi32((int)(2 * p)));
            _mm512_storeu_si512(panel + p * LANES,
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, at, first, 2));
        }
        if (pairs > whole) /* odd K: the last value of each row, alone */
            for (int64_t i = 0; i < LANES; i++)
                panel[whole * LANES + i] = i < cols ? first[i * k + k - 1] : 0;
    }
}

/* Panels [j0, j1) of B given row-major, B (rows, cols) with rows ld apart: word 16 p + i of
   panel j is (B[2p][16 j + i], B[2p + 1][16 j + i]), 0 past cols (and past rows). */
static void pack_rows(const uint16_t *b, int64_t ld, int64_t rows, int64_t cols, int64_t j0,
                      int64_t j1, uint32_t *out) {
    const int64_t pairs = (rows + 1) / 2;
    for (int64_t j = j0; j < j1; j++) {
        uint32_t *panel = out + j * pairs * LANES;
        const __mmask16 m = first_lanes(cols - j * LANES);
        for (int64_t p = 0; p < pairs; p++) {
            const uint16_t *lo = b + 2 * p * ld + j * LANES;
            _mm512_storeu_si512(panel + p * LANES, pairs16(lo, 2 * p + 1 < rows ? lo + ld : NULL, m));
        }
    }
}

/* A = Y^T's pairs for dW, Y (rows, n) row-major: word p n + j is (Y[2p][j], Y[2p + 1][j]), the
   second 0 past the last row. */
static void pair_rows(const uint16_t *y, int64_t rows, int64_t n, uint32_t *out) {
    for (int64_t p = 0; p < (rows + 1) / 2; p++) {
        const uint16_t *lo = y + 2 * p * n, *hi = 2 * p + 1 < rows ? lo + n : NULL;
        for (int64_t j = 0; j < n; j += LANES) {
            const __mmask16 m = first_lanes(n - j);
            _mm512_mask_storeu_epi32(out + p * n + j, m, pairs16(lo + j, hi ? hi + j : NULL, m));
        }
    }
}

/* A's operand for a tile, in one of two layouts (`packed`, a constant where tile is
   inlined): as stored, pair p of row r at a + r row + 2p (bf16 units), with `odd` one more
   pair after `pairs`, its first value alone (an odd K); or packed by pair_rows, pair p of
   row r the word p row + r. */
typedef struct {
    const uint16_t *a;
    int64_t row, pairs;
    int odd;
} Left;

/* Where a tile's sums go: C bf16 with an optional bias (bf16, per column), or float32. */
typedef struct {
    uint16_t *c;
    const uint16_t *bias;
    float *f;
    int64_t ld;
} Out;

/* acc[r][j] += A's pair of row r times B's pairs at b[j], for r < R, j < P. */
#define ADD_PAIR(R, P, PAIR_OF_ROW)                                                            \
    for (int r = 0; r < R; r++) {                                                              \
        const __m512bh x = (__m512bh)_mm512_set1_epi32(PAIR_OF_ROW);                           \
        for (int j = 0; j < P; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, bp[j]);         \
    }

/* out rows r < R, columns of P panels from col (cols of them real): sum over the pairs of
   A's row r times B's panels at b (panel after panel, panel_words apart). */
static inline __attribute__((always_inline)) void tile(const int R, const int P, const int packed,
                                                       Left a, const uint32_t *b,
                                                       int64_t panel_words, Out out, int64_t col,
                                                       int64_t cols) {
    __m512 acc[TILE_ROWS][TILE_PANELS];
    __m512bh bp[TILE_PANELS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < P; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < a.pairs; p++) {
        for (int j = 0; j < P; j++)
            bp[j] = (__m512bh)_mm512_loadu_si512(b + j * panel_words + p * LANES);
        if (packed) {
            const int32_t *words = (const int32_t *)a.a + p * a.row;
            ADD_PAIR(R, P, words[r]);
        } else {
            int32_t pair[TILE_ROWS];
            for (int r = 0; r < R; r++) memcpy(&pair[r], a.a + r * a.row + 2 * p, sizeof *pair);
            ADD_PAIR(R, P, pair[r]);
        }
    }
    if (!packed && a.odd) { /* the odd K's last pair: its first value, then B's zero */
        for (int j = 0; j < P; j++)
            bp[j] = (__m512bh)_mm512_loadu_si512(b + j * panel_words + a.pairs * LANES);
        ADD_PAIR(R, P, a.a[r * a.row + 2 * a.pairs]);
    }
    /* (unrolled: the sums stay in their registers) */
#pragma GCC unroll 4
    for (int j = 0; j < P; j++) {
        const __mmask16 m = first_lanes(cols - j * LANES);
        const int64_t at = col + j * LANES;
        if (out.f != NULL) {
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out.f + r * out.ld + at, m, acc[r][j]);
        } else {
            const __m512 bias = out.bias ? load_bf16x16(out.bias + at, m) : _mm512_setzero_ps();
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) {
                const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][j], bias));
                _mm256_mask_storeu_epi16(out.c + r * out.ld + at, m, (__m256i)v);
            }
        }
    }
}

/* A's operand from row r on: `packed`'s words are r columns further, the stored rows r
   rows further. */
static inline Left shifted(Left a, int64_t r, int packed) {
    a.a += packed ? 2 * r : r * a.row;
    return a;
}

static inline Out moved(Out out, int64_t r) {
    if (out.c) out.c += r * out.ld;
    if (out.f) out.f += r * out.ld;
    return out;
}

/* The tiles of P panels for `rows` rows: whole tiles of TILE_ROWS, then one of the rest. */
#define ROW_TILES(P)                                                                           \
    do {                                                                                       \
        int64_t r = 0;                                                                         \
        for (; r + TILE_ROWS <= rows; r += TILE_ROWS)                                          \
            TILE_AT(TILE_ROWS, P);                                                             \
        switch (rows - r) {                                                                    \
        case 5: TILE_AT(5, P); break;                                                          \
        case 4: TILE_AT(4, P); break;                                                          \
        case 3: TILE_AT(3, P); break;                                                          \
        case 2: TILE_AT(2, P); break;                                                          \
        case 1: TILE_AT(1, P); break;                                                          \
        default: break;                                                                        \
        }                                                                                      \
    } while (0)
#define TILE_AT(R, P)                                                                          \
    tile(R, P, packed, shifted(a, r, packed), b, panel_words, moved(out, r), col, cols)

/* out (rows, n) = A's rows times B, all of B's panels (n columns), four panels at a time:
   those panels' pairs stay in the cache while every row passes. */
static inline __attribute__((always_inline)) void rows_times_panels(const int packed, Left a,
                                                                    int64_t rows,
                                                                    const uint32_t *panels,
                                                                    int64_t n, Out out) {
    const int64_t panel_words = (a.pairs + a.odd) * LANES, count = (n + LANES - 1) / LANES;
    for (int64_t j = 0; j < count; j += TILE_PANELS) {
        const uint32_t *b = panels + j * panel_words;
        const int64_t col = j * LANES, cols = n - col;
        switch (min64(count - j, TILE_PANELS)) {
        case 4: ROW_TILES(4); break;
        case 3: ROW_TILES(3); break;
        case 2: ROW_TILES(2); break;
        default: ROW_TILES(1); break;
        }
    }
}

/* The two products' loops, each with its layout of A fixed. */
static void stored_times_panels(Left a, int64_t rows, const uint32_t *panels, int64_t n,
                                Out out) {
    rows_times_panels(0, a, rows, panels, n, out);
}

static void packed_times_panels(Left a, int64_t rows, const uint32_t *panels, int64_t n,
                                Out out) {
    rows_times_panels(1, a, rows, panels, n, out);
}

int tformer_product_bf16(const uint16_t *a, const uint16_t *w, int transposed,
                         const uint16_t *bias, uint16_t *c, int64_t m, int64_t n, int64_t k) {
    if (m == 0 || n == 0) return 0;
    if (k == 0) { /* no products: the bias, or zeros */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) c[i * n + j] = bias ? bias[j] : 0;
        return 0;
    }
    const int64_t pairs = k / 2, count = (n + LANES - 1) / LANES;
    uint32_t *b = words_buffer(count * (pairs + k % 2) * LANES);
    if (b == NULL) return 1;
#pragma omp parallel
    {
        int64_t j0, j1, r0, r1;
        my_share(count, &j0, &j1);
        if (transposed)
            pack_transposed(w, n, k, j0, j1, b);
        else
            pack_rows(w, n, k, n, j0, j1, b);
#pragma omp barrier
        my_share(m, &r0, &r1);
        const Left left = {a + r0 * k, k, pairs, (int)(k % 2)};
        const Out out = {c + r0 * n, bias, NULL, n};
        if (r1 > r0) stored_times_panels(left, r1 - r0, b, n, out);
    }
    free(b);
    return 0;
}

int tformer_weight_gradient_bf16(const uint16_t *dy, const uint16_t *x, float *dw, int64_t m,
                                 int64_t n, int64_t k) {
    if (n == 0 || k == 0) return 0;
    const int threads = omp_get_max_threads();
    float *sums = threads > 1 ? aligned_alloc(64, (size_t)round_up((threads - 1) * n * k * 4, 64))
                              : NULL;
    if (threads > 1 && sums == NULL) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const int me = omp_get_thread_num(), used = omp_get_num_threads();
        int64_t r0, r1;
        my_share(m, &r0, &r1);
        const int64_t rows = r1 - r0, pairs = (rows + 1) / 2, count = (k + LANES - 1) / LANES;
        float *mine = me == 0 ? dw : sums + (me - 1) * n * k;
        uint32_t *a = words_buffer(pairs * n), *b = words_buffer(count * pairs * LANES);
        if (a == NULL || b == NULL) {
#pragma omp atomic write
            failed = 1;
        } else if (rows == 0) {
            memset(mine, 0, (size_t)(n * k) * sizeof *mine);
        } else {
            pair_rows(dy + r0 * n, rows, n, a);
            pack_rows(x + r0 * k, k, rows, k, 0, count, b);
            const Left left = {(const uint16_t *)a, n, pairs, 0};
            const Out out = {NULL, NULL, mine, k};
            packed_times_panels(left, n, b, k, out);
        }
        free(a);
        free(b);
#pragma omp barrier
        if (!failed) { /* dW = the threads' sums in thread order, each thread a share of dW */
            int64_t e0, e1;
            my_share(n * k, &e0, &e1);
            for (int t = 1; t < used; t++)
                for (int64_t e = e0; e < e1; e++) dw[e] += sums[(t - 1) * n * k + e];
        }
    }
    free(sums);
    return failed;
}

#endif

#ifndef PRODUCTS
#define PRODUCTS 0

int tformer_product_bf16(const uint16_t *a, const uint16_t *w, int transposed,
                         const uint16_t *bias, uint16_t *c, int64_t m, int64_t n, int64_t k) {
    (void)a, (void)w, (void)transposed, (void)bias, (void)c, (void)m, (void)n, (void)k;
    return 2;
}

int tformer_weight_gradient_bf16(const uint16_t *dy, const uint16_t *x, float *dw, int64_t m,
                                 int64_t n, int64_t k) {
    (void)dy, (void)x, (void)dw, (void)m, (void)n, (void)k;
    return 2;
}
#endif

int tformer_products_available(void) { return PRODUCTS; }
