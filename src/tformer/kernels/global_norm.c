/* The sum of squares of many float32 arrays taken as one vector: ||g||^2 for gradient
   clipping, where g is every parameter's gradient.

     ||g||^2 = sum over arrays a, elements i of a[i]^2

   Each square is widened to double and summed in double: the error grows with the count
   (~1e-13 relative at 20M elements), far below float32's rounding of the norm, where
   torch's float32 norm of one 38M-element gradient was off in the third digit
   (docs/LOG.md). The arrays' elements, end to end, are
   split into one contiguous range per OpenMP thread, so one call reads every gradient once
   at the memory's speed, where a norm per tensor started and joined the threads once per
   tensor. The threads' partial sums are added in thread order. */

#include <omp.h>
#include <stdint.h>

#define PARALLEL_FROM 65536 /* elements in all; fewer are not worth waking the threads for */

/* The sum of squares of elements [begin, end) of the arrays laid end to end. */
static double range_sum(const float *const *arrays, const int64_t *sizes, int64_t count,
                        int64_t begin, int64_t end) {
    double total = 0.0;
    int64_t offset = 0; /* where array a starts in the whole */
    for (int64_t a = 0; a < count && offset < end; offset += sizes[a], a++) {
        int64_t lo = begin > offset ? begin - offset : 0;
        int64_t hi = end - offset < sizes[a] ? end - offset : sizes[a];
        const float *x = arrays[a];
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = lo; i < hi; i++)
            sum += (double)x[i] * (double)x[i];
        total += sum;
    }
    return total;
}

double tformer_sum_squares_f32(const float *const *arrays, const int64_t *sizes, int64_t count) {
    int64_t n = 0;
    for (int64_t a = 0; a < count; a++)
        n += sizes[a];
    if (n < PARALLEL_FROM)
        return range_sum(arrays, sizes, count, 0, n);
    double partial[256] = {0.0};
    int threads = 1;
#pragma omp parallel
    {
        int t = omp_get_thread_num(), used = omp_get_num_threads() < 256 ? omp_get_num_threads() : 256;
#pragma omp single
        threads = used;
        /* the implicit barrier after single: every thread sees `threads` */
        if (t < used)
            partial[t] = range_sum(arrays, sizes, count, n * t / used, n * (t + 1) / used);
    }
    double total = 0.0;
    for (int t = 0; t < threads; t++)
        total += partial[t];
    return total;
}
