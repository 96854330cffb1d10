// Stage-removal timing and cross-version check of the Hopper kernel, bf16,
// outside the Rust engine (the same FwdParams, grid and shared memory as the
// engine's launch). One binary per head dim links four versions (each
// hstage_k.cu compiled with its namespace renamed): "v2" (the frozen copy
// beside this file, the reference of `check`), "old" and "mid"
// (kernels/hfwd.cu at build.sh's OLD and MID revisions) and "new"
// (kernels/hfwd.cu as checked out).
//
//   build.sh here (nvcc, sm_90a; see it for the flags), device.sh on the GPU:
//   ./hstage check       # new against v2 on small cases with tails (G = 1, 2, 4, 8)
//   ./hstage time        # new vs old vs mid per (G, kAblate), interleaved launches; TFLOP/s
//   ./hstage prof        # new's cycle counters (kAblate bit 4) per tile
//   ./hstage timeline    # new's per-CTA timeline (kAblate bit 5): prologue, loop, epilogue, gaps
//
// kAblate (see hfwd_body): bit 0 no Khat build (stale Khat), bit 1
// no raw-K loads, bit 2 no softmax (P = S), bit 4 (new only) cycle counters,
// bit 5 (new only) the timeline.
// Versions ignore bits they lack. Ablated outputs (bits 0-2) are meaningless.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_bf16.h>

#include "common.cuh"
#include "harness.cuh"


using T = __nv_bfloat16;
constexpr int D = DA_HEAD_DIM;

namespace hs_v2 {
bool launch(int g, int x, const FwdParams& p, const HTmaMaps& m, dim3 grid, cudaStream_t st);
}
namespace hs_old {
bool launch(int g, int x, const FwdParams& p, const HTmaMaps& m, dim3 grid, cudaStream_t st);
}
namespace hs_mid {
bool launch(int g, int x, const FwdParams& p, const HTmaMaps& m, dim3 grid, cudaStream_t st);
}
namespace hs_new {
bool launch(int g, int x, const FwdParams& p, const HTmaMaps& m, dim3 grid, cudaStream_t st);
bool prof(unsigned long long* out, bool reset);
bool timeline(unsigned long long* words);
}
using LaunchFn = bool (*)(int, int, const FwdParams&, const HTmaMaps&, dim3, cudaStream_t);

struct Problem {
    int B, H, N;
    bool causal;
    T *q, *k, *v, *o;
    uint16_t* plan;
    FwdParams p;
    HTmaMaps maps;
};

// The engine's TMA descriptor (cuda-driver/src/engine.rs, tma_desc): the 4-D
// tensor (d, n, head, batch) of 16-bit elements, 64 x 64 boxes, 128-byte swizzle.
static TmaDesc tma_desc(const void* base, int B, int N, int H, long long bs, long long rs, long long hs) {
    TmaDesc m;
    const cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)N, (cuuint64_t)H, (cuuint64_t)B};
    const cuuint64_t strides[3] = {(cuuint64_t)rs * 2, (cuuint64_t)hs * 2, (cuuint64_t)bs * 2};
    const cuuint32_t box[4] = {64, 64, 1, 1}, estr[4] = {1, 1, 1, 1};
    const CUresult r = cuTensorMapEncodeTiled(reinterpret_cast<CUtensorMap*>(&m), CU_TENSOR_MAP_DATA_TYPE_UINT16, 4,
                                              const_cast<void*>(base), dims, strides, box, estr,
                                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "cuTensorMapEncodeTiled: error %d\n", (int)r);
        exit(1);
    }
    return m;
}

