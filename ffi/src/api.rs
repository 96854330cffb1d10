//! The compute functions on host memory: plan, attention on a plan, exact
//! attention and the one-shot forward pass, plus the queries around them.
//!
//! Every function validates all of its arguments (pointers, dtypes, shapes,
//! strides, extents, overlaps, config, finiteness of the inputs) before it
//! writes anything: on any error no caller buffer has been modified.

use core::mem::size_of;
use core::slice;

use distr_attention_core::half::{bf16, f16};
use distr_attention_core::{
    attention_into, attention_scratch_len, exact_attention_into, plan_into, plan_scratch_len, plan_with_keys,
    projections_into, projections_len, Config, DType, Element, Error, GroupingMode, Operand, PlanRef,
    PlanShape, Problem, Tensor, TensorMut,
};

use crate::context::{context, da_context, grow, Planner};
use crate::error::{boundary, Failure, FfiResult};
use crate::status::da_status;
use crate::types::{
    check_disjoint, da_config, da_plan_shape, da_tensor, read_config, read_layout, ByteRange, HostTensor,
    Settings, MAX_CONFIG_SIZE,
};

/// Writes the default config into `*config`: block_rows 64, group_size 2, no
/// per-head sizes, 16 projections, seed 0, mean fusion, no mask, default scale
/// (0, meaning 1/sqrt(head_dim)), LSH grouping. Pass `sizeof(da_config)` as
/// `struct_size`; it is stored in the struct. Bytes past the fields this
/// library knows are zeroed.
///
/// # Safety
/// `config` must be NULL (`DA_STATUS_NULL_POINTER`) or point to `struct_size`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn da_config_default(config: *mut da_config, struct_size: usize) -> da_status {
    boundary(|| {
        if config.is_null() {
            return Err(Failure::new(da_status::NullPointer, "config is NULL"));
        }
        let known = size_of::<da_config>();
        if !(known..=MAX_CONFIG_SIZE).contains(&struct_size) {
            return Err(Failure::new(
                da_status::InvalidArgument,
                format!("config: struct_size {struct_size} is not in {known}..={MAX_CONFIG_SIZE} (pass sizeof(da_config))"),
            ));
        }
        let defaults = da_config { struct_size, ..da_config::defaults() };
        // SAFETY: the caller provides `struct_size >= known` writable bytes.
        unsafe {
            config.write_unaligned(defaults);
            core::ptr::write_bytes(config.cast::<u8>().add(known), 0, struct_size - known);
        }
        Ok(())
    })
}

/// Computes the dimensions of the plan for queries described by `q` under
/// `config` (only `block_rows` and `num_projections` matter) and stores them in
/// `*shape`. `q->data` is not read and may be NULL.
///
/// # Safety
/// `config` and `q` must be NULL or point to a readable config / descriptor;
/// `shape` must be NULL or point to a writable `da_plan_shape`.
#[no_mangle]
pub unsafe extern "C" fn da_get_plan_shape(
    config: *const da_config,
    q: *const da_tensor,
    shape: *mut da_plan_shape,
) -> da_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let cfg = unsafe { read_config(config)? }.plan_config();
        let (_, _, layout) = unsafe { read_layout(q, Operand::Q)? };
        if shape.is_null() {
            return Err(Failure::new(da_status::NullPointer, "shape is NULL"));
        }
        let s = PlanShape::new(&cfg, &layout)?;
        let out = da_plan_shape {
            batch: s.batch,
            heads: s.heads,
            blocks: s.blocks,
            head_dim: s.head_dim,
            block_rows: s.block_rows,
            num_entries: s.num_entries()?,
        };
        // SAFETY: checked non-NULL; writable per the contract.
        unsafe { shape.write_unaligned(out) };
        Ok(())
    })
}

