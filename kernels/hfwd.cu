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
//       warpgroup computes Khat = K F on the tensor cores (F: the plan's D x d/G
//       0/1 fusion matrix, built once per CTA), rounds the f32 sums once to T
//       and stores Khat K-major (stmatrix), the layout of Qhat.
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
    static constexpr int kOffQ = 1024;                // G = 1: Q (K-major); G > 1: Qhat (K-major)
    // G > 1 only: two raw-K half tiles (64 keys, 128-byte swizzle as G = 1's K)
    // and the fusion matrix F^T (KW x D, K-major, no swizzle; F[c][t] = 1 for
    // the columns c of group t, rows t >= d/G zero).
    static constexpr int kHalfBytes = HN * D * 2;
    static constexpr int kFBytes = KW * D * 2;
    static constexpr int kOffKraw = kOffQ + BM * KC * 2;
    static constexpr int kOffF = kOffKraw + (kFused ? 2 * kHalfBytes : 0);
    static constexpr int kOffStage = kOffF + (kFused ? kFBytes : 0);
    // Stages of (K or Khat, V): as many as fit, at most 4 (3 at D = 128 for
    // G = 1, 2).
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
    static_assert(kOffOff + 4 * D <= kOffQ && 8 * (2 * S + 2) <= kOffZero, "barriers and tables");
    static_assert(kOffStage % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0 && kHalfBytes % 1024 == 0 &&
                      kFBytes % 1024 == 0,
                  "swizzle atoms");
    // setmaxnreg: consumers grow only by what the producer released in this
    // CTA (launch cap 168): 128 * (168 - 56) = 256 * (224 - 168). The K GEMM's
    // 32 accumulators (KW = 64) need more in the producer: 72 / 216.
    static constexpr int kProducerRegs = KW == 64 && kFused ? 72 : 56;
    static constexpr int kConsumerRegs = KW == 64 && kFused ? 216 : 224;
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
// bit 0 the producer skips the K GEMM and Khat (Khat stale), bit 1 it skips
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
        }
        // F^T zeroed here, its ones set by the producer after the barrier.
        for (int i = tid; i < Tr::kFBytes / 16; i += kHThreads) st_shared_v4(sbase + Tr::kOffF + 16 * i, 0, 0, 0, 0);
    }
    __syncthreads();

    if (wg == 0) {
        // ================= producer =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::kProducerRegs));
        auto stage_k = [&](int s) { return sbase + Tr::kOffStage + s * Tr::kStageBytes; };
        auto stage_v = [&](int s) { return stage_k(s) + Tr::kKBytes; };
        // Producer thread 0 issues every copy (TMA); before V's it fences, since
        // the stage was last read through the generic proxy (raw Q, D = 128;
        // the raw-K buffers are read by wgmma only).
        const bool leader = lt == 0;

        if constexpr (Tr::kFused) {
            // G > 1, per half tile of 64 keys (i = 0, 1 of tile j; raw buffer i):
            // Khat = K F on the tensor cores (wgmma m64nKWk16, A = the raw K
            // half tile as TMA lands it, K-major 128-byte swizzle like G = 1's
            // K; B = F^T, K-major), the f32 accumulators (exact sums of the
            // group's G values, zeros elsewhere) rounded once to T and stored
            // by stmatrix as rows i*64.. of the stage's K-major Khat tile (no
            // swizzle, the layout of Qhat), which the consumers read as G = 1
            // reads K.
            const uint32_t kraw = sbase + Tr::kOffKraw, fmat = sbase + Tr::kOffF;
            auto load_kraw = [&](int half) {   // leader only
                const uint32_t bar = bar_kraw + 8 * (half & 1);
                if constexpr (kAblate & 2) {
                    mbar_arrive(bar);
                } else {
                    mbar_arrive_expect_tx(bar, Tr::kHalfBytes);
                    tma_tile<D, HN>(kraw + (half & 1) * Tr::kHalfBytes, maps.k, half * HN, hk, b, bar);
                }
            };
            {
                // F^T[t][c] = 1 for the D plan entries (t = j / G, c = sigma(j)).
                const T one = Nm::from_float(1.f);
                for (int j = lt; j < D; j += 128) {
                    const int c = (int)(s_off[j] / 2), t = j / G;
                    *reinterpret_cast<T*>(smem + Tr::kOffF + (c / 8) * 128 + (t / 8) * (16 * D) + (t % 8) * 16 +
                                          (c % 8) * 2) = one;
                }
                fence_proxy_async();
                named_bar(1, 128);
            }
            constexpr int KW = Tr::KW;
            const uint64_t desc_f = make_desc(fmat, 128, 16 * D);
            auto kgemm = [&](float (&acc)[KW / 2], int half) {
                const uint64_t desc_k = make_desc(kraw + half * Tr::kHalfBytes, 16, 1024, 1);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const uint64_t da_ = desc_k + (((kk / 4) * (HN * 128) + (kk % 4) * 32) >> 4);
                    const uint64_t db_ = desc_f + ((kk * 256) >> 4);
                    if (kk == 0) Wgmma<KW, kBf16>::ss_first(acc, da_, db_);
                    else Wgmma<KW, kBf16>::ss(acc, da_, db_, 1);
                }
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(acc);
            };
            // Thread (warp w, lane l) holds rows 16w + l/4 + 8r, columns 8nt + 2(l%4) + e
            // of the half tile's Khat (acc[4nt + 2r + e]); stmatrix.x4 writes the
            // 8x8 blocks (r, nt), (r, nt + 1) for r = 0, 1; lane l addresses row
            // l % 8 of block l / 8.
            const int warp = lt / 32, lane = lt % 32;
            const uint32_t st_off = (uint32_t)((lane / 16) * 128 + (2 * warp + (lane / 8) % 2) * (16 * KW) + (lane % 8) * 16);
            auto store_khat = [&](const float (&acc)[KW / 2], int half, int s) {
                const uint32_t dst = stage_k(s) + half * (8 * 16 * KW) + st_off;
#pragma unroll
                for (int nt = 0; nt < KW / 8; nt += 2) {
                    const uint32_t r0 = Nm::pack(acc[4 * nt], acc[4 * nt + 1]);
                    const uint32_t r1 = Nm::pack(acc[4 * nt + 2], acc[4 * nt + 3]);
                    const uint32_t r2 = Nm::pack(acc[4 * nt + 4], acc[4 * nt + 5]);
                    const uint32_t r3 = Nm::pack(acc[4 * nt + 6], acc[4 * nt + 7]);
                    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(dst + nt * 128),
                                 "r"(r0), "r"(r1), "r"(r2), "r"(r3)
                                 : "memory");
                }
            };
            // Raw K is prefetched two half tiles ahead (its copies tracked by
            // kraw[i]); V_j's copies hold full[s] open by themselves, so the
            // producer never waits for V. Per half tile i of tile j: wait for
            // raw K, the K GEMM, one barrier (every warp's wgmma has read the
            // raw buffer), issue the raw half two ahead, store Khat.
            if (leader && n_tiles > 0) {
                load_kraw(0);
                load_kraw(1);
            }
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
                    c_gemm.start();
                    float acc[KW / 2];
                    if constexpr (!(kAblate & 1)) kgemm(acc, half);
                    named_bar(1, 128);
                    c_gemm.stop();
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
                    c_store.start();
                    if constexpr (!(kAblate & 1)) store_khat(acc, half, s);
                    c_store.stop();
                }
                fence_proxy_async();
                mbar_arrive(bar_full + 8 * s);
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
