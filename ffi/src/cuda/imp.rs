//! The `da_cuda_*` bodies with the CUDA backend: argument checks, the checks
//! that need the driver, and the launches through
//! `distr_attention_cuda::Engine`'s raw-pointer API (forward and backward).

use core::ffi::c_void;
use core::ptr::null_mut;

use distr_attention_core::{Config, Error, GroupSizes, GroupingMode, Operand, PlanShape, Problem};
use distr_attention_cuda::check_similarity_plan;
use distr_attention_cuda::cust::sys as cu;
use distr_attention_cuda::validate::{check_attention, check_plan, BLOCK_ROWS};
use distr_attention_cuda::{
    backward_workspace_len, check_backward, Engine, Error as DriverError, RawBuffer, RawForward,
    RawGradients, RawPlan, RawTensor,
};

use super::{da_cuda_context, Backward, Mode};
use crate::api::{output_buffer, plan_settings};
use crate::backward::{forward_lse, read_backward_tensors};
use crate::error::{Failure, FfiResult};
use crate::status::da_status;
use crate::types::{check_disjoint, da_config, da_tensor, read_config, read_layout, ByteRange, HostTensor};

/// What a handle owns.
#[derive(Debug)]
pub(crate) struct State {
    engine: Engine,
    /// The `CUcontext` the handle is bound to.
    context: usize,
    /// Its device ordinal.
    device: i32,
    /// Storage of the config's per-head group sizes during a call.
    group_sizes: Vec<usize>,
}

/// Fails with `DA_STATUS_CUDA_ERROR` naming `call` unless it succeeded.
fn cuda(call: &str, result: cu::CUresult) -> FfiResult {
    if result == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    // The bindings' Debug form is the driver's name, e.g. CUDA_ERROR_NO_DEVICE.
    Err(Failure::new(da_status::CudaError, format!("{call} failed: {result:?} ({})", result as u32)))
}

/// The status and message of a backend error.
fn driver(e: DriverError) -> Failure {
    let message = e.to_string();
    // What the kernels take, next to the core's "not supported by this backend".
    let with = |what: &str| {
        Failure::new(da_status::Unsupported, format!("{message} (the CUDA backend takes {what})"))
    };
    match e {
        DriverError::Core(Error::UnsupportedDtype { operand: Operand::Output }) => {
            with("an f32 output or one of the inputs' type")
        }
        DriverError::Core(Error::UnsupportedDtype {
            operand: Operand::DOut | Operand::DQ | Operand::DK | Operand::DV,
        }) => with("f32 or the inputs' type for d_out and the gradients"),
        DriverError::Core(Error::UnsupportedDtype { .. }) => with("f16 or bf16 inputs, all of one type"),
        DriverError::Core(Error::UnsupportedHeadDim { .. }) => {
            with("head_dim 32, 64 or 128 for attention, with V's equal to it; 16 to 128 for plans")
        }
        DriverError::Core(Error::UnsupportedBlockRows { .. }) => {
            with("block_rows 64 or 128 for attention, up to 128 for plans")
        }
        DriverError::Core(Error::UnsupportedGroupSize { .. }) => with("group sizes 1, 2, 4 and 8"),
        DriverError::Core(e) => e.into(),
        DriverError::Misaligned { .. } => Failure::new(da_status::MisalignedPointer, message),
        DriverError::MissingPlan => Failure::new(da_status::NullPointer, message),
        DriverError::UnsupportedDevice { .. } => Failure::new(da_status::Unsupported, message),
        DriverError::Cuda { .. } => Failure::new(da_status::CudaError, message),
        // The enum is non-exhaustive: a later variant still gets its own message.
        _ => Failure::new(da_status::InvalidArgument, message),
    }
}

fn current_context() -> FfiResult<usize> {
    let mut ctx: cu::CUcontext = null_mut();
    // SAFETY: writes one handle.
    cuda("cuCtxGetCurrent", unsafe { cu::cuCtxGetCurrent(&mut ctx) })?;
    Ok(ctx as usize)
}

