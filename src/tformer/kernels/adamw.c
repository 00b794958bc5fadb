/* AdamW's step for float32 parameters in one call: the gradients' global norm for
   clipping, then one pass over every tensor, counting each tensor's step and writing a
   bfloat16 copy of each updated weight where asked (the copy a bf16 matmul reads next).

   For each element, with the gradient g, moments m and v, parameter p (train/optim.py has
   the equations and where they come from):

     g = g / s                      when clipping: s = max(1, (||g|| + 1e-6) / c), written
                                    back to g; ||g|| over every tensor's gradient
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
   (train/optim.py): here only their gradients count towards the norm. The match rests on
   torch's build rounding v's product and sum once, as its CPU kernels are built (the test
   checks it against the torch installed). This file is compiled without contraction
   (build.py): the compiler would fuse other multiplies and adds into fmas, and change the
   last bit.

   The step t is a float32 scalar per tensor, as torch keeps it: t + 1 is written back, and
   the bias corrections are taken from it in double, as torch's kernel and the Python
   around it take them. The norm is kernels/global_norm.c's sum of squares over every
   gradient in the order given (the value train/optim.py's global_norm gives), its square
   root rounded to float32, and s is computed in float32 as the float32 tensors of the
   plain path compute it.

   The tensors' elements, end to end, are split into one contiguous range per OpenMP
   thread: one call reads and writes every state once, at the memory's speed. The norm's
   pass splits every gradient the same way (to within 16 elements where all are updated
   here), so each thread mostly updates what it has just read. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define PARALLEL_FROM 65536 /* elements in all; fewer are not worth waking the threads for */

struct adamw_tensor { /* one parameter's, as train/optim.py's plan lays it out */
    float *param, *exp_avg, *exp_avg_sq;
    float *step;      /* t before this step, a float32 scalar: t + 1 is written back */
    int64_t size;
    int64_t group;    /* its group's index */
    int64_t compiled; /* 1: updated here; 0: its gradient counts towards the norm only */
};

struct adamw_group {
    double lr, beta1, beta2, weight_decay, eps;
};

struct coefficients {
    float w, beta2, c2, eps, decay, scale, neg_step, bc2;
    int decays, small;
};

struct job { /* one tensor's update: where its states are, and its coefficients */
    float *param, *grad, *exp_avg, *exp_avg_sq;
    uint16_t *copy; /* the bf16 copy to write, or NULL */
    int64_t size;
    struct coefficients k;
};

/* Element i's update. */
static inline void update_one(const struct job *x, const struct coefficients *k, int64_t i) {
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
static void update_vectors(const struct job *x, const struct coefficients *k, int64_t lo,
                           int64_t hi) {
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
static void update(const struct job *x, int64_t lo, int64_t hi) {
#ifdef __AVX512F__
    const int64_t whole = lo + (hi - lo) / 16 * 16;
    if (lo % 16 == 0) {
        update_vectors(x, &x->k, lo, whole);
        lo = whole;
    }
#endif
    for (int64_t i = lo; i < hi; i++)
        update_one(x, &x->k, i);
}

/* Elements [begin, end) of the jobs' tensors laid end to end. */
static void update_range(const struct job *jobs, int64_t count, int64_t begin, int64_t end) {
    int64_t offset = 0; /* where job j's tensor starts in the whole */
    for (int64_t j = 0; j < count && offset < end; offset += jobs[j].size, j++) {
        const int64_t lo = begin > offset ? begin - offset : 0;
        const int64_t hi = end - offset < jobs[j].size ? end - offset : jobs[j].size;
        if (lo < hi) update(&jobs[j], lo, hi);
    }
}

/* A tensor's coefficients for this step: its group's settings g, its step t after this
   one, and the scale s (0 for none). */
static struct coefficients coefficients(const struct adamw_group *g, float t, float scale) {
    struct coefficients k;
    k.w = (float)(1.0 - g->beta1);
    k.beta2 = (float)g->beta2;
    k.c2 = (float)(1.0 - g->beta2);
    k.eps = (float)g->eps;
    k.decay = (float)(1.0 - g->lr * g->weight_decay);
    k.scale = scale == 1.0f ? 0.0f : scale; /* g / 1 is g: nothing to divide or write */
    /* as torch's fused AdamW: the bias corrections in double */
    k.neg_step = (float)(-(g->lr / (1.0 - pow(g->beta1, (double)t))));
    k.bc2 = (float)sqrt(1.0 - pow(g->beta2, (double)t));
    k.decays = g->weight_decay != 0.0;
    k.small = fabsf(k.w) < 0.5f;
    return k;
}

double tformer_sum_squares_f32(const float *const *arrays, const int64_t *sizes, int64_t count);

/* One AdamW step of `count` tensors: grads[i] and copies[i] (NULL: no copy) are tensor
   i's gradient and bf16 copy; groups[tensors[i].group] its settings. With max_norm > 0
   the gradients are clipped to that global norm, and out[0] is the norm before clipping,
   out[1] the scale s (1 where no clipping is needed); without, both are 0. Returns 0, or
   1 if its working memory could not be allocated (nothing is changed then). */
int tformer_adamw_step_f32(const struct adamw_tensor *tensors, float *const *grads,
                           uint16_t *const *copies, int64_t count,
                           const struct adamw_group *groups, double max_norm, float *out) {
    struct job *jobs = malloc((count > 0 ? count : 1) * sizeof *jobs);
    int64_t *sizes = malloc((count > 0 ? count : 1) * sizeof *sizes);
    if (jobs == NULL || sizes == NULL) {
        free(jobs);
        free(sizes);
        return 1;
    }
    float scale = 0.0f;
    out[0] = out[1] = 0.0f;
    if (max_norm > 0.0) {
        for (int64_t i = 0; i < count; i++)
            sizes[i] = tensors[i].size;
        const float norm = (float)sqrt(tformer_sum_squares_f32((const float *const *)grads,
                                                               sizes, count));
        /* (norm + 1e-6) / c, clamped below at 1, in float32; a NaN stays NaN */
        scale = (norm + 1e-6f) / (float)max_norm;
        if (scale < 1.0f) scale = 1.0f;
        out[0] = norm;
        out[1] = scale;
    }
    int64_t jobs_count = 0, n = 0;
    for (int64_t i = 0; i < count; i++) {
        const struct adamw_tensor *x = &tensors[i];
        if (!x->compiled) continue;
        const float t = *x->step + 1.0f;
        *x->step = t;
        struct job *j = &jobs[jobs_count++];
        j->param = x->param, j->grad = grads[i];
        j->exp_avg = x->exp_avg, j->exp_avg_sq = x->exp_avg_sq;
        j->copy = copies[i];
        j->size = x->size;
        j->k = coefficients(&groups[x->group], t, scale);
        n += x->size;
    }
    if (n < PARALLEL_FROM) {
        update_range(jobs, jobs_count, 0, n);
#ifdef __AVX512F__
        _mm_sfence();
#endif
    } else {
#pragma omp parallel
        {
            const int64_t used = omp_get_num_threads(), t = omp_get_thread_num();
            /* ranges start on whole cache lines (16 floats), as the vector loops like */
            const int64_t begin = n * t / used / 16 * 16;
            const int64_t end = t + 1 == used ? n : n * (t + 1) / used / 16 * 16;
            update_range(jobs, jobs_count, begin, end);
#ifdef __AVX512F__
            _mm_sfence(); /* the streaming stores reach memory before the call returns */
#endif
        }
    }
    free(jobs);
    free(sizes);
    return 0;
}
