/* Linear layers for decoding on the CPU:  y (M, N) = x (M, K) W(N, K)^T + b (N).

   Decoding multiplies a few activation rows (one per sequence in the batch) by every weight
   matrix. With one row the work is reading the weights: the speed is the memory bandwidth.
   With more rows each weight is used once per row, and the speed is how many multiply-adds
   the loop issues per value it loads. These loops compute a tile of up to MR rows by one
   panel of PANEL = 2 * LANES output columns as outer products, one k at a time:

     acc[i][v] (LANES floats) += x[m+i, k] * W[n + v*LANES : n + (v+1)*LANES, k]   i < MR, v < 2
     y[m+i, n:n+PANEL] = acc[i] (* scale[n:n+PANEL]) + b[n:n+PANEL]

   so every step loads two weight vectors and broadcasts MR activations for 2 * MR vector
   multiply-adds (6 x 2: 8 loads for 12). The 12 accumulators, 2 weight vectors and a
   broadcast activation fit the 16 vector registers of AVX2 (bfloat16's pairs need one or
   two more: GCC keeps its mask constant in memory). Each output is one lane's chain of
   fused multiply-adds over k in order 0, 1, ..., K-1, whatever tile its row falls in: a
   row's result does not depend on the other rows of the batch.

   The weights are stored in panels, so that the two vectors of a step are adjacent and a
   panel is one stream from memory (PackedLinear packs them once, kernels.pack_linear):

     float32   panels[g][k][PANEL]          W[g*PANEL + j, k] at [g][k][j]
     int8      panels[g][k][PANEL]          w = q * scale[n], q in [-127, 127]
     bfloat16  panels[g][p][PANEL] pairs    32 bits: W[n, 2p] (low half), W[n, 2p+1] (high)
     int4      panels[g][t] groups of 32 k: PANEL float16 scales d, then for each of the
               32 k, PANEL/2 bytes: byte j = q of column j (low 4 bits) | q of column
               j + PANEL/2 (high 4 bits);  w = (q - 8) d, q in [0, 15] (ggml's q4_0)

   The last panel is padded with zero columns, bfloat16 panels with a zero k to an even K.
   bfloat16 is the top 16 bits of a float32, so `pair << 16` is W[n, 2p] and
   `pair & 0xFFFF0000` is W[n, 2p+1]: two instructions for 2 * LANES weights. Activations
   and accumulation stay float32. An int4 step is one group, which sums x q over its k and
   scales the sum once (int4_group); a K that is not a multiple of 32 ends in a short group
   (its missing k are never read).

   The panels are split over the OpenMP threads (the runtime torch uses). A panel stays in
   the cache while every tile of rows runs over it; meanwhile each tile fetches its share of
   the next panel, one step's bytes every (number of tiles) steps, so that reading memory
   goes on evenly while the multiply-adds run (docs/LOG.md, session 14). (An int8 step is
   less than a cache line, so a line is asked for more than once: harmless.) With one row
   nothing is fetched ahead: there it was slower (session 20).

   Compiled on first use with the machine's C compiler (-O3 -march=native -fopenmp) by
   tformer/kernels/build.py; tformer.kernels.load() falls back to torch when it cannot. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#include <omp.h>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__) || defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define PANEL (2 * LANES) /* output columns per panel */
#define MR 6              /* activation rows per tile (rows_by_panel has a case for 1..MR) */
#define MAX_WIDTH 4       /* panels per tile (tile, unit_width) */

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t vbits __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef int8_t vint8 __attribute__((vector_size(LANES)));
typedef int32_t vint32 __attribute__((vector_size(LANES * sizeof(int32_t))));

enum weights { F32, BF16, I8, I4 };
#define GROUP 32 /* int4: k per scale */

/* The loops below are specialised by inlining them where their arguments are constants. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

static inline vfloat load_floats(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vfloat bits_to_floats(vbits bits) {
    vfloat v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* LANES int8 weights from p, as floats: widened to int32 (vpmovsxbd), then converted. */
static inline vfloat load_int8(const int8_t *p) {
#if defined(__AVX512F__)
    return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else /* GCC's generic conversion, element by element on x86 */
    vint8 q;
    memcpy(&q, p, sizeof q);
    return __builtin_convertvector(__builtin_convertvector(q, vint32), vfloat);
#endif
}

