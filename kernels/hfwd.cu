// DistrAttention forward kernel for Hopper (sm_90a): wgmma tensor cores,
// warp specialisation, mbarrier pipeline. Same function as fwd.cu (same
// FwdParams, same rounding points); used on compute capability 9.0 for
// head_dim in {64, 128} with 128-row plan blocks (G > 1) or any block_rows
// (G = 1, which never reads a plan).
//
// One CTA (3 warpgroups, 384 threads) per (128 query rows, head, batch):
//   warpgroup 0, producer: its thread 0 loads K and V tiles (BN = 128 keys)
//       by TMA (descriptors from the engine: HTmaMaps, common.cuh); G = 1: K
//       lands straight in the wgmma layout; G > 1: raw K lands, in half tiles
//       of 64 keys prefetched two ahead, in the same swizzled layout, and the
//       warpgroup computes Khat = K F_K on the tensor cores (F_K: the plan's
//       D x d/G 0/1 fusion matrix, built once per CTA before the block
//       barrier), rounds the f32 sums once to T and stores Khat K-major
//       (stmatrix), the layout of Qhat.
//   warpgroups 1, 2, consumers of 64 query rows each (the same plan: the
//       CTA's 128 rows are one plan block): G > 1 first Qhat = Q F_Q on the
//       tensor cores (F_Q: 1/G or, for Sample, the group's first column);
//       then per tile S = Qhat Khat^T (wgmma, both operands in shared
//       memory), mask, online softmax (f32, base 2), O += P V (wgmma, P from
//       registers, V transposed from shared memory); the softmax of tile j
//       runs while P_{j-1} V_{j-1} is in the tensor pipe. O leaves through
//       shared memory in 16-byte chunks where its rows are 16-byte aligned.
// Stages (3 or 4, HTraits::S): full[s] (producer -> consumers: the TMA bytes
// of the stage plus, for G > 1, 128 producer arrivals after Khat was written
// and fenced with fence.proxy.async), empty[s] (consumers -> producer: one
// arrival per consumer warp after its wgmma reads finished).
//
// Shared-memory operands:
//   Tiles loaded from global memory (Q, K, V) use the
//   128-byte-swizzle layouts, one region per 64 columns: row r's 16-byte
//   chunk j of a region sits at r*128 + ((j ^ (r%8)) * 16) (TMA's 128-byte
//   swizzle of 64 x 64 boxes; Q by cp.async, whole 128-byte rows per warp).
//     K-major (Q, K): start + 32 bytes per k-step of 16, next region per 4
//       k-steps; SBO = 1024 (8 rows), swizzle mode 1.
//     MN-major (V; the reduction dim is the row): start + 2048 bytes per 16
//       rows; LBO = region size (next 64 columns), SBO = 1024.
//   Qhat, Khat and F^T (written by threads) use the no-swizzle K-major layout:
//       (c/8)*128 + (r/8)*SBO + (r%8)*16 + (c%8)*2,  LBO = 128, SBO = 16*C
#include <type_traits>

#include "common.cuh"
#include "hopper.cuh"
#include "wgmma_ops.cuh"

#ifndef DA_HEAD_DIM
#error "define DA_HEAD_DIM (64 or 128)"
#endif
#ifndef DA_DTYPE
#error "define DA_DTYPE (f16 or bf16)"
#endif

