//! Attention on a plan, and exact attention: argument validation shared by
//! the fast path and the reference, and the public entry points of the fast path.

use crate::config::Config;
use crate::error::{Dim, Error, Operand, Result};
use crate::layout::{check_buffer, check_finite, Problem, Tensor, TensorMut};
use crate::plan::PlanRef;
use crate::Element;

/// Which grouping an attention call uses.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Grouping<'p> {
    /// G = 1 for every head, identity column order.
    Exact,
    /// The config's group sizes on this plan (heads with G = 1 are exact).
    Plan(PlanRef<'p>),
}

impl<'p> Grouping<'p> {
    /// Group size and permutation of block `blk` for query head `h`;
    /// `None` for the permutation means identity with G = 1. (The fast path
    /// walks plan blocks itself.)
    #[cfg(feature = "alloc")]
    #[inline]
    pub(crate) fn block(
        &self,
        cfg: &Config<'_>,
        b: usize,
        h: usize,
        blk: usize,
    ) -> (usize, Option<&'p [u16]>) {
        match self {
            Grouping::Exact => (1, None),
            Grouping::Plan(plan) => (cfg.group_size(h), Some(plan.block(b, h, blk))),
        }
    }

    /// Rows that share one permutation.
    pub(crate) fn block_rows(&self, problem: &Problem) -> usize {
        match self {
            Grouping::Exact => problem.q_len,
            Grouping::Plan(plan) => plan.shape().block_rows,
        }
    }
}

/// Validates every argument of an attention call and returns the problem
/// sizes. Shapes, strides, buffer lengths, config, plan shape, and finiteness
/// of the inputs are checked before any output is written.
pub(crate) fn validate<T: Element>(
    cfg: &Config<'_>,
    grouping: &Grouping<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &TensorMut<'_>,
    lse: Option<&[f32]>,
) -> Result<Problem> {
    let p = Problem::new(&q.layout, &k.layout, &v.layout)?;
    cfg.validate(p.q_heads, p.head_dim)?;
    check_buffer(Operand::Q, q.data.len(), &q.layout)?;
    check_buffer(Operand::K, k.data.len(), &k.layout)?;
    check_buffer(Operand::V, v.data.len(), &v.layout)?;
    let needed = p.check_output(&out.layout)?;
    if out.data.len() < needed {
        return Err(Error::BufferTooSmall { operand: Operand::Output, needed, got: out.data.len() });
    }
    if let Some(lse) = lse {
        let needed = p.lse_len()?;
        if lse.len() < needed {
            return Err(Error::BufferTooSmall { operand: Operand::Lse, needed, got: lse.len() });
        }
    }
    if let Grouping::Plan(plan) = grouping {
        check_plan_shape(cfg, &p, plan)?;
    }
    check_finite(Operand::Q, q)?;
    check_finite(Operand::K, k)?;
    check_finite(Operand::V, v)?;
    Ok(p)
}

/// Checks every argument of an attention call exactly as [`attention_into`]
/// (with a plan) or [`exact_attention_into`] (without) do, without
/// computing anything: shapes, strides, buffer lengths, config, plan shape
/// and finiteness of the inputs. Returns the problem sizes.
pub fn validate_attention<T: Element>(
    cfg: &Config<'_>,
    plan: Option<&PlanRef<'_>>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &TensorMut<'_>,
    lse: Option<&[f32]>,
) -> Result<Problem> {
    let grouping = match plan {
        Some(p) => Grouping::Plan(*p),
        None => Grouping::Exact,
    };
    validate(cfg, &grouping, q, k, v, out, lse)
}

/// Checks that a plan was made for this problem and config.
pub(crate) fn check_plan_shape(cfg: &Config<'_>, p: &Problem, plan: &PlanRef<'_>) -> Result<()> {
    let s = plan.shape();
    let expected_blocks = p.q_len.div_ceil(cfg.block_rows);
    for (dim, expected, got) in [
        (Dim::Batch, p.batch, s.batch),
        (Dim::Heads, p.q_heads, s.heads),
        (Dim::HeadDim, p.head_dim, s.head_dim),
        (Dim::Seq, expected_blocks, s.blocks),
        (Dim::Seq, cfg.block_rows, s.block_rows),
    ] {
        if expected != got {
            return Err(Error::ShapeMismatch { operand: Operand::Plan, dim, expected, got });
        }
    }
    Ok(())
}

