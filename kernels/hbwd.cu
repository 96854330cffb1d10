// DistrAttention backward main kernel for Hopper (sm_90a): wgmma tensor
// cores, warp specialisation, an mbarrier pipeline. Same function and
// parameters as da_bwd (bwd.cu: BwdParams; the row passes da_bwd_prep and
// da_bwd_dq are bwd.cu's), used on compute capability 9.0 for head_dim 64
// (G = 1) and 128 (G = 1, 2); other shapes run bwd.cu's mma.sync kernel.
//
// One CTA (3 warpgroups, 384 threads) per (128 keys, KV head, batch), as
// da_bwd: K and V resident, dK and dV accumulated in registers over the query
// heads of the KV head and their query tiles (items) of BM = 64 rows.
//   warpgroup 0, producer: loads each item's Q (G = 1) or Qhat and Qtilde
//       (G > 1, from the row pass's workspace), dO, LSE, Delta and the plan
//       row by cp.async into a stage (S = 2 or 3 stages), each thread's
//       copies completing its arrival on full[s] (cp.async.mbarrier.arrive;
//       the consumers fence.proxy.async before their wgmma reads); every
//       consumer thread arrives on empty[s] once it has read the stage.
//   warpgroups 1, 2, consumers of 64 keys each (kl0 = 64 cw):
//       G > 1: Khat [64 keys][KW] rebuilt from the resident raw K when the
//              plan block changes (lanes = keys: conflict-free gathers);
//       S^T  = Khat Qhat^T    wgmma m64n64, k = KW, A and B K-major (smem)
//       dP^T = V dO^T         wgmma m64n64, k = D (its own commit group: P^T
//              is computed while it runs)
//       P^T = exp2(S^T scale log2e - LSE log2e) (masked), dS^T = P^T (dP^T - Delta)
//       dQhat_part = dS Khat  wgmma m64n64 (per 64 columns), A = dS^T stored
//              [key][query] (MN-major A), B = Khat [key][t] (MN-major),
//              k = this consumer's 64 keys; stored to shared memory in the
//              accumulator's tile layout (bwd_params.cuh, dq_acc_index) and
//              added to it by bulk reductions (cp.reduce.async.bulk, TMA):
//              one per warp (its 16 rows) and 64 columns; both consumers add
//              their part, while dV and dK run:
//       dV  += P^T dO         wgmma m64nD, A = P^T from registers, B = dO MN-major
//       dK  += dS^T Qtilde    wgmma m64nD, A = dS^T from registers
// Each CTA walks its query tiles from a rotated start (2 blockIdx.x tiles).
//
// Shared-memory operands use the 128-byte-swizzle layout of hfwd.cu: one
// region of R rows x 128 bytes per 64 columns, row r's 16-byte chunk j at
// r*128 + ((j ^ (r%8)) * 16).
//   K-major operand (reduction along the row): start + (kk/4) region + (kk%4)*32
//       per k-step of 16; SBO = 1024.
//   MN-major operand (reduction along the rows): start + kk*2048 (16 rows);
//       LBO = region size (next 64 columns), SBO = 1024.
// Rounding as bwd.cu (Khat with the forward's group sums; P and dS rounded
// to the input type as wgmma operands).
#include <type_traits>

#include "bwd_params.cuh"
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

constexpr int kHbThreads = 384;

