//! Argument checks of the device entry points. They make no CUDA call, so
//! they are public and testable without a GPU. Shapes, config and buffer
//! lengths are checked first, in the core's order and with the core's typed
//! errors (the core's own `Problem`, `Config` and `PlanShape` checks are
//! reused); then what only this backend restricts (element types, head
//! dimensions, block rows, group sizes, alignment).

use distr_attention_core::Operand;
use distr_attention_core::{
    Config, DType, Dim, Error as CoreError, GroupingMode, Layout, PlanShape, Problem, MAX_PROJECTIONS,
};

use crate::error::{Error, Result};

/// Head dimensions the attention kernels are compiled for (d = dv).
pub const HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Block rows (l) the attention kernels support: one CTA per block.
pub const BLOCK_ROWS: [usize; 2] = [64, 128];
/// Group sizes the attention kernels are compiled for.
pub const GROUP_SIZES: [usize; 4] = [1, 2, 4, 8];
/// Head dimensions and largest block rows of the plan kernel.
pub const PLAN_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
pub const PLAN_MAX_BLOCK_ROWS: usize = 128;

/// A device buffer: address and length in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawBuffer {
    pub ptr: u64,
    pub len: usize,
}

/// A device tensor: buffer, `[batch, seq, heads, dim]` layout with element
/// strides, and element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawTensor {
    pub ptr: u64,
    /// Elements the buffer holds from `ptr` on.
    pub len: usize,
    pub layout: Layout,
    pub dtype: DType,
}

/// A plan in device memory: `u16` permutations `[batch][heads][blocks][head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawPlan {
    pub ptr: u64,
    pub len: usize,
    pub shape: PlanShape,
}

pub(crate) fn buffer_len(operand: Operand, len: usize, layout: &Layout) -> Result<()> {
    let needed = layout.required_len(operand)?;
    if len < needed {
        return Err(CoreError::BufferTooSmall { operand, needed, got: len }.into());
    }
    Ok(())
}

pub(crate) fn check_dtype(operand: Operand, dtype: DType, expected: Option<DType>) -> Result<()> {
    let ok = match expected {
        Some(e) => dtype == e,
        None => matches!(dtype, DType::F16 | DType::BF16),
    };
    if ok {
        Ok(())
    } else {
        Err(CoreError::UnsupportedDtype { operand }.into())
    }
}

pub(crate) fn i32_of(x: usize, operand: Operand) -> Result<i32> {
    i32::try_from(x).map_err(|_| CoreError::SizeOverflow { operand }.into())
}

pub(crate) fn i64_of(x: usize, operand: Operand) -> Result<i64> {
    i64::try_from(x).map_err(|_| CoreError::SizeOverflow { operand }.into())
}

pub(crate) fn aligned(operand: Operand, ptr: u64, bytes: u64, what: &'static str) -> Result<()> {
    if ptr.is_multiple_of(bytes) {
        Ok(())
    } else {
        Err(Error::Misaligned { operand, what })
    }
}

pub(crate) fn strides_multiple(operand: Operand, l: &Layout, elems: usize, what: &'static str) -> Result<()> {
    let ok = [(l.batch, l.stride_batch), (l.seq, l.stride_seq), (l.heads, l.stride_head)]
        .iter()
        .all(|&(extent, stride)| extent <= 1 || stride.is_multiple_of(elems));
    if ok {
        Ok(())
    } else {
        Err(Error::Misaligned { operand, what })
    }
}

pub(crate) fn strides_fit(operand: Operand, l: &Layout) -> Result<()> {
    for s in [l.stride_batch, l.stride_seq, l.stride_head] {
        i64_of(s, operand)?;
    }
    i32_of(l.seq, operand)?;
    i32_of(l.heads, operand)?;
    Ok(())
}

/// Checks the arguments of [`crate::Engine::plan_raw`]: the core's checks of
/// `plan_into` (plan shape from the config and Q's layout, LSH grouping, Q's
/// buffer, the output's length), then the plan kernel's limits (f16/bf16,
/// `head_dim` in [`PLAN_HEAD_DIMS`], `block_rows <= 128`) and alignment (Q
/// 8-byte aligned with strides multiples of 4 elements: it is read four
/// columns at a time).
/// A plan matches the problem (the core's checks, in its order): its shape,
/// then its length. Shared by the forward and the backward.
pub(crate) fn plan_fits(cfg: &Config<'_>, p: &Problem, plan: &RawPlan) -> Result<()> {
    let s = plan.shape;
    let expected_blocks = p.q_len.div_ceil(cfg.block_rows);
    for (dim, expected, got) in [
        (Dim::Batch, p.batch, s.batch),
        (Dim::Heads, p.q_heads, s.heads),
        (Dim::HeadDim, p.head_dim, s.head_dim),
        (Dim::Seq, expected_blocks, s.blocks),
        (Dim::Seq, cfg.block_rows, s.block_rows),
    ] {
        if expected != got {
            return Err(CoreError::ShapeMismatch { operand: Operand::Plan, dim, expected, got }.into());
        }
    }
    let needed = s.num_entries()?;
    if plan.len < needed {
        return Err(CoreError::BufferTooSmall { operand: Operand::Plan, needed, got: plan.len }.into());
    }
    Ok(())
}

