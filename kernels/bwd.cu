// DistrAttention backward pass, FlashAttention-2 style: no N x M buffer; S
// and P are recomputed tile by tile from Qhat, Khat and the forward's LSE.
// mma.sync (m16n8k16) tensor cores, f32 accumulation.
//
// Three kernels per (DA_DTYPE, DA_HEAD_DIM) translation unit:
//
//   da_bwd_prep   per query row: Delta = rowsum(dO o O) (f32), zeroes the
//                 row's dQhat accumulator, converts an f32 dO to the input
//                 type (the main kernel's mma operand), and for G > 1 writes
//                 the row's Qhat (d/G columns, padded) and Qtilde (Qhat
//                 expanded to d columns: column j holds its group's Qhat) to
//                 the workspace, once per row instead of once per key tile.
//   da_bwd        one CTA (8 warps) per (key tile of BN = 128 keys, KV head,
//                 batch). K and V stay in shared memory; dK and dV stay in
//                 registers (warp w owns keys 16w..16w+15 at full width)
//                 while the CTA walks the query heads that read this KV head
//                 (GQA: the sum over heads happens here, no atomics) and
//                 their query tiles of BM = 64 rows (one plan block each):
//                   G > 1: Khat^T re-fused from K when the plan block changes;
//                   S^T  = Khat Qhat^T          (k = d/G)
//                   P^T  = exp(scale S^T - LSE) (masked)
//                   dP^T = V dO^T               (k = d)
//                   dS^T = P^T o (dP^T - Delta)
//                   dV  += P^T dO               (k = BM)
//                   dK  += dS^T Qtilde          (k = BM, d columns: the
//                          plan changes per query block, so dKhat cannot be
//                          kept in registers in a fixed column order)
//                   dQhat = dS Khat             (k = BN, d/G columns),
//                          atomically added (f32) to the accumulator
//                          (tiles of 64 rows: bwd_params.cuh, dq_acc_index).
//                 One barrier per query tile (dS^T and Khat^T double-buffered),
//                 plus one when Khat^T is re-fused.
//   da_bwd_dq     per query row: dQ from the accumulator through the fusion
//                 (Mean: dQhat/G to every column of the group; Sample: dQhat
//                 to the sampled column, 0 to the others), times scale.
//
// Rounding matches the forward (fwd.cu): Qhat and Khat rounded to the input
// type (Khat with the same group sums), so P is the forward's P; P and dS
// are rounded to the input type as mma operands (as in FlashAttention-2).
//
// FLOPs per (query, key) pair, in units of d multiply-adds: exact attention
// 5 (S, dP, dV, dK, dQ); here 3 + 2/G (S and dQhat shrink to d/G): 4 at G = 2.
#include <type_traits>

#include "common.cuh"

#ifndef DA_HEAD_DIM
#error "define DA_HEAD_DIM (32, 64 or 128)"
#endif
#ifndef DA_DTYPE
#error "define DA_DTYPE (f16 or bf16)"
#endif

#include "bwd_params.cuh"

