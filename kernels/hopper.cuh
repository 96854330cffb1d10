// Hopper (sm_90a) building blocks shared by hfwd.cu and hbwd.cu: mbarriers,
// named barriers, proxy fences, wgmma fences and waits, TMA, shared-memory
// matrix descriptors, cp.async loads into the 128-byte-swizzle layout.
#pragma once
#include "common.cuh"

// The body exists only in the sm_90a image (wgmma and setmaxnreg need it);
// other targets compile empty kernels that the driver never launches.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DA_HOPPER 1
#else
#define DA_HOPPER 0
#endif

namespace da {
#if DA_HOPPER
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// An arrival on `bar` once this thread's earlier cp.async copies have landed
// (.noinc: the arrival is one of the count the barrier was initialised with).
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
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
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// TMA: the barrier's phase also waits for `bytes` of copies (with or without
// this thread's arrival); a 64 x 64 box (d x n) of a tensor map into shared
// memory (128-byte swizzle: 64 rows of 128 bytes), completing on `bar`.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tma_box(uint32_t dst, const TmaDesc& map, int d0, int n0, int hk, int b, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(&map)), "r"(d0), "r"(n0), "r"(hk), "r"(b), "r"(bar)
        : "memory");
}
// ROWS keys from n0 in the 128-byte-swizzle layout of load_sw128 (one region
// of ROWS * 128 bytes per 64 columns): ROWS * D * 2 bytes on `bar`.
template <int D, int ROWS>
__device__ __forceinline__ void tma_tile(uint32_t dst, const TmaDesc& map, int n0, int hk, int b, uint32_t bar) {
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
#pragma unroll
        for (int r = 0; r < ROWS / 64; ++r) tma_box(dst + c * (ROWS * 128) + r * (64 * 128), map, c * 64, n0 + r * 64, hk, b, bar);
}
// Bulk reduction (TMA engine): adds `bytes` (a multiple of 16) of f32 at
// shared `src` to global `dst` (both 16-byte aligned), in this thread's bulk
// group; the writes to `src` must be fenced to the async proxy first.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's bulk groups have read their shared-memory sources (.read) or completed.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

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
    constexpr int kPerRow = D / 8, kIters = ROWS * kPerRow / 128, kRowsPerIter = 128 / kPerRow;
    static_assert(ROWS * kPerRow % 128 == 0 && kRowsPerIter % 8 == 0, "tile split");
    // A thread's chunk c and row % 8 (hence its swizzle) are the same in every
    // iteration: one pointer increment and an immediate offset per copy.
    const int row0 = lt / kPerRow, c = lt % kPerRow;
    const uint32_t d = dst + (c / 8) * (ROWS * 128) + row0 * 128 + (((c % 8) ^ (row0 % 8)) << 4);
    const T* g = src + (long long)row0 * stride + c * 8;
    const long long step = kRowsPerIter * stride;
#pragma unroll 4
    for (int it = 0; it < kIters; ++it) {
        const bool ok = row0 + it * kRowsPerIter < valid;
        cp_async16(d + it * (kRowsPerIter * 128), ok ? g : src, ok);
        g += step;
    }
}

__device__ __forceinline__ uint32_t pack_raw(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

#endif  // DA_HOPPER
}  // namespace da
