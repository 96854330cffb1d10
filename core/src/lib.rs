//! # distr-attention-core
//!
//! The math of DistrAttention (Jin et al., arXiv 2507.17245) on the CPU,
//! `no_std`: deterministic LSH projections, the plan (a permutation of the
//! head-dimension columns per query block), exact attention and attention on
//! a plan, in two implementations of the same function:
//!
//! * the **fast path** ([`attention`], [`exact_attention`], and the
//!   allocation-free [`attention_into`], [`exact_attention_into`]): f32,
//!   tiled, online softmax;
//! * the **reference** ([`reference`], needs `alloc`): f64, row by row.
//!
//! Semantics follow `ALGORITHM.md` of the project. Tensors are
//! `[batch, seq, heads, head_dim]` with explicit element strides
//! ([`Layout`]); inputs may be f32, f16 or bf16, outputs are f32.
//!
//! ```
//! use distr_attention_core::{distr_attention, Config, Layout, Tensor, TensorMut};
//! let (n, h, d) = (100, 2, 32);
//! let layout = Layout::contiguous(1, n, h, d);
//! let x: Vec<f32> = (0..n * h * d).map(|i| ((i * 7919) % 103) as f32 / 50.0 - 1.0).collect();
//! let t = Tensor::new(&x, layout);
//! let mut o = vec![0.0f32; n * h * d];
//! let cfg = Config::with_group_size(2);
//! let plan = distr_attention(&cfg, &t, &t, &t, &mut TensorMut::new(&mut o, layout), None).unwrap();
//! assert_eq!(plan.shape().blocks, 2);
//! ```
//!
//! **Causality caveat.** The plan of a block is computed from all its rows,
//! so with `causal` an output row may depend on later *query* rows of its own
//! block (never on later keys or values): a prefill and a token-by-token
//! decode differ unless G = 1. `block_rows = 1` gives a strictly causal plan.
//!
//! **Numerics.** Inputs must be finite ([`Error::NonFinite`] otherwise).
//! Scores are accumulated in f32 on the fast path, so inputs whose products
//! overflow f32 give non-finite outputs.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod attention;
#[cfg(feature = "alloc")]
pub mod backward;
#[cfg(feature = "alloc")]
pub mod budget;
mod config;
mod element;
mod error;
#[cfg(feature = "alloc")]
mod estimate;
mod fast;
#[cfg(feature = "alloc")]
mod grouping;
mod layout;
mod plan;
mod projections;
#[cfg(feature = "alloc")]
pub mod reference;

#[cfg(feature = "alloc")]
pub use attention::{attention, distr_attention, exact_attention};
pub use attention::{attention_into, attention_scratch_len, exact_attention_into, validate_attention};
pub use config::{Config, Fusion, GroupSizes, GroupingMode};
pub use element::{DType, Element};
pub use error::{Dim, Error, Operand, Result};
#[cfg(feature = "alloc")]
pub use estimate::{estimate_errors, HeadErrorEstimate};
pub use layout::{Layout, Problem, Tensor, TensorMut, MAX_HEAD_DIM};
pub use plan::{inverse_gray, plan_into, plan_scratch_len, PlanRef, PlanShape};
#[cfg(feature = "alloc")]
pub use plan::{plan, plan_with_keys, Plan};
#[cfg(feature = "alloc")]
pub use projections::projections;
pub use projections::{projection, projections_into, projections_len, MAX_PROJECTIONS};

pub use half;

/// Allocates `len` copies of `x`, reporting failure as an error instead of aborting.
#[cfg(feature = "alloc")]
pub(crate) fn try_vec<T: Clone>(len: usize, x: T, operand: Operand) -> Result<alloc::vec::Vec<T>> {
    let mut v = alloc::vec::Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::AllocationFailed { operand, len })?;
    v.resize(len, x);
    Ok(v)
}