/// # Safety
/// `out` is NULL or writable storage for a pointer.
pub(crate) unsafe fn create(out: *mut *mut da_cuda_context) -> FfiResult {
    if out.is_null() {
        return Err(Failure::new(da_status::NullPointer, "out is NULL"));
    }
    // SAFETY: checked non-NULL; writable per the contract.
    unsafe { out.write_unaligned(null_mut()) };
    // SAFETY: cuInit may be called any number of times.
    cuda("cuInit", unsafe { cu::cuInit(0) })?;
    let context = current_context()?;
    if context == 0 {
        return Err(Failure::new(
            da_status::CudaError,
            "no CUDA context is current on this thread (with the runtime API: call cudaSetDevice or \
             cudaFree(0) first; with the driver API: cuCtxSetCurrent)",
        ));
    }
    let mut device: cu::CUdevice = 0;
    // SAFETY: writes one integer; a context is current.
    cuda("cuCtxGetDevice", unsafe { cu::cuCtxGetDevice(&mut device) })?;
    let engine = Engine::new().map_err(driver)?;
    let handle =
        Box::new(da_cuda_context { state: State { engine, context, device, group_sizes: Vec::new() } });
    // SAFETY: as above.
    unsafe { out.write_unaligned(Box::into_raw(handle)) };
    Ok(())
}

/// # Safety
/// `ctx` is NULL or a live handle, freed once.
pub(crate) unsafe fn destroy(ctx: *mut da_cuda_context) {
    if ctx.is_null() {
        return;
    }
    // SAFETY: per the contract, from `Box::into_raw` in `create`.
    let handle = unsafe { Box::from_raw(ctx) };
    let context = handle.state.context as cu::CUcontext;
    // Queued kernels may still read the projections the engine owns: wait for
    // them with the handle's context current, then free. If the context is
    // gone, so is its memory, and the failures are ignored.
    // SAFETY: plain driver calls on a context handle that was valid at creation.
    unsafe {
        if cu::cuCtxPushCurrent_v2(context) == cu::CUresult::CUDA_SUCCESS {
            cu::cuCtxSynchronize();
            drop(handle);
            let mut previous: cu::CUcontext = null_mut();
            cu::cuCtxPopCurrent_v2(&mut previous);
        } else {
            drop(handle);
        }
    }
}

/// Where the plan kernel of a call writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlanOut {
    /// The call computes no plan.
    None,
    /// The caller's buffer.
    Caller(RawBuffer),
    /// A stream-ordered workspace of this many entries, allocated at launch.
    Workspace(usize),
}

/// Address the checks assume for a workspace not yet allocated: any even
/// address passes the plan's alignment check, and `cuMemAllocAsync` returns
/// 256-byte aligned memory.
const WORKSPACE_PLACEHOLDER: u64 = 256;

/// A call whose arguments passed every check that needs no CUDA call.
#[derive(Debug)]
pub(crate) struct Checked<'a> {
    pub(crate) cfg: Config<'a>,
    pub(crate) q: RawTensor,
    /// K, V, the output and the lse of an attention call.
    pub(crate) attend: Option<(RawTensor, RawTensor, RawTensor, Option<RawBuffer>)>,
    /// The caller's plan that the attention reads.
    pub(crate) plan_in: Option<RawPlan>,
    pub(crate) plan_out: PlanOut,
    pub(crate) plan_shape: PlanShape,
    /// Every caller buffer of the call, for the pointer checks.
    pub(crate) buffers: Vec<ByteRange>,
    /// The buffers the call writes (a subset of `buffers`), for the fuzz harness.
    #[cfg_attr(not(any(test, fuzzing)), allow(dead_code))]
    pub(crate) written: Vec<ByteRange>,
}

fn raw(t: &HostTensor) -> RawTensor {
    RawTensor { ptr: t.data as u64, len: t.len, layout: t.layout, dtype: t.dtype }
}

