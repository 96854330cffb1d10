//! The backward pass on host memory: gradients of DistrAttention (on a given
//! plan) and of exact attention with respect to Q, K and V.

use core::slice;

use distr_attention_core::backward::{
    attention_backward_into, backward_scratch_len, exact_attention_backward_into, Forward, Gradients,
};
use distr_attention_core::half::{bf16, f16};
use distr_attention_core::{Config, DType, Element, Error, Operand, PlanRef, PlanShape, Problem, TensorMut};

use crate::api::view;
use crate::context::{context, da_context, grow};
use crate::error::{boundary, Failure, FfiResult};
use crate::status::da_status;
use crate::types::{check_disjoint, da_config, da_tensor, read_config, ByteRange, HostTensor};

/// Gradients of DistrAttention on a plan with respect to Q, K and V (fast CPU
/// path, f32, tiled like FlashAttention-2's backward: the probabilities are
/// recomputed tile by tile from the fused Q and K and the forward's
/// log-sum-exp, with no `q_len x kv_len` buffer).
///
/// The plan carries no gradient: it is the plan the forward pass used (from
/// `da_forward`'s `plan_out`, `da_plan` or `da_plan_with_keys`; `plan_len >=
/// num_entries`). Fusion is linear: with mean fusion each column of a group gets
/// 1/G of the fused column's gradient, with sample fusion the group's first
/// column gets all of it; every K column of a group gets the fused K column's
/// gradient. With grouped-query attention dK and dV sum over the query heads
/// that share a KV head.
///
/// * `q`, `k`, `v`, `config` (with its group sizes): those of the forward pass.
/// * `o`: the forward's output (f32, `[batch, q_len, q_heads, v_dim]`, any
///   strides); `lse`: its log-sum-exp (f32, dense `[batch, q_heads, q_len]`,
///   `lse_len >= batch * q_heads * q_len`); both must come from the forward pass
///   on the same inputs and plan. `d_out`: the gradient of the loss with respect
///   to the output (f32, shaped like `o`). All must be finite (`lse` may hold
///   -infinity for a row that saw no key).
/// * `dq`, `dk`, `dv`: f32 outputs shaped like Q, K and V, any strides whose
///   elements do not overlap; written completely.
///
/// The extents of `dq`, `dk` and `dv` must not overlap each other nor any input
/// (`q`, `k`, `v`, `o`, `lse`, `d_out`, `plan`); inputs may overlap each other.
///
/// # Safety
/// Every non-NULL pointer must be valid for the extent its shape, strides or
/// length describe, readable for inputs and writable for outputs; `ctx` must be
/// NULL or a live context not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn da_attention_backward(
    ctx: *mut da_context,
    config: *const da_config,
    plan: *const u16,
    plan_len: usize,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    o: *const da_tensor,
    lse: *const f32,
    lse_len: usize,
    d_out: *const da_tensor,
    dq: *const da_tensor,
    dk: *const da_tensor,
    dv: *const da_tensor,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe {
        backward(ctx, config, Some((plan, plan_len)), [q, k, v, o, d_out], (lse, lse_len), [dq, dk, dv])
    })
}

/// Gradients of exact attention (every head G = 1) with respect to Q, K and V:
/// the arguments and contract of `da_attention_backward` without a plan. `o`
/// and `lse` come from `da_exact_attention`.
///
/// # Safety
/// As for `da_attention_backward`.
#[no_mangle]
pub unsafe extern "C" fn da_exact_attention_backward(
    ctx: *mut da_context,
    config: *const da_config,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    o: *const da_tensor,
    lse: *const f32,
    lse_len: usize,
    d_out: *const da_tensor,
    dq: *const da_tensor,
    dk: *const da_tensor,
    dv: *const da_tensor,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe { backward(ctx, config, None, [q, k, v, o, d_out], (lse, lse_len), [dq, dk, dv]) })
}

/// The eight descriptors of a backward call (CPU or CUDA), read in argument
/// order: `[q, k, v, o, d_out]` and `[dq, dk, dv]`.
///
/// # Safety
/// Each pointer NULL or a readable host struct.
pub(crate) unsafe fn read_backward_tensors(
    [q, k, v, o, d_out]: [*const da_tensor; 5],
    [dq, dk, dv]: [*const da_tensor; 3],
) -> FfiResult<([HostTensor; 5], [HostTensor; 3])> {
    // SAFETY (the reads): forwarded contract.
    unsafe {
        let inputs = [
            HostTensor::read(q, Operand::Q)?,
            HostTensor::read(k, Operand::K)?,
            HostTensor::read(v, Operand::V)?,
            HostTensor::read(o, Operand::Output)?,
            HostTensor::read(d_out, Operand::DOut)?,
        ];
        let grads = [
            HostTensor::read(dq, Operand::DQ)?,
            HostTensor::read(dk, Operand::DK)?,
            HostTensor::read(dv, Operand::DV)?,
        ];
        Ok((inputs, grads))
    }
}