pub fn check_plan(cfg: &Config<'_>, q: &RawTensor, plan: &RawBuffer) -> Result<PlanShape> {
    let shape = PlanShape::new(cfg, &q.layout)?;
    if cfg.grouping != GroupingMode::Lsh {
        return Err(CoreError::GroupingUnavailable {
            reason: "the GPU plan kernel computes LSH plans only; compute other groupings on the CPU and upload them",
        }
        .into());
    }
    buffer_len(Operand::Q, q.len, &q.layout)?;
    let needed = shape.num_entries()?;
    if plan.len < needed {
        return Err(CoreError::BufferTooSmall { operand: Operand::Plan, needed, got: plan.len }.into());
    }
    debug_assert!(cfg.num_projections as usize <= MAX_PROJECTIONS);
    check_dtype(Operand::Q, q.dtype, None)?;
    if !PLAN_HEAD_DIMS.contains(&shape.head_dim) {
        return Err(CoreError::UnsupportedHeadDim { got: shape.head_dim }.into());
    }
    if cfg.block_rows > PLAN_MAX_BLOCK_ROWS {
        return Err(CoreError::UnsupportedBlockRows { got: cfg.block_rows }.into());
    }
    strides_fit(Operand::Q, &q.layout)?;
    i32_of(shape.blocks, Operand::Plan)?;
    aligned(Operand::Q, q.ptr, 8, "address must be 8-byte aligned")?;
    strides_multiple(Operand::Q, &q.layout, 4, "strides must be multiples of 4 elements")?;
    aligned(Operand::Plan, plan.ptr, 2, "address must be 2-byte aligned")?;
    Ok(shape)
}

/// Checks the arguments of [`crate::Engine::attention_raw`] and returns the
/// problem sizes. Same checks and order as the core's attention (shapes,
/// config, buffer lengths, output layout, LSE length, plan shape), then the
/// kernels' restrictions:
///
/// * Q, K, V: f16 or bf16, all the same (`UnsupportedDtype`); output f32 or
///   the input type (`UnsupportedDtype { operand: Output }`);
/// * `head_dim` in [`HEAD_DIMS`] and V's dimension equal to it (`UnsupportedHeadDim`);
/// * `block_rows` in [`BLOCK_ROWS`]; every head's G in [`GROUP_SIZES`];
/// * a plan unless every head has G = 1 ([`Error::MissingPlan`]);
/// * alignment ([`Error::Misaligned`]): Q, K, V 16-byte aligned with strides
///   multiples of 8 elements; the output aligned to 8 bytes (f32) or 4 bytes
///   with even strides; LSE 4-byte aligned; the plan 2-byte aligned.
///
/// Inputs are not scanned for NaN or infinities (the core reports
/// `NonFinite`); non-finite inputs give non-finite outputs.
pub fn check_attention(
    cfg: &Config<'_>,
    plan: Option<&RawPlan>,
    q: &RawTensor,
    k: &RawTensor,
    v: &RawTensor,
    out: &RawTensor,
    lse: Option<&RawBuffer>,
) -> Result<Problem> {
    let p = Problem::new(&q.layout, &k.layout, &v.layout)?;
    cfg.validate(p.q_heads, p.head_dim)?;
    buffer_len(Operand::Q, q.len, &q.layout)?;
    buffer_len(Operand::K, k.len, &k.layout)?;
    buffer_len(Operand::V, v.len, &v.layout)?;
    let needed = p.check_output(&out.layout)?;
    if out.len < needed {
        return Err(CoreError::BufferTooSmall { operand: Operand::Output, needed, got: out.len }.into());
    }
    if let Some(lse) = lse {
        let needed = p.lse_len()?;
        if lse.len < needed {
            return Err(CoreError::BufferTooSmall { operand: Operand::Lse, needed, got: lse.len }.into());
        }
    }
    if let Some(plan) = plan {
        plan_fits(cfg, &p, plan)?;
    }

    // What this backend restricts.
    check_dtype(Operand::Q, q.dtype, None)?;
    check_dtype(Operand::K, k.dtype, Some(q.dtype))?;
    check_dtype(Operand::V, v.dtype, Some(q.dtype))?;
    if out.dtype != DType::F32 && out.dtype != q.dtype {
        return Err(CoreError::UnsupportedDtype { operand: Operand::Output }.into());
    }
    if !HEAD_DIMS.contains(&p.head_dim) {
        return Err(CoreError::UnsupportedHeadDim { got: p.head_dim }.into());
    }
    if p.v_dim != p.head_dim {
        return Err(CoreError::UnsupportedHeadDim { got: p.v_dim }.into());
    }
    if !BLOCK_ROWS.contains(&cfg.block_rows) {
        return Err(CoreError::UnsupportedBlockRows { got: cfg.block_rows }.into());
    }
    let mut all_exact = true;
    for h in 0..p.q_heads {
        let g = cfg.group_size(h);
        if !GROUP_SIZES.contains(&g) {
            return Err(CoreError::UnsupportedGroupSize { got: g }.into());
        }
        all_exact &= g == 1;
    }
    if plan.is_none() && !all_exact {
        return Err(Error::MissingPlan);
    }
    for (operand, t) in [(Operand::Q, q), (Operand::K, k), (Operand::V, v), (Operand::Output, out)] {
        strides_fit(operand, &t.layout)?;
    }
    i32_of(p.q_len.div_ceil(cfg.block_rows), Operand::Plan)?;
    for (operand, t) in [(Operand::Q, q), (Operand::K, k), (Operand::V, v)] {
        aligned(operand, t.ptr, 16, "address must be 16-byte aligned")?;
        strides_multiple(operand, &t.layout, 8, "strides must be multiples of 8 elements")?;
    }
    let out_align = if out.dtype == DType::F32 { 8 } else { 4 };
    aligned(Operand::Output, out.ptr, out_align, "address must be aligned to two elements")?;
    strides_multiple(Operand::Output, &out.layout, 2, "strides must be even")?;
    if let Some(lse) = lse {
        aligned(Operand::Lse, lse.ptr, 4, "address must be 4-byte aligned")?;
    }
    if let Some(plan) = plan {
        aligned(Operand::Plan, plan.ptr, 2, "address must be 2-byte aligned")?;
    }
    Ok(p)
}
