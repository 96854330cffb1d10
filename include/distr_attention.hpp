// distr_attention.hpp: a small header-only C++17 wrapper over the C ABI of
// DistrAttention (distr_attention.h).
//
//   distr_attention::Context ctx;                          // owns scratch memory
//   distr_attention::Config cfg;                           // the library defaults
//   cfg.group_size(4).causal(true);
//   auto q = distr_attention::dense(q_data, batch, seq, heads, head_dim);
//   std::vector<uint16_t> plan = ctx.forward(cfg, q, k, v, out);
//   ctx.attention_backward(cfg, plan, q, k, v, out, lse, d_out, dq, dk, dv);
//
// Also: grouping modes (Config::grouping, Context::plan_with_keys), per-head
// error estimates (Context::estimate_errors), the error-budget planner
// (choose_group_sizes) and its JSON tables (load_group_sizes), and the CUDA
// entry points on device memory and a stream (CudaContext).
//
// Failures throw distr_attention::Error, which carries the status and the
// library's message. Handles are released by destructors; nothing here
// allocates on the library's behalf except the plans it returns.
#ifndef DISTR_ATTENTION_HPP
#define DISTR_ATTENTION_HPP

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "distr_attention.h"

namespace distr_attention {

// A failed call: the status and the library's message for it.
class Error : public std::runtime_error {
public:
    Error(da_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    da_status status() const noexcept { return status_; }

private:
    da_status status_;
};

// Throws Error unless `status` is DA_STATUS_OK.
inline void check(da_status status) {
    if (status != DA_STATUS_OK) {
        throw Error(status, std::string(da_status_string(status)) + ": " + da_last_error_message());
    }
}

inline std::string version() { return da_version(); }

// A tensor descriptor with explicit element strides.
inline da_tensor strided(const void *data, da_dtype dtype, std::size_t batch, std::size_t seq,
                         std::size_t heads, std::size_t head_dim, std::size_t stride_batch,
                         std::size_t stride_seq, std::size_t stride_head) {
    da_tensor t{};
    t.data = data;
    t.dtype = dtype;
    t.batch = batch;
    t.seq = seq;
    t.heads = heads;
    t.head_dim = head_dim;
    t.stride_batch = stride_batch;
    t.stride_seq = stride_seq;
    t.stride_head = stride_head;
    return t;
}

// A dense [batch, seq, heads, head_dim] tensor of `dtype` (f16 and bf16 data
// are passed as their 16-bit patterns).
inline da_tensor dense(const void *data, da_dtype dtype, std::size_t batch, std::size_t seq,
                       std::size_t heads, std::size_t head_dim) {
    return strided(data, dtype, batch, seq, heads, head_dim, seq * heads * head_dim, heads * head_dim,
                   head_dim);
}

// A dense f32 tensor.
inline da_tensor dense(const float *data, std::size_t batch, std::size_t seq, std::size_t heads,
                       std::size_t head_dim) {
    return dense(data, DA_DTYPE_F32, batch, seq, heads, head_dim);
}

class Config;
std::vector<std::uint32_t> load_group_sizes(const std::string &json, const std::string &layer,
                                            const char *file, Config *config);
std::vector<std::uint32_t> load_group_sizes_file(const std::string &path, const std::string &layer,
                                                 const char *file, Config *config);

// The parameters, starting from the library's defaults (da_config_default).
// Per-head group sizes are stored in the object, so copies stay valid.
class Config {
public:
    Config() { check(da_config_default(&raw_, sizeof raw_)); }
    Config(const Config &other) : raw_(other.raw_), sizes_(other.sizes_) { sync(); }
    Config &operator=(const Config &other) {
        raw_ = other.raw_;
        sizes_ = other.sizes_;
        sync();
        return *this;
    }
    Config(Config &&other) noexcept : raw_(other.raw_), sizes_(std::move(other.sizes_)) { sync(); }
    Config &operator=(Config &&other) noexcept {
        raw_ = other.raw_;
        sizes_ = std::move(other.sizes_);
        sync();
        return *this;
    }

