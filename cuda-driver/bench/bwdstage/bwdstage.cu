// Timing and cross-version check of the Hopper backward (kernels/hbwd.cu)
// outside the Rust engine: the row passes (bwd.cu's da_bwd_prep, da_bwd_dq)
// and the main kernel of the file named by HBWD_FILE, with the engine's
// parameters, grid and shared memory, bf16, B = 16, H = 16, N = 4096,
// D = DA_HEAD_DIM, block_rows 128, random plans. One binary per kernel
// version (build.sh); device.sh runs them.
//
//   bwdstage time G [causal]   median ms of prep, main, dq and the three together
//   bwdstage dump G FILE       dQ, dK, dV (bf16) of one backward into FILE
//   bwdstage cmp FILE FILE     relative Frobenius difference per gradient
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include HBWD_FILE
#include "harness.cuh"

// The row passes (rows.cu: bwd.cu, its own translation unit: the two files
// declare the dynamic shared memory with different alignments).
extern "C" __global__ void da_bwd_prep_bf16_d128(const BwdRowParams p);
extern "C" __global__ void da_bwd_dq_bf16_d128(const BwdRowParams p);

using T = __nv_bfloat16;
constexpr int D = DA_HEAD_DIM, B = 16, H = 16, N = 4096, BR = 128;

__global__ void fill_f32(float* x, size_t n, float v) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) x[i] = v;
}

struct Run {
    size_t elems = (size_t)B * N * H * D;
    T *q, *k, *v, *o, *d_out, *qhat, *qtil, *dq, *dk, *dv;
    float *lse, *delta, *dq_acc;
    uint16_t* plan;
    int nb = N / BR;
    Run() {
        for (T** p : {&q, &k, &v, &o, &d_out, &qhat, &qtil, &dq, &dk, &dv}) CK(cudaMalloc(p, elems * sizeof(T)));
        CK(cudaMalloc(&lse, (size_t)B * H * N * 4));
        CK(cudaMalloc(&delta, (size_t)B * H * N * 4));
        CK(cudaMalloc(&dq_acc, elems * 4));
        CK(cudaMalloc(&plan, (size_t)B * H * nb * D * 2));
        uint32_t seed = 1;
        for (T* p : {q, k, v, o, d_out}) fill_bf16<<<1024, 256>>>(p, elems, seed++ * 0x9E3779B9u);
        // LSE near log(N) + 1/2 (random scores of unit variance): P stays in range.
        fill_f32<<<1024, 256>>>(lse, (size_t)B * H * N, 8.8f);
        CK(cudaGetLastError());
        std::vector<uint16_t> hp((size_t)B * H * nb * D);
        std::mt19937 rng(7);
        for (size_t r = 0; r < hp.size() / D; ++r) {
            for (int j = 0; j < D; ++j) hp[r * D + j] = (uint16_t)j;
            std::shuffle(hp.begin() + r * D, hp.begin() + (r + 1) * D, rng);
        }
        CK(cudaMemcpy(plan, hp.data(), hp.size() * 2, cudaMemcpyHostToDevice));
    }
    BwdRowParams row(int g) const {
        BwdRowParams r;
        std::memset(&r, 0, sizeof(r));
        r.q = q, r.qhat = qhat, r.qtil = qtil, r.o = o, r.d_out = d_out, r.do_conv = nullptr, r.delta = delta;
        r.dq_acc = dq_acc, r.plan = plan, r.dq = dq;
        const long long sb = (long long)N * H * D, ss = H * D, sh = D;
        r.q_batch_stride = r.o_batch_stride = r.do_batch_stride = r.dq_batch_stride = sb;
        r.q_row_stride = r.o_row_stride = r.do_row_stride = r.dq_row_stride = ss;
        r.q_head_stride = r.o_head_stride = r.do_head_stride = r.dq_head_stride = sh;
        r.q_len = N, r.q_heads = H, r.group = g, r.num_blocks = nb, r.block_rows = BR, r.batch_offset = 0;
        r.scale = 1.f / std::sqrt((float)D);
        return r;
    }
    BwdParams main(bool causal) const {
        BwdParams p;
        std::memset(&p, 0, sizeof(p));
        p.q = q, p.k = k, p.v = v, p.d_out = d_out, p.qhat = qhat, p.qtil = qtil, p.plan = plan, p.lse = lse;
        p.delta = delta, p.dq_acc = dq_acc, p.dk = dk, p.dv = dv;
        const long long sb = (long long)N * H * D, ss = H * D, sh = D;
        p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.do_batch_stride = p.dk_batch_stride =
            p.dv_batch_stride = sb;
        p.q_row_stride = p.k_row_stride = p.v_row_stride = p.do_row_stride = p.dk_row_stride = p.dv_row_stride = ss;
        p.q_head_stride = p.k_head_stride = p.v_head_stride = p.do_head_stride = p.dk_head_stride =
            p.dv_head_stride = sh;
        p.q_len = N, p.kv_len = N, p.q_heads = H, p.heads_per_kv = 1, p.num_blocks = nb, p.block_rows = BR;
        p.scale = 1.f / std::sqrt((float)D);
        p.scale_log2 = p.scale * 1.4426950408889634f;
        p.causal = causal;
        return p;
    }
};

