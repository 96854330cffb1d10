//! # distr-attention-ffi: the C ABI of DistrAttention
//!
//! Entry points: plans (`da_plan`, `da_plan_with_keys`; LSH, similarity or
//! key-weighted grouping), attention on a plan, exact attention and the
//! one-shot forward pass, on host memory, and the same on device memory and a
//! CUDA stream (`da_cuda_plan`, `da_cuda_attention`, `da_cuda_exact_attention`,
//! `da_cuda_forward`); the backward pass (`da_attention_backward`,
//! `da_exact_attention_backward`); per-head error estimates
//! (`da_estimate_errors`); the error-budget planner (`da_choose_group_sizes`)
//! and the reader of its JSON tables (`da_load_group_sizes`).
//!
//! Builds `libdistr_attention.so` and `libdistr_attention.a`; the header
//! `include/distr_attention.h` is generated from these sources by cbindgen
//! (`cargo test -p distr-attention-ffi --test header` checks it is current;
//! `DA_UPDATE_HEADER=1` rewrites it).
//!
//! Conventions of every function:
//!
//! * **Status.** Every fallible function returns a `da_status`; `DA_STATUS_OK`
//!   (0) is success. `da_status_string` describes a code, and
//!   `da_last_error_message` gives the details of the calling thread's last
//!   failure, naming the offending argument.
//! * **No undefined behaviour for bad values.** NULL or misaligned pointers,
//!   unknown enum values, zero or inconsistent dimensions, sizes that overflow,
//!   short buffers, outputs that overlap inputs (compared by the byte ranges of
//!   their extents), non-finite inputs and invalid configs all return a status. What the library cannot check is that a
//!   non-NULL pointer really addresses the memory its descriptor describes:
//!   that is the caller's contract.
//! * **No partial writes.** All arguments are validated before any caller
//!   buffer is written; on error, outputs are untouched.
//! * **No panic crosses the boundary.** A panic (a bug) is caught and returned
//!   as `DA_STATUS_PANIC`.
//! * **Ownership.** The library keeps no pointer to caller memory after a call
//!   returns. Handles (`da_context`) are owned by the caller from `_new` until
//!   `_free`. Returned strings are static or thread-local and never freed by
//!   the caller.
//! * **Threads.** Functions are thread-safe except that a context may be used
//!   by one thread at a time.
//! * **Memory.** The `da_*` entry points run on the CPU and take host
//!   pointers. The `da_cuda_*` entry points (built with the cargo feature
//!   `cuda`; without it they return `DA_STATUS_CUDA_UNAVAILABLE`) take device
//!   pointers in the same descriptors, a `da_cuda_context` handle and the
//!   caller's stream (`void *`, a `CUstream` / `cudaStream_t`; NULL is the
//!   default stream), and queue their kernels on that stream without waiting.
//!   They check their arguments like the CPU entry points (less the
//!   finiteness of the inputs), plus what the kernels support, the alignment
//!   they need, and with the driver that every pointer is CUDA memory of the
//!   handle's device whose allocation covers the extent; nothing is launched
//!   when a check fails.
//!
//! **Causality caveat.** With `causal` and G > 1, a row's plan is computed from
//! all rows of its query block, so an output row may depend on later *query*
//! rows of its block (never on later keys or values): a prefill and a
//! token-by-token decode differ. `block_rows = 1` gives a strictly causal plan.

#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations)]

mod api;
mod backward;
mod budget;
mod context;
mod cuda;
mod error;
mod status;
mod table;
mod types;
mod version;

#[cfg(any(test, fuzzing))]
pub mod fuzzing;
#[cfg(test)]
mod tests;

pub use api::{
    da_attention, da_config_default, da_exact_attention, da_forward, da_get_plan_shape, da_plan,
    da_plan_with_keys, da_projections, da_projections_len,
};
pub use backward::{da_attention_backward, da_exact_attention_backward};
pub use budget::{da_choose_group_sizes, da_estimate_errors};
pub use context::{da_context, da_context_free, da_context_new};
pub use cuda::{
    da_cuda_attention, da_cuda_attention_backward, da_cuda_backward_workspace_size, da_cuda_built,
    da_cuda_context, da_cuda_context_create, da_cuda_context_destroy, da_cuda_exact_attention,
    da_cuda_exact_attention_backward, da_cuda_forward, da_cuda_plan,
};
pub use error::{da_last_error_copy, da_last_error_message};
pub use status::{da_status, da_status_string};
pub use table::{da_load_group_sizes, da_load_group_sizes_file};
pub use types::{da_budget_target, da_config, da_dtype, da_fusion, da_grouping, da_plan_shape, da_tensor};
pub use version::{da_version, da_version_number};