/// Stores in `*len` the number of floats of the LSH projection matrix R for
/// `config`: `block_rows * num_projections`.
///
/// # Safety
/// `config` must be NULL or point to a readable config; `len` must be NULL or
/// point to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn da_projections_len(config: *const da_config, len: *mut usize) -> da_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let cfg = unsafe { read_config(config)? }.plan_config();
        if len.is_null() {
            return Err(Failure::new(da_status::NullPointer, "len is NULL"));
        }
        let n = projections_len(&cfg)?;
        // SAFETY: checked non-NULL; writable per the contract.
        unsafe { len.write_unaligned(n) };
        Ok(())
    })
}

/// Writes the LSH projection matrix R of `config` (row-major
/// `[block_rows][num_projections]`, standard normal entries generated from
/// `seed` by the documented generator of the core crate) into `out`, which
/// holds `out_len >= da_projections_len` floats. A GPU backend uploads exactly
/// these numbers.
///
/// # Safety
/// `config` must be NULL or point to a readable config; `out` must be NULL or
/// point to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn da_projections(
    config: *const da_config,
    out: *mut f32,
    out_len: usize,
) -> da_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let cfg = unsafe { read_config(config)? }.plan_config();
        let needed = projections_len(&cfg)?;
        let range = output_buffer(out, out_len, needed, Operand::Projections)?;
        // SAFETY: `range` checked the pointer, alignment and extent; the caller
        // provides `out_len >= needed` writable floats.
        let out = unsafe { slice::from_raw_parts_mut(out, range.len / size_of::<f32>()) };
        projections_into(&cfg, out)?;
        Ok(())
    })
}

/// Checks a caller output buffer of `given` elements against the `needed` ones.
pub(crate) fn output_buffer<T>(
    ptr: *const T,
    given: usize,
    needed: usize,
    operand: Operand,
) -> FfiResult<ByteRange> {
    if ptr.is_null() {
        return Err(Failure::new(da_status::NullPointer, format!("{}: pointer is NULL", operand.name())));
    }
    if given < needed {
        return Err(Error::BufferTooSmall { operand, needed, got: given }.into());
    }
    ByteRange::of_buffer(ptr, needed, operand.name())
}

/// [`output_buffer`] for a buffer the core has no operand for: same checks and messages.
pub(crate) fn named_buffer<T>(
    ptr: *const T,
    given: usize,
    needed: usize,
    name: &'static str,
) -> FfiResult<ByteRange> {
    if ptr.is_null() {
        return Err(Failure::new(da_status::NullPointer, format!("{name}: pointer is NULL")));
    }
    if given < needed {
        return Err(Failure::new(
            da_status::BufferTooSmall,
            format!("{name}: buffer holds {given} elements, {needed} needed"),
        ));
    }
    ByteRange::of_buffer(ptr, needed, name)
}

/// Computes the plan of `q` into `plan`: for every (batch, query head, query
/// block) a permutation of the head-dimension columns, as `uint16_t` entries
/// laid out densely `[batch][heads][blocks][head_dim]` (see `da_get_plan_shape`
/// for the count).
///
/// With `DA_GROUPING_LSH` (the default) only `block_rows`, `num_projections`
/// and `seed` of the config influence the plan, and the group sizes are neither
/// read nor checked. With `DA_GROUPING_SIMILARITY` the groups depend on the
/// group sizes too: they are read and checked (powers of two dividing the head
/// dimension). `DA_GROUPING_KEY_WEIGHTED` needs the keys and is refused here
/// (`DA_STATUS_UNSUPPORTED`): use `da_plan_with_keys`.
///
/// `plan` holds `plan_len` entries, at least `num_entries`; only the first
/// `num_entries` are written. It must not overlap Q.
///
/// # Safety
/// `ctx` must be NULL or a live context not used concurrently; `config` and `q`
/// NULL or readable; `q->data` must cover the extent its shape and strides
/// describe; `plan` NULL or `plan_len` writable entries; a non-NULL
/// `config->group_sizes` is read in the similarity modes.
#[no_mangle]
pub unsafe extern "C" fn da_plan(
    ctx: *mut da_context,
    config: *const da_config,
    q: *const da_tensor,
    plan: *mut u16,
    plan_len: usize,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe { plan_call(ctx, config, q, None, plan, plan_len) })
}

