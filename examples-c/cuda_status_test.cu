/*
 * The error paths of the CUDA entry points on a device: each class of bad
 * argument, checking the status and the message, then that nothing was
 * written to the output (nor to a gradient of the backward). Also what is
 * allowed: the default stream (NULL), page-locked host and managed memory, a
 * NULL plan when every head has G = 1, the backward with the caller's
 * workspace and with none (stream-ordered).
 * Prints "N passed, M failed" and exits nonzero on any failure; prints
 * "skipped: no CUDA device" and exits 0 where there is no usable GPU.
 *
 * Also the C++ wrapper's CudaContext (distr_attention.hpp).
 *
 * Built like cuda_example.cu, plus -lcuda (the driver API: cuCtxPopCurrent).
 */
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "distr_attention.hpp"

static int passed, failed;

static void expect(const char *what, da_status got, da_status want, const char *needle) {
    const char *msg = da_last_error_message();
    bool ok = got == want && (want == DA_STATUS_OK ? msg[0] == '\0' : msg[0] != '\0' && std::strstr(msg, needle));
    if (ok) {
        passed++;
        std::printf("ok   %-44s %-38s %s\n", what, da_status_string(got), msg);
    } else {
        failed++;
        std::printf("FAIL %-44s got %u (%s), want %u; message: \"%s\", expected to contain \"%s\"\n", what,
                    (unsigned)got, da_status_string(got), (unsigned)want, msg, needle);
    }
}

static void require(bool cond, const char *what) {
    if (cond) {
        passed++;
        std::printf("ok   %s\n", what);
    } else {
        failed++;
        std::printf("FAIL %s\n", what);
    }
}

static void check_cuda(cudaError_t err, const char *what) {
    if (err != cudaSuccess) {
        std::fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(err));
        std::exit(1);
    }
}

enum { B = 1, N = 128, H = 2, D = 64 };
static const size_t LEN = (size_t)B * N * H * D;

static da_tensor dense(const void *data, da_dtype dtype) {
    da_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.batch = B;
    t.seq = N;
    t.heads = H;
    t.head_dim = D;
    t.stride_head = D;
    t.stride_seq = H * D;
    t.stride_batch = (size_t)N * H * D;
    return t;
}

