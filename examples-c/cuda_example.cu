/*
 * DistrAttention on a GPU through the C ABI: device buffers, the program's own
 * stream, the plan and the attention queued on that stream, then the same plan
 * replayed by the CPU entry point on the same inputs and the outputs compared.
 * Then the backward pass: the GPU's gradients (da_cuda_attention_backward on
 * the forward's plan, f32 O and LSE, a bf16 output gradient) against the
 * CPU's da_attention_backward on the same plan, inputs and output gradient,
 * and the same for exact attention.
 *
 *   cuda_example [G]
 *
 * G is the group size (default 2; 1, 2, 4 or 8). Exits 0 after printing
 * "skipped: no CUDA device" where no GPU is usable, 1 if the library was built
 * without CUDA or a result is off, 0 otherwise.
 *
 * Built with nvcc (host code only: the kernels are in the library), e.g.
 *   nvcc -std=c++17 -Iinclude examples-c/cuda_example.cu -Ltarget/release \
 *        -ldistr_attention -Xlinker -rpath,$PWD/target/release -o cuda_example
 * against a library built with `cargo build --release -p distr-attention-ffi
 * --features cuda`.
 */
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "distr_attention.h"
#include "inputs.h"

enum { BATCH = 2, SEQ = 300, Q_HEADS = 4, KV_HEADS = 2, HEAD_DIM = 64 };

static void check(da_status status, const char *what) {
    if (status != DA_STATUS_OK) {
        std::fprintf(stderr, "%s failed: %s (%u): %s\n", what, da_status_string(status), (unsigned)status,
                     da_last_error_message());
        std::exit(1);
    }
}

static void check_cuda(cudaError_t err, const char *what) {
    if (err != cudaSuccess) {
        std::fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(err));
        std::exit(1);
    }
}

/* float -> bfloat16 bits, rounding to nearest even (inputs are finite). */
static uint16_t to_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

/* A dense [BATCH, SEQ, heads, HEAD_DIM] tensor (host or device data). */
static da_tensor dense(const void *data, da_dtype dtype, size_t heads) {
    da_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.batch = BATCH;
    t.seq = SEQ;
    t.heads = heads;
    t.head_dim = HEAD_DIM;
    t.stride_head = HEAD_DIM;
    t.stride_seq = heads * HEAD_DIM;
    t.stride_batch = (size_t)SEQ * heads * HEAD_DIM;
    return t;
}