/* Bytes of one step of a panel: one k (float32, int8), one pair of k (bfloat16), or one
   group of GROUP k with its scales (int4). */
ALWAYS_INLINE size_t step_bytes(enum weights kind) {
    if (kind == I4) return PANEL * 2 + GROUP * PANEL / 2;
    return kind == I8 ? PANEL : PANEL * 4;
}

/* Steps of a panel over k_len: k, pairs of k, or groups of k. */
ALWAYS_INLINE int64_t panel_steps(enum weights kind, int64_t k_len) {
    if (kind == I4) return (k_len + GROUP - 1) / GROUP;
    return kind == BF16 ? (k_len + 1) / 2 : k_len;
}

/* LANES float16 values from p, as floats. */
static inline vfloat load_halves(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__)
    return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    vfloat v;
    for (int l = 0; l < LANES; l++) v[l] = half_to_float(p[l]);
    return v;
#endif
}

/* The 2 * LANES 4-bit q of one int4 step's LANES bytes, as floats: (low nibbles, high). */
static inline void load_nibbles(const uint8_t *p, vfloat *low, vfloat *high) {
#if defined(__AVX512F__)
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *low = (vfloat)_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *high = (vfloat)_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
#elif defined(__AVX2__)
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *low = (vfloat)_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    *high = (vfloat)_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
#else
    for (int l = 0; l < LANES; l++) {
        (*low)[l] = (float)(p[l] & 15);
        (*high)[l] = (float)(p[l] >> 4);
    }
#endif
}

/* LANES copies of *p (vbroadcastss). */
static inline vfloat broadcast(const float *p) {
#if defined(__AVX512F__)
    return (vfloat)_mm512_set1_ps(*p);
#elif defined(__AVX2__)
    return (vfloat)_mm256_broadcast_ss(p);
#else
    vfloat v;
    for (int l = 0; l < LANES; l++) v[l] = *p;
    return v;
#endif
}

/* a * b + c rounded once, always: where the compiler may choose to fuse or not, it may
   choose differently in two copies of a loop, and a row's result would then depend on the
   size of the tile it falls in. */
static inline vfloat fused(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
    return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    vfloat r;
    for (int l = 0; l < LANES; l++) r[l] = fmaf(a[l], b[l], c[l]);
    return r;
#endif
}

/* acc[i] += x[i, k] * (w0, w1) for i < mr: one step of a tile. */
ALWAYS_INLINE void multiply_add(vfloat acc[MR][2], const float *x, int64_t k_len, int64_t k,
                                int mr, vfloat w0, vfloat w1) {
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
        vfloat xv = broadcast(x + i * k_len + k);
        acc[i][0] = fused(xv, w0, acc[i][0]);
        acc[i][1] = fused(xv, w1, acc[i][1]);
    }
}

/* y[i, 0:cols] = acc[i] (* scale) (+ bias) for i < mr: y is a panel's place in the output,
   rows n_len apart; scale and bias from the panel's first column. */
ALWAYS_INLINE void store(vfloat acc[MR][2], float *y, int64_t n_len, int64_t cols, int mr,
                         const float *scale, const float *bias) {
    for (int i = 0; i < mr; i++) {
        if (cols == PANEL) {
            for (int v = 0; v < 2; v++) {
                vfloat r = acc[i][v];
                if (scale && bias)
                    r = fused(r, load_floats(scale + v * LANES), load_floats(bias + v * LANES));
                else if (scale)
                    r *= load_floats(scale + v * LANES);
                else if (bias)
                    r += load_floats(bias + v * LANES);
                memcpy(y + i * n_len + v * LANES, &r, sizeof r);
            }
        } else { /* the last, padded panel: the same arithmetic, one column at a time */
            float r[PANEL];
            memcpy(r, acc[i], sizeof r);
            for (int64_t j = 0; j < cols; j++) {
                float out = r[j];
                if (scale && bias)
                    out = fmaf(out, scale[j], bias[j]);
                else if (scale)
                    out *= scale[j];
                else if (bias)
                    out += bias[j];
                y[i * n_len + j] = out;
            }
        }
    }
}

