// Shared definitions of the DistrAttention CUDA kernels: the parameter
// structs (mirrored by `#[repr(C)]` structs in cuda-driver/src/params.rs:
// keep both in sync) and thin wrappers over the PTX instructions used
// (cp.async, ldmatrix, mma.sync m16n8k16). Needs sm_80 or newer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "inverse_gray.cuh"

// Names of the attention units' entry points: DA_CAT pastes tokens
// (da_<kernel>_<dtype>_d<D>_g<G>...), DA_T is the unit's element type (the
// build script defines DA_DTYPE and DA_DTYPE_IS_BF16 per unit).
#define DA_CAT_(a, b) a##b
#define DA_CAT(a, b) DA_CAT_(a, b)
#if DA_DTYPE_IS_BF16
#define DA_T __nv_bfloat16
#else
#define DA_T __half
#endif

// Query heads one attention launch can address through `head_map`.
#define DA_HEAD_MAP_MAX 256

// Parameters of the plan kernel. Strides are in elements.
struct PlanParams {
    const void* q;            // [batch, q_len, heads, head_dim], f16 or bf16
    uint16_t* plan;           // [batch][heads][num_blocks][head_dim]
    const float* proj;        // R, row-major [block_rows][num_proj]
    long long q_batch_stride, q_row_stride, q_head_stride;
    int q_len, heads, head_dim, block_rows, num_proj, num_blocks, batch_offset, batch;
};

// Parameters of the attention kernel. Strides are in elements.
struct FwdParams {
    const void* q;            // [batch, q_len, q_heads, d]
    const void* k;            // [batch, kv_len, kv_heads, d]
    const void* v;            // [batch, kv_len, kv_heads, d]
    void* o;                  // [batch, q_len, q_heads, d], f32 or the input type
    float* lse;               // dense [batch, q_heads, q_len] or null
    const uint16_t* plan;     // [batch][q_heads][num_blocks][d]; unused when G = 1
    long long q_batch_stride, q_row_stride, q_head_stride;
    long long k_batch_stride, k_row_stride, k_head_stride;
    long long v_batch_stride, v_row_stride, v_head_stride;
    long long o_batch_stride, o_row_stride, o_head_stride;
    int q_len, kv_len, q_heads, heads_per_kv, num_blocks, batch_offset;
    float scale_log2;         // softmax scale * log2(e)
    int causal, sample, out_f32, head_map_len;
    // blockIdx.y -> query head; identity when head_map_len == 0.
    uint16_t head_map[DA_HEAD_MAP_MAX];
};

// The Hopper kernel's second parameter: TMA descriptors (CUtensorMap, from
// the driver's cuTensorMapEncodeTiled) of K and V as 4-D tensors (d, n,
// kv_head, batch) of 16-bit elements, boxes of 64 x 64 (d x n), 128-byte
// swizzle, zero fill past the ends.
struct alignas(64) TmaDesc {
    unsigned long long opaque[16];
};
struct HTmaMaps {
    TmaDesc k, v;
};

static_assert(sizeof(PlanParams) == 80, "PlanParams layout (cuda-driver/src/params.rs)");
static_assert(sizeof(FwdParams) == 704, "FwdParams layout (cuda-driver/src/params.rs)");
static_assert(sizeof(HTmaMaps) == 256, "HTmaMaps layout (cuda-driver/src/params.rs)");

namespace da {

template <typename T> struct Num;

template <> struct Num<__half> {
    static constexpr bool kBf16 = false;
    __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
    __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
    __device__ __forceinline__ static uint32_t pack(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};

template <> struct Num<__nv_bfloat16> {
    static constexpr bool kBf16 = true;
    __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    __device__ __forceinline__ static uint32_t pack(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; zero-fills when !pred.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
    int bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

// 16-byte asynchronous copy global -> shared.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

// 8-byte asynchronous copy global -> shared; zero-fills when !pred.
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, bool pred) {
    int bytes = pred ? 8 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

// 4-byte asynchronous copy global -> shared.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

// 4-byte asynchronous copy global -> shared; zero-fills when !pred.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
    int bytes = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b, m16n8k16, f32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kBf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Sum of a group's K values for one key, rounded once to T (K-hat in the
// mma.sync forward and both backward kernels, so the backward's P is the
// forward's). For G = 2 the input type's own add is the same single rounding
// of the exact sum.
template <typename T, int G>
__device__ __forceinline__ T group_sum(const T (&e)[G]) {
    if constexpr (G == 2) {
        return __hadd(e[0], e[1]);
    } else {
        float f[G];
#pragma unroll
        for (int i = 0; i < G; ++i) f[i] = Num<T>::to_float(e[i]);
#pragma unroll
        for (int w = 1; w < G; w *= 2)
#pragma unroll
            for (int i = 0; i < G; i += 2 * w) f[i] += f[i + w];
        return Num<T>::from_float(f[0]);
    }
}

}  // namespace da
