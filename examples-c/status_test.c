/*
 * Every status of the C ABI, from C: each class of bad argument at least once,
 * checking the status and that the thread's message says something. Prints
 * "N passed, M failed" and exits nonzero on any failure.
 *
 * DA_STATUS_PANIC cannot be provoked through the API (it reports a library
 * bug); its description is checked, and the Rust tests cover the boundary.
 *
 * The CUDA entry points are checked here as far as no CUDA context is needed
 * (this program never starts one): what a build without CUDA answers, the
 * NULL handle, and that a handle cannot be created without a current
 * context. cuda_status_test.cu checks them on a device.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "distr_attention.h"

static int passed, failed;

/* Checks `got` against `want` and the message: empty on success, otherwise
 * non-empty and containing `needle`. */
static void expect(const char *what, da_status got, da_status want, const char *needle) {
    const char *msg = da_last_error_message();
    int ok = got == want && (want == DA_STATUS_OK ? msg[0] == '\0' : msg[0] != '\0' && strstr(msg, needle) != NULL);
    if (ok) {
        passed++;
        printf("ok   %-40s %-36s %s\n", what, da_status_string(got), msg);
    } else {
        failed++;
        printf("FAIL %-40s got %u (%s), want %u; message: \"%s\", expected to contain \"%s\"\n", what,
               (unsigned)got, da_status_string(got), (unsigned)want, msg, needle);
    }
}

enum { N = 20, H = 2, D = 16 };
static float q[N * H * D], k[N * H * D], v[N * H * D], out[N * H * D + 1], lse[H * N + 1];
static uint16_t plan[4 * H * D + 1];
/* The last status of this version (statuses are numbered without gaps). */
#define LAST_STATUS DA_STATUS_CUDA_UNAVAILABLE

static da_tensor dense(const void *data, size_t heads) {
    da_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = DA_DTYPE_F32;
    t.batch = 1;
    t.seq = N;
    t.heads = heads;
    t.head_dim = D;
    t.stride_head = D;
    t.stride_seq = heads * D;
    t.stride_batch = N * heads * D;
    return t;
}

/* da_forward with the standard tensors and one modified. */
static da_status forward(da_context *ctx, const da_config *cfg, const da_tensor *tq, const da_tensor *tk,
                         const da_tensor *tv, const da_tensor *to) {
    return da_forward(ctx, cfg, tq, tk, tv, to, NULL, 0, NULL, 0);
}

