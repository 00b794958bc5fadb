/* Linear layers in integers: int8 weights (w8a8), or 4-bit ones (w4a8, below), times int8
   activations, summed in int32.

   Where a step has many rows (a batch of sentences, their beams, a prompt) a linear layer
   is bound by how many multiply-adds the core issues, not by reading the weights, and an
   integer unit issues more of them than the float one: four 8-bit products a 32-bit lane
   per instruction. The activations are quantised at each call, per row, symmetrically
   (as CTranslate2's int8 and llama.cpp's q8_0 do); the weights once (PackedLinear):

     s_x[i] = max_k |x[i, k]| / 127  (1 for a row of zeros)
     p[i, k] = round(x[i, k] / s_x[i])  in [-127, 127], to nearest, ties to even
     q[n, k] in [-127, 127] with s_w[n]:   W[n, k] ≈ q[n, k] s_w[n]   (quantize_int8)

     acc[i, n] = sum_k p[i, k] q[n, k]                  an int32, exact
     y[i, n] = ((float)acc[i, n] * s_x[i]) * s_w[n] + b[n]     the last two as one fma

   The weights are stored in panels of W8_PANEL = 16 output columns, four k a column in 32
   bits (K padded with zeros to a multiple of 4, N with zero columns):

     panels[g][t][j][l] = q[16 g + j, 4 t + l]          (G, K/4, 16, 4) int8

   so that a step t of a panel is 64 bytes, two vectors of 8 columns' four k. For a row,
   the step's four p, as 32 bits, go to every lane (b); then per vector of weights w

     sign(w, b)              w with the sign of the p it meets (vpsignb; 0 where p is 0)
     |b| . sign(w, b)        pairs of |p| (±q) summed to int16 (vpmaddubsw): p q pairs,
                             at most 2 * 127 * 127 = 32258, never saturated
     ... . 1                 the pairs summed to int32 (vpmaddwd), added to the lane's acc

   or, with VNNI, the last two as one instruction (vpdpbusd). Either way each lane gains
   the same integer, the step's sum_l p[i, 4t + l] q[n, 4t + l]: the results are identical
   on every CPU, and a row's do not depend on the other rows of the batch.

   Tiles of up to W8_MR = 3 rows by one panel: 6 int32 accumulators, 2 weight vectors and
   a row's broadcast p and |p| (stored beside p, quantise_row) fit AVX2's 16 registers with
   room for the products; with 4 rows GCC kept accumulators on the stack (docs/LOG.md).
   The int32 sums cannot overflow below K = 133,144 (127^2 K < 2^31). x must be finite: a
   NaN or an infinity makes its row's outputs meaningless (as in the torch path). The
   panels are split over the OpenMP threads; the rows are quantised first, in the same
   parallel region. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#include <omp.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define W8_PANEL 16 /* output columns per panel */
