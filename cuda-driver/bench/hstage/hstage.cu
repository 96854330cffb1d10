// Stage-removal timing and cross-version check of the Hopper kernel
// (kernels/hfwd.cu and the v2 copy beside this file), bf16, outside the Rust
// engine: the same FwdParams, grid and shared memory as the engine's launch.
//
//   build.sh here (nvcc, sm_90a; see it for the flags), device.sh on the GPU:
//   ./hstage time                 # table: effective TFLOP/s per (G, kAblate)
//   ./hstage dump FILE            # small cases with tails -> raw outputs
//   ./hstage check FILE           # the same cases, max |diff| against FILE
//
// kAblate (see hfwd_body): bit 0 no transpose/fuse of Khat (stale Khat), bit 1
// no raw-K loads, bit 2 no softmax (v4 also had bit 3, the serial consumer
// order, which is v5's only order). Ablated outputs are meaningless; only
// kAblate = 0 is checked.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include HFWD_FILE

#define CK(x)                                                                               \
    do {                                                                                    \
        cudaError_t e_ = (x);                                                               \
        if (e_ != cudaSuccess) {                                                            \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

using T = __nv_bfloat16;
constexpr int D = DA_HEAD_DIM;

template <int G, int X>
__global__ void __launch_bounds__(da::kHThreads, 1) hkern(const __grid_constant__ FwdParams p) {
#if DA_HOPPER
    da::hfwd_body<T, D, G, X>(p);
#endif
}

__global__ void fill(T* x, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        x[i] = __float2bfloat16((float)(h & 0xFFFF) / 32768.f - 1.f);
    }
}

struct Problem {
    int B, H, N;
    bool causal;
    T *q, *k, *v, *o;
    uint16_t* plan;
    FwdParams p;
};

static Problem make(int B, int H, int N, bool causal, uint32_t seed) {
    Problem pr{B, H, N, causal};
    size_t n = (size_t)B * N * H * D;
    CK(cudaMalloc(&pr.q, n * 2));
    CK(cudaMalloc(&pr.k, n * 2));
    CK(cudaMalloc(&pr.v, n * 2));
    CK(cudaMalloc(&pr.o, n * 2));
    fill<<<1024, 256>>>(pr.q, n, seed);
    fill<<<1024, 256>>>(pr.k, n, seed * 3 + 1);
    fill<<<1024, 256>>>(pr.v, n, seed * 5 + 2);
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
    return pr;
}

template <int G, int X>
static void launch(const Problem& pr, cudaStream_t st) {
    constexpr int smem = da::HTraits<D, G>::kSmem;
    static bool once = false;
    if (!once) {
        CK(cudaFuncSetAttribute(hkern<G, X>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        once = true;
    }
    dim3 grid(pr.p.num_blocks, pr.H, pr.B);
    hkern<G, X><<<grid, da::kHThreads, smem, st>>>(pr.p);
    CK(cudaGetLastError());
}

template <int G, int X>
static double time_ms(const Problem& pr) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) launch<G, X>(pr, 0);
    std::vector<float> ms;
    for (int i = 0; i < 15; ++i) {
        CK(cudaEventRecord(a));
        launch<G, X>(pr, 0);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float t;
        CK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

template <int G, int X>
static void row(const char* what, const Problem& pr) {
    const double ms = time_ms<G, X>(pr);
    const double flops = 4.0 * pr.B * pr.H * (double)pr.N * pr.N * D * (pr.causal ? 0.5 : 1.0);
    printf("%-34s G=%d X=%d causal=%d  %8.3f ms  %6.1f TFLOP/s\n", what, G, X, (int)pr.causal, ms,
           flops / ms / 1e9);
}

// Small cases with key tails and causal masking, for dump/check.
struct Case {
    int B, H, N;
    bool causal;
};
static const Case kCases[] = {{1, 2, 1000, false}, {1, 2, 1000, true}, {2, 1, 300, true}, {1, 1, 129, false}};

template <int G, int X>
static void run_case(const Case& c, int idx, std::vector<T>& out) {
    Problem pr = make(c.B, c.H, c.N, c.causal, 17 + idx);
    launch<G, X>(pr, 0);
    CK(cudaDeviceSynchronize());
    out.resize((size_t)c.B * c.N * c.H * D);
    CK(cudaMemcpy(out.data(), pr.o, out.size() * 2, cudaMemcpyDeviceToHost));
}

template <int X>
static void all_outputs(std::vector<std::vector<T>>& outs) {
    int idx = 0;
    for (const Case& c : kCases) {
        std::vector<T> o;
        run_case<1, X>(c, idx, o), outs.push_back(o);
        run_case<2, X>(c, idx, o), outs.push_back(o);
        run_case<4, X>(c, idx, o), outs.push_back(o);
        run_case<8, X>(c, idx, o), outs.push_back(o);
        ++idx;
    }
}

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "time";
    if (mode == "dump" || mode == "check") {
        // check: the kernel as built into the library (X = 0). v4's runs also
        // checked its serial consumer order (X = 8, -DHSTAGE_CHECK_SERIAL,
        // results/hopper-v3/run2_check_*.log); v5 kept only that order.
        std::vector<std::vector<T>> outs;
        all_outputs<0>(outs);
        if (mode == "dump") {
            FILE* f = fopen(argv[2], "wb");
            for (auto& o : outs) fwrite(o.data(), 2, o.size(), f);
            fclose(f);
            printf("dumped %zu outputs\n", outs.size());
            return 0;
        }
        FILE* f = fopen(argv[2], "rb");
        if (!f) return 2;
        int bad = 0, k = 0;
        for (auto& o : outs) {
            std::vector<T> ref(o.size());
            if (fread(ref.data(), 2, ref.size(), f) != ref.size()) return 2;
            double md = 0, mref = 0;
            size_t nd = 0;
            for (size_t i = 0; i < o.size(); ++i) {
                const double a = __bfloat162float(o[i]), r = __bfloat162float(ref[i]);
                if (!(std::fabs(a - r) <= md)) md = std::isnan(a - r) ? INFINITY : std::fabs(a - r);
                mref = std::max(mref, std::fabs(r));
                nd += a != r;
            }
            const int G = 1 << (k % 4);
            printf("%scase %d G=%d: max|diff| %.3g (max|ref| %.3g), %zu of %zu differ\n", "", k / 4, G, md, mref, nd, o.size());
            bad += !(md <= 0.02 * std::max(mref, 1e-3));
            ++k;
        }
        fclose(f);
        printf("%s\n", bad ? "CHECK FAILED" : "check ok");
        return bad ? 1 : 0;
    }
    if (D != 128) return 0;
    for (int causal = 0; causal < 2; ++causal) {
        Problem pr = make(16, 16, 4096, causal, 7);
        row<1, 0>("G=1", pr);
        row<1, 4>("G=1 no softmax", pr);
        row<2, 0>("G=2+plan full", pr);
        row<2, 1>("G=2 no Khat fuse", pr);
        row<2, 3>("G=2 no fuse, no raw-K loads", pr);
        row<2, 4>("G=2 no softmax", pr);
        row<2, 7>("G=2 V loads + GEMMs only", pr);
        row<4, 0>("G=4+plan full", pr);
        row<4, 1>("G=4 no Khat fuse", pr);
        row<4, 3>("G=4 no fuse, no raw-K loads", pr);
        row<8, 0>("G=8+plan full", pr);
        CK(cudaFree(pr.q));
        CK(cudaFree(pr.k));
        CK(cudaFree(pr.v));
        CK(cudaFree(pr.o));
        CK(cudaFree(pr.plan));
    }
    return 0;
}