/// Checks every argument of a `da_cuda_*` call without a CUDA call and
/// without touching the memory the pointers address: the config (and its
/// per-head group sizes, copied into `storage`), the descriptors, shapes,
/// buffer lengths, what the kernels support and their alignment rules, and
/// that no buffer written overlaps another buffer of the call. The tensors in
/// `tensors` are Q, K, V and the output (only Q for `Mode::Plan`).
///
/// # Safety
/// `config` and the descriptors are NULL or readable host structs (the
/// config's `group_sizes` too, as for the CPU entry points).
pub(crate) unsafe fn check_call<'a>(
    config: *const da_config,
    mode: Mode,
    tensors: [*const da_tensor; 4],
    lse: *mut f32,
    lse_len: usize,
    storage: &'a mut Vec<usize>,
) -> FfiResult<Checked<'a>> {
    // SAFETY (the reads): forwarded contract.
    let settings = unsafe { read_config(config)? };
    let q = unsafe { HostTensor::read(tensors[0], Operand::Q)? };
    let rq = raw(&q);

    if let Mode::Plan(plan, plan_len) = mode {
        // SAFETY: forwarded contract (the per-head group sizes, read where the grouping uses them).
        let cfg = unsafe { plan_settings(&settings, q.layout.heads, storage)? };
        let shape = PlanShape::new(&cfg, &q.layout)?;
        let range = output_buffer(plan, plan_len, shape.num_entries()?, Operand::Plan)?;
        let out = RawBuffer { ptr: plan as u64, len: plan_len };
        check_plan_output(&cfg, &rq, None, &out)?;
        check_disjoint(&[range], &[q.range])?;
        return Ok(Checked {
            cfg,
            q: rq,
            attend: None,
            plan_in: None,
            plan_out: PlanOut::Caller(out),
            plan_shape: shape,
            buffers: vec![q.range, range],
            written: vec![range],
        });
    }

    // SAFETY (the reads): forwarded contract.
    let k = unsafe { HostTensor::read(tensors[1], Operand::K)? };
    let v = unsafe { HostTensor::read(tensors[2], Operand::V)? };
    let out = unsafe { HostTensor::read(tensors[3], Operand::Output)? };
    let problem = Problem::new(&q.layout, &k.layout, &v.layout)?;
    // SAFETY: forwarded contract (the per-head group sizes).
    let mut cfg = unsafe { settings.config(problem.q_heads, storage)? };
    if let Mode::Exact = mode {
        cfg = exact(cfg, &problem)?;
    }
    let lse_range = if lse.is_null() {
        None
    } else {
        Some(output_buffer(lse, lse_len, problem.lse_len()?, Operand::Lse)?)
    };
    let lse_raw = lse_range.map(|_| RawBuffer { ptr: lse as u64, len: lse_len });
    let shape = PlanShape::new(&cfg, &q.layout)?;
    let entries = shape.num_entries()?;
    let all_exact = (0..problem.q_heads).all(|h| cfg.group_size(h) == 1);

    let mut read = vec![q.range, k.range, v.range];
    let mut written = vec![out.range];
    written.extend(lse_range);
    let mut plan_in = None;
    let mut plan_out = PlanOut::None;
    match mode {
        Mode::Plan(..) | Mode::Exact => {}
        Mode::Attention(plan, plan_len) => {
            // NULL is fine when no head reads a plan; the backend reports the rest.
            if !plan.is_null() {
                if plan_len < entries {
                    return Err(Error::BufferTooSmall {
                        operand: Operand::Plan,
                        needed: entries,
                        got: plan_len,
                    }
                    .into());
                }
                read.push(ByteRange::of_buffer(plan, entries, Operand::Plan.name())?);
                plan_in = Some(RawPlan { ptr: plan as u64, len: plan_len, shape });
            }
        }
        Mode::Forward(plan, plan_len) => {
            if !plan.is_null() {
                written.push(output_buffer(plan, plan_len, entries, Operand::Plan)?);
                plan_out = PlanOut::Caller(RawBuffer { ptr: plan as u64, len: plan_len });
            } else if !all_exact {
                plan_out = PlanOut::Workspace(entries);
            }
        }
    }
    let (rk, rv, ro) = (raw(&k), raw(&v), raw(&out));
    // The attention reads the plan this call writes.
    let attend_plan = match plan_out {
        PlanOut::None => plan_in,
        PlanOut::Caller(b) => Some(RawPlan { ptr: b.ptr, len: b.len, shape }),
        PlanOut::Workspace(n) => Some(RawPlan { ptr: WORKSPACE_PLACEHOLDER, len: n, shape }),
    };
    check_attention(&cfg, attend_plan.as_ref(), &rq, &rk, &rv, &ro, lse_raw.as_ref()).map_err(driver)?;
    match plan_out {
        PlanOut::None => {}
        PlanOut::Caller(b) => check_plan_output(&cfg, &rq, Some(&rk), &b)?,
        PlanOut::Workspace(n) => {
            check_plan_output(&cfg, &rq, Some(&rk), &RawBuffer { ptr: WORKSPACE_PLACEHOLDER, len: n })?
        }
    }
    check_disjoint(&written, &read)?;
    let mut buffers = read;
    buffers.extend_from_slice(&written);
    Ok(Checked {
        cfg,
        q: rq,
        attend: Some((rk, rv, ro, lse_raw)),
        plan_in,
        plan_out,
        plan_shape: shape,
        buffers,
        written,
    })
}