#define W8_STEP 4   /* k per 32-bit lane */
#define W8_MR 3     /* rows per tile */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Row x (k_len floats) -> p (k_pad bytes, zero beyond k_len) and its scale. The largest
   |x| by eight lanes (a maximum does not depend on the order); comparisons rather than
   fmaxf, which GCC calls as a function (NaN's rules). */
static void quantise_row(const float *x, int64_t k_len, int64_t k_pad, int8_t *p,
                         int8_t *magnitude, float *scale) {
    v8f lanes = {0.0f};
    int64_t k = 0;
    for (; k + 8 <= k_len; k += 8) {
        v8f v = load8(x + k);
        v = (v8f)((v8i)v & 0x7FFFFFFF); /* |v| */
        lanes = vmax8(lanes, v);
    }
    float largest = max8(lanes);
    for (; k < k_len; k++) largest = fabsf(x[k]) > largest ? fabsf(x[k]) : largest;
    const float s = largest > 0.0f ? largest / 127.0f : 1.0f;
    for (k = 0; k < k_len; k++) {
        float r = nearbyintf(x[k] / s);
        r = r >= -127.0f ? r : -127.0f; /* a NaN too: converting it would be undefined */
        r = r <= 127.0f ? r : 127.0f;
        p[k] = (int8_t)r;
        magnitude[k] = (int8_t)fabsf(r);
    }
    for (k = k_len; k < k_pad; k++) p[k] = magnitude[k] = 0;
    *scale = s;
}

/* y = ((float)acc * s_x) * s_w + b, one output. */
static inline float output(int32_t acc, float s_x, float s_w, const float *bias) {
    const float r = (float)acc * s_x;
    return bias ? fmaf(r, s_w, *bias) : r * s_w;
}

#if defined(__AVX2__)

/* acc + the four products of each 32-bit lane of a (unsigned) and s (signed). */
static inline __m256i dot4(__m256i acc, __m256i a, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, a, s);
#else
    const __m256i pairs = _mm256_maddubs_epi16(a, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* Rows p[0:mr] (row_bytes apart) times one panel (steps steps), into y (rows n_len apart,
   cols valid columns). Called with a constant mr, so the loops unroll. */
ALWAYS_INLINE void tile(const int8_t *p, int64_t magnitudes, int64_t row_bytes, const float *s_x,
                        const int8_t *panel, int64_t steps, int mr, const float *s_w,
                        const float *bias, float *y, int64_t n_len, int64_t cols) {
    __m256i acc[W8_MR][2];
    for (int i = 0; i < W8_MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    for (int64_t t = 0; t < steps; t++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(panel + t * 64));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(panel + t * 64 + 32));
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            int32_t four, size;
            memcpy(&four, p + i * row_bytes + t * W8_STEP, sizeof four);
            memcpy(&size, p + magnitudes + i * row_bytes + t * W8_STEP, sizeof size);
            const __m256i b = _mm256_set1_epi32(four), a = _mm256_set1_epi32(size);
            acc[i][0] = dot4(acc[i][0], a, _mm256_sign_epi8(w0, b));
            acc[i][1] = dot4(acc[i][1], a, _mm256_sign_epi8(w1, b));
        }
    }
    for (int i = 0; i < mr; i++) {
        if (cols == W8_PANEL) {
            const __m256 sx = _mm256_set1_ps(s_x[i]);
            for (int v = 0; v < 2; v++) {
                __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][v]), sx);
                const __m256 sw = _mm256_loadu_ps(s_w + 8 * v);
                r = bias ? _mm256_fmadd_ps(r, sw, _mm256_loadu_ps(bias + 8 * v))
                         : _mm256_mul_ps(r, sw);
                _mm256_storeu_ps(y + i * n_len + 8 * v, r);
            }
        } else { /* the last, padded panel: the same arithmetic, one column at a time */
            int32_t sums[W8_PANEL];
            memcpy(sums, acc[i], sizeof sums);
            for (int64_t j = 0; j < cols; j++)
                y[i * n_len + j] = output(sums[j], s_x[i], s_w[j], bias ? bias + j : NULL);
        }
    }
}

#else /* without AVX2: the same integers, one product at a time */

ALWAYS_INLINE void tile(const int8_t *p, int64_t magnitudes, int64_t row_bytes, const float *s_x,
                        const int8_t *panel, int64_t steps, int mr, const float *s_w,
                        const float *bias, float *y, int64_t n_len, int64_t cols) {
    for (int i = 0; i < mr; i++)
        for (int64_t j = 0; j < cols; j++) {
            int32_t acc = 0;
            for (int64_t t = 0; t < steps; t++)
                for (int l = 0; l < W8_STEP; l++)
                    acc += (int32_t)p[i * row_bytes + t * W8_STEP + l] *
                           (int32_t)panel[(t * W8_PANEL + j) * W8_STEP + l];
            y[i * n_len + j] = output(acc, s_x[i], s_w[j], bias ? bias + j : NULL);
        }
}

#endif

/* Every row of p by panel g: tiles of at most W8_MR rows, as even as they go. */
static void rows_by_panel(const int8_t *p, int64_t magnitudes, int64_t row_bytes, const float *s_x,
                          const int8_t *panels, const float *s_w, const float *bias, float *y,
                          int64_t m_len, int64_t n_len, int64_t g) {
    const int64_t steps = row_bytes / W8_STEP, n = g * W8_PANEL;
    const int64_t cols = n_len - n < W8_PANEL ? n_len - n : W8_PANEL;
    const int8_t *panel = panels + g * steps * 64;
    const float *sw = s_w + n, *b = bias ? bias + n : NULL;
    const int64_t tiles = (m_len + W8_MR - 1) / W8_MR;
    for (int64_t t = 0, m = 0; t < tiles; t++) {
        const int64_t left = tiles - t, mr = (m_len - m + left - 1) / left;
        const int8_t *pm = p + m * row_bytes;
        float *ym = y + m * n_len + n;
#define TILE(rows, columns) \
    tile(pm, magnitudes, row_bytes, s_x + m, panel, steps, rows, sw, b, ym, n_len, columns)
#define TILES(columns)                     \
    switch (mr) {                          \
    case 3: TILE(3, columns); break;       \
    case 2: TILE(2, columns); break;       \
    default: TILE(1, columns); break;      \
    }
        if (cols == W8_PANEL)
            TILES(W8_PANEL)
        else
            TILES(cols)
#undef TILES
#undef TILE
        m += mr;
    }
}