namespace da {

constexpr int kHThreads = 384;

#ifdef DA_HSTAGE
__device__ unsigned long long hprof[8];   // hstage's cycle counters (kAblate bit 4), summed over CTAs
__device__ unsigned long long* htl;       // hstage's timeline (kAblate bit 5), 16 words per CTA
#endif

template <int D, int G>
struct HTraits {
    static constexpr int BM = 128, BN = 128, WM = 64;
    static constexpr int HN = 64;                     // keys per raw-K half tile (G > 1)
    static constexpr bool kFused = G > 1;
    static constexpr int DG = D / G;
    static constexpr int KW = (DG + 15) / 16 * 16;   // reduction width of S, padded to wgmma's k
    static constexpr int KC = kFused ? KW : D;        // columns of the S operands
    static constexpr int kKBytes = BN * KC * 2;
    static constexpr int kVBytes = BN * D * 2;
    static constexpr int kStageBytes = kKBytes + kVBytes;
    static constexpr int kOffBar = 0;                 // full[S], empty[S], kraw_full[2]
    static constexpr int kOffZero = 248;              // a u32 0 (pins the consumers' wait, see there)
    static constexpr int kOffQ = 1024;                // G = 1: Q (K-major); G > 1: Qhat (K-major)
    // G > 1 only: two raw-K half tiles (64 keys, 128-byte swizzle as G = 1's K)
    // and two fusion matrices, transposed (KW x D, K-major, no swizzle; rows
    // t >= d/G zero): F_K^T for Khat = K F_K (F_K[c][t] = 1 for the columns c
    // of group t) and F_Q^T for Qhat = Q F_Q (Mean: 1/G there; Sample: 1 for
    // the group's first column only).
    static constexpr int kHalfBytes = HN * D * 2;
    static constexpr int kFBytes = KW * D * 2;
    static constexpr int kOffKraw = kOffQ + BM * KC * 2;
    static constexpr int kOffF = kOffKraw + (kFused ? 2 * kHalfBytes : 0);
    static constexpr int kOffFq = kOffF + (kFused ? kFBytes : 0);
    static constexpr int kOffStage = kOffFq + (kFused ? kFBytes : 0);
    // Stages of (K or Khat, V): as many as fit, at most 4 (3 at D = 128 for
    // G = 1, 2).
    static constexpr int kFit = (227 * 1024 - kOffStage) / kStageBytes;
    static constexpr int S = kFit < 4 ? kFit : 4;
    // G > 1: raw Q (128-byte swizzle, 64 rows per consumer; read once, by
    // the consumers' Qhat GEMM) follows the stages where it fits (D = 64);
    // otherwise (D = 128) it aliases the last stage, which the producer then
    // first writes at tile S - 1, after barrier 4.
    static constexpr int kQrawBytes = BM * D * 2;
    static constexpr bool kQrawAlias = kFused && kOffStage + S * kStageBytes + kQrawBytes > 227 * 1024;
    static constexpr int kOffQraw = kOffStage + (kQrawAlias ? (S - 1) * kStageBytes : S * kStageBytes);
    static constexpr int kSmem = kOffStage + S * kStageBytes + (kFused && !kQrawAlias ? kQrawBytes : 0);
    static_assert(S >= 3 && kSmem <= 227 * 1024, "shared memory");
    static_assert(!kQrawAlias || (kQrawBytes <= kStageBytes && KW == DG), "raw Q fits in a stage with no Khat pad");
    static_assert(8 * (2 * S + 2) <= kOffZero, "barriers");
    static_assert(kOffStage % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0 && kHalfBytes % 1024 == 0 &&
                      kFBytes % 1024 == 0 && kQrawBytes % 1024 == 0,
                  "swizzle atoms");
    // setmaxnreg: consumers grow only by what the producer released in this
    // CTA (launch cap 168): 128 * (168 - 56) = 256 * (224 - 168). The K GEMM's
    // 32 accumulators (KW = 64) need more in the producer: 72 / 216.
    static constexpr int kProducerRegs = KW == 64 && kFused ? 72 : 56;
    static constexpr int kConsumerRegs = KW == 64 && kFused ? 216 : 224;
    static_assert(128 * (168 - kProducerRegs) >= 256 * (kConsumerRegs - 168), "register pool");
};

#if DA_HOPPER
// The fusion GEMM of one warpgroup: acc (64 x KW, f32) = A F for A, 64 rows
// x D in the 128-byte-swizzle layout (K-major, one 8 KiB region per 64
// columns: as TMA and load_sw128 write K and Q), and F^T (KW x D, K-major, no
// swizzle); wgmma m64nKWk16 over D/16 k-steps. Each accumulator is a sum of
// at most G nonzero exact products (the group's values times 1 or 1/G).
template <int D, int KW, bool kBf16>
__device__ __forceinline__ void fuse_gemm(float (&acc)[KW / 2], uint32_t a, uint32_t ft) {
    const uint64_t desc_a = make_desc(a, 16, 1024, 1), desc_f = make_desc(ft, 128, 16 * D);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t da_ = desc_a + (((kk / 4) * (64 * 128) + (kk % 4) * 32) >> 4);
        const uint64_t db_ = desc_f + ((kk * 256) >> 4);
        if (kk == 0) Wgmma<KW, kBf16>::ss_first(acc, da_, db_);
        else Wgmma<KW, kBf16>::ss(acc, da_, db_, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc);
}

// fuse_gemm's accumulators rounded once to T and stored by stmatrix as the 64
// rows at `dst` of a K-major tile without swizzle, KW columns (element (r, c)
// at (c/8)*128 + (r/8)*16*KW + (r%8)*16 + (c%8)*2; the layout of Qhat and
// Khat). Thread (warp w, lane l) holds rows 16w + l/4 + 8r, columns
// 8nt + 2(l%4) + e (acc[4nt + 2r + e]); stmatrix.x4 writes the 8x8 blocks
// (r, nt), (r, nt + 1) for r = 0, 1; lane l addresses row l % 8 of block l / 8.
template <typename Nm, int KW>
__device__ __forceinline__ void store_fused(const float (&acc)[KW / 2], uint32_t dst, int lt) {
    const int warp = lt / 32, lane = lt % 32;
    dst += (uint32_t)((lane / 16) * 128 + (2 * warp + (lane / 8) % 2) * (16 * KW) + (lane % 8) * 16);
#pragma unroll
    for (int nt = 0; nt < KW / 8; nt += 2) {
        const uint32_t r0 = Nm::pack(acc[4 * nt], acc[4 * nt + 1]);
        const uint32_t r1 = Nm::pack(acc[4 * nt + 2], acc[4 * nt + 3]);
        const uint32_t r2 = Nm::pack(acc[4 * nt + 4], acc[4 * nt + 5]);
        const uint32_t r3 = Nm::pack(acc[4 * nt + 6], acc[4 * nt + 7]);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(dst + nt * 128), "r"(r0),
                     "r"(r1), "r"(r2), "r"(r3)
                     : "memory");
    }
}