    Config &block_rows(std::size_t l) { raw_.block_rows = l; return *this; }
    Config &group_size(std::uint32_t g) { raw_.group_size = g; return *this; }
    // One group size per query head (empty: the uniform group_size).
    Config &group_sizes(std::vector<std::uint32_t> sizes) { sizes_ = std::move(sizes); sync(); return *this; }
    Config &num_projections(std::uint32_t p) { raw_.num_projections = p; return *this; }
    Config &seed(std::uint64_t s) { raw_.seed = s; return *this; }
    Config &fusion(da_fusion f) { raw_.fusion = f; return *this; }
    Config &causal(bool c) { raw_.causal = c ? 1 : 0; return *this; }
    // 0 restores the default 1/sqrt(head_dim).
    Config &scale(float s) { raw_.scale = s; return *this; }
    // How plans group the columns (DA_GROUPING_LSH, _SIMILARITY, _KEY_WEIGHTED).
    Config &grouping(da_grouping g) { raw_.grouping = g; return *this; }

    const da_config *get() const noexcept { return &raw_; }
    const std::vector<std::uint32_t> &group_sizes() const noexcept { return sizes_; }

private:
    friend std::vector<std::uint32_t> load_group_sizes(const std::string &, const std::string &, const char *,
                                                       Config *);
    friend std::vector<std::uint32_t> load_group_sizes_file(const std::string &, const std::string &,
                                                            const char *, Config *);

    void sync() {
        raw_.group_sizes = sizes_.empty() ? nullptr : sizes_.data();
        raw_.num_group_sizes = sizes_.size();
    }

    da_config raw_{};
    std::vector<std::uint32_t> sizes_;
};

// The plan's dimensions for queries `q` under `config`.
inline da_plan_shape plan_shape(const Config &config, const da_tensor &q) {
    da_plan_shape shape{};
    check(da_get_plan_shape(config.get(), &q, &shape));
    return shape;
}

// Per-(batch, query head) error estimates, each dense [batch][q_heads] (see
// da_estimate_errors).
struct ErrorEstimates {
    std::vector<double> relative_score_error, rms_logit_error, sampled_output_error;
};

// One calibration sample of a layer for the planner.
struct Sample {
    da_tensor q, k, v;
};

// The planner's choice for one layer (see da_choose_group_sizes).
struct BudgetPlan {
    std::vector<std::uint32_t> group_sizes;  // one per query head, for Config::group_sizes
    std::vector<double> measured_error, estimated_error;
    double flop_saving = 0;
    bool target_met = false;
};

// Chooses G per query head for one layer from its calibration samples:
// target_kind DA_BUDGET_TARGET_MAX_ERROR (target: largest relative error per
// head) or DA_BUDGET_TARGET_FLOP_SAVING (target: fraction of FLOPs to save).
inline BudgetPlan choose_group_sizes(const Config &config, const std::vector<Sample> &samples,
                                     const std::vector<std::uint32_t> &candidates, da_budget_target target_kind,
                                     double target) {
    std::vector<da_tensor> q, k, v;
    for (const Sample &s : samples) {
        q.push_back(s.q);
        k.push_back(s.k);
        v.push_back(s.v);
    }
    std::size_t heads = samples.empty() ? 0 : samples[0].q.heads;
    BudgetPlan plan;
    plan.group_sizes.resize(heads);
    plan.measured_error.resize(heads);
    plan.estimated_error.resize(heads);
    std::uint32_t met = 0;
    check(da_choose_group_sizes(config.get(), q.data(), k.data(), v.data(), samples.size(),
                                candidates.empty() ? nullptr : candidates.data(), candidates.size(), target_kind,
                                target, heads ? plan.group_sizes.data() : nullptr, plan.measured_error.data(),
                                plan.estimated_error.data(), heads, &plan.flop_saving, &met));
    plan.target_met = met != 0;
    return plan;
}

// The group sizes of `layer` (in `file`, if not NULL) from a table written by
// the planner's plan_heads command, given as JSON text. With `config`, its
// block_rows and grouping become the table's and its group sizes the ones read.
inline std::vector<std::uint32_t> load_group_sizes(const std::string &json, const std::string &layer,
                                                   const char *file = nullptr, Config *config = nullptr) {
    std::size_t heads = 0;
    check(da_load_group_sizes(json.data(), json.size(), file, layer.c_str(), nullptr, 0, &heads, nullptr));
    std::vector<std::uint32_t> sizes(heads);
    check(da_load_group_sizes(json.data(), json.size(), file, layer.c_str(), sizes.data(), sizes.size(), &heads,
                              config ? &config->raw_ : nullptr));
    if (config) config->group_sizes(sizes);
    return sizes;
}

// load_group_sizes on the table in the file at `path`.
inline std::vector<std::uint32_t> load_group_sizes_file(const std::string &path, const std::string &layer,
                                                        const char *file = nullptr, Config *config = nullptr) {
    std::size_t heads = 0;
    check(da_load_group_sizes_file(path.c_str(), file, layer.c_str(), nullptr, 0, &heads, nullptr));
    std::vector<std::uint32_t> sizes(heads);
    check(da_load_group_sizes_file(path.c_str(), file, layer.c_str(), sizes.data(), sizes.size(), &heads,
                                   config ? &config->raw_ : nullptr));
    if (config) config->group_sizes(sizes);
    return sizes;
}

// Owns a da_context: the scratch memory of the compute calls. Movable, not
// copyable; use one per thread.
class Context {
public:
    Context() { check(da_context_new(&ctx_)); }
    ~Context() { da_context_free(ctx_); }
    Context(const Context &) = delete;
    Context &operator=(const Context &) = delete;
    Context(Context &&other) noexcept : ctx_(std::exchange(other.ctx_, nullptr)) {}
    Context &operator=(Context &&other) noexcept {
        if (this != &other) {
            da_context_free(ctx_);
            ctx_ = std::exchange(other.ctx_, nullptr);
        }
        return *this;
    }

