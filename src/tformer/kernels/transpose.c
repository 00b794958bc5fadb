/* A matrix of 16-bit elements (bfloat16, float16) transposed into a new one:

     dst[j][i] = src[i][j],   src (R, C) with rows ld elements apart, dst (C, R) contiguous.

   torch's copy of a transposed view is slow for some shapes on the Intel machine (3.4-10.9
   ms for a 4096 x 1152 bf16 matrix), where a matrix product that reads the copy runs up to
   twice as fast as one that reads the transposed view (docs/LOG.md): the weight gradient
   dW = dy^T x of a linear layer. Here the matrix goes in square tiles small enough for the
   core's cache: each of a tile's output rows is written whole, from a column of the tile
   read out of the cache; the tiles are split over the OpenMP threads. It is 2.5-4x torch's
   copy for a training step's activations (4096 x 1152: 1.35 against 3.4-4.0 ms) but no
   faster for a (1024, 50257) one (76 ms): used only where a measurement chose it
   (nn/row_blocks.py). */

#include <stdint.h>

#define TILE 64 /* elements a side: two 8 KB tiles stay in the first-level cache */

void tformer_transpose16(const uint16_t *src, int64_t rows, int64_t cols, int64_t ld,
                         uint16_t *dst) {
    const int64_t row_tiles = (rows + TILE - 1) / TILE, col_tiles = (cols + TILE - 1) / TILE;
#pragma omp parallel for collapse(2) schedule(static) if (rows * cols >= 65536)
    for (int64_t ti = 0; ti < row_tiles; ti++)
        for (int64_t tj = 0; tj < col_tiles; tj++) {
            const int64_t i0 = ti * TILE, j0 = tj * TILE;
            const int64_t i1 = i0 + TILE < rows ? i0 + TILE : rows;
            const int64_t j1 = j0 + TILE < cols ? j0 + TILE : cols;
            for (int64_t j = j0; j < j1; j++) {
                uint16_t *out = dst + j * rows;
                for (int64_t i = i0; i < i1; i++) out[i] = src[i * ld + j];
            }
        }
}
