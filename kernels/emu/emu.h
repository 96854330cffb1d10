// Host emulation of the small CUDA subset kernels/simplan.cu uses, to run
// its logic on a machine without a GPU (g++ -std=c++20 -DDA_EMULATE).
// Every CUDA thread of a CTA is a fiber (ucontext); fibers run until they
// reach a barrier, in an order that is reshuffled every time, so a missing
// __syncthreads shows up as a wrong or varying result. Warp collectives
// (shuffles, ballots, reductions, mma.sync) exchange values through
// per-warp buffers between warp barriers (ldmatrix reads the lanes' row
// addresses the same way); a block barrier reached while
// some lanes wait at a warp barrier (divergence) aborts.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x) alignas(x)
#define DA_HEAD_MAP_MAX 256

using std::max;
using std::min;

struct uint2 {
    uint32_t x, y;
};
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) float4 {
    float x, y, z, w;
};

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
    uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};   // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half x) {
    _Float16 h;
    std::memcpy(&h, &x.bits, 2);
    return static_cast<float>(h);
}
inline __half __float2half_rn(float f) {
    _Float16 h = static_cast<_Float16>(f);
    __half r;
    std::memcpy(&r.bits, &h, 2);
    return r;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int __popc(uint32_t x) { return __builtin_popcount(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

namespace emu {

struct Dim {
    unsigned x;
};

enum State { kRun, kBlockBar, kWarpBar, kDone };

struct Fiber {
    ucontext_t ctx;
    State state = kRun;
    int tid = 0;
    int arg = 0;
    std::vector<char> stack;
};

struct MmaSlot {
    uint32_t a[4], b[2];
    float c[4];
    bool bf16;
};

struct Block {
    int nthreads = 0;
    std::vector<Fiber> fibers;
    ucontext_t sched;
    std::vector<unsigned char> smem;
    std::vector<uint64_t> xchg;   // [warps][32]
    std::vector<MmaSlot> mma;     // [warps][32]
    int count_result = 0;
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
    std::mt19937 rng{1};
    long long switches = 0;
    long long barriers = 0;
};

inline Block* g_block = nullptr;
inline Fiber* g_cur = nullptr;
inline unsigned g_block_idx = 0, g_grid = 0;

inline void yield() {
    ++g_block->switches;
    swapcontext(&g_cur->ctx, &g_block->sched);
}

inline void warp_barrier() {
    g_cur->state = kWarpBar;
    yield();
}

inline void fiber_entry() {
    g_block->body(g_block->arg);
    g_cur->state = kDone;
    yield();
}

// Runs one CTA: `body(arg)` on `nthreads` fibers.
inline void run_block(Block& B, unsigned block_idx) {
    g_block = &B;
    g_block_idx = block_idx;
    const int nt = B.nthreads;
    for (int t = 0; t < nt; ++t) {
        Fiber& f = B.fibers[t];
        f.state = kRun;
        f.tid = t;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    std::vector<int> order(nt);
    for (int t = 0; t < nt; ++t) order[t] = t;
    while (true) {
        std::shuffle(order.begin(), order.end(), B.rng);
        for (int t : order) {
            Fiber& f = B.fibers[t];
            if (f.state != kRun) continue;
            g_cur = &f;
            swapcontext(&B.sched, &f.ctx);
        }
        // Every fiber is at a barrier or done.
        bool released = false;
        for (int w = 0; w < nt / 32; ++w) {
            bool all = true;
            for (int l = 0; l < 32; ++l) all &= B.fibers[w * 32 + l].state == kWarpBar;
            if (all) {
                for (int l = 0; l < 32; ++l) B.fibers[w * 32 + l].state = kRun;
                released = true;
            }
        }
        if (released) continue;
        int at_block = 0, done = 0, count = 0;
        for (auto& f : B.fibers) {
            at_block += f.state == kBlockBar;
            done += f.state == kDone;
            if (f.state == kBlockBar) count += f.arg != 0;
        }
        if (done == nt) break;
        if (at_block + done == nt) {
            if (done != 0) {
                std::fprintf(stderr, "emu: __syncthreads after some threads exited\n");
                std::abort();
            }
            B.count_result = count;
            ++B.barriers;
            for (auto& f : B.fibers) f.state = kRun;
            continue;
        }
        std::fprintf(stderr, "emu: deadlock (threads split between warp and block barriers)\n");
        std::abort();
    }
}

inline unsigned lane() { return g_cur->tid & 31; }
inline unsigned warp() { return g_cur->tid >> 5; }

template <typename T>
inline T exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "64-bit at most");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_block->xchg[warp() * 32 + lane()] = bits;
    warp_barrier();
    uint64_t r = g_block->xchg[warp() * 32 + src];
    warp_barrier();
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}

// All 32 lanes' values of v (one exchange).
template <typename T>
inline void gather(T v, T (&all)[32]) {
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_block->xchg[warp() * 32 + lane()] = bits;
    warp_barrier();
    for (int l = 0; l < 32; ++l) std::memcpy(&all[l], &g_block->xchg[warp() * 32 + l], sizeof(T));
    warp_barrier();
}

}  // namespace emu

#define threadIdx (emu::Dim{static_cast<unsigned>(emu::g_cur->tid)})
#define blockIdx (emu::Dim{emu::g_block_idx})
#define gridDim (emu::Dim{emu::g_grid})

inline void __syncthreads() {
    emu::g_cur->state = emu::kBlockBar;
    emu::g_cur->arg = 0;
    emu::yield();
}
inline int __syncthreads_count(int pred) {
    emu::g_cur->state = emu::kBlockBar;
    emu::g_cur->arg = pred;
    emu::yield();
    return emu::g_block->count_result;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int off) {
    if (mask != 0xffffffffu) std::abort();
    return emu::exchange(v, static_cast<int>(emu::lane()) ^ off);
}
inline uint32_t __ballot_sync(unsigned mask, int pred) {
    if (mask != 0xffffffffu) std::abort();
    int all[32];
    emu::gather<int>(pred != 0, all);
    uint32_t r = 0;
    for (int l = 0; l < 32; ++l) r |= (all[l] ? 1u : 0u) << l;
    return r;
}
inline uint32_t __reduce_min_sync(unsigned mask, uint32_t v) {
    if (mask != 0xffffffffu) std::abort();
    uint32_t all[32];
    emu::gather<uint32_t>(v, all);
    uint32_t r = v;
    for (int l = 0; l < 32; ++l) r = std::min(r, all[l]);
    return r;
}

inline uint32_t __shfl_sync(unsigned mask, uint32_t v, int src) {
    if (mask != 0xffffffffu) std::abort();
    return emu::exchange(v, src & 31);
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __ffs(uint32_t x) { return x ? __builtin_ctz(x) + 1 : 0; }
inline uint32_t atomicOr(uint32_t* p, uint32_t v) {
    const uint32_t o = *p;
    *p = o | v;
    return o;
}
inline uint32_t atomicAnd(uint32_t* p, uint32_t v) {
    const uint32_t o = *p;
    *p = o & v;
    return o;
}

inline unsigned char* da_emu_smem() { return emu::g_block->smem.data(); }

namespace da {

template <typename T> struct Num;
template <> struct Num<__half> {
    static constexpr bool kBf16 = false;
    static float to_float(__half x) { return __half2float(x); }
    static __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Num<__nv_bfloat16> {
    static constexpr bool kBf16 = true;
    static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

inline float emu_elem(uint32_t reg, int hi, bool bf16) {
    const uint16_t h = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffff);
    return bf16 ? __bfloat162float(__nv_bfloat16{h}) : __half2float(__half{h});
}

// Shared-memory "addresses" are offsets from the CTA's shared memory.
inline uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::g_block->smem.data());
}

// ldmatrix.x4.trans: lane 8i + r gives the address of row r of matrix i; lane
// l receives in register i the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1,
// l / 4) of matrix i (PTX ISA, ldmatrix with .trans).
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    uint32_t all[32];
    emu::gather<uint32_t>(addr, all);
    const unsigned l = emu::lane();
    for (int i = 0; i < 4; ++i) {
        uint16_t h[2];
        for (int e = 0; e < 2; ++e) {
            const unsigned char* row = emu::g_block->smem.data() + all[8 * i + 2 * (l % 4) + e];
            std::memcpy(&h[e], row + 2 * (l / 4), 2);
        }
        r[i] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
    }
}

// mma.sync.m16n8k16 row.col with f32 accumulation (PTX ISA fragment layouts).
template <bool kBf16>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    auto& slot = emu::g_block->mma[emu::warp() * 32 + emu::lane()];
    std::memcpy(slot.a, a, 16);
    slot.b[0] = b0;
    slot.b[1] = b1;
    emu::warp_barrier();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const auto& s = emu::g_block->mma[emu::warp() * 32 + l];
        const int g = l >> 2, t = l & 3;
        for (int e = 0; e < 2; ++e) {
            A[g][2 * t + e] = emu_elem(s.a[0], e, kBf16);
            A[g + 8][2 * t + e] = emu_elem(s.a[1], e, kBf16);
            A[g][2 * t + 8 + e] = emu_elem(s.a[2], e, kBf16);
            A[g + 8][2 * t + 8 + e] = emu_elem(s.a[3], e, kBf16);
            B[2 * t + e][g] = emu_elem(s.b[0], e, kBf16);
            B[2 * t + 8 + e][g] = emu_elem(s.b[1], e, kBf16);
        }
    }
    emu::warp_barrier();
    const int g = emu::lane() >> 2, t = emu::lane() & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float s = c[e];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        c[e] = s;
    }
}

}  // namespace da