    da_context *get() const noexcept { return ctx_; }

    // The plan of `q`: one permutation of the head-dimension columns per
    // (batch, query head, query block).
    std::vector<std::uint16_t> plan(const Config &config, const da_tensor &q) {
        std::vector<std::uint16_t> plan(plan_shape(config, q).num_entries);
        check(da_plan(ctx_, config.get(), &q, plan.data(), plan.size()));
        return plan;
    }

    // The plan of `q` for attention over the keys `k`: needed for
    // DA_GROUPING_KEY_WEIGHTED, the same as plan() in the other modes.
    std::vector<std::uint16_t> plan_with_keys(const Config &config, const da_tensor &q, const da_tensor &k) {
        std::vector<std::uint16_t> plan(plan_shape(config, q).num_entries);
        check(da_plan_with_keys(ctx_, config.get(), &q, &k, plan.data(), plan.size()));
        return plan;
    }

    // Per-head error estimates of DistrAttention on `plan` (nullptr: the plan
    // forward() would use), with `sample_rows` rows measured exactly.
    ErrorEstimates estimate_errors(const Config &config, const da_tensor &q, const da_tensor &k,
                                   const da_tensor &v, const std::vector<std::uint16_t> *plan = nullptr,
                                   std::size_t sample_rows = 16) {
        std::size_t n = q.batch * q.heads;
        ErrorEstimates e{std::vector<double>(n), std::vector<double>(n), std::vector<double>(n)};
        check(da_estimate_errors(ctx_, config.get(), plan ? plan->data() : nullptr, plan ? plan->size() : 0, &q, &k,
                                 &v, sample_rows, e.relative_score_error.data(), e.rms_logit_error.data(),
                                 e.sampled_output_error.data(), n));
        return e;
    }

