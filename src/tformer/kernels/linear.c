/* Small-batch linear layers for decoding on the CPU:  y (M, N) = x (M, K) W(N, K)^T + b (N).

   Decoding one token multiplies a few activation rows by every weight matrix: the work is
   reading the weights, and the speed is the memory bandwidth. These loops stream each weight
   row once, keep it in L1 for all M activation rows, and split the N output rows over the
   OpenMP threads (the same runtime torch uses). Activations and accumulation stay float32;
   only the stored weights are narrower:

     float32   w
     bfloat16  w = the top 16 bits of a float32 (a shift converts it back exactly)
     int8      w = q * scale[n]   with q in [-127, 127] and one scale per output row

   Compiled on first use with the machine's C compiler (-O3 -march=native -fopenmp) by
   tformer/kernels/build.py; tformer.kernels.load() falls back to torch when it cannot. */

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float dot_f32(const float *w, const float *x, int64_t k_len) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < k_len; k++) acc += w[k] * x[k];
    return acc;
}

static inline float dot_bf16(const uint16_t *w, const float *x, int64_t k_len) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < k_len; k++) acc += bf16_to_float(w[k]) * x[k];
    return acc;
}

/* The compiler does not vectorise the int8 -> float conversion well on its own: with
   AVX-512, widen 16 weights at a time and keep two accumulators. */
static inline float dot_i8(const int8_t *w, const float *x, int64_t k_len) {
    int64_t k = 0;
    float acc = 0.0f;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; k + 32 <= k_len; k += 32) {
        __m128i q0 = _mm_loadu_si128((const __m128i *)(w + k));
        __m128i q1 = _mm_loadu_si128((const __m128i *)(w + k + 16));
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
        acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), acc0);
        acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), acc1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
    for (; k < k_len; k++) acc += (float)w[k] * x[k];
    return acc;
}

/* Four activation rows at once: each weight is loaded and converted once for all four, which
   matters once a batch has more than one row (the single-row loops are bound by memory, the
   multi-row ones by arithmetic). out[r] = dot(w, x + r * k_len). (For int8 the single-row
   AVX-512 loop above measured faster than this form.) */
static inline void dot4_f32(const float *w, const float *x, int64_t k_len, float *out) {
    const float *x0 = x, *x1 = x + k_len, *x2 = x + 2 * k_len, *x3 = x + 3 * k_len;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < k_len; k++) {
        float wk = w[k];
        a0 += wk * x0[k];
        a1 += wk * x1[k];
        a2 += wk * x2[k];
        a3 += wk * x3[k];
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

static inline void dot4_bf16(const uint16_t *w, const float *x, int64_t k_len, float *out) {
    const float *x0 = x, *x1 = x + k_len, *x2 = x + 2 * k_len, *x3 = x + 3 * k_len;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < k_len; k++) {
        float wk = bf16_to_float(w[k]);
        a0 += wk * x0[k];
        a1 += wk * x1[k];
        a2 += wk * x2[k];
        a3 += wk * x3[k];
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

void tformer_linear_f32(const float *x, const float *w, const float *bias, float *y,
                        int64_t m_len, int64_t n_len, int64_t k_len) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_len; n++) {
        const float *row = w + n * k_len;
        float b = bias ? bias[n] : 0.0f, four[4];
        int64_t m = 0;
        for (; m + 4 <= m_len; m += 4) {
            dot4_f32(row, x + m * k_len, k_len, four);
            for (int r = 0; r < 4; r++) y[(m + r) * n_len + n] = four[r] + b;
        }
        for (; m < m_len; m++) y[m * n_len + n] = dot_f32(row, x + m * k_len, k_len) + b;
    }
}

void tformer_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                         int64_t m_len, int64_t n_len, int64_t k_len) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_len; n++) {
        const uint16_t *row = w + n * k_len;
        float b = bias ? bias[n] : 0.0f, four[4];
        int64_t m = 0;
        for (; m + 4 <= m_len; m += 4) {
            dot4_bf16(row, x + m * k_len, k_len, four);
            for (int r = 0; r < 4; r++) y[(m + r) * n_len + n] = four[r] + b;
        }
        for (; m < m_len; m++) y[m * n_len + n] = dot_bf16(row, x + m * k_len, k_len) + b;
    }
}

void tformer_linear_i8(const float *x, const int8_t *w, const float *scale, const float *bias,
                       float *y, int64_t m_len, int64_t n_len, int64_t k_len) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_len; n++) {
        const int8_t *row = w + n * k_len;
        float b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < m_len; m++)
            y[m * n_len + n] = dot_i8(row, x + m * k_len, k_len) * scale[n] + b;
    }
}

/* What the build can report: 1 when the AVX-512 int8 loop is compiled in. */
int tformer_has_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
