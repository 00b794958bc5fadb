/* AdamW's update of float32 parameters, one pass over every tensor of a step, writing a
   bfloat16 copy of each updated weight where asked (the copy a bf16 matmul reads next).

   For each element, with the gradient g, moments m and v, parameter p (train/optim.py has
   the equations and where they come from):

     g = g / s                      when clipping: s = max(1, ||g|| / c), written back to g
     p = p (1 - lr wd)              decoupled weight decay, when wd != 0
     m = m + (1 - b1) (g - m)       as a lerp: fma(w, g - m, m), w = 1 - b1 (w < 1/2), else
                                    fma(w - 1, g - m, g)
     v = fma((1 - b2) g, g, v b2)  one rounding for the product and the sum
     p = p + (-step) m / (sqrt(v) / sqrt(1 - b2^t) + eps),   step = lr / (1 - b1^t)
     copy = bf16(p)                 rounded to nearest even, as torch's cast (NaN: 0xFFFF)

   in float32, each operation rounded once (an fma once for both of its operations), in
   this order: torch's fused AdamW on the CPU (torch.optim.AdamW(fused=True)) computes the
   same operations in the same order, so the two agree to the bit (a test holds them to
   it) for tensors whose size is a multiple of 16: torch updates the elements past its
   vector loop's last whole vector (size % 16 with AVX-512, % 8 with AVX2) in a scalar loop
   of its own, whose v can differ by an ulp, and the caller leaves such tensors to torch
   (train/optim.py). The match rests on torch's build rounding v's product and sum once,
   as its CPU kernels are built (the test checks it against the torch installed). This
   file is compiled without contraction (build.py): the compiler would fuse other
   multiplies and adds into fmas, and change the last bit.

   The tensors' elements, end to end, are split into one contiguous range per OpenMP
   thread: one call reads and writes every state once, at the memory's speed. */

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "common.h"

#define PARALLEL_FROM 65536 /* elements in all; fewer are not worth waking the threads for */

struct adamw_tensor {
    float *param, *grad, *exp_avg, *exp_avg_sq;
    uint16_t *copy; /* the bf16 copy to write, or NULL */
    int64_t size;
    double step_size;             /* lr / (1 - b1^t) */
    double bias_correction2_sqrt; /* sqrt(1 - b2^t) */
};

struct adamw_settings {
    double lr, beta1, beta2, weight_decay, eps;
    float grad_scale; /* s above, or 0 for none */
};

struct coefficients {
    float w, beta2, c2, eps, decay, scale, neg_step, bc2;
    int decays, small;
};

/* Element i's update. */
static inline void update_one(const struct adamw_tensor *x, const struct coefficients *k,
                              int64_t i) {
    float *p = x->param, *g = x->grad, *m = x->exp_avg, *v = x->exp_avg_sq;
    float grad = g[i];
    if (k->scale != 0.0f) {
        grad = grad / k->scale;
        g[i] = grad;
    }
    float param = p[i];
    if (k->decays) param = param * k->decay;
    const float mi = k->small ? fmaf(k->w, grad - m[i], m[i])
                              : fmaf(k->w - 1.0f, grad - m[i], grad);
    const float vi = fmaf(k->c2 * grad, grad, v[i] * k->beta2);
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / k->bc2 + k->eps;
    param = param + k->neg_step * mi / denom;
    p[i] = param;
    if (x->copy) /* NaN as torch's cast gives it */
        x->copy[i] = param != param ? 0xFFFF : float_to_bf16_bits(param);
}

#ifdef __AVX512F__
#include <immintrin.h>

/* update_one on elements [lo, hi), 16 at a time (both multiples of 16), the same
   operations on 16 lanes. The copy is written past the caches (a streaming store): nothing
   reads it before the next forward pass, and a normal store would first read the line. */