/// The checks of a plan the call writes: the LSH kernel's, or the similarity
/// kernel's for the other grouping modes (key-weighted needs `k`).
fn check_plan_output(cfg: &Config<'_>, q: &RawTensor, k: Option<&RawTensor>, plan: &RawBuffer) -> FfiResult {
    match cfg.grouping {
        GroupingMode::Lsh => check_plan(cfg, q, plan),
        _ => check_similarity_plan(cfg, q, k, plan),
    }
    .map(|_| ())
    .map_err(driver)
}

/// The checks that need the driver: the handle's context is current, the
/// stream is one of its streams, and every buffer is memory CUDA knows, on
/// the handle's device (or page-locked host or managed memory), with its
/// extent inside its allocation.
fn check_driver(context: usize, device: i32, buffers: &[ByteRange], stream: cu::CUstream) -> FfiResult {
    let current = current_context()?;
    if current != context {
        return Err(Failure::new(
            da_status::CudaError,
            format!(
                "the handle's CUDA context ({:#x}) is not current on this thread (current: {current:#x})",
                context
            ),
        ));
    }
    if !stream.is_null() {
        let mut owner: cu::CUcontext = null_mut();
        // SAFETY: the caller passes a live stream; writes one handle.
        cuda("cuStreamGetCtx", unsafe { cu::cuStreamGetCtx(stream, &mut owner) })?;
        if owner as usize != context {
            return Err(Failure::new(
                da_status::InvalidArgument,
                format!(
                    "stream: belongs to CUDA context {:#x}, not the handle's ({:#x})",
                    owner as usize, context
                ),
            ));
        }
    }
    for b in buffers {
        check_pointer(device, b)?;
    }
    Ok(())
}

fn check_pointer(device: i32, b: &ByteRange) -> FfiResult {
    let (mut kind, mut start, mut size, mut ordinal) = (0u32, 0u64, 0usize, -1i32);
    let mut attributes = [
        cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
    ];
    let mut data: [*mut c_void; 4] = [
        (&mut kind as *mut u32).cast(),
        (&mut start as *mut u64).cast(),
        (&mut size as *mut usize).cast(),
        (&mut ordinal as *mut i32).cast(),
    ];
    // SAFETY: four attributes with storage of their types (the memory type
    // as a plain integer: unknown pointers report 0, no enum value). An
    // address CUDA does not know is not an error: its attributes read 0.
    cuda("cuPointerGetAttributes", unsafe {
        cu::cuPointerGetAttributes(4, attributes.as_mut_ptr(), data.as_mut_ptr(), b.start as u64)
    })?;
    let name = b.name;
    match kind {
        k if k == cu::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 => {
            if ordinal != device {
                return Err(Failure::new(
                    da_status::InvalidArgument,
                    format!(
                        "{name}: {:#x} is memory of device {ordinal}, the handle's device is {}",
                        b.start, device
                    ),
                ));
            }
        }
        k if k == cu::CUmemorytype::CU_MEMORYTYPE_HOST as u32
            || k == cu::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32 => {}
        _ => {
            return Err(Failure::new(
                da_status::InvalidArgument,
                format!(
                    "{name}: {:#x} is not memory CUDA knows (a host pointer? pass device, managed or \
                         page-locked host memory)",
                    b.start
                ),
            ))
        }
    }
    if start != 0 && size != 0 {
        let end = start.saturating_add(size as u64);
        let need = (b.start as u64).saturating_add(b.len as u64);
        if b.start as u64 >= start && need > end {
            return Err(Failure::new(
                da_status::BufferTooSmall,
                format!(
                    "{name}: its extent ({} bytes from {:#x}) runs {} bytes past the end of its CUDA \
                         allocation ({size} bytes from {start:#x})",
                    b.len,
                    b.start,
                    need - end
                ),
            ));
        }
    }
    Ok(())
}

