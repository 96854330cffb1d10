// distr_attention.hpp: a small header-only C++17 wrapper over the C ABI of
// DistrAttention (distr_attention.h).
//
//   distr_attention::Context ctx;                          // owns scratch memory
//   distr_attention::Config cfg;                           // the library defaults
//   cfg.group_size(4).causal(true);
//   auto q = distr_attention::dense(q_data, batch, seq, heads, head_dim);
//   std::vector<uint16_t> plan = ctx.forward(cfg, q, k, v, out);
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

    const da_config *get() const noexcept { return &raw_; }

private:
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

}  // namespace distr_attention

#endif  // DISTR_ATTENTION_HPP