/// Computes the plan of `q` for attention over the keys `k`, into `plan`, under
/// any grouping mode: the only way to a `DA_GROUPING_KEY_WEIGHTED` plan other
/// than `da_forward`. In the other modes the result equals `da_plan`'s, and K is
/// validated all the same (shape against Q, finite values).
///
/// `k` is `[batch, kv_len, kv_heads, head_dim]` of Q's dtype, with `q_heads` a
/// multiple of `kv_heads`. `plan` as for `da_plan`; it must overlap neither Q
/// nor K.
///
/// # Safety
/// As for `da_plan`; `k` NULL or a readable descriptor whose data covers its extent.
#[no_mangle]
pub unsafe extern "C" fn da_plan_with_keys(
    ctx: *mut da_context,
    config: *const da_config,
    q: *const da_tensor,
    k: *const da_tensor,
    plan: *mut u16,
    plan_len: usize,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe {
        if k.is_null() {
            return Err(Failure::new(da_status::NullPointer, "k: tensor descriptor is NULL"));
        }
        plan_call(ctx, config, q, Some(k), plan, plan_len)
    })
}

/// The body of `da_plan` (`k` = None) and `da_plan_with_keys`.
///
/// # Safety
/// The contract of `da_plan_with_keys`.
unsafe fn plan_call(
    ctx: *mut da_context,
    config: *const da_config,
    q: *const da_tensor,
    k: Option<*const da_tensor>,
    plan: *mut u16,
    plan_len: usize,
) -> FfiResult {
    // SAFETY (the reads): forwarded contracts.
    let ctx = unsafe { context(ctx)? };
    let settings = unsafe { read_config(config)? };
    let q = unsafe { HostTensor::read(q, Operand::Q)? };
    let k = match k {
        Some(k) => {
            let k = unsafe { HostTensor::read(k, Operand::K)? };
            k.expect_dtype(q.dtype, "must equal q's dtype")?;
            Problem::new(&q.layout, &k.layout, &k.layout)?;
            Some(k)
        }
        None => None,
    };
    let da_context { group_sizes, planner, .. } = ctx;
    // SAFETY: forwarded contract (the per-head group sizes, read in the similarity modes only).
    let cfg = unsafe { plan_settings(&settings, q.layout.heads, group_sizes)? };
    let shape = PlanShape::new(&cfg, &q.layout)?;
    let n = shape.num_entries()?;
    let plan_range = output_buffer(plan, plan_len, n, Operand::Plan)?;
    let read: Vec<ByteRange> = [Some(q.range), k.map(|k| k.range)].into_iter().flatten().collect();
    check_disjoint(&[plan_range], &read)?;
    // SAFETY: checked pointer, alignment and extent of `n` entries; disjoint from Q and K.
    let out = unsafe { slice::from_raw_parts_mut(plan, n) };
    compute_plan(planner, &cfg, &q, k.as_ref(), out)
}

/// The config a plan needs: the per-head group sizes are read only where the
/// grouping mode depends on them.
///
/// # Safety
/// The contract of `Settings::config`.
pub(crate) unsafe fn plan_settings<'a>(
    settings: &Settings,
    q_heads: usize,
    storage: &'a mut Vec<usize>,
) -> FfiResult<Config<'a>> {
    match settings.grouping() {
        GroupingMode::Lsh => Ok(settings.plan_config()),
        // SAFETY: forwarded contract.
        _ => unsafe { settings.config(q_heads, storage) },
    }
}

