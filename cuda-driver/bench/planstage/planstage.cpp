// Timing and cross-check of versions of the LSH plan kernel (kernels/plan.cu)
// outside the Rust engine: each version is a cubin (build.sh), loaded with the
// driver API and launched like the engine does (persistent grid of
// cuOccupancyMaxActiveBlocksPerMultiprocessor x SMs, the version's own
// shared-memory size). Shapes: issue 3's benchmark, bf16, B*N = 65536,
// H*D = 2048, D in {64, 128}, N in {1024, 4096, 16384}, block_rows 128, P = 16,
// BSHD Q. Every version's plan must equal the first version's byte for byte;
// times are medians of interleaved launches (CUDA events).
//
//   planstage NAME=CUBIN [NAME=CUBIN ...]
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_runtime.h>   // events: the runtime's (this libcuda stub lacks cuEventElapsedTime_v2)

#include "common.cuh"   // PlanParams, the kernels' parameter block

#define CK(x)                                                                    \
    do {                                                                         \
        CUresult r_ = (x);                                                       \
        if (r_ != CUDA_SUCCESS) {                                                \
            const char* s_ = nullptr;                                            \
            cuGetErrorString(r_, &s_);                                           \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, s_); \
            std::exit(1);                                                        \
        }                                                                        \
    } while (0)

struct Version {
    std::string name;
    CUmodule mod;
    CUfunction plan, smem;
};