// Cycle counter of one thread (kAblate bit 4 only; empty otherwise).
template <bool kOn>
struct HClock {
    uint32_t acc = 0, t0 = 0;
    __device__ __forceinline__ void start() {
        if constexpr (kOn) t0 = (uint32_t)clock();
    }
    __device__ __forceinline__ void stop() {
        if constexpr (kOn) acc += (uint32_t)clock() - t0;
    }
    __device__ __forceinline__ void flush(int i, bool who) {
#ifdef DA_HSTAGE
        if constexpr (kOn)
            if (who) atomicAdd(&hprof[i], (unsigned long long)acc);
#endif
    }
};

// Timeline stamp i (kAblate bit 5 only) of this CTA by thread `who`: 16
// words per CTA; %globaltimer into word i (0-3 by consumer thread 128 at
// entry, tile 0 ready, loop done, epilogue done; 7-15 the prologue's steps),
// word 4 the SM, 5 and 6 clock64 at entry and at the end (the clock's rate).
template <int kAblate>
__device__ __forceinline__ void htl_stamp(int i, int who = 128) {
#ifdef DA_HSTAGE
    if constexpr ((kAblate & 32) != 0) {
        if ((int)threadIdx.x != who) return;
        unsigned long long* w = htl + 16 * (blockIdx.x + gridDim.x * (blockIdx.y + (size_t)gridDim.y * blockIdx.z));
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        w[i] = t;
        if (i == 0 || i == 3) w[i == 0 ? 5 : 6] = clock64();
        if (i == 0) {
            uint32_t sm;
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
            w[4] = sm;
        }
    }
#endif
}

