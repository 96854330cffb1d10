// The plan kernel (ALGORITHM.md steps 1-3): per (batch, head, query block
// of block_rows rows) the P dot products of each head-dimension column with
// the projections R (padding rows of a short last block contribute zero),
// bits -> code -> inverse-Gray key, a stable sort by (key, column), and the
// permutation written as u16.
//
// The dot products run on tensor cores (mma.sync m16n8k16, f32
// accumulation): H = Q^T R with A = Q^T (D columns x L rows, ldmatrix.trans
// of the Q tile) and B = R. R is f32, the tensor cores take Q's type T, so R
// is split exactly into three parts of type T,
//     r = hi + mid * 2^-12 + lo * 2^-24,
// (each part rounds the remainder of the previous ones, scaled into T's
// normal range; 3 x 8 significant bits for bf16, 3 x 11 for f16, so the sum
// is r to about 2^-27 relative). Every product q * part is exact in f32, so
// the three accumulations differ from an f32 dot product only by summation
// order and the tensor core's accumulation rounding (~1e-6 of sum |q r|):
// the plan equals the core's except where a dot product is within rounding
// of zero, the same contract as f32 CUDA-core sums (the tests check it).
// The three parts are three groups of n-columns of B; each lane combines the
// parts of the same (column, projection) it holds in its accumulators.
//
// One CTA per block at a time, a persistent grid of 4 CTAs per SM; Q tiles
// come by cp.async, double-buffered below D = 128 (the next block's tile
// loads while this one is hashed and sorted), single at D = 128 (where two
// tiles would halve the CTAs per SM, and the other CTAs' loads overlap this
// one's hashing). CTA size plan_threads(D): 8 warps at D = 128, 4 below
// (kernels/NOTES.md has the measurements). Warp w owns the 16-column m-tile
// w (D < 64: fewer warps have work). The sort is a rank computation over the
// D keys: each column's rank is counted by several threads over slices of
// the keys (short serial chains), then summed.
#include <type_traits>

#ifdef DA_EMULATE   // host emulation (kernels/emu/plan_emu.cpp provides the CUDA subset)
#define DA_PLAN_SMEM unsigned char* smem = da_emu_smem()
#else
#include "common.cuh"
#define DA_PLAN_SMEM extern __shared__ __align__(16) unsigned char smem[]
#endif

