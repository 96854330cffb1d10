// Copy of kernels/hfwd.cu at v2 (main 96c5673) with the stage-removal
// switches of cuda-driver/bench/hstage (kAblate: bit 0 no Khat fuse, bit 1
// no raw-K loads, bit 2 no softmax). Timing only; not built into the library.
// DistrAttention forward kernel for Hopper (sm_90a): wgmma tensor cores,
// warp specialisation, mbarrier pipeline. Same function as fwd.cu (same
// FwdParams, same rounding points); used on compute capability 9.0 for
// head_dim in {64, 128} with 128-row plan blocks (G > 1) or any block_rows
// (G = 1, which never reads a plan).
//
// One CTA (3 warpgroups, 384 threads) per (128 query rows, head, batch):
//   warpgroup 0, producer: cp.async loads of K and V tiles (BN = 128 keys);
//       G = 1: K goes straight into the wgmma layout; G > 1: K lands in a
//       row-padded buffer and the producer builds Khat[n][t] = sum of the
//       group's K columns (f32, rounded once to T; G = 2 with T's own add,
//       which is the same single rounding) into the wgmma layout.
//   warpgroups 1, 2, consumers of 64 query rows each (the same plan: the
//       CTA's 128 rows are one plan block): S = Qhat Khat^T (wgmma, both
//       operands in shared memory), mask, online softmax (f32, base 2),
//       O += P V (wgmma, P from registers, V transposed from shared memory).
// Stages: full[s] (producer -> consumers: 128 producer arrivals after their
// copies completed, Khat written and fence.proxy.async), empty[s]
// (consumers -> producer: one arrival per consumer warp after its wgmma
// reads finished).
//
// Shared-memory operands:
//   Tiles loaded from global memory (Q for G = 1, K for G = 1, V) use the
//   128-byte-swizzle layouts, one region per 64 columns: row r's 16-byte
//   chunk j of a region sits at r*128 + ((j ^ (r%8)) * 16). Each thread copies
//   whole rows' chunks, so a warp reads full 128-byte lines from L2 and writes
//   conflict-free (v1 used the no-swizzle layout with 8 rows x 64 bytes per
//   warp copy: half lines, L2-bound at 90% of its throughput).
//     K-major (Q, K): start + 32 bytes per k-step of 16, next region per 4
//       k-steps; SBO = 1024 (8 rows), swizzle mode 1.
//     MN-major (V, keys are the reduction dim): start + 2048 bytes per 16
//       keys; LBO = region size (next 64 columns), SBO = 1024 (next 8 keys).
//   Qhat and Khat (written by threads) use the no-swizzle K-major layout:
//       (c/8)*128 + (r/8)*SBO + (r%8)*16 + (c%8)*2,  LBO = 128, SBO = 16*C
#include <type_traits>

#include "common.cuh"
#include "wgmma_ops.cuh"

#ifndef DA_HEAD_DIM
#error "define DA_HEAD_DIM (64 or 128)"
#endif
#ifndef DA_DTYPE
#error "define DA_DTYPE (f16 or bf16)"
#endif

// The body exists only in the sm_90a image (wgmma and setmaxnreg need it);
// other targets compile empty kernels that the driver never launches.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DA_HOPPER 1
#else
#define DA_HOPPER 0
#endif