namespace emu {

// Launches `kernel(params)` on `grid` CTAs of `threads` threads with
// `smem` bytes of shared memory (poisoned with 0xAB before each CTA).
template <typename P>
struct Launch {
    void (*kernel)(P);
    const P* params;
};

template <typename P>
inline void launch(void (*kernel)(P), const P& params, unsigned grid, int threads, size_t smem, unsigned seed,
                   long long* switches = nullptr) {
    static Block B;
    if (B.nthreads != threads) {
        B.nthreads = threads;
        B.fibers.assign(threads, Fiber{});
        for (auto& f : B.fibers) f.stack.resize(256 * 1024);
        B.xchg.assign(threads, 0);
        B.mma.assign(threads, MmaSlot{});
    }
    B.smem.assign(smem + 16, 0xAB);
    B.rng.seed(seed);
    B.switches = 0;
    B.barriers = 0;
    static Launch<P> L;
    L = {kernel, &params};
    B.arg = &L;
    B.body = [](void* a) {
        auto* l = static_cast<Launch<P>*>(a);
        l->kernel(*l->params);
    };
    g_grid = grid;
    for (unsigned blk = 0; blk < grid; ++blk) {
        std::fill(B.smem.begin(), B.smem.end(), 0xAB);
        run_block(B, blk);
    }
    if (switches) *switches = B.switches;
    if (std::getenv("EMU_STATS")) std::printf("emu: %u CTAs, %.1f block barriers per CTA\n", grid, double(B.barriers) / grid);
}

}  // namespace emu
