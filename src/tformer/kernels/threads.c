/* Denormal numbers flushed to zero on every thread of the OpenMP pool.

   Numbers below ~1.2e-38 (denormals) take a slow path in the CPU's floating-point units.
   torch.set_flush_denormal sets the flush-to-zero and denormals-are-zero modes (FTZ, DAZ:
   bits 15 and 6 of the MXCSR register on x86) on the calling thread only, but half of every
   parallel operation runs on the pool's other threads, which torch shares with these kernels
   (one libgomp per process). Here every pool thread sets the mode itself.

   Returns the number of threads set, or 0 where there is no such mode (not x86). */

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FLUSH_BITS 0x8040u /* FTZ (bit 15) | DAZ (bit 6) */

int tformer_flush_denormals(int on) {
    int threads = 0;
#pragma omp parallel reduction(+ : threads)
    {
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(on ? (csr | FLUSH_BITS) : (csr & ~FLUSH_BITS));
        threads += 1;
    }
    return threads;
}
#else
int tformer_flush_denormals(int on) {
    (void)on;
    return 0;
}
#endif