/* The calling thread's buffer for the quantised rows and their scales, kept from call to
   call (memory got and given back at every call would cost page faults at every step). */
static int8_t *row_buffer(size_t bytes) {
    static __thread int8_t *buffer = NULL;
    static __thread size_t size = 0;
    if (bytes > size) {
        free(buffer);
        if (posix_memalign((void **)&buffer, 64, bytes) != 0) {
            buffer = NULL;
            size = 0;
            return NULL;
        }
        size = bytes;
    }
    return buffer;
}

/* y (M, N) = x (M, K) W (N, K)^T + bias, W's panels and scales s_w packed by
   kernels.pack_w8a8. Returns -1 if it has no memory for the quantised rows. */
int tformer_linear_w8a8(const float *x, const int8_t *panels, const float *s_w,
                        const float *bias, float *y, int64_t m_len, int64_t n_len,
                        int64_t k_len) {
    if (m_len == 0) return 0;
    const int64_t row_bytes = (k_len + W8_STEP - 1) / W8_STEP * W8_STEP;
    const size_t p_bytes = (size_t)(m_len * row_bytes + 63) / 64 * 64;
    int8_t *p = row_buffer(2 * p_bytes + (size_t)m_len * sizeof(float));
    if (!p) return -1;
    const int64_t magnitudes = (int64_t)p_bytes; /* |p| follows p */
    float *s_x = (float *)(p + 2 * p_bytes);
    const int64_t n_panels = (n_len + W8_PANEL - 1) / W8_PANEL;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m_len; i++)
            quantise_row(x + i * k_len, k_len, row_bytes, p + i * row_bytes,
                         p + magnitudes + i * row_bytes, s_x + i);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < n_panels; g++)
            rows_by_panel(p, magnitudes, row_bytes, s_x, panels, s_w, bias, y, m_len, n_len, g);
    }
    return 0;
}

/* The output columns per panel, for packing weights (kernels.pack_w8a8). */
int tformer_w8a8_panel(void) { return W8_PANEL; }

/* w4a8: 4-bit weights as ggml's q4_0 stores them (w = (q - 8) d, q in [0, 15], a float16 d
   per group of W4_GROUP = 32 k of a column) times activations rounded to int8 per group of
   32 k of a row (as llama.cpp's q8_0 rounds them when it multiplies q4_0):

     s_x[i, t] = max_{k in t} |x[i, k]| / 127   (1 for a group of zeros)
     p[i, k] = round(x[i, k] / s_x[i, t])  in [-127, 127], to nearest, ties to even
     c[i, n, t] = sum_{k in t} p[i, k] q[n, k]  -  8 sum_{k in t} p[i, k]     an int32, exact
     y[i, n] = sum_t c[i, n, t] (d[n, t] s_x[i, t])  + b[n]      float32, in order of t: each
                                                   term one fused multiply-add, then b

   The products are unsigned bytes (q) by signed ones (p): what vpdpbusd multiplies, and
   vpmaddubsw, whose pairs (at most 2 * 15 * 127) never saturate; no sign trick is needed.
   The int32 sum starts at the group's -8 sum p (offset, computed with the rounding).

   Panels of W4_PANEL = 16 output columns; for each group t of a panel, W4_GROUP_BYTES:

     the 16 columns' d, float16 (32 bytes); then four steps s of 8 k, each two vectors v of
     8 columns' 32 bits: byte 4c + l of vector v holds q[16g + 8v + c, 32t + 8s + l] in its
     low 4 bits and q[.., 32t + 8s + 4 + l] in its high 4 bits

   so a vector of 32 bytes becomes, with an `and` and a shift, the two vectors of four k a
   lane that two vpdpbusd multiply by a row's four p broadcast: 64 weights a load, where the
   weight-only int4 kernel (linear.c) widens 16 at a time to float. 4.5 bits a weight, as
   q4_0. A K that is not a multiple of 32 is padded with p = 0 (and q = 8), which adds
   nothing. Tiles of up to W4_MR rows by one panel. (Several panels at once for one or two
   rows, as linear.c does for floats, was slower here: docs/LOG.md.) */