/* One int4 group of GROUP k (fewer in a short last group) for rows x[0:mr] and each of
   `width` panels (panel_bytes apart; at is the group in the first), added to acc[p]:

     acc[i] += d * (sum_j x[i, k0+j] q_j  -  8 xsum[i])    = sum_j x[i, k0+j] (q_j - 8) d

   with xsum[i] = sum_j x[i, k0+j], computed once per call for every panel (xsums, rows
   t_len apart). The sums run over the group in order, as fused multiply-adds on q as
   floats, and acc is touched once per group, so the tile keeps only the group's sums in
   registers (12 for 6 rows). Every row computes the same operations in the same order
   whatever the tile: a row's result does not depend on the batch. With one or two rows the
   q are widened where they are used; with more, once into a buffer that every row reads:
   the group's, or where there are several tiles of rows the whole panel's, `widened`
   (rows_by_panel). The values are the same either way. */
ALWAYS_INLINE void int4_group(vfloat acc[MAX_WIDTH][MR][2], const float *x, int64_t k_len,
                              int mr, int width, int64_t s, const char *at, size_t panel_bytes,
                              const float *xsums, int64_t t_len,
                              const vfloat (*widened)[2]) {
    const int64_t k0 = s * GROUP, here = k_len - k0 < GROUP ? k_len - k0 : GROUP;
    vfloat sums[MAX_WIDTH][MR][2];
    for (int p = 0; p < MAX_WIDTH; p++)
        for (int i = 0; i < MR; i++) sums[p][i][0] = sums[p][i][1] = (vfloat){0};
    if (mr <= 2) { /* the width panels side by side: width times the chains (tile) */
        for (int64_t j = 0; j < here; j++) {
#pragma GCC unroll 4
            for (int p = 0; p < width; p++) {
                vfloat low, high;
                load_nibbles((const uint8_t *)at + p * panel_bytes + PANEL * 2 + j * (PANEL / 2),
                             &low, &high);
                multiply_add(sums[p], x, k_len, k0 + j, mr, low, high);
            }
        }
    } else if (widened) { /* the whole panel's q, widened once for every tile of rows */
        for (int64_t j = 0; j < here; j++)
            multiply_add(sums[0], x, k_len, k0 + j, mr, widened[j][0], widened[j][1]);
    } else {
        const uint8_t *q = (const uint8_t *)at + PANEL * 2;
        vfloat qf[GROUP][2];
        for (int64_t j = 0; j < here; j++) load_nibbles(q + j * (PANEL / 2), &qf[j][0], &qf[j][1]);
        for (int64_t j = 0; j < here; j++)
            multiply_add(sums[0], x, k_len, k0 + j, mr, qf[j][0], qf[j][1]);
    }
#pragma GCC unroll 4
    for (int p = 0; p < width; p++) {
        const vfloat d0 = load_halves((const uint16_t *)(at + p * panel_bytes));
        const vfloat d1 = load_halves((const uint16_t *)(at + p * panel_bytes) + LANES);
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            vfloat eight = broadcast(xsums + i * t_len + s) * 8.0f; /* exact: times 2^3 */
            acc[p][i][0] = fused(d0, sums[p][i][0] - eight, acc[p][i][0]);
            acc[p][i][1] = fused(d1, sums[p][i][1] - eight, acc[p][i][1]);
        }
    }
}

/* Rows x[0:mr] (each k_len long) times `width` consecutive panels (panel_bytes apart), into
   y (rows n_len apart; cols valid columns, all PANEL where width > 1). Called with constant
   mr, width and kind, so the loops unroll, the branches on kind go, and acc stays in
   registers. Every `every` steps one step's bytes of each of `ahead`'s width panels (the
   next ones) are fetched into the cache (never where `every` is 0).

   With one or two rows a tile of one panel is a latency chain: each accumulator waits for
   its last multiply-add (4 cycles) while the core could start two a cycle. Several panels
   at once give it width times as many independent chains, each output still summed over k
   in the same order: the values are those of one panel at a time. */