/* Relative Frobenius error of `got` against `want`, and the largest absolute difference. */
static double relative_error(const std::vector<float> &got, const std::vector<float> &want, double *max_abs) {
    double num = 0, den = 0;
    *max_abs = 0;
    for (size_t i = 0; i < got.size(); i++) {
        double d = (double)got[i] - want[i];
        num += d * d;
        den += (double)want[i] * want[i];
        if (std::fabs(d) > *max_abs || d != d) *max_abs = std::fabs(d);
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}

template <typename T> static T *device_alloc(size_t count) {
    void *p = nullptr;
    check_cuda(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc");
    return static_cast<T *>(p);
}

/* The backward pass on the GPU against the CPU on the same plan; true when they agree. */
static bool backward(da_cuda_context *gpu, da_context *cpu, const da_config &cfg, cudaStream_t stream,
                     const da_tensor &gq, const da_tensor &gk, const da_tensor &gv, const da_tensor &gout,
                     const float *d_lse, const da_tensor &gexact, const float *d_lse_exact, const da_tensor &hq,
                     const da_tensor &hk, const da_tensor &hv, const std::vector<uint16_t> &plan,
                     const uint16_t *d_plan, std::vector<float> &cpu_out, std::vector<float> &cpu_lse,
                     std::vector<float> &cpu_exact, std::vector<float> &cpu_lse_exact) {
    const size_t q_len = (size_t)BATCH * SEQ * Q_HEADS * HEAD_DIM, kv_len = (size_t)BATCH * SEQ * KV_HEADS * HEAD_DIM;
    const size_t lse_len = (size_t)BATCH * Q_HEADS * SEQ;
    /* The output gradient in bf16 on the device, the same numbers in f32 for the CPU. */
    std::vector<uint16_t> d_out(q_len);
    std::vector<float> d_out_f(q_len);
    for (size_t i = 0; i < q_len; i++) {
        d_out[i] = to_bf16(da_example_value((uint32_t)i, 5));
        d_out_f[i] = from_bf16(d_out[i]);
    }
    uint16_t *g_dout = device_alloc<uint16_t>(q_len);
    check_cuda(cudaMemcpyAsync(g_dout, d_out.data(), q_len * 2, cudaMemcpyHostToDevice, stream), "copy d_out");
    /* Three sets of f32 gradients: the caller's workspace, the library's, exact attention. */
    float *g[9];
    for (int i = 0; i < 9; i++) g[i] = device_alloc<float>(i % 3 == 0 ? q_len : kv_len);
    da_tensor gdout = dense(g_dout, DA_DTYPE_BF16, Q_HEADS), gg[9];
    for (int i = 0; i < 9; i++) gg[i] = dense(g[i], DA_DTYPE_F32, i % 3 == 0 ? Q_HEADS : KV_HEADS);

    size_t workspace_size = 0;
    check(da_cuda_backward_workspace_size(&cfg, &gq, &gdout, &workspace_size), "da_cuda_backward_workspace_size");
    void *workspace = nullptr;
    check_cuda(cudaMalloc(&workspace, workspace_size), "cudaMalloc workspace");
    size_t np = plan.size();
    check(da_cuda_attention_backward(gpu, &cfg, d_plan, np, &gq, &gk, &gv, &gout, d_lse, lse_len, &gdout, &gg[0],
                                     &gg[1], &gg[2], workspace, workspace_size, stream),
          "da_cuda_attention_backward");
    /* The same with a workspace the library allocates on the stream. */
    check(da_cuda_attention_backward(gpu, &cfg, d_plan, np, &gq, &gk, &gv, &gout, d_lse, lse_len, &gdout, &gg[3],
                                     &gg[4], &gg[5], nullptr, 0, stream),
          "da_cuda_attention_backward (stream-ordered workspace)");
    check(da_cuda_exact_attention_backward(gpu, &cfg, &gq, &gk, &gv, &gexact, d_lse_exact, lse_len, &gdout, &gg[6],
                                           &gg[7], &gg[8], nullptr, 0, stream),
          "da_cuda_exact_attention_backward");
    std::vector<float> got[9];
    for (int i = 0; i < 9; i++) {
        got[i].resize(i % 3 == 0 ? q_len : kv_len);
        check_cuda(cudaMemcpyAsync(got[i].data(), g[i], got[i].size() * 4, cudaMemcpyDeviceToHost, stream), "copy grad");
    }
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

    /* The CPU on the GPU's plan, from the CPU's forward on that plan. */
    std::vector<float> want[6];
    da_tensor hw[6];
    for (int i = 0; i < 6; i++) {
        want[i].resize(i % 3 == 0 ? q_len : kv_len);
        hw[i] = dense(want[i].data(), DA_DTYPE_F32, i % 3 == 0 ? Q_HEADS : KV_HEADS);
    }
    da_tensor hout = dense(cpu_out.data(), DA_DTYPE_F32, Q_HEADS), hexact = dense(cpu_exact.data(), DA_DTYPE_F32, Q_HEADS);
    da_tensor hdout = dense(d_out_f.data(), DA_DTYPE_F32, Q_HEADS);
    check(da_attention_backward(cpu, &cfg, plan.data(), np, &hq, &hk, &hv, &hout, cpu_lse.data(), lse_len, &hdout,
                                &hw[0], &hw[1], &hw[2]),
          "da_attention_backward (CPU, the GPU's plan)");
    check(da_exact_attention_backward(cpu, &cfg, &hq, &hk, &hv, &hexact, cpu_lse_exact.data(), lse_len, &hdout,
                                      &hw[3], &hw[4], &hw[5]),
          "da_exact_attention_backward (CPU)");

    const char *names[3] = {"dq", "dk", "dv"};
    bool ok = true;
    double max_abs;
    for (int i = 0; i < 3; i++) {
        double e = relative_error(got[i], want[i], &max_abs), ee = relative_error(got[6 + i], want[3 + i], &max_abs);
        std::printf("backward GPU vs CPU on the same plan: %s rel. error %.3e; exact attention %.3e\n", names[i], e, ee);
        /* The GPU rounds P and dS to bf16 as tensor-core operands (as FlashAttention-2 does). */
        ok &= e < 3e-2 && ee < 3e-2;
    }
    /* dK and dV are deterministic; dQ sums f32 atomics in a varying order. */
    bool same = got[4] == got[1] && got[5] == got[2];
    double dq_again = relative_error(got[3], got[0], &max_abs);
    std::printf("backward with the library's workspace: dk, dv identical: %s; dq rel. difference %.3e\n",
                same ? "yes" : "NO", dq_again);
    ok &= same && dq_again < 1e-5;
    std::printf("backward workspace: %zu bytes\n", workspace_size);
    for (float *p : g) cudaFree(p);
    cudaFree(g_dout), cudaFree(workspace);
    return ok;
}

int main(int argc, char **argv) {
    unsigned group_size = argc > 1 ? (unsigned)std::strtoul(argv[1], nullptr, 10) : 2;
    std::printf("distr_attention %s, CUDA entry points %s\n", da_version(), da_cuda_built() ? "built" : "not built");
    int devices = 0;
    cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
        std::printf("skipped: no CUDA device (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        return 0;
    }
    if (!da_cuda_built()) {
        std::fprintf(stderr, "this libdistr_attention was built without CUDA (cargo feature `cuda`)\n");
        return 1;
    }
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    check_cuda(cudaFree(0), "cudaFree(0)"); /* the device's primary context, now current */
    cudaDeviceProp prop;
    check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    std::printf("device: %s (compute capability %d.%d)\n", prop.name, prop.major, prop.minor);
    cudaStream_t stream;
    check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");

    /* Inputs in bf16, the same numbers on the host and on the device. */
    const size_t q_len = (size_t)BATCH * SEQ * Q_HEADS * HEAD_DIM, kv_len = (size_t)BATCH * SEQ * KV_HEADS * HEAD_DIM;
    const size_t lse_len = (size_t)BATCH * Q_HEADS * SEQ;
    std::vector<uint16_t> q(q_len), k(kv_len), v(kv_len);
    for (size_t i = 0; i < q_len; i++) q[i] = to_bf16(da_example_query((uint32_t)i));
    for (size_t i = 0; i < kv_len; i++) {
        k[i] = to_bf16(da_example_value((uint32_t)i, 2));
        v[i] = to_bf16(da_example_value((uint32_t)i, 3));
    }
    uint16_t *d_q = device_alloc<uint16_t>(q_len), *d_k = device_alloc<uint16_t>(kv_len);
    uint16_t *d_v = device_alloc<uint16_t>(kv_len), *d_out16 = device_alloc<uint16_t>(q_len);
    float *d_out = device_alloc<float>(q_len), *d_exact = device_alloc<float>(q_len), *d_lse = device_alloc<float>(lse_len);
    float *d_lse_exact = device_alloc<float>(lse_len);
    check_cuda(cudaMemcpyAsync(d_q, q.data(), q_len * 2, cudaMemcpyHostToDevice, stream), "copy q");
    check_cuda(cudaMemcpyAsync(d_k, k.data(), kv_len * 2, cudaMemcpyHostToDevice, stream), "copy k");
    check_cuda(cudaMemcpyAsync(d_v, v.data(), kv_len * 2, cudaMemcpyHostToDevice, stream), "copy v");

    da_config cfg;
    check(da_config_default(&cfg, sizeof cfg), "da_config_default");
    cfg.group_size = group_size;
    cfg.causal = 1;
    da_tensor gq = dense(d_q, DA_DTYPE_BF16, Q_HEADS), gk = dense(d_k, DA_DTYPE_BF16, KV_HEADS);
    da_tensor gv = dense(d_v, DA_DTYPE_BF16, KV_HEADS);
    da_tensor gout = dense(d_out, DA_DTYPE_F32, Q_HEADS), gout16 = dense(d_out16, DA_DTYPE_BF16, Q_HEADS);
    da_tensor gexact = dense(d_exact, DA_DTYPE_F32, Q_HEADS);
    da_plan_shape shape;
    check(da_get_plan_shape(&cfg, &gq, &shape), "da_get_plan_shape");
    uint16_t *d_plan = device_alloc<uint16_t>(shape.num_entries), *d_plan2 = device_alloc<uint16_t>(shape.num_entries);

    /* The GPU: plan, attention on it (f32 output and the log-sum-exp), the
     * one-shot forward with a bf16 output, and exact attention, all queued on
     * the program's stream. */
    da_cuda_context *gpu = nullptr;
    check(da_cuda_context_create(&gpu), "da_cuda_context_create");
    check(da_cuda_plan(gpu, &cfg, &gq, d_plan, shape.num_entries, stream), "da_cuda_plan");
    check(da_cuda_attention(gpu, &cfg, d_plan, shape.num_entries, &gq, &gk, &gv, &gout, d_lse, lse_len, stream),
          "da_cuda_attention");
    check(da_cuda_forward(gpu, &cfg, &gq, &gk, &gv, &gout16, nullptr, 0, d_plan2, shape.num_entries, stream),
          "da_cuda_forward");
    check(da_cuda_exact_attention(gpu, &cfg, &gq, &gk, &gv, &gexact, d_lse_exact, lse_len, stream),
          "da_cuda_exact_attention");
    std::vector<float> out(q_len), exact(q_len), lse(lse_len);
    std::vector<uint16_t> out16(q_len), plan(shape.num_entries), plan2(shape.num_entries);
    check_cuda(cudaMemcpyAsync(out.data(), d_out, q_len * 4, cudaMemcpyDeviceToHost, stream), "copy out");
    check_cuda(cudaMemcpyAsync(exact.data(), d_exact, q_len * 4, cudaMemcpyDeviceToHost, stream), "copy exact");
    check_cuda(cudaMemcpyAsync(lse.data(), d_lse, lse_len * 4, cudaMemcpyDeviceToHost, stream), "copy lse");
    check_cuda(cudaMemcpyAsync(out16.data(), d_out16, q_len * 2, cudaMemcpyDeviceToHost, stream), "copy out16");
    check_cuda(cudaMemcpyAsync(plan.data(), d_plan, shape.num_entries * 2, cudaMemcpyDeviceToHost, stream), "copy plan");
    check_cuda(cudaMemcpyAsync(plan2.data(), d_plan2, shape.num_entries * 2, cudaMemcpyDeviceToHost, stream),
               "copy plan2");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

    /* The CPU: the GPU's plan replayed on the same bf16 inputs, its own plan,
     * and exact attention. */
    da_context *cpu = nullptr;
    check(da_context_new(&cpu), "da_context_new");
    da_tensor hq = dense(q.data(), DA_DTYPE_BF16, Q_HEADS), hk = dense(k.data(), DA_DTYPE_BF16, KV_HEADS);
    da_tensor hv = dense(v.data(), DA_DTYPE_BF16, KV_HEADS);
    std::vector<float> cpu_out(q_len), cpu_exact(q_len), cpu_lse(lse_len), cpu_lse_exact(lse_len);
    std::vector<uint16_t> cpu_plan(shape.num_entries);
    da_tensor hout = dense(cpu_out.data(), DA_DTYPE_F32, Q_HEADS), hexact = dense(cpu_exact.data(), DA_DTYPE_F32, Q_HEADS);
    check(da_attention(cpu, &cfg, plan.data(), plan.size(), &hq, &hk, &hv, &hout, cpu_lse.data(), lse_len),
          "da_attention (CPU, the GPU's plan)");
    check(da_plan(cpu, &cfg, &hq, cpu_plan.data(), cpu_plan.size()), "da_plan (CPU)");
    check(da_exact_attention(cpu, &cfg, &hq, &hk, &hv, &hexact, cpu_lse_exact.data(), lse_len),
          "da_exact_attention (CPU)");

    size_t blocks = shape.batch * shape.heads * shape.blocks, differing = 0;
    for (size_t b = 0; b < blocks; b++) {
        differing += std::memcmp(&plan[b * HEAD_DIM], &cpu_plan[b * HEAD_DIM], HEAD_DIM * 2) != 0;
    }
    std::vector<float> out16_f(q_len);
    for (size_t i = 0; i < q_len; i++) out16_f[i] = from_bf16(out16[i]);
    double max_abs, max_abs16, max_abs_exact, lse_max = 0;
    double rel = relative_error(out, cpu_out, &max_abs);
    double rel16 = relative_error(out16_f, cpu_out, &max_abs16);
    double rel_exact = relative_error(exact, cpu_exact, &max_abs_exact);
    for (size_t i = 0; i < lse_len; i++) {
        double d = std::fabs((double)lse[i] - cpu_lse[i]);
        if (d > lse_max || d != d) lse_max = d;
    }
    double approx_max;
    double vs_exact = relative_error(cpu_out, cpu_exact, &approx_max);
    bool same_plan = plan == plan2;

    std::printf("problem: bf16 Q [%d, %d, %d, %d], K/V with %d heads, causal, G = %u, block_rows %zu\n", BATCH, SEQ,
                Q_HEADS, HEAD_DIM, KV_HEADS, group_size, cfg.block_rows);
    std::printf("GPU plan vs CPU plan: %zu of %zu blocks differ (f32 vs f64 dot products near zero)\n", differing,
                blocks);
    std::printf("da_cuda_forward's plan equals da_cuda_plan's: %s\n", same_plan ? "yes" : "NO");
    std::printf("GPU vs CPU on the same plan: f32 output rel. error %.3e (max abs %.3e), lse max abs %.3e\n", rel,
                max_abs, lse_max);
    std::printf("GPU vs CPU on the same plan: bf16 output rel. error %.3e (max abs %.3e)\n", rel16, max_abs16);
    std::printf("GPU vs CPU exact attention: rel. error %.3e (max abs %.3e)\n", rel_exact, max_abs_exact);
    std::printf("DistrAttention (G = %u) vs exact attention on the CPU: rel. error %.3e\n", group_size, vs_exact);

    /* The GPU rounds Q-hat, K-hat and P to bf16 (as FlashAttention rounds P);
     * the CPU computes in f32 from the same bf16 inputs. */
    bool ok = same_plan && rel < 1e-2 && rel16 < 1.5e-2 && lse_max < 1e-2 && rel_exact < 1e-2;
    ok = backward(gpu, cpu, cfg, stream, gq, gk, gv, gout, d_lse, gexact, d_lse_exact, hq, hk, hv, plan, d_plan,
                  cpu_out, cpu_lse, cpu_exact, cpu_lse_exact) && ok;
    da_context_free(cpu);
    da_cuda_context_destroy(gpu);
    cudaFree(d_q), cudaFree(d_k), cudaFree(d_v), cudaFree(d_out16), cudaFree(d_out), cudaFree(d_exact);
    cudaFree(d_lse), cudaFree(d_lse_exact), cudaFree(d_plan), cudaFree(d_plan2);
    cudaStreamDestroy(stream);
    std::printf("%s\n", ok ? "GPU and CPU agree" : "MISMATCH between GPU and CPU");
    return ok ? 0 : 1;
}
