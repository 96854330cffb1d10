// Fused DistrAttention forward kernel, FlashAttention-2 style, mma.sync
// (m16n8k16) tensor cores, f32 accumulation and online softmax.
//
// One CTA (4 warps) per (query block of BM = block_rows rows, query head,
// batch), so one CTA has one permutation sigma. Warp w owns rows
// [w*BM/4, (w+1)*BM/4): one m16 tile (BM = 64) or two (BM = 128).
//
//   prologue   load Q (and sigma); fuse Qhat[m][t] once (Mean: average of
//              the group's columns, Sample: first column in plan order)
//   K/V loop   per key tile of BN rows:
//                G > 1: fuse Khat^T[t][n] = sum of the group's K columns
//                       (f32 sum, rounded to the input type) into shared memory;
//                S = Qhat Khat^T on KW = roundup(d/G, 16) columns (mma),
//                mask (key tail, bottom-right causal), online softmax (base 2),
//                O += P V at full width (mma); O stays in registers.
//   epilogue   O / l to global (f32 or the input type), optional LSE (natural log).
//
// G = 1 is exact attention and never reads the plan. Rows that see no key
// output 0 and LSE -inf.
//
// Compiled once per (DA_DTYPE, DA_HEAD_DIM) by cuda-driver/build.rs; each
// translation unit instantiates G in {1, 2, 4, 8} x BM in {64, 128}.
#include <type_traits>

#include "common.cuh"

#ifndef DA_HEAD_DIM
#error "define DA_HEAD_DIM (32, 64 or 128)"
#endif
#ifndef DA_DTYPE
#error "define DA_DTYPE (f16 or bf16)"
#endif

