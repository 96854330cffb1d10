// Similarity (and key-weighted) grouping plans on the GPU: the core's
// GroupingMode::Similarity / KeyWeighted plan (core/src/grouping.rs,
// similarity_groups + refine) computed per (batch, head, query block) in f32.
//
// One CTA (8 warps) per block of block_rows query rows:
//   load     the Q block -> shared memory, row-major (rows zero-padded to 16);
//   Gram     Gq = Q^T Q with mma.sync on ldmatrix.trans fragments (bf16/f16
//            products are exact in f32, f32 accumulation); only the band
//            tiles that hold every pair once are computed (Band: at D = 128
//            a stripe of 5 tiles per warp), so the matrix is exactly
//            symmetric;
//   matrix   stored folded at D = 128 with G <= 4 (row v: the pairs
//            (v, v + k mod D), k = 1..D/2; 35 KB, so 4 CTAs share an SM
//            instead of 3), whole (D x D) elsewhere (there the fold's dearer
//            reads cost more than its occupancy brings; kernels/NOTES.md).
//            Similarity: the squared column distances
//            M[i][j] = Gq_ii + Gq_jj - 2 Gq_ij (every cost of the core is a
//            sum of distances: the error of a group X is P(X)/|X| with P(X)
//            = sum of M over its pairs). KeyWeighted with G = 2: the core's
//            pair_cost |q_i - q_j|^2 |k_i - k_j|^2 / 4 (every decision is a
//            sum of pair costs, so it runs the Similarity code on it);
//            KeyWeighted with G >= 4: Gq itself (cluster costs need it),
//            with the centred K Gram Gk (da_kgram below) in global memory.
//            Written straight from the mma accumulators; the diagonal of a
//            whole weight matrix is NaN (never chosen; the folded one has
//            none), other NaNs become +inf and -0 becomes +0, so float
//            comparisons agree with the total order of the keys below;
//   greedy   while groups are smaller than G: merge disjoint pairs of groups
//            in increasing order of (added cost, a, b). The core sorts all
//            pairs and takes each pair whose groups are both free; that is
//            the unique greedy matching of a strict total order, which the
//            locally-dominant rounds below compute in parallel: every free
//            group finds its cheapest free partner; mutual choices are
//            matched (they are exactly the pairs the sequential scan takes);
//            repeat. The first choices of single columns are row scans (a
//            few threads per row, 16-byte loads; folded: the row and its
//            anti-diagonal, the smallest weight first, then the smallest
//            column among the entries equal to it); later searches are warp-
//            wide (lanes over the candidates, free ones from a ballot mask)
//            for the groups whose choice was matched away: with the whole
//            matrix dealt round-robin over the warps (the set is known from
//            the choices alone while the mutual ones are matched), with the
//            folded one each warp for the groups it owns (v = warp mod 8);
//            two CTA barriers per round.
//            Merged groups keep the core's member order and are ordered by
//            their smallest column.
//   refine   the core's local search (at most 8 passes; in a pass, pairs of
//            groups a < b, then positions x, y of the swapped columns, in
//            order; a swap is applied as soon as it lowers the summed cost).
//            Sequential in the core; here every pair of groups is evaluated
//            at once against the current state (first[p]: its first
//            improving swap; a bit mask of the pairs that have one), one
//            warp finds the next pair in scan order from the mask and applies
//            its swap, then the pairs that contain one of the two changed
//            groups are evaluated again (G = 2: all of them at once; G >= 4:
//            those after it in the scan, those before it at the next pass's
//            start). G = 2: a thread per pair (its four swaps are two sums);
//            with the whole matrix the passes after the first full one run in
//            warp 0 alone (no CTA barriers). G >= 4: a team of lanes per pair
//            (Similarity a lane per row of the G x G swaps, key-weighted a lane
//            per swap). The result is the core's. (The folded kernels keep
//            v4's matching, first pass and refinement: the v5 forms measured
//            no faster there; kernels/NOTES.md.)
//
// Checked without a GPU by kernels/emu (this file compiled on the host with
// every CUDA thread a fiber, CPU plans as reference) and on the H100 by
// cuda-driver/tests/gpu_similarity.rs; speed and limits: kernels/NOTES.md.
//
// Costs are the core's up to rounding: Similarity compares sums of
// distances (mathematically the core's cost differences); KeyWeighted uses
// the core's cluster_cost/pair_cost formulas on Gq and the centred K Gram Gk
// (computed per (batch, KV head) by da_kgram below). The CPU plan accumulates
// in f64, so plans differ only where a decision is a near-tie.
#ifdef DA_EMULATE
#include "emu/emu.h"
#else
#include "common.cuh"
#endif
// Work counters of the host emulation (kernels/emu), nothing on the GPU.
#ifdef DA_EMU_COUNT
inline long long da_counts[16];
#define DA_COUNT(i) (++da_counts[i])
#else
#define DA_COUNT(i) ((void)0)
#endif

// Parameters of the similarity plan kernel (cuda-driver/src/similarity.rs
// mirrors it). Strides are in elements.
struct SimPlanParams {
    const void* q;            // [batch, q_len, heads, head_dim], f16 or bf16
    uint16_t* plan;           // [batch][heads][num_blocks][head_dim]
    const float* gk;          // key-weighted: [batch][kv_heads][d][d] centred K Gram; else null
    long long q_batch_stride, q_row_stride, q_head_stride;
    int q_len, heads, block_rows, num_blocks, batch, kv_heads, heads_per_kv, head_map_len;
    // blockIdx -> query head through head_map when head_map_len > 0.
    uint16_t head_map[DA_HEAD_MAP_MAX];
};

// Parameters of the key Gram kernel.
struct KGramParams {
    const void* k;            // [batch, kv_len, kv_heads, head_dim]
    float* gk;                // [batch][kv_heads][d][d]
    long long k_batch_stride, k_row_stride, k_head_stride;
    int kv_len, kv_heads, batch, pad_;
};

static_assert(sizeof(SimPlanParams) == 80 + 2 * DA_HEAD_MAP_MAX, "SimPlanParams layout (similarity.rs)");
static_assert(sizeof(KGramParams) == 56, "KGramParams layout (similarity.rs)");

namespace da {

constexpr int kSimThreads = 256;
constexpr int kSimWarps = kSimThreads / 32;
constexpr uint8_t kNone = 0xff;
constexpr int kMaxRows = 128;   // block_rows the kernel supports
constexpr uint32_t kFull = 0xffffffffu;

constexpr int align16(int x) { return (x + 15) / 16 * 16; }

template <int D, int G>
struct Fold {
    static constexpr bool value = D == 128 && G <= 4;
};

template <int D, int G>
struct SimTraits {
    static constexpr int kQP = D + 8;   // Q pitch (elements): conflict-free ldmatrix rows
    // The matrix folded (row v holds the pairs (v, v + k), k = 1..H; see Band)
    // where that lets 4 CTAs share an SM (D = 128, G <= 4); else whole.
    static constexpr bool kFold = Fold<D, G>::value;
    static constexpr int H = D / 2;
    static constexpr int kMP = kFold ? H + 4 : D + 4;   // pitch (f32): 16-byte rows, conflict-free scans
    static constexpr int kQBytes = kMaxRows * kQP * 2;
    static constexpr int kMatBytes = D * kMP * 4;
    static constexpr int n = D / G;                      // groups after the greedy rounds
    static constexpr int NP = n * (n - 1) / 2;           // pairs of groups
    static constexpr int NW = (NP + 31) / 32;            // words of a pair bit mask
    static constexpr int kOffMat = 0;                    // Q, then the matrix, in one region
    static constexpr int kOffDiag = align16(kQBytes > kMatBytes ? kQBytes : kMatBytes);   // f32 [D] Gq diagonal
    static constexpr int kOffKDiag = kOffDiag + 4 * D;   // f32 [D] Gk diagonal (key-weighted)
    static constexpr int kOffSelf = kOffKDiag + 4 * D;   // f32 [D] per column: distances to its group
    static constexpr int kOffCost = kOffSelf + 4 * D;    // f32 [D] per group: cost
    static constexpr int kOffRed = kOffCost + 4 * D;     // u32 [8] per-warp counts, i32 [8] control
    // u32 [4] (32 bytes) the groups choosing again in a matching round (whole matrix only)
    static constexpr int kOffVote = kOffRed + 64;
    static constexpr int kOffCur = kOffVote + (kFold ? 0 : 32);   // u8 [2][D] members
    static constexpr int kOffPos = kOffCur + 2 * D;      // u8 [D] column -> position
    static constexpr int kOffMate = kOffPos + D;         // u8 [D]
    static constexpr int kOffBest = kOffMate + D;        // u8 [D]
    static constexpr int kOffImp = kOffBest + D;         // u32 [NW] pairs with an improving swap
    static constexpr int kOffStale = kOffImp + 4 * NW;   // u32 [NW] pairs to evaluate at the next pass
    static constexpr int kOffFirst = kOffStale + 4 * NW; // u8 [NP] first improving swap of a pair
    static constexpr int kOffPairs = align16(kOffFirst + NP);   // u16 [NP] groups a | b << 8 of a pair
    static constexpr int kSmem = align16(kOffPairs + 2 * NP);
};

// Total order of f32 as u32 (f64::total_cmp's order on the bits).
__device__ __forceinline__ uint32_t ord_f32(float w) {
    const uint32_t u = __float_as_uint(w);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A weight as stored: NaN -> +inf, -0 -> +0 (float order = key order).
__device__ __forceinline__ float tidy(float x) { return x != x ? INFINITY : x == 0.f ? 0.f : x; }

// (I, J), I <= J, of the t-th upper 16x16 tile of an nb x nb tiling.
__device__ __forceinline__ void upper_tile(int t, int nb, int& I, int& J) {
    int i = 0;
    while (t >= nb - i) {
        t -= nb - i;
        ++i;
    }
    I = i;
    J = i + t;
}

// Index of the pair (a, b), a < b, among the pairs of n groups in scan order.
__device__ __forceinline__ int pair_index(int a, int b, int n) { return a * n - a * (a + 1) / 2 + (b - a - 1); }

__device__ __forceinline__ void pair_of(int p, int n, int& a, int& b) {
    const float h = n - 0.5f;
    int x = (int)(h - sqrtf(fmaxf(h * h - 2.f * p, 0.f)));
    x = max(0, min(x, n - 2));
    while (x > 0 && pair_index(x, x + 1, n) > p) --x;
    while (x + 1 < n - 1 && pair_index(x + 1, x + 2, n) <= p) ++x;
    a = x;
    b = p - pair_index(x, x + 1, n) + x + 1;
}

// Sum over the upper 16x16 tiles owned by this warp of X^T X, X = Xt^T
// ([D][pitch] in shared memory, k = columns 0..kend-1 of Xt): acc[s][nt][e]
// for the s-th owned tile. With kSplit, Xt holds hi and Xt2 lo parts and the
// product is hi hi^T + hi lo^T + lo hi^T. (The key Gram below.)
template <typename T, int D, bool kSplit, int kPitch>
__device__ __forceinline__ void gram_tiles(float (&acc)[(D / 16 * (D / 16 + 1) / 2 + kSimWarps - 1) / kSimWarps][2][4],
                                           const T* xt, const T* xt2, int kend, int warp, int lane) {
    constexpr int NB = D / 16, NT = NB * (NB + 1) / 2, PW = (NT + kSimWarps - 1) / kSimWarps;
    constexpr bool kBf16 = Num<T>::kBf16;
    const int g8 = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int s = 0; s < PW; ++s) {
        const int t = warp + s * kSimWarps;
        if (t < NT) {
            int I, J;
            upper_tile(t, NB, I, J);
            for (int k0 = 0; k0 < kend; k0 += 16) {
                uint32_t a[4], a2[4];
                const int ao = (I * 16 + g8) * kPitch + k0 + 2 * t4;
                a[0] = *reinterpret_cast<const uint32_t*>(xt + ao);
                a[1] = *reinterpret_cast<const uint32_t*>(xt + ao + 8 * kPitch);
                a[2] = *reinterpret_cast<const uint32_t*>(xt + ao + 8);
                a[3] = *reinterpret_cast<const uint32_t*>(xt + ao + 8 * kPitch + 8);
                if constexpr (kSplit) {
                    a2[0] = *reinterpret_cast<const uint32_t*>(xt2 + ao);
                    a2[1] = *reinterpret_cast<const uint32_t*>(xt2 + ao + 8 * kPitch);
                    a2[2] = *reinterpret_cast<const uint32_t*>(xt2 + ao + 8);
                    a2[3] = *reinterpret_cast<const uint32_t*>(xt2 + ao + 8 * kPitch + 8);
                }
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    const int bo = (J * 16 + nt * 8 + g8) * kPitch + k0 + 2 * t4;
                    const uint32_t b0 = *reinterpret_cast<const uint32_t*>(xt + bo);
                    const uint32_t b1 = *reinterpret_cast<const uint32_t*>(xt + bo + 8);
                    mma16816<kBf16>(acc[s][nt], a, b0, b1);
                    if constexpr (kSplit) {
                        const uint32_t c0 = *reinterpret_cast<const uint32_t*>(xt2 + bo);
                        const uint32_t c1 = *reinterpret_cast<const uint32_t*>(xt2 + bo + 8);
                        mma16816<kBf16>(acc[s][nt], a, c0, c1);
                        mma16816<kBf16>(acc[s][nt], a2, b0, b1);
                    }
                }
            }
        }
    }
}

