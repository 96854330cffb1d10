// Similarity (and key-weighted) grouping plans on the GPU: the core's
// GroupingMode::Similarity / KeyWeighted plan (core/src/grouping.rs,
// similarity_groups + refine) computed per (batch, head, query block) in f32.
//
// One CTA (8 warps) per block of block_rows query rows:
//   load     Q block -> shared memory, transposed (Qt[col][row], rows zero-padded to 16);
//   Gram     Gq = Qt Qt^T with mma.sync (bf16/f16 products are exact in f32,
//            f32 accumulation); only the upper 16x16 tiles are computed and
//            mirrored, so the matrix is exactly symmetric;
//   Similarity: the matrix stored is the squared column distances
//            D[i][j] = Gq_ii + Gq_jj - 2 Gq_ij (written straight from the mma
//            accumulators). Every cost of the core is a sum of distances: the
//            error of a group X is P(X)/|X| with P(X) = sum of D over its pairs.
//   greedy   while groups are smaller than G: merge disjoint pairs of groups
//            in increasing order of (added cost, a, b). The core sorts all
//            pairs and takes each pair whose groups are both free; that is
//            the unique greedy matching of a strict total order, which the
//            locally-dominant rounds below compute in parallel: every free
//            group finds its cheapest free partner; mutual choices are
//            matched (they are exactly the pairs the sequential scan takes);
//            repeat. Only groups whose choice was matched away search again,
//            over a compacted list of the free groups, all threads sharing
//            the searches. Merged groups keep the core's member order and are
//            ordered by their smallest column.
//   refine   the core's local search (at most 8 passes; in a pass, pairs of
//            groups a < b, then positions x, y of the swapped columns, in
//            order; a swap is applied as soon as it lowers the summed cost).
//            Sequential in the core; here every (pair of groups) is
//            evaluated at once against the current state and the first
//            improving swap in scan order is taken; after a swap only the
//            pairs that contain one of the two changed groups (and follow it
//            in the scan) are evaluated again, and those before it are
//            marked for the next pass. The result is the core's.
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

template <int D>
struct SimTraits {
    static constexpr int kLP = kMaxRows + 8;   // Qt pitch (elements): conflict-free fragment loads
    static constexpr int kGP = D + 1;          // f32 matrix pitch
    static constexpr int align16(int x) { return (x + 15) / 16 * 16; }
    static constexpr int kQtBytes = D * kLP * 2;
    static constexpr int kMatBytes = D * kGP * 4;
    static constexpr int kOffMat = 0;          // Qt, then the matrix, in one region
    static constexpr int kOffVec = align16(kQtBytes > kMatBytes ? kQtBytes : kMatBytes);
    // f32 vectors of D: diagonal, per-column sums inside its group, per-group cost
    static constexpr int kOffDiag = kOffVec;
    static constexpr int kOffSelf = kOffDiag + 4 * D;
    static constexpr int kOffCost = kOffSelf + 4 * D;
    static constexpr int kOffRed = kOffCost + 4 * D;            // 2 x 8 u32 (+ 8 counts)
    static constexpr int kOffCur = kOffRed + 96;                // u8 [2][D] members
    static constexpr int kOffPos = kOffCur + 2 * D;             // u8 [D] column -> position
    static constexpr int kOffMate = kOffPos + D;                // u8 [D]
    static constexpr int kOffBest = kOffMate + D;               // u8 [D]
    static constexpr int kMaxPairs = (D / 2) * (D / 2 - 1) / 2;
    static constexpr int kOffLists = kOffBest + D;              // u8 [2][D] matching scratch
    static constexpr int kOffFirst = kOffLists + 2 * D;         // u8 [pairs of groups]
    static constexpr int kOffStale = kOffFirst + kMaxPairs;     // u8 [pairs of groups]
    static constexpr int kSmem = align16(kOffStale + kMaxPairs);
};