static Problem make(int B, int H, int N, bool causal, uint32_t seed) {
    Problem pr{B, H, N, causal};
    size_t n = (size_t)B * N * H * D;
    CK(cudaMalloc(&pr.q, n * 2));
    CK(cudaMalloc(&pr.k, n * 2));
    CK(cudaMalloc(&pr.v, n * 2));
    CK(cudaMalloc(&pr.o, n * 2));
    fill_bf16<<<1024, 256>>>(pr.q, n, seed);
    fill_bf16<<<1024, 256>>>(pr.k, n, seed * 3 + 1);
    fill_bf16<<<1024, 256>>>(pr.v, n, seed * 5 + 2);
    const int nblk = (N + 127) / 128;
    std::vector<uint16_t> plan((size_t)B * H * nblk * D);
    std::mt19937 rng(seed);
    for (size_t blk = 0; blk < (size_t)B * H * nblk; ++blk) {
        uint16_t* e = plan.data() + blk * D;
        for (int i = 0; i < D; ++i) e[i] = (uint16_t)i;
        std::shuffle(e, e + D, rng);
    }
    CK(cudaMalloc(&pr.plan, plan.size() * 2));
    CK(cudaMemcpy(pr.plan, plan.data(), plan.size() * 2, cudaMemcpyHostToDevice));
    FwdParams& p = pr.p;
    memset(&p, 0, sizeof(p));
    p.q = pr.q, p.k = pr.k, p.v = pr.v, p.o = pr.o, p.lse = nullptr, p.plan = pr.plan;
    const long long rs = (long long)H * D, bs = (long long)N * rs;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = bs;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = rs;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = D;
    p.q_len = p.kv_len = N, p.q_heads = H, p.heads_per_kv = 1, p.num_blocks = nblk, p.batch_offset = 0;
    p.scale_log2 = 1.4426950408889634f / sqrtf((float)D);
    p.causal = causal, p.sample = 0, p.out_f32 = 0, p.head_map_len = 0;
    pr.maps.k = tma_desc(pr.k, B, N, H, bs, rs, D);
    pr.maps.v = tma_desc(pr.v, B, N, H, bs, rs, D);
    return pr;
}

static void free_problem(Problem& pr) {
    CK(cudaFree(pr.q));
    CK(cudaFree(pr.k));
    CK(cudaFree(pr.v));
    CK(cudaFree(pr.o));
    CK(cudaFree(pr.plan));
}

static void launch(LaunchFn f, int g, int x, const Problem& pr) {
    dim3 grid(pr.p.num_blocks, pr.H, pr.B);
    if (!f(g, x, pr.p, pr.maps, grid, 0)) {
        fprintf(stderr, "variant G=%d X=%d not built\n", g, x);
        exit(1);
    }
}

static double flops(const Problem& pr) {
    return 4.0 * pr.B * pr.H * (double)pr.N * pr.N * D * (pr.causal ? 0.5 : 1.0);
}

// new, old and mid in turn, 5 launches each per round, 8 rounds after 3
// warm-ups each; medians of the 40 event-timed launches per version.
static void row_ab(const char* what, int g, int x, const Problem& pr) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    LaunchFn fs[3] = {hs_new::launch, hs_old::launch, hs_mid::launch};
    std::vector<float> ms[3];
    for (int v = 0; v < 3; ++v)
        for (int i = 0; i < 3; ++i) launch(fs[v], g, x, pr);
    for (int round = 0; round < 8; ++round)
        for (int v = 0; v < 3; ++v)
            for (int i = 0; i < 5; ++i) {
                CK(cudaEventRecord(a));
                launch(fs[v], g, x, pr);
                CK(cudaEventRecord(b));
                CK(cudaEventSynchronize(b));
                float t;
                CK(cudaEventElapsedTime(&t, a, b));
                ms[v].push_back(t);
            }
    double med[3];
    for (int v = 0; v < 3; ++v) {
        std::sort(ms[v].begin(), ms[v].end());
        med[v] = ms[v][ms[v].size() / 2];
    }
    const double f = flops(pr) / 1e9;
    printf("%-28s D=%d G=%d X=%d causal=%d  new %7.3f ms %6.1f | old %7.3f ms %6.1f | mid %7.3f ms %6.1f TF/s | "
           "new/old %.3f new/mid %.3f\n",
           what, D, g, x, (int)pr.causal, med[0], f / med[0], med[1], f / med[1], med[2], f / med[2], med[1] / med[0],
           med[2] / med[0]);
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
}

