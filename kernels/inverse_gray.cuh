// Position of `code` in the reflected binary Gray sequence (the core's
// inverse_gray): the plan key of a column's LSH code. Shared by the kernels
// (through common.cuh) and their host emulation (kernels/emu).
#pragma once

#include <stdint.h>

namespace da {

__host__ __device__ __forceinline__ uint32_t inverse_gray(uint32_t n) {
    n ^= n >> 1;
    n ^= n >> 2;
    n ^= n >> 4;
    n ^= n >> 8;
    n ^= n >> 16;
    return n;
}

}  // namespace da
