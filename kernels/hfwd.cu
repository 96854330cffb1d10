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
//       of 64 keys prefetched two ahead, in the same swizzled layout, the
//       warpgroup transposes it into K^T (ldmatrix + stmatrix.trans) and builds
//       Khat^T[t][n] = sum of the group's K^T rows, 8 keys per 16-byte load
//       (f32, rounded once to T; G = 2 with T's own add, which is the same
//       single rounding), into an MN-major operand.
//   warpgroups 1, 2, consumers of 64 query rows each (the same plan: the
//       CTA's 128 rows are one plan block): S = Qhat Khat^T (wgmma, both
//       operands in shared memory), mask, online softmax (f32, base 2),
//       O += P V (wgmma, P from registers, V transposed from shared memory);
//       the softmax of tile j runs while P_{j-1} V_{j-1} is in the tensor pipe.
// Stages (3 or 4, HTraits::S): full[s] (producer -> consumers: the TMA bytes
// of the stage plus, for G > 1, 128 producer arrivals after Khat was written
// and fenced with fence.proxy.async), empty[s] (consumers -> producer: one
// arrival per consumer warp after its wgmma reads finished).
//
// Shared-memory operands:
//   Tiles loaded from global memory (Q for G = 1, K, V) use the
//   128-byte-swizzle layouts, one region per 64 columns: row r's 16-byte
//   chunk j of a region sits at r*128 + ((j ^ (r%8)) * 16) (TMA's 128-byte
//   swizzle of 64 x 64 boxes; Q by cp.async, whole 128-byte rows per warp).
//     K-major (Q, K): start + 32 bytes per k-step of 16, next region per 4
//       k-steps; SBO = 1024 (8 rows), swizzle mode 1.
//     MN-major (V, Khat^T; the reduction dim is the row): start + 2048 bytes
//       per 16 rows; LBO = region size (next 64 columns), SBO = 1024.
//   Qhat (written by threads) uses the no-swizzle K-major layout:
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
#endif

template <int D, int G>
struct HTraits {
    static constexpr int BM = 128, BN = 128, WM = 64;
    static constexpr int HN = 64;                     // keys per raw-K half tile (G > 1)
    static constexpr bool kFused = G > 1;
    static constexpr int DG = D / G;
    static constexpr int KW = (DG + 15) / 16 * 16;   // reduction width of S, padded to wgmma's k
    static constexpr int KC = kFused ? KW : D;        // columns of the S operands
    static constexpr int kPitchQraw = 2 * D + 16;
    static constexpr int kKBytes = BN * KC * 2;
    static constexpr int kVBytes = BN * D * 2;
    static constexpr int kStageBytes = kKBytes + kVBytes;
    static constexpr int kOffBar = 0;                 // full[S], empty[S], kraw_full[2]
    static constexpr int kOffZero = 248;              // a u32 0 (pins the consumers' wait, see there)
    static constexpr int kOffOff = 256;               // sigma as byte offsets into a raw Q row, D x u32
    static constexpr int kOffKTOff = kOffOff + 4 * D; // sigma as K^T row offsets (with swizzle), D x u16
    static constexpr int kOffQ = 1024;                // G = 1: Q (K-major); G > 1: Qhat (K-major)
    // G > 1 only: two raw-K half tiles (64 keys, 128-byte swizzle as G = 1's K)
    // and two K^T half tiles (one 128-byte row of 64 keys per column of K,
    // chunks XOR-swizzled by column % 8).
    static constexpr int kHalfBytes = HN * D * 2;
    static constexpr int kOffKraw = kOffQ + BM * KC * 2;
    static constexpr int kOffKT = kOffKraw + (kFused ? 2 * kHalfBytes : 0);
    static constexpr int kOffStage = kOffKT + (kFused ? 2 * kHalfBytes : 0);
    // Stages of (K or Khat, V): as many as fit, at most 4 (3 at D = 128 for
    // G = 1, 2, 4).
    static constexpr int kFit = (227 * 1024 - kOffStage) / kStageBytes;
    static constexpr int S = kFit < 4 ? kFit : 4;
    // G > 1: raw Q (read once, by the consumers' Qhat build) follows the
    // stages where it fits (D = 64); otherwise (D = 128) it aliases the last
    // stage, which the producer then first writes at tile S - 1, after barrier 4.
    static constexpr int kQrawBytes = BM * kPitchQraw;
    static constexpr bool kQrawAlias = kFused && kOffStage + S * kStageBytes + kQrawBytes > 227 * 1024;
    static constexpr int kOffQraw = kOffStage + (kQrawAlias ? (S - 1) * kStageBytes : S * kStageBytes);
    static constexpr int kSmem = kOffStage + S * kStageBytes + (kFused && !kQrawAlias ? kQrawBytes : 0);
    static_assert(S >= 3 && kSmem <= 227 * 1024, "shared memory");
    static_assert(!kQrawAlias || (kQrawBytes <= kStageBytes && KW == DG), "raw Q fits in a stage with no Khat pad");
    static_assert(kOffKTOff + 2 * D <= kOffQ && 8 * (2 * S + 2) <= kOffZero, "barriers and tables");
    static_assert(kOffStage % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0 && kHalfBytes % 1024 == 0,
                  "swizzle atoms");
    static_assert(DG % 8 == 0, "Khat is written in 8-column blocks");
    // setmaxnreg: consumers grow only by what the producer released in this
    // CTA (launch cap 168): 128 * (168 - 56) = 256 * (224 - 168).
    static constexpr int kProducerRegs = 56, kConsumerRegs = 224;
    static_assert(128 * (168 - kProducerRegs) >= 256 * (kConsumerRegs - 168), "register pool");
};