#define PREP da_bwd_prep_bf16_d128
#define DQK da_bwd_dq_bf16_d128
static_assert(D == 128, "the row passes declared above");

template <int G>
static void launch_main(const BwdParams& p) {
    constexpr int smem = da::HbTraits<D, G>::kSmem;
    auto k = G == 1 ? DA_CAT(DA_HBWD_PREFIX, _g1) : DA_CAT(DA_HBWD_PREFIX, _g2);
    static bool once = false;
    if (!once) {
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        once = true;
    }
    k<<<dim3(N / 128, H, B), da::kHbThreads, smem>>>(p);
}

static void step(const Run& r, int g, bool causal, int part) {
    const BwdRowParams rp = r.row(g);
    const dim3 rg(N / 64, H, B);
    if (part == 0) PREP<<<rg, 128>>>(rp);
    if (part == 1) {
        const BwdParams p = r.main(causal);
        if (g == 1) launch_main<1>(p);
        else launch_main<2>(p);
    }
    if (part == 2) DQK<<<rg, 128>>>(rp);
    CK(cudaGetLastError());
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: bwdstage time G [causal] | dump G FILE | cmp A B\n");
        return 2;
    }
    const std::string mode = argv[1];
    if (mode == "cmp") {
        FILE *fa = std::fopen(argv[2], "rb"), *fb = std::fopen(argv[3], "rb");
        if (!fa || !fb) return 2;
        const size_t n = (size_t)B * N * H * D;
        std::vector<T> a(n), b(n);
        const char* names[3] = {"dq", "dk", "dv"};
        double worst = 0;
        for (int t = 0; t < 3; ++t) {
            if (std::fread(a.data(), 2, n, fa) != n || std::fread(b.data(), 2, n, fb) != n) return 2;
            double num = 0, den = 0;
            for (size_t i = 0; i < n; ++i) {
                const double x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
                num += (x - y) * (x - y);
                den += y * y;
                if (!std::isfinite(x)) num = INFINITY;
            }
            const double rel = std::sqrt(num / den);
            worst = std::max(worst, rel);
            std::printf("%s rel %.3e (norm %.3e)\n", names[t], rel, std::sqrt(den));
        }
        std::printf("%s\n", worst < 1e-2 ? "cmp ok" : "cmp FAILED");
        return worst < 1e-2 ? 0 : 1;
    }
    const int g = std::atoi(argv[2]);
    if (g != 1 && g != 2) return 2;
    Run r;
    CK(cudaDeviceSynchronize());
    if (mode == "dump") {
        for (T* p : {r.dq, r.dk, r.dv}) CK(cudaMemset(p, 0xff, r.elems * 2));   // NaN poison
        for (int part = 0; part < 3; ++part) step(r, g, false, part);
        CK(cudaDeviceSynchronize());
        std::vector<T> h(r.elems);
        FILE* f = std::fopen(argv[3], "wb");
        for (T* p : {r.dq, r.dk, r.dv}) {
            CK(cudaMemcpy(h.data(), p, r.elems * 2, cudaMemcpyDeviceToHost));
            std::fwrite(h.data(), 2, r.elems, f);
        }
        std::fclose(f);
        return 0;
    }
    const bool causal = argc > 3 && std::string(argv[3]) == "causal";
    cudaEvent_t ev[4];
    for (auto& e : ev) CK(cudaEventCreate(&e));
    std::vector<float> t[4];
    for (int rep = 0; rep < 23; ++rep) {
        CK(cudaEventRecord(ev[0]));
        for (int part = 0; part < 3; ++part) {
            step(r, g, causal, part);
            CK(cudaEventRecord(ev[part + 1]));
        }
        CK(cudaEventSynchronize(ev[3]));
        if (rep < 3) continue;
        float ms;
        for (int i = 0; i < 3; ++i) {
            CK(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]));
            t[i].push_back(ms);
        }
        CK(cudaEventElapsedTime(&ms, ev[0], ev[3]));
        t[3].push_back(ms);
    }
    auto med = [](std::vector<float> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
    };
    const double flops = 2.0 * B * H * (double)N * N * D * (3 + 2.0 / g) / (causal ? 2 : 1);
    std::printf("G=%d causal=%d smem=%d S=%d | prep %.3f main %.3f dq %.3f total %.3f ms | main %.0f TFLOP/s (min %.3f max %.3f)\n",
                g, (int)causal, g == 1 ? da::HbTraits<D, 1>::kSmem : da::HbTraits<D, 2>::kSmem,
                g == 1 ? da::HbTraits<D, 1>::S : da::HbTraits<D, 2>::S, med(t[0]), med(t[1]), med(t[2]), med(t[3]),
                flops / (med(t[1]) * 1e-3) / 1e12, *std::min_element(t[1].begin(), t[1].end()),
                *std::max_element(t[1].begin(), t[1].end()));
    return 0;
}