// Total order of f32 as u32 (f64::total_cmp's order on the bits).
__device__ __forceinline__ uint32_t ord_f32(float w) {
    const uint32_t u = __float_as_uint(w);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

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
// product is hi hi^T + hi lo^T + lo hi^T.
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

// Writes the owned tiles of a symmetric matrix (upper part computed) to
// out[row * pitch + col] and its mirror, with f(row, col, value) applied.
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

// The matrices a block's decisions read: Similarity: distances in `m`;
// KeyWeighted: Gq in `m` and Gk in global memory.
template <int D, bool KW>
struct Costs {
    static constexpr int P = D + 1;
    const float* m;
    const float* gk;   // [D][D], KeyWeighted only

    __device__ __forceinline__ float at(int a, int b) const { return m[a * P + b]; }
    __device__ __forceinline__ float k_at(int a, int b) const { return __ldg(gk + a * D + b); }

    // The core's pair_cost (KeyWeighted): |q_a - q_b|^2 |k_a - k_b|^2 / 4.
    __device__ __forceinline__ float kw_pair(int a, int b) const {
        const float dq = at(a, a) + at(b, b) - 2.f * at(a, b);
        const float dk = k_at(a, a) + k_at(b, b) - 2.f * k_at(a, b);
        return dq * dk / 4.f;
    }

    // The core's cluster_cost (KeyWeighted), members in order.
    template <int S>
    __device__ __forceinline__ float kw_cluster(const int (&mem)[S]) const {
        float r[S];
#pragma unroll
        for (int x = 0; x < S; ++x) {
            float acc = 0.f;
#pragma unroll
            for (int a = 0; a < S; ++a) acc += at(mem[a], mem[x]);
            r[x] = acc / (float)S;
        }
        float mm = 0.f;
#pragma unroll
        for (int x = 0; x < S; ++x) mm += r[x];
        mm /= (float)S;
        float cost = 0.f;
#pragma unroll
        for (int x = 0; x < S; ++x)
#pragma unroll
            for (int y = 0; y < S; ++y)
                cost += (at(mem[x], mem[y]) - r[x] - r[y] + mm) * k_at(mem[x], mem[y]);
        return cost;
    }

    // Cost of a group of S members: KeyWeighted: the core's group_cost;
    // Similarity: P(X), the sum of distances over its pairs (|X| times the core's cost).
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
};

// Added cost of merging groups lo < hi of size S (members cm[v*S..]),
// computed in the same order for (lo, hi) whichever thread asks, so that
// both ends see the same key.
template <int D, bool KW, int S>
__device__ __forceinline__ float merge_weight(const Costs<D, KW>& c, const uint8_t* cm, const float* gcost, int lo,
                                              int hi) {
    if constexpr (S == 1) {
        // The first round: group v is column v.
        if constexpr (KW) {
            return c.kw_pair(lo, hi);
        } else {
            return c.at(lo, hi);   // the core's pair_cost is half of it
        }
    } else {
        if constexpr (KW) {
            int mem[2 * S];
#pragma unroll
            for (int i = 0; i < S; ++i) {
                mem[i] = cm[lo * S + i];
                mem[S + i] = cm[hi * S + i];
            }
            return c.template group<2 * S>(mem) - gcost[lo] - gcost[hi];
        } else {
            // P(A u B) - P(A) - P(B) = sum of cross distances - P(A) - P(B)
            // (2S times the core's added cost).
            float cross = 0.f;
#pragma unroll
            for (int i = 0; i < S; ++i)
#pragma unroll
                for (int j = 0; j < S; ++j) cross += c.at(cm[lo * S + i], cm[hi * S + j]);
            return cross - gcost[lo] - gcost[hi];
        }
    }
}

// One greedy round: groups of S -> groups of 2S (cm -> nx). `lists` holds
// two u8 [D] scratch arrays.
template <int D, bool KW, int S>
__device__ void greedy_round(const Costs<D, KW>& c, const uint8_t* cm, uint8_t* nx, float* gcost, uint8_t* mate,
                             uint8_t* best, uint8_t* lists, uint32_t* red, int tid) {
    constexpr int n = D / S;
    static_assert(n <= kSimThreads / 2 && n % 8 == 0, "groups");
    const int lane = tid & 31, warp = tid >> 5;
    uint8_t* flist = lists;       // free groups
    uint8_t* rlist = lists + D;   // free groups that need a new choice
    uint32_t* cnt = red + 8;      // per-warp counts of both lists
    if constexpr (S >= 2) {
        if (tid < n) {
            int mem[S];
#pragma unroll
            for (int i = 0; i < S; ++i) mem[i] = cm[tid * S + i];
            gcost[tid] = c.template group<S>(mem);
        }
    }
    if (tid < n) mate[tid] = kNone;
    __syncthreads();
    bool first_iter = true;
    while (true) {
        // Free groups, and those among them whose choice was taken (all, at first).
        const bool is_free = tid < n && mate[tid] == kNone;
        const bool rescan = is_free && (first_iter || mate[best[tid]] != kNone);
        const uint32_t bf = __ballot_sync(0xffffffffu, is_free), br = __ballot_sync(0xffffffffu, rescan);
        if (lane == 0 && warp < n / 32 + (n % 32 != 0)) cnt[warp] = (__popc(br) << 16) | __popc(bf);
        __syncthreads();
        int F = 0, R = 0, fo = 0, ro = 0;
        for (int w = 0; w < (n + 31) / 32; ++w) {
            const uint32_t x = cnt[w];
            if (w < warp) {
                fo += x & 0xffff;
                ro += x >> 16;
            }
            F += x & 0xffff;
            R += x >> 16;
        }
        const uint32_t below = (1u << lane) - 1u;
        if (is_free) flist[fo + __popc(bf & below)] = static_cast<uint8_t>(tid);
        if (rescan) rlist[ro + __popc(br & below)] = static_cast<uint8_t>(tid);
        __syncthreads();
        // Each group in rlist looks for its cheapest free partner, TPR threads
        // a group. For the edges of one group v the core's order (cost, lo, hi)
        // is the order of (cost, u): key = (cost as ordered bits) << 32 | u.
        int tpr = 1;
        while (tpr < 32 && tpr * 2 * R <= kSimThreads) tpr *= 2;
        const int ri = tid / tpr, sub = tid % tpr;
        uint64_t key = ~0ull;
        const int v = ri < R ? rlist[ri] : 0;
        if (!KW && S == 1 && first_iter) {
            // Every column free: scan row v of the distances directly (the
            // diagonal holds +inf, so v never picks itself).
            const float* row = c.m + v * Costs<D, KW>::P;
#pragma unroll 8
            for (int u = sub; u < n; u += kSimThreads / n) {
                const uint64_t k = (static_cast<uint64_t>(ord_f32(row[u])) << 32) | static_cast<uint32_t>(u);
                key = k < key ? k : key;
            }
        } else if (ri < R) {
            for (int j = sub; j < F; j += tpr) {
                const int u = flist[j];
                const int lo = min(u, v), hi = max(u, v);
                const float w = merge_weight<D, KW, S>(c, cm, gcost, lo, hi);
                const uint64_t k = (static_cast<uint64_t>(ord_f32(w)) << 32) | static_cast<uint32_t>(u);
                key = (u != v && k < key) ? k : key;
                DA_COUNT(8);
            }
        }
        for (int off = 1; off < tpr; off *= 2) {
            const uint64_t o = __shfl_xor_sync(0xffffffffu, key, off);
            key = o < key ? o : key;
        }
        if (ri < R && sub == 0) best[v] = static_cast<uint8_t>(key & 0xffu);
        __syncthreads();
        // Mutual choices are matched.
        int still_free = 0;
        if (tid < n && mate[tid] == kNone) {
            const int u = best[tid];
            if (best[u] == tid) {
                mate[tid] = static_cast<uint8_t>(u);
            } else {
                still_free = 1;
            }
        }
        first_iter = false;
        if (tid == 0) DA_COUNT(3);
        if (__syncthreads_count(still_free) == 0) break;
    }
    // New groups: pair (v, mate v) with v < mate, in the order of v (= order of
    // the smallest column, since groups are ordered by it); members of v first.
    const bool lead = tid < n && mate[tid] > tid;
    const uint32_t bal = __ballot_sync(0xffffffffu, lead);
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

// First improving swap (x * G + y >= start) between groups a < b in the
// current state, or kNone.
template <int D, int G, bool KW>
__device__ __forceinline__ int eval_pair(const Costs<D, KW>& c, const uint8_t* cm, const float* selfs,
                                         const float* gcost, int a, int b, int start) {
    int ma[G], mb[G];
    DA_COUNT(4);
#pragma unroll
    for (int i = 0; i < G; ++i) {
        ma[i] = cm[a * G + i];
        mb[i] = cm[b * G + i];
    }
    if constexpr (KW) {
        const float before = gcost[a] + gcost[b];
        // Not unrolled: a cost is O(G^2) already (code size, compile time).
#pragma unroll 1
        for (int idx = start; idx < G * G; ++idx) {
            const int x = idx / G, y = idx % G;
            const int to_a = cm[b * G + y], to_b = cm[a * G + x];
            int na[G], nb[G];
#pragma unroll
            for (int i = 0; i < G; ++i) {
                na[i] = i == x ? to_a : ma[i];
                nb[i] = i == y ? to_b : mb[i];
            }
            const float after = c.template group<G>(na) + c.template group<G>(nb);
            if (after < before) return idx;
        }
        return kNone;
    } else {
        // Swapping a_x and b_y changes P(A) + P(B) by
        // [sum_{x' != x} D(a_x', b_y) + sum_{y' != y} D(a_x, b_y')] - [self(a_x) + self(b_y)].
        float X[G][G], sa[G], sb[G];
#pragma unroll
        for (int x = 0; x < G; ++x) {
            sa[x] = selfs[ma[x]];
            sb[x] = selfs[mb[x]];
#pragma unroll
            for (int y = 0; y < G; ++y) X[x][y] = c.at(ma[x], mb[y]);
        }
#pragma unroll
        for (int idx = 0; idx < G * G; ++idx) {
            if (idx < start) continue;
            const int x = idx / G, y = idx % G;
            float l = 0.f;
#pragma unroll
            for (int i = 0; i < G; ++i)
                if (i != x) l += X[i][y];
#pragma unroll
            for (int j = 0; j < G; ++j)
                if (j != y) l += X[x][j];
            if (l < sa[x] + sb[y]) return idx;
        }
        return kNone;
    }
}

// Sum of distances from column j to the other members of its group.
template <int D, int G>
__device__ __forceinline__ float self_sum(const Costs<D, false>& c, const uint8_t* cm, const uint8_t* pos, int j) {
    const int a = pos[j] / G;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < G; ++i) {
        const int m = cm[a * G + i];
        if (m != j) acc += c.at(j, m);
    }
    return acc;
}

template <int D, int G, bool KW>
__device__ __forceinline__ void refresh_group(const Costs<D, KW>& c, const uint8_t* cm, const uint8_t* pos,
                                              float* selfs, float* gcost, int grp, int i) {
    if constexpr (KW) {
        if (i == 0) {
            int mem[G];
#pragma unroll
            for (int k = 0; k < G; ++k) mem[k] = cm[grp * G + k];
            gcost[grp] = c.template group<G>(mem);
        }
    } else {
        const int j = cm[grp * G + i];
        selfs[j] = self_sum<D, G>(c, cm, pos, j);
    }
}

template <typename T, int D, int G, bool KW>
__device__ void simplan_body(const SimPlanParams& p, unsigned char* smem) {
    using Tr = SimTraits<D>;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nh = p.head_map_len > 0 ? p.head_map_len : p.heads;
    const long long unit = blockIdx.x;
    const int blk = static_cast<int>(unit % p.num_blocks);
    const long long bh = unit / p.num_blocks;
    const int h = p.head_map_len > 0 ? p.head_map[bh % nh] : static_cast<int>(bh % nh);
    const long long b = bh / nh;
    uint16_t* out = p.plan + ((b * p.heads + h) * p.num_blocks + blk) * D;
    if constexpr (G == 1) {
        for (int j = tid; j < D; j += kSimThreads) out[j] = static_cast<uint16_t>(j);
        return;
    } else {
        T* qt = reinterpret_cast<T*>(smem + Tr::kOffMat);
        float* mat = reinterpret_cast<float*>(smem + Tr::kOffMat);
        float* diag = reinterpret_cast<float*>(smem + Tr::kOffDiag);
        float* selfs = reinterpret_cast<float*>(smem + Tr::kOffSelf);
        float* gcost = reinterpret_cast<float*>(smem + Tr::kOffCost);
        uint32_t* red = reinterpret_cast<uint32_t*>(smem + Tr::kOffRed);
        uint8_t* cur = smem + Tr::kOffCur;
        uint8_t* pos = smem + Tr::kOffPos;
        uint8_t* mate = smem + Tr::kOffMate;
        uint8_t* best = smem + Tr::kOffBest;
        uint8_t* lists = smem + Tr::kOffLists;
        uint8_t* first = smem + Tr::kOffFirst;
        uint8_t* stale = smem + Tr::kOffStale;

        // ---- Q block -> Qt[col][row] (rows up to a multiple of 16, zero-filled) ----
        const int row0 = blk * p.block_rows;
        const int rows = min(p.block_rows, p.q_len - row0);
        const int kend = (rows + 15) & ~15;
        const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + static_cast<long long>(row0) * p.q_row_stride +
                     static_cast<long long>(h) * p.q_head_stride;
        {
            // A thread keeps one column quad and steps over rows; a warp
            // reads 8 rows x 16 columns (a 32-byte segment per row).
            constexpr int CB = D / 16;
            constexpr int RS = 8 * (kSimWarps / CB);
            const int c4 = (warp % CB) * 4 + lane % 4;
            const int r0 = (warp / CB) * 8 + lane / 4;
            const long long step = static_cast<long long>(RS) * p.q_row_stride;
            const T* src = q + static_cast<long long>(r0) * p.q_row_stride + 4 * c4;
            T* dst = qt + 4 * c4 * Tr::kLP;
            for (int r = r0; r < kend; r += RS, src += step) {
                uint2 v = make_uint2(0u, 0u);
                if (r < rows) v = __ldg(reinterpret_cast<const uint2*>(src));
                const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
                for (int k = 0; k < 4; ++k) dst[k * Tr::kLP + r] = e[k];
            }
        }
        for (int j = tid; j < D; j += kSimThreads) cur[j] = static_cast<uint8_t>(j);
        __syncthreads();

        // ---- Gram (upper tiles, mirrored) ----
        {
            constexpr int NB = D / 16, NT = NB * (NB + 1) / 2, PW = (NT + kSimWarps - 1) / kSimWarps;
            float acc[PW][2][4];
#pragma unroll
            for (int s = 0; s < PW; ++s)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[s][nt][e] = 0.f;
            gram_tiles<T, D, false, Tr::kLP>(acc, qt, nullptr, kend, warp, lane);
            if constexpr (!KW) {
                store_sym<D>(acc, warp, lane, [&](int r, int c, float v) {
                    if (r == c) diag[r] = v;
                });
            }
            __syncthreads();   // Qt is read by all warps before the matrix overwrites it
            // KeyWeighted keeps Gq; Similarity stores the core's pair distance
            // (Gq_aa + Gq_bb) - 2 Gq_ab (symmetric; the diagonal, never a
            // distance the core uses, is +inf for the first greedy scan).
            store_sym<D>(acc, warp, lane, [&](int r, int c, float v) {
                const float x = KW ? v : r == c ? INFINITY : (diag[r] + diag[c]) - 2.f * v;
                mat[r * Tr::kGP + c] = x;
                mat[c * Tr::kGP + r] = x;
            });
        }
        __syncthreads();
        Costs<D, KW> c{mat, nullptr};
        if constexpr (KW) {
            c.gk = p.gk + (b * p.kv_heads + h / p.heads_per_kv) * D * D;
        }

        // ---- greedy rounds ----
        int cb = 0;
        greedy_round<D, KW, 1>(c, cur, cur + D, gcost, mate, best, lists, red, tid);
        cb = 1;
        if constexpr (G >= 4) {
            greedy_round<D, KW, 2>(c, cur + D, cur, gcost, mate, best, lists, red, tid);
            cb = 0;
        }
        if constexpr (G >= 8) {
            greedy_round<D, KW, 4>(c, cur, cur + D, gcost, mate, best, lists, red, tid);
            cb = 1;
        }
        uint8_t* cm = cur + cb * D;

        // ---- refinement ----
        constexpr int n = D / G, NP = n * (n - 1) / 2;
        for (int j = tid; j < D; j += kSimThreads) pos[cm[j]] = static_cast<uint8_t>(j);
        __syncthreads();
        for (int i = tid; i < D; i += kSimThreads) refresh_group<D, G, KW>(c, cm, pos, selfs, gcost, i / G, i % G);
        __syncthreads();
        int rb = 0;
        // first[p]: the first improving swap of pair p from its start in the
        // current state. At a pass's start every entry must be "from swap 0":
        // entries are evaluated in full once, and later only those marked
        // stale (a group of theirs changed after their evaluation, or they
        // were evaluated from a later start).
        for (int pi = tid; pi < NP; pi += kSimThreads) stale[pi] = 1;
        for (int pass = 0; pass < 8; ++pass) {
            if (tid == 0) DA_COUNT(7);
            for (int pi = tid; pi < NP; pi += kSimThreads) {
                if (!stale[pi]) continue;
                int a, bb;
                pair_of(pi, n, a, bb);
                first[pi] = static_cast<uint8_t>(eval_pair<D, G, KW>(c, cm, selfs, gcost, a, bb, 0));
                stale[pi] = 0;
            }
            __syncthreads();
            bool improved = false;
            int pstart = 0;
            while (true) {
                // The next swap the core's scan applies: the first pair from
                // pstart on with an improving swap (its first one).
                uint32_t cand = 0xffffffffu;
                for (int pi = pstart + tid; pi < NP; pi += kSimThreads)
                    if (first[pi] != kNone) {
                        cand = static_cast<uint32_t>(pi);
                        break;
                    }
                cand = __reduce_min_sync(0xffffffffu, cand);
                if (lane == 0) red[rb * 8 + warp] = cand;
                __syncthreads();
                uint32_t qp = red[rb * 8];
#pragma unroll
                for (int w = 1; w < kSimWarps; ++w) qp = min(qp, red[rb * 8 + w]);
                rb ^= 1;
                if (qp == 0xffffffffu) break;
                if (tid == 0) DA_COUNT(6);
                improved = true;
                const int idx = first[qp];
                int a, bb;
                pair_of(static_cast<int>(qp), n, a, bb);
                const int x = idx / G, y = idx % G;
                if (warp == 0) {
                    if (lane == 0) {
                        const int ca = cm[a * G + x], cbm = cm[bb * G + y];
                        cm[a * G + x] = static_cast<uint8_t>(cbm);
                        cm[bb * G + y] = static_cast<uint8_t>(ca);
                        pos[cbm] = static_cast<uint8_t>(a * G + x);
                        pos[ca] = static_cast<uint8_t>(bb * G + y);
                    }
                    __syncwarp();
                    if (lane < 2 * G) refresh_group<D, G, KW>(c, cm, pos, selfs, gcost, lane < G ? a : bb, lane % G);
                }
                __syncthreads();
                // Pairs after qp that contain a or bb: (a, bb) from idx + 1,
                // (a, b') and (bb, b') for b' > bb, (a', bb) for a < a' < bb.
                // Those before qp go stale: (a', a) and (a', bb) for a' < a,
                // (a, b') for a < b' < bb; and qp itself (evaluated from idx + 1).
                const int nA = n - 1 - bb, nM = bb - a - 1;
                const int total = 1 + 2 * nA + nM;
                for (int t = tid; t < 2 * a + nM + 1; t += kSimThreads) {
                    int pa, pb;
                    if (t < a) {
                        pa = t;
                        pb = a;
                    } else if (t < 2 * a) {
                        pa = t - a;
                        pb = bb;
                    } else if (t < 2 * a + nM) {
                        pa = a;
                        pb = a + 1 + (t - 2 * a);
                    } else {
                        pa = a;
                        pb = bb;
                    }
                    stale[pair_index(pa, pb, n)] = 1;
                }
                for (int t = tid; t < total; t += kSimThreads) {
                    int pa, pb, st = 0;
                    if (t == 0) {
                        pa = a;
                        pb = bb;
                        st = idx + 1;
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
                    first[pair_index(pa, pb, n)] =
                        static_cast<uint8_t>(st < G * G ? eval_pair<D, G, KW>(c, cm, selfs, gcost, pa, pb, st) : kNone);
                }
                __syncthreads();
                pstart = static_cast<int>(qp);
            }
            if (!improved) break;
        }
        for (int j = tid; j < D; j += kSimThreads) out[j] = cm[j];
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
#define DA_SIMPLAN(DT, T, D, G, KW, MODE)                                                                  \
    extern "C" __global__ void __launch_bounds__(da::kSimThreads, 3)                                      \
        da_simplan_##DT##_d##D##_g##G##_##MODE(const SimPlanParams p) {                                    \
        da::simplan_body<T, D, G, KW>(p, DA_SMEM_PTR);                                                     \
    }                                                                                                      \
    extern "C" __device__ int da_simplan_##DT##_d##D##_g##G##_##MODE##_smem = G == 1 ? 0 : da::SimTraits<D>::kSmem;

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