/// DistrAttention on a given plan (as computed by `da_plan` or another backend
/// for the same Q, `block_rows`, `num_projections` and `seed`; the plan is
/// checked to be a permutation in every block).
///
/// * `q`: `[batch, q_len, q_heads, head_dim]`; `k`: `[batch, kv_len, kv_heads,
///   head_dim]`; `v`: `[batch, kv_len, kv_heads, v_dim]`, all of Q's dtype, with
///   `q_heads` a multiple of `kv_heads` (grouped-query attention). Inputs must
///   be finite. They may share memory with each other.
/// * `out`: f32 `[batch, q_len, q_heads, v_dim]`, any strides whose elements do
///   not overlap; written.
/// * `lse`: NULL, or `lse_len >= batch * q_heads * q_len` floats that receive the
///   natural-log row log-sum-exp of the scaled scores, dense `[batch, q_heads,
///   q_len]`. A row that sees no key (causal, q_len > kv_len) gets output 0 and
///   log-sum-exp -infinity.
/// * `plan`: `plan_len >= num_entries` entries (see `da_get_plan_shape`).
///
/// The extents of the buffers written (`out`, `lse`) must not overlap each other
/// nor any input (see `da_tensor`).
///
/// # Safety
/// Every non-NULL pointer must be valid for the extent its shape, strides or
/// length describe, readable for inputs and writable for outputs; `ctx` must be
/// NULL or a live context not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn da_attention(
    ctx: *mut da_context,
    config: *const da_config,
    plan: *const u16,
    plan_len: usize,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    out: *const da_tensor,
    lse: *mut f32,
    lse_len: usize,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe { attend(ctx, config, Mode::Plan(plan, plan_len), [q, k, v, out], lse, lse_len) })
}

/// Exact attention (every head G = 1) with the same arguments and contract as
/// `da_attention`, without a plan. The config's `block_rows`, group sizes and
/// projections are validated but do not change the result; `causal` and
/// `scale` apply.
///
/// # Safety
/// As for `da_attention`.
#[no_mangle]
pub unsafe extern "C" fn da_exact_attention(
    ctx: *mut da_context,
    config: *const da_config,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    out: *const da_tensor,
    lse: *mut f32,
    lse_len: usize,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe { attend(ctx, config, Mode::Exact, [q, k, v, out], lse, lse_len) })
}

/// One-shot DistrAttention: computes the plan of Q (as `da_plan_with_keys` with
/// K, so every grouping mode works) and attends with it (as `da_attention`).
/// Arguments as for `da_attention`, except the plan:
/// `plan_out` is NULL (the plan stays in the context's scratch memory), or
/// `plan_len >= num_entries` entries that receive the plan, e.g. to replay it
/// on another backend. `plan_out` is written only when the call succeeds and
/// must not overlap any other buffer.
///
/// # Safety
/// As for `da_attention`; `plan_out` must be NULL or `plan_len` writable entries.
#[no_mangle]
pub unsafe extern "C" fn da_forward(
    ctx: *mut da_context,
    config: *const da_config,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    out: *const da_tensor,
    lse: *mut f32,
    lse_len: usize,
    plan_out: *mut u16,
    plan_len: usize,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe {
        attend(ctx, config, Mode::Forward(plan_out, plan_len), [q, k, v, out], lse, lse_len)
    })
}

/// Which attention call.
#[derive(Clone, Copy)]
enum Mode {
    Exact,
    /// The caller's plan (input).
    Plan(*const u16, usize),
    /// Plan, then attend; the plan optionally copied out.
    Forward(*mut u16, usize),
}

