// Runs kernels/simplan.cu under the host emulation (emu.h) on case files
// written by `cargo run -p distr-attention-cuda --example simplan_cases -- DIR`
// (Q, K, the core's plan and the f64 replica's per-block decision margins)
// and compares the plans block by block. -DDA_EMU_COUNT prints work counters,
// EMU_STATS=1 the barriers per CTA, EMU_SHOW=1 the first differing block.
//
//   g++ -std=c++20 -O2 -fno-strict-aliasing -DDA_EMULATE -DDA_DTYPE_IS_BF16=1 -DDA_SIMPLAN_DIM=128 \
//       -I kernels kernels/emu/simplan_emu.cpp -o simplan_emu
//   simplan_emu CASE... (cases whose dtype and head_dim match the build)
#include "../simplan.cu"

#include <fstream>
#include <string>

#if DA_DTYPE_IS_BF16
using Elem = __nv_bfloat16;
#define KSIM(D, G) da_simplan_bf16_d##D##_g##G##_sim
#define KKW(D, G) da_simplan_bf16_d##D##_g##G##_kw
#define KGRAM(D) da_kgram_bf16_d##D
#else
using Elem = __half;
#define KSIM(D, G) da_simplan_f16_d##D##_g##G##_sim
#define KKW(D, G) da_simplan_f16_d##D##_g##G##_kw
#define KGRAM(D) da_kgram_f16_d##D
#endif
#define XSIM(D, G) KSIM(D, G)
#define XKW(D, G) KKW(D, G)
#define XGRAM(D) KGRAM(D)

template <typename T>
static std::vector<T> read_vec(std::ifstream& f, size_t n) {
    std::vector<T> v(n);
    f.read(reinterpret_cast<char*>(v.data()), n * sizeof(T));
    return v;
}