template <int D, int G>
struct HbTraits {
    static constexpr int BM = 64;    // query rows per item
    static constexpr int BN = 128;   // keys per CTA
    static constexpr int WN = 64;    // keys per consumer warpgroup
    static constexpr bool kFused = G > 1;
    static constexpr int DG = D / G;
    static constexpr int KW = kFused ? (DG + 15) / 16 * 16 : D;   // columns of the S operands
    static_assert(!kFused || (KW == 64 && DG == 64), "G > 1: Khat is one 64-column region");
    static_assert(D % 64 == 0, "head_dim 64 or 128");
    static constexpr int kPitchKraw = 2 * D + 4;   // raw K (G > 1): 32 keys at one column hit 32 banks
    static constexpr int kOffBar = 0;              // full[S], empty[S]
    static constexpr int kOffV = 1024;
    static constexpr int kOffK = kOffV + BN * D * 2;   // G = 1: K; G > 1: Khat [2][WN][KW]
    static constexpr int kKBytes = kFused ? 2 * WN * KW * 2 : BN * D * 2;
    static constexpr int kOffDS = kOffK + kKBytes;     // dS^T [2][WN keys][BM queries]
    // dQhat part of each consumer, f32: KW / 64 panels of [BM][64], the
    // accumulator's tile layout (bwd_params.cuh, dq_acc_index: 8-float chunks
    // XOR-swizzled by row % 8, so the 8-byte stores are conflict-free per half
    // warp); bulk reductions (one per warp and panel) add it to the accumulator.
    static constexpr int kDqBytes = BM * KW * 4;
    static constexpr int kOffDQ = kOffDS + 2 * WN * BM * 2;
    static constexpr int kOffStage = kOffDQ + 2 * kDqBytes;
    // Stage: Q or Qtilde [BM][D], dO [BM][D], Qhat [BM][KW] (G > 1).
    static constexpr int kQBytes = BM * D * 2;
    static constexpr int kStageBytes = 2 * kQBytes + (kFused ? BM * KW * 2 : 0);
    // Per stage, after the tiles: LSE [BM], Delta [BM] (f32), plan row [D] (u16, G > 1).
    static constexpr int kSmallBytes = 2 * BM * 4 + (kFused ? D * 2 : 0);
    static constexpr int kFixed = kOffStage + (kFused ? BN * kPitchKraw : 0);
    static constexpr int kFit = (227 * 1024 - kFixed) / (kStageBytes + kSmallBytes);
    static constexpr int S = kFit < 3 ? kFit : 3;
    static constexpr int kOffSmall = kOffStage + S * kStageBytes;
    static constexpr int kOffKraw = kOffSmall + S * kSmallBytes;
    static constexpr int kSmem = kOffKraw + (kFused ? BN * kPitchKraw : 0);
    static_assert(S >= 2 && kSmem <= 227 * 1024, "shared memory");
    static_assert(kOffK % 1024 == 0 && kOffDS % 1024 == 0 && kOffDQ % 1024 == 0 && kDqBytes % 1024 == 0 &&
                      kOffStage % 1024 == 0 && kStageBytes % 1024 == 0 &&
                      kQBytes % 1024 == 0 && kOffKraw % 16 == 0,
                  "swizzle atoms");
    static_assert(16 * S <= kOffV, "barriers");
    // setmaxnreg: consumers grow only by what the producer released (launch cap 168).
    static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
    static_assert(128 * (168 - kProducerRegs) >= 256 * (kConsumerRegs - 168), "register pool");
};

#if DA_HOPPER
// K-major swizzled operand with regions of `rows` rows: k-step kk.
__device__ __forceinline__ uint64_t desc_kmaj(uint32_t base, int rows, int kk) {
    return make_desc(base + (kk / 4) * (rows * 128) + (kk % 4) * 32, 16, 1024, 1);
}
// MN-major swizzled operand with regions of `rows` rows: k-step kk (16 rows).
__device__ __forceinline__ uint64_t desc_mn(uint32_t base, int rows, int kk) {
    return make_desc(base + kk * 2048, rows * 128, 1024, 1);
}