// kAblate (timing builds of cuda-driver/bench/hstage only; 0 in the library):
// bit 0 the producer skips the K GEMM and Khat (Khat stale), bit 1 it skips
// the raw-K loads, bit 2 the consumers skip the softmax (P = S), bit 4
// cycle counters of producer thread 0 and consumer thread 128 into hprof
// (bit 3, the consumers taking turns for P_j V_j .. S_{j+1} with named
// barriers, measured 2-24% slower and was removed: kernels/NOTES.md), bit 5
// the timeline stamps of htl_stamp.
template <typename T, int D, int G, int kAblate = 0>
__device__ __forceinline__ void hfwd_body(const FwdParams& p, const HTmaMaps& maps) {
    using Tr = HTraits<D, G>;
    using Nm = Num<T>;
    constexpr int BM = Tr::BM, BN = Tr::BN, HN = Tr::HN, S = Tr::S, KC = Tr::KC, DG = Tr::DG;
    constexpr bool kBf16 = Nm::kBf16;

    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t sbase = smem_addr(smem);
    const uint32_t bar_full = sbase + Tr::kOffBar, bar_empty = bar_full + 8 * S, bar_kraw = bar_empty + 8 * S;

    htl_stamp<kAblate>(0);
    const int tid = threadIdx.x;
    const int wg = tid / 128, lt = tid % 128;
    const int nblk = p.num_blocks;
    const int mblk = p.causal ? nblk - 1 - (int)blockIdx.x : (int)blockIdx.x;   // heaviest first
    const int h = p.head_map_len ? (int)p.head_map[blockIdx.y] : (int)blockIdx.y;
    const int b = (int)blockIdx.z + p.batch_offset;
    const int hk = h / p.heads_per_kv;
    const int m0 = mblk * BM;
    const int n_q = p.q_len, n_kv = p.kv_len;
    int kv_end = n_kv;
    if (p.causal) kv_end = min(n_kv, max(0, m0 + BM + n_kv - n_q));
    const int n_tiles = (kv_end + BN - 1) / BN;

    auto stage_k = [&](int s) { return sbase + Tr::kOffStage + s * Tr::kStageBytes; };
    auto stage_v = [&](int s) { return stage_k(s) + Tr::kKBytes; };
    // G > 1: the copy of raw-K half tile `half` (keys 64 half..) into buffer half % 2.
    auto load_kraw = [&](int half) {
        const uint32_t bar = bar_kraw + 8 * (half & 1);
        if constexpr (kAblate & 2) {
            mbar_arrive(bar);
        } else {
            mbar_arrive_expect_tx(bar, Tr::kHalfBytes);
            tma_tile<D, HN>(sbase + Tr::kOffKraw + (half & 1) * Tr::kHalfBytes, maps.k, half * HN, hk, b, bar);
        }
    };
    // G > 1: the copies of the first tiles depend on nothing but the launch:
    // thread 0 issues them right after the barriers' init, while the other
    // threads load the plan and build F before the block barrier (raw K of
    // tile 0, V of the tiles whose stages are free at launch, i.e. not the
    // stage raw Q aliases). G = 1 issues its copies after the barrier.
    const int n_early = Tr::kFused ? min(n_tiles, Tr::kQrawAlias ? S - 1 : S) : 0;
    auto issue_early = [&]() {
        if (n_tiles > 0) {
            load_kraw(0);
            load_kraw(1);
        }
        for (int j = 0; j < n_early; ++j) {
            mbar_expect_tx(bar_full + 8 * j, Tr::kVBytes);
            tma_tile<D, BN>(stage_v(j), maps.v, j * BN, hk, b, bar_full + 8 * j);
        }
    };
    if (tid == 0) {
        // full[s]: G = 1 producer thread 0's arrival with the K/V copies' bytes;
        // G > 1 the 128 producer arrivals after Khat, with V's bytes. empty[s]:
        // one arrival per consumer warp. kraw[i]: the copy of a raw-K half tile.
        for (int s = 0; s < S; ++s) {
            mbar_init(bar_full + 8 * s, Tr::kFused ? 128 : 1);
            mbar_init(bar_empty + 8 * s, 8);
        }
        mbar_init(bar_kraw, 1);
        mbar_init(bar_kraw + 8, 1);
        *reinterpret_cast<uint32_t*>(smem + Tr::kOffZero) = 0u;
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        if constexpr (Tr::kFused) issue_early();
    }
    // Consumer warpgroup cw's 64 query rows (from r0 = m0 + 64 cw) into `dst`
    // (128-byte swizzle): G = 1 its S operand, loaded after the barrier; G > 1
    // raw Q for the Qhat GEMM, loaded before it.
    auto load_q = [&](uint32_t dst, int r0) {
        const T* qg = static_cast<const T*>(p.q) + (long long)b * p.q_batch_stride + (long long)h * p.q_head_stride;
        load_sw128<D, Tr::WM>(dst, qg + (long long)r0 * p.q_row_stride, p.q_row_stride, n_q - r0, lt);
        cp_async_commit();
    };
    if constexpr (Tr::kFused) {
        if (wg > 0) load_q(sbase + Tr::kOffQraw + (wg - 1) * Tr::WM * D * 2, m0 + (wg - 1) * Tr::WM);
        // F_K^T (row t by thread 1 + t) and F_Q^T (row t by thread 128 + t),
        // each row zeroed and then given its group's entries. Plan entries are
        // clamped: a corrupt plan gives wrong numbers, never a stray access.
        const int t = wg == 0 ? tid - 1 : tid - 128;
        if (t >= 0 && t < Tr::KW && wg < 2) {
            const bool for_q = wg == 1;
            const uint32_t row = sbase + (for_q ? Tr::kOffFq : Tr::kOffF) + (t / 8) * (16 * D) + (t % 8) * 16;
            const uint16_t* perm = p.plan + (((long long)b * p.q_heads + h) * nblk + mblk) * D + t * G;
            int c[G];
#pragma unroll
            for (int i = 0; i < G; ++i) c[i] = t < DG ? min((int)perm[i], D - 1) : 0;
#pragma unroll
            for (int ch = 0; ch < D / 8; ++ch) st_shared_v4(row + ch * 128, 0, 0, 0, 0);
            if (t < DG) {
                const T one = Nm::from_float(for_q && !p.sample ? 1.f / G : 1.f);
                const int n = for_q && p.sample ? 1 : G;
#pragma unroll
                for (int i = 0; i < G; ++i)
                    if (i < n) *reinterpret_cast<T*>(smem + (row - sbase) + (c[i] / 8) * 128 + (c[i] % 8) * 2) = one;
            }
            fence_proxy_async();
        }
    }
    __syncthreads();
    htl_stamp<kAblate>(7);
    htl_stamp<kAblate>(11, 0);

    if (wg == 0) {
        // ================= producer =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::kProducerRegs));
        // Producer thread 0 issues every copy (TMA); before V's it fences, since
        // the stage was last read through the generic proxy (raw Q, D = 128;
        // the raw-K buffers are read by wgmma only).
        const bool leader = lt == 0;
        if constexpr (Tr::kFused) {
            // G > 1, per half tile of 64 keys (i = 0, 1 of tile j; raw buffer i):
            // Khat = K F_K on the tensor cores (fuse_gemm: A = the raw K half
            // tile as TMA lands it), rounded once to T and stored as rows
            // i*64.. of the stage's K-major Khat tile (store_fused: no swizzle,
            // the layout of Qhat), which the consumers read as G = 1 reads K.
            constexpr int KW = Tr::KW;
            const uint32_t kraw = sbase + Tr::kOffKraw, fmat = sbase + Tr::kOffF;
            auto kgemm = [&](float (&acc)[KW / 2], int half) {
                fuse_gemm<D, KW, kBf16>(acc, kraw + half * Tr::kHalfBytes, fmat);
            };
            auto store_khat = [&](const float (&acc)[KW / 2], int half, int s) {
                store_fused<Nm, KW>(acc, stage_k(s) + half * (8 * 16 * KW), lt);
            };
            // Raw K is prefetched two half tiles ahead (its copies tracked by
            // kraw[i]; tile 0's were issued at launch); V_j's copies hold
            // full[s] open by themselves, so the producer never waits for V.
            // Per half tile i of tile j: wait for raw K, the K GEMM, one
            // barrier (every warp's wgmma has read the raw buffer), issue the
            // raw half two ahead, store Khat.
            constexpr bool kProf = kAblate & 16;
            HClock<kProf> c_all, c_kraw, c_gemm, c_empty, c_store;
            c_all.start();
            for (int j = 0; j < n_tiles; ++j) {
                const int s = j % S;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    c_kraw.start();
                    mbar_wait(bar_kraw + 8 * half, j & 1);
                    c_kraw.stop();
                    if (j == 0 && half == 0) htl_stamp<kAblate>(14, 0);
                    c_gemm.start();
                    float acc[KW / 2];
                    if constexpr (!(kAblate & 1)) kgemm(acc, half);
                    named_bar(1, 128);
                    c_gemm.stop();
                    if (leader && j + 1 < n_tiles) load_kraw(2 * (j + 1) + half);
                    if (half == 0 && j >= n_early) {
                        c_empty.start();
                        if (j >= S) mbar_wait(bar_empty + 8 * s, ((j / S) + 1) & 1);
                        // The last stage holds raw Q until the consumers' Qhat builds are done.
                        if (Tr::kQrawAlias && j == S - 1) named_bar(4, kHThreads);
                        c_empty.stop();
                        if (leader) {
                            fence_proxy_async();
                            mbar_expect_tx(bar_full + 8 * s, Tr::kVBytes);
                            tma_tile<D, BN>(stage_v(s), maps.v, j * BN, hk, b, bar_full + 8 * s);
                        }
                    }
                    c_store.start();
                    if constexpr (!(kAblate & 1)) store_khat(acc, half, s);
                    c_store.stop();
                }
                fence_proxy_async();
                mbar_arrive(bar_full + 8 * s);
                if (j == 0) htl_stamp<kAblate>(15, 0);
            }
            c_all.stop();
            c_all.flush(0, lt == 0);
            c_kraw.flush(1, lt == 0);
            c_gemm.flush(2, lt == 0);
            c_empty.flush(3, lt == 0);
            c_store.flush(4, lt == 0);
            HClock<kProf> tiles;
            tiles.acc = n_tiles;
            tiles.flush(7, lt == 0);
        } else {
            // G = 1: thread 0 copies K_j and V_j into stage s as soon as it is free.
            constexpr bool kProf = kAblate & 16;
            HClock<kProf> c_all, c_empty;
            c_all.start();
            if (leader) {
                for (int j = 0; j < n_tiles; ++j) {
                    const int s = j % S;
                    c_empty.start();
                    if (j >= S) mbar_wait(bar_empty + 8 * s, ((j / S) + 1) & 1);
                    c_empty.stop();
                    mbar_arrive_expect_tx(bar_full + 8 * s, Tr::kStageBytes);
                    tma_tile<D, BN>(stage_k(s), maps.k, j * BN, hk, b, bar_full + 8 * s);
                    tma_tile<D, BN>(stage_v(s), maps.v, j * BN, hk, b, bar_full + 8 * s);
                }
            }
            c_all.stop();
            c_all.flush(0, leader);
            c_empty.flush(3, leader);
            HClock<kProf> tiles;
            tiles.acc = n_tiles;
            tiles.flush(7, leader);
        }
    } else {
        // ================= consumers =================
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tr::kConsumerRegs));
        const int cw = wg - 1;                 // consumer index: rows [cw*64, cw*64+64) of the block
        const int warp = lt / 32, lane = lt % 32;
        const int r0 = m0 + cw * Tr::WM;
        const uint32_t q_op = sbase + Tr::kOffQ + cw * Tr::WM * KC * 2;   // this warpgroup's S operand A

        if constexpr (!Tr::kFused) {
            load_q(q_op, r0);
            cp_async_wait_all();
            fence_proxy_async();
            named_bar(2 + cw, 128);
        } else {
            // Raw Q (copied before the barrier), then Qhat = Q F_Q on the
            // tensor cores (Mean: the average of the group's columns; Sample:
            // its first in plan order), rounded once to T, as this
            // warpgroup's rows of the S operand.
            cp_async_wait_all();
            fence_proxy_async();
            named_bar(2 + cw, 128);
            htl_stamp<kAblate>(8);
            float acc[Tr::KW / 2];
            fuse_gemm<D, Tr::KW, kBf16>(acc, sbase + Tr::kOffQraw + cw * Tr::WM * D * 2, sbase + Tr::kOffFq);
            store_fused<Nm, Tr::KW>(acc, q_op, lt);
            fence_proxy_async();
            named_bar(2 + cw, 128);
            htl_stamp<kAblate>(9);
            // Raw Q is read: the producer may fill the last stage (it waits at tile S - 1).
            if (Tr::kQrawAlias && n_tiles >= S) named_bar_arrive(4, kHThreads);
        }

        // S operands (both K-major): G = 1 swizzled Q and K (next region every
        // 4 k-steps), G > 1 the no-swizzle Qhat and Khat.
        auto desc_a = [&](int kk) {
            if constexpr (Tr::kFused) {
                return make_desc(q_op + kk * 256, 128, 16 * KC);
            } else {
                return make_desc(q_op + (kk / 4) * (Tr::WM * 128) + (kk % 4) * 32, 16, 1024, 1);
            }
        };
        auto desc_b = [&](uint32_t kst, int kk) {
            if constexpr (Tr::kFused) {
                return make_desc(kst + kk * 256, 128, 16 * KC);
            } else {
                return make_desc(kst + (kk / 4) * (BN * 128) + (kk % 4) * 32, 16, 1024, 1);
            }
        };
        float acc_o[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
        float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
        const float scale_log2 = p.scale_log2;
        const int row_base = r0 + warp * 16 + lane / 4;   // + 8 * r

        // FlashAttention-3's intra-warpgroup order: tile j issues S_j and then
        // P_{j-1} V_{j-1} (two commit groups), waits for S_j only, masks and
        // runs the softmax of tile j while P_{j-1} V_{j-1} is in the tensor
        // pipe, then waits for it, releases stage j-1, rescales O by tile j's
        // correction and packs P_j. The arithmetic and its order per element
        // are those of the serial order (O *= corr_j, then O += P_j V_j).
        // ptxas hoists `wgmma.wait_group 0` (it has no operands, and waiting
        // early is always correct) to just after the mask, which serialises
        // the softmax behind the P V GEMM again (v4); a store that depends on
        // the softmax's row sums, predicated on a shared word that is always 0
        // (ptxas cannot tell), pins the wait below the softmax.
        const bool never = *reinterpret_cast<volatile const uint32_t*>(smem + Tr::kOffZero) != 0u;
        uint32_t pf[BN / 16][4];
        auto issue_s = [&](float (&acc_s)[BN / 2], uint32_t kst) {
#pragma unroll
            for (int kk = 0; kk < KC / 16; ++kk) {
                if (kk == 0) Wgmma<BN, kBf16>::ss_first(acc_s, desc_a(kk), desc_b(kst, kk));
                else Wgmma<BN, kBf16>::ss(acc_s, desc_a(kk), desc_b(kst, kk), 1);
            }
        };
        auto issue_pv = [&](int jj) {
            const uint32_t vst = sbase + Tr::kOffStage + (jj % S) * Tr::kStageBytes + Tr::kKBytes;
            const uint64_t desc_v = make_desc(vst, BN * 128, 1024, 1);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) Wgmma<D, kBf16>::rs_tb(acc_o, pf[kk], desc_v + kk * (2048 >> 4), 1);
        };
        // Mask (key tail, bottom-right causal) and online softmax of the tile
        // at key n0 (base 2; a row's values live in a lane quad); P in acc_s.
        auto softmax = [&](float (&acc_s)[BN / 2], int n0, float (&corr_r)[2]) {
            const bool need_mask = (n0 + BN > n_kv) || (p.causal && n0 + BN - 1 > r0 + n_kv - n_q);
            if (need_mask) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = row_base + 8 * r;
                    const int limit = p.causal ? min(n_kv, i + 1 + n_kv - n_q) : n_kv;
#pragma unroll
                    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int n = n0 + nt * 8 + (lane % 4) * 2 + e;
                            if (n >= limit) acc_s[nt * 4 + 2 * r + e] = -INFINITY;
                        }
                }
            }
            corr_r[0] = corr_r[1] = 1.f;
            if constexpr (!(kAblate & 4)) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = row_m[r];