namespace da {

constexpr int kBwdThreads = 256;
constexpr int kRowThreads = 128;
constexpr int kRowsPerCta = 64;   // rows per CTA of the row kernels

template <int D, int G>
struct BwdTraits {
    static constexpr int kWarps = kBwdThreads / 32;
    static constexpr int BM = 64;                    // query rows per item (divides block_rows)
    static constexpr int BN = 128;                   // keys per CTA (16 per warp)
    // Query columns of S^T per pass: D = 128 halves the live S/dP registers.
    static constexpr int QC = D == 128 ? 32 : 64;
    static constexpr int DG = D / G;                 // fused columns
    static constexpr int KW = (DG + 15) / 16 * 16;   // padded to the mma's k
    static constexpr bool kFused = G > 1;
    static constexpr int KA = kFused ? KW : D;       // columns of S's query operand
    // dQhat = dS Khat: warps 4 (16-row slices of BM) x kDqN (column halves of KA).
    static constexpr int kDqN = KA >= 32 ? 2 : 1;
    static constexpr int NQ = KA / kDqN;             // columns per warp
    // Shared-memory pitches in bytes: ldmatrix operands get a 16-byte pad
    // (8 rows hit 8 distinct 16-byte bank groups); the fused path's K tile,
    // read by column gathers, a 4-byte pad (32 keys at one column hit 32 banks).
    static constexpr int kPitchK = kFused ? D * 2 + 4 : D * 2 + 16;
    static constexpr int kPitchV = D * 2 + 16;
    static constexpr int kPitchQa = KA * 2 + 16;    // Q (G = 1) or Qhat [BM][KA]
    static constexpr int kPitchQb = D * 2 + 16;     // Qtilde [BM][D] (G > 1)
    static constexpr int kPitchDO = D * 2 + 16;
    static constexpr int kPitchKhT = BN * 2 + 16;   // Khat^T [KW][BN]
    static constexpr int kPitchDS = BM * 2 + 16;    // dS^T [BN][BM]
    static constexpr int align16(int x) { return (x + 15) / 16 * 16; }
    static constexpr int kQaBytes = BM * kPitchQa;
    static constexpr int kQbBytes = BM * kPitchQb;
    static constexpr int kDOBytes = BM * kPitchDO;
    static constexpr int kKhBytes = KW * kPitchKhT;
    static constexpr int kDSBytes = BN * kPitchDS;
    // Item buffers (Qa, Qb, dO, LSE, Delta, plan row) are double-buffered:
    // item i+1 loads while item i computes. dS^T and Khat^T are too, so one
    // barrier per item suffices.
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kOffK + align16(BN * kPitchK);
    static constexpr int kOffQa = kOffV + BN * kPitchV;
    static constexpr int kOffQb = kOffQa + 2 * kQaBytes;
    static constexpr int kOffDO = kOffQb + (kFused ? 2 * kQbBytes : 0);
    static constexpr int kOffKh = kOffDO + 2 * kDOBytes;
    static constexpr int kOffDS = kOffKh + (kFused ? 2 * kKhBytes : 0);
    static constexpr int kOffLse = kOffDS + 2 * kDSBytes;           // [2][BM] f32
    static constexpr int kOffDelta = kOffLse + 2 * BM * 4;          // [2][BM] f32
    static constexpr int kOffPerm = kOffDelta + 2 * BM * 4;         // [2][D] u16
    static constexpr int kSmem = kOffPerm + (kFused ? 2 * D * 2 : 0);
    static_assert(D % 16 == 0 && D % G == 0 && DG % 4 == 0, "head_dim");
    static_assert(BM % QC == 0 && QC % 16 == 0, "query passes");
    static_assert(NQ % 16 == 0 || kDqN == 1, "dQhat column split");
    static_assert(kSmem <= 227 * 1024, "shared memory");
};

template <typename T, int D, int G>
__device__ __forceinline__ void bwd_body(const BwdParams& p) {
    using Tr = BwdTraits<D, G>;
    using Nm = Num<T>;
    constexpr int BM = Tr::BM, BN = Tr::BN, QC = Tr::QC, KW = Tr::KW, KA = Tr::KA, DG = Tr::DG;
    constexpr int QT = QC / 8;   // n8 tiles of one S^T pass
    constexpr int DT = D / 8;    // n8 tiles of dK, dV
    constexpr bool kBf16 = Nm::kBf16;

    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* s_k = smem + Tr::kOffK;
    unsigned char* s_v = smem + Tr::kOffV;
    unsigned char* s_qa = smem + Tr::kOffQa;
    unsigned char* s_qb = smem + Tr::kOffQb;
    unsigned char* s_do = smem + Tr::kOffDO;
    unsigned char* s_kh = smem + Tr::kOffKh;
    unsigned char* s_ds = smem + Tr::kOffDS;
    float* s_lse = reinterpret_cast<float*>(smem + Tr::kOffLse);
    float* s_delta = reinterpret_cast<float*>(smem + Tr::kOffDelta);
    uint16_t* s_perm = reinterpret_cast<uint16_t*>(smem + Tr::kOffPerm);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int n0 = blockIdx.x * BN;
    const int b = (int)blockIdx.z + p.batch_offset;
    const int n_q = p.q_len, n_kv = p.kv_len;
    int hk, q_first, q_count;
    bool accum;
    if (p.kv_map_len) {
        const int e = blockIdx.y;
        hk = p.kv_head[e];
        q_first = p.kv_first[e];
        q_count = p.kv_count[e];
        accum = p.kv_accum[e] != 0;
    } else {
        hk = blockIdx.y;
        q_first = hk * p.heads_per_kv;
        q_count = p.heads_per_kv;
        accum = false;
    }
    auto head_of = [&](int i) { return p.kv_map_len ? (int)p.q_list[q_first + i] : q_first + i; };

    // Query tiles that see a key of this tile: with the bottom-right causal
    // mask row i sees keys n <= i + n_kv - n_q, so rows below n0 + n_q - n_kv see none.
    const int n_mt = (n_q + BM - 1) / BM;
    const int mt_begin = p.causal ? max(0, n0 + n_q - n_kv) / BM : 0;
    const int per_head = n_mt - mt_begin;   // >= 1: n0 < n_kv
    const int n_items = q_count * per_head;

    const T* kg = static_cast<const T*>(p.k) + (long long)b * p.k_batch_stride + (long long)hk * p.k_head_stride;
    const T* vg = static_cast<const T*>(p.v) + (long long)b * p.v_batch_stride + (long long)hk * p.v_head_stride;

    // ---- asynchronous tile loads (rows past the end are zero-filled) ----
    // NROWS rows of W elements in CHUNK-byte copies; compile-time trip counts.
    auto load_tile = [&](auto nrows_c, auto width_c, auto chunk_c, unsigned char* dst, int pitch, const T* src,
                         long long row_stride, int rows_valid) {
        constexpr int NROWS = decltype(nrows_c)::value, W = decltype(width_c)::value;
        constexpr int CHUNK = decltype(chunk_c)::value;
        constexpr int kPerRow = W * 2 / CHUNK;
        constexpr int kTotal = NROWS * kPerRow;
        if constexpr (kBwdThreads % kPerRow == 0 && kTotal % kBwdThreads == 0) {
            constexpr int kRowsPerIter = kBwdThreads / kPerRow;
            constexpr int kIters = kTotal / kBwdThreads;
            const int r0 = tid / kPerRow, ch = tid % kPerRow;
            const T* g = src + (long long)r0 * row_stride + ch * (CHUNK / 2);
            const long long step = (long long)kRowsPerIter * row_stride;
            const uint32_t s = smem_addr(dst) + r0 * pitch + ch * CHUNK;
            if (rows_valid >= NROWS) {
#pragma unroll 4
                for (int it = 0; it < kIters; ++it) {
                    if constexpr (CHUNK == 16) {
                        cp_async16(s + it * kRowsPerIter * pitch, g);
                    } else {
                        cp_async4(s + it * kRowsPerIter * pitch, g);
                    }
                    g += step;
                }
            } else {
#pragma unroll 4
                for (int it = 0; it < kIters; ++it) {
                    const bool ok = r0 + it * kRowsPerIter < rows_valid;
                    if constexpr (CHUNK == 16) {
                        cp_async16(s + it * kRowsPerIter * pitch, ok ? g : src, ok);
                    } else {
                        cp_async4(s + it * kRowsPerIter * pitch, ok ? g : src, ok);
                    }
                    g += step;
                }
            }
        } else {
            // Narrow tiles (fewer copies than threads): one copy per thread at most.
            static_assert(kTotal < kBwdThreads && CHUNK == 16, "narrow tile");
            if (tid < kTotal) {
                const int r = tid / kPerRow, ch = tid % kPerRow;
                const bool ok = r < rows_valid;
                cp_async16(smem_addr(dst) + r * pitch + ch * CHUNK,
                           ok ? src + (long long)r * row_stride + ch * (CHUNK / 2) : src, ok);
            }
        }
    };
    using C4 = std::integral_constant<int, 4>;
    using C16 = std::integral_constant<int, 16>;
    using CK = std::conditional_t<Tr::kFused, C4, C16>;   // 4-byte copies: conflict-free gathers
    using CBM = std::integral_constant<int, BM>;
    using CBN = std::integral_constant<int, BN>;
    using CD = std::integral_constant<int, D>;
    using CKA = std::integral_constant<int, KA>;

    auto item_head = [&](int it) { return head_of(it / per_head); };
    auto item_row0 = [&](int it) { return (mt_begin + it % per_head) * BM; };
    // Qa (Q or Qhat), Qb (Qtilde), dO, LSE, Delta (and the plan row) of item `it` into buffer it % 2.
    auto load_item = [&](int it) {
        const int buf = it & 1, h = item_head(it), m0 = item_row0(it);
        const int rows = n_q - m0;
        const long long row_base = ((long long)b * p.q_heads + h) * n_q + m0;
        const T* dog = static_cast<const T*>(p.d_out) + (long long)b * p.do_batch_stride +
                       (long long)h * p.do_head_stride + (long long)m0 * p.do_row_stride;
        if constexpr (Tr::kFused) {
            load_tile(CBM{}, CKA{}, C16{}, s_qa + buf * Tr::kQaBytes, Tr::kPitchQa,
                      static_cast<const T*>(p.qhat) + row_base * D, D, rows);
            load_tile(CBM{}, CD{}, C16{}, s_qb + buf * Tr::kQbBytes, Tr::kPitchQb,
                      static_cast<const T*>(p.qtil) + row_base * D, D, rows);
        } else {
            const T* qg = static_cast<const T*>(p.q) + (long long)b * p.q_batch_stride +
                          (long long)h * p.q_head_stride + (long long)m0 * p.q_row_stride;
            load_tile(CBM{}, CD{}, C16{}, s_qa + buf * Tr::kQaBytes, Tr::kPitchQa, qg, p.q_row_stride, rows);
        }
        load_tile(CBM{}, CD{}, C16{}, s_do + buf * Tr::kDOBytes, Tr::kPitchDO, dog, p.do_row_stride, rows);
        if (tid < BM) {
            const bool ok = tid < rows;
            cp_async4(smem_addr(s_lse + buf * BM + tid), ok ? p.lse + row_base + tid : p.lse, ok);
        } else if (tid < 2 * BM) {
            const int r = tid - BM;
            const bool ok = r < rows;
            cp_async4(smem_addr(s_delta + buf * BM + r), ok ? p.delta + row_base + r : p.delta, ok);
        }
        if constexpr (Tr::kFused) {
            const int blk = m0 / p.block_rows;
            const uint16_t* perm = p.plan + (((long long)b * p.q_heads + h) * p.num_blocks + blk) * D;
            if (tid >= 2 * BM && tid < 2 * BM + D / 2)
                cp_async4(smem_addr(s_perm + buf * D) + (tid - 2 * BM) * 4, perm + (tid - 2 * BM) * 2);
        }
    };

    load_tile(CBN{}, CD{}, CK{}, s_k, Tr::kPitchK, kg + (long long)n0 * p.k_row_stride, p.k_row_stride, n_kv - n0);
    load_tile(CBN{}, CD{}, C16{}, s_v, Tr::kPitchV, vg + (long long)n0 * p.v_row_stride, p.v_row_stride, n_kv - n0);
    load_item(0);
    cp_async_commit();
    if constexpr (Tr::kFused && KW > DG) {
        // Rows t >= d/G of both Khat^T buffers (padding up to the mma's k) stay zero.
        for (int i = tid; i < 2 * (KW - DG) * BN; i += kBwdThreads) {
            const int buf = i / ((KW - DG) * BN), rem = i % ((KW - DG) * BN);
            reinterpret_cast<T*>(s_kh + buf * Tr::kKhBytes + (DG + rem / BN) * Tr::kPitchKhT)[rem % BN] =
                Nm::from_float(0.f);
        }
    }

    float acc_dk[DT][4], acc_dv[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc_dk[dt][e] = 0.f;
            acc_dv[dt][e] = 0.f;
        }

    const int kw0 = warp * 16;            // this warp's keys (tile rows)
    const int g_row = lane / 4, c2 = (lane % 4) * 2;
    // ldmatrix lane offsets (elements) of the four operand patterns:
    //   A from [m][k] rows:       row lane%16,                  col (lane/16)*8
    //   A from [k][m] (trans):    row lane%8 + (lane/16)*8,     col ((lane/8)%2)*8
    //   B from [n][k] rows:       row lane%8 + (lane/16)*8,     col ((lane/8)%2)*8
    //   B from [k][n] (trans):    row lane%16,                  col (lane/16)*8
    const int ra = lane % 16, ca = (lane / 16) * 8;
    const int rt = lane % 8 + (lane / 16) * 8, ct = ((lane / 8) % 2) * 8;
    const float scale_log2 = p.scale_log2;
    constexpr float kLog2e = 1.4426950408889634f;
    int fused_key = -1;   // (head, plan block) whose Khat^T is in buffer kb
    int kb = 1;

    cp_async_wait<0>();
    __syncthreads();

    for (int it = 0; it < n_items; ++it) {
        const int buf = it & 1, h = item_head(it), m0 = item_row0(it);
        if (it + 1 < n_items) load_item(it + 1);
        cp_async_commit();
        const uint32_t qa = smem_addr(s_qa + buf * Tr::kQaBytes);
        const uint32_t qb = smem_addr(Tr::kFused ? s_qb + buf * Tr::kQbBytes : s_qa + buf * Tr::kQaBytes);
        const uint32_t dob = smem_addr(s_do + buf * Tr::kDOBytes);
        unsigned char* dsb = s_ds + buf * Tr::kDSBytes;

        if constexpr (Tr::kFused) {
            // Khat^T of this (head, block) into the other buffer, unless it is there:
            // the previous item's dQhat may still read the current one.
            const int key = h * p.num_blocks + m0 / p.block_rows;
            if (key != fused_key) {
                fused_key = key;
                kb ^= 1;
                const uint16_t* perm = s_perm + buf * D;
                unsigned char* khb = s_kh + kb * Tr::kKhBytes;
                // Tasks (t, 32 keys): lanes = keys, so the gathers hit 32 banks and the
                // stores are contiguous. Gathers in flight per lane bounded so that dK
                // and dV stay in registers; the chunk loop is not unrolled (unrolled,
                // the hoisted addresses spill).
                constexpr int kGatherRegs = D == 128 ? 8 : 16;
                constexpr int kTasks = DG * (BN / 32);
                constexpr int kPerWarp = kTasks / Tr::kWarps;
                static_assert(kTasks % Tr::kWarps == 0, "Khat tasks");
                constexpr int kChunk = kPerWarp * G <= kGatherRegs ? kPerWarp : (kGatherRegs / G > 0 ? kGatherRegs / G : 1);
                static_assert(kPerWarp % kChunk == 0, "Khat chunks");
#pragma unroll 1
                for (int c0 = 0; c0 < kPerWarp; c0 += kChunk) {
                    T e[kChunk][G];
#pragma unroll
                    for (int ci = 0; ci < kChunk; ++ci) {
                        const int task = (c0 + ci) * Tr::kWarps + warp;
                        const int t = task % DG, n = (task / DG) * 32 + lane;
#pragma unroll
                        for (int a = 0; a < G; ++a)
                            e[ci][a] = *reinterpret_cast<const T*>(s_k + n * Tr::kPitchK +
                                                                   min((int)perm[t * G + a], D - 1) * 2);
                    }
#pragma unroll
                    for (int ci = 0; ci < kChunk; ++ci) {
                        const int task = (c0 + ci) * Tr::kWarps + warp;
                        const int t = task % DG, n = (task / DG) * 32 + lane;
                        reinterpret_cast<T*>(khb + t * Tr::kPitchKhT)[n] = group_sum<T, G>(e[ci]);
                    }
                }
                __syncthreads();   // Khat^T visible
            }
        }
        const uint32_t khb = smem_addr(s_kh + kb * Tr::kKhBytes);

        // ---- per warp: its 16 keys x QC queries per pass ----
        const bool need_mask = (n0 + BN > n_kv) || (p.causal && m0 + n_kv - n_q < n0 + BN - 1);
#pragma unroll 1
        for (int qc = 0; qc < BM; qc += QC) {
            // S^T = Khat Qhat^T (k = KA) and dP^T = V dO^T (k = D), interleaved:
            // 2 x QT independent accumulator chains per warp instead of QT.
            float acc_s[QT][4], acc_dp[QT][4];
#pragma unroll
            for (int nt = 0; nt < QT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc_s[nt][e] = 0.f;
                    acc_dp[nt][e] = 0.f;
                }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t av[4], ak[4];
                ldsm_x4(av, smem_addr(s_v) + (kw0 + ra) * Tr::kPitchV + (kk * 16 + ca) * 2);
                if (kk < KA / 16) {
                    if constexpr (Tr::kFused) {
                        ldsm_x4_trans(ak, khb + (kk * 16 + rt) * Tr::kPitchKhT + (kw0 + ct) * 2);
                    } else {
                        ldsm_x4(ak, smem_addr(s_k) + (kw0 + ra) * Tr::kPitchK + (kk * 16 + ca) * 2);
                    }
                }
#pragma unroll
                for (int np = 0; np < QT / 2; ++np) {
                    uint32_t bd[4];
                    ldsm_x4(bd, dob + (qc + np * 16 + rt) * Tr::kPitchDO + (kk * 16 + ct) * 2);
                    if (kk < KA / 16) {
                        uint32_t bq[4];
                        ldsm_x4(bq, qa + (qc + np * 16 + rt) * Tr::kPitchQa + (kk * 16 + ct) * 2);
                        mma16816<kBf16>(acc_s[2 * np], ak, bq[0], bq[1]);
                        mma16816<kBf16>(acc_s[2 * np + 1], ak, bq[2], bq[3]);
                    }
                    mma16816<kBf16>(acc_dp[2 * np], av, bd[0], bd[1]);
                    mma16816<kBf16>(acc_dp[2 * np + 1], av, bd[2], bd[3]);
                }
            }
            // P^T = exp2(S^T * scale * log2e - LSE * log2e), masked.
            {
                float lse2[QT][2];
#pragma unroll
                for (int nt = 0; nt < QT; ++nt) {
                    const float2 l = *reinterpret_cast<const float2*>(s_lse + buf * BM + qc + nt * 8 + c2);
                    lse2[nt][0] = l.x * kLog2e;
                    lse2[nt][1] = l.y * kLog2e;
                }
                if (need_mask) {
                    const int key0 = n0 + kw0 + g_row;
                    const int qrow0 = m0 + qc + c2 + n_kv - n_q;   // + nt*8 + e: last key the row sees
#pragma unroll
                    for (int nt = 0; nt < QT; ++nt)
#pragma unroll
                        for (int r = 0; r < 2; ++r)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int key = key0 + 8 * r;
                                const bool ok = key < n_kv && (!p.causal || key <= qrow0 + nt * 8 + e);
                                const float x = fast_exp2(fmaf(acc_s[nt][2 * r + e], scale_log2, -lse2[nt][e]));
                                acc_s[nt][2 * r + e] = ok ? x : 0.f;
                            }
                } else {
#pragma unroll
                    for (int nt = 0; nt < QT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            acc_s[nt][e] = fast_exp2(fmaf(acc_s[nt][e], scale_log2, -lse2[nt][e % 2]));
                }
            }
            // dS^T = P^T (dP^T - Delta); P and dS packed as A fragments (rounded to T).
            uint32_t pa[QT / 2][4], da[QT / 2][4];
#pragma unroll
            for (int nt = 0; nt < QT; ++nt) {
                const float2 dl = *reinterpret_cast<const float2*>(s_delta + buf * BM + qc + nt * 8 + c2);
                float ds[4];
                ds[0] = acc_s[nt][0] * (acc_dp[nt][0] - dl.x);
                ds[1] = acc_s[nt][1] * (acc_dp[nt][1] - dl.y);
                ds[2] = acc_s[nt][2] * (acc_dp[nt][2] - dl.x);
                ds[3] = acc_s[nt][3] * (acc_dp[nt][3] - dl.y);
                // tile nt is half (nt % 2) of the k16 step nt / 2: a0/a1 rows g/g+8 low k, a2/a3 high k
                pa[nt / 2][(nt % 2) * 2 + 0] = Nm::pack(acc_s[nt][0], acc_s[nt][1]);
                pa[nt / 2][(nt % 2) * 2 + 1] = Nm::pack(acc_s[nt][2], acc_s[nt][3]);
                da[nt / 2][(nt % 2) * 2 + 0] = Nm::pack(ds[0], ds[1]);
                da[nt / 2][(nt % 2) * 2 + 1] = Nm::pack(ds[2], ds[3]);
                // dS^T to shared memory for dQhat (the same rounded values).
                *reinterpret_cast<uint32_t*>(dsb + (kw0 + g_row) * Tr::kPitchDS + (qc + nt * 8 + c2) * 2) =
                    da[nt / 2][(nt % 2) * 2 + 0];
                *reinterpret_cast<uint32_t*>(dsb + (kw0 + g_row + 8) * Tr::kPitchDS + (qc + nt * 8 + c2) * 2) =
                    da[nt / 2][(nt % 2) * 2 + 1];
            }
            // dV += P^T dO, dK += dS^T Qtilde (k = QC queries)
#pragma unroll
            for (int kk = 0; kk < QC / 16; ++kk) {
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t bf[4];
                    ldsm_x4_trans(bf, dob + (qc + kk * 16 + ra) * Tr::kPitchDO + (dp * 16 + ca) * 2);
                    mma16816<kBf16>(acc_dv[2 * dp], pa[kk], bf[0], bf[1]);
                    mma16816<kBf16>(acc_dv[2 * dp + 1], pa[kk], bf[2], bf[3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t bf[4];
                    ldsm_x4_trans(bf, qb + (qc + kk * 16 + ra) * Tr::kPitchQb + (dp * 16 + ca) * 2);
                    mma16816<kBf16>(acc_dk[2 * dp], da[kk], bf[0], bf[1]);
                    mma16816<kBf16>(acc_dk[2 * dp + 1], da[kk], bf[2], bf[3]);
                }
            }
        }
        cp_async_wait<0>();   // item it+1 has landed ...
        __syncthreads();      // ... and is visible; dS^T is complete; this item's buffers are free

        // ---- dQhat = dS Khat: warp (mw, nw) owns rows 16mw.. and columns nw*NQ.. ----
        {
            constexpr int NQ = Tr::NQ, NQT = NQ / 8;
            const int mw = warp % 4, nw = warp / 4;
            if (nw < Tr::kDqN) {
                // Narrow outputs (G > 1) get two partial sums over even and odd
                // key steps: twice the independent accumulator chains.
                constexpr int SPLIT = NQT <= 4 ? 2 : 1;
                float acc_q[NQT][4], acc_q2[SPLIT == 2 ? NQT : 1][4];
#pragma unroll
                for (int nt = 0; nt < NQT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_q[nt][e] = 0.f;
#pragma unroll
                for (int nt = 0; nt < (SPLIT == 2 ? NQT : 1); ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_q2[nt][e] = 0.f;
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    uint32_t a[4];
                    ldsm_x4_trans(a, smem_addr(dsb) + (kk * 16 + rt) * Tr::kPitchDS + (mw * 16 + ct) * 2);
#pragma unroll
                    for (int np = 0; np < NQT / 2; ++np) {
                        uint32_t bf[4];
                        if constexpr (Tr::kFused) {
                            ldsm_x4(bf, khb + (nw * NQ + np * 16 + rt) * Tr::kPitchKhT + (kk * 16 + ct) * 2);
                        } else {
                            ldsm_x4_trans(bf, smem_addr(s_k) + (kk * 16 + ra) * Tr::kPitchK + (nw * NQ + np * 16 + ca) * 2);
                        }
                        if (SPLIT == 2 && kk % 2 == 1) {
                            mma16816<kBf16>(acc_q2[(2 * np) % (SPLIT == 2 ? NQT : 1)], a, bf[0], bf[1]);
                            mma16816<kBf16>(acc_q2[(2 * np + 1) % (SPLIT == 2 ? NQT : 1)], a, bf[2], bf[3]);
                        } else {
                            mma16816<kBf16>(acc_q[2 * np], a, bf[0], bf[1]);
                            mma16816<kBf16>(acc_q[2 * np + 1], a, bf[2], bf[3]);
                        }
                    }
                }
                if constexpr (SPLIT == 2) {
#pragma unroll
                    for (int nt = 0; nt < NQT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc_q[nt][e] += acc_q2[nt % (SPLIT == 2 ? NQT : 1)][e];
                }
                const long long head_row0 = ((long long)b * p.q_heads + h) * n_q;
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = m0 + mw * 16 + g_row + 8 * r;
                    if (i < n_q) {
#pragma unroll
                        for (int nt = 0; nt < NQT; ++nt) {
                            const int t = nw * NQ + nt * 8 + c2;   // even: t, t + 1 adjacent in the accumulator
                            if (t < DG)
                                red_add2(p.dq_acc + dq_acc_index(head_row0, i, t, DG, D, n_q), acc_q[nt][2 * r],
                                         acc_q[nt][2 * r + 1]);
                        }
                    }
                }
            }
        }
    }

    // ---- epilogue: dK (times scale) and dV ----
    const float scale = p.scale;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = n0 + kw0 + g_row + 8 * r;
        if (key >= n_kv) continue;
        const long long ok = (long long)b * p.dk_batch_stride + (long long)key * p.dk_row_stride +
                             (long long)hk * p.dk_head_stride;
        const long long ov = (long long)b * p.dv_batch_stride + (long long)key * p.dv_row_stride +
                             (long long)hk * p.dv_head_stride;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const int col = dt * 8 + c2;
            store_grad2<T>(p.dk, p.dk_f32, ok + col, make_float2(acc_dk[dt][2 * r] * scale, acc_dk[dt][2 * r + 1] * scale),
                           accum);
            store_grad2<T>(p.dv, p.dv_f32, ov + col, make_float2(acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]), accum);
        }
    }
}