namespace da {

constexpr int kPlanMaxThreads = 256;
// Threads of a CTA for head_dim d (the driver launches this many).
__host__ __device__ constexpr int plan_threads(int d) { return d > 64 ? 256 : 128; }
constexpr int kPlanMaxDim = 128;
constexpr int kPlanMaxRows = 128;
constexpr float kPlanMidScale = 4096.f;        // 2^12
constexpr float kPlanLoScale = 16777216.f;     // 2^24
// Q tiles in shared memory per CTA for head_dim d: at d = 128 one (the
// tile is loaded, then hashed: 4 CTAs per SM overlap each other's loads),
// below two (one hashed while the next loads; 4 CTAs per SM either way).
// kernels/NOTES.md has the measurements.
__host__ __device__ constexpr int plan_stages(int d) { return d > 64 ? 1 : 2; }

// Shared memory (bytes) for a launch: R's three parts transposed
// [3 PMAX][Lp + 8], plan_stages(D) Q tiles [Lp][D + 8] (16-byte padded rows:
// conflict-free ldmatrix), D sort keys, the partial ranks (one int per
// thread). Lp = block_rows rounded up to 16.
template <typename Key>
__host__ __device__ constexpr int plan_smem_bytes(int pmax, int block_rows, int d) {
    const int lp = (block_rows + 15) / 16 * 16;
    return 3 * pmax * (lp + 8) * 2 + plan_stages(d) * lp * (d + 8) * 2 + d * (int)sizeof(Key) + 4 * plan_threads(d);
}

// The largest of them (block_rows = 128; the tile count changes at d = 64).
template <typename Key>
__host__ __device__ constexpr int plan_smem_bytes_max(int pmax) {
    const int a = plan_smem_bytes<Key>(pmax, kPlanMaxRows, kPlanMaxDim);
    const int b = plan_smem_bytes<Key>(pmax, kPlanMaxRows, 64);
    return a > b ? a : b;
}

// CTAs per SM the register budget is set for: 4 (64 registers a thread;
// with one Q tile at d = 128 four CTAs fit), 2 at PMAX = 32 (its 48
// accumulators a thread would spill under 64).
constexpr int plan_min_ctas(int pmax) { return pmax <= 16 ? 4 : 2; }

template <int PMAX>
using PlanKey = typename std::conditional<(PMAX <= 16), uint32_t, uint64_t>::type;

template <typename T, int PMAX, int STAGES>
__device__ __forceinline__ void plan_body(const PlanParams& p) {
    using Key = PlanKey<PMAX>;
    constexpr bool kBf16 = Num<T>::kBf16;
    constexpr int NP = PMAX / 8;        // n-tiles per part
    constexpr int NT = 3 * NP;          // n-tiles of B: hi, mid, lo
    DA_PLAN_SMEM;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nthreads = blockDim.x;
    const int D = p.head_dim, P = p.num_proj, L = p.block_rows;
    const int Lp = (L + 15) / 16 * 16;
    const int rpitch = (Lp + 8) * 2, qpitch = (D + 8) * 2;   // bytes
    constexpr int stages = STAGES;   // plan_stages(D)

    T* s_r = reinterpret_cast<T*>(smem);
    unsigned char* s_q = smem + 3 * PMAX * rpitch;           // `stages` tiles of Lp * qpitch
    Key* s_keys = reinterpret_cast<Key*>(s_q + stages * Lp * qpitch);
    int* s_rank = reinterpret_cast<int*>(s_keys + D);   // [256 / D][D] partial ranks

    // R^T split into parts: row n = part * PMAX + projection, column = row of R.
    for (int i = tid; i < PMAX * Lp; i += nthreads) {
        const int k = i / Lp, r = i % Lp;
        const float x = k < P && r < L ? p.proj[r * P + k] : 0.f;
        const T hi = Num<T>::from_float(x);
        const float rem = x - Num<T>::to_float(hi);                           // exact
        const T mid = Num<T>::from_float(rem * kPlanMidScale);
        const float rem2 = rem - Num<T>::to_float(mid) * (1.f / kPlanMidScale);   // exact
        const T lo = Num<T>::from_float(rem2 * kPlanLoScale);
        s_r[(0 * PMAX + k) * (rpitch / 2) + r] = hi;
        s_r[(1 * PMAX + k) * (rpitch / 2) + r] = mid;
        s_r[(2 * PMAX + k) * (rpitch / 2) + r] = lo;
    }
    // Rows L..Lp of the Q tiles stay zero (never loaded).
    for (int i = tid; i < stages * (Lp - L) * (D / 8); i += nthreads) {
        const int t = i / ((Lp - L) * (D / 8)), rest = i % ((Lp - L) * (D / 8));
        const int r = L + rest / (D / 8), c = rest % (D / 8);
        *reinterpret_cast<uint4*>(s_q + t * Lp * qpitch + r * qpitch + c * 16) = make_uint4(0, 0, 0, 0);
    }

    // 16-byte copies when Q's address and strides allow, else 8-byte ones
    // (the driver guarantees 8-byte alignment).
    const bool wide = (reinterpret_cast<uintptr_t>(p.q) % 16 == 0) &&
                      ((p.q_batch_stride | p.q_row_stride | p.q_head_stride) % 8 == 0);
    const long long units = (long long)p.batch * p.heads * p.num_blocks;
    auto load = [&](long long u, int buf) {
        const int blk = (int)(u % p.num_blocks);
        const long long bh = u / p.num_blocks;
        const int h = (int)(bh % p.heads);
        const long long b = bh / p.heads;
        const int row0 = blk * L;
        const int rows = min(L, p.q_len - row0);
        const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + (long long)row0 * p.q_row_stride +
                     (long long)h * p.q_head_stride;
        const uint32_t dst = smem_addr(s_q + buf * Lp * qpitch);
        if (wide) {
            const int shift = __ffs(D / 8) - 1;   // log2 of the copies per row
            for (int i = tid; i < L << shift; i += nthreads) {
                const int r = i >> shift, c = i & ((1 << shift) - 1);
                const bool ok = r < rows;
                cp_async16(dst + r * qpitch + c * 16, ok ? q + (long long)r * p.q_row_stride + c * 8 : p.q, ok);
            }
        } else {
            const int shift = __ffs(D / 4) - 1;
            for (int i = tid; i < L << shift; i += nthreads) {
                const int r = i >> shift, c = i & ((1 << shift) - 1);
                const bool ok = r < rows;
                cp_async8(dst + r * qpitch + c * 8, ok ? q + (long long)r * p.q_row_stride + c * 4 : p.q, ok);
            }
        }
    };

    // ldmatrix lane addresses. A = Q^T, x4.trans: matrices (j 0-7, r 0-7),
    // (j 8-15, r 0-7), (j 0-7, r 8-15), (j 8-15, r 8-15) = a0a1, a2a3, a4a5,
    // a6a7; lane supplies row r = lane % 8 of matrix lane / 8.
    const int mq = lane / 8;
    const uint32_t a_lane = (((mq / 2) * 8 + lane % 8) * qpitch) + ((mq % 2) * 8) * 2;
    // B = R^T rows (n, k contiguous), x4: (n 0-7, k 0-7), (n 0-7, k 8-15),
    // (n 8-15, k 0-7), (n 8-15, k 8-15) = b0b1, b2b3 of n-tiles 2i, 2i + 1.
    const uint32_t b_lane = smem_addr(s_r) + ((mq / 2) * 8 + lane % 8) * rpitch + (mq % 2) * 16;
    const int ksteps = Lp / 16, mtiles = D / 16;

    // This CTA's blocks are u = blockIdx.x + k gridDim.x; block k lives in
    // tile k % stages, loaded stages - 1 blocks ahead (one commit group per
    // block, empty past the end).
    long long u = blockIdx.x;
    for (int k = 0; k < stages - 1; ++k) {
        if (u + k * gridDim.x < units) load(u + k * gridDim.x, k);
        cp_async_commit();
    }
    for (int it = 0; u < units; ++it, u += gridDim.x) {
        const int buf = it % stages;
        const long long ahead = u + (long long)(stages - 1) * gridDim.x;
        if (ahead < units) load(ahead, (it + stages - 1) % stages);
        cp_async_commit();
        cp_async_wait<stages - 1>();
        __syncthreads();   // tile u visible; the previous block's keys and tile read

        const uint32_t q_tile = smem_addr(s_q + buf * Lp * qpitch);
        if (warp < mtiles) {
            const int mt = warp;
            float acc[NT][4];
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[n][c] = 0.f;
            for (int ks = 0; ks < ksteps; ++ks) {
                uint32_t a[4];
                ldsm_x4_trans(a, q_tile + a_lane + ks * 16 * qpitch + mt * 32);
#pragma unroll
                for (int n2 = 0; n2 < NT / 2; ++n2) {
                    uint32_t bf[4];
                    ldsm_x4(bf, b_lane + n2 * 16 * rpitch + ks * 32);
                    mma16816<kBf16>(acc[2 * n2], a, bf[0], bf[1]);
                    mma16816<kBf16>(acc[2 * n2 + 1], a, bf[2], bf[3]);
                }
                if constexpr (NT % 2 == 1) {
                    uint32_t bf[4];   // the last n-tile: rows 8-15 of the x4 are past it, unused
                    ldsm_x4(bf, b_lane + (NT - 1) * 8 * rpitch + ks * 32 - (mq / 2) * 8 * rpitch);
                    mma16816<kBf16>(acc[NT - 1], a, bf[0], bf[1]);
                }
            }
            // acc[n][c]: column j = 16 mt + lane / 4 (+ 8 for c >= 2), projection
            // 8 (n % NP) + 2 (lane % 4) + c % 2, part n / NP.
            uint32_t code[2] = {0, 0};
#pragma unroll
            for (int n = 0; n < NP; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const float dot = acc[n][c] + (acc[NP + n][c] * (1.f / kPlanMidScale) +
                                                   acc[2 * NP + n][c] * (1.f / kPlanLoScale));
                    code[c / 2] |= (dot > 0.f ? 1u : 0u) << (8 * n + 2 * (lane % 4) + c % 2);
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                code[h] |= __shfl_xor_sync(0xffffffffu, code[h], 1);
                code[h] |= __shfl_xor_sync(0xffffffffu, code[h], 2);
            }
            if (lane % 4 == 0) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t j = 16 * mt + lane / 4 + 8 * h;
                    // Projections >= P have zero R columns: their bits are 0, as in the core.
                    s_keys[j] = (static_cast<Key>(inverse_gray(code[h])) << (sizeof(Key) == 4 ? 8 : 32)) | j;
                }
            }
        }
        __syncthreads();   // keys complete; the tile's reads done before it is reloaded