#define W4_PANEL 16
#define W4_GROUP 32
#define W4_GROUP_BYTES (W4_PANEL * 2 + W4_GROUP * W4_PANEL / 2)
#define W4_MR 4

/* Row x -> p (groups * W4_GROUP bytes, 0 past k_len) with, per group, its scale and
   offset (-8 sum p). The largest |x| of a whole group in eight lanes, compared (not
   fmaxf, which GCC calls as a function). */
static void quantise_groups(const float *x, int64_t k_len, int64_t groups, int8_t *p,
                            float *scale, int32_t *offset) {
    for (int64_t t = 0; t < groups; t++) {
        const int64_t k0 = t * W4_GROUP, here = k_len - k0 < W4_GROUP ? k_len - k0 : W4_GROUP;
        float largest = 0.0f;
        if (here == W4_GROUP) {
            v8f lanes = {0.0f};
            for (int64_t j = 0; j < W4_GROUP; j += 8)
                lanes = vmax8(lanes, (v8f)((v8i)load8(x + k0 + j) & 0x7FFFFFFF));
            largest = max8(lanes);
        } else {
            for (int64_t j = 0; j < here; j++)
                largest = fabsf(x[k0 + j]) > largest ? fabsf(x[k0 + j]) : largest;
        }
        const float s = largest > 0.0f ? largest / 127.0f : 1.0f;
        int32_t sum = 0;
        for (int64_t j = 0; j < here; j++) {
            float r = nearbyintf(x[k0 + j] / s);
            r = r >= -127.0f ? r : -127.0f; /* a NaN too: converting it would be undefined */
            r = r <= 127.0f ? r : 127.0f;
            p[k0 + j] = (int8_t)r;
            sum += (int32_t)r;
        }
        for (int64_t j = here; j < W4_GROUP; j++) p[k0 + j] = 0;
        scale[t] = s;
        offset[t] = -8 * sum;
    }
}

#if defined(__AVX2__) && defined(__F16C__)

/* Rows p[0:mr] (row_bytes apart; their scales and offsets `groups` apart) times one panel
   into y (rows n_len apart, cols valid columns). Called with a constant mr, so the loops
   unroll. */
ALWAYS_INLINE void w4_tile(const int8_t *p, int64_t row_bytes, const float *s_x,
                           const int32_t *offset, int64_t groups, const uint8_t *panel, int mr,
                           const float *bias, float *y, int64_t n_len, int64_t cols) {
    __m256 acc[W4_MR][2];
    for (int i = 0; i < W4_MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int64_t t = 0; t < groups; t++) {
        __m256i sums[W4_MR][2];
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++)
            sums[i][0] = sums[i][1] = _mm256_set1_epi32(offset[i * groups + t]);
        const int8_t *pt = p + t * W4_GROUP;
        const uint8_t *group = panel + t * W4_GROUP_BYTES;
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
#pragma GCC unroll 2
            for (int v = 0; v < 2; v++) {
                const __m256i bytes =
                    _mm256_loadu_si256((const __m256i *)(group + W4_PANEL * 2 + s * 64 + 32 * v));
                const __m256i low = _mm256_and_si256(bytes, nibble);
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
#pragma GCC unroll 4
                for (int i = 0; i < mr; i++) {
                    int32_t first, second;
                    memcpy(&first, pt + i * row_bytes + 8 * s, sizeof first);
                    memcpy(&second, pt + i * row_bytes + 8 * s + 4, sizeof second);
                    sums[i][v] = dot4(sums[i][v], low, _mm256_set1_epi32(first));
                    sums[i][v] = dot4(sums[i][v], high, _mm256_set1_epi32(second));
                }
            }
        }
        const __m128i *d = (const __m128i *)group;
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128(d));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128(d + 1));
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            const __m256 sx = _mm256_set1_ps(s_x[i * groups + t]);
            acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i][0]), _mm256_mul_ps(d0, sx),
                                        acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i][1]), _mm256_mul_ps(d1, sx),
                                        acc[i][1]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float r[W4_PANEL];
        memcpy(r, acc[i], sizeof r);
        for (int64_t j = 0; j < cols; j++) y[i * n_len + j] = bias ? r[j] + bias[j] : r[j];
    }
}