#if DA_HOPPER
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

// kAblate (timing builds of cuda-driver/bench/hstage only; 0 in the library):
// bit 0 the producer skips the transpose and Khat (Khat stale), bit 1 it skips
// the raw-K loads, bit 2 the consumers skip the softmax (P = S), bit 4
// cycle counters of producer thread 0 and consumer thread 128 into hprof
// (bit 3, the consumers taking turns for P_j V_j .. S_{j+1} with named
// barriers, measured 2-24% slower and was removed: kernels/NOTES.md).
template <typename T, int D, int G, int kAblate = 0>
__device__ __forceinline__ void hfwd_body(const FwdParams& p, const HTmaMaps& maps) {
    using Tr = HTraits<D, G>;
    using Nm = Num<T>;
    constexpr int BM = Tr::BM, BN = Tr::BN, HN = Tr::HN, S = Tr::S, KC = Tr::KC, DG = Tr::DG;
    constexpr bool kBf16 = Nm::kBf16;

    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t sbase = smem_addr(smem);
    const uint32_t bar_full = sbase + Tr::kOffBar, bar_empty = bar_full + 8 * S, bar_kraw = bar_empty + 8 * S;
    uint32_t* s_off = reinterpret_cast<uint32_t*>(smem + Tr::kOffOff);
    uint16_t* s_ktoff = reinterpret_cast<uint16_t*>(smem + Tr::kOffKTOff);

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
    }
    if constexpr (Tr::kFused) {
        // Entries are clamped: a corrupt plan gives wrong numbers, never a stray access.
        const uint16_t* perm = p.plan + (((long long)b * p.q_heads + h) * nblk + mblk) * D;
        for (int j = tid; j < D; j += kHThreads) {
            const int c = min((int)perm[j], D - 1);
            s_off[j] = 2 * c;
            s_ktoff[j] = (uint16_t)(c * 128 + ((c % 8) << 4));
        }
    }
    __syncthreads();

    if (wg == 0) {
        // ================= producer =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::kProducerRegs));
        auto stage_k = [&](int s) { return sbase + Tr::kOffStage + s * Tr::kStageBytes; };
        auto stage_v = [&](int s) { return stage_k(s) + Tr::kKBytes; };
        // Producer thread 0 issues every copy (TMA); it fences first, since the
        // buffer was last read through the generic proxy (ldmatrix, raw Q).
        const bool leader = lt == 0;

        if constexpr (Tr::kFused) {
            // G > 1, per half tile of 64 keys (i = 0, 1 of tile j; buffers i):
            // raw K (128-byte swizzle, as G = 1's K) -> K^T (one 128-byte row
            // of 64 keys per column of K; ldmatrix + stmatrix.trans,
            // conflict-free both ways) -> Khat^T[t][n] = sum of K^T's rows of
            // group t, 8 keys per 16-byte load, into region i of the stage's
            // MN-major 128-byte-swizzle B operand (row t at t*128).
            const uint32_t kraw = sbase + Tr::kOffKraw, kt = sbase + Tr::kOffKT;
            auto load_kraw = [&](int half) {   // leader only
                const uint32_t bar = bar_kraw + 8 * (half & 1);
                if constexpr (kAblate & 2) {
                    mbar_arrive(bar);
                } else {
                    fence_proxy_async();
                    mbar_arrive_expect_tx(bar, Tr::kHalfBytes);
                    tma_tile<D, HN>(kraw + (half & 1) * Tr::kHalfBytes, maps.k, half * HN, hk, b, bar);
                }
            };
            // Warp tw, step i: the 8x8 blocks of keys a*8.. (a = 2 tw + i / (D/32))
            // and columns c*8.. (c = (i % (D/32)) * 4 + m), lane = (m, r): row r
            // of matrix m. Addresses = per-lane base + a compile-time offset.
            // Source swizzle ((c % 8) ^ r) = (m ^ r) ^ (4 * ((i % (D/32)) % 2));
            // destination row c*8 + r, chunk a ^ r (r = column % 8).
            const int tw = lt / 32, tm = (lt % 32) / 8, tr = lt % 8;
            const uint32_t ld_base0 = kraw + (tw * 16 + tr) * 128 + ((tm ^ tr) << 4);
            const uint32_t ld_base1 = kraw + (tw * 16 + tr) * 128 + ((tm ^ tr ^ 4) << 4);
            const uint32_t st_base0 = kt + (tm * 8 + tr) * 128 + (((2 * tw) ^ tr) << 4);
            const uint32_t st_base1 = kt + (tm * 8 + tr) * 128 + (((2 * tw + 1) ^ tr) << 4);
            // Four ldmatrix before their four stmatrix (no "memory" clobber:
            // the asm statements keep their order, the barriers around the
            // transpose order it against the fuse), so the loads overlap.
            auto transpose = [&](int half) {
                constexpr int kCB = D / 32, kBatch = 4;   // kCB: ldmatrix.x4 per key block
                static_assert(2 * kCB % kBatch == 0, "transpose batches");
#pragma unroll
                for (int i0 = 0; i0 < 2 * kCB; i0 += kBatch) {
                    uint32_t x[kBatch][4];
#pragma unroll
                    for (int u = 0; u < kBatch; ++u) {
                        const int ci = (i0 + u) % kCB, ai = (i0 + u) / kCB;
                        const uint32_t src = ((ci % 2) ? ld_base1 : ld_base0) + half * Tr::kHalfBytes + ai * 1024 +
                                             (ci / 2) * (HN * 128);
                        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                                     : "=r"(x[u][0]), "=r"(x[u][1]), "=r"(x[u][2]), "=r"(x[u][3])
                                     : "r"(src));
                    }
#pragma unroll
                    for (int u = 0; u < kBatch; ++u) {
                        const int ci = (i0 + u) % kCB, ai = (i0 + u) / kCB;
                        const uint32_t dst = (ai ? st_base1 : st_base0) + half * Tr::kHalfBytes + ci * 32 * 128;
                        asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                                         dst),
                                     "r"(x[u][0]), "r"(x[u][1]), "r"(x[u][2]), "r"(x[u][3]));
                    }
                }
            };
            // Thread lt builds key chunk q = lt % 8 (keys 8q..8q+7 of the half)
            // of rows t = it * 16 + lt / 8. Its K^T offsets (row of sigma(t*G+i),
            // chunk q swizzled) are the same for every half tile: two per
            // register, computed once. Plain loads and stores (no asm), so
            // ptxas overlaps the iterations' loads.
            constexpr int kItems = DG * (HN / 8), kGIt = (kItems + 127) / 128, kOffs = kGIt * G;
            const int q = lt % 8;
            uint32_t koff[(kOffs + 1) / 2];