/// Length of the f32 scratch buffer [`attention_into`] and
/// [`exact_attention_into`] need for head dimensions `head_dim` (Q, K) and
/// `v_dim` (V). It does not depend on sequence lengths or `block_rows`.
pub fn attention_scratch_len(head_dim: usize, v_dim: usize) -> Result<usize> {
    crate::fast::scratch_len(head_dim, v_dim).ok_or(Error::SizeOverflow { operand: Operand::Scratch })
}

fn check_scratch(p: &Problem, scratch: &[f32]) -> Result<()> {
    let needed = attention_scratch_len(p.head_dim, p.v_dim)?;
    if scratch.len() < needed {
        return Err(Error::BufferTooSmall { operand: Operand::Scratch, needed, got: scratch.len() });
    }
    Ok(())
}

/// DistrAttention on a given plan (fast CPU path, no allocation).
///
/// Writes `out` (`[batch, q_len, q_heads, v_dim]`, f32, any non-overlapping
/// strides) and, if given, `lse` (natural-log row log-sum-exp, dense
/// `[batch, q_heads, q_len]`). A row that sees no key (causal with
/// `q_len > kv_len`) gets output 0 and log-sum-exp `-inf`.
/// `scratch` needs [`attention_scratch_len`] entries.
#[allow(clippy::too_many_arguments)]
pub fn attention_into<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
    scratch: &mut [f32],
) -> Result<()> {
    let grouping = Grouping::Plan(*plan);
    let p = validate(cfg, &grouping, q, k, v, out, lse.as_deref())?;
    check_scratch(&p, scratch)?;
    crate::fast::run(cfg, &grouping, &p, q, k, v, out, lse, scratch);
    Ok(())
}

/// Exact attention (every head G = 1; the config's group sizes, block rows
/// and projections are validated but not used). Fast CPU path, no allocation.
#[allow(clippy::too_many_arguments)]
pub fn exact_attention_into<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
    scratch: &mut [f32],
) -> Result<()> {
    let p = validate(cfg, &Grouping::Exact, q, k, v, out, lse.as_deref())?;
    check_scratch(&p, scratch)?;
    crate::fast::run(cfg, &Grouping::Exact, &p, q, k, v, out, lse, scratch);
    Ok(())
}

/// [`attention_into`] with an allocated scratch buffer.
#[cfg(feature = "alloc")]
pub fn attention<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    // Shape errors first, so a bogus head dimension is reported as such
    // rather than as a failed allocation.
    Problem::new(&q.layout, &k.layout, &v.layout)?;
    let len = attention_scratch_len(q.layout.dim, v.layout.dim)?;
    let mut scratch = crate::try_vec(len, 0f32, Operand::Scratch)?;
    attention_into(cfg, plan, q, k, v, out, lse, &mut scratch)
}

/// [`exact_attention_into`] with an allocated scratch buffer.
#[cfg(feature = "alloc")]
pub fn exact_attention<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    // Shape errors first, so a bogus head dimension is reported as such
    // rather than as a failed allocation.
    Problem::new(&q.layout, &k.layout, &v.layout)?;
    let len = attention_scratch_len(q.layout.dim, v.layout.dim)?;
    let mut scratch = crate::try_vec(len, 0f32, Operand::Scratch)?;
    exact_attention_into(cfg, q, k, v, out, lse, &mut scratch)
}

/// One-shot DistrAttention: computes the plan of `q`, attends with it, and
/// returns the plan (so it can be inspected or replayed).
#[cfg(feature = "alloc")]
pub fn distr_attention<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<crate::Plan> {
    let plan = crate::plan(cfg, q)?;
    attention(cfg, &plan.as_ref(), q, k, v, out, lse)?;
    Ok(plan)
}