/// Validates every argument of an attention call, then runs it.
///
/// # Safety
/// The contract of `da_attention`.
unsafe fn attend(
    ctx: *mut da_context,
    config: *const da_config,
    mode: Mode,
    [q, k, v, out]: [*const da_tensor; 4],
    lse: *mut f32,
    lse_len: usize,
) -> FfiResult {
    // SAFETY (the reads): forwarded contracts.
    let ctx = unsafe { context(ctx)? };
    let settings = unsafe { read_config(config)? };
    let q = unsafe { HostTensor::read(q, Operand::Q)? };
    let k = unsafe { HostTensor::read(k, Operand::K)? };
    let v = unsafe { HostTensor::read(v, Operand::V)? };
    let out = unsafe { HostTensor::read(out, Operand::Output)? };
    k.expect_dtype(q.dtype, "must equal q's dtype")?;
    v.expect_dtype(q.dtype, "must equal q's dtype")?;
    out.expect_dtype(DType::F32, "outputs must be")?;
    let problem = Problem::new(&q.layout, &k.layout, &v.layout)?;

    let da_context { attention_scratch, group_sizes, plan: plan_store, planner } = ctx;
    // SAFETY: forwarded contract (the per-head group sizes).
    let cfg = unsafe { settings.config(problem.q_heads, group_sizes)? };
    cfg.validate(problem.q_heads, problem.head_dim)?;
    problem.check_output(&out.layout)?;

    let mut written = vec![out.range];
    let mut read = vec![q.range, k.range, v.range];
    let lse_needed = problem.lse_len()?;
    if !lse.is_null() {
        written.push(output_buffer(lse, lse_len, lse_needed, Operand::Lse)?);
    }
    let shape = PlanShape::new(&cfg, &q.layout)?;
    let plan_entries = shape.num_entries()?;
    match mode {
        Mode::Exact => {}
        Mode::Plan(plan, plan_len) => {
            if plan.is_null() {
                return Err(Failure::new(da_status::NullPointer, "plan: pointer is NULL"));
            }
            if plan_len < plan_entries {
                let got = plan_len;
                return Err(
                    Error::BufferTooSmall { operand: Operand::Plan, needed: plan_entries, got }.into()
                );
            }
            read.push(ByteRange::of_buffer(plan, plan_entries, Operand::Plan.name())?);
        }
        Mode::Forward(plan_out, plan_len) => {
            if !plan_out.is_null() {
                written.push(output_buffer(plan_out, plan_len, plan_entries, Operand::Plan)?);
            }
        }
    }
    check_disjoint(&written, &read)?;

    let scratch_len = attention_scratch_len(problem.head_dim, problem.v_dim)?;
    let scratch = grow(attention_scratch, scratch_len, Operand::Scratch)?;
    let plan: Option<&[u16]> = match mode {
        Mode::Exact => None,
        // SAFETY: checked pointer, alignment and extent of `plan_entries` entries;
        // only read, and disjoint from every buffer written.
        Mode::Plan(plan, _) => Some(unsafe { slice::from_raw_parts(plan, plan_entries) }),
        Mode::Forward(..) => {
            // Planned into the context, and copied out only once the call succeeded.
            let buf = grow(plan_store, plan_entries, Operand::Plan)?;
            // LSH plans need no keys (and reuse the context's projections).
            let keys = (cfg.grouping != GroupingMode::Lsh).then_some(&k);
            compute_plan(planner, &cfg, &q, keys, buf)?;
            Some(&*buf)
        }
    };
    let plan = plan.map(|p| PlanRef::new(shape, p)).transpose()?;
    // SAFETY: `out` was checked (pointer, alignment, extent, no overlap with any
    // other buffer of the call); writable per the caller's contract.
    let out_t =
        TensorMut::new(unsafe { slice::from_raw_parts_mut(out.data as *mut f32, out.len) }, out.layout);
    // SAFETY: as for `out`, with the `lse_needed` floats checked above.
    let lse = (!lse.is_null()).then(|| unsafe { slice::from_raw_parts_mut(lse, lse_needed) });
    match q.dtype {
        DType::F32 => run::<f32>(&cfg, plan, [&q, &k, &v], out_t, lse, scratch)?,
        DType::F16 => run::<f16>(&cfg, plan, [&q, &k, &v], out_t, lse, scratch)?,
        DType::BF16 => run::<bf16>(&cfg, plan, [&q, &k, &v], out_t, lse, scratch)?,
    }
    if let (Mode::Forward(plan_out, _), Some(plan)) = (mode, plan) {
        if !plan_out.is_null() {
            // SAFETY: checked pointer, alignment, extent and disjointness above.
            unsafe { slice::from_raw_parts_mut(plan_out, plan_entries) }.copy_from_slice(plan.as_slice());
        }
    }
    Ok(())
}