// Writes the owned tiles of a symmetric matrix (upper part computed) through
// put(row, col, value) (its mirror is the caller's).
template <int D, typename F>
__device__ __forceinline__ void store_sym(const float (&acc)[(D / 16 * (D / 16 + 1) / 2 + kSimWarps - 1) / kSimWarps][2][4],
                                          int warp, int lane, F&& put) {
    constexpr int NB = D / 16, NT = NB * (NB + 1) / 2, PW = (NT + kSimWarps - 1) / kSimWarps;
    const int g8 = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int s = 0; s < PW; ++s) {
        const int t = warp + s * kSimWarps;
        if (t < NT) {
            int I, J;
            upper_tile(t, NB, I, J);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = I * 16 + g8 + (e >= 2 ? 8 : 0);
                    const int col = J * 16 + nt * 8 + 2 * t4 + (e & 1);
                    // Inside a diagonal tile only row <= col is taken (then mirrored).
                    if (I < J || row <= col) put(row, col, acc[s][nt][e]);
                }
        }
    }
}

// The folded matrix: row v holds the pairs (v, v + k mod D), k = 1..H (H =
// D / 2), at offset k - 1; the pair (a, b) lies in row a when (b - a) mod D
// <= H, else in row b (the pairs (v, v + H) in both rows, the same value).
// It is computed from band tiles of Q^T Q: stripe I (rows 16 I..16 I + 15)
// needs the tiles J = I..I + H / 16 (mod D / 16).
template <int D>
struct Band {
    static constexpr int NB = D / 16, TB = D / 32 + 1, NT = NB * TB, PW = (NT + kSimWarps - 1) / kSimWarps;
    // D = 128: warp w owns stripe w (5 tiles sharing their A fragments).
    static constexpr bool kStripe = TB == PW && NB == kSimWarps;
    __device__ __forceinline__ static void tile(int t, int& I, int& J) {
        I = t / TB;
        J = (I + t % TB) % NB;
    }
};

// The band tiles of Q^T Q owned by this warp (tiles warp * PW + s) with Q
// row-major in shared memory ([rows][kQP], rows up to kend zero-filled):
// A = Q^T and B = Q fragments both by ldmatrix.trans (lane l addresses row
// l % 8 of matrix l / 8; A's matrices: (k0, m0), (k0, m0 + 8), (k0 + 8, m0),
// (k0 + 8, m0 + 8); B's: (k0, n0), (k0 + 8, n0), (k0, n0 + 8), (k0 + 8,
// n0 + 8), giving b0, b1 of both n8 halves).
template <typename T, int D, int kQP>
__device__ __forceinline__ void gram_band(float (&acc)[Band<D>::PW][2][4], const T* qs, int kend, int warp, int lane) {
    using Bd = Band<D>;
    constexpr int PW = Bd::PW;
    constexpr bool kBf16 = Num<T>::kBf16;
    const int mi = lane >> 3, mr = lane & 7;
    const uint32_t base = smem_addr(qs);
    const uint32_t a_off = static_cast<uint32_t>(((8 * (mi >> 1) + mr) * kQP + 8 * (mi & 1)) * 2);
    const uint32_t b_off = static_cast<uint32_t>(((8 * (mi & 1) + mr) * kQP + 8 * (mi >> 1)) * 2);
    uint32_t pa[PW], pb[PW];
#pragma unroll
    for (int s = 0; s < PW; ++s) {
        int I, J;
        Bd::tile(warp * PW + s, I, J);
        pa[s] = base + a_off + I * 32;
        pb[s] = base + b_off + J * 32;
    }
    const auto step = [&](int k0) {
        const uint32_t ko = static_cast<uint32_t>(k0 * kQP * 2);
        uint32_t a[4];
        if constexpr (Bd::kStripe) ldsm_x4_trans(a, pa[0] + ko);
#pragma unroll
        for (int s = 0; s < PW; ++s) {
            if (PW * kSimWarps == Bd::NT || warp * PW + s < Bd::NT) {
                if constexpr (!Bd::kStripe) ldsm_x4_trans(a, pa[s] + ko);
                uint32_t b[4];
                ldsm_x4_trans(b, pb[s] + ko);
                mma16816<kBf16>(acc[s][0], a, b[0], b[1]);
                mma16816<kBf16>(acc[s][1], a, b[2], b[3]);
            }
        }
    };
    if (kend == kMaxRows) {
#pragma unroll
        for (int k0 = 0; k0 < kMaxRows; k0 += 16) step(k0);
    } else {
#pragma unroll 1
        for (int k0 = 0; k0 < kend; k0 += 16) step(k0);
    }
}

// The diagonal of the owned band tiles (only diagonal tiles hold any).
template <int D>
__device__ __forceinline__ void store_diag(const float (&acc)[Band<D>::PW][2][4], int warp, int lane, float* diag) {
    using Bd = Band<D>;
    const int g8 = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int s = 0; s < Bd::PW; ++s) {
        const int t = warp * Bd::PW + s;
        if (t < Bd::NT && t % Bd::TB == 0) {
            const int I = t / Bd::TB;
            // (g8, g8) lies in n8 half 0 (rows 0-7) and (g8 + 8, g8 + 8) in half 1,
            // at column 2 t4 + (e & 1).
            if ((g8 >> 1) == t4) {
                const bool odd = g8 & 1;   // (no run-time index into the accumulators)
                diag[I * 16 + g8] = odd ? acc[s][0][1] : acc[s][0][0];
                diag[I * 16 + 8 + g8] = odd ? acc[s][1][3] : acc[s][1][2];
            }
        }
    }
}

// The matrix from the owned band tiles, the entry (r, c) with k = (c - r)
// mod D in 1..H written as f(r, c, v, diag[r], diag[c]): whole, to (r, c) and
// (c, r); folded, to row r at offset k - 1, the pairs (r, r + H) with r < H
// also to row r + H (the entries (r, r - H) are not used). In band tile b of
// a stripe (J = I + b), k = 16 b + cl - rl for the in-tile row rl and column
// cl, so a thread's folded stores are at fixed offsets from one pointer per
// row, and all tiles but the first and the last are stored whole.
template <int D, bool kFold, typename F>
__device__ __forceinline__ void store_band(const float (&acc)[Band<D>::PW][2][4], int warp, int lane, float* mat,
                                           const float* diag, F&& f) {
    using Bd = Band<D>;
    constexpr int H = D / 2, P = kFold ? H + 4 : D + 4;
    const int g8 = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int s = 0; s < Bd::PW; ++s) {
        const int t = warp * Bd::PW + s;
        if (Bd::PW * kSimWarps == Bd::NT || t < Bd::NT) {
            int I, J;
            Bd::tile(t, I, J);
            const int bi = Bd::kStripe ? s : t % Bd::TB;   // band index: J = I + bi
            const float2* dc = reinterpret_cast<const float2*>(diag + J * 16 + 2 * t4);
            const float2 d0 = dc[0], d1 = dc[4];   // diag[c] of columns 2 t4 (+1), 8 + 2 t4 (+1)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int rl = g8 + 8 * hh, r = I * 16 + rl;
                const float dr = diag[r];
                float* row = mat + r * P + 16 * bi - rl - 1 + 2 * t4;   // folded: + cl - 2 t4 = offset k - 1
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e1 = 0; e1 < 2; ++e1) {
                        const int cl = 8 * nt + 2 * t4 + e1;
                        const float dcv = nt == 0 ? (e1 ? d0.y : d0.x) : (e1 ? d1.y : d1.x);
                        // bi == 0: k = cl - rl >= 1; bi == TB - 1: k = H + cl - rl <= H.
                        const bool first = bi == 0, last = bi == Bd::TB - 1;
                        const bool keep = first ? cl > rl : last ? (cl < rl || (cl == rl && r < H)) : true;
                        if (keep) {
                            const int c = J * 16 + cl;
                            const float x = f(r, c, acc[s][nt][2 * hh + e1], dr, dcv);
                            if constexpr (kFold) {
                                row[8 * nt + e1] = x;
                                if (last && cl == rl) mat[c * P + H - 1] = x;
                            } else {
                                mat[r * P + c] = x;
                                mat[c * P + r] = x;
                            }
                        }
                    }
            }
        }
    }
}