/// The forward's log-sum-exp of a backward call: not NULL, at least one float
/// per (batch, query head, row). Returns its extent and that float count.
pub(crate) fn forward_lse(
    lse: *const f32,
    lse_len: usize,
    problem: &Problem,
) -> FfiResult<(ByteRange, usize)> {
    let needed = problem.lse_len()?;
    if lse.is_null() {
        return Err(Failure::new(
            da_status::NullPointer,
            "lse: pointer is NULL (the backward pass needs the forward's)",
        ));
    }
    if lse_len < needed {
        return Err(Error::BufferTooSmall { operand: Operand::Lse, needed, got: lse_len }.into());
    }
    Ok((ByteRange::of_buffer(lse, needed, Operand::Lse.name())?, needed))
}

/// Validates every argument of a backward call, then runs it.
///
/// # Safety
/// The contract of `da_attention_backward`.
unsafe fn backward(
    ctx: *mut da_context,
    config: *const da_config,
    plan: Option<(*const u16, usize)>,
    [q, k, v, o, d_out]: [*const da_tensor; 5],
    (lse, lse_len): (*const f32, usize),
    [dq, dk, dv]: [*const da_tensor; 3],
) -> FfiResult {
    // SAFETY (the reads): forwarded contracts.
    let ctx = unsafe { context(ctx)? };
    let settings = unsafe { read_config(config)? };
    let ([q, k, v, o, d_out], [dq, dk, dv]) =
        unsafe { read_backward_tensors([q, k, v, o, d_out], [dq, dk, dv])? };
    k.expect_dtype(q.dtype, "must equal q's dtype")?;
    v.expect_dtype(q.dtype, "must equal q's dtype")?;
    o.expect_dtype(DType::F32, "the forward's output is")?;
    d_out.expect_dtype(DType::F32, "the output gradient must be")?;
    for g in [&dq, &dk, &dv] {
        g.expect_dtype(DType::F32, "gradients must be")?;
    }
    let problem = Problem::new(&q.layout, &k.layout, &v.layout)?;
    let da_context { attention_scratch, group_sizes, .. } = ctx;
    // SAFETY: forwarded contract (the per-head group sizes).
    let cfg = unsafe { settings.config(problem.q_heads, group_sizes)? };
    cfg.validate(problem.q_heads, problem.head_dim)?;

    let (lse_range, lse_needed) = forward_lse(lse, lse_len, &problem)?;
    let mut read = vec![q.range, k.range, v.range, o.range, d_out.range, lse_range];
    let shape = PlanShape::new(&cfg, &q.layout)?;
    let plan_entries = shape.num_entries()?;
    if let Some((plan, plan_len)) = plan {
        if plan.is_null() {
            return Err(Failure::new(da_status::NullPointer, "plan: pointer is NULL"));
        }
        if plan_len < plan_entries {
            let got = plan_len;
            return Err(Error::BufferTooSmall { operand: Operand::Plan, needed: plan_entries, got }.into());
        }
        read.push(ByteRange::of_buffer(plan, plan_entries, Operand::Plan.name())?);
    }
    check_disjoint(&[dq.range, dk.range, dv.range], &read)?;

    let scratch_len = backward_scratch_len(problem.head_dim, problem.v_dim)?;
    let scratch = grow(attention_scratch, scratch_len, Operand::Scratch)?;
    // SAFETY: checked pointer, alignment and extent; read only.
    let plan = plan.map(|(p, _)| PlanRef::new(shape, unsafe { slice::from_raw_parts(p, plan_entries) }));
    let plan = plan.transpose()?;
    // SAFETY: checked pointer, alignment and extent of `lse_needed` floats; read only.
    let lse = unsafe { slice::from_raw_parts(lse, lse_needed) };
    // SAFETY: `o` and `d_out` are checked f32 tensors.
    let fwd = unsafe { Forward { o: view::<f32>(&o), lse, d_out: view::<f32>(&d_out) } };
    // SAFETY: the gradients were checked (pointer, alignment, extent, f32) and are
    // disjoint from each other and from every input; writable per the contract.
    let grad = |t: &HostTensor| {
        TensorMut::new(unsafe { slice::from_raw_parts_mut(t.data as *mut f32, t.len) }, t.layout)
    };
    let (mut dq, mut dk, mut dv) = (grad(&dq), grad(&dk), grad(&dv));
    let mut grads = Gradients { dq: &mut dq, dk: &mut dk, dv: &mut dv };
    match q.dtype {
        DType::F32 => run::<f32>(&cfg, plan, [&q, &k, &v], &fwd, &mut grads, scratch),
        DType::F16 => run::<f16>(&cfg, plan, [&q, &k, &v], &fwd, &mut grads, scratch),
        DType::BF16 => run::<bf16>(&cfg, plan, [&q, &k, &v], &fwd, &mut grads, scratch),
    }
}

fn run<T: Element>(
    cfg: &Config<'_>,
    plan: Option<PlanRef<'_>>,
    [q, k, v]: [&HostTensor; 3],
    fwd: &Forward<'_>,
    grads: &mut Gradients<'_, '_>,
    scratch: &mut [f32],
) -> FfiResult {
    // SAFETY: the three tensors are checked and of Q's dtype, which is `T`.
    let (q, k, v) = unsafe { (view::<T>(q), view::<T>(k), view::<T>(v)) };
    match plan {
        Some(plan) => attention_backward_into(cfg, &plan, &q, &k, &v, fwd, grads, scratch)?,
        None => exact_attention_backward_into(cfg, &q, &k, &v, fwd, grads, scratch)?,
    }
    Ok(())
}