int main() {
    int devices = 0;
    cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
        std::printf("skipped: no CUDA device (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        return 0;
    }
    if (!da_cuda_built()) {
        std::fprintf(stderr, "this libdistr_attention was built without CUDA\n");
        return 1;
    }
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    check_cuda(cudaFree(0), "cudaFree(0)");
    cudaStream_t stream;
    check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");

    std::vector<uint16_t> host(LEN);
    for (size_t i = 0; i < LEN; i++) host[i] = (uint16_t)(0x3c00 + (i * 37) % 512); /* bf16 values in [0.5, 2) */
    void *q, *k, *v, *out, *out2, *lse, *plan, *big;
    for (void **p : {&q, &k, &v}) {
        check_cuda(cudaMalloc(p, LEN * 2), "cudaMalloc");
        check_cuda(cudaMemcpy(*p, host.data(), LEN * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    }
    check_cuda(cudaMalloc(&out, LEN * 4), "cudaMalloc");
    check_cuda(cudaMalloc(&out2, LEN * 4), "cudaMalloc");
    check_cuda(cudaMalloc(&lse, B * H * N * 4), "cudaMalloc");
    check_cuda(cudaMalloc(&big, 1 << 22), "cudaMalloc");
    da_config cfg, c;
    da_config_default(&cfg, sizeof cfg);
    da_tensor tq = dense(q, DA_DTYPE_BF16), tk = dense(k, DA_DTYPE_BF16), tv = dense(v, DA_DTYPE_BF16);
    da_tensor to = dense(out, DA_DTYPE_F32), t, u;
    da_plan_shape shape;
    da_get_plan_shape(&cfg, &tq, &shape);
    const size_t np = shape.num_entries;
    check_cuda(cudaMalloc(&plan, np * 2), "cudaMalloc");

    da_cuda_context *ctx = nullptr;
    expect("da_cuda_context_create", da_cuda_context_create(&ctx), DA_STATUS_OK, "");
    expect("forward on the program's stream", da_cuda_forward(ctx, &cfg, &tq, &tk, &tv, &to, (float *)lse, B * H * N,
                                                              (uint16_t *)plan, np, stream),
           DA_STATUS_OK, "");
    check_cuda(cudaStreamSynchronize(stream), "sync");
    std::vector<float> want(LEN), got(LEN);
    check_cuda(cudaMemcpy(want.data(), out, LEN * 4, cudaMemcpyDeviceToHost), "copy");

    /* Allowed: the default stream, page-locked host memory, managed memory. */
    da_tensor to2 = dense(out2, DA_DTYPE_F32);
    expect("forward on the default stream (NULL)",
           da_cuda_forward(ctx, &cfg, &tq, &tk, &tv, &to2, nullptr, 0, nullptr, 0, nullptr), DA_STATUS_OK, "");
    check_cuda(cudaDeviceSynchronize(), "sync");
    check_cuda(cudaMemcpy(got.data(), out2, LEN * 4, cudaMemcpyDeviceToHost), "copy");
    require(std::memcmp(got.data(), want.data(), LEN * 4) == 0, "the default stream gives identical results");
    void *pinned, *managed;
    check_cuda(cudaMallocHost(&pinned, LEN * 2), "cudaMallocHost");
    check_cuda(cudaMallocManaged(&managed, LEN * 2), "cudaMallocManaged");
    std::memcpy(pinned, host.data(), LEN * 2);
    std::memcpy(managed, host.data(), LEN * 2);
    t = dense(pinned, DA_DTYPE_BF16);
    u = dense(managed, DA_DTYPE_BF16);
    expect("q in page-locked host memory, k managed",
           da_cuda_forward(ctx, &cfg, &t, &u, &tv, &to2, nullptr, 0, nullptr, 0, stream), DA_STATUS_OK, "");
    check_cuda(cudaStreamSynchronize(stream), "sync");
    check_cuda(cudaMemcpy(got.data(), out2, LEN * 4, cudaMemcpyDeviceToHost), "copy");
    require(std::memcmp(got.data(), want.data(), LEN * 4) == 0, "page-locked and managed inputs give identical results");
    c = cfg, c.group_size = 1;
    expect("G = 1 with a NULL plan",
           da_cuda_attention(ctx, &c, nullptr, 0, &tq, &tk, &tv, &to2, nullptr, 0, stream), DA_STATUS_OK, "");

    /* The backward pass on the first forward's plan, output and lse. */
    void *dq, *dk, *dv, *dout, *ws;
    for (void **p : {&dq, &dk, &dv}) check_cuda(cudaMalloc(p, LEN * 4), "cudaMalloc");
    check_cuda(cudaMalloc(&dout, LEN * 2), "cudaMalloc");
    check_cuda(cudaMemcpy(dout, host.data(), LEN * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    da_tensor tdq = dense(dq, DA_DTYPE_F32), tdk = dense(dk, DA_DTYPE_F32), tdv = dense(dv, DA_DTYPE_F32);
    da_tensor tdout = dense(dout, DA_DTYPE_BF16);
    size_t ws_size = 0;
    expect("backward workspace size", da_cuda_backward_workspace_size(&cfg, &tq, &tdout, &ws_size), DA_STATUS_OK, "");
    require(ws_size >= (size_t)B * H * N * (D + 1) * 4, "the workspace holds f32 dQ accumulators and row sums");
    check_cuda(cudaMalloc(&ws, ws_size), "cudaMalloc");
    const float *flse = (const float *)lse;
    const uint16_t *cplan = (const uint16_t *)plan;
    expect("backward, the caller's workspace",
           da_cuda_attention_backward(ctx, &cfg, cplan, np, &tq, &tk, &tv, &to, flse, B * H * N, &tdout, &tdq, &tdk,
                                      &tdv, ws, ws_size, stream),
           DA_STATUS_OK, "");
    expect("backward, stream-ordered workspace, default stream",
           da_cuda_attention_backward(ctx, &cfg, cplan, np, &tq, &tk, &tv, &to, flse, B * H * N, &tdout, &tdq, &tdk,
                                      &tdv, nullptr, 0, nullptr),
           DA_STATUS_OK, "");
    expect("exact backward",
           da_cuda_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, flse, B * H * N, &tdout, &tdq, &tdk, &tdv,
                                            nullptr, 0, stream),
           DA_STATUS_OK, "");
    {
        distr_attention::CudaContext cpp;
        distr_attention::Config config;
        size_t size = distr_attention::CudaContext::backward_workspace_size(config, tq, tdout);
        require(size == ws_size, "CudaContext::backward_workspace_size");
        cpp.attention_backward(config, cplan, np, tq, tk, tv, to, flse, B * H * N, tdout, tdq, tdk, tdv, stream, ws,
                               ws_size);
        try {
            cpp.exact_attention_backward(config, tq, tk, tv, to, nullptr, 0, tdout, tdq, tdk, tdv, stream);
            require(false, "CudaContext::exact_attention_backward without an lse throws");
        } catch (const distr_attention::Error &e) {
            require(e.status() == DA_STATUS_NULL_POINTER && std::strstr(e.what(), "lse"),
                    "CudaContext::exact_attention_backward without an lse throws");
        }
    }
    check_cuda(cudaDeviceSynchronize(), "sync");

    {
        /* The C++ wrapper: the same forward, and an error as an exception. */
        distr_attention::CudaContext cpp;
        distr_attention::Config config;
        cpp.forward(config, tq, tk, tv, to2, stream);
        check_cuda(cudaStreamSynchronize(stream), "sync");
        check_cuda(cudaMemcpy(got.data(), out2, LEN * 4, cudaMemcpyDeviceToHost), "copy");
        require(std::memcmp(got.data(), want.data(), LEN * 4) == 0, "CudaContext::forward gives identical results");
        try {
            cpp.attention(config.group_size(2), nullptr, 0, tq, tk, tv, to2, stream);
            require(false, "CudaContext::attention without a plan throws");
        } catch (const distr_attention::Error &e) {
            require(e.status() == DA_STATUS_NULL_POINTER && std::strstr(e.what(), "plan"),
                    "CudaContext::attention without a plan throws");
        }
    }

    /* From here on every call fails: the output and dq must stay as they are. */
    check_cuda(cudaMemset(out, 0xff, LEN * 4), "cudaMemset");
    check_cuda(cudaMemset(dq, 0xff, LEN * 4), "cudaMemset");
    check_cuda(cudaDeviceSynchronize(), "sync");

    expect("NULL handle", da_cuda_forward(nullptr, &cfg, &tq, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_NULL_POINTER, "context");
    expect("NULL config", da_cuda_forward(ctx, nullptr, &tq, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_NULL_POINTER, "config");
    t = tk, t.data = nullptr;
    expect("NULL k data", da_cuda_forward(ctx, &cfg, &tq, &t, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_NULL_POINTER, "k: data pointer");
    expect("G = 2 without a plan",
           da_cuda_attention(ctx, &cfg, nullptr, 0, &tq, &tk, &tv, &to, nullptr, 0, stream), DA_STATUS_NULL_POINTER,
           "no plan");

    t = tq, t.data = host.data();
    expect("q in pageable host memory", da_cuda_forward(ctx, &cfg, &t, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_INVALID_ARGUMENT, "not memory CUDA knows");
    std::vector<float> host_lse(B * H * N);
    expect("lse in pageable host memory",
           da_cuda_forward(ctx, &cfg, &tq, &tk, &tv, &to, host_lse.data(), host_lse.size(), nullptr, 0, stream),
           DA_STATUS_INVALID_ARGUMENT, "lse");
    /* K starting 16 KiB before the end of a 4 MiB allocation (a multiple of
     * the driver's granularity, so its size is exact): its 32 KiB run past. */
    t = tk, t.data = (const char *)big + (1 << 22) - (1 << 14);
    expect("k's extent past its allocation",
           da_cuda_forward(ctx, &cfg, &tq, &t, &tv, &to, nullptr, 0, nullptr, 0, stream), DA_STATUS_BUFFER_TOO_SMALL,
           "k: its extent");
    t = tq, t.data = (const char *)q + 2;
    expect("misaligned q", da_cuda_forward(ctx, &cfg, &t, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_MISALIGNED_POINTER, "16-byte");
    t = dense(q, DA_DTYPE_F32);
    expect("output over q", da_cuda_forward(ctx, &cfg, &tq, &tk, &tv, &t, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_OVERLAPPING_BUFFERS, "overlaps");
    expect("lse short", da_cuda_forward(ctx, &cfg, &tq, &tk, &tv, &to, (float *)lse, B * H * N - 1, nullptr, 0, stream),
           DA_STATUS_BUFFER_TOO_SMALL, "lse");
    expect("plan short", da_cuda_attention(ctx, &cfg, (uint16_t *)plan, np - 1, &tq, &tk, &tv, &to, nullptr, 0, stream),
           DA_STATUS_BUFFER_TOO_SMALL, "plan");
    t = tk, t.head_dim = 32, t.stride_head = 32;
    expect("k head_dim", da_cuda_forward(ctx, &cfg, &tq, &t, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_SHAPE_MISMATCH, "k: dimension head_dim");
    c = cfg, c.group_size = 3;
    expect("G = 3", da_cuda_forward(ctx, &c, &tq, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream), DA_STATUS_BAD_CONFIG,
           "group size 3");
    c = cfg, c.group_size = 16;
    expect("G = 16", da_cuda_forward(ctx, &c, &tq, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_UNSUPPORTED, "group sizes 1, 2, 4 and 8");
    c = cfg, c.block_rows = 32;
    expect("block_rows 32", da_cuda_forward(ctx, &c, &tq, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_UNSUPPORTED, "block_rows");
    t = dense(big, DA_DTYPE_F32);
    expect("f32 inputs", da_cuda_forward(ctx, &cfg, &t, &t, &t, &to, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_UNSUPPORTED, "f16 or bf16");
    t = dense(out, DA_DTYPE_F16);
    expect("f16 output of bf16 inputs", da_cuda_forward(ctx, &cfg, &tq, &tk, &tv, &t, nullptr, 0, nullptr, 0, stream),
           DA_STATUS_UNSUPPORTED, "output");
    c = cfg, c.grouping = DA_GROUPING_KEY_WEIGHTED;
    expect("key-weighted plan without keys", da_cuda_plan(ctx, &c, &tq, (uint16_t *)plan, np, stream),
           DA_STATUS_UNSUPPORTED, "keys");
    {
        /* No context current on this thread, then the handle's back. */
        CUcontext primary = nullptr;
        cuCtxPopCurrent(&primary);
        expect("no context current", da_cuda_forward(ctx, &cfg, &tq, &tk, &tv, &to, nullptr, 0, nullptr, 0, stream),
               DA_STATUS_CUDA_ERROR, "not current");
        cuCtxPushCurrent(primary);
    }

    /* The backward's checks (O is NaN now: no call below may launch). */
#define BWD(WS, WS_SIZE) \
    da_cuda_attention_backward(ctx, &cfg, cplan, np, &tq, &tk, &tv, &to, flse, B * H * N, &tdout, &tdq, &tdk, &tdv, \
                               WS, WS_SIZE, stream)
    expect("backward: NULL handle",
           da_cuda_attention_backward(nullptr, &cfg, cplan, np, &tq, &tk, &tv, &to, flse, B * H * N, &tdout, &tdq,
                                      &tdk, &tdv, ws, ws_size, stream),
           DA_STATUS_NULL_POINTER, "context");
    expect("backward: NULL lse",
           da_cuda_attention_backward(ctx, &cfg, cplan, np, &tq, &tk, &tv, &to, nullptr, 0, &tdout, &tdq, &tdk, &tdv,
                                      ws, ws_size, stream),
           DA_STATUS_NULL_POINTER, "lse");
    expect("backward: G = 2 without a plan",
           da_cuda_attention_backward(ctx, &cfg, nullptr, 0, &tq, &tk, &tv, &to, flse, B * H * N, &tdout, &tdq, &tdk,
                                      &tdv, ws, ws_size, stream),
           DA_STATUS_NULL_POINTER, "no plan");
    expect("backward: workspace short", BWD(ws, ws_size - 16), DA_STATUS_BUFFER_TOO_SMALL, "workspace");
    expect("backward: misaligned workspace", BWD((char *)ws + 8, ws_size), DA_STATUS_MISALIGNED_POINTER,
           "workspace");
    void *host_ws = std::aligned_alloc(256, (ws_size + 255) / 256 * 256);
    expect("backward: workspace in pageable host memory", BWD(host_ws, ws_size), DA_STATUS_INVALID_ARGUMENT,
           "workspace");
    std::free(host_ws);
    expect("backward: workspace past its allocation", BWD((char *)big + (1 << 22) - 256, ws_size),
           DA_STATUS_BUFFER_TOO_SMALL, "workspace: its extent");
    expect("backward: workspace over dk", BWD(dk, ws_size), DA_STATUS_OVERLAPPING_BUFFERS, "overlaps");
    t = dense(dout, DA_DTYPE_F16);
    expect("backward: f16 d_out of bf16 inputs",
           da_cuda_attention_backward(ctx, &cfg, cplan, np, &tq, &tk, &tv, &to, flse, B * H * N, &t, &tdq, &tdk, &tdv,
                                      ws, ws_size, stream),
           DA_STATUS_UNSUPPORTED, "d_out");
    t = dense(q, DA_DTYPE_F32);
    expect("backward: dk over q",
           da_cuda_attention_backward(ctx, &cfg, cplan, np, &tq, &tk, &tv, &to, flse, B * H * N, &tdout, &tdq, &t,
                                      &tdv, ws, ws_size, stream),
           DA_STATUS_OVERLAPPING_BUFFERS, "dk");
    expect("backward: lse short",
           da_cuda_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, flse, B * H * N - 1, &tdout, &tdq, &tdk,
                                            &tdv, nullptr, 0, stream),
           DA_STATUS_BUFFER_TOO_SMALL, "lse");
    expect("backward workspace size: NULL size", da_cuda_backward_workspace_size(&cfg, &tq, &tdout, nullptr),
           DA_STATUS_NULL_POINTER, "size");
    {
        CUcontext primary = nullptr;
        cuCtxPopCurrent(&primary);
        expect("backward: no context current", BWD(ws, ws_size), DA_STATUS_CUDA_ERROR, "not current");
        cuCtxPushCurrent(primary);
    }
#undef BWD

    check_cuda(cudaDeviceSynchronize(), "sync");
    std::vector<uint32_t> bits(LEN);
    check_cuda(cudaMemcpy(bits.data(), out, LEN * 4, cudaMemcpyDeviceToHost), "copy");
    bool untouched = true;
    for (uint32_t b : bits) untouched &= b == 0xffffffffu;
    require(untouched, "no failed call wrote the output");
    check_cuda(cudaMemcpy(bits.data(), dq, LEN * 4, cudaMemcpyDeviceToHost), "copy");
    untouched = true;
    for (uint32_t b : bits) untouched &= b == 0xffffffffu;
    require(untouched, "no failed backward wrote dq");

    da_cuda_context_destroy(ctx);
    da_cuda_context_destroy(nullptr);
    cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(out), cudaFree(out2), cudaFree(lse), cudaFree(plan);
    cudaFree(big), cudaFreeHost(pinned), cudaFree(managed);
    cudaFree(dq), cudaFree(dk), cudaFree(dv), cudaFree(dout), cudaFree(ws);
    cudaStreamDestroy(stream);
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