// Two elements at `p` (f32 or T) as floats.
template <typename T>
__device__ __forceinline__ float2 load2(const void* base, long long off, bool is_f32) {
    if (is_f32) return *reinterpret_cast<const float2*>(static_cast<const float*>(base) + off);
    const uint32_t u = *reinterpret_cast<const uint32_t*>(static_cast<const T*>(base) + off);
    const T* e = reinterpret_cast<const T*>(&u);
    return make_float2(Num<T>::to_float(e[0]), Num<T>::to_float(e[1]));
}

// Row kernels: a row is handled by D/4 consecutive lanes, 4 columns each.
template <typename T, int D>
__device__ __forceinline__ void prep_body(const BwdRowParams& p) {
    constexpr int TPR = D / 4, RPP = kRowThreads / TPR;
    static_assert(TPR <= 32 && 32 % TPR == 0, "a row within a warp");
    // Per row of a pass: Q (T), the plan row and its inverse (u16), Qhat (T).
    __shared__ __align__(16) T s_x[RPP][D];
    __shared__ __align__(16) T s_qh[RPP][D];
    __shared__ __align__(16) uint16_t s_perm[RPP][D];
    __shared__ __align__(16) uint16_t s_inv[RPP][D];
    const int h = p.head_map_len ? (int)p.head_map[blockIdx.y] : (int)blockIdx.y;
    const int b = (int)blockIdx.z + p.batch_offset;
    const int tr = threadIdx.x % TPR, col = tr * 4, slot = threadIdx.x / TPR;
    const int G = p.group, dg = D / G, kw = (dg + 15) / 16 * 16;
    for (int r = slot; r < kRowsPerCta; r += RPP) {
        const int i = blockIdx.x * kRowsPerCta + r;
        const bool valid = i < p.q_len;
        const long long row = ((long long)b * p.q_heads + h) * p.q_len + i;
        float sum = 0.f;
        float2 g0 = make_float2(0.f, 0.f), g1 = g0;
        if (valid) {
            const long long oo = (long long)b * p.o_batch_stride + (long long)i * p.o_row_stride +
                                 (long long)h * p.o_head_stride + col;
            const long long od = (long long)b * p.do_batch_stride + (long long)i * p.do_row_stride +
                                 (long long)h * p.do_head_stride + col;
            const float2 o0 = load2<T>(p.o, oo, p.o_f32), o1 = load2<T>(p.o, oo + 2, p.o_f32);
            g0 = load2<T>(p.d_out, od, p.do_f32);
            g1 = load2<T>(p.d_out, od + 2, p.do_f32);
            sum = g0.x * o0.x + g0.y * o0.y + g1.x * o1.x + g1.y * o1.y;
        }
#pragma unroll
        for (int off = TPR / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (valid) {
            if (tr == 0) p.delta[row] = sum;
            // Columns col..col+3 are adjacent in the accumulator (one 8-float chunk).
            if (col < dg)
                *reinterpret_cast<float4*>(p.dq_acc + dq_acc_index(row - i, i, col, dg, D, p.q_len)) =
                    make_float4(0.f, 0.f, 0.f, 0.f);
            if (p.do_f32) {
                const uint2 packed = make_uint2(Num<T>::pack(g0.x, g0.y), Num<T>::pack(g1.x, g1.y));
                *reinterpret_cast<uint2*>(static_cast<T*>(p.do_conv) + row * D + col) = packed;
            }
        }
        if (G > 1) {
            // Qhat (as fwd.cu fuses it: f32 sum, times 1/G, rounded once) and Qtilde.
            if (valid) {
                const T* q = static_cast<const T*>(p.q) + (long long)b * p.q_batch_stride +
                             (long long)i * p.q_row_stride + (long long)h * p.q_head_stride;
                *reinterpret_cast<uint2*>(&s_x[slot][col]) = *reinterpret_cast<const uint2*>(q + col);
                const uint16_t* perm =
                    p.plan + (((long long)b * p.q_heads + h) * p.num_blocks + i / p.block_rows) * D + col;
                const uint32_t p01 = *reinterpret_cast<const uint32_t*>(perm);
                const uint32_t p23 = *reinterpret_cast<const uint32_t*>(perm + 2);
                // Entries are clamped: a corrupt plan gives wrong numbers, never a stray access.
                s_perm[slot][col] = min((int)(p01 & 0xffff), D - 1);
                s_perm[slot][col + 1] = min((int)(p01 >> 16), D - 1);
                s_perm[slot][col + 2] = min((int)(p23 & 0xffff), D - 1);
                s_perm[slot][col + 3] = min((int)(p23 >> 16), D - 1);
#pragma unroll
                for (int k = 0; k < 4; ++k) s_inv[slot][col + k] = 0;
            }
            __syncwarp();
            if (valid) {
#pragma unroll
                for (int k = 0; k < 4; ++k) s_inv[slot][s_perm[slot][col + k]] = col + k;
                T qh[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int t = col + k;
                    float x = 0.f;
                    if (t < dg) {
                        if (p.sample) {
                            x = Num<T>::to_float(s_x[slot][s_perm[slot][t * G]]);
                        } else {
                            for (int a = 0; a < G; ++a) x += Num<T>::to_float(s_x[slot][s_perm[slot][t * G + a]]);
                            x *= 1.f / G;
                        }
                    }
                    qh[k] = Num<T>::from_float(x);
                    s_qh[slot][t] = qh[k];
                }
                if (col < kw) *reinterpret_cast<uint2*>(static_cast<T*>(p.qhat) + row * D + col) =
                    *reinterpret_cast<const uint2*>(qh);
            }
            __syncwarp();
            if (valid) {
                T qt[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) qt[k] = s_qh[slot][min((int)s_inv[slot][col + k], D - 1) / G];
                *reinterpret_cast<uint2*>(static_cast<T*>(p.qtil) + row * D + col) = *reinterpret_cast<const uint2*>(qt);
            }
            __syncwarp();   // the row buffers are rewritten by the next pass
        }
    }
}

template <typename T, int D>
__device__ __forceinline__ void dq_body(const BwdRowParams& p) {
    constexpr int TPR = D / 4, RPP = kRowThreads / TPR;
    const int h = p.head_map_len ? (int)p.head_map[blockIdx.y] : (int)blockIdx.y;
    const int b = (int)blockIdx.z + p.batch_offset;
    const int tr = threadIdx.x % TPR, col = tr * 4;
    const int G = p.group;
    const float mean = p.scale / G;
    for (int r = threadIdx.x / TPR; r < kRowsPerCta; r += RPP) {
        const int i = blockIdx.x * kRowsPerCta + r;
        if (i >= p.q_len) break;
        const long long row = ((long long)b * p.q_heads + h) * p.q_len + i;
        const long long head_row0 = row - i;
        const long long od = (long long)b * p.dq_batch_stride + (long long)i * p.dq_row_stride +
                             (long long)h * p.dq_head_stride;
        float val[4];
        int dst[4];
        // The thread's accumulator values: columns col / G .. (col + 3) / G, adjacent (one 8-float chunk).
        const long long ai = dq_acc_index(head_row0, i, col / G, D / G, D, p.q_len);
        if (G == 1) {
            const float4 a = *reinterpret_cast<const float4*>(p.dq_acc + ai);
            val[0] = a.x * p.scale;
            val[1] = a.y * p.scale;
            val[2] = a.z * p.scale;
            val[3] = a.w * p.scale;
#pragma unroll
            for (int k = 0; k < 4; ++k) dst[k] = col + k;
        } else {
            float a[4];
            if (G == 2) {
                const float2 a2 = *reinterpret_cast<const float2*>(p.dq_acc + ai);
                a[0] = a[1] = a2.x;
                a[2] = a[3] = a2.y;
            } else {
                a[0] = a[1] = a[2] = a[3] = p.dq_acc[ai];
            }
            // Position s of the plan holds column perm[s], of group s / G.
            const uint16_t* perm = p.plan + (((long long)b * p.q_heads + h) * p.num_blocks + i / p.block_rows) * D;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int s = col + k;
                val[k] = p.sample ? (s % G == 0 ? a[k] * p.scale : 0.f) : a[k] * mean;
                dst[k] = min((int)perm[s], D - 1);
            }
        }
        if (p.dq_f32) {
            float* out = static_cast<float*>(p.dq) + od;
            if (G == 1) {
                *reinterpret_cast<float2*>(out + col) = make_float2(val[0], val[1]);
                *reinterpret_cast<float2*>(out + col + 2) = make_float2(val[2], val[3]);
            } else {
#pragma unroll
                for (int k = 0; k < 4; ++k) out[dst[k]] = val[k];
            }
        } else {
            T* out = static_cast<T*>(p.dq) + od;
            if (G == 1) {
                *reinterpret_cast<uint32_t*>(out + col) = Num<T>::pack(val[0], val[1]);
                *reinterpret_cast<uint32_t*>(out + col + 2) = Num<T>::pack(val[2], val[3]);
            } else {
#pragma unroll
                for (int k = 0; k < 4; ++k) out[dst[k]] = Num<T>::from_float(val[k]);
            }
        }
    }
}

}  // namespace da

