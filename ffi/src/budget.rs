//! How much error DistrAttention causes, and where to apply it: the per-head
//! error estimate and the error-budget planner of the core, on host memory.
//!
//! Both allocate their working memory (the core's allocating functions); like
//! every other entry point they validate every argument before writing
//! anything.

use core::mem::size_of;
use core::slice;

use distr_attention_core::budget::{choose_group_sizes, BudgetPlan, Sample, Target};
use distr_attention_core::half::{bf16, f16};
use distr_attention_core::{
    estimate_errors, Config, DType, Element, Error, HeadErrorEstimate, Operand, PlanRef, PlanShape, Problem,
};

use crate::api::{compute_plan, named_buffer, view};
use crate::context::{context, da_context, grow};
use crate::error::{boundary, Failure, FfiResult};
use crate::status::da_status;
use crate::types::{
    check_disjoint, da_budget_target, da_config, da_tensor, read_config, ByteRange, HostTensor,
};

/// Estimates, for every (batch, query head), the error DistrAttention causes
/// on a plan, without computing attention over all rows:
///
/// * `relative_score_error`: `||E|| / ||Q Kᵀ||` (Frobenius norms), the relative
///   change of the unscaled scores that fusion causes (E is computed exactly
///   from Gram matrices of Q's block columns and of the centred keys; keys are
///   all counted, also where a causal mask hides them);
/// * `rms_logit_error`: `scale * ||E|| / sqrt(q_len * kv_len)`, the
///   root-mean-square change of the softmax logits, in nats;
/// * `sampled_output_error`: the relative Frobenius error of the head's output
///   on `sample_rows` evenly spaced query rows, computed exactly (f64) with and
///   without fusion (costs `sample_rows / q_len` of two attention passes); NaN
///   when `sample_rows` is 0. The best predictor of the real error: the core
///   measured a rank correlation of 0.90 to 0.96 with it on real activations.
///
/// Heads with G = 1 get 0 (the sampled error up to f64 rounding, as the
/// plan's column order changes the order of summation). Each output is NULL (not wanted) or `len >= batch *
/// q_heads` doubles, written densely `[batch][q_heads]`.
///
/// `plan` is the plan to judge (`plan_len >= num_entries`, as from `da_plan`,
/// `da_plan_with_keys` or `da_forward`), or NULL with `plan_len` 0: then the plan
/// `da_forward` would use is computed (in the context's memory). Q, K, V, the
/// config and its group sizes as for `da_attention`. The outputs must not
/// overlap each other nor any input.
///
/// # Safety
/// Every non-NULL pointer must be valid for the extent its shape, strides or
/// length describe (readable inputs, writable outputs); `ctx` must be NULL or a
/// live context not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn da_estimate_errors(
    ctx: *mut da_context,
    config: *const da_config,
    plan: *const u16,
    plan_len: usize,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    sample_rows: usize,
    relative_score_error: *mut f64,
    rms_logit_error: *mut f64,
    sampled_output_error: *mut f64,
    len: usize,
) -> da_status {
    boundary(|| {
        // SAFETY (the reads): forwarded contracts.
        let ctx = unsafe { context(ctx)? };
        let settings = unsafe { read_config(config)? };
        let q = unsafe { HostTensor::read(q, Operand::Q)? };
        let k = unsafe { HostTensor::read(k, Operand::K)? };
        let v = unsafe { HostTensor::read(v, Operand::V)? };
        k.expect_dtype(q.dtype, "must equal q's dtype")?;
        v.expect_dtype(q.dtype, "must equal q's dtype")?;
        let problem = Problem::new(&q.layout, &k.layout, &v.layout)?;
        let da_context { group_sizes, plan: plan_store, planner, .. } = ctx;
        // SAFETY: forwarded contract (the per-head group sizes).
        let cfg = unsafe { settings.config(problem.q_heads, group_sizes)? };
        cfg.validate(problem.q_heads, problem.head_dim)?;
        let shape = PlanShape::new(&cfg, &q.layout)?;
        let entries = shape.num_entries()?;
        let count = problem
            .batch
            .checked_mul(problem.q_heads)
            .ok_or(Error::SizeOverflow { operand: Operand::Output })?;

        let outputs = [
            (relative_score_error, "relative_score_error"),
            (rms_logit_error, "rms_logit_error"),
            (sampled_output_error, "sampled_output_error"),
        ];
        let mut written = Vec::new();
        for &(ptr, name) in &outputs {
            if !ptr.is_null() {
                written.push(named_buffer(ptr, len, count, name)?);
            }
        }
        let mut read = vec![q.range, k.range, v.range];
        if plan.is_null() {
            if plan_len != 0 {
                return Err(Failure::new(
                    da_status::NullPointer,
                    format!(
                        "plan: pointer is NULL but plan_len is {plan_len} (NULL with 0 computes the plan)"
                    ),
                ));
            }
        } else {
            if plan_len < entries {
                return Err(
                    Error::BufferTooSmall { operand: Operand::Plan, needed: entries, got: plan_len }.into()
                );
            }
            read.push(ByteRange::of_buffer(plan, entries, Operand::Plan.name())?);
        }
        check_disjoint(&written, &read)?;

        let plan: &[u16] = if plan.is_null() {
            let buf = grow(plan_store, entries, Operand::Plan)?;
            let keys = (cfg.grouping != distr_attention_core::GroupingMode::Lsh).then_some(&k);
            compute_plan(planner, &cfg, &q, keys, buf)?;
            buf
        } else {
            // SAFETY: checked pointer, alignment and extent; only read, disjoint from the outputs.
            unsafe { slice::from_raw_parts(plan, entries) }
        };
        let plan = PlanRef::new(shape, plan)?;
        let estimates = match q.dtype {
            DType::F32 => estimate::<f32>(&cfg, &plan, [&q, &k, &v], sample_rows)?,
            DType::F16 => estimate::<f16>(&cfg, &plan, [&q, &k, &v], sample_rows)?,
            DType::BF16 => estimate::<bf16>(&cfg, &plan, [&q, &k, &v], sample_rows)?,
        };
        let fields: [fn(&HeadErrorEstimate) -> f64; 3] =
            [|e| e.relative_score_error, |e| e.rms_logit_error, |e| e.sampled_output_error];
        for (&(ptr, _), field) in outputs.iter().zip(fields) {
            if ptr.is_null() {
                continue;
            }
            // SAFETY: checked pointer, alignment and extent of `count` doubles,
            // disjoint from every other buffer of the call.
            let out = unsafe { slice::from_raw_parts_mut(ptr, count) };
            for e in &estimates {
                out[e.batch * problem.q_heads + e.head] = field(e);
            }
        }
        Ok(())
    })
}

