// The plan kernel (ALGORITHM.md steps 1-3): per (batch, head, query block
// of block_rows rows) the P dot products of each head-dimension column with
// the projections R (f32 accumulation; padding rows of a short last block
// contribute zero), bits -> code -> inverse-Gray key, a stable sort by
// (key, column), and the permutation written as u16.
//
// One warp per (batch, head, block): a persistent grid of 4-warp CTAs loads
// R into shared memory once and walks the blocks. head_dim D in
// {16, 32, 64, 128}: the warp's lanes are QW = D/4 column quads x SW = 32/QW
// row slices; a lane reads its quad with one 8-byte load per row (rows
// s, s + SW, ...; eight loads in flight) and accumulates 4 x P dot products
// against R, read as 16-byte broadcasts (one per 16 FMAs; the row pitch
// P4 + 4 keeps the slices' rows in distinct banks). Slices are summed with a
// butterfly of shuffles (a fixed order: deterministic). The sort is a rank
// computation over the D keys of the block, by the same warp.
#include "common.cuh"

namespace da {

constexpr int kPlanThreads = 128;
constexpr int kPlanWarps = kPlanThreads / 32;
constexpr int kPlanUnroll = 8;
constexpr int kPlanMaxDim = 128;

template <typename T, int PMAX>
__device__ __forceinline__ void plan_body(const PlanParams& p) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int D = p.head_dim, P = p.num_proj, L = p.block_rows;
    const int QW = D / 4;        // column quads (a lane each)
    const int SW = 32 / QW;      // row slices
    const int quad = lane % QW, s = lane / QW;

    // [L][RP] R (rows padded with zeros) | [warps][D] sort keys (u64)
    const int RP = ((P + 3) & ~3) + 4;
    float* s_r = reinterpret_cast<float*>(smem);
    uint64_t* s_keys = reinterpret_cast<uint64_t*>(smem + ((L * RP * 4 + 15) & ~15)) + warp * kPlanMaxDim;

    const int r_rows = min(L, p.q_len);
    for (int i = tid; i < r_rows * RP; i += kPlanThreads) {
        const int r = i / RP, k = i % RP;
        s_r[i] = k < P ? p.proj[r * P + k] : 0.f;
    }
    __syncthreads();

    const long long units = (long long)p.batch * p.heads * p.num_blocks;
    for (long long u = (long long)blockIdx.x * kPlanWarps + warp; u < units;
         u += (long long)gridDim.x * kPlanWarps) {
        const int blk = (int)(u % p.num_blocks);
        const long long bh = u / p.num_blocks;
        const int h = (int)(bh % p.heads);
        const long long b = bh / p.heads;
        const int row0 = blk * L;
        const int rows = min(L, p.q_len - row0);
        const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + (long long)row0 * p.q_row_stride +
                     (long long)h * p.q_head_stride + 4 * quad;

        float acc[4][PMAX];
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
            for (int i = 0; i < PMAX; ++i) acc[k][i] = 0.f;
        auto accumulate = [&](const uint2 xv, int r) {
            const T* e = reinterpret_cast<const T*>(&xv);
            float x[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) x[k] = Num<T>::to_float(e[k]);
            const float4* rr = reinterpret_cast<const float4*>(s_r + r * RP);
#pragma unroll
            for (int i4 = 0; i4 < PMAX / 4; ++i4) {
                if (i4 * 4 < P) {
                    const float4 w4 = rr[i4];
                    const float w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
                    for (int k = 0; k < 4; ++k)
#pragma unroll
                        for (int c = 0; c < 4; ++c) acc[k][i4 * 4 + c] = fmaf(x[k], w[c], acc[k][i4 * 4 + c]);
                }
            }
        };
        int r = s;
        for (; r + (kPlanUnroll - 1) * SW < rows; r += kPlanUnroll * SW) {
            uint2 xv[kPlanUnroll];
#pragma unroll
            for (int v = 0; v < kPlanUnroll; ++v)
                xv[v] = __ldg(reinterpret_cast<const uint2*>(q + (long long)(r + v * SW) * p.q_row_stride));
#pragma unroll
            for (int v = 0; v < kPlanUnroll; ++v) accumulate(xv[v], r + v * SW);
        }
        for (; r < rows; r += SW)
            accumulate(__ldg(reinterpret_cast<const uint2*>(q + (long long)r * p.q_row_stride)), r);

        // Sum over the slices (lanes QW, 2 QW, ... apart), then the codes of the 4 columns.
        for (int off = QW; off < 32; off *= 2) {
#pragma unroll
            for (int k = 0; k < 4; ++k)
#pragma unroll
                for (int i = 0; i < PMAX; ++i)
                    if (i < P) acc[k][i] += __shfl_xor_sync(0xffffffffu, acc[k][i], off);
        }
        if (s == 0) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                uint32_t code = 0;
#pragma unroll
                for (int i = 0; i < PMAX; ++i)
                    if (i < P) code |= (acc[k][i] > 0.f ? 1u : 0u) << i;
                const uint32_t j = 4 * quad + k;
                s_keys[j] = (static_cast<uint64_t>(inverse_gray(code)) << 32) | j;
            }
        }
        __syncwarp();
        // Rank of each column among the D (distinct) keys = its position.
        uint64_t mine[kPlanMaxDim / 32];
        int rank[kPlanMaxDim / 32];
#pragma unroll
        for (int c = 0; c < kPlanMaxDim / 32; ++c) {
            mine[c] = lane + 32 * c < D ? s_keys[lane + 32 * c] : ~0ull;
            rank[c] = 0;
        }
        for (int i = 0; i < D; ++i) {
            const uint64_t ki = s_keys[i];
#pragma unroll
            for (int c = 0; c < kPlanMaxDim / 32; ++c) rank[c] += ki < mine[c] ? 1 : 0;
        }
        uint16_t* out = p.plan + (u * D);
#pragma unroll
        for (int c = 0; c < kPlanMaxDim / 32; ++c)
            if (lane + 32 * c < D) out[rank[c]] = static_cast<uint16_t>(lane + 32 * c);
        __syncwarp();   // the keys are rewritten by the next block
    }
}

}  // namespace da

// da_plan_<dtype>_p<PMAX>: P <= PMAX projections.
#define DA_PLAN(NAME, T, PMAX)                                                                      \
    extern "C" __global__ void __launch_bounds__(da::kPlanThreads) NAME(const PlanParams p) { \
        da::plan_body<T, PMAX>(p);                                                                  \
    }
DA_PLAN(da_plan_f16_p8, __half, 8)
DA_PLAN(da_plan_f16_p16, __half, 16)
DA_PLAN(da_plan_f16_p32, __half, 32)
DA_PLAN(da_plan_bf16_p8, __nv_bfloat16, 8)
DA_PLAN(da_plan_bf16_p16, __nv_bfloat16, 16)
DA_PLAN(da_plan_bf16_p32, __nv_bfloat16, 32)