#pragma unroll
            for (int k = 0; k < (kOffs + 1) / 2; ++k) koff[k] = 0;
#pragma unroll
            for (int k = 0; k < kOffs; ++k) {
                const int t = (k / G) * 16 + lt / 8;
                const uint32_t o = t < DG ? ((uint32_t)s_ktoff[t * G + k % G] ^ (uint32_t)(q << 4)) : 0u;
                koff[k / 2] |= o << (16 * (k % 2));
            }
            // G = 2: the loads of two rows are issued before their adds (the
            // compiler cannot move loads of K^T above stores into the stage;
            // four rows at once spill at D = 128).
            constexpr int kB2 = kGIt < 2 ? kGIt : 2;
            auto fuse = [&](int half, int s) {
                const unsigned char* src = smem + Tr::kOffKT + half * Tr::kHalfBytes;
                unsigned char* dst = smem + Tr::kOffStage + s * Tr::kStageBytes + half * (Tr::KW * 128);
                auto load = [&](int k) {
                    return *reinterpret_cast<const uint4*>(src + ((koff[k / 2] >> (16 * (k % 2))) & 0xFFFFu));
                };
                auto store = [&](int it, const uint32_t (&o)[4]) {
                    const int t = it * 16 + lt / 8;
                    *reinterpret_cast<uint4*>(dst + t * 128 + ((q ^ (t % 8)) << 4)) = make_uint4(o[0], o[1], o[2], o[3]);
                };
                if constexpr (G == 2) {
                    // T's own add of pairs: the same single rounding as fwd.cu's group_sum.
                    using T2 = std::conditional_t<kBf16, __nv_bfloat162, __half2>;
#pragma unroll
                    for (int it0 = 0; it0 < kGIt; it0 += kB2) {
                        if (kItems % 128 != 0 && it0 * 16 + lt / 8 >= DG) break;
                        uint4 e[kB2][2];
#pragma unroll
                        for (int u = 0; u < kB2; ++u) {
                            e[u][0] = load((it0 + u) * 2);
                            e[u][1] = load((it0 + u) * 2 + 1);
                        }
#pragma unroll
                        for (int u = 0; u < kB2; ++u) {
                            const uint32_t* x = reinterpret_cast<const uint32_t*>(&e[u][0]);
                            const uint32_t* y = reinterpret_cast<const uint32_t*>(&e[u][1]);
                            uint32_t o[4];
#pragma unroll
                            for (int w = 0; w < 4; ++w) {
                                T2 a2 = *reinterpret_cast<const T2*>(x + w), b2 = *reinterpret_cast<const T2*>(y + w);
                                T2 c2 = __hadd2(a2, b2);
                                o[w] = *reinterpret_cast<const uint32_t*>(&c2);
                            }
                            store(it0 + u, o);
                        }
                    }
                } else {
#pragma unroll
                    for (int it = 0; it < kGIt; ++it) {
                        if (kItems % 128 != 0 && it * 16 + lt / 8 >= DG) break;
                        // fwd.cu's group_sum: a pairwise f32 tree rounded once to T,
                        // four members at a time (G = 8: the tree's two halves, summed last).
                        float part[8];
#pragma unroll
                        for (int g4 = 0; g4 < G / 4; ++g4) {
                            uint4 e[4];
#pragma unroll
                            for (int i = 0; i < 4; ++i) e[i] = load(it * G + g4 * 4 + i);
#pragma unroll
                            for (int el = 0; el < 8; ++el) {
                                float f[4];
#pragma unroll
                                for (int i = 0; i < 4; ++i) {
                                    const uint32_t word = reinterpret_cast<const uint32_t*>(&e[i])[el / 2];
                                    const uint16_t bits = (uint16_t)(word >> (16 * (el % 2)));
                                    f[i] = Nm::to_float(*reinterpret_cast<const T*>(&bits));
                                }
                                const float x = (f[0] + f[1]) + (f[2] + f[3]);
                                part[el] = g4 == 0 ? x : part[el] + x;
                            }
                        }
                        uint32_t o[4];
#pragma unroll
                        for (int w = 0; w < 4; ++w) {
                            const T lo = Nm::from_float(part[2 * w]), hi = Nm::from_float(part[2 * w + 1]);
                            o[w] = pack_raw(*reinterpret_cast<const uint16_t*>(&lo), *reinterpret_cast<const uint16_t*>(&hi));
                        }
                        store(it, o);
                    }
                }
            };
            // Raw K is prefetched two half tiles ahead (its copies tracked by
            // kraw[i]); V_j's copies hold full[s] open by themselves, so the
            // producer never waits for V. Per half tile i of tile j: wait for
            // raw K, transpose, one barrier (K^T complete; the raw buffer and
            // the other K^T buffer are free), issue the raw half two ahead,
            // fuse. The barrier also orders this fuse's K^T reads before the
            // transpose two half tiles later.
            if (leader && n_tiles > 0) {
                load_kraw(0);
                load_kraw(1);
            }
            // Khat^T rows past d/G (padding to wgmma's k, D = 64, G = 8) stay zero in every stage.
            if constexpr (Tr::KW > DG) {
                constexpr int kPadChunks = (Tr::KW - DG) * 8;   // 16-byte chunks per region
                for (int i = lt; i < S * (BN / 64) * kPadChunks; i += 128) {
                    const int s = i / ((BN / 64) * kPadChunks), r = i % ((BN / 64) * kPadChunks);
                    st_shared_v4(stage_k(s) + (r / kPadChunks) * (Tr::KW * 128) + DG * 128 + (r % kPadChunks) * 16,
                                 0, 0, 0, 0);
                }
            }
            constexpr bool kProf = kAblate & 16;
            HClock<kProf> c_all, c_kraw, c_xpose, c_empty, c_fuse;
            c_all.start();
            for (int j = 0; j < n_tiles; ++j) {
                const int s = j % S;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    c_kraw.start();
                    mbar_wait(bar_kraw + 8 * half, j & 1);
                    c_kraw.stop();
                    c_xpose.start();
                    if constexpr (!(kAblate & 1)) transpose(half);
                    named_bar(1, 128);
                    c_xpose.stop();
                    if (leader && j + 1 < n_tiles) load_kraw(2 * (j + 1) + half);
                    if (half == 0) {
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
                    c_fuse.start();
                    if constexpr (!(kAblate & 1)) fuse(half, s);
                    c_fuse.stop();
                }
                fence_proxy_async();
                mbar_arrive(bar_full + 8 * s);
            }
            c_all.stop();
            c_all.flush(0, lt == 0);
            c_kraw.flush(1, lt == 0);
            c_xpose.flush(2, lt == 0);
            c_empty.flush(3, lt == 0);
            c_fuse.flush(4, lt == 0);
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
        const T* qg = static_cast<const T*>(p.q) + (long long)b * p.q_batch_stride + (long long)h * p.q_head_stride;
        const long long qs = p.q_row_stride;
        const uint32_t q_op = sbase + Tr::kOffQ + cw * Tr::WM * KC * 2;   // this warpgroup's S operand A

        if constexpr (!Tr::kFused) {
            load_sw128<D, Tr::WM>(q_op, qg + (long long)r0 * qs, qs, n_q - r0, lt);
            cp_async_commit();
            cp_async_wait_all();
            fence_proxy_async();
            named_bar(2 + cw, 128);
        } else {
            // Raw Q rows (padded), then Qhat[m][t] (Mean: average of the
            // group's columns; Sample: the first in plan order), rounded to T.
            unsigned char* qraw = smem + Tr::kOffQraw + cw * Tr::WM * Tr::kPitchQraw;
            constexpr int kIters = Tr::WM * D / 8 / 128;
#pragma unroll 4
            for (int it = 0; it < kIters; ++it) {
                const int idx = it * 128 + lt;
                const int row = idx / (D / 8), c = idx % (D / 8);
                const bool ok = r0 + row < n_q;
                cp_async16(smem_addr(qraw) + row * Tr::kPitchQraw + c * 16,
                           ok ? qg + (long long)(r0 + row) * qs + c * 8 : qg, ok);
            }
            cp_async_commit();
            cp_async_wait_all();
            named_bar(2 + cw, 128);
            for (int idx = lt; idx < Tr::WM * (KC / 8); idx += 128) {
                const int row = idx % Tr::WM, tb = idx / Tr::WM;
                const unsigned char* qrow = qraw + row * Tr::kPitchQraw;
                uint16_t out[8];
#pragma unroll
                for (int u = 0; u < 8; ++u) {
                    const int t = tb * 8 + u;
                    float x = 0.f;
                    if (t < DG) {
                        if (p.sample) {
                            x = Nm::to_float(*reinterpret_cast<const T*>(qrow + s_off[t * G]));
                        } else {
#pragma unroll
                            for (int i = 0; i < G; ++i)
                                x += Nm::to_float(*reinterpret_cast<const T*>(qrow + s_off[t * G + i]));
                            x *= 1.f / G;
                        }
                    }
                    const T v = Nm::from_float(x);
                    out[u] = *reinterpret_cast<const uint16_t*>(&v);
                }
                st_shared_v4(q_op + tb * 128 + (row / 8) * (16 * KC) + (row % 8) * 16, pack_raw(out[0], out[1]),
                             pack_raw(out[2], out[3]), pack_raw(out[4], out[5]), pack_raw(out[6], out[7]));
            }
            fence_proxy_async();
            named_bar(2 + cw, 128);
            // Raw Q is read: the producer may fill the last stage (it waits at tile S - 1).
            if (Tr::kQrawAlias && n_tiles >= S) named_bar_arrive(4, kHThreads);
        }

        // S operands: G = 1 swizzled Q and K (next region every 4 k-steps),
        // G > 1 the no-swizzle Qhat and Khat.
        auto desc_a = [&](int kk) {
            if constexpr (Tr::kFused) {
                return make_desc(q_op + kk * 256, 128, 16 * KC);
            } else {
                return make_desc(q_op + (kk / 4) * (Tr::WM * 128) + (kk % 4) * 32, 16, 1024, 1);
            }
        };
        auto desc_b = [&](uint32_t kst, int kk) {
            if constexpr (Tr::kFused) {
                // Khat^T, MN-major: next 64 keys one region on, next 8 rows of t 1024 bytes on.
                return make_desc(kst + kk * 2048, Tr::KW * 128, 1024, 1);
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
                if constexpr (Tr::kFused) {
                    if (kk == 0) Wgmma<BN, kBf16>::ss_tb_first(acc_s, desc_a(kk), desc_b(kst, kk));
                    else Wgmma<BN, kBf16>::ss_tb(acc_s, desc_a(kk), desc_b(kst, kk), 1);
                } else {
                    if (kk == 0) Wgmma<BN, kBf16>::ss_first(acc_s, desc_a(kk), desc_b(kst, kk));
                    else Wgmma<BN, kBf16>::ss(acc_s, desc_a(kk), desc_b(kst, kk), 1);
                }
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
            float acc_s[BN / 2], corr_r[2];
            wgmma_fence();
            issue_s(acc_s, sbase + Tr::kOffStage);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc_s);
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
        c_all.stop();
        c_all.flush(5, tid == 128);
        c_full.flush(6, tid == 128);

        // ---- epilogue ----
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_l[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int i = row_base + 8 * r;
            if (i < n_q) {
                const long long off =
                    (long long)b * p.o_batch_stride + (long long)i * p.o_row_stride + (long long)h * p.o_head_stride;
                if (p.out_f32) {
                    float* o = static_cast<float*>(p.o) + off;
#pragma unroll
                    for (int dt = 0; dt < D / 8; ++dt) {
                        const int d = dt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<float2*>(o + d) =
                            make_float2(acc_o[dt * 4 + 2 * r] * inv, acc_o[dt * 4 + 2 * r + 1] * inv);
                    }
                } else {
                    T* o = static_cast<T*>(p.o) + off;
#pragma unroll
                    for (int dt = 0; dt < D / 8; ++dt) {
                        const int d = dt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<uint32_t*>(o + d) =
                            Nm::pack(acc_o[dt * 4 + 2 * r] * inv, acc_o[dt * 4 + 2 * r + 1] * inv);
                    }
                }
                if (p.lse != nullptr && lane % 4 == 0) {
                    p.lse[((long long)b * p.q_heads + h) * n_q + i] =
                        l > 0.f ? (row_m[r] * scale_log2 + __log2f(l)) * 0.6931471805599453f : -INFINITY;
                }
            }
        }
    }
}
#endif  // DA_HOPPER

}  // namespace da

#ifndef DA_HSTAGE   // cuda-driver/bench/hstage defines its own entry points
#define DA_CAT_(a, b) a##b
#define DA_CAT(a, b) DA_CAT_(a, b)

#if DA_DTYPE_IS_BF16
#define DA_T __nv_bfloat16
#else
#define DA_T __half
#endif

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
