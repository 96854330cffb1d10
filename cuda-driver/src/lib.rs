//! # distr-attention-cuda
//!
//! The CUDA backend of DistrAttention: a plan kernel and a fused
//! FlashAttention-2-style attention kernel (`../kernels`, CUDA C++), and this
//! driver over [`cust`]. Everything CUDA sits behind the **`cuda`** cargo
//! feature; without it this crate is empty and needs no CUDA toolkit.
//!
//! With the feature, `build.rs` compiles the kernels with nvcc (from `$NVCC`,
//! `$CUDA_HOME`, or the PyPI toolchain `.ci/cuda.sh` installs into `.tools/`)
//! to cubins for sm_90a and sm_80 and PTX for compute_80, and embeds them.
//! An [`Engine`] loads them once per CUDA context (cached, shared by the
//! engines of that context): the sm_90a cubin on compute capability 9.0,
//! the sm_80 cubin on 8.x, the PTX (JIT) on newer devices.
//!
//! ## API
//! * Over raw device pointers, what inference engines hold:
//!   [`Engine::plan_raw`] and [`Engine::attention_raw`] take [`RawTensor`]s
//!   (address, length in elements, [`Layout`] with element strides, [`DType`])
//!   and a `CUstream`.
//! * Over cust buffers: [`Engine::plan`], [`Engine::attention`],
//!   [`Engine::distr_attention`] take [`GpuTensor`]s (a `DeviceSlice` and a
//!   layout) of [`F16`] or [`Bf16`] and a cust `Stream`.
//!
//! * The backward pass: [`Engine::attention_backward_raw`] (raw pointers,
//!   [`RawForward`], [`RawGradients`]) and [`Engine::attention_backward`]
//!   (cust buffers, [`GpuForward`], [`GpuGradients`]), with a caller-provided
//!   f32 workspace of [`backward_workspace_len`] elements.
//!
//! Both validate before launching, with the core's checks and typed errors
//! (see [`validate`] and [`check_backward`]), and launch asynchronously on
//! the caller's stream.
//!
//! ## What the kernels compute
//! Exactly the function of the project's ALGORITHM.md (the core's
//! `reference::attention` on the same plan), in f16 or bf16 with f32
//! accumulation:
//! * **Plan**: per (batch, head, block of `block_rows` query rows) the P dot
//!   products of each column with R on tensor cores (R split exactly into
//!   three parts of Q's type, f32 accumulation), inverse-Gray keys, a
//!   stable sort; one CTA per block at a time. `block_rows <= 128`,
//!   `head_dim` in {16, 32, 64, 128}. It equals the core's f64 plan except
//!   where a dot product is within rounding of zero.
//! * **Similarity / key-weighted plan** (`Config::grouping`; key-weighted
//!   through [`Engine::plan_with_keys`]): the core's greedy grouping and
//!   swap refinement, one CTA per block (Gram matrix with mma.sync, the
//!   greedy matching as parallel locally-dominant rounds, the refinement's
//!   sequential scan reproduced by evaluating all pairs of groups at once),
//!   f32. `block_rows <= 128`, `head_dim` in {32, 64, 128}, G in {1, 2, 4, 8}
//!   per head. It equals the core's f64 plan except after a near-tie
//!   decision (see `kernels/NOTES.md`). Speed (H100, bf16, D = 128,
//!   8192 blocks of 128 rows): 0.71 ms at G = 2 (LSH: 0.20 ms), 15.5% of
//!   the attention at N = 4096; 1.6 / 2.7 ms at G = 4 / 8; key-weighted
//!   1.4 / 7.7 / 43 ms at G = 2 / 4 / 8.
//! * **Attention**: `block_rows` in {64, 128} (one CTA per block, so one
//!   permutation per CTA), `head_dim` = `v_dim` in {32, 64, 128}, G in
//!   {1, 2, 4, 8} per head (one launch per distinct G; G = 1 heads never
//!   read the plan and use 128-row tiles whatever `block_rows`), Mean and Sample
//!   fusion, bottom-right causal mask, any N and M, GQA/MQA, BSHD element
//!   strides. Qhat is fused once per CTA and rounded to the input type; Khat
//!   is fused per key tile in f32 and rounded to the input type; P is
//!   rounded to the input type for P·V (as in FlashAttention-2).
//! * **Output type**: the caller chooses per call: f32, or the input type
//!   (f16/bf16, half the bytes). LSE (optional) is f32, natural log, dense
//!   `[batch, q_heads, q_len]`. A row that sees no key outputs 0 and LSE -inf.
//! * **Alignment**: Q, K, V 16-byte aligned with batch/seq/head strides
//!   multiples of 8 elements; output aligned to two elements with even
//!   strides; for the plan kernel, Q 8-byte aligned with strides multiples
//!   of 4. Violations return [`Error::Misaligned`].
//! * **Hopper kernel**: on compute capability 9.0 the engine runs a wgmma
//!   kernel (`kernels/hfwd.cu`: K and V by TMA, a producer warpgroup for
//!   the K̂ fusion, two consumer warpgroups, mbarrier pipeline) for head_dim
//!   64/128 with G = 1 or `block_rows` = 128; other cases, and K or V whose
//!   tensor map the driver refuses, use the mma.sync kernel.
//!   [`Engine::with_wgmma`] or `DISTR_ATTENTION_KERNEL=mma` pins the
//!   mma.sync kernel. H100, bf16: G = 1 1.13-1.65x FlashAttention-2, G = 2
//!   with its plan 0.79-1.56x (see `kernels/NOTES.md`, "Hopper kernel").
//! * **Speed** of the mma.sync kernel (H100, bf16): exact attention (G = 1)
//!   runs at 0.97-1.28x PyTorch's FlashAttention-2; G = 2 with its plan at
//!   0.67-0.99x: on this mma.sync path the K̂ fusion costs about what the
//!   halved Q̂K̂ᵀ saves.
//! * **Backward** (`kernels/bwd.cu`): dQ, dK, dV of the same function (the
//!   core's `reference::attention_backward` on the same plan) from Q, K, V,
//!   the forward's O and LSE, and dO, FlashAttention-2 style (S and P
//!   recomputed per tile, no `N x M` buffer). O, dO and the gradients are
//!   f32 or the input type; same head dims, block rows, group sizes, masks,
//!   GQA and strides as the forward. S and dQ̂ run on d/G columns, dP, dV and
//!   dK at full width (3 + 2/G of exact attention's 5 products). dQ sums f32
//!   atomics, so it is not bit-reproducible; Delta = rowsum(dO ∘ O) is taken
//!   from the given O, so an O stored in bf16 limits the accuracy of dQ and
//!   dK on nearly one-hot rows (see `kernels/NOTES.md`). Its kernels need up
//!   to 224 KB of shared memory per CTA (head_dim 128); on devices with less
//!   (8.x) those launches fail with a CUDA error. Speed (H100, bf16, with the
//!   Hopper forward): one training step at 0.81-0.86x torch FA2 (G = 1) and
//!   0.77-0.87x (G = 2, plan included); the backward alone 0.72-0.80x FA2's.
//! * **Not checked on the device**: finiteness of the inputs (the CPU core
//!   rejects NaN/inf; here they propagate to the output). Plan entries are
//!   clamped to `head_dim - 1`, so a corrupt plan gives wrong numbers but no
//!   out-of-bounds access.
//!
//! **Causality caveat** (as in the core): a block's plan is computed from
//! all its rows, so with `causal` an output row may depend on later query
//! rows of its own block (never on later keys or values).