int main(int argc, char** argv) {
    constexpr int D = DA_SIMPLAN_DIM;
    const double tau = argc > 1 && std::string(argv[1]).rfind("--tau=", 0) == 0 ? std::stod(argv[1] + 6) : 1e-4;
    int failures = 0;
    for (int ai = 1; ai < argc; ++ai) {
        if (std::string(argv[ai]).rfind("--", 0) == 0) continue;
        std::ifstream f(argv[ai], std::ios::binary);
        uint32_t hdr[11];
        f.read(reinterpret_cast<char*>(hdr), sizeof(hdr));
        const uint32_t magic = hdr[0], dtype = hdr[1], d = hdr[2], g = hdr[3], kw = hdr[4], batch = hdr[5],
                       seq = hdr[6], heads = hdr[7], kv_heads = hdr[8], kv_len = hdr[9], l = hdr[10];
        if (magic != 0x31435053u || static_cast<int>(d) != D || dtype != (DA_DTYPE_IS_BF16 ? 1u : 0u)) {
            std::printf("%s: skipped (built for d=%d dtype %d)\n", argv[ai], D, DA_DTYPE_IS_BF16);
            continue;
        }
        const size_t blocks = (seq + l - 1) / l;
        auto q = read_vec<uint16_t>(f, size_t(batch) * seq * heads * d);
        std::vector<uint16_t> k;
        if (kw) k = read_vec<uint16_t>(f, size_t(batch) * kv_len * kv_heads * d);
        auto expect = read_vec<uint16_t>(f, size_t(batch) * heads * blocks * d);
        auto margin = read_vec<double>(f, size_t(batch) * heads * blocks);
        if (!f) {
            std::printf("%s: truncated\n", argv[ai]);
            return 2;
        }
        std::vector<float> gk;
        if (kw) {
            gk.assign(size_t(batch) * kv_heads * d * d, NAN);
            KGramParams kp{};
            kp.k = k.data();
            kp.gk = gk.data();
            kp.k_row_stride = kv_heads * d;
            kp.k_head_stride = d;
            kp.k_batch_stride = static_cast<long long>(kv_len) * kv_heads * d;
            kp.kv_len = kv_len;
            kp.kv_heads = kv_heads;
            kp.batch = batch;
            emu::launch(XGRAM(DA_SIMPLAN_DIM), kp, batch * kv_heads, da::kSimThreads, da::KGramTraits<D>::kSmem, 7);
        }
        std::vector<uint16_t> plan(expect.size(), 0xffff);
        SimPlanParams p{};
        p.q = q.data();
        p.plan = plan.data();
        p.gk = kw ? gk.data() : nullptr;
        p.q_row_stride = heads * d;
        p.q_head_stride = d;
        p.q_batch_stride = static_cast<long long>(seq) * heads * d;
        p.q_len = seq;
        p.heads = heads;
        p.block_rows = l;
        p.num_blocks = blocks;
        p.batch = batch;
        p.kv_heads = kv_heads ? kv_heads : 1;
        p.heads_per_kv = kv_heads ? heads / kv_heads : 1;
        p.head_map_len = 0;
        void (*kern)(SimPlanParams) = nullptr;
        int smem = 0;
        switch (g * 2 + kw) {
            case 2: kern = XSIM(DA_SIMPLAN_DIM, 1); smem = da::SimTraits<D, 1>::kSmem; break;
            case 4: kern = XSIM(DA_SIMPLAN_DIM, 2); smem = da::SimTraits<D, 2>::kSmem; break;
            case 8: kern = XSIM(DA_SIMPLAN_DIM, 4); smem = da::SimTraits<D, 4>::kSmem; break;
            case 16: kern = XSIM(DA_SIMPLAN_DIM, 8); smem = da::SimTraits<D, 8>::kSmem; break;
            case 5: kern = XKW(DA_SIMPLAN_DIM, 2); smem = da::SimTraits<D, 2>::kSmem; break;
            case 9: kern = XKW(DA_SIMPLAN_DIM, 4); smem = da::SimTraits<D, 4>::kSmem; break;
            case 17: kern = XKW(DA_SIMPLAN_DIM, 8); smem = da::SimTraits<D, 8>::kSmem; break;
            default: std::printf("%s: unsupported G %u\n", argv[ai], g); return 2;
        }
        long long switches = 0;
        emu::launch(kern, p, batch * heads * blocks, da::kSimThreads, g == 1 ? 0 : smem,
                    1234 + ai, &switches);
#ifdef DA_EMU_COUNT
        {
            const double nb = double(batch) * heads * blocks;
            const char* names[] = {"", "", "", "match iters", "pair evaluations", "", "accepts", "passes", "searches"};
            for (int i = 0; i < 9; ++i) if (names[i][0]) std::printf("  %s: %.1f per CTA\n", names[i], da_counts[i] / nb);
            std::fill(std::begin(da_counts), std::end(da_counts), 0);
        }
#endif
        size_t differ = 0, near = 0, bad = 0;
        double worst_differing = 0;
        for (size_t blk = 0; blk < batch * heads * blocks; ++blk) {
            const bool same = std::equal(plan.begin() + blk * d, plan.begin() + (blk + 1) * d, expect.begin() + blk * d);
            near += margin[blk] < tau;
            if (!same) {
                if (differ == 0 && getenv("EMU_SHOW")) {
                    std::printf("  block %zu gpu:", blk);
                    for (size_t j = 0; j < d; ++j) std::printf(" %u", plan[blk * d + j]);
                    std::printf("\n  block %zu cpu:", blk);
                    for (size_t j = 0; j < d; ++j) std::printf(" %u", expect[blk * d + j]);
                    std::printf("\n");
                }
                ++differ;
                worst_differing = std::max(worst_differing, margin[blk]);
                if (margin[blk] >= tau) ++bad;
                // Still a permutation?
                std::vector<int> seen(d, 0);
                for (size_t j = 0; j < d; ++j) {
                    const uint16_t c = plan[blk * d + j];
                    if (c >= d || seen[c]++) {
                        std::printf("  block %zu is not a permutation\n", blk);
                        ++bad;
                        break;
                    }
                }
            }
        }
        std::printf("%s: d=%u G=%u %s l=%u blocks %zu: differ %zu, near-tie (margin < %.0e) %zu, differing with margin >= "
                    "tau %zu, largest margin of a differing block %.2e\n",
                    argv[ai], d, g, kw ? "kw" : "sim", l, batch * heads * blocks, differ, tau, near, bad,
                    worst_differing);
        failures += bad != 0;
    }
    return failures ? 1 : 0;
}