template <typename T, int D, int G>
__device__ __forceinline__ void hbwd_body(const BwdParams& p) {
    using Tr = HbTraits<D, G>;
    using Nm = Num<T>;
    constexpr int BM = Tr::BM, BN = Tr::BN, WN = Tr::WN, KW = Tr::KW, S = Tr::S;
    constexpr bool kBf16 = Nm::kBf16;

    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t sbase = smem_addr(smem);
    const uint32_t bar_full = sbase + Tr::kOffBar, bar_empty = bar_full + 8 * S;

    const int tid = threadIdx.x, wg = tid / 128, lt = tid % 128;
    const int n0 = blockIdx.x * BN;
    const int b = (int)blockIdx.z + p.batch_offset;
    const int n_q = p.q_len, n_kv = p.kv_len;
    int hk, q_first, q_count;
    if (p.kv_map_len) {
        const int e = blockIdx.y;
        hk = p.kv_head[e];
        q_first = p.kv_first[e];
        q_count = p.kv_count[e];
    } else {
        hk = blockIdx.y;
        q_first = hk * p.heads_per_kv;
        q_count = p.heads_per_kv;
    }
    // Query tiles that see a key of this tile (bottom-right causal mask), as da_bwd.
    const int n_mt = (n_q + BM - 1) / BM;
    const int mt_begin = p.causal ? max(0, n0 + n_q - n_kv) / BM : 0;
    const int per_head = n_mt - mt_begin;
    const int n_items = q_count * per_head;
    auto item_head = [&](int it) {
        const int i = it / per_head;
        return p.kv_map_len ? (int)p.q_list[q_first + i] : q_first + i;
    };
    // The key tiles of a head start their query-tile walk at different tiles
    // (an even rotation keeps a 128-row plan block's two tiles together), so
    // concurrent CTAs add to different dQhat rows.
    const int rot = per_head > 1 ? (2 * (int)blockIdx.x) % per_head : 0;
    auto item_row0 = [&](int it) {
        const int t = it % per_head + rot;
        return (mt_begin + (t >= per_head ? t - per_head : t)) * BM;
    };

    const T* kg = static_cast<const T*>(p.k) + (long long)b * p.k_batch_stride + (long long)hk * p.k_head_stride +
                  (long long)n0 * p.k_row_stride;
    const T* vg = static_cast<const T*>(p.v) + (long long)b * p.v_batch_stride + (long long)hk * p.v_head_stride +
                  (long long)n0 * p.v_row_stride;

    if (tid == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(bar_full + 8 * s, 128);
            mbar_init(bar_empty + 8 * s, 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // K and V of the tile (rows past the end zero-filled): V by warpgroup 0,
    // K by warpgroup 1 (G = 1, the swizzled wgmma layout) or raw K by
    // warpgroups 1 and 2 (G > 1, padded rows for the Khat gathers).
    if (wg == 0) {
        load_sw128<D, BN>(sbase + Tr::kOffV, vg, p.v_row_stride, n_kv - n0, lt);
    } else if constexpr (!Tr::kFused) {
        if (wg == 1) load_sw128<D, BN>(sbase + Tr::kOffK, kg, p.k_row_stride, n_kv - n0, lt);
    } else {
        constexpr int kWords = D / 2;
        for (int i = tid - 128; i < BN * kWords; i += 256) {
            const int r = i / kWords, w = i % kWords;
            const bool ok = r < n_kv - n0;
            cp_async4(sbase + Tr::kOffKraw + r * Tr::kPitchKraw + w * 4, ok ? kg + (long long)r * p.k_row_stride + 2 * w : kg,
                      ok);
        }
    }
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();

    if (wg == 0) {
        // ================= producer =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::kProducerRegs));
        auto load_item = [&](int it, int s, int lt) {
            const int h = item_head(it), m0 = item_row0(it);
            const int rows = n_q - m0;
            const long long row_base = ((long long)b * p.q_heads + h) * n_q + m0;
            const uint32_t st = sbase + Tr::kOffStage + s * Tr::kStageBytes;
            if constexpr (Tr::kFused) {
                load_sw128<D, BM>(st, static_cast<const T*>(p.qtil) + row_base * D, D, rows, lt);
                load_sw128<KW, BM>(st + 2 * Tr::kQBytes, static_cast<const T*>(p.qhat) + row_base * D, D, rows, lt);
            } else {
                const T* qg = static_cast<const T*>(p.q) + (long long)b * p.q_batch_stride +
                              (long long)h * p.q_head_stride + (long long)m0 * p.q_row_stride;
                load_sw128<D, BM>(st, qg, p.q_row_stride, rows, lt);
            }
            const T* dog = static_cast<const T*>(p.d_out) + (long long)b * p.do_batch_stride +
                           (long long)h * p.do_head_stride + (long long)m0 * p.do_row_stride;
            load_sw128<D, BM>(st + Tr::kQBytes, dog, p.do_row_stride, rows, lt);
            const uint32_t small = sbase + Tr::kOffSmall + s * Tr::kSmallBytes;
            if (lt < BM) {
                const bool ok = lt < rows;
                cp_async4(small + lt * 4, ok ? p.lse + row_base + lt : p.lse, ok);
            } else {
                const int r = lt - BM;
                const bool ok = r < rows;
                cp_async4(small + BM * 4 + r * 4, ok ? p.delta + row_base + r : p.delta, ok);
            }
            if constexpr (Tr::kFused) {
                const uint16_t* perm =
                    p.plan + (((long long)b * p.q_heads + h) * p.num_blocks + m0 / p.block_rows) * D;
                if (lt < D / 2) cp_async4(small + 2 * BM * 4 + lt * 4, perm + 2 * lt);
            }
        };
        for (int it = 0; it < n_items; ++it) {
            const int s = it % S;
            if (it >= S) mbar_wait(bar_empty + 8 * s, ((it / S) + 1) & 1);
            // The thread's copy offsets are recomputed per item from an opaque
            // copy of its index: hoisted out of the loop, they do not fit the
            // producer's 24 registers (ptxas spilled them).
            int lt_item;
            asm volatile("mov.u32 %0, %1;\n" : "=r"(lt_item) : "r"(lt));
            load_item(it, s, lt_item);
            // Item it reaches the consumers when this thread's copies have
            // landed (each of the 128 producer threads arrives once per item).
            cp_async_mbar_arrive_noinc(bar_full + 8 * s);
        }
    } else {
        // ================= consumers =================
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tr::kConsumerRegs));
        const int cw = wg - 1, warp = lt / 32, lane = lt % 32;
        const int kl0 = cw * WN;                    // this warpgroup's keys within the tile
        const uint32_t v_a = sbase + Tr::kOffV + kl0 * 128;
        // S^T's A: K rows kl0.. (regions of BN rows) or this warpgroup's Khat (one region of WN rows).
        const uint32_t k_a = Tr::kFused ? sbase + Tr::kOffK + cw * (WN * KW * 2) : sbase + Tr::kOffK + kl0 * 128;
        constexpr int kKRows = Tr::kFused ? WN : BN;
        const uint32_t ds_t = sbase + Tr::kOffDS + cw * (WN * BM * 2);
        const uint32_t dq_s = sbase + Tr::kOffDQ + cw * Tr::kDqBytes;
        unsigned char* const dq_p = smem + Tr::kOffDQ + cw * Tr::kDqBytes;
        const float scale_log2 = p.scale_log2;
        constexpr float kLog2e = 1.4426950408889634f;

        float acc_dk[D / 2], acc_dv[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) {
            acc_dk[i] = 0.f;
            acc_dv[i] = 0.f;
        }
        int fused_key = -1;

        for (int it = 0; it < n_items; ++it) {
            const int s = it % S, h = item_head(it), m0 = item_row0(it);
            const uint32_t st = sbase + Tr::kOffStage + s * Tr::kStageBytes;
            const uint32_t st_q = st, st_do = st + Tr::kQBytes, st_qh = st + 2 * Tr::kQBytes;
            const unsigned char* small = smem + Tr::kOffSmall + s * Tr::kSmallBytes;
            const float* s_lse = reinterpret_cast<const float*>(small);
            const float* s_delta = s_lse + BM;
            mbar_wait(bar_full + 8 * s, (it / S) & 1);
            fence_proxy_async();   // the producer's cp.async writes before this warpgroup's wgmma reads

            if constexpr (Tr::kFused) {
                // Khat of this (head, plan block), unless it is there. The
                // previous item's wgmmas that read it have completed (wait 0).
                const int key = h * p.num_blocks + m0 / p.block_rows;
                if (key != fused_key) {
                    fused_key = key;
                    const uint16_t* perm = reinterpret_cast<const uint16_t*>(small + 2 * BM * 4);
                    const int nl = (warp % 2) * 32 + lane;   // lanes = keys: conflict-free gathers
                    const unsigned char* krow = smem + Tr::kOffKraw + (kl0 + nl) * Tr::kPitchKraw;
#pragma unroll 1
                    for (int j = 0; j < KW / 16; ++j) {
                        const int t0 = (warp / 2) * (KW / 2) + j * 8;
                        uint16_t out[8];
#pragma unroll
                        for (int u = 0; u < 8; ++u) {
                            T e[G];
#pragma unroll
                            for (int a = 0; a < G; ++a)
                                e[a] = *reinterpret_cast<const T*>(krow + min((int)perm[(t0 + u) * G + a], D - 1) * 2);
                            const T x = group_sum<T, G>(e);
                            out[u] = *reinterpret_cast<const uint16_t*>(&x);
                        }
                        st_shared_v4(k_a + nl * 128 + (((t0 / 8) ^ (nl % 8)) << 4), pack_raw(out[0], out[1]),
                                     pack_raw(out[2], out[3]), pack_raw(out[4], out[5]), pack_raw(out[6], out[7]));
                    }
                    fence_proxy_async();
                    named_bar(1 + cw, 128);
                }
            }

            // ---- S^T = Khat Qhat^T, dP^T = V dO^T: two commit groups; P^T is
            // computed while dP^T is still in the tensor pipe ----
            float acc_s[BM / 2], acc_dp[BM / 2];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KW / 16; ++kk) {
                const uint64_t a = desc_kmaj(k_a, kKRows, kk);
                const uint64_t bq = desc_kmaj(Tr::kFused ? st_qh : st_q, BM, kk);
                if (kk == 0) Wgmma<BM, kBf16>::ss_first(acc_s, a, bq);
                else Wgmma<BM, kBf16>::ss(acc_s, a, bq, 1);
            }
            wgmma_commit();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const uint64_t a = desc_kmaj(v_a, BN, kk), bd = desc_kmaj(st_do, BM, kk);
                if (kk == 0) Wgmma<BM, kBf16>::ss_first(acc_dp, a, bd);
                else Wgmma<BM, kBf16>::ss(acc_dp, a, bd, 1);
            }
            wgmma_commit();
            wgmma_wait<1>();
            fence_regs(acc_s);

            // ---- P^T (a thread: keys g, g+8 of its warp's 16; queries nt*8 + 2c + e) ----
            const int key_r = n0 + kl0 + warp * 16 + lane / 4;   // + 8 r
            const bool need_mask = (n0 + kl0 + WN > n_kv) || (p.causal && m0 + n_kv - n_q < n0 + kl0 + WN - 1);
#pragma unroll
            for (int nt = 0; nt < BM / 8; ++nt) {
                const int qc = nt * 8 + (lane % 4) * 2;
                const float2 l2 = *reinterpret_cast<const float2*>(s_lse + qc);
                const float ll[2] = {l2.x * kLog2e, l2.y * kLog2e};
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int idx = nt * 4 + 2 * r + e;
                        float x = fast_exp2(fmaf(acc_s[idx], scale_log2, -ll[e]));
                        if (need_mask) {
                            const int key = key_r + 8 * r;
                            const bool ok = key < n_kv && (!p.causal || key <= m0 + qc + e + n_kv - n_q);
                            x = ok ? x : 0.f;
                        }
                        acc_s[idx] = x;
                    }
            }
            fence_regs(acc_s);
            wgmma_wait<0>();
            fence_regs(acc_dp);
            // ---- dS^T = P^T (dP^T - Delta) ----
