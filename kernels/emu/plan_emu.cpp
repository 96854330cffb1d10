// Runs kernels/plan.cu (the LSH plan kernel) under the host emulation
// (emu.h) on random inputs and compares its plans with a plain f64 plan of
// the same Q and R (ALGORITHM.md steps 1-3); blocks may differ only where a
// dot product is within 1e-5 of sum |q r| of zero. Checks the kernel's
// fragment bookkeeping, the split of R, the double-buffered copies (done at
// the wait that covers them, so a read before its wait sees poison) and the
// rank sort, without a GPU.
//
//   g++ -std=c++20 -O2 -fno-strict-aliasing -DDA_EMULATE -I kernels kernels/emu/plan_emu.cpp -o plan_emu
//   plan_emu [cases]
#include "emu.h"

#include <array>
#include <deque>
#include <map>

// What plan.cu takes from common.cuh, emulated.
struct PlanParams {
    const void* q;
    uint16_t* plan;
    const float* proj;
    long long q_batch_stride, q_row_stride, q_head_stride;
    int q_len, heads, head_dim, block_rows, num_proj, num_blocks, batch_offset, batch;
};
struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
#define __host__
#include "../inverse_gray.cuh"
#define blockDim (emu::Dim{static_cast<unsigned>(emu::g_block->nthreads)})

namespace da {

// cp.async: queued per thread, landed at the cp.async.wait_group that covers it.
struct Copy {
    uint32_t dst;
    const void* src;
    int bytes, size;
};
inline std::map<int, std::deque<std::vector<Copy>>> g_groups;   // per thread: committed groups
inline std::map<int, std::vector<Copy>> g_open;                 // per thread: not yet committed
inline void cp_async_n(uint32_t dst, const void* src, int size, bool pred) {
    g_open[emu::g_cur->tid].push_back({dst, src, pred ? size : 0, size});
}
inline void cp_async16(uint32_t dst, const void* src, bool pred) { cp_async_n(dst, src, 16, pred); }
inline void cp_async8(uint32_t dst, const void* src, bool pred) { cp_async_n(dst, src, 8, pred); }
inline void cp_async_commit() {
    const int t = emu::g_cur->tid;
    g_groups[t].push_back(std::move(g_open[t]));
    g_open[t].clear();
}
template <int N> inline void cp_async_wait() {
    auto& q = g_groups[emu::g_cur->tid];
    while (q.size() > static_cast<size_t>(N)) {
        for (const Copy& c : q.front()) {
            unsigned char* d = emu::g_block->smem.data() + c.dst;
            std::memset(d, 0, c.size);
            std::memcpy(d, c.src, c.bytes);
        }
        q.pop_front();
    }
}

// ldmatrix.x4 (no .trans): lane l receives in register i the elements
// (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i.
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    uint32_t all[32];
    emu::gather<uint32_t>(addr, all);
    const unsigned l = emu::lane();
    for (int i = 0; i < 4; ++i)
        std::memcpy(&r[i], emu::g_block->smem.data() + all[8 * i + l / 4] + 4 * (l % 4), 4);
}

}  // namespace da

#include "../plan.cu"

// The plan of one block in f64 (ALGORITHM.md): bit p = dot > 0, the code's
// inverse-Gray key, a stable sort by (key, column). `near` reports whether
// some dot product is within 1e-5 of sum |q r| of zero.
template <typename T>
static std::vector<uint16_t> ref_block(const T* q, long long row_stride, int rows, int d, const float* r, int p,
                                       bool& near) {
    std::vector<std::pair<uint64_t, int>> keys(d);
    near = false;
    for (int j = 0; j < d; ++j) {
        uint32_t code = 0;
        for (int k = 0; k < p; ++k) {
            double dot = 0, mag = 0;
            for (int i = 0; i < rows; ++i) {
                const double x = double(da::Num<T>::to_float(q[i * row_stride + j])) * r[i * p + k];
                dot += x;
                mag += std::fabs(x);
            }
            near |= std::fabs(dot) <= 1e-5 * mag;
            code |= (dot > 0 ? 1u : 0u) << k;
        }
        keys[j] = {da::inverse_gray(code), j};
    }
    std::stable_sort(keys.begin(), keys.end());
    std::vector<uint16_t> out(d);
    for (int i = 0; i < d; ++i) out[i] = static_cast<uint16_t>(keys[i].second);
    return out;
}