#pragma unroll
                    for (int nt = 0; nt < BN / 8; ++nt)
                        mx = fmaxf(mx, fmaxf(acc_s[nt * 4 + 2 * r], acc_s[nt * 4 + 2 * r + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float m_use = mx == -INFINITY ? 0.f : mx * scale_log2;
                    const float corr = fast_exp2(row_m[r] * scale_log2 - m_use);
                    row_m[r] = mx;
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float pv = fast_exp2(fmaf(acc_s[nt * 4 + 2 * r + e], scale_log2, -m_use));
                            acc_s[nt * 4 + 2 * r + e] = pv;
                            sum += pv;
                        }
                    row_l[r] = row_l[r] * corr + sum;
                    corr_r[r] = corr;
                }
            }
        };
        // O *= corr, P packed into pf.
        auto rescale_pack = [&](const float (&acc_s)[BN / 2], const float (&corr_r)[2]) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    acc_o[dt * 4 + 2 * r] *= corr_r[r];
                    acc_o[dt * 4 + 2 * r + 1] *= corr_r[r];
                }
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
                for (int i = 0; i < 4; ++i) pf[kk][i] = Nm::pack(acc_s[8 * kk + 2 * i], acc_s[8 * kk + 2 * i + 1]);
        };

        HClock<(kAblate & 16) != 0> c_all, c_full;
        c_all.start();
        if (n_tiles > 0) {
            // Tile 0: S_0, wait, softmax, P_0 packed.
            c_full.start();
            mbar_wait(bar_full, 0);
            c_full.stop();
            htl_stamp<kAblate>(10);
            float acc_s[BN / 2], corr_r[2];
            wgmma_fence();
            issue_s(acc_s, sbase + Tr::kOffStage);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc_s);
            htl_stamp<kAblate>(1);
            softmax(acc_s, 0, corr_r);
            rescale_pack(acc_s, corr_r);
        }
        for (int j = 1; j < n_tiles; ++j) {
            const int s = j % S;
            c_full.start();
            mbar_wait(bar_full + 8 * s, (j / S) & 1);
            c_full.stop();
            float acc_s[BN / 2], corr_r[2];
            wgmma_fence();
            issue_s(acc_s, sbase + Tr::kOffStage + s * Tr::kStageBytes);
            wgmma_commit();
            issue_pv(j - 1);
            wgmma_commit();
            wgmma_wait<1>();
            fence_regs(acc_s);
            softmax(acc_s, j * BN, corr_r);
            fence_regs(acc_s);
            if (never) *reinterpret_cast<volatile float*>(smem + Tr::kOffZero) = row_l[0] + row_l[1];
            wgmma_wait<0>();
            fence_regs(acc_o);
            if (lane == 0) mbar_arrive(bar_empty + 8 * ((j - 1) % S));
            rescale_pack(acc_s, corr_r);
        }
        if (n_tiles > 0) {
            wgmma_fence();
            issue_pv(n_tiles - 1);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc_o);
            if (lane == 0) mbar_arrive(bar_empty + 8 * ((n_tiles - 1) % S));
        }
        htl_stamp<kAblate>(2);
        c_all.stop();
        c_all.flush(5, tid == 128);
        c_full.flush(6, tid == 128);

        // ---- epilogue ----
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_l[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv[r] = l > 0.f ? 1.f / l : 0.f;
            const int i = row_base + 8 * r;
            if (i < n_q && p.lse != nullptr && lane % 4 == 0) {
                p.lse[((long long)b * p.q_heads + h) * n_q + i] =
                    l > 0.f ? (row_m[r] * scale_log2 + __log2f(l)) * 0.6931471805599453f : -INFINITY;
            }
        }
        const long long o_head = (long long)b * p.o_batch_stride + (long long)h * p.o_head_stride;
        // A T output whose rows start on 16-byte boundaries leaves in whole
        // 16-byte chunks: the warpgroup's 64 x D tile, rounded to T, is staged
        // by stmatrix in a buffer nothing reads any more (G = 1 its Q operand,
        // G > 1 raw-K buffer cw), row r's chunk j at r*2D + ((j ^ r%8) * 16)
        // (conflict-free both ways), then copied out row by row: a quarter of
        // the store instructions of the per-fragment stores below, whole
        // 32-byte sectors.
        const bool chunked = !p.out_f32 && (reinterpret_cast<uintptr_t>(p.o) % 16 == 0) &&
                             ((p.o_row_stride | p.o_batch_stride | p.o_head_stride) % 8 == 0);
        if (chunked) {
            const uint32_t buf = Tr::kFused ? sbase + Tr::kOffKraw + cw * Tr::kHalfBytes : q_op;
            // Lane l addresses row l % 8 of the 8x8 blocks (r, dt), (r, dt + 1), r = l / 8 % 2.
            const int srow = warp * 16 + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                const uint32_t addr = buf + srow * (2 * D) + (((dt + lane / 16) ^ (srow % 8)) * 16);
                const uint32_t x0 = Nm::pack(acc_o[4 * dt] * inv[0], acc_o[4 * dt + 1] * inv[0]);
                const uint32_t x1 = Nm::pack(acc_o[4 * dt + 2] * inv[1], acc_o[4 * dt + 3] * inv[1]);
                const uint32_t x2 = Nm::pack(acc_o[4 * dt + 4] * inv[0], acc_o[4 * dt + 5] * inv[0]);
                const uint32_t x3 = Nm::pack(acc_o[4 * dt + 6] * inv[1], acc_o[4 * dt + 7] * inv[1]);
                asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(x0),
                             "r"(x1), "r"(x2), "r"(x3)
                             : "memory");
            }
            named_bar(2 + cw, 128);
            T* o = static_cast<T*>(p.o) + o_head;
