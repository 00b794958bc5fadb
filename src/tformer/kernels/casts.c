/* Between float32 and bfloat16, for a small model's bf16 training step (nn/block_step.py):

     round:  b = bf16(x)             to nearest even, as torch rounds; a NaN stays a NaN
     add:    y = x + float32(b)      the residual add of a sublayer's bf16 output: one
                                     float32 rounding, as torch's mixed-dtype add

   torch's mixed-dtype add first casts b into a temporary, a pass over memory of its own;
   here each is one pass, split over the OpenMP threads when there are enough elements. */

#include <omp.h>
#include <stdint.h>

#include "common.h"

#define PARALLEL_FROM 32768 /* elements; fewer are not worth waking the threads for */

/* Each loop runs over [begin, end): the whole of it where n is small, else a share per
   thread (common.h's my_share). (A loop under `omp parallel for simd if (...)` is not
   vectorised when the condition is false.) */
static void round_range(const float *x, uint16_t *b, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) b[i] = float_to_bf16_keeping_nan(x[i]);
}

static void add_range(const float *x, const uint16_t *b, float *y, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) y[i] = x[i] + bf16_bits_to_float(b[i]);
}

/* b = bf16(x), n elements. */
void tformer_round_bf16(const float *x, uint16_t *b, int64_t n) {
    if (n < PARALLEL_FROM) {
        round_range(x, b, 0, n);
        return;
    }
#pragma omp parallel
    {
        int64_t begin, end;
        my_share(n, &begin, &end);
        round_range(x, b, begin, end);
    }
}

/* y = x + float32(b), n elements (y may be x). */
void tformer_add_bf16(const float *x, const uint16_t *b, float *y, int64_t n) {
    if (n < PARALLEL_FROM) {
        add_range(x, b, y, 0, n);
        return;
    }
#pragma omp parallel
    {
        int64_t begin, end;
        my_share(n, &begin, &end);
        add_range(x, b, y, begin, end);
    }
}