int main(void) {
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) {
        q[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
        k[i] = (float)((i * 11) % 13) / 13.0f - 0.5f;
        v[i] = (float)((i * 7) % 19) / 19.0f - 0.5f;
    }
    da_tensor tq = dense(q, H), tk = dense(k, H), tv = dense(v, H), to = dense(out, H), t;
    da_config cfg, c;
    da_context *ctx = NULL;
    expect("da_context_new", da_context_new(&ctx), DA_STATUS_OK, "");
    expect("da_config_default", da_config_default(&cfg, sizeof cfg), DA_STATUS_OK, "");
    expect("forward succeeds", forward(ctx, &cfg, &tq, &tk, &tv, &to), DA_STATUS_OK, "");

    /* NULL pointers. */
    expect("NULL context", forward(NULL, &cfg, &tq, &tk, &tv, &to), DA_STATUS_NULL_POINTER, "context");
    expect("NULL config", forward(ctx, NULL, &tq, &tk, &tv, &to), DA_STATUS_NULL_POINTER, "config");
    expect("NULL q descriptor", forward(ctx, &cfg, NULL, &tk, &tv, &to), DA_STATUS_NULL_POINTER, "q");
    t = tv, t.data = NULL;
    expect("NULL v data", forward(ctx, &cfg, &tq, &tk, &t, &to), DA_STATUS_NULL_POINTER, "v: data pointer");
    expect("NULL plan", da_attention(ctx, &cfg, NULL, 10, &tq, &tk, &tv, &to, NULL, 0), DA_STATUS_NULL_POINTER,
           "plan");
    expect("NULL context out", da_context_new(NULL), DA_STATUS_NULL_POINTER, "out");
    c = cfg, c.num_group_sizes = 2;
    expect("NULL group_sizes", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_NULL_POINTER, "group_sizes");

    /* Misaligned pointers. */
    t = tq, t.data = (const char *)q + 1;
    expect("misaligned q", forward(ctx, &cfg, &t, &tk, &tv, &to), DA_STATUS_MISALIGNED_POINTER, "aligned");
    expect("misaligned lse",
           da_exact_attention(ctx, &cfg, &tq, &tk, &tv, &to, (float *)((char *)lse + 2), H * N),
           DA_STATUS_MISALIGNED_POINTER, "lse");

    /* Invalid arguments: enum values and struct sizes. */
    t = tk, t.dtype = 9;
    expect("unknown dtype", forward(ctx, &cfg, &tq, &t, &tv, &to), DA_STATUS_INVALID_ARGUMENT, "dtype 9");
    c = cfg, c.fusion = 5;
    expect("unknown fusion", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_INVALID_ARGUMENT, "fusion 5");
    c = cfg, c.grouping = 3;
    expect("unknown grouping", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_INVALID_ARGUMENT, "grouping 3");
    c = cfg, c.struct_size = 8;
    expect("struct_size too small", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_INVALID_ARGUMENT,
           "struct_size");
    expect("da_config_default size", da_config_default(&c, 3), DA_STATUS_INVALID_ARGUMENT, "struct_size");

    /* Bad configs. */
    c = cfg, c.block_rows = 0;
    expect("block_rows 0", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_BAD_CONFIG, "block_rows");
    c = cfg, c.num_projections = 40;
    expect("num_projections 40", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_BAD_CONFIG, "num_projections");
    c = cfg, c.scale = -2.0f;
    expect("negative scale", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_BAD_CONFIG, "scale");
    c = cfg, c.group_size = 3;
    expect("group size 3", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_BAD_CONFIG, "group size 3");
    uint32_t sizes[3] = {2, 4, 2};
    c = cfg, c.group_sizes = sizes, c.num_group_sizes = 3;
    expect("3 group sizes for 2 heads", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_BAD_CONFIG,
           "per-head group sizes");
    c = cfg, c.scale = NAN;
    expect("NaN scale means the default", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_OK, "");

    /* Invalid shapes. */
    t = tq, t.seq = 0;
    expect("zero seq", forward(ctx, &cfg, &t, &tk, &tv, &to), DA_STATUS_INVALID_SHAPE, "q: dimension seq is zero");
    da_plan_shape shape;
    t = tq, t.data = NULL, t.head_dim = 70000;
    expect("head_dim above 65536", da_get_plan_shape(&cfg, &t, &shape), DA_STATUS_INVALID_SHAPE, "head_dim");

    /* Shape mismatches. */
    t = tk, t.head_dim = 8;
    expect("k head_dim", forward(ctx, &cfg, &tq, &t, &tv, &to), DA_STATUS_SHAPE_MISMATCH, "k: dimension head_dim");
    t = tv, t.seq = 10;
    expect("v seq", forward(ctx, &cfg, &tq, &tk, &t, &to), DA_STATUS_SHAPE_MISMATCH, "v: dimension seq");
    t = to, t.heads = 1;
    expect("output heads", forward(ctx, &cfg, &tq, &tk, &tv, &t), DA_STATUS_SHAPE_MISMATCH, "output: dimension heads");
    t = tq, t.heads = 3, t.seq = 10;
    expect("q heads not a multiple", forward(ctx, &cfg, &t, &tk, &tv, &to), DA_STATUS_SHAPE_MISMATCH, "multiple");

    /* Size overflow: the extent is rejected before any memory is read. */
    t = tq, t.batch = 4, t.stride_batch = SIZE_MAX / 2;
    expect("extent overflows", forward(ctx, &cfg, &t, &tk, &tv, &to), DA_STATUS_SIZE_OVERFLOW, "overflow");
    t = tk, t.batch = 2, t.stride_batch = SIZE_MAX / 4;
    expect("bytes overflow", forward(ctx, &cfg, &tq, &t, &tv, &to), DA_STATUS_SIZE_OVERFLOW, "address space");

    /* Buffers too small. */
    expect("da_get_plan_shape", da_get_plan_shape(&cfg, &tq, &shape), DA_STATUS_OK, "");
    expect("plan buffer", da_plan(ctx, &cfg, &tq, plan, shape.num_entries - 1), DA_STATUS_BUFFER_TOO_SMALL,
           "plan: buffer holds");
    expect("lse buffer", da_exact_attention(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N - 1),
           DA_STATUS_BUFFER_TOO_SMALL, "lse: buffer holds");
    float r[8];
    expect("projections buffer", da_projections(&cfg, r, 8), DA_STATUS_BUFFER_TOO_SMALL, "projections");

    /* Overlapping buffers. */
    t = dense(q, H);
    expect("output over q", forward(ctx, &cfg, &tq, &tk, &tv, &t), DA_STATUS_OVERLAPPING_BUFFERS, "overlaps");
    expect("lse over the output", da_exact_attention(ctx, &cfg, &tq, &tk, &tv, &to, out + 5, H * N),
           DA_STATUS_OVERLAPPING_BUFFERS, "overlaps");
    t = to, t.stride_head = 0;
    expect("output heads share memory", forward(ctx, &cfg, &tq, &tk, &tv, &t), DA_STATUS_OVERLAPPING_BUFFERS,
           "overlap");

    /* Non-finite input. */
    k[3] = INFINITY;
    expect("infinite k", forward(ctx, &cfg, &tq, &tk, &tv, &to), DA_STATUS_NON_FINITE, "k: non-finite");
    k[3] = 0.0f;

    /* A plan that is not a permutation. */
    expect("da_plan", da_plan(ctx, &cfg, &tq, plan, shape.num_entries), DA_STATUS_OK, "");
    expect("da_attention with the plan", da_attention(ctx, &cfg, plan, shape.num_entries, &tq, &tk, &tv, &to, lse, H * N),
           DA_STATUS_OK, "");
    plan[0] = plan[1];
    expect("repeated column", da_attention(ctx, &cfg, plan, shape.num_entries, &tq, &tk, &tv, &to, NULL, 0),
           DA_STATUS_BAD_PLAN, "not a permutation");

    /* Unsupported combinations. */
    t = to, t.dtype = DA_DTYPE_BF16;
    expect("bf16 output", forward(ctx, &cfg, &tq, &tk, &tv, &t), DA_STATUS_UNSUPPORTED, "outputs must be f32");
    t = tv, t.dtype = DA_DTYPE_F16;
    expect("v dtype differs from q", forward(ctx, &cfg, &tq, &tk, &t, &to), DA_STATUS_UNSUPPORTED, "q's dtype");
    {
        /* A config of a newer header: a field past the ones this library knows is set. */
        struct {
            da_config base;
            uint64_t newer_field;
        } newer;
        expect("da_config_default, larger struct", da_config_default(&newer.base, sizeof newer), DA_STATUS_OK, "");
        newer.newer_field = 1;
        expect("field of a newer header", forward(ctx, &newer.base, &tq, &tk, &tv, &to), DA_STATUS_UNSUPPORTED,
               "newer header");
    }
    c = cfg, c.grouping = DA_GROUPING_KEY_WEIGHTED;
    expect("key-weighted da_plan", da_plan(ctx, &c, &tq, plan, shape.num_entries), DA_STATUS_UNSUPPORTED,
           "da_plan_with_keys");
    c = cfg, c.grouping = DA_GROUPING_SIMILARITY, c.group_size = 1;
    expect("similarity G = 1", forward(ctx, &c, &tq, &tk, &tv, &to), DA_STATUS_OK, "");
    {
        /* Similarity grouping needs powers of two: G = 6 divides head_dim 12. */
        static float q12[4 * 12], o12[4 * 12];
        da_tensor t12 = dense(q12, 1), o12t = dense(o12, 1);
        t12.seq = o12t.seq = 4, t12.head_dim = o12t.head_dim = 12;
        t12.stride_head = o12t.stride_head = 12, t12.stride_seq = o12t.stride_seq = 12;
        t12.stride_batch = o12t.stride_batch = 48;
        c = cfg, c.grouping = DA_GROUPING_SIMILARITY, c.group_size = 6;
        expect("similarity G = 6", forward(ctx, &c, &t12, &t12, &t12, &o12t), DA_STATUS_UNSUPPORTED, "group size 6");
    }

    /* ---- the entry points of grouping, estimates, the planner, tables and the backward pass. */
    expect("da_plan_with_keys", da_plan_with_keys(ctx, &cfg, &tq, &tk, plan, shape.num_entries), DA_STATUS_OK, "");
    expect("da_plan_with_keys NULL k", da_plan_with_keys(ctx, &cfg, &tq, NULL, plan, shape.num_entries),
           DA_STATUS_NULL_POINTER, "k");
    t = tk, t.head_dim = 8;
    expect("da_plan_with_keys k head_dim", da_plan_with_keys(ctx, &cfg, &tq, &t, plan, shape.num_entries),
           DA_STATUS_SHAPE_MISMATCH, "k: dimension head_dim");
    expect("plan over k", da_plan_with_keys(ctx, &cfg, &tq, &tk, (uint16_t *)k, shape.num_entries),
           DA_STATUS_OVERLAPPING_BUFFERS, "overlaps the buffer of k");

    double rel[H], rms[H], sampled[H];
    expect("da_estimate_errors",
           da_estimate_errors(ctx, &cfg, plan, shape.num_entries, &tq, &tk, &tv, 4, rel, rms, sampled, H),
           DA_STATUS_OK, "");
    expect("estimate, computed plan", da_estimate_errors(ctx, &cfg, NULL, 0, &tq, &tk, &tv, 4, rel, NULL, NULL, H),
           DA_STATUS_OK, "");
    expect("estimate output short", da_estimate_errors(ctx, &cfg, NULL, 0, &tq, &tk, &tv, 4, rel, rms, NULL, H - 1),
           DA_STATUS_BUFFER_TOO_SMALL, "relative_score_error");
    expect("estimate outputs overlap", da_estimate_errors(ctx, &cfg, NULL, 0, &tq, &tk, &tv, 4, rel, rel, NULL, H),
           DA_STATUS_OVERLAPPING_BUFFERS, "overlaps");
    expect("estimate NULL plan, length", da_estimate_errors(ctx, &cfg, NULL, 5, &tq, &tk, &tv, 4, rel, NULL, NULL, H),
           DA_STATUS_NULL_POINTER, "plan");

    uint32_t chosen[H], candidates[3] = {2, 4, 8};
    double measured[H], saving;
    uint32_t met;
    expect("da_choose_group_sizes",
           da_choose_group_sizes(&cfg, &tq, &tk, &tv, 1, candidates, 3, DA_BUDGET_TARGET_MAX_ERROR, 0.5, chosen,
                                 measured, NULL, H, &saving, &met),
           DA_STATUS_OK, "");
    expect("planner without samples",
           da_choose_group_sizes(&cfg, &tq, &tk, &tv, 0, candidates, 3, DA_BUDGET_TARGET_MAX_ERROR, 0.5, chosen,
                                 NULL, NULL, H, NULL, NULL),
           DA_STATUS_INVALID_ARGUMENT, "num_samples");
    expect("planner target out of range",
           da_choose_group_sizes(&cfg, &tq, &tk, &tv, 1, candidates, 3, DA_BUDGET_TARGET_FLOP_SAVING, 1.5, chosen,
                                 NULL, NULL, H, NULL, NULL),
           DA_STATUS_INVALID_ARGUMENT, "out of range");
    expect("planner unknown target",
           da_choose_group_sizes(&cfg, &tq, &tk, &tv, 1, candidates, 3, 9, 0.5, chosen, NULL, NULL, H, NULL, NULL),
           DA_STATUS_INVALID_ARGUMENT, "target_kind 9");
    candidates[0] = 3;
    expect("planner candidate 3",
           da_choose_group_sizes(&cfg, &tq, &tk, &tv, 1, candidates, 3, DA_BUDGET_TARGET_MAX_ERROR, 0.5, chosen,
                                 NULL, NULL, H, NULL, NULL),
           DA_STATUS_BAD_CONFIG, "group size 3");
    candidates[0] = 2;
    expect("planner output short",
           da_choose_group_sizes(&cfg, &tq, &tk, &tv, 1, candidates, 3, DA_BUDGET_TARGET_MAX_ERROR, 0.5, chosen,
                                 NULL, NULL, H - 1, NULL, NULL),
           DA_STATUS_BUFFER_TOO_SMALL, "group_sizes");

    static const char table[] =
        "{\"grouping\": \"Similarity\", \"block_rows\": 16, \"files\": [{\"file\": \"dir/calib.safetensors\", "
        "\"layers\": [{\"layer\": \"layer0\", \"group_sizes\": [1, 4]}]}]}";
    size_t heads = 0;
    uint32_t sizes2[2];
    c = cfg;
    expect("da_load_group_sizes",
           da_load_group_sizes(table, sizeof table - 1, "calib.safetensors", "layer0", sizes2, 2, &heads, &c),
           DA_STATUS_OK, "");
    if (heads == 2 && sizes2[0] == 1 && sizes2[1] == 4 && c.block_rows == 16 && c.grouping == DA_GROUPING_SIMILARITY) {
        passed++;
    } else {
        failed++;
        printf("FAIL da_load_group_sizes read %zu heads: %u %u, block_rows %zu\n", heads, sizes2[0], sizes2[1],
               c.block_rows);
    }
    expect("table layer missing", da_load_group_sizes(table, sizeof table - 1, NULL, "layer9", sizes2, 2, &heads, NULL),
           DA_STATUS_NOT_FOUND, "layer9");
    expect("table malformed", da_load_group_sizes(table, 20, NULL, "layer0", sizes2, 2, &heads, NULL),
           DA_STATUS_BAD_TABLE, "not valid JSON");
    expect("table buffer short", da_load_group_sizes(table, sizeof table - 1, NULL, "layer0", sizes2, 1, &heads, NULL),
           DA_STATUS_BUFFER_TOO_SMALL, "group_sizes");
    expect("table file missing",
           da_load_group_sizes_file("/nonexistent/table.json", NULL, "layer0", sizes2, 2, &heads, NULL),
           DA_STATUS_IO_ERROR, "cannot read");

    static float dq[N * H * D], dk[N * H * D], dv[N * H * D];
    da_tensor tdq = dense(dq, H), tdk = dense(dk, H), tdv = dense(dv, H), tdo = dense(v, H);
    expect("forward for the backward",
           da_forward(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N, plan, shape.num_entries), DA_STATUS_OK, "");
    expect("da_attention_backward",
           da_attention_backward(ctx, &cfg, plan, shape.num_entries, &tq, &tk, &tv, &to, lse, H * N, &tdo, &tdq, &tdk,
                                 &tdv),
           DA_STATUS_OK, "");
    expect("da_exact_attention_backward",
           da_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N, &tdo, &tdq, &tdk, &tdv),
           DA_STATUS_OK, "");
    expect("backward NULL lse",
           da_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, NULL, 0, &tdo, &tdq, &tdk, &tdv),
           DA_STATUS_NULL_POINTER, "lse");
    expect("backward dq over dk",
           da_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N, &tdo, &tdk, &tdk, &tdv),
           DA_STATUS_OVERLAPPING_BUFFERS, "overlaps");
    t = dense(q, H);
    expect("backward dq over q",
           da_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N, &tdo, &t, &tdk, &tdv),
           DA_STATUS_OVERLAPPING_BUFFERS, "overlaps the buffer of q");
    t = tdq, t.dtype = DA_DTYPE_F16;
    expect("backward f16 dq",
           da_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N, &tdo, &t, &tdk, &tdv),
           DA_STATUS_UNSUPPORTED, "gradients must be f32");
    t = tdv, t.seq = 10;
    expect("backward dv seq",
           da_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N, &tdo, &tdq, &tdk, &t),
           DA_STATUS_SHAPE_MISMATCH, "dv: dimension seq");
    expect("backward plan short",
           da_attention_backward(ctx, &cfg, plan, 3, &tq, &tk, &tv, &to, lse, H * N, &tdo, &tdq, &tdk, &tdv),
           DA_STATUS_BUFFER_TOO_SMALL, "plan");
    lse[0] = NAN;
    expect("backward NaN lse",
           da_exact_attention_backward(ctx, &cfg, &tq, &tk, &tv, &to, lse, H * N, &tdo, &tdq, &tdk, &tdv),
           DA_STATUS_NON_FINITE, "lse");

    /* Allocation failure: a V head dimension of 2^40 needs terabytes of
     * scratch. The data pointers are never dereferenced: the allocation
     * fails first. */
    if (sizeof(size_t) == 8) {
        da_tensor big_v = dense((const void *)((uintptr_t)1 << 50), H);
        da_tensor big_o = dense((const void *)((uintptr_t)1 << 52), H);
        big_v.head_dim = big_o.head_dim = (size_t)1 << 40;
        big_v.stride_head = big_o.stride_head = (size_t)1 << 40;
        big_v.seq = big_o.seq = 1, big_v.heads = big_o.heads = 1;
        t = tq, t.seq = 1, t.heads = 1;
        da_tensor tk1 = tk;
        tk1.seq = 1, tk1.heads = 1;
        expect("scratch allocation", da_exact_attention(ctx, &cfg, &t, &tk1, &big_v, &big_o, NULL, 0),
               DA_STATUS_ALLOCATION_FAILED, "could not allocate");
    }

    /* ---- the CUDA entry points, without a CUDA context. */
    {
        da_cuda_context *cctx = (da_cuda_context *)&cfg; /* any non-NULL value: must be reset */
        da_status s = da_cuda_context_create(&cctx);
        if (cctx != NULL) {
            failed++;
            printf("FAIL da_cuda_context_create left a handle behind after failing\n");
        }
        if (da_cuda_built()) {
            /* Without a GPU cuInit fails; with one, no context is current here. */
            expect("da_cuda_context_create, no context", s, DA_STATUS_CUDA_ERROR, "CUDA");
            expect("da_cuda_context_create NULL out", da_cuda_context_create(NULL), DA_STATUS_NULL_POINTER, "out");
            expect("da_cuda_forward NULL handle",
                   da_cuda_forward(NULL, &cfg, &tq, &tk, &tv, &to, NULL, 0, NULL, 0, NULL), DA_STATUS_NULL_POINTER,
                   "context");
            expect("da_cuda_plan NULL handle", da_cuda_plan(NULL, &cfg, &tq, plan, shape.num_entries, NULL),
                   DA_STATUS_NULL_POINTER, "context");
        } else {
            expect("da_cuda_context_create, no CUDA", s, DA_STATUS_CUDA_UNAVAILABLE, "built without CUDA");
            expect("da_cuda_forward, no CUDA", da_cuda_forward(NULL, &cfg, &tq, &tk, &tv, &to, NULL, 0, NULL, 0, NULL),
                   DA_STATUS_CUDA_UNAVAILABLE, "built without CUDA");
            expect("da_cuda_attention, no CUDA",
                   da_cuda_attention(NULL, &cfg, plan, shape.num_entries, &tq, &tk, &tv, &to, NULL, 0, NULL),
                   DA_STATUS_CUDA_UNAVAILABLE, "built without CUDA");
            expect("da_cuda_exact_attention, no CUDA",
                   da_cuda_exact_attention(NULL, &cfg, &tq, &tk, &tv, &to, NULL, 0, NULL), DA_STATUS_CUDA_UNAVAILABLE,
                   "built without CUDA");
            expect("da_cuda_plan, no CUDA", da_cuda_plan(NULL, &cfg, &tq, plan, shape.num_entries, NULL),
                   DA_STATUS_CUDA_UNAVAILABLE, "built without CUDA");
        }
        da_cuda_context_destroy(NULL);
        printf("CUDA entry points: %s\n", da_cuda_built() ? "built" : "not built");
    }

    /* The status strings, the copy form of the message, the version. */
    expect("zero seq again", forward(ctx, &cfg, &(da_tensor){.data = q, .dtype = 0, .batch = 1}, &tk, &tv, &to),
           DA_STATUS_INVALID_SHAPE, "zero");
    char buf[8];
    size_t len = da_last_error_copy(buf, sizeof buf);
    if (len == strlen(da_last_error_message()) && strlen(buf) == sizeof buf - 1) {
        passed++;
    } else {
        failed++;
        printf("FAIL da_last_error_copy returned %zu, copied \"%s\"\n", len, buf);
    }
    for (unsigned s = 0; s <= LAST_STATUS; s++) {
        if (strlen(da_status_string(s)) == 0 || strcmp(da_status_string(s), "unknown status") == 0) {
            failed++;
            printf("FAIL no description for status %u\n", s);
        } else {
            passed++;
        }
    }
    if (strcmp(da_status_string(LAST_STATUS + 1), "unknown status") != 0) failed++;
    printf("version %s (%u)\n", da_version(), (unsigned)da_version_number());

    da_context_free(ctx);
    da_context_free(NULL);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