namespace da {

constexpr int kFwdThreads = 128;

template <int D, int G, int BM, int BNV = 0>
struct FwdTraits {
    static constexpr int kWarps = 4;
    static constexpr int MT = BM / 64;               // m16 tiles per warp
    static constexpr int RPW = MT * 16;              // rows per warp
    static constexpr int DG = D / G;                 // fused columns
    static constexpr int KW = (DG + 15) / 16 * 16;   // padded to the mma's k
    static constexpr bool kFused = G > 1;
    // Keys per tile (BNV overrides, for experiments). D = 128 with two m16
    // tiles per warp keeps 64 keys only for G = 1 (a 32-byte spill, 9% faster
    // measured); with the fused path the spill grows and 32 keys win.
    static constexpr int BN = BNV ? BNV : (D == 128 && BM == 128 && G > 1) ? 32 : 64;
    static constexpr int NT = BN / 8;                // n8 tiles of S
    static constexpr int DT = D / 8;                 // n8 tiles of O
    static constexpr int TPW = DG / kWarps;          // fused columns per warp
    // Qhat fragments stay in registers when small; otherwise re-read from smem.
    static constexpr bool kQRegs = MT * (KW / 16) * 4 <= (MT == 2 && D == 128 ? 0 : 32);
    // Shared-memory pitches in bytes (16-byte padding: conflict-free ldmatrix;
    // the fused path's K tile uses a 4-byte pad: conflict-free column gathers).
    static constexpr int kPitchQ = D * 2 + 16;
    static constexpr int kPitchQh = KW * 2 + 16;
    static constexpr int kPitchK = kFused ? D * 2 + 4 : D * 2 + 16;
    static constexpr int kPitchKt = BN * 2 + 16;
    static constexpr int kPitchV = D * 2 + 16;
    static constexpr int align16(int x) { return (x + 15) / 16 * 16; }
    // K, V and Khat^T tiles are double-buffered: loads are issued one tile ahead.
    static constexpr int kKtBytes = KW * kPitchKt;
    static constexpr int kKBytes = align16(BN * kPitchK);
    static constexpr int kVBytes = BN * kPitchV;
    static constexpr int kOffQ = 0;
    static constexpr int kOffQh = kOffQ + BM * kPitchQ;
    static constexpr int kOffK = kOffQh + (kFused ? BM * kPitchQh : 0);
    static constexpr int kOffKt = kOffK + 2 * kKBytes;
    static constexpr int kOffV = kOffKt + (kFused ? 2 * kKtBytes : 0);
    static constexpr int kOffOff = kOffV + 2 * kVBytes;
    static constexpr int kSmem = kOffOff + (kFused ? align16(D * 4) : 0);
    static_assert(D % 16 == 0 && D % G == 0, "head_dim");
    static_assert(BN % 32 == 0, "a warp fuses 32 keys at a time");
    static_assert(!kFused || DG % kWarps == 0, "fused columns split evenly over the warps");
};

template <typename T, int D, int G, int BM, int BNV = 0>
__device__ __forceinline__ void fwd_body(const FwdParams& p) {
    using Tr = FwdTraits<D, G, BM, BNV>;
    using Nm = Num<T>;
    constexpr int MT = Tr::MT, BN = Tr::BN, NT = Tr::NT, DT = Tr::DT, KW = Tr::KW, DG = Tr::DG;
    constexpr bool kBf16 = Nm::kBf16;

    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* s_q = smem + Tr::kOffQ;
    unsigned char* s_qh = smem + Tr::kOffQh;
    unsigned char* s_k = smem + Tr::kOffK;
    unsigned char* s_kt = smem + Tr::kOffKt;
    unsigned char* s_v = smem + Tr::kOffV;
    // sigma as byte offsets within a row (2 * column).
    uint32_t* s_off = reinterpret_cast<uint32_t*>(smem + Tr::kOffOff);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int nblk = p.num_blocks;
    // Causal: the heaviest query blocks first.
    const int mblk = p.causal ? nblk - 1 - (int)blockIdx.x : (int)blockIdx.x;
    const int h = p.head_map_len ? (int)p.head_map[blockIdx.y] : (int)blockIdx.y;
    const int b = (int)blockIdx.z + p.batch_offset;
    const int hk = h / p.heads_per_kv;
    const int m0 = mblk * BM;
    const int n_q = p.q_len, n_kv = p.kv_len;

    const T* qg = static_cast<const T*>(p.q) + (long long)b * p.q_batch_stride + (long long)h * p.q_head_stride;
    const T* kg = static_cast<const T*>(p.k) + (long long)b * p.k_batch_stride + (long long)hk * p.k_head_stride;
    const T* vg = static_cast<const T*>(p.v) + (long long)b * p.v_batch_stride + (long long)hk * p.v_head_stride;

    // Keys this CTA can see: its last row m0+BM-1 sees keys < m0 + BM + n_kv - n_q.
    int kv_end = n_kv;
    if (p.causal) kv_end = min(n_kv, max(0, m0 + BM + n_kv - n_q));
    const int n_tiles = (kv_end + BN - 1) / BN;

    // ---- asynchronous tile loads (rows past the end are zero-filled) ----
    // NROWS rows of D elements from `src` (row 0 of the tile) into `dst`, in
    // CHUNK-byte copies; every trip count is a compile-time constant.
    // `thread_off` is this thread's first element (see thread_offset).
    auto thread_offset = [&](auto chunk_c, long long row_stride) {
        constexpr int kPerRow = D * 2 / decltype(chunk_c)::value;
        return (long long)(tid / kPerRow) * row_stride + (tid % kPerRow) * (decltype(chunk_c)::value / 2);
    };
    auto load_tile = [&](auto nrows_c, auto chunk_c, unsigned char* dst, int pitch, const T* src,
                         long long thread_off, long long row_stride, int rows_valid) {
        constexpr int NROWS = decltype(nrows_c)::value, CHUNK = decltype(chunk_c)::value;
        constexpr int kPerRow = D * 2 / CHUNK;
        static_assert(kFwdThreads % kPerRow == 0 && (NROWS * kPerRow) % kFwdThreads == 0, "tile split");
        constexpr int kRowsPerIter = kFwdThreads / kPerRow;
        const int r0 = tid / kPerRow, ch = tid % kPerRow;
        const T* g = src + thread_off;
        const long long step = (long long)kRowsPerIter * row_stride;
        const uint32_t s = smem_addr(dst) + r0 * pitch + ch * CHUNK;
        constexpr int kIters = NROWS * kPerRow / kFwdThreads;
        if (rows_valid >= NROWS) {
            // A whole tile: no predicates, one pointer increment per copy.
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
    };
    using C4 = std::integral_constant<int, 4>;
    using C16 = std::integral_constant<int, 16>;
    using CBN = std::integral_constant<int, BN>;
    using CK = std::conditional_t<Tr::kFused, C4, C16>;   // 4-byte copies: conflict-free gathers
    const long long k_off = thread_offset(CK{}, p.k_row_stride);
    const long long v_off = thread_offset(C16{}, p.v_row_stride);
    // Key tile j goes to buffer j % 2.
    auto load_k = [&](int j) {
        const int n0 = j * BN;
        load_tile(CBN{}, CK{}, s_k + (j & 1) * Tr::kKBytes, Tr::kPitchK, kg + (long long)n0 * p.k_row_stride, k_off,
                  p.k_row_stride, n_kv - n0);
    };
    auto load_v = [&](int j) {
        const int n0 = j * BN;
        load_tile(CBN{}, C16{}, s_v + (j & 1) * Tr::kVBytes, Tr::kPitchV, vg + (long long)n0 * p.v_row_stride, v_off,
                  p.v_row_stride, n_kv - n0);
    };

    // Khat^T[t][n] = sum of the group's columns of key tile j (K buffer j%2),
    // into Khat^T buffer j%2. Lanes = 32 keys at one column: the 4-byte row pad puts them
    // in 32 distinct banks. Warp w fuses columns t = w, w + 4, ...; in chunks of
    // kChunk columns, every load of a chunk is issued before its first sum (the
    // compiler cannot reorder the loads across the stores: same array).
    auto fuse = [&](int j) {
        if constexpr (Tr::kFused) {
            constexpr int RR = BN / 32;
            constexpr int kChunk = Tr::TPW * RR * G <= 32 ? Tr::TPW : 32 / (RR * G);
            static_assert(Tr::TPW % kChunk == 0, "chunks");
            unsigned char* kt = s_kt + (j & 1) * Tr::kKtBytes;
            const unsigned char* kb = s_k + (j & 1) * Tr::kKBytes;
#pragma unroll
            for (int c0 = 0; c0 < Tr::TPW; c0 += kChunk) {
                T e[kChunk][RR][G];
#pragma unroll
                for (int ti = 0; ti < kChunk; ++ti) {
                    const int t = (c0 + ti) * Tr::kWarps + warp;
                    // The group's offsets in 8- or 16-byte loads (broadcasts).
                    alignas(16) uint32_t off[G];
                    if constexpr (G == 2) {
                        *reinterpret_cast<uint2*>(off) = *reinterpret_cast<const uint2*>(s_off + t * G);
                    } else {
#pragma unroll
                        for (int i = 0; i < G; i += 4)
                            *reinterpret_cast<uint4*>(off + i) = *reinterpret_cast<const uint4*>(s_off + t * G + i);
                    }
#pragma unroll
                    for (int i = 0; i < G; ++i) {
#pragma unroll
                        for (int rr = 0; rr < RR; ++rr)
                            e[ti][rr][i] = *reinterpret_cast<const T*>(kb + (rr * 32 + lane) * Tr::kPitchK + off[i]);
                    }
                }
#pragma unroll
                for (int ti = 0; ti < kChunk; ++ti) {
                    const int t = (c0 + ti) * Tr::kWarps + warp;
#pragma unroll
                    for (int rr = 0; rr < RR; ++rr)
                        reinterpret_cast<T*>(kt + t * Tr::kPitchKt)[rr * 32 + lane] = group_sum<T, G>(e[ti][rr]);
                }
            }
        }
    };

    load_tile(std::integral_constant<int, BM>{}, C16{}, s_q, Tr::kPitchQ, qg + (long long)m0 * p.q_row_stride,
              thread_offset(C16{}, p.q_row_stride), p.q_row_stride, n_q - m0);
    if (n_tiles > 0) {
        load_k(0);
        load_v(0);
    }
    if (Tr::kFused && n_tiles > 1) load_k(1);
    cp_async_commit();

    if constexpr (Tr::kFused) {
        // Entries are clamped: a corrupt plan gives wrong numbers, never a stray access.
        const uint16_t* perm = p.plan + (((long long)b * p.q_heads + h) * nblk + mblk) * D;
        for (int j = tid; j < D; j += kFwdThreads) s_off[j] = 2 * min((int)perm[j], D - 1);
        // Khat^T rows past d/G (padding up to the mma's k) stay zero, in both buffers.
        if constexpr (KW > DG) {
            for (int i = tid; i < 2 * (KW - DG) * BN; i += kFwdThreads) {
                const int buf = i / ((KW - DG) * BN), rem = i % ((KW - DG) * BN);
                const int t = DG + rem / BN, n = rem % BN;
                reinterpret_cast<T*>(s_kt + buf * Tr::kKtBytes + t * Tr::kPitchKt)[n] = Nm::from_float(0.f);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // ---- Qhat once per CTA; Khat of the first key tile ----
    const unsigned char* s_a = s_q;   // A operand of S = Qhat Khat^T
    constexpr int kPitchA = Tr::kFused ? Tr::kPitchQh : Tr::kPitchQ;
    if constexpr (Tr::kFused) {
        for (int idx = tid; idx < BM * KW; idx += kFwdThreads) {
            const int m = idx / KW, t = idx % KW;
            const unsigned char* qrow = s_q + m * Tr::kPitchQ;
            float x = 0.f;
            if (t < DG) {
                if (p.sample) {
                    x = Nm::to_float(*reinterpret_cast<const T*>(qrow + s_off[t * G]));
                } else {
#pragma unroll
                    for (int i = 0; i < G; ++i) x += Nm::to_float(*reinterpret_cast<const T*>(qrow + s_off[t * G + i]));
                    x *= 1.f / G;
                }
            }
            reinterpret_cast<T*>(s_qh + m * Tr::kPitchQh)[t] = Nm::from_float(x);
        }
        s_a = s_qh;
        fuse(0);
        __syncthreads();   // Qhat and Khat^T_0 are visible
    }
    const uint32_t a_base = smem_addr(s_a) + (warp * Tr::RPW + (lane % 16)) * kPitchA + (lane / 16) * 16;
    uint32_t qf[Tr::kQRegs ? MT : 1][Tr::kQRegs ? KW / 16 : 1][4];
    if constexpr (Tr::kQRegs) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < KW / 16; ++kk) ldsm_x4(qf[mt][kk], a_base + mt * 16 * kPitchA + kk * 32);
    }

    float acc_o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    float row_m[MT][2], row_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_m[mt][r] = -INFINITY;
            row_l[mt][r] = 0.f;
        }

    const float scale_log2 = p.scale_log2;
    const int row_base = m0 + warp * Tr::RPW + lane / 4;   // + mt*16 + r*8
    // ldmatrix lane offsets of the B operands.
    const uint32_t kt_base = smem_addr(s_kt) + (lane % 16) * Tr::kPitchKt + (lane / 16) * 16;
    const uint32_t k_base = smem_addr(s_k) + ((lane % 8) + (lane / 16) * 8) * Tr::kPitchK + ((lane / 8) % 2) * 16;
    const uint32_t v_base = smem_addr(s_v) + (lane % 16) * Tr::kPitchV + (lane / 16) * 16;

    // At the top of iteration j (after one barrier per tile) these are in
    // shared memory and visible: V_j (buffer j%2); G = 1: K_j (buffer j%2);
    // G > 1: Khat^T_j (buffer j%2) and K_{j+1} (buffer (j+1)%2). The tiles
    // of iteration j+1 are loaded during iteration j, into the buffers that
    // iteration j-1 finished with.
    for (int j = 0; j < n_tiles; ++j) {
        const int n0 = j * BN;
        if (j + 1 < n_tiles) load_v(j + 1);
        if constexpr (Tr::kFused) {
            if (j + 2 < n_tiles) load_k(j + 2);
        } else {
            if (j + 1 < n_tiles) load_k(j + 1);
        }
        cp_async_commit();

        // ---- S = Qhat Khat^T ----
        float acc_s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
        const uint32_t kt_buf = kt_base + (j & 1) * Tr::kKtBytes;
        const uint32_t k_buf = k_base + (j & 1) * Tr::kKBytes;
#pragma unroll
        for (int kk = 0; kk < KW / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (Tr::kQRegs) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][kk][e];
                } else {
                    ldsm_x4(a[mt], a_base + mt * 16 * kPitchA + kk * 32);
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t bf[4];
                if constexpr (Tr::kFused) {
                    ldsm_x4_trans(bf, kt_buf + kk * 16 * Tr::kPitchKt + np * 32);
                } else {
                    ldsm_x4(bf, k_buf + np * 16 * Tr::kPitchK + kk * 32);
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<kBf16>(acc_s[mt][2 * np], a[mt], bf[0], bf[1]);
                    mma16816<kBf16>(acc_s[mt][2 * np + 1], a[mt], bf[2], bf[3]);
                }
            }
        }
        // Khat^T of the next tile, while the tensor cores work on S_j (on the
        // last tile this fuses stale data into a buffer nobody reads).
        fuse(j + 1);

        // ---- mask: key tail and bottom-right causal (row i sees n <= i + n_kv - n_q) ----
        const bool need_mask = (n0 + BN > n_kv) || (p.causal && n0 + BN - 1 > m0 + n_kv - n_q);
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = row_base + mt * 16 + r * 8;
                    const int limit = p.causal ? min(n_kv, i + 1 + n_kv - n_q) : n_kv;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int n = n0 + nt * 8 + (lane % 4) * 2 + e;
                            if (n >= limit) acc_s[mt][nt][2 * r + e] = -INFINITY;
                        }
                }
        }

        // ---- online softmax (base 2; rows shared by the 4 lanes of a quad) ----
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = row_m[mt][r];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * r], acc_s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_use = mx == -INFINITY ? 0.f : mx * scale_log2;
                const float corr = fast_exp2(row_m[mt][r] * scale_log2 - m_use);
                row_m[mt][r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float pv = fast_exp2(fmaf(acc_s[mt][nt][2 * r + e], scale_log2, -m_use));
                        acc_s[mt][nt][2 * r + e] = pv;
                        sum += pv;
                    }
                row_l[mt][r] = row_l[mt][r] * corr + sum;
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    acc_o[mt][dt][2 * r] *= corr;
                    acc_o[mt][dt][2 * r + 1] *= corr;
                }
            }

        // ---- O += P V ----
        const uint32_t v_buf = v_base + (j & 1) * Tr::kVBytes;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = Nm::pack(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
                a[mt][1] = Nm::pack(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
                a[mt][2] = Nm::pack(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
                a[mt][3] = Nm::pack(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                uint32_t bf[4];
                ldsm_x4_trans(bf, v_buf + kk * 16 * Tr::kPitchV + dp * 32);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<kBf16>(acc_o[mt][2 * dp], a[mt], bf[0], bf[1]);
                    mma16816<kBf16>(acc_o[mt][2 * dp + 1], a[mt], bf[2], bf[3]);
                }
            }
        }
        cp_async_wait<0>();   // the tiles of iteration j+1
        __syncthreads();      // ... are visible, and every warp is done with iteration j's buffers
    }

    // ---- epilogue ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_l[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int i = row_base + mt * 16 + r * 8;
            if (i < n_q) {
                const long long off =
                    (long long)b * p.o_batch_stride + (long long)i * p.o_row_stride + (long long)h * p.o_head_stride;
                if (p.out_f32) {
                    float* o = static_cast<float*>(p.o) + off;
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt) {
                        const int d = dt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<float2*>(o + d) =
                            make_float2(acc_o[mt][dt][2 * r] * inv, acc_o[mt][dt][2 * r + 1] * inv);
                    }
                } else {
                    T* o = static_cast<T*>(p.o) + off;
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt) {
                        const int d = dt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<uint32_t*>(o + d) =
                            Nm::pack(acc_o[mt][dt][2 * r] * inv, acc_o[mt][dt][2 * r + 1] * inv);
                    }
                }
                if (p.lse != nullptr && lane % 4 == 0) {
                    p.lse[((long long)b * p.q_heads + h) * n_q + i] =
                        l > 0.f ? (row_m[mt][r] * scale_log2 + __log2f(l)) * 0.6931471805599453f : -INFINITY;
                }
            }
        }
}

}  // namespace da