#define DA_BWD_PREFIX DA_CAT(DA_CAT(DA_CAT(da_bwd_, DA_DTYPE), _d), DA_HEAD_DIM)

// da_bwd_<dtype>_d<D>_g<G> and its dynamic shared-memory size da_bwd_<dtype>_d<D>_g<G>_smem.
#define DA_BWD(G)                                                                                    \
    extern "C" __global__ void __launch_bounds__(da::kBwdThreads, 1)                                \
        DA_CAT(DA_BWD_PREFIX, _g##G)(const BwdParams p) {                                             \
        da::bwd_body<DA_T, DA_HEAD_DIM, G>(p);                                                       \
    }                                                                                                \
    extern "C" __device__ int DA_CAT(DA_CAT(DA_BWD_PREFIX, _g##G), _smem) = da::BwdTraits<DA_HEAD_DIM, G>::kSmem;

DA_BWD(1)
DA_BWD(2)
DA_BWD(4)
DA_BWD(8)

// da_bwd_prep_<dtype>_d<D>, da_bwd_dq_<dtype>_d<D>
extern "C" __global__ void __launch_bounds__(da::kRowThreads)
    DA_CAT(DA_CAT(DA_CAT(da_bwd_prep_, DA_DTYPE), _d), DA_HEAD_DIM)(const BwdRowParams p) {
    da::prep_body<DA_T, DA_HEAD_DIM>(p);
}
extern "C" __global__ void __launch_bounds__(da::kRowThreads)
    DA_CAT(DA_CAT(DA_CAT(da_bwd_dq_, DA_DTYPE), _d), DA_HEAD_DIM)(const BwdRowParams p) {
    da::dq_body<DA_T, DA_HEAD_DIM>(p);
}