// Without the `cuda` feature the items the documentation links to do not exist.
#![cfg_attr(not(feature = "cuda"), allow(rustdoc::broken_intra_doc_links))]

#[cfg(feature = "cuda")]
mod backward;
#[cfg(feature = "cuda")]
mod engine;
#[cfg(feature = "cuda")]
mod error;
#[cfg(feature = "cuda")]
mod params;
#[cfg(feature = "cuda")]
mod types;
#[cfg(feature = "cuda")]
pub mod validate;

#[cfg(feature = "cuda")]
pub use backward::{
    backward_workspace_len, check_backward, GpuForward, GpuGradients, RawForward, RawGradients,
};
#[cfg(feature = "cuda")]
pub use cust;
#[cfg(feature = "cuda")]
pub use distr_attention_core::{Config, DType, Fusion, GroupSizes, Layout, PlanShape, Problem};
#[cfg(feature = "cuda")]
pub use engine::similarity::{
    check_similarity_plan, SIMILARITY_GROUP_SIZES, SIMILARITY_HEAD_DIMS, SIMILARITY_MAX_BLOCK_ROWS,
};
#[cfg(feature = "cuda")]
pub use engine::{Engine, ImageKind};
#[cfg(feature = "cuda")]
pub use error::{Error, Result};
#[cfg(feature = "cuda")]
pub use types::{Bf16, GpuElement, GpuOutput, GpuPlan, GpuTensor, GpuTensorMut, F16};
#[cfg(feature = "cuda")]
pub use validate::{RawBuffer, RawPlan, RawTensor};