// da_fwd_<dtype>_d<D>_g<G>_l<BM>, and its dynamic shared-memory size as a
// device constant da_fwd_<dtype>_d<D>_g<G>_l<BM>_smem (read by the driver).
#define DA_FWD(G, BM)                                                                                      \
    extern "C" __global__ void __launch_bounds__(da::kFwdThreads, 2)                                      \
        DA_CAT(DA_CAT(DA_CAT(DA_CAT(DA_CAT(DA_CAT(da_fwd_, DA_DTYPE), _d), DA_HEAD_DIM), _g##G), _l##BM), ) \
        (const FwdParams p) {                                                                              \
        da::fwd_body<DA_T, DA_HEAD_DIM, G, BM>(p);                                                         \
    }                                                                                                      \
    extern "C" __device__ int DA_CAT(                                                                     \
        DA_CAT(DA_CAT(DA_CAT(DA_CAT(DA_CAT(da_fwd_, DA_DTYPE), _d), DA_HEAD_DIM), _g##G), _l##BM), _smem) =  \
        da::FwdTraits<DA_HEAD_DIM, G, BM>::kSmem;

DA_FWD(1, 64)
DA_FWD(2, 64)
DA_FWD(4, 64)
DA_FWD(8, 64)
DA_FWD(1, 128)
DA_FWD(2, 128)
DA_FWD(4, 128)
DA_FWD(8, 128)
