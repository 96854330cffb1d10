//! DistrAttention for Rust programs: re-exports the `no_std` core and adds
//! what needs `std`: loading activations from safetensors files and the
//! error measures of the evaluation, and multi-threaded CPU attention.
pub use distr_attention_core::*;

pub mod activations;
pub mod metrics;
pub mod parallel;