/// A workspace in stream order (a plan, or the backward's accumulators):
/// allocated and freed on the call's stream.
struct Workspace {
    ptr: cu::CUdeviceptr,
    stream: cu::CUstream,
}

impl Workspace {
    fn new(bytes: usize, stream: cu::CUstream) -> FfiResult<Workspace> {
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: writes one address; the stream is the caller's live stream.
        cuda("cuMemAllocAsync", unsafe { cu::cuMemAllocAsync(&mut ptr, bytes, stream) })?;
        Ok(Workspace { ptr, stream })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // Freed after the kernels queued before it on the stream; a failure
        // here leaks the workspace rather than freeing memory in use.
        // SAFETY: allocated by cuMemAllocAsync on this stream, freed once.
        unsafe { cu::cuMemFreeAsync(self.ptr, self.stream) };
    }
}

/// The body of every `da_cuda_*` compute function.
///
/// # Safety
/// The contract of the exported function.
pub(crate) unsafe fn call(
    ctx: *mut da_cuda_context,
    config: *const da_config,
    mode: Mode,
    tensors: [*const da_tensor; 4],
    lse: *mut f32,
    lse_len: usize,
    stream: *mut c_void,
) -> FfiResult {
    // SAFETY: per the contract, a non-NULL handle is live and exclusively ours.
    let handle =
        unsafe { ctx.as_mut() }.ok_or_else(|| Failure::new(da_status::NullPointer, "context is NULL"))?;
    let State { engine, context, device, group_sizes } = &mut handle.state;
    // SAFETY: forwarded contract.
    let checked = unsafe { check_call(config, mode, tensors, lse, lse_len, group_sizes)? };
    let stream = stream as cu::CUstream;
    check_driver(*context, *device, &checked.buffers, stream)?;
    let cfg = &checked.cfg;
    // SAFETY (the launches): every pointer was checked to be CUDA memory of
    // this device covering its extent; the caller keeps it alive until the
    // stream has run the kernels; outputs overlap no input (checked).
    unsafe {
        let Some((k, v, out, lse)) = checked.attend else {
            if let PlanOut::Caller(plan) = checked.plan_out {
                // Any grouping that needs only Q (key-weighted was refused by the checks).
                engine.plan_raw(cfg, &checked.q, &plan, stream).map_err(driver)?;
            }
            return Ok(());
        };
        // Dropped (freed in stream order) after the launches that use it.
        let mut workspace = None;
        let written = match checked.plan_out {
            PlanOut::None => None,
            PlanOut::Caller(b) => Some(b),
            PlanOut::Workspace(n) => {
                let w = workspace.insert(Workspace::new(n * 2, stream)?);
                Some(RawBuffer { ptr: w.ptr, len: n })
            }
        };
        if let Some(b) = written {
            // LSH, similarity or key-weighted, as the config says.
            engine.plan_with_keys_raw(cfg, &checked.q, &k, &b, stream).map_err(driver)?;
        }
        let plan = written
            .map(|b| RawPlan { ptr: b.ptr, len: b.len, shape: checked.plan_shape })
            .or(checked.plan_in);
        engine
            .attention_raw(cfg, plan.as_ref(), &checked.q, &k, &v, &out, lse.as_ref(), stream)
            .map_err(driver)?;
        drop(workspace);
    }
    Ok(())
}

// --- the backward pass -------------------------------------------------------

/// The workspace of a backward call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackwardWorkspace {
    /// The caller's (its length in f32 elements).
    Caller(RawBuffer),
    /// A stream-ordered workspace of this many f32 elements, allocated at launch.
    Stream(usize),
}

