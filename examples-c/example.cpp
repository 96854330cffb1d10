// DistrAttention from C++ through the RAII wrapper distr_attention.hpp:
// per-head group sizes, sample fusion, the log-sum-exp, and an error reported
// as an exception.
//
//   example_cpp [OUTPUT_FILE]
//
// With OUTPUT_FILE, the DistrAttention output (f32, [2, 100, 4, 32]), the
// log-sum-exp (f32, [2, 4, 100]) and the plan (uint16) are written there in the
// machine's byte order (the tests compare them with the Rust API).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <vector>

#include "distr_attention.hpp"
#include "inputs.h"

namespace da = distr_attention;

int main(int argc, char **argv) {
    constexpr std::size_t batch = 2, seq = 100, q_heads = 4, kv_heads = 4, head_dim = 32;
    std::cout << "distr_attention " << da::version() << "\n";

    std::vector<float> q(batch * seq * q_heads * head_dim), k(batch * seq * kv_heads * head_dim), v(k.size());
    for (std::size_t i = 0; i < q.size(); i++) q[i] = da_example_query(static_cast<std::uint32_t>(i));
    for (std::size_t i = 0; i < k.size(); i++) {
        k[i] = da_example_value(static_cast<std::uint32_t>(i), 2);
        v[i] = da_example_value(static_cast<std::uint32_t>(i), 3);
    }
    std::vector<float> exact(q.size()), approx(q.size()), lse;
    auto tq = da::dense(q.data(), batch, seq, q_heads, head_dim);
    auto tk = da::dense(k.data(), batch, seq, kv_heads, head_dim);
    auto tv = da::dense(v.data(), batch, seq, kv_heads, head_dim);
    auto t_exact = da::dense(exact.data(), batch, seq, q_heads, head_dim);
    auto t_approx = da::dense(approx.data(), batch, seq, q_heads, head_dim);

    try {
        da::Context ctx;
        da::Config config;
        config.block_rows(32).group_sizes({1, 2, 4, 8}).fusion(DA_FUSION_SAMPLE).seed(7);
        ctx.exact_attention(config, tq, tk, tv, t_exact);
        std::vector<std::uint16_t> plan = ctx.forward(config, tq, tk, tv, t_approx, &lse);

        double diff = 0, norm = 0;
        for (std::size_t i = 0; i < q.size(); i++) {
            diff += (approx[i] - exact[i]) * static_cast<double>(approx[i] - exact[i]);
            norm += exact[i] * static_cast<double>(exact[i]);
        }
        std::cout << "group sizes {1, 2, 4, 8}, sample fusion: relative error vs exact attention "
                  << std::sqrt(diff / norm) << "\n";
        std::cout << "plan: " << plan.size() << " entries; lse[0] = " << lse[0] << "\n";

        // A bad argument comes back as an exception with the library's message.
        try {
            da::Config bad;
            bad.group_size(3);
            ctx.forward(bad, tq, tk, tv, t_approx);
            std::cerr << "group size 3 was accepted\n";
            return 1;
        } catch (const da::Error &e) {
            std::cout << "expected error (status " << e.status() << "): " << e.what() << "\n";
        }

        if (argc > 1) {
            std::ofstream f(argv[1], std::ios::binary);
            f.write(reinterpret_cast<const char *>(approx.data()), approx.size() * sizeof(float));
            f.write(reinterpret_cast<const char *>(lse.data()), lse.size() * sizeof(float));
            f.write(reinterpret_cast<const char *>(plan.data()), plan.size() * sizeof(std::uint16_t));
            if (!f) {
                std::cerr << "cannot write " << argv[1] << "\n";
                return 1;
            }
        }
    } catch (const da::Error &e) {
        std::cerr << "distr_attention error (status " << e.status() << "): " << e.what() << "\n";
        return 1;
    }
    return 0;
}