namespace da {

constexpr int kHThreads = 384;

template <int D, int G>
struct HTraits {
    static constexpr int BM = 128, BN = 128, WM = 64;
    static constexpr bool kFused = G > 1;
    static constexpr int DG = D / G;
    static constexpr int KW = (DG + 15) / 16 * 16;   // reduction width of S, padded to wgmma's k
    static constexpr int KC = kFused ? KW : D;        // columns of the S operands
    // Stages of (K or Khat, V); G = 1 has the room for more.
    static constexpr int S = kFused ? 2 : (D == 128 ? 3 : 4);
    static constexpr int kPitchKraw = 2 * D + 4;      // 4-byte pad: conflict-free column gathers
    static constexpr int kPitchQraw = 2 * D + 16;
    static constexpr int kKBytes = BN * KC * 2;
    static constexpr int kVBytes = BN * D * 2;
    static constexpr int kStageBytes = kKBytes + kVBytes;
    static constexpr int kOffBar = 0;                 // full[S], empty[S]
    static constexpr int kOffOff = 128;               // sigma as byte offsets, D x u32
    static constexpr int kOffQ = 1024;                // G = 1: Q (K-major); G > 1: Qhat (K-major)
    static constexpr int kOffQraw = kOffQ + BM * KC * 2;   // G > 1 only
    static constexpr int kOffKraw = kOffQraw + (kFused ? (BM * kPitchQraw + 1023) / 1024 * 1024 : 0);
    static constexpr int kKrawBytes = (BN * kPitchKraw + 1023) / 1024 * 1024;
    static constexpr int kOffStage = kOffKraw + (kFused ? 2 * kKrawBytes : 0);
    static constexpr int kSmem = kOffStage + S * kStageBytes;
    static_assert(kSmem <= 227 * 1024, "shared memory");
    static_assert(kOffStage % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0, "swizzle atoms");
    static_assert(DG % 8 == 0, "Khat is written in 8-column blocks");
    // setmaxnreg: consumers grow only by what the producer released in this
    // CTA (launch cap 168): 128 * (168 - 56) = 256 * (224 - 168).
    static constexpr int kProducerRegs = 56, kConsumerRegs = 224;
    static_assert(128 * (168 - kProducerRegs) >= 256 * (kConsumerRegs - 168), "register pool");
};

#if DA_HOPPER
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred p;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra LAB_WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void named_bar(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Descriptor of a canonical layout at shared address `addr` (swizzle mode:
// 0 none, 1 128-byte).
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo, uint32_t swizzle = 0) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           ((uint64_t)swizzle << 62);
}

// Copies `rows` rows of D elements (row r at src + r * stride, rows >= valid
// zero-filled) into 128-byte-swizzle regions of `rows` * 128 bytes each (one
// per 64 columns) at dst; 128 threads, thread t of the group = `lt`.
template <int D, int ROWS, typename T>
__device__ __forceinline__ void load_sw128(uint32_t dst, const T* src, long long stride, int valid, int lt) {
    constexpr int kPerRow = D / 8, kIters = ROWS * kPerRow / 128;
    static_assert(ROWS * kPerRow % 128 == 0, "tile split");
#pragma unroll 4
    for (int it = 0; it < kIters; ++it) {
        const int idx = it * 128 + lt;
        const int row = idx / kPerRow, c = idx % kPerRow;
        const uint32_t d = dst + (c / 8) * (ROWS * 128) + row * 128 + (((c % 8) ^ (row % 8)) << 4);
        const bool ok = row < valid;
        cp_async16(d, ok ? src + (long long)row * stride + c * 8 : src, ok);
    }
}

// Sum of a group's values, rounded once to T (as fwd.cu's group_sum).
template <typename T, int G>
__device__ __forceinline__ T hgroup_sum(const T (&e)[G]) {
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

__device__ __forceinline__ uint32_t pack_raw(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

template <typename T, int D, int G, int kAblate = 0>
__device__ __forceinline__ void hfwd_body(const FwdParams& p) {
    using Tr = HTraits<D, G>;
    using Nm = Num<T>;
    constexpr int BM = Tr::BM, BN = Tr::BN, S = Tr::S, KC = Tr::KC, DG = Tr::DG;
    constexpr bool kBf16 = Nm::kBf16;

    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t sbase = smem_addr(smem);
    const uint32_t bar_full = sbase + Tr::kOffBar, bar_empty = bar_full + 8 * S;
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
        for (int s = 0; s < S; ++s) {
            mbar_init(bar_full + 8 * s, 128);
            mbar_init(bar_empty + 8 * s, 8);
        }
    }
    if constexpr (Tr::kFused) {
        // Entries are clamped: a corrupt plan gives wrong numbers, never a stray access.
        const uint16_t* perm = p.plan + (((long long)b * p.q_heads + h) * nblk + mblk) * D;
        for (int j = tid; j < D; j += kHThreads) s_off[j] = 2 * min((int)perm[j], D - 1);
    }
    __syncthreads();

    if (wg == 0) {
        // ================= producer =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::kProducerRegs));
        const T* kg = static_cast<const T*>(p.k) + (long long)b * p.k_batch_stride + (long long)hk * p.k_head_stride;
        const T* vg = static_cast<const T*>(p.v) + (long long)b * p.v_batch_stride + (long long)hk * p.v_head_stride;
        const long long ks = p.k_row_stride, vs = p.v_row_stride;
        auto stage_k = [&](int s) { return sbase + Tr::kOffStage + s * Tr::kStageBytes; };
        auto stage_v = [&](int s) { return stage_k(s) + Tr::kKBytes; };

        // V tile j (MN-major operand) and K tile j (G = 1, K-major operand)
        // into stage s: 128-byte-swizzle regions, zero rows past the end.
        auto load_v = [&](int j, int s) {
            load_sw128<D, BN>(stage_v(s), vg + (long long)(j * BN) * vs, vs, n_kv - j * BN, lt);
        };
        auto load_k = [&](int j, int s) {
            load_sw128<D, BN>(stage_k(s), kg + (long long)(j * BN) * ks, ks, n_kv - j * BN, lt);
        };
        // K tile j -> row-padded raw buffer r (G > 1; 4-byte copies: the pad is 4 bytes).
        auto load_kraw = [&](int j, int r) {
            if constexpr (kAblate & 2) return;
            const int n0 = j * BN;
            constexpr int kWords = BN * D / 2, kIters = kWords / 128;
            constexpr int kRowsPerIter = 128 / (D / 2);
            const uint32_t base = sbase + Tr::kOffKraw + r * Tr::kKrawBytes;
            const int key0 = lt / (D / 2), w = lt % (D / 2);
            if (n0 + BN <= n_kv) {
                // A whole tile: no predicates, one pointer increment per copy.
                const T* g = kg + (long long)(n0 + key0) * ks + 2 * w;
                const long long step = kRowsPerIter * ks;
                const uint32_t d = base + key0 * Tr::kPitchKraw + w * 4;
#pragma unroll 16
                for (int it = 0; it < kIters; ++it) {
                    cp_async4(d + it * kRowsPerIter * Tr::kPitchKraw, g);
                    g += step;
                }
            } else {
#pragma unroll 8
                for (int it = 0; it < kIters; ++it) {
                    const int key = key0 + it * kRowsPerIter;
                    const bool ok = n0 + key < n_kv;
                    cp_async4(base + key * Tr::kPitchKraw + w * 4, ok ? kg + (long long)(n0 + key) * ks + 2 * w : kg,
                              ok);
                }
            }
        };
        // Khat of raw buffer r into stage s: lane = key (conflict-free gathers
        // through the 4-byte row pad), 8 fused columns per 16-byte store.
        auto fuse = [&](int r, int s) {
            if constexpr (Tr::kFused && !(kAblate & 1)) {
                const int key = lt;   // BN == 128 producer threads
                const unsigned char* kr = smem + Tr::kOffKraw + r * Tr::kKrawBytes + key * Tr::kPitchKraw;
                const uint32_t dst = stage_k(s) + (key / 8) * (16 * KC) + (key % 8) * 16;
#pragma unroll
                for (int tb = 0; tb < DG / 8; ++tb) {
                    uint16_t out[8];
#pragma unroll
                    for (int u = 0; u < 8; ++u) {
                        // The group's offsets: warp-uniform (broadcast) 8- or 16-byte loads.
                        alignas(16) uint32_t off[G];
                        if constexpr (G == 2) {
                            *reinterpret_cast<uint2*>(off) = *reinterpret_cast<const uint2*>(s_off + (tb * 8 + u) * G);
                        } else {
#pragma unroll
                            for (int i = 0; i < G; i += 4)
                                *reinterpret_cast<uint4*>(off + i) =
                                    *reinterpret_cast<const uint4*>(s_off + (tb * 8 + u) * G + i);
                        }
                        T e[G];
#pragma unroll
                        for (int i = 0; i < G; ++i) e[i] = *reinterpret_cast<const T*>(kr + off[i]);
                        const T sum = hgroup_sum<T, G>(e);
                        out[u] = *reinterpret_cast<const uint16_t*>(&sum);
                    }
                    st_shared_v4(dst + tb * 128, pack_raw(out[0], out[1]), pack_raw(out[2], out[3]),
                                 pack_raw(out[4], out[5]), pack_raw(out[6], out[7]));
                }
            }
        };

        if constexpr (Tr::kFused) {
            // Khat columns past d/G (padding to wgmma's k) stay zero in every stage.
            if constexpr (Tr::KW > DG) {
                for (int s = 0; s < S; ++s)
                    for (int i = lt; i < BN * (Tr::KW - DG) / 8; i += 128) {
                        const int key = i % BN, blk = DG / 8 + i / BN;
                        st_shared_v4(stage_k(s) + (key / 8) * (16 * KC) + (key % 8) * 16 + blk * 128, 0, 0, 0, 0);
                    }
            }
            // Iteration j: tile j-1's V and tile j's raw K have landed; tile j-1
            // (Khat fused last iteration) is published; then tile j's V and tile
            // j+1's raw K are issued and tile j is fused.
            if (n_tiles > 0) {
                load_kraw(0, 0);
                cp_async_commit();
            }
            for (int j = 0; j < n_tiles; ++j) {
                const int s = j % S;
                cp_async_wait_all();
                named_bar(1, 128);   // raw K_j visible to every producer thread; raw buffer (j+1)%2 free
                if (j > 0) {
                    fence_proxy_async();
                    mbar_arrive(bar_full + 8 * ((j - 1) % S));
                }
                if (j >= S) mbar_wait(bar_empty + 8 * s, ((j / S) + 1) & 1);
                load_v(j, s);
                if (j + 1 < n_tiles) load_kraw(j + 1, (j + 1) % 2);
                cp_async_commit();
                fuse(j % 2, s);
            }
            if (n_tiles > 0) {
                cp_async_wait_all();
                fence_proxy_async();
                mbar_arrive(bar_full + 8 * ((n_tiles - 1) % S));
            }
        } else {
            for (int j = 0; j < n_tiles; ++j) {
                const int s = j % S;
                if (j >= S) mbar_wait(bar_empty + 8 * s, ((j / S) + 1) & 1);
                load_k(j, s);
                load_v(j, s);
                cp_async_commit();
                if (j > 0) {
                    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
                    fence_proxy_async();
                    mbar_arrive(bar_full + 8 * ((j - 1) % S));
                }
            }
            if (n_tiles > 0) {
                cp_async_wait_all();
                fence_proxy_async();
                mbar_arrive(bar_full + 8 * ((n_tiles - 1) % S));
            }
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

        for (int j = 0; j < n_tiles; ++j) {
            const int s = j % S;
            const int n0 = j * BN;
            const uint32_t kst = sbase + Tr::kOffStage + s * Tr::kStageBytes;
            mbar_wait(bar_full + 8 * s, (j / S) & 1);

            // ---- S = Qhat Khat^T ----
            float acc_s[BN / 2];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KC / 16; ++kk) Wgmma<BN, kBf16>::ss(acc_s, desc_a(kk), desc_b(kst, kk), kk > 0);
            wgmma_commit();
            wgmma_wait0();
            fence_regs(acc_s);

            // ---- mask: key tail and bottom-right causal ----
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

            if constexpr (!(kAblate & 4)) {
            // ---- online softmax (base 2; a row's values live in a lane quad) ----
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
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    acc_o[dt * 4 + 2 * r] *= corr;
                    acc_o[dt * 4 + 2 * r + 1] *= corr;
                }
            }

            }
            // ---- O += P V ----
            uint32_t pf[BN / 16][4];
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                pf[kk][0] = Nm::pack(acc_s[8 * kk + 0], acc_s[8 * kk + 1]);
                pf[kk][1] = Nm::pack(acc_s[8 * kk + 2], acc_s[8 * kk + 3]);
                pf[kk][2] = Nm::pack(acc_s[8 * kk + 4], acc_s[8 * kk + 5]);
                pf[kk][3] = Nm::pack(acc_s[8 * kk + 6], acc_s[8 * kk + 7]);
            }
            const uint64_t desc_v = make_desc(kst + Tr::kKBytes, BN * 128, 1024, 1);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) Wgmma<D, kBf16>::rs_tb(acc_o, pf[kk], desc_v + kk * (2048 >> 4), 1);
            wgmma_commit();
            wgmma_wait0();
            fence_regs(acc_o);
            if (lane == 0) mbar_arrive(bar_empty + 8 * s);
        }

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