ALWAYS_INLINE void tile(const float *x, const char *panel, size_t panel_bytes, int width,
                        const float *scale, const float *bias, float *y, int64_t n_len,
                        int64_t cols, int64_t k_len, int mr, enum weights kind,
                        const char *ahead, int every, const float *xsums,
                        const vfloat (*widened)[2]) {
    const size_t step = step_bytes(kind);
    const int64_t steps = kind == BF16 ? k_len / 2 : panel_steps(kind, k_len);
    vfloat acc[MAX_WIDTH][MR][2];
    for (int p = 0; p < MAX_WIDTH; p++)
        for (int i = 0; i < MR; i++) acc[p][i][0] = acc[p][i][1] = (vfloat){0};
    int countdown = every;
    for (int64_t s = 0; s < steps; s++) {
        if (every && --countdown == 0) {
            for (int p = 0; p < width; p++)
                for (size_t line = 0; line < step; line += 64)
                    __builtin_prefetch(ahead + p * panel_bytes + line, 0, 3);
            ahead += step;
            countdown = every;
        }
        if (kind == I4) { /* a group of k, the panels side by side inside */
            int4_group(acc, x, k_len, mr, width, s, panel + s * step, panel_bytes, xsums, steps,
                       widened ? widened + s * GROUP : NULL);
            continue;
        }
#pragma GCC unroll 4
        for (int p = 0; p < width; p++) {
            const char *at = panel + p * panel_bytes + s * step;
            if (kind == F32) {
                multiply_add(acc[p], x, k_len, s, mr, load_floats((const float *)at),
                             load_floats((const float *)at + LANES));
            } else if (kind == I8) {
                multiply_add(acc[p], x, k_len, s, mr, load_int8((const int8_t *)at),
                             load_int8((const int8_t *)at + LANES));
            } else {
                vbits b0, b1;
                memcpy(&b0, at, sizeof b0);
                memcpy(&b1, at + sizeof b0, sizeof b1);
                multiply_add(acc[p], x, k_len, 2 * s, mr, bits_to_floats(b0 << 16),
                             bits_to_floats(b1 << 16));
                multiply_add(acc[p], x, k_len, 2 * s + 1, mr, bits_to_floats(b0 & 0xFFFF0000u),
                             bits_to_floats(b1 & 0xFFFF0000u));
            }
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < width; p++) {
        if (kind == BF16 && k_len % 2) { /* the last k, paired with a zero */
            const char *at = panel + p * panel_bytes + steps * step;
            vbits b0, b1;
            memcpy(&b0, at, sizeof b0);
            memcpy(&b1, at + sizeof b0, sizeof b1);
            multiply_add(acc[p], x, k_len, k_len - 1, mr, bits_to_floats(b0 << 16),
                         bits_to_floats(b1 << 16));
        }
        store(acc[p], y + p * PANEL, n_len, cols, mr, scale ? scale + p * PANEL : NULL,
              bias ? bias + p * PANEL : NULL);
    }
}

/* The units of work the panels are split into over the threads: with one row, groups of 4
   consecutive full panels, with two rows groups of 2 (tile: more chains for the core), and
   what is left over one panel each; with more rows, one panel each. Narrower groups where
   wide ones would leave fewer than two units a thread (many threads, a small layer).
   Called before the parallel region: `threads` is the region's. */
static inline int unit_width(int64_t m_len, int64_t n_len, int threads) {
    int width = m_len == 1 ? 4 : m_len == 2 ? 2 : 1;
    while (width > 1 && n_len / PANEL / width < 2 * (int64_t)threads) width /= 2;
    return width;
}

static inline int64_t wide_units(int64_t n_len, int width) {
    return width > 1 ? n_len / PANEL / width : 0;
}

static inline int64_t units(int64_t n_len, int width) {
    const int64_t wide = wide_units(n_len, width);
    return wide + (n_len + PANEL - 1) / PANEL - wide * width;
}

/* Every row of x by the panels of unit u: the rows in tiles of at most MR, as even as they go
   (16 rows: 6, 5, 5), each tile a call with a constant row count that the compiler
   specialises. */
ALWAYS_INLINE void rows_by_panel(const float *x, const void *panels, const float *scale,
                                 const float *bias, float *y, int64_t m_len, int64_t n_len,
                                 int64_t k_len, int64_t u, int width, enum weights kind,
                                 const float *xsums, vfloat (*widened)[2]) {
    const int64_t wide = wide_units(n_len, width);
    const int64_t g = u < wide ? u * width : wide * width + (u - wide);
    const int w = u < wide ? width : 1;
    const int64_t steps = panel_steps(kind, k_len);
    const size_t panel_bytes = (size_t)steps * step_bytes(kind);
    const char *panel = (const char *)panels + g * panel_bytes;
    const int64_t n = g * PANEL, cols = n_len - n < PANEL ? n_len - n : PANEL;
    const int64_t n_panels = (n_len + PANEL - 1) / PANEL;
    /* the next w panels; at the end this unit's own again: harmless, and no branch in the
       loop */
    const char *next = g + 2 * w <= n_panels ? panel + w * panel_bytes : panel;
    const int64_t tiles = (m_len + MR - 1) / MR;
    const float *sn = scale ? scale + n : NULL, *bn = bias ? bias + n : NULL;
    if (kind == I4 && widened && tiles > 1) /* int4 with several tiles: widen q once */
        for (int64_t s = 0; s < steps; s++) {
            const uint8_t *q = (const uint8_t *)panel + s * step_bytes(kind) + PANEL * 2;
            for (int64_t j = 0; j < GROUP; j++)
                load_nibbles(q + j * (PANEL / 2), &widened[s * GROUP + j][0],
                             &widened[s * GROUP + j][1]);
        }
    else
        widened = NULL;
    for (int64_t t = 0, m = 0; t < tiles; t++) {
        int64_t left = tiles - t, mr = (m_len - m + left - 1) / left;
        const float *xm = x + m * k_len;
        const float *xs = xsums ? xsums + m * steps : NULL;
        float *ym = y + m * n_len + n;
        /* this tile's share of the next panels: steps / tiles steps' bytes */
        const char *ahead = next + (size_t)(t * (steps / tiles)) * step_bytes(kind);
        /* none at one row: the next panel's stream beside this one's made one-row decoding
           slower on Zen 4 (bfloat16 and int8 by 9-14%, LOG), the hardware prefetchers
           keeping up alone */
        int every = m_len == 1 ? 0 : (int)tiles;
        /* Full panels get a tile of their own, where cols is the constant PANEL: in the one
           for the last, padded panel GCC keeps acc in memory (store reads it by lane). */
#define TILE(rows, panels, columns)                                                          \
    tile(xm, panel, panel_bytes, panels, sn, bn, ym, n_len, columns, k_len, rows, kind, ahead, \
         every, xs, (const vfloat(*)[2])widened)
#define TILES(columns)                                                                           \
    switch (mr) {                                                                                \
    case 6: TILE(6, 1, columns); break;                                                          \
    case 5: TILE(5, 1, columns); break;                                                          \
    case 4: TILE(4, 1, columns); break;                                                          \
    case 3: TILE(3, 1, columns); break;                                                          \
    case 2: TILE(2, 1, columns); break;                                                          \
    default: TILE(1, 1, columns); break;                                                         \
    }
        if (w == 4) /* one row */
            TILE(1, 4, PANEL);
        else if (w == 2 && m_len == 1)
            TILE(1, 2, PANEL);
        else if (w == 2)
            TILE(2, 2, PANEL);
        else if (cols == PANEL)
            TILES(PANEL)
        else
            TILES(cols)
#undef TILES
#undef TILE
        m += mr;
    }
}

/* Each entry point runs the panels over its OpenMP threads with its own constant kind, which
   is why rows_by_panel is inlined into each: a parallel loop's body becomes a function of
   its own before inlining, so one shared loop would not see a constant kind. */
void tformer_linear_f32(const float *x, const float *panels, const float *bias, float *y,
                        int64_t m_len, int64_t n_len, int64_t k_len) {
    if (m_len == 0) return;
    const int width = unit_width(m_len, n_len, omp_get_max_threads());
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < units(n_len, width); u++)
        rows_by_panel(x, panels, NULL, bias, y, m_len, n_len, k_len, u, width, F32, NULL, NULL);
}