// The costs a block's decisions read (see the matrix step above).
template <int D, int G, bool KW>
struct Costs {
    static constexpr bool kFold = Fold<D, G>::value;
    static constexpr int H = D / 2, P = kFold ? H + 4 : D + 4;
    static constexpr bool kDist = !KW || G == 2;   // m: pair weights; else Gq (and Gk)
    const float* m;       // the matrix, folded or whole (see SimTraits)
    const float* gk;      // [D][D], KeyWeighted with G >= 4 only
    const float* kdiag;   // its diagonal, in shared memory
    const float* qdiag;   // the Gq diagonal (KeyWeighted with G >= 4, folded matrix)

    // Entry (a, b), a != b.
    __device__ __forceinline__ float at(int a, int b) const {
        if constexpr (!kFold) return m[a * P + b];
        const int k = (b - a) & (D - 1);
        const bool fwd = k <= H;
        const int row = fwd ? a : b, off = fwd ? k : D - k;
        return m[row * P + off - 1];
    }
    __device__ __forceinline__ float k_at(int a, int b) const { return __ldg(gk + a * D + b); }
    // Gq_aa (KeyWeighted with G >= 4: on the diagonal of the whole matrix).
    __device__ __forceinline__ float q_diag(int a) const { return kFold ? qdiag[a] : m[a * P + a]; }

    // The core's pair_cost (KeyWeighted): |q_a - q_b|^2 |k_a - k_b|^2 / 4.
    __device__ __forceinline__ float kw_pair(int a, int b) const {
        const float dq = q_diag(a) + q_diag(b) - 2.f * at(a, b);
        const float dk = kdiag[a] + kdiag[b] - 2.f * k_at(a, b);
        return dq * dk / 4.f;
    }

    // The core's cluster_cost (KeyWeighted), members in order, with Gq and Gk
    // symmetric: each distinct entry read once, off-diagonal terms counted twice.
    template <int S>
    __device__ __forceinline__ float kw_cluster(const int (&mem)[S]) const {
        float q[S][S];   // x <= y only
#pragma unroll
        for (int x = 0; x < S; ++x)
#pragma unroll
            for (int y = x; y < S; ++y) q[x][y] = x == y ? q_diag(mem[x]) : at(mem[x], mem[y]);
        float r[S];
#pragma unroll
        for (int x = 0; x < S; ++x) {
            float acc = 0.f;
#pragma unroll
            for (int a = 0; a < S; ++a) acc += a <= x ? q[a][x] : q[x][a];
            r[x] = acc / (float)S;
        }
        float mm = 0.f;
#pragma unroll
        for (int x = 0; x < S; ++x) mm += r[x];
        mm /= (float)S;
        float cost = 0.f;
#pragma unroll
        for (int x = 0; x < S; ++x) {
            cost += (q[x][x] - r[x] - r[x] + mm) * kdiag[mem[x]];
#pragma unroll
            for (int y = x + 1; y < S; ++y) cost += 2.f * ((q[x][y] - r[x] - r[y] + mm) * k_at(mem[x], mem[y]));
        }
        return cost;
    }

    // Cost of a group of S >= 2 members: KeyWeighted: the core's group_cost
    // (on Gq, G >= 4); Similarity: P(X), the sum of distances over its pairs
    // (|X| times the core's cost).
    template <int S>
    __device__ __forceinline__ float group(const int (&mem)[S]) const {
        if constexpr (KW) {
            if constexpr (S == 2) {
                return kw_pair(mem[0], mem[1]);
            } else {
                return kw_cluster<S>(mem);
            }
        } else {
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < S; ++i)
#pragma unroll
                for (int j = i + 1; j < S; ++j) acc += at(mem[i], mem[j]);
            return acc;
        }
    }

    template <int S>
    __device__ __forceinline__ float group_at(const uint8_t* cm, int g) const {
        int mem[S];
#pragma unroll
        for (int i = 0; i < S; ++i) mem[i] = cm[g * S + i];
        return group<S>(mem);
    }

    // Added cost of merging groups of size S. S = 1: the pair weight of
    // columns v and u (symmetric to the bit, so read along row v); S >= 2:
    // groups lo < hi (members cm[v*S..]), computed in the same order whichever
    // end asks, so that both ends see the same key.
    template <int S>
    __device__ __forceinline__ float weight(const uint8_t* cm, const float* gcost, int lo, int hi) const {
        if constexpr (S == 1) {
            if constexpr (kDist) {
                return at(lo, hi);   // Similarity: twice the core's pair_cost
            } else {
                return kw_pair(lo, hi);
            }
        } else if constexpr (KW) {
            int mem[2 * S];
#pragma unroll
            for (int i = 0; i < S; ++i) {
                mem[i] = cm[lo * S + i];
                mem[S + i] = cm[hi * S + i];
            }
            return group<2 * S>(mem) - gcost[lo] - gcost[hi];
        } else {
            // P(A u B) - P(A) - P(B) = sum of cross distances - P(A) - P(B)
            // (2S times the core's added cost).
            float cross = 0.f;
#pragma unroll
            for (int i = 0; i < S; ++i)
#pragma unroll
                for (int j = 0; j < S; ++j) cross += at(cm[lo * S + i], cm[hi * S + j]);
            return cross - gcost[lo] - gcost[hi];
        }
    }
};

// First choices of single columns, the folded matrix holding pair weights:
// the cheapest partner of column v is the smallest (weight, u) over row v of the
// folded matrix (u = v + 1 + o, o = 0..H - 1) and its anti-diagonal (u = v -
// s, s = 1..H - 1, in row u at offset s - 1). TPR threads per row, each a
// run of RW offsets of the row (8 consecutive rows per quarter-warp:
// conflict-free 16-byte loads) and RW steps of the anti-diagonal. Two passes:
// the smallest weight m (merged across the TPR threads), then the smallest u
// among the entries equal to m (bit masks of the equal entries; usually one).
template <int D>
__device__ __forceinline__ void first_choices_fold(const float* m, uint8_t* best, int tid) {
    constexpr int H = D / 2, P = H + 4;
    constexpr int TPR = D == 128 ? 2 : 4;   // threads per row
    constexpr int RW = H / TPR;             // row entries and anti-diagonal steps per thread
    static_assert(RW <= 32 && RW % 4 == 0, "first_choices");
    const int v = (tid & 7) + 8 * (tid / (8 * TPR));
    const int h = (tid >> 3) % TPR;
    const int vr = v < D ? v : 0;   // (threads past the rows read row 0, unused)
    const float* row = m + vr * P + h * RW;
    // Anti-diagonal step i: s = s0 + i, in row (v - s) mod D at offset s - 1:
    // base - i (P - 1), plus D P once v - s < 0.
    const int s0 = 1 + h * RW, w = vr - s0;
    const float* anti = m + w * P + s0 - 1;
    float av[RW];
    float bv = INFINITY;
#pragma unroll
    for (int q = 0; q < RW / 4; ++q) {
        const float4 x = *reinterpret_cast<const float4*>(row + 4 * q);
        bv = fminf(bv, fminf(fminf(x.x, x.y), fminf(x.z, x.w)));
    }
#pragma unroll
    for (int i = 0; i < RW; ++i) {
        av[i] = INFINITY;
        if (s0 + i < H) av[i] = (i > w ? anti + D * P : anti)[-i * (P - 1)];
        bv = fminf(bv, av[i]);
    }
#pragma unroll
    for (int off = 8; off < 8 * TPR; off *= 2) bv = fminf(bv, __shfl_xor_sync(kFull, bv, off));
    uint32_t rm = 0u, am = 0u;
#pragma unroll
    for (int q = 0; q < RW / 4; ++q) {
        const float4 x = *reinterpret_cast<const float4*>(row + 4 * q);
        if (x.x == bv) rm |= 1u << (4 * q);
        if (x.y == bv) rm |= 2u << (4 * q);
        if (x.z == bv) rm |= 4u << (4 * q);
        if (x.w == bv) rm |= 8u << (4 * q);
    }
#pragma unroll
    for (int i = 0; i < RW; ++i)
        if (av[i] == bv && s0 + i < H) am |= 1u << i;
    int bu = kNone;
    while (rm) {
        const int i = __ffs(rm) - 1;
        rm &= rm - 1u;
        bu = min(bu, (vr + 1 + h * RW + i) & (D - 1));
    }
    while (am) {
        const int i = __ffs(am) - 1;
        am &= am - 1u;
        bu = min(bu, (w - i) & (D - 1));
    }
#pragma unroll
    for (int off = 8; off < 8 * TPR; off *= 2) bu = min(bu, __shfl_xor_sync(kFull, bu, off));
    if (h == 0 && v < D) best[v] = static_cast<uint8_t>(bu);
}