#pragma unroll
            for (int it = 0; it < Tr::WM * (D / 8) / 128; ++it) {
                const int idx = it * 128 + lt;
                const int row = idx / (D / 8), ch = idx % (D / 8);
                if (r0 + row < n_q) {
                    uint4 v;
                    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                                 : "r"(buf + row * (2 * D) + ((ch ^ (row % 8)) * 16)));
                    *reinterpret_cast<uint4*>(o + (long long)(r0 + row) * p.o_row_stride + ch * 8) = v;
                }
            }
        } else {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = row_base + 8 * r;
                if (i >= n_q) continue;
                const long long off = o_head + (long long)i * p.o_row_stride;
                if (p.out_f32) {
                    float* o = static_cast<float*>(p.o) + off;
#pragma unroll
                    for (int dt = 0; dt < D / 8; ++dt) {
                        const int d = dt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<float2*>(o + d) =
                            make_float2(acc_o[dt * 4 + 2 * r] * inv[r], acc_o[dt * 4 + 2 * r + 1] * inv[r]);
                    }
                } else {
                    T* o = static_cast<T*>(p.o) + off;
#pragma unroll
                    for (int dt = 0; dt < D / 8; ++dt) {
                        const int d = dt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<uint32_t*>(o + d) =
                            Nm::pack(acc_o[dt * 4 + 2 * r] * inv[r], acc_o[dt * 4 + 2 * r + 1] * inv[r]);
                    }
                }
            }
        }
        htl_stamp<kAblate>(3);
    }
}
#endif  // DA_HOPPER

}  // namespace da