void tformer_linear_i8(const float *x, const int8_t *panels, const float *scale,
                       const float *bias, float *y, int64_t m_len, int64_t n_len,
                       int64_t k_len) {
    if (m_len == 0) return;
    const int width = unit_width(m_len, n_len, omp_get_max_threads());
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < units(n_len, width); u++)
        rows_by_panel(x, panels, scale, bias, y, m_len, n_len, k_len, u, width, I8, NULL, NULL);
}

void tformer_linear_bf16(const float *x, const uint16_t *panels, const float *bias, float *y,
                         int64_t m_len, int64_t n_len, int64_t k_len) {
    if (m_len == 0) return;
    const int width = unit_width(m_len, n_len, omp_get_max_threads());
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < units(n_len, width); u++)
        rows_by_panel(x, panels, NULL, bias, y, m_len, n_len, k_len, u, width, BF16, NULL, NULL);
}

/* Each thread's buffer for a panel of int4 q as floats (rows in several tiles, int4_group),
   `steps` of them: kept from call to call, since the pool's threads live on (memory got and
   given back at every call cost page faults, a millisecond a token). NULL without memory:
   each tile then widens its groups itself, the same values with more work. */
static vfloat (*widening_buffer(int64_t steps))[2] {
    static __thread vfloat(*buffer)[2] = NULL;
    static __thread int64_t size = 0;
    if (steps > size) {
        free(buffer);
        if (posix_memalign((void **)&buffer, 64, (size_t)steps * sizeof(vfloat[2])) != 0) {
            buffer = NULL;
            size = 0;
            return NULL;
        }
        size = steps;
    }
    return buffer;
}