// First choices of single columns, the whole matrix holding pair weights: the
// cheapest partner of column v is the smallest (weight, u) of row v. TPR
// threads per row (8 consecutive rows per quarter-warp: conflict-free 16-byte
// loads), each scanning its columns downwards with <= (the smallest u wins a
// tie; the NaN diagonal never does), then merged across the TPR threads.
template <int D>
__device__ __forceinline__ void first_choices_whole(const float* m, uint8_t* best, int tid) {
    constexpr int P = D + 4;
    constexpr int TPR = D == 128 ? 2 : 4;   // threads per row
    constexpr int W = D / TPR;              // columns per thread
    const int v = (tid & 7) + 8 * (tid / (8 * TPR));
    const int h = (tid >> 3) % TPR;
    float bv = INFINITY;
    int bu = kNone;
    if (v < D) {
        const float* row = m + v * P + h * W;
#pragma unroll
        for (int q = W / 4 - 1; q >= 0; --q) {
            const float4 x = *reinterpret_cast<const float4*>(row + 4 * q);
            const int u = h * W + 4 * q;
            if (x.w <= bv) {
                bv = x.w;
                bu = u + 3;
            }
            if (x.z <= bv) {
                bv = x.z;
                bu = u + 2;
            }
            if (x.y <= bv) {
                bv = x.y;
                bu = u + 1;
            }
            if (x.x <= bv) {
                bv = x.x;
                bu = u;
            }
        }
    }
#pragma unroll
    for (int off = 8; off < 8 * TPR; off *= 2) {
        const float ov = __shfl_xor_sync(kFull, bv, off);
        const int ou = __shfl_xor_sync(kFull, bu, off);
        if (ov < bv || (ov == bv && ou < bu)) {
            bv = ov;
            bu = ou;
        }
    }
    if (h == 0 && v < D) best[v] = static_cast<uint8_t>(bu);
}

// Candidate slots of the warp-wide searches: lane l holds groups
// u = NI l + k, k < NI (NI = n / 32 for n >= 32 groups; else NI = 1, u = l);
// fm[k] bit l: u is free.
template <int n>
struct Slots {
    static constexpr int NI = n >= 32 ? n / 32 : 1;
    static_assert(NI == 1 || NI == 2 || NI == 4, "at most 128 groups");
};

// fm from mate[] (kNone: free), one load per lane.
template <int n>
__device__ __forceinline__ void free_mask(const uint8_t* mate, uint32_t (&fm)[Slots<n>::NI], int lane) {
    constexpr int NI = Slots<n>::NI;
    if constexpr (NI == 4) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(mate + 4 * lane);
#pragma unroll
        for (int k = 0; k < 4; ++k) fm[k] = __ballot_sync(kFull, ((w >> (8 * k)) & 0xffu) == kNone);
    } else if constexpr (NI == 2) {
        const uint32_t w = *reinterpret_cast<const uint16_t*>(mate + 2 * lane);
#pragma unroll
        for (int k = 0; k < 2; ++k) fm[k] = __ballot_sync(kFull, ((w >> (8 * k)) & 0xffu) == kNone);
    } else {
        fm[0] = __ballot_sync(kFull, lane < n && mate[lane] == kNone);
    }
}

// Warp-wide search for group v's cheapest free partner: the smallest key
// (weight as ordered bits, u), which is the core's order (cost, lo, hi) for v.
template <int D, int G, bool KW, int S>
__device__ __forceinline__ int search(const Costs<D, G, KW>& c, const uint8_t* cm, const float* gcost, int v,
                                      const uint32_t (&fm)[Slots<D / S>::NI], int lane) {
    constexpr int NI = Slots<D / S>::NI;
    uint32_t bk = kFull, bu = kFull;
    if (lane == 0) DA_COUNT(8);
    if constexpr (S == 1 && Costs<D, G, KW>::kDist && Costs<D, G, KW>::kFold) {
        // Pair weights of the folded matrix (tidy: float order is key order):
        // (v, u) in row v at offset d - 1 if d = (u - v) mod D <= H, else in
        // row u at offset D - 1 - d. u ascends with k: strict < keeps the
        // smallest u of a tie.
        constexpr int H = D / 2, P = Costs<D, G, KW>::P;
        const int du = NI * lane - v;
        const float* rv = c.m + v * P - 1;                     // + d
        const float* ru = c.m + NI * lane * P + (D - 1);       // + k P - d
        // (u = v, d = 0, is skipped; its load, at offset D - 1 of row u,
        // stays inside the block's shared memory and is discarded.)
        float bv = INFINITY;
#pragma unroll
        for (int k = 0; k < NI; ++k) {
            const int d = (du + k) & (D - 1);
            const float x = (d <= H && d != 0 ? rv + d : ru + k * P - d)[0];
            if (((fm[k] >> lane) & 1u) && d != 0 && x < bv) {
                bv = x;
                bu = static_cast<uint32_t>(NI * lane + k);
            }
        }
        if (bu != kFull) bk = ord_f32(bv);
    } else if constexpr (S == 1 && Costs<D, G, KW>::kDist) {
        // Pair weights along row v (tidy: float order is key order), NI
        // consecutive ones per lane in one load, downwards with <=.
        const float* row = c.m + v * Costs<D, G, KW>::P + NI * lane;
        float x[NI];
        if constexpr (NI == 4) {
            const float4 q = *reinterpret_cast<const float4*>(row);
            x[0] = q.x;
            x[1] = q.y;
            x[2] = q.z;
            x[3] = q.w;
        } else if constexpr (NI == 2) {
            const float2 q = *reinterpret_cast<const float2*>(row);
            x[0] = q.x;
            x[1] = q.y;
        } else {
            x[0] = row[0];
        }
        float bv = INFINITY;
#pragma unroll
        for (int k = NI - 1; k >= 0; --k) {
            const int u = NI * lane + k;
            if (((fm[k] >> lane) & 1u) && u != v && x[k] <= bv) {
                bv = x[k];
                bu = static_cast<uint32_t>(u);
            }
        }
        if (bu != kFull) bk = ord_f32(bv);
    } else {
#pragma unroll
        for (int k = 0; k < NI; ++k) {
            const int u = NI * lane + k;
            if (((fm[k] >> lane) & 1u) && u != v) {
                const float w = S == 1 ? c.template weight<1>(cm, gcost, v, u)
                                       : c.template weight<S>(cm, gcost, min(u, v), max(u, v));
                const uint32_t key = ord_f32(w);
                if (key < bk) {
                    bk = key;
                    bu = static_cast<uint32_t>(u);
                }
            }
        }
    }
    const uint32_t m = __reduce_min_sync(kFull, bk);
    return static_cast<int>(__reduce_min_sync(kFull, bk == m ? bu : kFull));
}

// The matching rounds' guard against a hang (unreachable with a strict total
// order of the keys): pairs the groups still free in index order. One thread.
__device__ __forceinline__ void pair_rest_in_order(uint8_t* mate, int n) {
    int prev = -1;
    for (int v = 0; v < n; ++v)
        if (mate[v] == kNone) {
            if (prev < 0) {
                prev = v;
            } else {
                mate[prev] = static_cast<uint8_t>(v);
                mate[v] = static_cast<uint8_t>(prev);
                prev = -1;
            }
        }
}

// One greedy round: groups of S -> groups of 2S (cm -> nx).
template <int D, int G, bool KW, int S>
__device__ void greedy_round(const Costs<D, G, KW>& c, const uint8_t* cm, uint8_t* nx, float* gcost, uint8_t* mate,
                             uint8_t* best, uint32_t* red, uint32_t* vote, int tid) {
    constexpr int n = D / S;
    constexpr int NI = Slots<n>::NI;                         // candidate slots per lane
    constexpr int NWG = (n + 31) / 32;                       // words of a bit mask over the groups
    static_assert(n <= kSimThreads / 2 && n % 2 == 0, "groups");
    const int lane = tid & 31, warp = tid >> 5;
    if constexpr (S >= 2) {
        if (tid < n) gcost[tid] = c.template group_at<S>(cm, tid);
    }
    if (tid < n) mate[tid] = kNone;
    __syncthreads();
    // First choices: everyone among everyone.
    if constexpr (S == 1 && Costs<D, G, KW>::kDist) {
        if constexpr (Costs<D, G, KW>::kFold) {
            first_choices_fold<D>(c.m, best, tid);
        } else {
            first_choices_whole<D>(c.m, best, tid);
        }
    } else {
        uint32_t fm[NI];
#pragma unroll
        for (int i = 0; i < NI; ++i) fm[i] = n >= 32 ? kFull : (1u << n) - 1u;
        for (int v = warp; v < n; v += kSimWarps) {
            const int b = search<D, G, KW, S>(c, cm, gcost, v, fm, lane);
            if (lane == 0) best[v] = static_cast<uint8_t>(b);
        }
    }
    __syncthreads();
    if constexpr (!Costs<D, G, KW>::kFold) {
        uint32_t* again_w = vote;   // [NWG] the groups that choose again in this round
        for (int it = 0;; ++it) {
            // Mutual choices are matched. A free group's choice u is free here, and
            // is matched in this round iff its own choice is mutual: the groups
            // whose choice is matched away (they choose again) are known from
            // best[] alone (not written in this step).
            bool still_free = false, again = false;
            if (tid < n && mate[tid] == kNone) {
                const int u = best[tid];
                const int w = best[u];
                if (w == tid) {
                    mate[tid] = static_cast<uint8_t>(u);
                } else {
                    still_free = true;
                    again = best[w] == u;
                }
            }
            if (warp < NWG) {
                const uint32_t ab = __ballot_sync(kFull, again);
                if (lane == 0) again_w[warp] = ab;
            }
            if (tid == 0) DA_COUNT(3);
            if (__syncthreads_count(still_free) == 0) break;
            if (it == n) {
                if (tid == 0) pair_rest_in_order(mate, n);
                __syncthreads();
                break;
            }
            // The groups that choose again, dealt round-robin over the warps in
            // their order (the r-th to warp r mod 8): mine[k] bit l is group 32 k + l.
            uint32_t mine[NWG];
            bool any = false;
            {
                const uint32_t lt = (1u << lane) - 1u;
                int base = 0;
#pragma unroll
                for (int k = 0; k < NWG; ++k) {
                    const uint32_t aw = again_w[k];
                    const bool take = ((aw >> lane) & 1u) && ((base + __popc(aw & lt)) & (kSimWarps - 1)) == warp;
                    mine[k] = __ballot_sync(kFull, take);
                    any |= mine[k] != 0u;
                    base += __popc(aw);
                }
            }
            if (any) {
                // They choose among the free groups.
                uint32_t fm[NI];
                free_mask<n>(mate, fm, lane);
#pragma unroll
                for (int k = 0; k < NWG; ++k) {
                    uint32_t todo = mine[k];
                    while (todo) {
                        const int v = 32 * k + __ffs(todo) - 1;
                        todo &= todo - 1u;
                        const int b = search<D, G, KW, S>(c, cm, gcost, v, fm, lane);
                        if (lane == 0) best[v] = static_cast<uint8_t>(b);
                    }
                }
            }
            __syncthreads();
        }
    } else {
        // The folded matrix (D = 128, G <= 4): v4's rounds, each warp searching for
        // the groups it owns (v = warp mod 8); the dealt searches measured no
        // faster there (kernels/NOTES.md, v5).
        constexpr int NO = (n + kSimWarps - 1) / kSimWarps;   // groups a warp owns (v = warp + 8 l)
        for (int it = 0;; ++it) {
            // Mutual choices are matched (both ends of a free group's choice are free here).
            int still_free = 0;
            if (tid < n && mate[tid] == kNone) {
                const int u = best[tid];
                if (best[u] == tid) {
                    mate[tid] = static_cast<uint8_t>(u);
                } else {
                    still_free = 1;
                }
            }
            if (tid == 0) DA_COUNT(3);
            if (__syncthreads_count(still_free) == 0) break;
            if (it == n) {
                if (tid == 0) pair_rest_in_order(mate, n);
                __syncthreads();
                break;
            }
            // This warp's groups whose choice was matched away choose again,
            // among the free groups (every such warp builds the whole mask).
            const int own = warp + kSimWarps * lane;
            const bool again = lane < NO && own < n && mate[own] == kNone && mate[best[own]] != kNone;
            uint32_t todo = __ballot_sync(kFull, again);
            if (todo) {
                __syncwarp();   // best[own] is read above and rewritten below, by other lanes
                uint32_t fm[NI];
                free_mask<n>(mate, fm, lane);
                while (todo) {
                    const int l = __ffs(todo) - 1;
                    todo &= todo - 1u;
                    const int v = warp + kSimWarps * l;
                    const int b = search<D, G, KW, S>(c, cm, gcost, v, fm, lane);
                    if (lane == 0) best[v] = static_cast<uint8_t>(b);
                }
            }
            __syncthreads();
        }
    }
    // New groups: pair (v, mate v) with v < mate, in the order of v (= order of
    // the smallest column, since groups are ordered by it); members of v first.
    const bool lead = tid < n && mate[tid] > tid;
    const uint32_t bal = __ballot_sync(kFull, lead);
    if (lane == 0) red[warp] = __popc(bal);
    __syncthreads();
    if (lead) {
        int rank = __popc(bal & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) rank += red[w];
        const int m = mate[tid];
#pragma unroll
        for (int i = 0; i < S; ++i) {
            nx[rank * 2 * S + i] = cm[tid * S + i];
            nx[rank * 2 * S + S + i] = cm[m * S + i];
        }
    }
    __syncthreads();
}