#else /* without AVX2: the same integers and the same float operations, one at a time */

ALWAYS_INLINE void w4_tile(const int8_t *p, int64_t row_bytes, const float *s_x,
                           const int32_t *offset, int64_t groups, const uint8_t *panel, int mr,
                           const float *bias, float *y, int64_t n_len, int64_t cols) {
    for (int i = 0; i < mr; i++)
        for (int64_t j = 0; j < cols; j++) {
            const int v = (int)(j / 8), c = (int)(j % 8);
            float acc = 0.0f;
            for (int64_t t = 0; t < groups; t++) {
                const uint8_t *group = panel + t * W4_GROUP_BYTES;
                int32_t sum = offset[i * groups + t];
                for (int s = 0; s < 4; s++)
                    for (int l = 0; l < 4; l++) {
                        const uint8_t byte = group[W4_PANEL * 2 + s * 64 + v * 32 + 4 * c + l];
                        const int8_t *pk = p + i * row_bytes + t * W4_GROUP + 8 * s + l;
                        sum += (int32_t)(byte & 15) * pk[0] + (int32_t)(byte >> 4) * pk[4];
                    }
                uint16_t h;
                memcpy(&h, group + 2 * j, sizeof h);
                acc = fmaf((float)sum, half_to_float(h) * s_x[i * groups + t], acc);
            }
            y[i * n_len + j] = bias ? acc + bias[j] : acc;
        }
}

#endif

/* Every row of p by panel g, in tiles of at most W4_MR rows, as even as they go. */
static void w4_rows_by_panel(const int8_t *p, int64_t row_bytes, const float *s_x,
                             const int32_t *offset, int64_t groups, const uint8_t *panels,
                             const float *bias, float *y, int64_t m_len, int64_t n_len,
                             int64_t g) {
    const int64_t n = g * W4_PANEL, cols = n_len - n < W4_PANEL ? n_len - n : W4_PANEL;
    const uint8_t *panel = panels + (size_t)g * groups * W4_GROUP_BYTES;
    const float *b = bias ? bias + n : NULL;
    const int64_t tiles = (m_len + W4_MR - 1) / W4_MR;
    for (int64_t t = 0, m = 0; t < tiles; t++) {
        const int64_t left = tiles - t, mr = (m_len - m + left - 1) / left;
#define W4_TILE(rows)                                                                          \
    w4_tile(p + m * row_bytes, row_bytes, s_x + m * groups, offset + m * groups, groups, panel, \
            rows, b, y + m * n_len + n, n_len, cols)
        switch (mr) {
        case 4: W4_TILE(4); break;
        case 3: W4_TILE(3); break;
        case 2: W4_TILE(2); break;
        default: W4_TILE(1); break;
        }
#undef W4_TILE
        m += mr;
    }
}

/* y (M, N) = x (M, K) W (N, K)^T + bias, W's panels packed by kernels.pack_w4a8 (their d
   inside). Returns -1 if it has no memory for the quantised rows. */
int tformer_linear_w4a8(const float *x, const uint8_t *panels, const float *bias, float *y,
                        int64_t m_len, int64_t n_len, int64_t k_len) {
    if (m_len == 0) return 0;
    const int64_t groups = (k_len + W4_GROUP - 1) / W4_GROUP, row_bytes = groups * W4_GROUP;
    const size_t p_bytes = (size_t)(m_len * row_bytes + 63) / 64 * 64;
    /* 64 bytes more than used: with K = 0 none would be asked for, and row_buffer's NULL
       would read as no memory */
    const size_t scales = (size_t)(m_len * groups) * (sizeof(float) + sizeof(int32_t));
    int8_t *p = row_buffer(p_bytes + scales + 64);
    if (!p) return -1;
    float *s_x = (float *)(p + p_bytes);
    int32_t *offset = (int32_t *)(s_x + m_len * groups);
    const int64_t n_panels = (n_len + W4_PANEL - 1) / W4_PANEL;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m_len; i++)
            quantise_groups(x + i * k_len, k_len, groups, p + i * row_bytes, s_x + i * groups,
                            offset + i * groups);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < n_panels; g++)
            w4_rows_by_panel(p, row_bytes, s_x, offset, groups, panels, bias, y, m_len, n_len,
                             g);
    }
    return 0;
}

/* The output columns per panel, for packing weights (kernels.pack_w4a8). */
int tformer_w4a8_panel(void) { return W4_PANEL; }