template <typename T>
static int run_case(std::mt19937& rng, int c, bool verbose) {
    const int dims[] = {16, 32, 64, 128}, rows_opts[] = {1, 16, 37, 64, 100, 128}, ps[] = {1, 7, 8, 16, 24, 32};
    const int d = dims[rng() % 4], l = rows_opts[rng() % 6], p = ps[rng() % 6];
    const int batch = 1 + rng() % 2, heads = 1 + rng() % 3, n = 1 + rng() % 300;
    const int pad = (c % 2) ? 4 * (1 + rng() % 3) : 0;   // row padding in elements (8-byte copies unless % 8)
    const long long hs = d + pad, rs = heads * hs, bs = n * rs;
    std::normal_distribution<float> nd;
    std::vector<T> q(batch * bs);
    for (auto& x : q) x = da::Num<T>::from_float(nd(rng));
    if (c % 3 == 0)   // duplicate columns: equal keys, order by the tie-break
        for (long long i = 0; i < (long long)q.size(); ++i)
            if (i % hs >= 1 && i % hs < d && (i % hs) % 3 == 1) q[i] = q[i - 1];
    std::vector<float> r(l * p);
    for (auto& x : r) x = nd(rng);
    const int blocks = (n + l - 1) / l;
    std::vector<uint16_t> got(size_t(batch) * heads * blocks * d, 0xffff);
    PlanParams prm{q.data(), got.data(), r.data(), bs, rs, hs, n, heads, d, l, p, blocks, 0, batch};
    const int pmax = p <= 8 ? 8 : p <= 16 ? 16 : 32;
    const size_t smem = pmax <= 16 ? da::plan_smem_bytes<uint32_t>(pmax, l, d) : da::plan_smem_bytes<uint64_t>(pmax, l, d);
    const unsigned grid = 1 + rng() % 3;   // a CTA walks several blocks, both buffers
    void (*k)(PlanParams);
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        k = pmax == 8 ? da_plan_bf16_p8 : pmax == 16 ? da_plan_bf16_p16 : da_plan_bf16_p32;
    else
        k = pmax == 8 ? da_plan_f16_p8 : pmax == 16 ? da_plan_f16_p16 : da_plan_f16_p32;
    emu::launch(k, prm, grid, da::plan_threads(d), smem, 1234 + c);
    int differ = 0, bad = 0, nearc = 0;
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < heads; ++h)
            for (int blk = 0; blk < blocks; ++blk) {
                bool near;
                const int rows = std::min(l, n - blk * l);
                auto want = ref_block(q.data() + b * bs + (long long)blk * l * rs + h * hs, rs, rows, d, r.data(), p, near);
                const uint16_t* g = got.data() + ((size_t(b) * heads + h) * blocks + blk) * d;
                nearc += near;
                if (!std::equal(want.begin(), want.end(), g)) {
                    ++differ;
                    if (!near) {
                        ++bad;
                        if (verbose) {
                            std::printf("  block (%d,%d,%d) differs:\n   got ", b, h, blk);
                            for (int j = 0; j < d; ++j) std::printf(" %d", g[j]);
                            std::printf("\n  want ");
                            for (int j = 0; j < d; ++j) std::printf(" %d", want[j]);
                            std::printf("\n");
                        }
                    }
                }
            }
    std::printf("case %d %s d=%d l=%d P=%d batch=%d heads=%d n=%d pad=%d grid=%u: %d blocks, %d differ (%d near zero), %d bad\n",
                c, std::is_same_v<T, __nv_bfloat16> ? "bf16" : "f16", d, l, p, batch, heads, n, pad, grid,
                batch * heads * blocks, differ, nearc, bad);
    return bad;
}

int main(int argc, char** argv) {
    const int cases = argc > 1 ? std::atoi(argv[1]) : 24;
    std::mt19937 rng(7);
    int bad = 0;
    for (int c = 0; c < cases; ++c)
        bad += (c % 2) ? run_case<__half>(rng, c, bad == 0) : run_case<__nv_bfloat16>(rng, c, bad == 0);
    std::printf("%s\n", bad ? "FAILED" : "ok");
    return bad ? 1 : 0;
}