// G = 2, pair weights in the matrix: the first improving swap (index >= start)
// of groups a < b, or kNone. Swaps 0 (a0 <-> b0) and 3 (a1 <-> b1) leave the
// same two pairs, {a1, b0} and {a0, b1}; swaps 1 and 2 leave {a1, b1} and
// {a0, b0}: two sums decide all four (the core's na + nb < ca + cb).
template <int D, int G, bool KW>
__device__ __forceinline__ int eval_pair2(const Costs<D, G, KW>& c, const uint8_t* cm, const float* gcost, int a,
                                          int b, int start) {
    DA_COUNT(4);
    const int a0 = cm[2 * a], a1 = cm[2 * a + 1], b0 = cm[2 * b], b1 = cm[2 * b + 1];
    const float before = gcost[a] + gcost[b];
    const bool c0 = c.at(a1, b0) + c.at(a0, b1) < before;
    const bool c1 = c.at(a1, b1) + c.at(a0, b0) < before;
    if constexpr (Costs<D, G, KW>::kFold) {
        if (start == 0) return c0 ? 0 : c1 ? 1 : kNone;
        if (start <= 2) return c1 ? start : c0 ? 3 : kNone;
        return start == 3 && c0 ? 3 : kNone;
    } else {
        // (selects, no branches: callers interleave several evaluations)
        const int r0 = c0 ? 0 : c1 ? 1 : kNone;
        const int r12 = c1 ? start : c0 ? 3 : kNone;
        const int r3 = c0 ? 3 : kNone;
        return start == 0 ? r0 : start <= 2 ? r12 : r3;
    }
}

// G >= 4: does swapping a_x and b_y lower the summed cost of groups a, b?
template <int D, int G, bool KW>
__device__ __forceinline__ bool swap_improves(const Costs<D, G, KW>& c, const uint8_t* cm, const float* selfs,
                                              const float* gcost, int a, int b, int x, int y) {
    // (Members indexed by x and y are read from shared memory: no
    // run-time indexing of register arrays.)
    int ma[G], mb[G];
#pragma unroll
    for (int i = 0; i < G; ++i) {
        ma[i] = cm[a * G + i];
        mb[i] = cm[b * G + i];
    }
    const int ax = cm[a * G + x], by = cm[b * G + y];
    if constexpr (KW) {
        const float before = gcost[a] + gcost[b];
        int na[G], nb[G];
#pragma unroll
        for (int i = 0; i < G; ++i) {
            na[i] = i == x ? by : ma[i];
            nb[i] = i == y ? ax : mb[i];
        }
        return c.template group<G>(na) + c.template group<G>(nb) < before;
    } else {
        // Swapping a_x and b_y changes P(A) + P(B) by
        // [sum_{x' != x} D(a_x', b_y) + sum_{y' != y} D(a_x, b_y')] - [self(a_x) + self(b_y)].
        float l = 0.f;
#pragma unroll
        for (int i = 0; i < G; ++i)
            if (i != x) l += c.at(ma[i], by);
#pragma unroll
        for (int j = 0; j < G; ++j)
            if (j != y) l += c.at(ax, mb[j]);
        return l < selfs[ax] + selfs[by];
    }
}

// Lanes per pair (G >= 4): Similarity a lane per row x of the G x G swaps
// (its swap costs are sums of distances shared by rows and columns);
// KeyWeighted a lane per swap (two for G = 8: a swap costs two cluster costs).
template <int G, bool KW>
struct Team {
    static constexpr int T = KW ? (G * G < 32 ? G * G : 32) : G;
};

// G >= 4: a team of Team::T consecutive lanes evaluates the pair (a, b)
// (when `ok`): the first improving swap >= start, or kNone, in every lane of
// the team. All lanes of the warp call it.
template <int D, int G, bool KW>
__device__ __forceinline__ int eval_team(const Costs<D, G, KW>& c, const uint8_t* cm, const float* selfs,
                                         const float* gcost, int a, int b, int start, bool ok, int lane) {
    constexpr int T = Team<G, KW>::T;
    const int j = lane % T;
    if (ok && j == 0) DA_COUNT(4);
    if constexpr (!KW) {
        // Lane x: X[y] = D(a_x, b_y). Swapping a_x and b_y changes P(A) + P(B) by
        // (C[y] - X[y]) + (R - X[y]) - self(a_x) - self(b_y), with the row sum
        // R = sum_y X[y] and the column sums C[y] = sum_x' D(a_x', b_y) (a
        // butterfly over the team: the same value in every lane).
        const int ax = cm[a * G + j];
        int mb[G];
        float X[G], C[G];
        float R = 0.f;
#pragma unroll
        for (int y = 0; y < G; ++y) {
            mb[y] = cm[b * G + y];
            X[y] = ok ? c.at(ax, mb[y]) : 0.f;
            R += X[y];
            C[y] = X[y];
        }
#pragma unroll
        for (int off = 1; off < G; off *= 2)
#pragma unroll
            for (int y = 0; y < G; ++y) C[y] += __shfl_xor_sync(kFull, C[y], off);
        const float sa = selfs[ax];
        int first = kNone;
#pragma unroll
        for (int y = G - 1; y >= 0; --y) {
            const int idx = j * G + y;
            if (ok && idx >= start && (C[y] - X[y]) + (R - X[y]) < sa + selfs[mb[y]]) first = idx;
        }
#pragma unroll
        for (int off = 1; off < G; off *= 2) first = min(first, static_cast<int>(__shfl_xor_sync(kFull, first, off)));
        return first;
    } else {
        constexpr int PL = G * G / T;
        int first = kNone;
#pragma unroll 1
        for (int s = PL - 1; s >= 0; --s) {
            const int idx = j + s * T;
            const bool f = ok && idx >= start && swap_improves<D, G, KW>(c, cm, selfs, gcost, a, b, idx / G, idx % G);
            uint32_t bal = __ballot_sync(kFull, f);
            if constexpr (T < 32) bal = (bal >> (lane & ~(T - 1))) & ((1u << T) - 1u);
            if (bal) first = s * T + __ffs(bal) - 1;
        }
        return first;
    }
}

// Distances from column j to the other members of its group (Similarity, G >= 4).
template <int D, int G, bool KW>
__device__ __forceinline__ float self_sum(const Costs<D, G, KW>& c, const uint8_t* cm, const uint8_t* pos, int j) {
    const int a = pos[j] / G;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < G; ++i) {
        const int m = cm[a * G + i];
        if (m != j) acc += c.at(j, m);
    }
    return acc;
}

// After group grp changed: its cost (G = 2, KeyWeighted; i == 0 does it) or
// the self distance of its i-th member (Similarity, G >= 4).
template <int D, int G, bool KW>
__device__ __forceinline__ void refresh_group(const Costs<D, G, KW>& c, const uint8_t* cm, const uint8_t* pos,
                                              float* selfs, float* gcost, int grp, int i) {
    if constexpr (G == 2) {
        if (i == 0) gcost[grp] = c.at(cm[2 * grp], cm[2 * grp + 1]);
    } else if constexpr (KW) {
        if (i == 0) gcost[grp] = c.template group_at<G>(cm, grp);
    } else {
        const int j = cm[grp * G + i];
        selfs[j] = self_sum<D, G, KW>(c, cm, pos, j);
    }
}

// Records the first improving swap r of pair p: first[p] and p's bit of imp.
__device__ __forceinline__ void record(uint8_t* first, uint32_t* imp, int p, int r) {
    first[p] = static_cast<uint8_t>(r);
    if (r != kNone) {
        atomicOr(&imp[p >> 5], 1u << (p & 31));
    } else {
        atomicAnd(&imp[p >> 5], ~(1u << (p & 31)));
    }
}

