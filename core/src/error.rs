//! The one error type of the crate. Every public function that can fail
//! returns it; no argument value makes the public API panic.

use core::fmt;

/// Which argument an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    Q,
    K,
    V,
    Output,
    Lse,
    Plan,
    Projections,
    Scratch,
    GroupSizes,
    /// The gradient of the output (backward pass).
    DOut,
    DQ,
    DK,
    DV,
}

impl Operand {
    pub const fn name(self) -> &'static str {
        match self {
            Operand::Q => "q",
            Operand::K => "k",
            Operand::V => "v",
            Operand::Output => "output",
            Operand::Lse => "lse",
            Operand::Plan => "plan",
            Operand::Projections => "projections",
            Operand::Scratch => "scratch",
            Operand::GroupSizes => "group_sizes",
            Operand::DOut => "d_out",
            Operand::DQ => "dq",
            Operand::DK => "dk",
            Operand::DV => "dv",
        }
    }
}

/// A dimension of a `[batch, seq, heads, head_dim]` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Batch,
    Seq,
    Heads,
    HeadDim,
}

impl Dim {
    pub const fn name(self) -> &'static str {
        match self {
            Dim::Batch => "batch",
            Dim::Seq => "seq",
            Dim::Heads => "heads",
            Dim::HeadDim => "head_dim",
        }
    }
}

/// Everything that can go wrong, with the values needed to say why.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Error {
    /// `block_rows` must be at least 1.
    InvalidBlockRows { got: usize },
    /// `num_projections` must be in `1..=32` (one bit of the LSH code each).
    InvalidNumProjections { got: u32 },
    /// The softmax scale must be finite and positive.
    InvalidScale { got: f32 },
    /// A group size must be at least 1 and divide the head dimension.
    InvalidGroupSize { head: usize, group_size: usize, head_dim: usize },
    /// Per-head group sizes must list one entry per query head.
    GroupSizesLength { expected: usize, got: usize },
    /// A tensor has a zero-sized dimension.
    EmptyDimension { operand: Operand, dim: Dim },
    /// Two tensors disagree on a dimension.
    ShapeMismatch { operand: Operand, dim: Dim, expected: usize, got: usize },
    /// Grouped-query attention needs `q_heads % kv_heads == 0`.
    HeadsNotDivisible { q_heads: usize, kv_heads: usize },
    /// Plans store column indices as `u16`.
    HeadDimTooLarge { got: usize, max: usize },
    /// A size or offset computed from the shape and strides overflows `usize`.
    SizeOverflow { operand: Operand },
    /// A buffer is shorter than its shape, strides or the documented length require.
    BufferTooSmall { operand: Operand, needed: usize, got: usize },
    /// Two distinct output elements would share a memory location.
    OverlappingOutput { operand: Operand },
    /// An input holds NaN or an infinity (at this element offset of its buffer).
    NonFinite { operand: Operand, offset: usize },
    /// The allocator could not provide a buffer (allocating API only).
    AllocationFailed { operand: Operand, len: usize },
    /// A plan block is not a permutation of `0..head_dim`.
    NotAPermutation { block: usize },
    /// The element type is not supported by this backend.
    UnsupportedDtype { operand: Operand },
    /// The head dimension is not supported by this backend.
    UnsupportedHeadDim { got: usize },
    /// `block_rows` is not supported by this backend.
    UnsupportedBlockRows { got: usize },
    /// A planner target outside its range (an error >= 0, a FLOP fraction in 0..1).
    InvalidTarget { got: f64 },
    /// The grouping mode cannot be used through this function.
    GroupingUnavailable { reason: &'static str },
    /// The group size is not supported by this backend.
    UnsupportedGroupSize { got: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::InvalidBlockRows { got } => {
                write!(f, "block_rows must be at least 1, got {got}")
            }
            Error::InvalidNumProjections { got } => {
                write!(f, "num_projections must be in 1..=32, got {got}")
            }
            Error::InvalidScale { got } => {
                write!(f, "scale must be finite and positive, got {got}")
            }
            Error::InvalidGroupSize { head, group_size, head_dim } => write!(
                f,
                "group size {group_size} of query head {head} must be at least 1 and divide head_dim {head_dim}"
            ),
            Error::GroupSizesLength { expected, got } => write!(
                f,
                "per-head group sizes: expected one per query head ({expected}), got {got}"
            ),
            Error::EmptyDimension { operand, dim } => {
                write!(f, "{}: dimension {} is zero", operand.name(), dim.name())
            }
            Error::ShapeMismatch { operand, dim, expected, got } => write!(
                f,
                "{}: dimension {} is {got}, expected {expected}",
                operand.name(),
                dim.name()
            ),
            Error::HeadsNotDivisible { q_heads, kv_heads } => write!(
                f,
                "query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})"
            ),
            Error::HeadDimTooLarge { got, max } => {
                write!(f, "head_dim {got} exceeds the maximum {max}")
            }
            Error::SizeOverflow { operand } => {
                write!(f, "{}: size or offset overflows", operand.name())
            }
            Error::BufferTooSmall { operand, needed, got } => write!(
                f,
                "{}: buffer holds {got} elements, {needed} needed",
                operand.name()
            ),
            Error::OverlappingOutput { operand } => write!(
                f,
                "{}: strides make distinct elements overlap",
                operand.name()
            ),
            Error::NonFinite { operand, offset } => write!(
                f,
                "{}: non-finite value (NaN or infinity) at element offset {offset}",
                operand.name()
            ),
            Error::AllocationFailed { operand, len } => write!(
                f,
                "{}: could not allocate {len} elements",
                operand.name()
            ),
            Error::NotAPermutation { block } => write!(
                f,
                "plan: block {block} is not a permutation of 0..head_dim"
            ),
            Error::UnsupportedDtype { operand } => {
                write!(f, "{}: element type not supported by this backend", operand.name())
            }
            Error::UnsupportedHeadDim { got } => {
                write!(f, "head_dim {got} is not supported by this backend")
            }
            Error::UnsupportedBlockRows { got } => {
                write!(f, "block_rows {got} is not supported by this backend")
            }
            Error::InvalidTarget { got } => {
                write!(f, "target {got} out of range (error >= 0, FLOP fraction in [0, 1))")
            }
            Error::GroupingUnavailable { reason } => write!(f, "grouping mode unavailable: {reason}"),
            Error::UnsupportedGroupSize { got } => {
                write!(f, "group size {got} is not supported by this backend")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

pub type Result<T, E = Error> = core::result::Result<T, E>;
