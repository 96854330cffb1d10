//! Parameters of DistrAttention (ALGORITHM.md, "Parameters") and their validation.

use crate::error::{Error, Result};

/// How the Q columns of a group are fused into one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Fusion {
    /// `Qhat[i,t]` is the mean of the group's columns (the paper's default).
    #[default]
    Mean,
    /// `Qhat[i,t]` is the group's first column in plan order.
    Sample,
}

/// How a plan groups the columns of each query block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GroupingMode {
    /// The paper's angular LSH with inverse-Gray ordering (ALGORITHM.md).
    /// Depends only on Q, `block_rows`, P and the seed; any G.
    #[default]
    Lsh,
    /// Exact similarity of the block's Q columns: greedy agglomeration that
    /// minimises the within-group spread of the columns (Ward's criterion).
    /// G must be a power of two. Depends on Q and G.
    Similarity,
    /// Like `Similarity`, but minimises the score error itself, weighting
    /// column differences by K's Gram matrix over all keys of the KV head.
    /// Needs the keys (`plan_with_keys`). G must be a power of two.
    KeyWeighted,
}

/// Group size G: one for all query heads, or one per query head.
/// A head with G = 1 computes exact attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupSizes<'a> {
    Uniform(usize),
    /// `sizes[h]` is the group size of query head `h`; the length must equal
    /// the number of query heads.
    PerHead(&'a [usize]),
}

impl GroupSizes<'_> {
    /// Group size of query head `h` (validated configs only index in range).
    #[inline]
    pub fn get(&self, h: usize) -> usize {
        match *self {
            GroupSizes::Uniform(g) => g,
            GroupSizes::PerHead(sizes) => sizes.get(h).copied().unwrap_or(0),
        }
    }
}

/// All parameters of one DistrAttention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config<'a> {
    /// l: query rows that share one grouping. A short last block is zero-padded.
    pub block_rows: usize,
    /// G per query head; must divide the head dimension.
    pub group_sizes: GroupSizes<'a>,
    /// P: random hyperplanes of the angular LSH, `1..=32`.
    pub num_projections: u32,
    /// Fixes the projections, so every backend and run groups identically.
    pub seed: u64,
    pub fusion: Fusion,
    /// Lower-triangular mask, bottom-right aligned when N != M.
    pub causal: bool,
    /// Softmax scale; `None` means `1/sqrt(head_dim)` with the original head dimension.
    pub scale: Option<f32>,
    /// How plans group columns: the paper's LSH (default) or exact similarity.
    pub grouping: GroupingMode,
}

impl Default for Config<'static> {
    /// l = 64, G = 2, P = 16, seed 0, Mean fusion, no mask, default scale.
    fn default() -> Self {
        Config::with_group_size(2)
    }
}

impl Config<'static> {
    /// The defaults with a uniform group size `g`.
    pub const fn with_group_size(g: usize) -> Self {
        Config {
            block_rows: 64,
            group_sizes: GroupSizes::Uniform(g),
            num_projections: 16,
            seed: 0,
            fusion: Fusion::Mean,
            causal: false,
            scale: None,
            grouping: GroupingMode::Lsh,
        }
    }

    /// Exact attention (G = 1 for every head).
    pub const fn exact() -> Self {
        Config::with_group_size(1)
    }
}

impl<'a> Config<'a> {
    /// Group size of query head `h`.
    #[inline]
    pub fn group_size(&self, h: usize) -> usize {
        self.group_sizes.get(h)
    }

    /// The softmax scale actually used for a head dimension.
    pub fn softmax_scale(&self, head_dim: usize) -> f32 {
        match self.scale {
            Some(s) => s,
            None => (1.0 / libm::sqrt(head_dim as f64)) as f32,
        }
    }

    /// Checks the parameters the plan depends on: `block_rows >= 1`, `P in 1..=32`.
    pub fn validate_plan_params(&self) -> Result<()> {
        if self.block_rows == 0 {
            return Err(Error::InvalidBlockRows { got: self.block_rows });
        }
        if !(1..=32).contains(&self.num_projections) {
            return Err(Error::InvalidNumProjections { got: self.num_projections });
        }
        Ok(())
    }

    /// Checks every parameter for a problem with `q_heads` query heads of
    /// dimension `head_dim`: plan parameters, scale, and that each group size
    /// is at least 1 and divides `head_dim`.
    pub fn validate(&self, q_heads: usize, head_dim: usize) -> Result<()> {
        self.validate_plan_params()?;
        if let Some(s) = self.scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::InvalidScale { got: s });
            }
        }
        if let GroupSizes::PerHead(sizes) = self.group_sizes {
            if sizes.len() != q_heads {
                return Err(Error::GroupSizesLength { expected: q_heads, got: sizes.len() });
            }
        }
        for h in 0..q_heads {
            let g = self.group_size(h);
            if g == 0 || !head_dim.is_multiple_of(g) {
                return Err(Error::InvalidGroupSize { head: h, group_size: g, head_dim });
            }
            // A uniform size needs checking once.
            if matches!(self.group_sizes, GroupSizes::Uniform(_)) {
                break;
            }
        }
        Ok(())
    }
}