/* One row's sums over each group of k (int4_group's xsum): a whole group as GROUP / LANES
   vectors added lane by lane, then the lanes in order; a short last group one by one. The
   same order for a row whatever the batch. */
static void group_sums(const float *x, int64_t k_len, float *sums) {
    const int64_t whole = k_len / GROUP;
    for (int64_t t = 0; t < whole; t++) {
        vfloat v = load_floats(x + t * GROUP);
        for (int64_t j = LANES; j < GROUP; j += LANES) v += load_floats(x + t * GROUP + j);
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += v[l];
        sums[t] = sum;
    }
    if (k_len % GROUP) {
        float sum = 0.0f;
        for (int64_t k = whole * GROUP; k < k_len; k++) sum += x[k];
        sums[whole] = sum;
    }
}

/* int4 also needs each row's sum over each group of k (int4_group): the rows' sums,
   (m_len, groups), once for every panel. Returns -1 if it has no memory for them. */
int tformer_linear_i4(const float *x, const uint8_t *panels, const float *bias, float *y,
                      int64_t m_len, int64_t n_len, int64_t k_len) {
    if (m_len == 0) return 0;
    const int64_t t_len = panel_steps(I4, k_len);
    float *xsums = malloc((size_t)(m_len * t_len) * sizeof(float));
    if (!xsums) return -1;
    const int width = unit_width(m_len, n_len, omp_get_max_threads());
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m_len; i++) group_sums(x + i * k_len, k_len, xsums + i * t_len);
        vfloat(*widened)[2] = m_len > MR ? widening_buffer(t_len * GROUP) : NULL;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units(n_len, width); u++)
            rows_by_panel(x, panels, NULL, bias, y, m_len, n_len, k_len, u, width, I4, xsums,
                          widened);
    }
    free(xsums);
    return 0;
}

/* The (N, K) weight that kernels.pack_linear packed into `panels` (float32, bfloat16 or
   int8; `bytes` a value), written into `out` row after row: what torch's matmul reads where
   the kernels stop (a long prompt). Each panel is P columns of K values, (K / r, P, r) with
   r = 2 for bfloat16's pairs, 1 otherwise; its column j becomes row g P + j of out, 64 k
   at a time (64 P values, in the first-level cache, while the P rows' pieces are written);
   panels are split over the threads. */