static void update_vectors(const struct adamw_tensor *x, const struct coefficients *k,
                           int64_t lo, int64_t hi) {
    const __m512 w = _mm512_set1_ps(k->w), w1 = _mm512_set1_ps(k->w - 1.0f);
    const __m512 beta2 = _mm512_set1_ps(k->beta2), c2 = _mm512_set1_ps(k->c2);
    const __m512 eps = _mm512_set1_ps(k->eps), decay = _mm512_set1_ps(k->decay);
    const __m512 scale = _mm512_set1_ps(k->scale), neg_step = _mm512_set1_ps(k->neg_step);
    const __m512 bc2 = _mm512_set1_ps(k->bc2);
    const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i nan_bits = _mm512_set1_epi32((int)0xFFFF0000u);
    float *p = x->param, *g = x->grad, *m = x->exp_avg, *v = x->exp_avg_sq;
    for (int64_t i = lo; i < hi; i += 16) {
        __m512 grad = _mm512_loadu_ps(g + i);
        if (k->scale != 0.0f) {
            grad = _mm512_div_ps(grad, scale);
            _mm512_storeu_ps(g + i, grad);
        }
        __m512 param = _mm512_loadu_ps(p + i);
        if (k->decays) param = _mm512_mul_ps(param, decay);
        const __m512 mi = _mm512_loadu_ps(m + i), diff = _mm512_sub_ps(grad, mi);
        const __m512 m_new = k->small ? _mm512_fmadd_ps(w, diff, mi)
                                      : _mm512_fmadd_ps(w1, diff, grad);
        const __m512 v_new = _mm512_fmadd_ps(_mm512_mul_ps(c2, grad), grad,
                                             _mm512_mul_ps(_mm512_loadu_ps(v + i), beta2));
        _mm512_storeu_ps(m + i, m_new);
        _mm512_storeu_ps(v + i, v_new);
        const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v_new), bc2), eps);
        param = _mm512_add_ps(param, _mm512_div_ps(_mm512_mul_ps(neg_step, m_new), denom));
        _mm512_storeu_ps(p + i, param);
        if (x->copy) { /* float_to_bf16_bits on 16 lanes */
            const __m512i bits = _mm512_castps_si512(param);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
            __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(round, odd));
            const __mmask16 nan = _mm512_cmp_ps_mask(param, param, _CMP_UNORD_Q);
            rounded = _mm512_mask_mov_epi32(rounded, nan, nan_bits); /* torch's NaN */
            const __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
            if (((uintptr_t)(x->copy + i) & 31) == 0)
                _mm256_stream_si256((__m256i *)(x->copy + i), half);
            else
                _mm256_storeu_si256((__m256i *)(x->copy + i), half);
        }
    }
}
#endif

/* The update of elements [lo, hi) of one tensor. */
static void update(const struct adamw_tensor *x, const struct adamw_settings *s, int64_t lo,
                   int64_t hi) {
    struct coefficients k;
    k.w = (float)(1.0 - s->beta1);
    k.beta2 = (float)s->beta2;
    k.c2 = (float)(1.0 - s->beta2);
    k.eps = (float)s->eps;
    k.decay = (float)(1.0 - s->lr * s->weight_decay);
    k.scale = s->grad_scale;
    k.neg_step = (float)(-x->step_size);
    k.bc2 = (float)x->bias_correction2_sqrt;
    k.decays = s->weight_decay != 0.0;
    k.small = fabsf(k.w) < 0.5f;
#ifdef __AVX512F__
    const int64_t whole = lo + (hi - lo) / 16 * 16;
    if (lo % 16 == 0) {
        update_vectors(x, &k, lo, whole);
        lo = whole;
    }
#endif
    for (int64_t i = lo; i < hi; i++)
        update_one(x, &k, i);
}

/* Elements [begin, end) of the tensors laid end to end. */
static void update_range(const struct adamw_tensor *tensors, int64_t count,
                         const struct adamw_settings *s, int64_t begin, int64_t end) {
    int64_t offset = 0; /* where tensor t starts in the whole */
    for (int64_t t = 0; t < count && offset < end; offset += tensors[t].size, t++) {
        const int64_t lo = begin > offset ? begin - offset : 0;
        const int64_t hi = end - offset < tensors[t].size ? end - offset : tensors[t].size;
        if (lo < hi) update(&tensors[t], s, lo, hi);
    }
}

void tformer_adamw_f32(const struct adamw_tensor *tensors, int64_t count,
                       const struct adamw_settings *settings) {
    int64_t n = 0;
    for (int64_t t = 0; t < count; t++)
        n += tensors[t].size;
    if (n < PARALLEL_FROM) {
        update_range(tensors, count, settings, 0, n);
#ifdef __AVX512F__
        _mm_sfence();
#endif
        return;
    }
#pragma omp parallel
    {
        const int64_t used = omp_get_num_threads(), t = omp_get_thread_num();
        /* ranges start on whole cache lines (16 floats), as the vector loops like */
        const int64_t begin = n * t / used / 16 * 16;
        const int64_t end = t + 1 == used ? n : n * (t + 1) / used / 16 * 16;
        update_range(tensors, count, settings, begin, end);
#ifdef __AVX512F__
        _mm_sfence(); /* the streaming stores reach memory before the call returns */
#endif
    }
}
