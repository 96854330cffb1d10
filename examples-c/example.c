/*
 * DistrAttention from C on the CPU: exact attention and DistrAttention on the
 * same inputs, the relative error between them, and a replay of the plan.
 *
 *   example [G] [OUTPUT_FILE]
 *
 * G is the group size (default 2). With OUTPUT_FILE, the DistrAttention output
 * (f32, [1, 256, 4, 64]) and then the plan (uint16) are written there in the
 * machine's byte order (the tests compare them with the Rust API).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "distr_attention.h"
#include "inputs.h"

enum { BATCH = 1, SEQ = 256, Q_HEADS = 4, KV_HEADS = 2, HEAD_DIM = 64 };

/* Prints the failed call, its status and the library's message, and exits. */
static void check(da_status status, const char *what) {
    if (status != DA_STATUS_OK) {
        fprintf(stderr, "%s failed: %s (%u): %s\n", what, da_status_string(status), (unsigned)status,
                da_last_error_message());
        exit(1);
    }
}

/* A dense [batch, seq, heads, head_dim] f32 tensor. */
static da_tensor dense(const float *data, size_t heads) {
    da_tensor t = {0};
    t.data = data;
    t.dtype = DA_DTYPE_F32;
    t.batch = BATCH;
    t.seq = SEQ;
    t.heads = heads;
    t.head_dim = HEAD_DIM;
    t.stride_head = HEAD_DIM;
    t.stride_seq = heads * HEAD_DIM;
    t.stride_batch = SEQ * heads * HEAD_DIM;
    return t;
}

int main(int argc, char **argv) {
    unsigned group_size = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 2;
    const char *output_file = argc > 2 ? argv[2] : NULL;
    printf("distr_attention %s\n", da_version());

    size_t q_len = (size_t)BATCH * SEQ * Q_HEADS * HEAD_DIM;
    size_t kv_len = (size_t)BATCH * SEQ * KV_HEADS * HEAD_DIM;
    float *q = malloc(q_len * sizeof *q), *k = malloc(kv_len * sizeof *k), *v = malloc(kv_len * sizeof *v);
    float *exact = malloc(q_len * sizeof *exact), *approx = malloc(q_len * sizeof *approx);
    float *replay = malloc(q_len * sizeof *replay);
    if (!q || !k || !v || !exact || !approx || !replay) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < q_len; i++) q[i] = da_example_query((uint32_t)i);
    for (size_t i = 0; i < kv_len; i++) {
        k[i] = da_example_value((uint32_t)i, 2);
        v[i] = da_example_value((uint32_t)i, 3);
    }
    da_tensor tq = dense(q, Q_HEADS), tk = dense(k, KV_HEADS), tv = dense(v, KV_HEADS);
    da_tensor t_exact = dense(exact, Q_HEADS), t_approx = dense(approx, Q_HEADS), t_replay = dense(replay, Q_HEADS);

    da_config config;
    check(da_config_default(&config, sizeof config), "da_config_default");
    config.group_size = group_size;
    config.causal = 1;

    da_context *ctx = NULL;
    check(da_context_new(&ctx), "da_context_new");

    /* The plan's size, then one-shot DistrAttention that also returns the plan. */
    da_plan_shape shape;
    check(da_get_plan_shape(&config, &tq, &shape), "da_plan_shape");
    uint16_t *plan = malloc(shape.num_entries * sizeof *plan);
    if (!plan) return 1;
    check(da_exact_attention(ctx, &config, &tq, &tk, &tv, &t_exact, NULL, 0), "da_exact_attention");
    check(da_forward(ctx, &config, &tq, &tk, &tv, &t_approx, NULL, 0, plan, shape.num_entries), "da_forward");
    /* Attending with the returned plan reproduces the output exactly. */
    check(da_attention(ctx, &config, plan, shape.num_entries, &tq, &tk, &tv, &t_replay, NULL, 0),
          "da_attention");

    double diff = 0.0, norm = 0.0;
    size_t replay_mismatches = 0;
    for (size_t i = 0; i < q_len; i++) {
        double e = (double)approx[i] - (double)exact[i];
        diff += e * e;
        norm += (double)exact[i] * exact[i];
        replay_mismatches += approx[i] != replay[i];
    }
    printf("shape: batch %d, seq %d, q_heads %d, kv_heads %d, head_dim %d; causal\n", BATCH, SEQ, Q_HEADS,
           KV_HEADS, HEAD_DIM);
    printf("plan: %zu blocks of %zu rows per head, %zu entries\n", shape.blocks, shape.block_rows,
           shape.num_entries);
    printf("group size %u: relative error vs exact attention %.6f\n", group_size, sqrt(diff / norm));
    printf("replay of the plan: %s\n", replay_mismatches == 0 ? "identical" : "DIFFERENT");

    if (output_file) {
        FILE *f = fopen(output_file, "wb");
        if (!f || fwrite(approx, sizeof *approx, q_len, f) != q_len ||
            fwrite(plan, sizeof *plan, shape.num_entries, f) != shape.num_entries || fclose(f) != 0) {
            fprintf(stderr, "cannot write %s\n", output_file);
            return 1;
        }
    }
    da_context_free(ctx);
    free(plan);
    free(q), free(k), free(v), free(exact), free(approx), free(replay);
    return replay_mismatches == 0 ? 0 : 1;
}