// Every pair from swap 0 (imp starts cleared). G = 2: the rows a and n - 2 - a
// of the pair triangle together hold n pairs; 512 / n threads share such a
// folded row, a run of slots each, no decoding. G >= 4: teams over the pairs.
template <int D, int G, bool KW>
__device__ __forceinline__ void full_pass(const Costs<D, G, KW>& c, const uint8_t* cm, const float* selfs,
                                          const float* gcost, uint32_t* imp, uint8_t* first, uint16_t* pairs,
                                          int tid) {
    constexpr int n = D / G, NP = n * (n - 1) / 2;
    if constexpr (G == 2 && !Costs<D, G, KW>::kFold) {
        // Row fr holds the pairs (fr, fr + 1 + s) for s < n - 1 - fr, row
        // n - 2 - fr the pairs (n - 2 - fr, s) for s >= n - 1 - fr (fr < H - 1);
        // both groups a, their members and costs are read once, and p = base + s.
        constexpr int H = n / 2, TPF = kSimThreads / H, CH = (n + TPF - 1) / TPF;
        const int fr = tid / TPF, seg = tid % TPF;
        const int alo = fr, ahi = n - 2 - fr;
        const uint16_t* cm2 = reinterpret_cast<const uint16_t*>(cm);
        const int mlo = cm2[alo], mhi = cm2[ahi];
        const float glo = gcost[alo], ghi = gcost[ahi];
        const int plo = pair_index(alo, alo + 1, n), phi = pair_index(ahi, ahi + 1, n) - (ahi + 1);
#pragma unroll
        for (int k = 0; k < CH; ++k) {
            const int s = seg * CH + k;
            const bool lower = s < n - 1 - fr;
            if (s < n && (lower || fr < H - 1)) {
                DA_COUNT(4);
                const int a = lower ? alo : ahi, b = lower ? fr + 1 + s : s;
                const int ma = lower ? mlo : mhi, mb = cm2[b];
                const int a0 = ma & 0xff, a1 = ma >> 8, b0 = mb & 0xff, b1 = mb >> 8;
                const float before = (lower ? glo : ghi) + gcost[b];
                // (eval_pair2 from swap 0)
                const bool c0 = c.at(a1, b0) + c.at(a0, b1) < before;
                const bool c1 = c.at(a1, b1) + c.at(a0, b0) < before;
                const int r = c0 ? 0 : c1 ? 1 : kNone;
                const int p = (lower ? plo : phi) + s;
                first[p] = static_cast<uint8_t>(r);
                pairs[p] = static_cast<uint16_t>(a | b << 8);
                if (r != kNone) atomicOr(&imp[p >> 5], 1u << (p & 31));
            }
        }
    } else if constexpr (G == 2) {
        // (the folded matrix: v4's form)
        constexpr int H = n / 2, TPF = kSimThreads / H, CH = (n + TPF - 1) / TPF;
        const int fr = tid / TPF, seg = tid % TPF;
#pragma unroll
        for (int k = 0; k < CH; ++k) {
            const int s = seg * CH + k;
            const bool lower = s < n - 1 - fr;   // row fr, else row n - 2 - fr (fr < H - 1)
            if (s < n && (lower || fr < H - 1)) {
                const int a = lower ? fr : n - 2 - fr, b = lower ? fr + 1 + s : s;
                const int r = eval_pair2<D, G, KW>(c, cm, gcost, a, b, 0);
                const int p = pair_index(a, b, n);
                first[p] = static_cast<uint8_t>(r);
                pairs[p] = static_cast<uint16_t>(a | b << 8);
                if (r != kNone) atomicOr(&imp[p >> 5], 1u << (p & 31));
            }
        }
    } else {
        constexpr int T = Team<G, KW>::T, NT = kSimThreads / T;
        const int lane = tid & 31, team = tid / T;
        for (int base = 0; base < NP; base += NT) {
            const int p = base + team;
            const bool has = p < NP;
            if (!__any_sync(kFull, has)) break;
            int a = 0, b = 1;
            if (has) pair_of(p, n, a, b);
            const int r = eval_team<D, G, KW>(c, cm, selfs, gcost, a, b, 0, has, lane);
            if (has && lane % T == 0) {
                first[p] = static_cast<uint8_t>(r);
                pairs[p] = static_cast<uint16_t>(a | b << 8);
                if (r != kNone) atomicOr(&imp[p >> 5], 1u << (p & 31));
            }
        }
    }
}

// The pairs whose bit is set in `stale` from swap 0 again (stale is cleared
// by the caller after a barrier).
template <int D, int G, bool KW>
__device__ __forceinline__ void eval_stale(const Costs<D, G, KW>& c, const uint8_t* cm, const float* selfs,
                                           const float* gcost, const uint32_t* stale, uint32_t* imp, uint8_t* first,
                                           const uint16_t* pairs, int tid) {
    constexpr int n = D / G, NP = n * (n - 1) / 2;
    if constexpr (G == 2) {
        // A thread per word of the mask (stale pairs are few: those the last pass took).
        constexpr int NW = (NP + 31) / 32;
        for (int wi = tid; wi < NW; wi += kSimThreads) {
            uint32_t bits = stale[wi];
            while (bits) {
                const int p = 32 * wi + __ffs(bits) - 1;
                bits &= bits - 1u;
                const int ab = pairs[p];
                record(first, imp, p, eval_pair2<D, G, KW>(c, cm, gcost, ab & 0xff, ab >> 8, 0));
            }
        }
    } else {
        constexpr int T = Team<G, KW>::T, NT = kSimThreads / T;
        const int lane = tid & 31, team = tid / T;
        for (int base = 0; base < NP; base += NT) {
            const int p = base + team;
            const bool has = p < NP && ((stale[p >> 5] >> (p & 31)) & 1u);
            if (!__any_sync(kFull, has)) continue;
            const int ab = has ? pairs[p] : 1 << 8;
            const int r = eval_team<D, G, KW>(c, cm, selfs, gcost, ab & 0xff, ab >> 8, 0, has, lane);
            if (has && lane % T == 0) record(first, imp, p, r);
        }
    }
}

// The t-th of the 2n - 3 pairs that contain group a or bb (a < bb): (a, x) for
// x != a, then (bb, x) for x not in {a, bb}.
__device__ __forceinline__ void touched_pair(int t, int a, int bb, int n, int& pa, int& pb) {
    int g, x;
    if (t < n - 1) {
        g = a;
        x = t < a ? t : t + 1;
    } else {
        const int u = t - (n - 1);
        g = bb;
        x = u < a ? u : u + 1 < bb ? u + 1 : u + 2;
    }
    pa = min(g, x);
    pb = max(g, x);
}

// G >= 4 (a pair evaluation is dear; a pair touched twice in a pass is
// evaluated once): the pairs that contain a or bb in two lists, `before` the
// pair (a, bb) in scan order and `after` it, (a, bb) itself first in `after`.
// before: (a', a) and (a', bb) for a' < a, (a, b') for a < b' < bb;
// after: (a, bb), (a, b') and (bb, b') for b' > bb, (a', bb) for a < a' < bb.
__device__ __forceinline__ int before_pair(int t, int a, int bb, int n) {
    const int nM = bb - a - 1;
    if (t < a) return pair_index(t, a, n);
    if (t < 2 * a) return pair_index(t - a, bb, n);
    if (t < 2 * a + nM) return pair_index(a, a + 1 + (t - 2 * a), n);
    return pair_index(a, bb, n);
}
__device__ __forceinline__ void after_pair(int t, int a, int bb, int n, int& pa, int& pb) {
    const int nA = n - 1 - bb, nM = bb - a - 1;
    if (t == 0) {
        pa = a;
        pb = bb;
    } else if (t <= nA) {
        pa = a;
        pb = bb + t;
    } else if (t <= nA + nM) {
        pa = a + (t - nA);
        pb = bb;
    } else {
        pa = bb;
        pb = bb + (t - nA - nM);
    }
}

// The next pair at or after pstart with an improving swap, or -1 (one warp).
template <int NW>
__device__ __forceinline__ int next_pair(const uint32_t* imp, int pstart, int lane) {
    const int w0 = pstart >> 5;
    for (int wb = w0; wb < NW; wb += 32) {
        const int w = wb + lane;
        uint32_t bits = w < NW ? imp[w] : 0u;
        if (w == w0) bits &= kFull << (pstart & 31);
        const uint32_t bal = __ballot_sync(kFull, bits != 0u);
        if (bal) {
            const int src = __ffs(bal) - 1;
            const uint32_t wbits = __shfl_sync(kFull, bits, src);
            return ((wb + src) << 5) + __ffs(wbits) - 1;
        }
    }
    return -1;
}