#pragma unroll
            for (int nt = 0; nt < BM / 8; ++nt) {
                const float2 d2 = *reinterpret_cast<const float2*>(s_delta + nt * 8 + (lane % 4) * 2);
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    acc_dp[nt * 4 + 2 * r] = acc_s[nt * 4 + 2 * r] * (acc_dp[nt * 4 + 2 * r] - d2.x);
                    acc_dp[nt * 4 + 2 * r + 1] = acc_s[nt * 4 + 2 * r + 1] * (acc_dp[nt * 4 + 2 * r + 1] - d2.y);
                }
            }
            uint32_t pf[BM / 16][4], dsf[BM / 16][4];
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    pf[kk][i] = Nm::pack(acc_s[8 * kk + 2 * i], acc_s[8 * kk + 2 * i + 1]);
                    dsf[kk][i] = Nm::pack(acc_dp[8 * kk + 2 * i], acc_dp[8 * kk + 2 * i + 1]);
                }
            // dS^T to shared memory, [key][query] swizzled (dQhat's MN-major A):
            // chunk nt of row kl at ((nt ^ (kl % 8)) << 4), an XOR of the row's base.
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int kl = warp * 16 + lane / 4 + 8 * r;
                const uint32_t row = ds_t + kl * 128 + ((kl % 8) << 4) + (lane % 4) * 4;