// new's cycle counters (kAblate 16 + x) per tile.
static void row_prof(const char* what, int g, int x, const Problem& pr) {
    unsigned long long c[8];
    hs_new::prof(c, true);
    launch(hs_new::launch, g, 16 + x, pr);
    CK(cudaDeviceSynchronize());
    hs_new::prof(c, false);
    const double tiles = (double)std::max(1ull, c[7]);
    printf("%-30s D=%d G=%d X=%2d causal=%d  cycles/tile: producer %6.0f (raw-K wait %5.0f, K GEMM+bar %5.0f, "
           "empty wait %5.0f, Khat store %5.0f) | consumer %6.0f (full wait %5.0f)\n",
           what, D, g, 16 + x, (int)pr.causal, c[0] / tiles, c[1] / tiles, c[2] / tiles, c[3] / tiles, c[4] / tiles,
           c[5] / tiles, c[6] / tiles);
}

// new's timeline (kAblate 32): per CTA the %globaltimer stamps at entry,
// tile 0 ready, loop done and epilogue done (consumer thread 128), its SM and
// clock64 at entry and end. Printed: the kernel's span, per CTA the mean
// prologue / loop / epilogue, the mean gap on an SM between one CTA's end and
// the next CTA's entry, the busy fraction of the SMs, and the SM clock.
static void row_timeline(const char* what, int g, const Problem& pr) {
    const size_t ncta = (size_t)pr.p.num_blocks * pr.H * pr.B;
    unsigned long long* dev;
    CK(cudaMalloc(&dev, ncta * 16 * sizeof(unsigned long long)));
    CK(cudaMemset(dev, 0, ncta * 16 * sizeof(unsigned long long)));
    hs_new::timeline(dev);
    launch(hs_new::launch, g, 32, pr);   // warm-up (module, clocks)
    launch(hs_new::launch, g, 32, pr);
    CK(cudaDeviceSynchronize());
    std::vector<unsigned long long> w(ncta * 16);
    CK(cudaMemcpy(w.data(), dev, w.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
    CK(cudaFree(dev));
    unsigned long long t_min = ~0ull, t_max = 0;
    double pro = 0, loop = 0, epi = 0, busy = 0, clk = 0, ns = 0, step[16] = {};
    size_t nstep[16] = {};
    std::vector<std::vector<std::pair<unsigned long long, unsigned long long>>> per_sm(1024);
    for (size_t c = 0; c < ncta; ++c) {
        const unsigned long long* x = &w[16 * c];
        for (int i = 7; i < 16; ++i)
            if (x[i]) step[i] += (double)(x[i] - x[0]), ++nstep[i];
        t_min = std::min(t_min, x[0]);
        t_max = std::max(t_max, x[3]);
        pro += (double)(x[1] - x[0]), loop += (double)(x[2] - x[1]), epi += (double)(x[3] - x[2]);
        busy += (double)(x[3] - x[0]);
        clk += (double)(x[6] - x[5]), ns += (double)(x[3] - x[0]);
        per_sm[x[4] % 1024].push_back({x[0], x[3]});
    }
    double gap = 0;
    size_t ngap = 0, nsm = 0;
    for (auto& v : per_sm) {
        if (v.empty()) continue;
        ++nsm;
        std::sort(v.begin(), v.end());
        for (size_t i = 1; i < v.size(); ++i)
            if (v[i].first >= v[i - 1].second) gap += (double)(v[i].first - v[i - 1].second), ++ngap;
    }
    const double span = (double)(t_max - t_min);
    printf("%-14s D=%d G=%d causal=%d  span %7.3f ms, %zu CTAs on %zu SMs | per CTA us: prologue %6.2f loop %7.2f "
           "epilogue %5.2f gap %5.2f | SMs busy %4.1f%% | SM clock %.3f GHz\n",
           what, D, g, (int)pr.causal, span / 1e6, ncta, nsm, pro / ncta / 1e3, loop / ncta / 1e3, epi / ncta / 1e3,
           ngap ? gap / ngap / 1e3 : 0.0, 100.0 * busy / (span * nsm), clk / ns);
    static const char* names[16] = {"", "", "", "", "", "", "", "C barrier", "C raw Q", "C Qhat", "C full[0]",
                                    "P barrier", "P early copies", "P F built", "P raw K 0", "P full[0] arrive"};
    printf("    prologue steps, us after entry (C consumer thread 128, P producer thread 0):");
    for (int i = 7; i < 16; ++i)
        if (nstep[i]) printf(" %s %.2f;", names[i], step[i] / nstep[i] / 1e3);
    printf("\n");
}

// Small cases with key tails and causal masking, for dump/check.
struct Case {
    int B, H, N;
    bool causal;
};
static const Case kCases[] = {{1, 2, 1000, false}, {1, 2, 1000, true}, {2, 1, 300, true}, {1, 1, 129, false}};

static void run_case(LaunchFn f, int g, int x, const Case& c, int idx, std::vector<T>& out) {
    Problem pr = make(c.B, c.H, c.N, c.causal, 17 + idx);
    launch(f, g, x, pr);
    CK(cudaDeviceSynchronize());
    out.resize((size_t)c.B * c.N * c.H * D);
    CK(cudaMemcpy(out.data(), pr.o, out.size() * 2, cudaMemcpyDeviceToHost));
    free_problem(pr);
}

static void all_outputs(LaunchFn f, int x, std::vector<std::vector<T>>& outs) {
    int idx = 0;
    for (const Case& c : kCases) {
        for (int g : {1, 2, 4, 8}) {
            std::vector<T> o;
            run_case(f, g, x, c, idx, o);
            outs.push_back(o);
        }
        ++idx;
    }
}

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "time";
    if (mode == "check") {
        // new against v2, element by element.
        const int x = 0;
        std::vector<std::vector<T>> outs, refs;
        all_outputs(hs_new::launch, x, outs);
        all_outputs(hs_v2::launch, 0, refs);
        int bad = 0;
        for (size_t k = 0; k < outs.size(); ++k) {
            const std::vector<T>&o = outs[k], &ref = refs[k];
            double md = 0, mref = 0;
            size_t nd = 0;
            for (size_t i = 0; i < o.size(); ++i) {
                const double a = __bfloat162float(o[i]), r = __bfloat162float(ref[i]);
                if (!(std::fabs(a - r) <= md)) md = std::isnan(a - r) ? INFINITY : std::fabs(a - r);
                mref = std::max(mref, std::fabs(r));
                nd += a != r;
            }
            printf("X=%d case %zu G=%d: max|diff| %.3g (max|ref| %.3g), %zu of %zu differ\n", x, k / 4, 1 << (k % 4), md,
                   mref, nd, o.size());
            bad += !(md <= 0.02 * std::max(mref, 1e-3));
        }
        printf("%s\n", bad ? "CHECK FAILED" : "check ok");
        return bad ? 1 : 0;
    }
    // B * N = 65536, H * D = 2048, N = 4096 (as the benchmark's middle row).
    const int H = 2048 / D;
    {
        // Clocks up before the first timed row: ~1 s of G = 1 launches.
        Problem pr = make(16, H, 4096, false, 7);
        for (int i = 0; i < 200; ++i) launch(hs_new::launch, 1, 0, pr);
        CK(cudaDeviceSynchronize());
        free_problem(pr);
    }
    for (int causal = 0; causal < 2; ++causal) {
        Problem pr = make(16, H, 4096, causal, 7);
        if (mode == "timeline") {
            row_timeline("G=1", 1, pr);
            row_timeline("G=2", 2, pr);
            row_timeline("G=4", 4, pr);
        } else if (mode == "prof") {
            row_prof("G=1", 1, 0, pr);
            row_prof("G=2", 2, 0, pr);
            row_prof("G=2 no softmax", 2, 4, pr);
            row_prof("G=4", 4, 0, pr);
            row_prof("G=8", 8, 0, pr);
        } else {
            row_ab("G=1", 1, 0, pr);
            row_ab("G=2+plan full", 2, 0, pr);
            row_ab("G=2 no Khat fuse", 2, 1, pr);
            row_ab("G=2 no fuse, no raw-K loads", 2, 3, pr);
            row_ab("G=2 no softmax", 2, 4, pr);
            row_ab("G=2 V loads + GEMMs only", 2, 7, pr);
            row_ab("G=4+plan full", 4, 0, pr);
            row_ab("G=4 no Khat fuse", 4, 1, pr);
            row_ab("G=8+plan full", 8, 0, pr);
        }
        free_problem(pr);
    }
    return 0;
}