// G = 2 with the whole matrix: the refinement's passes after the full pass in
// one warp (the CTA-wide loop's steps with __syncwarp for its barriers; the
// other warps are done): at a pass start the pairs the last pass took are
// evaluated again from swap 0; the next pair in scan order with an improving
// swap is found from the mask and its first improving swap applied; then
// every pair that contains one of its two groups is evaluated again from swap
// 0 (the pair itself from the next swap on: the scan goes on inside it).
template <int D, int G, bool KW>
__device__ void refine_warp2(const Costs<D, G, KW>& c, uint8_t* cm, float* gcost, uint32_t* imp, uint32_t* stale,
                             uint8_t* first, const uint16_t* pairs, int lane) {
    static_assert(G == 2, "refine_warp2");
    constexpr int n = D / G, NP = n * (n - 1) / 2, NW = (NP + 31) / 32;
    for (int pass = 0; pass < 8; ++pass) {
        if (lane == 0) DA_COUNT(7);
        if (pass > 0) {
            for (int wi = lane; wi < NW; wi += 32) {
                uint32_t bits = stale[wi];
                stale[wi] = 0u;
                while (bits) {
                    const int p = 32 * wi + __ffs(bits) - 1;
                    bits &= bits - 1u;
                    const int ab = pairs[p];
                    record(first, imp, p, eval_pair2<D, G, KW>(c, cm, gcost, ab & 0xff, ab >> 8, 0));
                }
            }
            __syncwarp();
        }
        bool improved = false;
        int pstart = 0;
        while (true) {
            const int qp = next_pair<NW>(imp, pstart, lane);
            if (qp < 0) break;
            if (lane == 0) DA_COUNT(6);
            improved = true;
            const int idx = first[qp];
            const int ab = pairs[qp];   // (decoded by the full pass)
            const int a = ab & 0xff, bb = ab >> 8;
            __syncwarp();   // (first, imp and cm read by every lane before they change)
            if (lane == 0) {
                const int x = idx / G, y = idx % G;
                const int ca = cm[a * G + x], cbm = cm[bb * G + y];
                cm[a * G + x] = static_cast<uint8_t>(cbm);
                cm[bb * G + y] = static_cast<uint8_t>(ca);
                stale[qp >> 5] |= 1u << (qp & 31);
            }
            __syncwarp();
            if (lane < 2) {
                const int g = lane ? bb : a;
                gcost[g] = c.at(cm[2 * g], cm[2 * g + 1]);
            }
            __syncwarp();
            // (all evaluations of a lane before its records: independent loads)
            constexpr int total = 2 * n - 3, IT = (total + 31) / 32;
            int pp[IT], r[IT];
#pragma unroll
            for (int i = 0; i < IT; ++i) {
                // (branch-free: lanes past the end evaluate the last pair, not recorded)
                const int t = min(lane + 32 * i, total - 1);
                int pa, pb;
                touched_pair(t, a, bb, n, pa, pb);
                pp[i] = pair_index(pa, pb, n);
                const int st = pp[i] == qp ? idx + 1 : 0;
                const int e = eval_pair2<D, G, KW>(c, cm, gcost, pa, pb, min(st, 3));
                r[i] = st < 4 ? e : kNone;
            }
#pragma unroll
            for (int i = 0; i < IT; ++i)
                if (lane + 32 * i < total) record(first, imp, pp[i], r[i]);
            __syncwarp();
            pstart = qp;
        }
        if (!improved) break;
    }
}

template <typename T, int D, int G, bool KW>
__device__ void simplan_body(const SimPlanParams& p, unsigned char* smem) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nh = p.head_map_len > 0 ? p.head_map_len : p.heads;
    // (32-bit index arithmetic: the grid is below 2^31 blocks)
    const uint32_t unit = blockIdx.x;
    const int blk = static_cast<int>(unit % static_cast<uint32_t>(p.num_blocks));
    const uint32_t bh = unit / static_cast<uint32_t>(p.num_blocks);
    const int hi = static_cast<int>(bh % static_cast<uint32_t>(nh));
    const int h = p.head_map_len > 0 ? p.head_map[hi] : hi;
    const long long b = bh / static_cast<uint32_t>(nh);
    uint16_t* out = p.plan + ((b * p.heads + h) * p.num_blocks + blk) * D;
    if constexpr (G == 1) {
        for (int j = tid; j < D; j += kSimThreads) out[j] = static_cast<uint16_t>(j);
        return;
    } else {
        using Tr = SimTraits<D, G>;
        using C = Costs<D, G, KW>;
        T* qs = reinterpret_cast<T*>(smem + Tr::kOffMat);
        float* mat = reinterpret_cast<float*>(smem + Tr::kOffMat);
        float* diag = reinterpret_cast<float*>(smem + Tr::kOffDiag);
        float* kdiag = reinterpret_cast<float*>(smem + Tr::kOffKDiag);
        float* selfs = reinterpret_cast<float*>(smem + Tr::kOffSelf);
        float* gcost = reinterpret_cast<float*>(smem + Tr::kOffCost);
        uint32_t* red = reinterpret_cast<uint32_t*>(smem + Tr::kOffRed);
        uint32_t* vote = reinterpret_cast<uint32_t*>(smem + Tr::kOffVote);
        int* ctl = reinterpret_cast<int*>(smem + Tr::kOffRed + 32);
        uint8_t* cur = smem + Tr::kOffCur;
        uint8_t* pos = smem + Tr::kOffPos;
        uint8_t* mate = smem + Tr::kOffMate;
        uint8_t* best = smem + Tr::kOffBest;
        uint32_t* imp = reinterpret_cast<uint32_t*>(smem + Tr::kOffImp);
        uint32_t* stale = reinterpret_cast<uint32_t*>(smem + Tr::kOffStale);
        uint8_t* first = smem + Tr::kOffFirst;
        uint16_t* pairs = reinterpret_cast<uint16_t*>(smem + Tr::kOffPairs);
        const float* gk = nullptr;
        if constexpr (KW) gk = p.gk + (b * p.kv_heads + h / p.heads_per_kv) * D * D;

        // ---- Q block -> shared memory, row-major (rows up to a multiple of 16, zero-filled) ----
        const int row0 = blk * p.block_rows;
        const int rows = min(p.block_rows, p.q_len - row0);
        const int kend = (rows + 15) & ~15;
        {
            constexpr int QD = D / 4;                  // 4-element quads per row
            constexpr int RS = kSimThreads / QD;       // rows per step
            const int c4 = tid % QD, r0 = tid / QD;
            const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride +
                         static_cast<long long>(row0 + r0) * p.q_row_stride + static_cast<long long>(h) * p.q_head_stride +
                         4 * c4;
            const long long step = static_cast<long long>(RS) * p.q_row_stride;
            for (int r = r0; r < kend; r += RS, q += step) {
                uint2 v = make_uint2(0u, 0u);
                if (r < rows) v = __ldg(reinterpret_cast<const uint2*>(q));
                *reinterpret_cast<uint2*>(qs + r * Tr::kQP + 4 * c4) = v;
            }
        }
        for (int j = tid; j < D; j += kSimThreads) {
            cur[j] = static_cast<uint8_t>(j);
            if constexpr (KW) kdiag[j] = __ldg(gk + j * D + j);
        }
        __syncthreads();

        // ---- Gram (band tiles) -> the folded matrix ----
        {
            constexpr int PW = Band<D>::PW;
            float acc[PW][2][4];
#pragma unroll
            for (int s = 0; s < PW; ++s)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[s][nt][e] = 0.f;
            gram_band<T, D, Tr::kQP>(acc, qs, kend, warp, lane);
            store_diag<D>(acc, warp, lane, diag);
            __syncthreads();   // Q is read by all warps before the matrix overwrites it
            store_band<D, Tr::kFold>(acc, warp, lane, mat, diag, [&](int r, int cc, float v, float drr, float dcc) {
                if constexpr (C::kDist) {
                    // The pair weight (Similarity: the distance (Gq_rr + Gq_cc) - 2 Gq_rc,
                    // never -0; KeyWeighted: the core's pair_cost).
                    const float dq = __fmaf_rn(-2.f, v, drr + dcc);   // (2 Gq_rc is exact)
                    if constexpr (KW) {
                        const float dk = kdiag[r] + kdiag[cc] - 2.f * __ldg(gk + r * D + cc);
                        return tidy(dq * dk / 4.f);
                    } else {
                        return fminf(dq, INFINITY);   // NaN -> +inf
                    }
                } else {
                    return v;
                }
            });
            // The diagonal of the whole matrix: pair weights NaN (never chosen), else Gq's.
            if constexpr (!Tr::kFold)
                for (int j = tid; j < D; j += kSimThreads) mat[j * Tr::kMP + j] = C::kDist ? NAN : diag[j];
        }
        __syncthreads();
        const C c{mat, gk, kdiag, diag};

        // ---- greedy rounds ----
        greedy_round<D, G, KW, 1>(c, cur, cur + D, gcost, mate, best, red, vote, tid);
        uint8_t* cm = cur + D;
        if constexpr (G >= 4) {
            greedy_round<D, G, KW, 2>(c, cur + D, cur, gcost, mate, best, red, vote, tid);
            cm = cur;
        }
        if constexpr (G >= 8) {
            greedy_round<D, G, KW, 4>(c, cur, cur + D, gcost, mate, best, red, vote, tid);
            cm = cur + D;
        }

        // ---- refinement ----
        // first[p]: the first improving swap of pair p from swap 0 in the
        // current state, except for the pairs marked stale (evaluated from 0
        // at the next pass's start): G = 2 the pairs the pass took (evaluated
        // from their swap + 1), G >= 4 also the pairs before the scan position
        // whose groups changed.
        constexpr int n = Tr::n, NW = Tr::NW;
        for (int j = tid; j < D; j += kSimThreads) pos[cm[j]] = static_cast<uint8_t>(j);
        for (int w = tid; w < NW; w += kSimThreads) {
            stale[w] = 0u;
            imp[w] = 0u;
        }
        __syncthreads();
        for (int i = tid; i < D; i += kSimThreads) refresh_group<D, G, KW>(c, cm, pos, selfs, gcost, i / G, i % G);
        __syncthreads();
        full_pass<D, G, KW>(c, cm, selfs, gcost, imp, first, pairs, tid);
        if constexpr (G == 2 && !C::kFold) {
            // The passes in warp 0 (no CTA barriers; the other warps are done).
            __syncthreads();
            if (warp == 0) {
                refine_warp2<D, G, KW>(c, cm, gcost, imp, stale, first, pairs, lane);
                for (int j = lane; j < D; j += 32) out[j] = cm[j];
            }
        } else {
            for (int pass = 0; pass < 8; ++pass) {
                if (tid == 0) DA_COUNT(7);
                if (pass > 0) eval_stale<D, G, KW>(c, cm, selfs, gcost, stale, imp, first, pairs, tid);
                __syncthreads();
                for (int w = tid; w < NW; w += kSimThreads) stale[w] = 0u;
                bool improved = false;
                int pstart = 0;
                while (true) {
                    // The next swap the core's scan applies: the first pair from
                    // pstart on with an improving swap (its first one). Warp 0
                    // finds and applies it.
                    if (warp == 0) {
                        const int qp = next_pair<NW>(imp, pstart, lane);
                        if (qp >= 0) {
                            const int idx = first[qp];
                            const int ab = pairs[qp];   // (decoded by the full pass)
                            const int a = ab & 0xff, bb = ab >> 8;
                            const int x = idx / G, y = idx % G;
                            if (lane == 0) {
                                const int ca = cm[a * G + x], cbm = cm[bb * G + y];
                                cm[a * G + x] = static_cast<uint8_t>(cbm);
                                cm[bb * G + y] = static_cast<uint8_t>(ca);
                                pos[cbm] = static_cast<uint8_t>(a * G + x);
                                pos[ca] = static_cast<uint8_t>(bb * G + y);
                                if (G == 2) stale[qp >> 5] |= 1u << (qp & 31);
                                ctl[1] = idx;
                                ctl[2] = a;
                                ctl[3] = bb;
                            }
                            __syncwarp();
                            if (lane < 2 * G) refresh_group<D, G, KW>(c, cm, pos, selfs, gcost, lane < G ? a : bb, lane % G);
                        }
                        if (lane == 0) ctl[0] = qp;
                    }
                    __syncthreads();
                    const int qp = ctl[0];
                    if (qp < 0) break;
                    if (tid == 0) DA_COUNT(6);
                    improved = true;
                    const int idx = ctl[1], a = ctl[2], bb = ctl[3];
                    if constexpr (G == 2) {
                        // Every pair that contains a or bb, now: from swap 0, except qp
                        // itself (the scan goes on inside it from idx + 1).
                        constexpr int total = 2 * n - 3;
                        for (int t = tid; t < total; t += kSimThreads) {
                            int pa, pb;
                            touched_pair(t, a, bb, n, pa, pb);
                            const int pp = pair_index(pa, pb, n);
                            const int st = pp == qp ? idx + 1 : 0;
                            record(first, imp, pp, st < 4 ? eval_pair2<D, G, KW>(c, cm, gcost, pa, pb, st) : kNone);
                        }
                    } else {
                        // The pairs before qp that contain a or bb: at the next pass's
                        // start; those after it (and qp from idx + 1): now.
                        const int nA = n - 1 - bb, nM = bb - a - 1;
                        const int nbefore = 2 * a + nM + 1, total = 1 + 2 * nA + nM;
                        for (int t = tid; t < nbefore; t += kSimThreads) {
                            const int pp = before_pair(t, a, bb, n);
                            atomicOr(&stale[pp >> 5], 1u << (pp & 31));
                        }
                        constexpr int TT = Team<G, KW>::T, NTM = kSimThreads / TT;
                        const int team = tid / TT;
                        for (int base = 0; base < total; base += NTM) {
                            const int t = base + team;
                            const bool has = t < total;
                            if (!__any_sync(kFull, has)) break;
                            int pa = 0, pb = 1;
                            if (has) after_pair(t, a, bb, n, pa, pb);
                            const int st = t == 0 ? idx + 1 : 0;
                            const int r = eval_team<D, G, KW>(c, cm, selfs, gcost, pa, pb, st, has, lane);
                            if (has && lane % TT == 0) record(first, imp, pair_index(pa, pb, n), r);
                        }
                    }
                    __syncthreads();
                    pstart = qp;
                }
                if (!improved) break;
            }
            for (int j = tid; j < D; j += kSimThreads) out[j] = cm[j];
        }
    }
}