#pragma unroll
                for (int nt = 0; nt < BM / 8; ++nt)
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(row ^ (nt << 4)), "r"(dsf[nt / 2][(nt % 2) * 2 + r])
                                 : "memory");
            }
            fence_proxy_async();
            // The previous item's bulk reductions have read this warp's rows of
            // the dQhat buffer (its lane 0 issued them; the barrier passes that on).
            if (lane == 0) bulk_wait_read();
            named_bar(1 + cw, 128);   // dS^T of all four warps written

            // ---- dQhat part = dS Khat over this warpgroup's keys (64 columns per
            // chunk), then dV += P^T dO, dK += dS^T Qtilde (k = BM queries): the
            // first chunk is stored to shared memory and added to the f32
            // accumulator (a bulk reduction per warp) while dV and dK are in the
            // tensor pipe ----
            auto issue_dq = [&](float (&acc_q)[32], int c) {
                // B: Khat [key][t] (one region) or K rows kl0.. of region c.
                const uint32_t kb = Tr::kFused ? k_a : sbase + Tr::kOffK + c * (BN * 128) + kl0 * 128;
#pragma unroll
                for (int kk = 0; kk < WN / 16; ++kk) {
                    const uint64_t a = desc_mn(ds_t, WN, kk), bk = desc_mn(kb, kKRows, kk);
                    if (kk == 0) Wgmma<64, kBf16>::ss_tt_first(acc_q, a, bk);
                    else Wgmma<64, kBf16>::ss_tt(acc_q, a, bk, 1);
                }
            };
            // A thread's values: rows warp*16 + lane/4 (+ 8), columns c*64 + nt*8 + 2 (lane%4) (+ 1),
            // chunk nt of a row stored at chunk nt ^ (row % 8) = nt ^ (lane / 4).
            auto store_dq = [&](const float (&acc_q)[32], int c) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    unsigned char* row = dq_p + c * (BM * 256) + (warp * 16 + lane / 4 + 8 * r) * 256 + (lane % 4) * 8;
