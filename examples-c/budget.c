/*
 * Per-head group sizes from the error-budget planner, from C: loads the JSON
 * table that `cargo run --release --example plan_heads -- ... --out TABLE`
 * wrote, runs DistrAttention with the sizes chosen for one layer, and prints
 * each head's error against exact attention next to the library's estimates.
 *
 *   budget TABLE LAYER [FILE [OUTPUT_FILE]]
 *
 * LAYER is a layer name of the table (e.g. layer0); FILE the calibration file
 * it belongs to ("-" for none: then the layer must be in one file only). The
 * inputs are those of example.c for [1, 128, 4, 32] queries and 2 KV heads,
 * with the causal mask; the table's block_rows and grouping mode are used.
 * With OUTPUT_FILE, the output (f32), the per-head errors (f64) and the three
 * estimates of da_estimate_errors (f64, per head each) are written there in the
 * machine's byte order (the tests compare them with the Rust API).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distr_attention.h"
#include "inputs.h"

enum { BATCH = 1, SEQ = 128, Q_HEADS = 4, KV_HEADS = 2, HEAD_DIM = 32, MAX_HEADS = 64 };

static void check(da_status status, const char *what) {
    if (status != DA_STATUS_OK) {
        fprintf(stderr, "%s failed: %s (%u): %s\n", what, da_status_string(status), (unsigned)status,
                da_last_error_message());
        exit(1);
    }
}

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

static const char *grouping_name(uint32_t g) {
    switch (g) {
        case DA_GROUPING_LSH: return "LSH";
        case DA_GROUPING_SIMILARITY: return "similarity";
        case DA_GROUPING_KEY_WEIGHTED: return "key-weighted";
        default: return "?";
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: budget TABLE LAYER [FILE [OUTPUT_FILE]]\n");
        return 2;
    }
    const char *table = argv[1], *layer = argv[2];
    const char *file = argc > 3 && strcmp(argv[3], "-") != 0 ? argv[3] : NULL;
    const char *output_file = argc > 4 ? argv[4] : NULL;

    /* The sizes of the layer, and the planner's block_rows and grouping into the config. */
    da_config config;
    check(da_config_default(&config, sizeof config), "da_config_default");
    uint32_t sizes[MAX_HEADS];
    size_t heads = 0;
    check(da_load_group_sizes_file(table, file, layer, sizes, MAX_HEADS, &heads, &config), "da_load_group_sizes_file");
    if (heads != Q_HEADS) {
        fprintf(stderr, "the table has %zu heads for %s, this example has %d\n", heads, layer, Q_HEADS);
        return 1;
    }
    config.group_sizes = sizes;
    config.num_group_sizes = heads;
    config.causal = 1;

    size_t q_len = (size_t)BATCH * SEQ * Q_HEADS * HEAD_DIM, kv_len = (size_t)BATCH * SEQ * KV_HEADS * HEAD_DIM;
    float *q = malloc(q_len * sizeof *q), *k = malloc(kv_len * sizeof *k), *v = malloc(kv_len * sizeof *v);
    float *exact = malloc(q_len * sizeof *exact), *approx = malloc(q_len * sizeof *approx);
    if (!q || !k || !v || !exact || !approx) return 1;
    for (size_t i = 0; i < q_len; i++) q[i] = da_example_query((uint32_t)i);
    for (size_t i = 0; i < kv_len; i++) {
        k[i] = da_example_value((uint32_t)i, 2);
        v[i] = da_example_value((uint32_t)i, 3);
    }
    da_tensor tq = dense(q, Q_HEADS), tk = dense(k, KV_HEADS), tv = dense(v, KV_HEADS);
    da_tensor t_exact = dense(exact, Q_HEADS), t_approx = dense(approx, Q_HEADS);

    da_context *ctx = NULL;
    check(da_context_new(&ctx), "da_context_new");
    da_plan_shape shape;
    check(da_get_plan_shape(&config, &tq, &shape), "da_get_plan_shape");
    uint16_t *plan = malloc(shape.num_entries * sizeof *plan);
    if (!plan) return 1;
    check(da_exact_attention(ctx, &config, &tq, &tk, &tv, &t_exact, NULL, 0), "da_exact_attention");
    check(da_forward(ctx, &config, &tq, &tk, &tv, &t_approx, NULL, 0, plan, shape.num_entries), "da_forward");
    double rel[Q_HEADS], rms[Q_HEADS], sampled[Q_HEADS], error[Q_HEADS];
    check(da_estimate_errors(ctx, &config, plan, shape.num_entries, &tq, &tk, &tv, 16, rel, rms, sampled, Q_HEADS),
          "da_estimate_errors");

    printf("%s of %s: %s grouping, block_rows %zu\n", layer, table, grouping_name(config.grouping), config.block_rows);
    printf("| head | G | relative error | estimate (16 rows) | relative score error |\n|---|---|---|---|---|\n");
    for (size_t h = 0; h < Q_HEADS; h++) {
        double diff = 0.0, norm = 0.0;
        for (size_t i = 0; i < SEQ; i++) {
            for (size_t j = 0; j < HEAD_DIM; j++) {
                size_t o = (i * Q_HEADS + h) * HEAD_DIM + j;
                double e = (double)approx[o] - (double)exact[o];
                diff += e * e;
                norm += (double)exact[o] * exact[o];
            }
        }
        error[h] = norm > 0.0 ? sqrt(diff / norm) : sqrt(diff);
        printf("| %zu | %u | %.5f | %.5f | %.5f |\n", h, sizes[h], error[h], sampled[h], rel[h]);
    }

    if (output_file) {
        FILE *f = fopen(output_file, "wb");
        if (!f || fwrite(approx, sizeof *approx, q_len, f) != q_len || fwrite(error, sizeof error, 1, f) != 1 ||
            fwrite(rel, sizeof rel, 1, f) != 1 || fwrite(rms, sizeof rms, 1, f) != 1 ||
            fwrite(sampled, sizeof sampled, 1, f) != 1 || fclose(f) != 0) {
            fprintf(stderr, "cannot write %s\n", output_file);
            return 1;
        }
    }
    da_context_free(ctx);
    free(plan);
    free(q), free(k), free(v), free(exact), free(approx);
    return 0;
}