    // Gradients of DistrAttention on `plan` (the forward's) into the f32
    // tensors dq, dk, dv; `o` and `lse` are the forward's output and
    // log-sum-exp, `d_out` the gradient of the loss with respect to `o`.
    void attention_backward(const Config &config, const std::vector<std::uint16_t> &plan, const da_tensor &q,
                            const da_tensor &k, const da_tensor &v, const da_tensor &o,
                            const std::vector<float> &lse, const da_tensor &d_out, const da_tensor &dq,
                            const da_tensor &dk, const da_tensor &dv) {
        check(da_attention_backward(ctx_, config.get(), plan.data(), plan.size(), &q, &k, &v, &o, lse.data(),
                                    lse.size(), &d_out, &dq, &dk, &dv));
    }

    // Gradients of exact attention (o and lse from exact_attention()).
    void exact_attention_backward(const Config &config, const da_tensor &q, const da_tensor &k, const da_tensor &v,
                                  const da_tensor &o, const std::vector<float> &lse, const da_tensor &d_out,
                                  const da_tensor &dq, const da_tensor &dk, const da_tensor &dv) {
        check(da_exact_attention_backward(ctx_, config.get(), &q, &k, &v, &o, lse.data(), lse.size(), &d_out, &dq,
                                          &dk, &dv));
    }

    // DistrAttention on a given plan; `lse` (optional) receives
    // batch * q_heads * q_len row log-sum-exps.
    void attention(const Config &config, const std::vector<std::uint16_t> &plan, const da_tensor &q,
                   const da_tensor &k, const da_tensor &v, const da_tensor &out,
                   std::vector<float> *lse = nullptr) {
        float *lse_ptr = lse_data(lse, q);
        check(da_attention(ctx_, config.get(), plan.data(), plan.size(), &q, &k, &v, &out, lse_ptr,
                           lse ? lse->size() : 0));
    }

    void exact_attention(const Config &config, const da_tensor &q, const da_tensor &k, const da_tensor &v,
                         const da_tensor &out, std::vector<float> *lse = nullptr) {
        float *lse_ptr = lse_data(lse, q);
        check(da_exact_attention(ctx_, config.get(), &q, &k, &v, &out, lse_ptr, lse ? lse->size() : 0));
    }

    // One-shot DistrAttention; returns the plan it computed.
    std::vector<std::uint16_t> forward(const Config &config, const da_tensor &q, const da_tensor &k,
                                       const da_tensor &v, const da_tensor &out,
                                       std::vector<float> *lse = nullptr) {
        std::vector<std::uint16_t> plan(plan_shape(config, q).num_entries);
        float *lse_ptr = lse_data(lse, q);
        check(da_forward(ctx_, config.get(), &q, &k, &v, &out, lse_ptr, lse ? lse->size() : 0, plan.data(),
                         plan.size()));
        return plan;
    }

private:
    // Sizes `lse` to batch * q_heads * q_len and returns its data (or NULL).
    static float *lse_data(std::vector<float> *lse, const da_tensor &q) {
        if (!lse) return nullptr;
        lse->resize(q.batch * q.heads * q.seq);
        return lse->data();
    }

    da_context *ctx_ = nullptr;
};

// The CUDA entry points (a library built with the cargo feature `cuda`;
// otherwise the constructor throws with DA_STATUS_CUDA_UNAVAILABLE). Bound to
// the CUDA context current at construction; tensors hold device pointers,
// `plan` and `lse` are device buffers of the given lengths, and `stream` is a
// cudaStream_t / CUstream (nullptr: the default stream). Calls queue kernels
// and return.
class CudaContext {
public:
    CudaContext() { check(da_cuda_context_create(&ctx_)); }
    ~CudaContext() { da_cuda_context_destroy(ctx_); }
    CudaContext(const CudaContext &) = delete;
    CudaContext &operator=(const CudaContext &) = delete;
    CudaContext(CudaContext &&other) noexcept : ctx_(std::exchange(other.ctx_, nullptr)) {}
    CudaContext &operator=(CudaContext &&other) noexcept {
        if (this != &other) {
            da_cuda_context_destroy(ctx_);
            ctx_ = std::exchange(other.ctx_, nullptr);
        }
        return *this;
    }