ALWAYS_INLINE void unpack_panel(const char *panels, char *out, int64_t g, int64_t n_len,
                                int64_t k_len, int64_t bytes) {
    const int64_t r = bytes == 2 ? 2 : 1, k_pad = (k_len + r - 1) / r * r;
    const char *panel = panels + g * k_pad * PANEL * bytes;
    const int64_t cols = n_len - g * PANEL < PANEL ? n_len - g * PANEL : PANEL;
    for (int64_t k0 = 0; k0 < k_len; k0 += 64) {
        const int64_t k1 = k0 + 64 < k_len ? k0 + 64 : k_len;
        for (int64_t k = k0; k < k1; k++) /* k of column j: pair k / r, half k % r */
            for (int64_t j = 0; j < cols; j++)
                memcpy(out + ((g * PANEL + j) * k_len + k) * bytes,
                       panel + (((k / r) * PANEL + j) * r + k % r) * bytes, (size_t)bytes);
    }
}

/* Each size with its own parallel loop, so that the size is a constant in the loop's body
   (which becomes a function of its own before inlining) and memcpy one move. */
void tformer_unpack_linear(const void *panels, void *out, int64_t n_len, int64_t k_len,
                           int64_t bytes) {
    const int64_t n_panels = (n_len + PANEL - 1) / PANEL;
    if (bytes == 4) {
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < n_panels; g++) unpack_panel(panels, out, g, n_len, k_len, 4);
    } else if (bytes == 2) {
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < n_panels; g++) unpack_panel(panels, out, g, n_len, k_len, 2);
    } else {
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < n_panels; g++) unpack_panel(panels, out, g, n_len, k_len, 1);
    }
}

/* The (N, K) weights w = (q - 8) d that kernels.pack_int4 packed into `panels`, written
   row after row as float32 (bytes 4) or rounded to bfloat16 (bytes 2): what torch's matmul
   reads where the int4 kernels stop (a long prompt), in one pass. A group of one panel at a
   time: its GROUP x PANEL values made a k at a time as vectors over the columns (as the
   kernels widen them), kept in the first-level cache, then written out a row (a column of
   the block) at a time. (q - 8) d is exact in float32 (a float16 times an integer of four
   bits), so this equals torch's dequantisation then cast, bit for bit. */
ALWAYS_INLINE void dequantize_int4_panel(const uint8_t *panels, char *out, int64_t g,
                                         int64_t n_len, int64_t k_len, int64_t bytes) {
    const int64_t t_len = panel_steps(I4, k_len);
    const int64_t cols = n_len - g * PANEL < PANEL ? n_len - g * PANEL : PANEL;
    float block[GROUP][PANEL]; /* [k of the group][column of the panel] */
    for (int64_t t = 0; t < t_len; t++) {
        const uint8_t *at = panels + (g * t_len + t) * step_bytes(I4);
        const vfloat d_low = load_halves((const uint16_t *)at);
        const vfloat d_high = load_halves((const uint16_t *)at + LANES);
        const int64_t k0 = t * GROUP, here = k_len - k0 < GROUP ? k_len - k0 : GROUP;
        for (int64_t j = 0; j < here; j++) {
            vfloat low, high;
            load_nibbles(at + PANEL * 2 + j * (PANEL / 2), &low, &high);
            low = (low - 8.0f) * d_low;
            high = (high - 8.0f) * d_high;
            memcpy(block[j], &low, sizeof low);
            memcpy(block[j] + LANES, &high, sizeof high);
        }
        for (int64_t c = 0; c < cols; c++) {
            char *row = out + ((g * PANEL + c) * k_len + k0) * bytes;
            for (int64_t j = 0; j < here; j++) {
                if (bytes == 4) ((float *)row)[j] = block[j][c];
                else ((uint16_t *)row)[j] = float_to_bf16_bits(block[j][c]);
            }
        }
    }
}

void tformer_dequantize_int4(const void *panels, void *out, int64_t n_len, int64_t k_len,
                             int64_t bytes) {
    const int64_t n_panels = (n_len + PANEL - 1) / PANEL;
    if (bytes == 4) {
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < n_panels; g++)
            dequantize_int4_panel(panels, out, g, n_len, k_len, 4);
    } else {
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < n_panels; g++)
            dequantize_int4_panel(panels, out, g, n_len, k_len, 2);
    }
}

/* The output columns per panel, for packing weights (kernels.pack_linear). */
int tformer_linear_panel(void) { return PANEL; }

/* What the build can report: 1 when the loops use AVX-512 (16 floats a vector). */
int tformer_has_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
