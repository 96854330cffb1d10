// What the stage harnesses (cuda-driver/bench/hstage, bwdstage) share:
// CK(call), a CUDA runtime call that prints the failing call and exits on
// error, and fill_bf16, deterministic pseudo-random bf16 in [-1, 1).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define CK(x)                                                                                   \
    do {                                                                                        \
        cudaError_t e_ = (x);                                                                   \
        if (e_ != cudaSuccess) {                                                                \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            std::exit(1);                                                                       \
        }                                                                                       \
    } while (0)

// x[i] = a hash of (i, seed) scaled to [-1, 1), grid-stride (any launch shape).
static __global__ void fill_bf16(__nv_bfloat16* x, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        x[i] = __float2bfloat16((float)(h & 0xFFFF) / 32768.f - 1.f);
    }
}