    da_cuda_context *get() const noexcept { return ctx_; }

    void plan(const Config &config, const da_tensor &q, std::uint16_t *plan, std::size_t plan_len,
              void *stream) {
        check(da_cuda_plan(ctx_, config.get(), &q, plan, plan_len, stream));
    }

    // `plan` may be nullptr when every head has G = 1.
    void attention(const Config &config, const std::uint16_t *plan, std::size_t plan_len, const da_tensor &q,
                   const da_tensor &k, const da_tensor &v, const da_tensor &out, void *stream,
                   float *lse = nullptr, std::size_t lse_len = 0) {
        check(da_cuda_attention(ctx_, config.get(), plan, plan_len, &q, &k, &v, &out, lse, lse_len, stream));
    }

    void exact_attention(const Config &config, const da_tensor &q, const da_tensor &k, const da_tensor &v,
                         const da_tensor &out, void *stream, float *lse = nullptr, std::size_t lse_len = 0) {
        check(da_cuda_exact_attention(ctx_, config.get(), &q, &k, &v, &out, lse, lse_len, stream));
    }

    // `plan_out` may be nullptr (the plan then lives in a stream-ordered workspace).
    void forward(const Config &config, const da_tensor &q, const da_tensor &k, const da_tensor &v,
                 const da_tensor &out, void *stream, float *lse = nullptr, std::size_t lse_len = 0,
                 std::uint16_t *plan_out = nullptr, std::size_t plan_len = 0) {
        check(da_cuda_forward(ctx_, config.get(), &q, &k, &v, &out, lse, lse_len, plan_out, plan_len, stream));
    }

    // The workspace (bytes) of attention_backward for `config` and the shapes
    // of `q` and `d_out` (their data pointers are not read).
    static std::size_t backward_workspace_size(const Config &config, const da_tensor &q, const da_tensor &d_out) {
        std::size_t size = 0;
        check(da_cuda_backward_workspace_size(config.get(), &q, &d_out, &size));
        return size;
    }

    // dQ, dK, dV on the forward's plan (nullptr when every head has G = 1),
    // output `o` and `lse`. `workspace` may be nullptr: the library then
    // allocates it in stream order on `stream`.
    void attention_backward(const Config &config, const std::uint16_t *plan, std::size_t plan_len,
                            const da_tensor &q, const da_tensor &k, const da_tensor &v, const da_tensor &o,
                            const float *lse, std::size_t lse_len, const da_tensor &d_out, const da_tensor &dq,
                            const da_tensor &dk, const da_tensor &dv, void *stream, void *workspace = nullptr,
                            std::size_t workspace_size = 0) {
        check(da_cuda_attention_backward(ctx_, config.get(), plan, plan_len, &q, &k, &v, &o, lse, lse_len, &d_out,
                                         &dq, &dk, &dv, workspace, workspace_size, stream));
    }

    void exact_attention_backward(const Config &config, const da_tensor &q, const da_tensor &k, const da_tensor &v,
                                  const da_tensor &o, const float *lse, std::size_t lse_len, const da_tensor &d_out,
                                  const da_tensor &dq, const da_tensor &dk, const da_tensor &dv, void *stream,
                                  void *workspace = nullptr, std::size_t workspace_size = 0) {
        check(da_cuda_exact_attention_backward(ctx_, config.get(), &q, &k, &v, &o, lse, lse_len, &d_out, &dq, &dk,
                                               &dv, workspace, workspace_size, stream));
    }

private:
    da_cuda_context *ctx_ = nullptr;
};

}  // namespace distr_attention

#endif  // DISTR_ATTENTION_HPP