// Centred Gram of the keys of one (batch, KV head), the core's key_gram:
// x = k - mu~ (mu~: the mean of the first 64 keys rounded to bf16, so x is
// exact in f32), split x = hi + lo into bf16 parts, G' = hi hi^T + hi lo^T
// + lo hi^T with mma.sync, s = sum of x; Gk = G' - s s^T / M.
constexpr int kKTile = 64;
template <int D>
struct KGramTraits {
    static constexpr int kKP = kKTile + 8;   // pitch (elements) of the transposed tiles
    static constexpr int kOffHi = 0;
    static constexpr int kOffLo = D * kKP * 2;
    static constexpr int kOffMu = kOffLo + D * kKP * 2;
    static constexpr int kOffSum = kOffMu + 4 * D;   // [1024 / D row slices][D] partial column sums
    static constexpr int kSmem = kOffSum + 4 * 1024;
};

template <typename T, int D>
__device__ void kgram_body(const KGramParams& p, unsigned char* smem) {
    using Tr = KGramTraits<D>;
    using B16 = __nv_bfloat16;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hk = static_cast<int>(blockIdx.x % p.kv_heads);
    const long long b = blockIdx.x / p.kv_heads;
    const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + static_cast<long long>(hk) * p.k_head_stride;
    B16* hi = reinterpret_cast<B16*>(smem + Tr::kOffHi);
    B16* lo = reinterpret_cast<B16*>(smem + Tr::kOffLo);
    float* mu = reinterpret_cast<float*>(smem + Tr::kOffMu);
    float* psum = reinterpret_cast<float*>(smem + Tr::kOffSum);
    const int M = p.kv_len;
    // mu~: mean of the first keys (in order), rounded to bf16.
    if (tid < D) {
        const int m0 = min(M, kKTile);
        float s = 0.f;
        for (int r = 0; r < m0; ++r) s += Num<T>::to_float(k[static_cast<long long>(r) * p.k_row_stride + tid]);
        mu[tid] = __bfloat162float(__float2bfloat16_rn(s / m0));
    }
    __syncthreads();
    constexpr int NB = D / 16, NT = NB * (NB + 1) / 2, PW = (NT + kSimWarps - 1) / kSimWarps;
    float acc[PW][2][4];
#pragma unroll
    for (int s = 0; s < PW; ++s)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[s][nt][e] = 0.f;
    // Load mapping: a warp covers 8 keys x 16 columns; each thread keeps the
    // same 4 columns (so its partial column sums have a fixed order).
    constexpr int CB = D / 16;                 // column blocks
    constexpr int WPC = kSimWarps / CB;        // warps per column block (1, 2 or 4)
    const int cbk = warp % CB, wr = warp / CB;
    const int c4 = cbk * 4 + lane % 4;         // column quad
    float csum[4] = {0.f, 0.f, 0.f, 0.f};
    for (int m0 = 0; m0 < M; m0 += kKTile) {
        for (int rb = wr; rb < kKTile / 8; rb += WPC) {
            const int r = rb * 8 + lane / 4;
            float x[4] = {0.f, 0.f, 0.f, 0.f};
            if (m0 + r < M) {
                const uint2 v =
                    __ldg(reinterpret_cast<const uint2*>(k + static_cast<long long>(m0 + r) * p.k_row_stride + 4 * c4));
                const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
                for (int i = 0; i < 4; ++i) x[i] = Num<T>::to_float(e[i]) - mu[4 * c4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const B16 h = __float2bfloat16_rn(x[i]);
                const B16 l = __float2bfloat16_rn(x[i] - __bfloat162float(h));
                hi[(4 * c4 + i) * Tr::kKP + r] = h;
                lo[(4 * c4 + i) * Tr::kKP + r] = l;
                csum[i] += x[i];
            }
        }
        __syncthreads();
        gram_tiles<B16, D, true, Tr::kKP>(acc, hi, lo, kKTile, warp, lane);
        __syncthreads();
    }
    // Column sums: reduce the 8 row slices of each column in a fixed order.
#pragma unroll
    for (int i = 0; i < 4; ++i) psum[(wr * 8 + lane / 4) * D + 4 * c4 + i] = csum[i];
    __syncthreads();
    if (tid < D) {
        float s = 0.f;
        for (int sl = 0; sl < 8 * WPC; ++sl) s += psum[sl * D + tid];
        mu[tid] = s;   // mu now holds the column sums of x
    }
    __syncthreads();
    float* out = p.gk + (b * p.kv_heads + hk) * D * D;
    const float inv_m = 1.f / static_cast<float>(M);
    store_sym<D>(acc, warp, lane, [&](int r, int c, float v) {
        const float g = v - mu[r] * mu[c] * inv_m;
        out[r * D + c] = g;
        out[c * D + r] = g;
    });
}

}  // namespace da

#define DA_SIM_CAT_(a, b) a##b
#define DA_SIM_CAT(a, b) DA_SIM_CAT_(a, b)

#ifdef DA_EMULATE
#define DA_SMEM_PTR da_emu_smem()
#else
#define DA_SMEM_PTR da_smem_
extern __shared__ __align__(16) unsigned char da_smem_[];
#endif

// da_simplan_<dtype>_d<D>_g<G>_<sim|kw> and its dynamic shared-memory size
// da_simplan_..._smem (read by the driver); da_kgram_<dtype>_d<D> likewise.
// CTAs per SM the register budget is cut for: 3 for key-weighted G = 8
// (cluster costs of 8) and where the whole matrix at D = 128 allows only 3,
// 4 otherwise (the folded matrix would allow 5).
#define DA_SIMPLAN(DT, T, D, G, KW, MODE)                                                                  \
    extern "C" __global__ void __launch_bounds__(da::kSimThreads,                                          \
                                                 (KW && G == 8) || (D == 128 && !da::Fold<D, G>::value) ? 3 : 4) \
        da_simplan_##DT##_d##D##_g##G##_##MODE(const SimPlanParams p) {                                    \
        da::simplan_body<T, D, G, KW>(p, DA_SMEM_PTR);                                                     \
    }                                                                                                      \
    extern "C" __device__ int da_simplan_##DT##_d##D##_g##G##_##MODE##_smem = G == 1 ? 0 : da::SimTraits<D, G>::kSmem;

#define DA_KGRAM(DT, T, D)                                                                               \
    extern "C" __global__ void __launch_bounds__(da::kSimThreads) da_kgram_##DT##_d##D(const KGramParams p) { \
        da::kgram_body<T, D>(p, DA_SMEM_PTR);                                                            \
    }                                                                                                    \
    extern "C" __device__ int da_kgram_##DT##_d##D##_smem = da::KGramTraits<D>::kSmem;

#define DA_SIMPLAN_ALL(DT, T, D)         \
    DA_SIMPLAN(DT, T, D, 1, false, sim)  \
    DA_SIMPLAN(DT, T, D, 2, false, sim)  \
    DA_SIMPLAN(DT, T, D, 4, false, sim)  \
    DA_SIMPLAN(DT, T, D, 8, false, sim)  \
    DA_SIMPLAN(DT, T, D, 2, true, kw)    \
    DA_SIMPLAN(DT, T, D, 4, true, kw)    \
    DA_SIMPLAN(DT, T, D, 8, true, kw)    \
    DA_KGRAM(DT, T, D)

#ifndef DA_SIMPLAN_DIM
#define DA_SIMPLAN_DIM 128
#endif
#if DA_DTYPE_IS_BF16
DA_SIMPLAN_ALL(bf16, __nv_bfloat16, DA_SIMPLAN_DIM)
#else
DA_SIMPLAN_ALL(f16, __half, DA_SIMPLAN_DIM)
#endif