static uint16_t bf16_of(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: planstage NAME=CUBIN ...\n");
        return 2;
    }
    CK(cuInit(0));
    CUdevice dev;
    CK(cuDeviceGet(&dev, 0));
    CUcontext ctx;
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    int sms = 0;
    CK(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    std::vector<Version> vs;
    for (int i = 1; i < argc; ++i) {
        const char* eq = std::strchr(argv[i], '=');
        if (!eq) return 2;
        Version v;
        v.name = std::string(argv[i], (size_t)(eq - argv[i]));
        CK(cuModuleLoad(&v.mod, eq + 1));
        CK(cuModuleGetFunction(&v.plan, v.mod, "da_plan_bf16_p16"));
        CK(cuModuleGetFunction(&v.smem, v.mod, "plan_smem_bytes_p16"));
        CK(cuFuncSetAttribute(v.plan, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 200 * 1024));
        vs.push_back(v);
    }

    const long long tokens = 65536, width = 2048;
    const int L = 128, P = 16;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    std::vector<uint16_t> hq(tokens * width);
    for (auto& x : hq) x = bf16_of(nd(rng));
    std::vector<float> hr(L * P);
    for (auto& x : hr) x = nd(rng);
    CUdeviceptr q, r, out_ref, out, smem_word;
    CK(cuMemAlloc(&q, hq.size() * 2));
    CK(cuMemcpyHtoD(q, hq.data(), hq.size() * 2));
    CK(cuMemAlloc(&r, hr.size() * 4));
    CK(cuMemcpyHtoD(r, hr.data(), hr.size() * 4));
    const size_t max_plan = (size_t)tokens / 64 * width * 2 * 2;   // generous
    CK(cuMemAlloc(&out_ref, max_plan));
    CK(cuMemAlloc(&out, max_plan));
    CK(cuMemAlloc(&smem_word, 4));
    CUstream st;
    CK(cuStreamCreate(&st, CU_STREAM_NON_BLOCKING));
    cudaEvent_t e0, e1;
    if (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) return 1;

    int bad = 0;
    std::printf("%-4s %-6s", "D", "N");
    for (auto& v : vs) std::printf(" %14s", (v.name + " ms(grid)").c_str());
    std::printf("   GB/s of the first\n");
    for (int D : {64, 128})
        for (int N : {1024, 4096, 16384}) {
            const int B = (int)(tokens / N), H = (int)(width / D), nb = (N + L - 1) / L;
            PlanParams p{};
            p.q = (const void*)q;
            p.proj = (const float*)r;
            p.q_batch_stride = (long long)N * width;
            p.q_row_stride = width;
            p.q_head_stride = D;
            p.q_len = N;
            p.heads = H;
            p.head_dim = D;
            p.block_rows = L;
            p.num_proj = P;
            p.num_blocks = nb;
            p.batch = B;
            const size_t plan_bytes = (size_t)B * H * nb * D * 2;
            const int threads = D > 64 ? 256 : 128;
            std::vector<int> grid(vs.size()), smem(vs.size());
            for (size_t i = 0; i < vs.size(); ++i) {
                int l = L, d = D;
                CUdeviceptr w = smem_word;
                void* a[] = {&l, &d, &w};
                CK(cuLaunchKernel(vs[i].smem, 1, 1, 1, 1, 1, 1, 0, st, a, nullptr));
                CK(cuStreamSynchronize(st));
                CK(cuMemcpyDtoH(&smem[i], smem_word, 4));
                int per_sm = 0;
                CK(cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, vs[i].plan, threads, smem[i]));
                grid[i] = (int)std::min<long long>((long long)B * H * nb, (long long)sms * std::max(per_sm, 1));
            }
            auto launch = [&](size_t i, CUdeviceptr dst) {
                PlanParams pp = p;
                pp.plan = (uint16_t*)dst;
                void* a[] = {&pp};
                CK(cuLaunchKernel(vs[i].plan, grid[i], 1, 1, threads, 1, 1, smem[i], st, a, nullptr));
            };
            // Check: every version's plan equals the first's.
            std::vector<uint16_t> ref(plan_bytes / 2), got(plan_bytes / 2);
            CK(cuMemsetD8(out_ref, 0xFF, plan_bytes));
            launch(0, out_ref);
            CK(cuStreamSynchronize(st));
            CK(cuMemcpyDtoH(ref.data(), out_ref, plan_bytes));
            for (size_t i = 1; i < vs.size(); ++i) {
                CK(cuMemsetD8(out, 0xFF, plan_bytes));
                launch(i, out);
                CK(cuStreamSynchronize(st));
                CK(cuMemcpyDtoH(got.data(), out, plan_bytes));
                if (got != ref) {
                    ++bad;
                    std::printf("MISMATCH: %s differs from %s at D=%d N=%d\n", vs[i].name.c_str(), vs[0].name.c_str(), D, N);
                }
            }
            // Time: rounds of one launch per version, interleaved.
            const int warm = 5, reps = 31;
            std::vector<std::vector<float>> ms(vs.size());
            for (int it = 0; it < warm + reps; ++it)
                for (size_t i = 0; i < vs.size(); ++i) {
                    cudaEventRecord(e0, (cudaStream_t)st);
                    launch(i, out);
                    cudaEventRecord(e1, (cudaStream_t)st);
                    float t = 0;
                    if (cudaEventSynchronize(e1) != cudaSuccess || cudaEventElapsedTime(&t, e0, e1) != cudaSuccess) {
                        std::fprintf(stderr, "event timing failed\n");
                        return 1;
                    }
                    if (it >= warm) ms[i].push_back(t);
                }
            std::printf("%-4d %-6d", D, N);
            double first = 0;
            for (size_t i = 0; i < vs.size(); ++i) {
                std::sort(ms[i].begin(), ms[i].end());
                const double med = ms[i][ms[i].size() / 2];
                if (i == 0) first = med;
                char cell[64];
                std::snprintf(cell, sizeof cell, "%.4f(%d)", med, grid[i]);
                std::printf(" %14s", cell);
            }
            std::printf("   %.0f\n", (double)tokens * width * 2 / (first * 1e-3) / 1e9);
        }
    std::printf(bad ? "FAILED: %d plan mismatches\n" : "all plans equal\n", bad);
    return bad ? 1 : 0;
}