/// A backward call whose arguments passed every check that needs no CUDA call.
#[derive(Debug)]
pub(crate) struct CheckedBackward<'a> {
    pub(crate) cfg: Config<'a>,
    pub(crate) plan: Option<RawPlan>,
    pub(crate) q: RawTensor,
    pub(crate) k: RawTensor,
    pub(crate) v: RawTensor,
    pub(crate) fwd: RawForward,
    pub(crate) grads: RawGradients,
    pub(crate) workspace: BackwardWorkspace,
    /// Every caller buffer of the call, for the pointer checks.
    pub(crate) buffers: Vec<ByteRange>,
    /// The buffers the call writes (a subset of `buffers`), for the fuzz harness.
    #[cfg_attr(not(any(test, fuzzing)), allow(dead_code))]
    pub(crate) written: Vec<ByteRange>,
}

/// The config of an exact call: validated as the CPU's exact attention
/// validates it, then every head runs G = 1 (which ignores block_rows,
/// pinned to one the kernels take).
fn exact<'a>(cfg: Config<'a>, p: &Problem) -> FfiResult<Config<'a>> {
    cfg.validate(p.q_heads, p.head_dim)?;
    Ok(Config { group_sizes: GroupSizes::Uniform(1), block_rows: BLOCK_ROWS[0], ..cfg })
}

/// Bytes of `elements` f32 workspace elements.
fn workspace_bytes(elements: usize) -> FfiResult<usize> {
    elements
        .checked_mul(4)
        .ok_or_else(|| Failure::new(da_status::SizeOverflow, "workspace: its size exceeds the address space"))
}

/// `da_cuda_backward_workspace_size`: arithmetic on the config and the shapes.
///
/// # Safety
/// The exported function's contract.
pub(crate) unsafe fn workspace_size(
    config: *const da_config,
    q: *const da_tensor,
    d_out: *const da_tensor,
    size: *mut usize,
) -> FfiResult {
    // SAFETY (the reads): forwarded contract.
    let settings = unsafe { read_config(config)? };
    let (_, _, q) = unsafe { read_layout(q, Operand::Q)? };
    let (_, d_out, _) = unsafe { read_layout(d_out, Operand::DOut)? };
    if size.is_null() {
        return Err(Failure::new(da_status::NullPointer, "size is NULL"));
    }
    // The workspace depends on Q's shape alone (rows and head_dim).
    let problem = Problem::new(&q, &q, &q)?;
    let mut storage = Vec::new();
    // SAFETY: forwarded contract (the per-head group sizes).
    let cfg = unsafe { settings.config(problem.q_heads, &mut storage)? };
    cfg.validate(problem.q_heads, problem.head_dim)?;
    let bytes = workspace_bytes(backward_workspace_len(&cfg, &problem, d_out).map_err(driver)?)?;
    // SAFETY: checked non-NULL; writable per the contract.
    unsafe { size.write_unaligned(bytes) };
    Ok(())
}