#ifndef DA_HSTAGE   // cuda-driver/bench/hstage defines its own entry points
#if DA_HOPPER
#define DA_HBODY(G) da::hfwd_body<DA_T, DA_HEAD_DIM, G>(p, maps);
#else
#define DA_HBODY(G)
#endif

// da_hfwd_<dtype>_d<D>_g<G> and its dynamic shared-memory size
// da_hfwd_<dtype>_d<D>_g<G>_smem (read by the driver).
#define DA_HFWD(G)                                                                                          \
    extern "C" __global__ void __launch_bounds__(da::kHThreads, 1)                                         \
        DA_CAT(DA_CAT(DA_CAT(DA_CAT(da_hfwd_, DA_DTYPE), _d), DA_HEAD_DIM), _g##G)(                        \
            const __grid_constant__ FwdParams p, const __grid_constant__ HTmaMaps maps) {                      \
        DA_HBODY(G)                                                                                         \
    }                                                                                                       \
    extern "C" __device__ int DA_CAT(DA_CAT(DA_CAT(DA_CAT(da_hfwd_, DA_DTYPE), _d), DA_HEAD_DIM), _g##G##_smem) = \
        da::HTraits<DA_HEAD_DIM, G>::kSmem;

DA_HFWD(1)
DA_HFWD(2)
DA_HFWD(4)
DA_HFWD(8)
#endif  // DA_HSTAGE