#pragma unroll
                    for (int nt = 0; nt < 8; ++nt)
                        *reinterpret_cast<float2*>(row + ((nt ^ (lane / 4)) << 5)) =
                            make_float2(acc_q[nt * 4 + 2 * r], acc_q[nt * 4 + 2 * r + 1]);
                }
            };
            // This warp's 16 rows of panel c (columns 64c..) are in shared memory:
            // its lane 0 adds those inside the sequence to the accumulator's
            // panel, one contiguous range. (No warpgroup barrier: the warps'
            // rows are disjoint.)
            auto flush_dq = [&](int c) {
                fence_proxy_async();
                __syncwarp();
                if (lane == 0) {
                    const int v = min(BM, n_q - m0), rows = min(16, v - warp * 16);
                    if (rows > 0) {
                        const long long panel = (((long long)b * p.q_heads + h) * n_q + m0) * D + (long long)c * v * 64 +
                                                warp * 16 * 64;
                        bulk_reduce_add_f32(p.dq_acc + panel, dq_s + c * (BM * 256) + warp * 16 * 256, rows * 256);
                    }
                    bulk_commit();
                }
            };
            // The stage's operands (Q, dO) and small parts are read: release it
            // (every consumer thread arrives for its own reads).
            auto release = [&]() { mbar_arrive(bar_empty + 8 * s); };
            {
                float acc_q[32];
                wgmma_fence();
                issue_dq(acc_q, 0);
                wgmma_commit();
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) Wgmma<D, kBf16>::rs_tb(acc_dv, pf[kk], desc_mn(st_do, BM, kk), 1);
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) Wgmma<D, kBf16>::rs_tb(acc_dk, dsf[kk], desc_mn(st_q, BM, kk), 1);
                wgmma_commit();
                wgmma_wait<1>();
                fence_regs(acc_q);
                store_dq(acc_q, 0);
                flush_dq(0);
            }
            if constexpr (KW / 64 == 2) {
                float acc_q[32];
                wgmma_fence();
                issue_dq(acc_q, 1);
                wgmma_commit();
                wgmma_wait<1>();
                fence_regs(acc_dv);
                fence_regs(acc_dk);
                release();
                wgmma_wait<0>();
                fence_regs(acc_q);
                store_dq(acc_q, 1);
                flush_dq(1);
            } else {
                static_assert(KW / 64 == 1, "dQhat chunks");
                wgmma_wait<0>();
                fence_regs(acc_dv);
                fence_regs(acc_dk);
                release();
            }
        }
        // The reductions have completed before the CTA's shared memory goes.
        if (lane == 0) bulk_wait_all();

        // ---- epilogue: dK (times scale) and dV (added to when an earlier launch wrote them) ----
        const float scale = p.scale;
        const bool accum = p.kv_map_len && p.kv_accum[blockIdx.y] != 0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = n0 + kl0 + warp * 16 + lane / 4 + 8 * r;
            if (key >= n_kv) continue;
            const long long ok = (long long)b * p.dk_batch_stride + (long long)key * p.dk_row_stride +
                                 (long long)hk * p.dk_head_stride;
            const long long ov = (long long)b * p.dv_batch_stride + (long long)key * p.dv_row_stride +
                                 (long long)hk * p.dv_head_stride;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const int col = dt * 8 + (lane % 4) * 2;
                store_grad2<T>(p.dk, p.dk_f32, ok + col,
                               make_float2(acc_dk[dt * 4 + 2 * r] * scale, acc_dk[dt * 4 + 2 * r + 1] * scale), accum);
                store_grad2<T>(p.dv, p.dv_f32, ov + col, make_float2(acc_dv[dt * 4 + 2 * r], acc_dv[dt * 4 + 2 * r + 1]),
                               accum);
            }
        }
    }
}
#endif  // DA_HOPPER

}  // namespace da

#if DA_HOPPER
#define DA_HBBODY(G) da::hbwd_body<DA_T, DA_HEAD_DIM, G>(p);
#else
#define DA_HBBODY(G)
#endif

#define DA_HBWD_PREFIX DA_CAT(DA_CAT(DA_CAT(da_hbwd_, DA_DTYPE), _d), DA_HEAD_DIM)

// da_hbwd_<dtype>_d<D>_g<G> and its dynamic shared-memory size da_hbwd_<dtype>_d<D>_g<G>_smem.
#define DA_HBWD(G)                                                                                   \
    extern "C" __global__ void __launch_bounds__(da::kHbThreads, 1)                                 \
        DA_CAT(DA_HBWD_PREFIX, _g##G)(const __grid_constant__ BwdParams p) {                          \
        DA_HBBODY(G)                                                                                 \
    }                                                                                                \
    extern "C" __device__ int DA_CAT(DA_CAT(DA_HBWD_PREFIX, _g##G), _smem) = da::HbTraits<DA_HEAD_DIM, G>::kSmem;

DA_HBWD(1)
#if DA_HEAD_DIM == 128
DA_HBWD(2)
#endif
