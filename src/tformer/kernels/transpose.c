/* A matrix of 16-bit elements (bfloat16, float16) transposed into a new one:

     dst[j][i] = src[i][j],   src (R, C) with rows ld elements apart, dst (C, R) contiguous.

   torch's copy of a transposed view is slow for some shapes on the Intel machine (3.4-10.9
   ms for a 4096 x 1152 bf16 matrix), where a matrix product that reads the copy runs up to
   twice as fast as one that reads the transposed view (docs/LOG.md): the weight gradient
   dW = dy^T x of a linear layer. Here the matrix goes in square tiles small enough for the
   core's cache, split over the OpenMP threads, a column of tiles after another (each
   fills TILE whole rows of dst: 1.4x faster for GPT-2's (1024, 50257) logits' gradient on
   huge pages, docs/LOG.md). With AVX2 each tile goes in blocks of 16 x 16
   elements: sixteen 32-byte rows in registers, interleaved in four rounds (16-bit, 32-bit,
   64-bit and 128-bit units; block_16x16) into the block's sixteen columns, each stored as
   one row of dst. Elements outside whole blocks, and CPUs without AVX2, go one at a time. */

#include <stdint.h>
#include <string.h>

#include "common.h" /* block_16x16, block_16x16_to_f32 */

#if defined(__AVX2__)
#define BLOCK 16
#else
#define BLOCK 0 /* no blocks: every element one at a time */
#endif

#define TILE 64 /* elements a side: two 8 KB tiles stay in the first-level cache */

/* dst[j][i] = src[i][j] for i in [i0, i1), j in [j0, j1), one element at a time. */
static void elements(const uint16_t *src, int64_t rows, int64_t ld, uint16_t *dst, int64_t i0,
                     int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        uint16_t *out = dst + j * rows;
        for (int64_t i = i0; i < i1; i++) out[i] = src[i * ld + j];
    }
}

/* dst[j][i] = float(src[i][j]) for i in [i0, i1), j in [j0, j1), one element at a time. */
static void elements_to_f32(const uint16_t *src, int64_t rows, int64_t ld, float *dst,
                            int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        float *out = dst + j * rows;
        for (int64_t i = i0; i < i1; i++) {
            const uint32_t bits = (uint32_t)src[i * ld + j] << 16;
            memcpy(out + i, &bits, sizeof bits);
        }
    }
}

/* The tiles of src, split over the threads, each turned into dst: uint16_t elements, or
   with to_f32 float32 ones (each bf16 widened). */
static void transpose_tiles(const uint16_t *src, int64_t rows, int64_t cols, int64_t ld,
                            void *dst, int to_f32) {
    const int64_t row_tiles = (rows + TILE - 1) / TILE, col_tiles = (cols + TILE - 1) / TILE;
    /* a column of tiles at a time: its TILE rows of dst are written whole, one region */
#pragma omp parallel for collapse(2) schedule(static) if (rows * cols >= 65536)
    for (int64_t tj = 0; tj < col_tiles; tj++)
        for (int64_t ti = 0; ti < row_tiles; ti++) {
            const int64_t i0 = ti * TILE, j0 = tj * TILE;
            const int64_t i1 = i0 + TILE < rows ? i0 + TILE : rows;
            const int64_t j1 = j0 + TILE < cols ? j0 + TILE : cols;
            int64_t i_whole = i0, j_whole = j0; /* where the whole blocks end */
#if BLOCK
            i_whole = i0 + (i1 - i0) / BLOCK * BLOCK;
            j_whole = j0 + (j1 - j0) / BLOCK * BLOCK;
            for (int64_t i = i0; i < i_whole; i += BLOCK)
                for (int64_t j = j0; j < j_whole; j += BLOCK) {
                    if (to_f32)
                        block_16x16_to_f32(src + i * ld + j, ld, (float *)dst + j * rows + i,
                                           rows);
                    else
                        block_16x16(src + i * ld + j, ld, (uint16_t *)dst + j * rows + i, rows);
                }
#endif
            if (to_f32) { /* the last columns, then the last rows */
                elements_to_f32(src, rows, ld, dst, i0, i1, j_whole, j1);
                elements_to_f32(src, rows, ld, dst, i_whole, i1, j0, j_whole);
            } else {
                elements(src, rows, ld, dst, i0, i1, j_whole, j1);
                elements(src, rows, ld, dst, i_whole, i1, j0, j_whole);
            }
        }
}

void tformer_transpose16(const uint16_t *src, int64_t rows, int64_t cols, int64_t ld,
                         uint16_t *dst) {
    transpose_tiles(src, rows, cols, ld, dst, 0);
}

void tformer_transpose_bf16_to_f32(const uint16_t *src, int64_t rows, int64_t cols, int64_t ld,
                                   float *dst) {
    transpose_tiles(src, rows, cols, ld, dst, 1);
}
