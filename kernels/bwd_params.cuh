// Shared by the backward kernels (bwd.cu and the Hopper hbwd.cu): their
// parameters (mirrored by cuda-driver/src/backward.rs) and the K fusion.
#pragma once
#include <stdint.h>

#include "common.cuh"

// KV entries and query heads one backward launch can address (per-head G).
#define DA_BWD_KV_MAX 64
#define DA_BWD_QLIST_MAX 256

// Parameters of da_bwd (mirrored by cuda-driver/src/backward.rs). Strides in elements.
struct BwdParams {
    const void* q;        // [batch, q_len, q_heads, d], input type
    const void* k;        // [batch, kv_len, kv_heads, d]
    const void* v;        // [batch, kv_len, kv_heads, d]
    const void* d_out;    // [batch, q_len, q_heads, d], input type
    const void* qhat;     // [batch][q_heads][q_len][d]: Qhat rows (KW columns), G > 1
    const void* qtil;     // [batch][q_heads][q_len][d]: Qtilde rows, G > 1
    const uint16_t* plan; // [batch][q_heads][num_blocks][d]; unused when G = 1
    const float* lse;     // dense [batch, q_heads, q_len], natural log
    const float* delta;   // dense [batch, q_heads, q_len]
    float* dq_acc;        // [batch][q_heads][q_len][d] floats: dQhat in the layout of da::dq_acc_index
    void* dk;             // [batch, kv_len, kv_heads, d], f32 or the input type
    void* dv;
    long long q_batch_stride, q_row_stride, q_head_stride;
    long long k_batch_stride, k_row_stride, k_head_stride;
    long long v_batch_stride, v_row_stride, v_head_stride;
    long long do_batch_stride, do_row_stride, do_head_stride;
    long long dk_batch_stride, dk_row_stride, dk_head_stride;
    long long dv_batch_stride, dv_row_stride, dv_head_stride;
    int q_len, kv_len, q_heads, heads_per_kv, num_blocks, block_rows, batch_offset;
    float scale_log2;     // softmax scale * log2(e)
    float scale;
    int causal, dk_f32, dv_f32;
    // 0: blockIdx.y is the KV head, its query heads are hk*heads_per_kv + 0..heads_per_kv,
    // dK/dV are overwritten. Otherwise entry e = blockIdx.y: KV head kv_head[e], query
    // heads q_list[kv_first[e] .. + kv_count[e]], dK/dV added to (kv_accum[e] != 0).
    int kv_map_len;
    int sample;           // Fusion::Sample (else Mean)
    uint16_t kv_head[DA_BWD_KV_MAX], kv_first[DA_BWD_KV_MAX], kv_count[DA_BWD_KV_MAX], kv_accum[DA_BWD_KV_MAX];
    uint16_t q_list[DA_BWD_QLIST_MAX];
};

// Parameters of da_bwd_prep and da_bwd_dq. Strides in elements.
struct BwdRowParams {
    const void* q;        // [batch, q_len, q_heads, d], input type (read when group > 1)
    void* qhat;           // [batch][q_heads][q_len][d] input type: Qhat, first KW columns (group > 1)
    void* qtil;           // [batch][q_heads][q_len][d] input type: Qtilde (group > 1)
    const void* o;        // [batch, q_len, q_heads, d], f32 or the input type
    const void* d_out;    // same shape, f32 or the input type
    void* do_conv;        // dense [batch][q_heads][q_len][d] input type, written when do_f32
    float* delta;         // dense [batch, q_heads, q_len]
    float* dq_acc;        // [batch][q_heads][q_len][d] floats: dQhat in the layout of da::dq_acc_index
    const uint16_t* plan; // [batch][q_heads][num_blocks][d]; unused when group == 1
    void* dq;             // [batch, q_len, q_heads, d], f32 or the input type
    long long q_batch_stride, q_row_stride, q_head_stride;
    long long o_batch_stride, o_row_stride, o_head_stride;
    long long do_batch_stride, do_row_stride, do_head_stride;
    long long dq_batch_stride, dq_row_stride, dq_head_stride;
    int q_len, q_heads, group, num_blocks, block_rows, batch_offset;
    int o_f32, do_f32, dq_f32, sample, head_map_len;
    float scale;
    // blockIdx.y -> query head; identity when head_map_len == 0.
    uint16_t head_map[DA_HEAD_MAP_MAX];
};

static_assert(sizeof(BwdParams) == 1320, "BwdParams layout (cuda-driver/src/backward.rs)");
static_assert(sizeof(BwdRowParams) == 736, "BwdRowParams layout (cuda-driver/src/backward.rs)");

namespace da {

// Two f32 adds to global memory (one vector reduction on sm_90).
__device__ __forceinline__ void red_add2(float* addr, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(addr), make_float2(a, b));
#else
    atomicAdd(addr, a);
    atomicAdd(addr + 1, b);
#endif
}

// Stores the pair `v` at element `off` of a dK or dV buffer (f32 when `f32`,
// else T), added to what is there when `accum` (a KV head's gradients summed
// over the launches of mixed group sizes).
template <typename T>
__device__ __forceinline__ void store_grad2(void* base, bool f32, long long off, float2 v, bool accum) {
    if (f32) {
        float2* dst = reinterpret_cast<float2*>(static_cast<float*>(base) + off);
        if (accum) {
            const float2 old = *dst;
            v.x += old.x;
            v.y += old.y;
        }
        *dst = v;
    } else {
        uint32_t* dst = reinterpret_cast<uint32_t*>(static_cast<T*>(base) + off);
        if (accum) {
            const T* old = reinterpret_cast<const T*>(dst);
            v.x += Num<T>::to_float(old[0]);
            v.y += Num<T>::to_float(old[1]);
        }
        *dst = Num<T>::pack(v.x, v.y);
    }
}

// Index of dQhat element (row i, column t < dg) of a head in the f32
// accumulator (`dq_acc`, workspace), `head_row0` = (b * q_heads + h) * q_len.
// A head's rows come in tiles of 64 (tile start m0 = i - i % 64, v = min(64,
// q_len - m0) rows); a tile lives in the 64 * d floats from (head_row0 + m0) * d
// as column panels of pw = min(dg, 64) columns, each panel v rows of pw floats
// (row r = i % 64), the 8-float chunks of a row XOR-swizzled by r % 8 when
// pw = 64. So a tile's panel is one contiguous range: hbwd.cu stages it in
// shared memory without bank conflicts and adds it with one bulk reduction.
__device__ __forceinline__ long long dq_acc_index(long long head_row0, int i, int t, int dg, int d, int q_len) {
    // Panel t / pw and column t % pw: t >> 6 and t & 63 (t < dg, so both hold for dg < 64 too).
    const int r = i & 63, m0 = i - r, v = min(64, q_len - m0);
    const int pw = dg < 64 ? dg : 64, c = t >> 6, u = t & 63;
    const int su = pw == 64 ? (u ^ ((r & 7) << 3)) : u;
    return (head_row0 + m0) * d + (long long)c * v * pw + r * pw + su;
}

}  // namespace da