/// A typed view of a checked input tensor.
///
/// # Safety
/// `t` came from [`HostTensor::read`] with `t.dtype == T::DTYPE`, and the caller
/// of the exported function guarantees the extent is readable.
pub(crate) unsafe fn view<T: Element>(t: &HostTensor) -> Tensor<'_, T> {
    debug_assert_eq!(t.dtype, T::DTYPE);
    // SAFETY: non-NULL, aligned for T, `len` elements within the address space
    // (checked by `HostTensor::read`); readable per the caller's contract.
    Tensor::new(unsafe { slice::from_raw_parts(t.data.cast::<T>(), t.len) }, t.layout)
}

fn run<T: Element>(
    cfg: &Config<'_>,
    plan: Option<PlanRef<'_>>,
    [q, k, v]: [&HostTensor; 3],
    mut out: TensorMut<'_>,
    lse: Option<&mut [f32]>,
    scratch: &mut [f32],
) -> FfiResult {
    // SAFETY: the three tensors are checked and of Q's dtype, which is `T`.
    let (q, k, v) = unsafe { (view::<T>(q), view::<T>(k), view::<T>(v)) };
    match plan {
        Some(plan) => attention_into(cfg, &plan, &q, &k, &v, &mut out, lse, scratch)?,
        None => exact_attention_into(cfg, &q, &k, &v, &mut out, lse, scratch)?,
    }
    Ok(())
}

/// Plans `q` into `out` (exactly the plan's length) under the config's grouping
/// mode. Without keys, LSH plans use the context's projections and scratch;
/// everything else goes through the allocating planner of the core: with keys,
/// `plan_with_keys` (which validates K in every mode, and which
/// `DA_GROUPING_KEY_WEIGHTED` needs), without, `plan` (which refuses that mode).
pub(crate) fn compute_plan(
    planner: &mut Planner,
    cfg: &Config<'_>,
    q: &HostTensor,
    k: Option<&HostTensor>,
    out: &mut [u16],
) -> FfiResult {
    if let (GroupingMode::Lsh, None) = (cfg.grouping, k) {
        let rows = cfg.block_rows.min(q.layout.seq);
        let (r, scratch) = planner.buffers(cfg, rows, plan_scratch_len(q.layout.dim))?;
        // SAFETY (each arm): `q` is checked and of the matched dtype.
        match q.dtype {
            DType::F32 => plan_into(cfg, &unsafe { view::<f32>(q) }, r, out, scratch)?,
            DType::F16 => plan_into(cfg, &unsafe { view::<f16>(q) }, r, out, scratch)?,
            DType::BF16 => plan_into(cfg, &unsafe { view::<bf16>(q) }, r, out, scratch)?,
        };
        return Ok(());
    }
    let plan = match q.dtype {
        DType::F32 => allocated_plan::<f32>(cfg, q, k),
        DType::F16 => allocated_plan::<f16>(cfg, q, k),
        DType::BF16 => allocated_plan::<bf16>(cfg, q, k),
    }
    .map_err(|e| match e {
        Error::GroupingUnavailable { .. } => Failure::new(
            da_status::of_error(&e),
            format!("{e} (from C: da_plan_with_keys, or da_forward, which passes the keys)"),
        ),
        e => e.into(),
    })?;
    out.copy_from_slice(plan.as_slice());
    Ok(())
}

fn allocated_plan<T: Element>(
    cfg: &Config<'_>,
    q: &HostTensor,
    k: Option<&HostTensor>,
) -> Result<distr_attention_core::Plan, Error> {
    // SAFETY: `q` and `k` are checked and of `T` (the callers match Q's dtype and
    // check that K's equals it).
    let q = unsafe { view::<T>(q) };
    match k {
        Some(k) => plan_with_keys(cfg, &q, &unsafe { view::<T>(k) }),
        None => distr_attention_core::plan(cfg, &q),
    }
}