/// Checks every argument of a `da_cuda_*_backward` call without a CUDA call
/// and without touching the memory the pointers address: the config (its
/// per-head group sizes copied into `storage`), the descriptors, the lse and
/// plan lengths, everything [`check_backward`] checks (shapes, what the
/// kernels support, alignment), the workspace's size and alignment, and that
/// no buffer written overlaps another buffer of the call.
///
/// # Safety
/// `config` and the descriptors are NULL or readable host structs (the
/// config's `group_sizes` too).
pub(crate) unsafe fn check_backward_call<'a>(
    config: *const da_config,
    args: &Backward,
    storage: &'a mut Vec<usize>,
) -> FfiResult<CheckedBackward<'a>> {
    // SAFETY (the reads): forwarded contract.
    let settings = unsafe { read_config(config)? };
    let ([q, k, v, o, d_out], [dq, dk, dv]) = unsafe { read_backward_tensors(args.inputs, args.grads)? };
    let problem = Problem::new(&q.layout, &k.layout, &v.layout)?;
    // SAFETY: forwarded contract (the per-head group sizes).
    let mut cfg = unsafe { settings.config(problem.q_heads, storage)? };
    if args.plan.is_none() {
        cfg = exact(cfg, &problem)?;
    }

    let (lse_range, _) = forward_lse(args.lse, args.lse_len, &problem)?;
    let mut read = vec![q.range, k.range, v.range, o.range, d_out.range, lse_range];
    let shape = PlanShape::new(&cfg, &q.layout)?;
    let mut plan = None;
    if let Some((ptr, plan_len)) = args.plan {
        // NULL is fine when no head reads a plan; the backend reports the rest.
        if !ptr.is_null() {
            let entries = shape.num_entries()?;
            if plan_len < entries {
                return Err(
                    Error::BufferTooSmall { operand: Operand::Plan, needed: entries, got: plan_len }.into()
                );
            }
            read.push(ByteRange::of_buffer(ptr, entries, Operand::Plan.name())?);
            plan = Some(RawPlan { ptr: ptr as u64, len: plan_len, shape });
        }
    }
    let fwd = RawForward {
        o: raw(&o),
        lse: RawBuffer { ptr: args.lse as u64, len: args.lse_len },
        d_out: raw(&d_out),
    };
    let grads = RawGradients { dq: raw(&dq), dk: raw(&dk), dv: raw(&dv) };
    let (rq, rk, rv) = (raw(&q), raw(&k), raw(&v));
    // The backend's checks, on a workspace of the size it needs (the
    // caller's is checked below, with its own messages in bytes).
    let elements = backward_workspace_len(&cfg, &problem, d_out.dtype).map_err(driver)?;
    let placeholder = RawBuffer { ptr: WORKSPACE_PLACEHOLDER, len: elements };
    check_backward(&cfg, plan.as_ref(), &rq, &rk, &rv, &fwd, &grads, &placeholder).map_err(driver)?;

    let mut written = vec![dq.range, dk.range, dv.range];
    let workspace = if args.workspace.is_null() {
        BackwardWorkspace::Stream(elements)
    } else {
        let needed = workspace_bytes(elements)?;
        let (ptr, given) = (args.workspace, args.workspace_size);
        if given < needed {
            return Err(Failure::new(
                da_status::BufferTooSmall,
                format!("workspace: {given} bytes given, {needed} needed (da_cuda_backward_workspace_size)"),
            ));
        }
        if !(ptr as usize).is_multiple_of(16) {
            return Err(Failure::new(
                da_status::MisalignedPointer,
                format!("workspace: pointer {ptr:p} is not 16-byte aligned"),
            ));
        }
        written.push(ByteRange::of_unaligned(ptr, needed, 1, "workspace")?);
        BackwardWorkspace::Caller(RawBuffer { ptr: ptr as u64, len: elements })
    };
    check_disjoint(&written, &read)?;
    let mut buffers = read;
    buffers.extend_from_slice(&written);
    Ok(CheckedBackward { cfg, plan, q: rq, k: rk, v: rv, fwd, grads, workspace, buffers, written })
}

/// The body of `da_cuda_attention_backward` and `da_cuda_exact_attention_backward`.
///
/// # Safety
/// The contract of the exported functions.
pub(crate) unsafe fn backward(
    ctx: *mut da_cuda_context,
    config: *const da_config,
    args: &Backward,
    stream: *mut c_void,
) -> FfiResult {
    // SAFETY: per the contract, a non-NULL handle is live and exclusively ours.
    let handle =
        unsafe { ctx.as_mut() }.ok_or_else(|| Failure::new(da_status::NullPointer, "context is NULL"))?;
    let State { engine, context, device, group_sizes } = &mut handle.state;
    // SAFETY: forwarded contract.
    let c = unsafe { check_backward_call(config, args, group_sizes)? };
    let stream = stream as cu::CUstream;
    check_driver(*context, *device, &c.buffers, stream)?;
    // SAFETY (the launches): every pointer was checked to be CUDA memory of
    // this device covering its extent; the caller keeps it alive until the
    // stream has run the kernels; the buffers written overlap nothing else
    // of the call (checked).
    unsafe {
        // Dropped (freed in stream order) after the launches that use it.
        let mut allocated = None;
        let workspace = match c.workspace {
            BackwardWorkspace::Caller(b) => b,
            BackwardWorkspace::Stream(n) => {
                let w = allocated.insert(Workspace::new(workspace_bytes(n)?, stream)?);
                RawBuffer { ptr: w.ptr, len: n }
            }
        };
        engine
            .attention_backward_raw(
                &c.cfg,
                c.plan.as_ref(),
                &c.q,
                &c.k,
                &c.v,
                &c.fwd,
                &c.grads,
                &workspace,
                stream,
            )
            .map_err(driver)?;
        drop(allocated);
    }
    Ok(())
}