        // Rank of each column among the D (distinct) keys = its position:
        // thread tid counts the keys of slice tid / D smaller than column
        // tid % D's, in independent counters (short dependency chains).
        constexpr int kPer = 16 / sizeof(Key);   // keys per 16-byte load
        const int slices = min(nthreads / D, D / kPer);
        {
            const int len = D / slices;
            const int j = tid % D, s = tid / D;
            if (s < slices) {
                const Key mine = s_keys[j];
                int rank[kPer] = {};
                for (int i = s * len; i < (s + 1) * len; i += kPer) {
                    const uint4 v = *reinterpret_cast<const uint4*>(s_keys + i);
                    const Key* k = reinterpret_cast<const Key*>(&v);
#pragma unroll
                    for (int c = 0; c < kPer; ++c) rank[c] += k[c] < mine ? 1 : 0;
                }
                int sum = 0;
#pragma unroll
                for (int c = 0; c < kPer; ++c) sum += rank[c];
                s_rank[tid] = sum;
            }
        }
        __syncthreads();
        if (tid < D) {
            int rank = 0;
            for (int s = 0; s < slices; ++s) rank += s_rank[s * D + tid];
            p.plan[u * D + rank] = static_cast<uint16_t>(tid);
        }
        // The next iteration's first barrier orders these reads of s_rank and
        // s_keys before they are rewritten.
    }
    cp_async_wait<0>();
}

}  // namespace da

// da_plan_<dtype>_p<PMAX>: P <= PMAX projections; <name>_smem is the
// largest dynamic shared memory a launch asks for.
#define DA_PLAN(NAME, T, PMAX)                                                                      \
    extern "C" __device__ const int NAME##_smem =                                                  \
        da::plan_smem_bytes_max<da::PlanKey<PMAX>>(PMAX);                                          \
    extern "C" __global__ void __launch_bounds__(da::kPlanMaxThreads, da::plan_min_ctas(PMAX))     \
        NAME(const PlanParams p) {                                                                  \
        if (da::plan_stages(p.head_dim) == 1) da::plan_body<T, PMAX, 1>(p);                         \
        else da::plan_body<T, PMAX, 2>(p);                                                          \
    }
DA_PLAN(da_plan_f16_p8, __half, 8)
DA_PLAN(da_plan_f16_p16, __half, 16)
DA_PLAN(da_plan_f16_p32, __half, 32)
DA_PLAN(da_plan_bf16_p8, __nv_bfloat16, 8)
DA_PLAN(da_plan_bf16_p16, __nv_bfloat16, 16)
DA_PLAN(da_plan_bf16_p32, __nv_bfloat16, 32)
