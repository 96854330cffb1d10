// A fine-tuning step's worth of DistrAttention from C++ through the RAII
// wrapper distr_attention.hpp: key-weighted grouping (a plan that needs the
// keys), per-head error estimates, the backward pass, and the error-budget
// planner with its JSON table.
//
//   training [OUTPUT_FILE]
//
// With OUTPUT_FILE, these are written there in the machine's byte order (the
// tests compare them with the Rust API): the output (f32, [1, 96, 4, 32]), the
// log-sum-exp (f32, [1, 4, 96]), the plan (uint16), dq, dk, dv (f32, shaped
// like q, k, v), the three error estimates (f64, 4 heads each), the planner's
// group sizes (uint32, 4), its measured errors (f64, 4) and FLOP saving (f64).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <vector>

#include "distr_attention.hpp"
#include "inputs.h"

namespace da = distr_attention;

template <class T>
static void write(std::ofstream &f, const std::vector<T> &v) {
    f.write(reinterpret_cast<const char *>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

int main(int argc, char **argv) {
    constexpr std::size_t batch = 1, seq = 96, q_heads = 4, kv_heads = 2, head_dim = 32;
    std::vector<float> q(batch * seq * q_heads * head_dim), k(batch * seq * kv_heads * head_dim), v(k.size());
    std::vector<float> d_out(q.size());
    for (std::size_t i = 0; i < q.size(); i++) {
        q[i] = da_example_query(static_cast<std::uint32_t>(i));
        d_out[i] = da_example_value(static_cast<std::uint32_t>(i), 5);
    }
    for (std::size_t i = 0; i < k.size(); i++) {
        k[i] = da_example_value(static_cast<std::uint32_t>(i), 2);
        v[i] = da_example_value(static_cast<std::uint32_t>(i), 3);
    }
    std::vector<float> out(q.size()), replay(q.size()), dq(q.size()), dk(k.size()), dv(v.size()), lse;
    auto tq = da::dense(q.data(), batch, seq, q_heads, head_dim);
    auto tk = da::dense(k.data(), batch, seq, kv_heads, head_dim);
    auto tv = da::dense(v.data(), batch, seq, kv_heads, head_dim);
    auto t_out = da::dense(out.data(), batch, seq, q_heads, head_dim);
    auto t_replay = da::dense(replay.data(), batch, seq, q_heads, head_dim);
    auto t_dout = da::dense(d_out.data(), batch, seq, q_heads, head_dim);
    auto t_dq = da::dense(dq.data(), batch, seq, q_heads, head_dim);
    auto t_dk = da::dense(dk.data(), batch, seq, kv_heads, head_dim);
    auto t_dv = da::dense(dv.data(), batch, seq, kv_heads, head_dim);

    try {
        da::Context ctx;
        da::Config config;
        config.grouping(DA_GROUPING_KEY_WEIGHTED).block_rows(32).causal(true).group_sizes({1, 2, 4, 2});

        // Forward: the one-shot call plans with the keys; planning separately gives the same plan.
        std::vector<std::uint16_t> plan = ctx.forward(config, tq, tk, tv, t_out, &lse);
        std::vector<std::uint16_t> keyed = ctx.plan_with_keys(config, tq, tk);
        ctx.attention(config, keyed, tq, tk, tv, t_replay);
        std::cout << "key-weighted plan: " << plan.size() << " entries, "
                  << (keyed == plan && replay == out ? "replayed identically" : "REPLAY DIFFERS") << "\n";

        da::ErrorEstimates e = ctx.estimate_errors(config, tq, tk, tv, &plan, 16);
        for (std::size_t h = 0; h < q_heads; h++) {
            std::cout << "head " << h << ": relative score error " << e.relative_score_error[h]
                      << ", sampled output error " << e.sampled_output_error[h] << "\n";
        }

        // Backward: gradients of sum(out * d_out) with respect to q, k, v.
        ctx.attention_backward(config, plan, tq, tk, tv, t_out, lse, t_dout, t_dq, t_dk, t_dv);
        double norm = 0;
        for (float x : dq) norm += static_cast<double>(x) * x;
        std::cout << "backward: |dq| = " << std::sqrt(norm) << "\n";

        // The planner on this layer, and its choice through a JSON table as plan_heads writes it.
        da::Config calib;
        calib.grouping(DA_GROUPING_KEY_WEIGHTED).block_rows(32).causal(true);
        da::BudgetPlan budget =
            da::choose_group_sizes(calib, {{tq, tk, tv}}, {2, 4, 8}, DA_BUDGET_TARGET_MAX_ERROR, 0.5);
        std::ostringstream json;
        json << "{\"grouping\": \"KeyWeighted\", \"block_rows\": 32, \"files\": [{\"file\": \"calib.safetensors\", "
                "\"layers\": [{\"layer\": \"layer0\", \"group_sizes\": [";
        for (std::size_t h = 0; h < budget.group_sizes.size(); h++) json << (h ? ", " : "") << budget.group_sizes[h];
        json << "]}]}]}";
        da::Config loaded;
        loaded.causal(true);
        std::vector<std::uint32_t> sizes = da::load_group_sizes(json.str(), "layer0", nullptr, &loaded);
        ctx.forward(loaded, tq, tk, tv, t_replay);
        std::cout << "planner (max error 0.5): group sizes";
        for (std::uint32_t g : budget.group_sizes) std::cout << " " << g;
        std::cout << ", FLOP saving " << budget.flop_saving << ", table "
                  << (sizes == budget.group_sizes && loaded.get()->block_rows == 32 ? "read back" : "DIFFERS")
                  << "\n";

        if (argc > 1) {
            std::ofstream f(argv[1], std::ios::binary);
            write(f, out);
            write(f, lse);
            write(f, plan);
            write(f, dq);
            write(f, dk);
            write(f, dv);
            write(f, e.relative_score_error);
            write(f, e.rms_logit_error);
            write(f, e.sampled_output_error);
            write(f, budget.group_sizes);
            write(f, budget.measured_error);
            write(f, std::vector<double>{budget.flop_saving});
            if (!f) {
                std::cerr << "cannot write " << argv[1] << "\n";
                return 1;
            }
        }
        return keyed == plan && replay.size() == out.size() && sizes == budget.group_sizes ? 0 : 1;
    } catch (const da::Error &e) {
        std::cerr << "distr_attention error (status " << e.status() << "): " << e.what() << "\n";
        return 1;
    }
}
