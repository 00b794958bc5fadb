/* Denormal numbers flushed to zero on every thread of the OpenMP pool.

   Numbers below ~1.2e-38 (denormals) take a slow path in the CPU's floating-point units.
   torch.set_flush_denormal sets the flush-to-zero and denormals-are-zero modes (FTZ, DAZ:
   bits 15 and 6 of the MXCSR register on x86) on the calling thread only, but half of every
   parallel operation runs on the pool's other threads. Here every pool thread sets the mode
   itself. That reaches torch's threads where torch and these kernels share one OpenMP
   runtime: true of the PyPI CPU wheels, whose libgomp.so.1 is the one this library binds to
   (a test checks that torch's own operations are flushed on every thread).

   tformer_flush_denormals returns the number of threads set, or 0 where there is no such
   mode (not x86); tformer_denormals_flushed whether the calling thread flushes them. */

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

int tformer_denormals_flushed(void) { return (_mm_getcsr() & FLUSH_BITS) == FLUSH_BITS; }
#else
int tformer_flush_denormals(int on) {
    (void)on;
    return 0;
}

int tformer_denormals_flushed(void) { return 0; }
#endif