fn estimate<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    [q, k, v]: [&HostTensor; 3],
    sample_rows: usize,
) -> FfiResult<Vec<HeadErrorEstimate>> {
    // SAFETY: the tensors are checked and of Q's dtype, which is `T`.
    let (q, k, v) = unsafe { (view::<T>(q), view::<T>(k), view::<T>(v)) };
    Ok(estimate_errors(cfg, plan, &q, &k, &v, sample_rows)?)
}

/// The error-budget planner: chooses a group size per query head of one layer
/// from calibration samples, for an error or a FLOP target.
///
/// For every candidate G and head it measures the output error of
/// DistrAttention against exact attention on every sample (fast path, the
/// config's grouping mode, `block_rows`, fusion, mask and scale; the config's
/// group sizes are ignored) and keeps the worst case over samples and batch
/// entries. With `DA_BUDGET_TARGET_MAX_ERROR` each head gets the largest G whose
/// measured error (and that of every smaller candidate) stays at or below
/// `target` on every sample, or 1; with `DA_BUDGET_TARGET_FLOP_SAVING` heads are
/// raised one step at a time where the error grows least until that fraction of
/// the attention FLOPs is saved.
///
/// * `q`, `k`, `v`: arrays of `num_samples >= 1` descriptors; sample `i` is
///   `q[i], k[i], v[i]`, as for `da_attention` (one layer on different inputs:
///   the samples may differ in batch and sequence lengths but not in heads or
///   head dimensions). Every tensor of every sample must have the same dtype.
/// * `candidates`: `num_candidates` values of G (G = 1 is always allowed, and
///   values below 2 are ignored; each must divide the head dimension, and be a
///   power of two for the similarity modes); NULL when `num_candidates` is 0.
/// * `target_kind`: a `da_budget_target` value; `target`: the error (>= 0) or the
///   FLOP fraction (in [0, 1)).
/// * Outputs, for `num_heads >= q_heads` heads (the first `q_heads` written):
///   `group_sizes` (required; usable as `da_config.group_sizes`), and, each
///   NULL when not wanted, `measured_error` (worst measured relative output
///   error at the chosen G, 0 for G = 1), `estimated_error` (worst
///   `sampled_output_error` of `da_estimate_errors` with 16 rows), `flop_saving`
///   (one double: `1 - sum_h (d/G_h + dv) / (H (d + dv))`) and `target_met` (one
///   `uint32_t`, 1 or 0: a FLOP target can be out of reach). Outputs must not
///   overlap each other nor any input.
///
/// # Safety
/// `config` NULL or readable; `q`, `k`, `v` NULL or `num_samples` readable
/// descriptors each, whose data covers their extents; `candidates` NULL or
/// `num_candidates` readable entries; every non-NULL output writable for the
/// length given.
#[no_mangle]
pub unsafe extern "C" fn da_choose_group_sizes(
    config: *const da_config,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    num_samples: usize,
    candidates: *const u32,
    num_candidates: usize,
    target_kind: u32,
    target: f64,
    group_sizes: *mut u32,
    measured_error: *mut f64,
    estimated_error: *mut f64,
    num_heads: usize,
    flop_saving: *mut f64,
    target_met: *mut u32,
) -> da_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let cfg = unsafe { read_config(config)? }.plan_config();
        let target = match target_kind {
            x if x == da_budget_target::MaxError as u32 => Target::MaxError(target),
            x if x == da_budget_target::FlopSaving as u32 => Target::FlopSaving(target),
            other => {
                return Err(Failure::new(
                    da_status::InvalidArgument,
                    format!(
                        "target_kind {other} is not a da_budget_target value (0 max error, 1 flop saving)"
                    ),
                ))
            }
        };
        if num_samples == 0 {
            return Err(Failure::new(
                da_status::InvalidArgument,
                "num_samples is 0: the planner needs at least one calibration sample",
            ));
        }
        let mut samples: Vec<[HostTensor; 3]> = Vec::new();
        samples
            .try_reserve_exact(num_samples)
            .map_err(|_| Error::AllocationFailed { operand: Operand::Q, len: num_samples })?;
        let arrays = [(q, Operand::Q), (k, Operand::K), (v, Operand::V)];
        for (array, operand) in arrays {
            if array.is_null() {
                return Err(Failure::new(
                    da_status::NullPointer,
                    format!("{}: descriptor array is NULL", operand.name()),
                ));
            }
            // The descriptors are read with unaligned loads; the array's extent must fit.
            ByteRange::of_unaligned(array.cast(), num_samples, size_of::<da_tensor>(), operand.name())?;
        }
        for i in 0..num_samples {
            let read = |(array, operand): (*const da_tensor, Operand)| {
                // SAFETY: the caller provides `num_samples` descriptors (extent checked above).
                unsafe { HostTensor::read(array.wrapping_add(i), operand) }
                    .map_err(|f| f.context(format!("calibration sample {i}")))
            };
            let t = [read(arrays[0])?, read(arrays[1])?, read(arrays[2])?];
            let dtype = samples.first().map_or(t[0].dtype, |s| s[0].dtype);
            for x in &t {
                x.expect_dtype(dtype, "must equal the dtype of sample 0's q,")
                    .map_err(|f| f.context(format!("calibration sample {i}")))?;
            }
            samples.push(t);
        }
        let first = &samples[0];
        let q_heads = Problem::new(&first[0].layout, &first[1].layout, &first[2].layout)?.q_heads;

        let mut read = Vec::new();
        let mut gs: Vec<usize> = Vec::new();
        if candidates.is_null() {
            if num_candidates != 0 {
                return Err(Failure::new(
                    da_status::NullPointer,
                    format!("candidates: pointer is NULL but num_candidates is {num_candidates}"),
                ));
            }
        } else {
            read.push(ByteRange::of_buffer(candidates, num_candidates, "candidates")?);
            gs.try_reserve_exact(num_candidates)
                .map_err(|_| Error::AllocationFailed { operand: Operand::GroupSizes, len: num_candidates })?;
            // SAFETY: checked pointer, alignment and extent; read only.
            gs.extend(
                unsafe { slice::from_raw_parts(candidates, num_candidates) }.iter().map(|&g| g as usize),
            );
        }
        read.extend(samples.iter().flat_map(|s| s.iter().map(|t| t.range)));
        let mut written = vec![named_buffer(group_sizes, num_heads, q_heads, "group_sizes")?];
        for (ptr, name) in [(measured_error, "measured_error"), (estimated_error, "estimated_error")] {
            if !ptr.is_null() {
                written.push(named_buffer(ptr, num_heads, q_heads, name)?);
            }
        }
        if !flop_saving.is_null() {
            written.push(ByteRange::of_buffer(flop_saving, 1, "flop_saving")?);
        }
        if !target_met.is_null() {
            written.push(ByteRange::of_buffer(target_met, 1, "target_met")?);
        }
        check_disjoint(&written, &read)?;

        let result = match first[0].dtype {
            DType::F32 => plan_budget::<f32>(&cfg, &gs, &samples, target)?,
            DType::F16 => plan_budget::<f16>(&cfg, &gs, &samples, target)?,
            DType::BF16 => plan_budget::<bf16>(&cfg, &gs, &samples, target)?,
        };
        // SAFETY (the writes): checked pointers, alignment and extents, disjoint
        // from each other and from every input.
        let sizes = unsafe { slice::from_raw_parts_mut(group_sizes, q_heads) };
        for (dst, h) in sizes.iter_mut().zip(&result.heads) {
            // Candidates are u32, and 1 is the only other value.
            *dst = h.group_size as u32;
        }
        if !measured_error.is_null() {
            let out = unsafe { slice::from_raw_parts_mut(measured_error, q_heads) };
            for (dst, h) in out.iter_mut().zip(&result.heads) {
                *dst = h.measured_error;
            }
        }
        if !estimated_error.is_null() {
            let out = unsafe { slice::from_raw_parts_mut(estimated_error, q_heads) };
            for (dst, h) in out.iter_mut().zip(&result.heads) {
                *dst = h.estimated_error;
            }
        }
        if !flop_saving.is_null() {
            unsafe { flop_saving.write(result.flop_saving) };
        }
        if !target_met.is_null() {
            unsafe { target_met.write(result.target_met as u32) };
        }
        Ok(())
    })
}

fn plan_budget<T: Element>(
    cfg: &Config<'_>,
    candidates: &[usize],
    samples: &[[HostTensor; 3]],
    target: Target,
) -> FfiResult<BudgetPlan> {
    let mut views: Vec<Sample<'_, T>> = Vec::new();
    views
        .try_reserve_exact(samples.len())
        .map_err(|_| Error::AllocationFailed { operand: Operand::Q, len: samples.len() })?;
    // SAFETY: every tensor is checked and of the first Q's dtype, which is `T`.
    views.extend(samples.iter().map(|[q, k, v]| unsafe { (view::<T>(q), view::<T>(k), view::<T>(v)) }));
    Ok(choose_group_sizes(cfg, candidates, &views, target)?)
}
