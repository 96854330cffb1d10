//! The backward pass on the GPU (`kernels/bwd.cu`): dQ, dK, dV of
//! DistrAttention on a plan, the function of the core's
//! `reference::attention_backward`, without any `N x M` buffer.
//!
//! Three launches series per call, all on the caller's stream: a row pass
//! (`Delta = rowsum(dO ∘ O)`, zeroed dQ̂ accumulators, dO converted to the
//! input type when it is f32), the main kernel (one CTA per 128 keys of a KV
//! head: dK and dV in registers, summed over the query heads that share the
//! KV head; dQ̂ added atomically to an f32 accumulator, on Hopper by bulk
//! reductions of whole tiles), and a row pass that
//! spreads dQ̂ to dQ through the fusion. The accumulators and Delta live in a
//! caller-provided workspace ([`backward_workspace_len`] f32 elements). On
//! compute capability 9.0 the main kernel is the Hopper one (`kernels/hbwd.cu`:
//! wgmma, a producer warpgroup and two consumer warpgroups) for head_dim 64
//! with G = 1 and head_dim 128 with G in {1, 2}; elsewhere (and with
//! `DISTR_ATTENTION_KERNEL=mma`) bwd.cu's mma.sync kernel.
//!
//! dQ sums f32 atomic adds whose order varies between runs, so dQ is not
//! bit-reproducible (as in FlashAttention-2); dK and dV are.

use std::collections::BTreeMap;
use std::ffi::c_void;

use cust::memory::DeviceSlice;
use cust::stream::Stream;
use cust::sys as cu;
use distr_attention_core::{Config, DType, Dim, Error as CoreError, Fusion, Layout, Operand, Problem};

use crate::engine::{raw_tensor, Engine, Func, GRID_YZ_MAX};
use crate::error::{check, Result};
use crate::params::HEAD_MAP_MAX;
use crate::types::{GpuElement, GpuOutput, GpuPlan, GpuTensor, GpuTensorMut};
use crate::validate::{
    aligned, buffer_len, check_dtype, i32_of, i64_of, strides_fit, strides_multiple, RawBuffer, RawPlan,
    RawTensor, BLOCK_ROWS, GROUP_SIZES, HEAD_DIMS,
};
use crate::Error;

/// KV entries and query heads one main-kernel launch addresses (`DA_BWD_KV_MAX`, `DA_BWD_QLIST_MAX`).
const KV_MAX: usize = 64;
const QLIST_MAX: usize = 256;
/// Keys per CTA of the main kernel and its threads; rows per CTA of the row kernels and theirs.
const KEYS_PER_CTA: usize = 128;
const BWD_THREADS: u32 = 256;
const ROWS_PER_CTA: usize = 64;
const ROW_THREADS: u32 = 128;
/// Threads of the Hopper main kernel's CTA (`kernels/hbwd.cu`: a producer and two consumer warpgroups).
const HOPPER_BWD_THREADS: u32 = 384;

/// Whether the Hopper main kernel (`kernels/hbwd.cu`) serves head_dim `d`
/// with group size `g` (else bwd.cu's mma.sync kernel runs).
fn hopper_backward(d: usize, g: usize) -> bool {
    matches!((d, g), (64, 1) | (128, 1) | (128, 2))
}

/// `BwdParams` of `kernels/bwd.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BwdParams {
    q: u64,
    k: u64,
    v: u64,
    d_out: u64,
    qhat: u64,
    qtil: u64,
    plan: u64,
    lse: u64,
    delta: u64,
    dq_acc: u64,
    dk: u64,
    dv: u64,
    q_batch_stride: i64,
    q_row_stride: i64,
    q_head_stride: i64,
    k_batch_stride: i64,
    k_row_stride: i64,
    k_head_stride: i64,
    v_batch_stride: i64,
    v_row_stride: i64,
    v_head_stride: i64,
    do_batch_stride: i64,
    do_row_stride: i64,
    do_head_stride: i64,
    dk_batch_stride: i64,
    dk_row_stride: i64,
    dk_head_stride: i64,
    dv_batch_stride: i64,
    dv_row_stride: i64,
    dv_head_stride: i64,
    q_len: i32,
    kv_len: i32,
    q_heads: i32,
    heads_per_kv: i32,
    num_blocks: i32,
    block_rows: i32,
    batch_offset: i32,
    scale_log2: f32,
    scale: f32,
    causal: i32,
    dk_f32: i32,
    dv_f32: i32,
    kv_map_len: i32,
    sample: i32,
    kv_head: [u16; KV_MAX],
    kv_first: [u16; KV_MAX],
    kv_count: [u16; KV_MAX],
    kv_accum: [u16; KV_MAX],
    q_list: [u16; QLIST_MAX],
}

/// `BwdRowParams` of `kernels/bwd.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BwdRowParams {
    q: u64,
    qhat: u64,
    qtil: u64,
    o: u64,
    d_out: u64,
    do_conv: u64,
    delta: u64,
    dq_acc: u64,
    plan: u64,
    dq: u64,
    q_batch_stride: i64,
    q_row_stride: i64,
    q_head_stride: i64,
    o_batch_stride: i64,
    o_row_stride: i64,
    o_head_stride: i64,
    do_batch_stride: i64,
    do_row_stride: i64,
    do_head_stride: i64,
    dq_batch_stride: i64,
    dq_row_stride: i64,
    dq_head_stride: i64,
    q_len: i32,
    q_heads: i32,
    group: i32,
    num_blocks: i32,
    block_rows: i32,
    batch_offset: i32,
    o_f32: i32,
    do_f32: i32,
    dq_f32: i32,
    sample: i32,
    head_map_len: i32,
    scale: f32,
    head_map: [u16; HEAD_MAP_MAX],
}

const _: () = assert!(std::mem::size_of::<BwdParams>() == 1320);
const _: () = assert!(std::mem::size_of::<BwdRowParams>() == 736);

/// The forward pass's results on the device, as the backward pass reads
/// them (the core's `Forward`): the output `o` (`[batch, q_len, q_heads,
/// head_dim]`, f32 or the input type), its row log-sum-exp `lse` (f32,
/// natural log, dense `[batch, q_heads, q_len]`, as the forward writes it)
/// and the output gradient `d_out` (shaped like `o`, f32 or the input type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawForward {
    pub o: RawTensor,
    pub lse: RawBuffer,
    pub d_out: RawTensor,
}

/// Gradient outputs on the device (the core's `Gradients`): `dq` like Q, `dk`
/// like K, `dv` like V; each f32 or the input type, non-overlapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawGradients {
    pub dq: RawTensor,
    pub dk: RawTensor,
    pub dv: RawTensor,
}

/// [`RawForward`] over cust buffers.
#[derive(Clone, Copy, Debug)]
pub struct GpuForward<'a, O: cust::memory::DeviceCopy, D: cust::memory::DeviceCopy> {
    pub o: GpuTensor<'a, O>,
    pub lse: &'a DeviceSlice<f32>,
    pub d_out: GpuTensor<'a, D>,
}

/// [`RawGradients`] over cust buffers.
#[derive(Debug)]
pub struct GpuGradients<'a, G: cust::memory::DeviceCopy> {
    pub dq: GpuTensorMut<'a, G>,
    pub dk: GpuTensorMut<'a, G>,
    pub dv: GpuTensorMut<'a, G>,
}

fn elements(x: Option<usize>) -> Result<usize> {
    x.ok_or_else(|| CoreError::SizeOverflow { operand: Operand::Scratch }.into())
}

/// Offsets (f32 elements) of the workspace's parts: dQ̂ accumulators
/// `[batch][q_heads][q_len][head_dim]` (f32 slots; each 64-row tile's values
/// packed at its start, `dq_acc_index` in `kernels/bwd_params.cuh`), Delta `[batch][q_heads][q_len]`
/// (f32, padded to 16 bytes), then in the input type and the same row
/// layout as the accumulators: Q̂ and Q̃ when some head has G > 1, and dO
/// when it is given in f32.
struct WorkspaceParts {
    delta: usize,
    qhat: usize,
    qtil: usize,
    do_conv: usize,
    len: usize,
}

fn workspace_parts(cfg: &Config<'_>, p: &Problem, d_out: DType) -> Result<WorkspaceParts> {
    let rows = elements(p.batch.checked_mul(p.q_heads).and_then(|x| x.checked_mul(p.q_len)))?;
    let acc = elements(rows.checked_mul(p.head_dim))?;
    let half = acc.div_ceil(2); // a rows x head_dim tensor of the input type, in f32 slots
    let delta = acc;
    let qhat = elements(delta.checked_add(rows.div_ceil(4) * 4))?;
    let fused = (0..p.q_heads).any(|h| cfg.group_size(h) > 1);
    let qtil = if fused { elements(qhat.checked_add(half))? } else { qhat };
    let do_conv = if fused { elements(qtil.checked_add(half))? } else { qtil };
    let len = if d_out == DType::F32 { elements(do_conv.checked_add(half))? } else { do_conv };
    Ok(WorkspaceParts { delta, qhat, qtil, do_conv, len })
}

/// Length in f32 elements of the workspace [`Engine::attention_backward_raw`]
/// needs for `cfg` and problem `p` with an output gradient of type `d_out`:
/// with `R = batch·q_heads·q_len` rows, `R·(head_dim + 1)` (dQ̂ accumulators
/// and Delta, with padding), plus `R·head_dim` when some head has G > 1 (Q̂
/// and Q̃ in the input type), plus `R·head_dim / 2` when `d_out` is f32 (its
/// copy in the input type).
pub fn backward_workspace_len(cfg: &Config<'_>, p: &Problem, d_out: DType) -> Result<usize> {
    Ok(workspace_parts(cfg, p, d_out)?.len)
}

fn expect_shape(operand: Operand, l: &Layout, shape: [usize; 4]) -> Result<()> {
    for (dim, expected, got) in [
        (Dim::Batch, shape[0], l.batch),
        (Dim::Seq, shape[1], l.seq),
        (Dim::Heads, shape[2], l.heads),
        (Dim::HeadDim, shape[3], l.dim),
    ] {
        if expected != got {
            return Err(CoreError::ShapeMismatch { operand, dim, expected, got }.into());
        }
    }
    Ok(())
}

fn check_grad(operand: Operand, g: &RawTensor, shape: [usize; 4]) -> Result<()> {
    let needed = g.layout.required_len(operand)?;
    expect_shape(operand, &g.layout, shape)?;
    if !g.layout.is_non_overlapping() {
        return Err(CoreError::OverlappingOutput { operand }.into());
    }
    if g.len < needed {
        return Err(CoreError::BufferTooSmall { operand, needed, got: g.len }.into());
    }
    Ok(())
}

/// Checks the arguments of [`Engine::attention_backward_raw`] and returns the
/// problem sizes. First the core's checks of `attention_backward`, in its
/// order and with its typed errors (shapes, config, buffer lengths of Q, K,
/// V, O, dO, LSE, the gradients' shapes, overlap and lengths, the plan's
/// shape); then the kernels' restrictions, as for the forward
/// ([`crate::validate::check_attention`]): Q, K, V f16 or bf16 alike; O, dO,
/// dQ, dK, dV f32 or the input type; `head_dim` = `v_dim` in
/// [`HEAD_DIMS`]; `block_rows` in [`BLOCK_ROWS`]; G in [`GROUP_SIZES`]; a
/// plan unless every head has G = 1; the workspace's length
/// (`BufferTooSmall { operand: Scratch }`); alignment ([`Error::Misaligned`]):
/// Q, K, V and a dO of the input type 16-byte aligned with strides multiples
/// of 8 elements; O, an f32 dO and the gradients aligned to two elements with
/// even strides; LSE and the plan 4-byte aligned; the workspace 16-byte aligned.
///
/// The values are not scanned (the core also rejects NaN and infinite
/// inputs and LSE; here they propagate).
#[allow(clippy::too_many_arguments)]
pub fn check_backward(
    cfg: &Config<'_>,
    plan: Option<&RawPlan>,
    q: &RawTensor,
    k: &RawTensor,
    v: &RawTensor,
    fwd: &RawForward,
    grads: &RawGradients,
    workspace: &RawBuffer,
) -> Result<Problem> {
    let p = Problem::new(&q.layout, &k.layout, &v.layout)?;
    cfg.validate(p.q_heads, p.head_dim)?;
    buffer_len(Operand::Q, q.len, &q.layout)?;
    buffer_len(Operand::K, k.len, &k.layout)?;
    buffer_len(Operand::V, v.len, &v.layout)?;
    let o_shape = [p.batch, p.q_len, p.q_heads, p.v_dim];
    for (operand, t) in [(Operand::Output, &fwd.o), (Operand::DOut, &fwd.d_out)] {
        buffer_len(operand, t.len, &t.layout)?;
        expect_shape(operand, &t.layout, o_shape)?;
    }
    let lse_len = p.lse_len()?;
    if fwd.lse.len < lse_len {
        return Err(
            CoreError::BufferTooSmall { operand: Operand::Lse, needed: lse_len, got: fwd.lse.len }.into()
        );
    }
    check_grad(Operand::DQ, &grads.dq, [p.batch, p.q_len, p.q_heads, p.head_dim])?;
    check_grad(Operand::DK, &grads.dk, [p.batch, p.kv_len, p.kv_heads, p.head_dim])?;
    check_grad(Operand::DV, &grads.dv, [p.batch, p.kv_len, p.kv_heads, p.v_dim])?;
    if let Some(plan) = plan {
        crate::validate::plan_fits(cfg, &p, plan)?;
    }

    // What this backend restricts.
    check_dtype(Operand::Q, q.dtype, None)?;
    check_dtype(Operand::K, k.dtype, Some(q.dtype))?;
    check_dtype(Operand::V, v.dtype, Some(q.dtype))?;
    for (operand, t) in [
        (Operand::Output, &fwd.o),
        (Operand::DOut, &fwd.d_out),
        (Operand::DQ, &grads.dq),
        (Operand::DK, &grads.dk),
        (Operand::DV, &grads.dv),
    ] {
        if t.dtype != DType::F32 && t.dtype != q.dtype {
            return Err(CoreError::UnsupportedDtype { operand }.into());
        }
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
    for (operand, t) in [
        (Operand::Q, q),
        (Operand::K, k),
        (Operand::V, v),
        (Operand::Output, &fwd.o),
        (Operand::DOut, &fwd.d_out),
        (Operand::DQ, &grads.dq),
        (Operand::DK, &grads.dk),
        (Operand::DV, &grads.dv),
    ] {
        strides_fit(operand, &t.layout)?;
    }
    i32_of(p.q_len.div_ceil(cfg.block_rows), Operand::Plan)?;
    let needed = backward_workspace_len(cfg, &p, fwd.d_out.dtype)?;
    if workspace.len < needed {
        return Err(
            CoreError::BufferTooSmall { operand: Operand::Scratch, needed, got: workspace.len }.into()
        );
    }
    for (operand, t) in [(Operand::Q, q), (Operand::K, k), (Operand::V, v)] {
        aligned(operand, t.ptr, 16, "address must be 16-byte aligned")?;
        strides_multiple(operand, &t.layout, 8, "strides must be multiples of 8 elements")?;
    }
    if fwd.d_out.dtype != DType::F32 {
        // Read by the main kernel as an mma operand, like Q.
        aligned(Operand::DOut, fwd.d_out.ptr, 16, "address must be 16-byte aligned")?;
        strides_multiple(Operand::DOut, &fwd.d_out.layout, 8, "strides must be multiples of 8 elements")?;
    }
    for (operand, t) in [
        (Operand::Output, &fwd.o),
        (Operand::DOut, &fwd.d_out),
        (Operand::DQ, &grads.dq),
        (Operand::DK, &grads.dk),
        (Operand::DV, &grads.dv),
    ] {
        let align = if t.dtype == DType::F32 { 8 } else { 4 };
        aligned(operand, t.ptr, align, "address must be aligned to two elements")?;
        strides_multiple(operand, &t.layout, 2, "strides must be even")?;
    }
    aligned(Operand::Lse, fwd.lse.ptr, 4, "address must be 4-byte aligned")?;
    if let Some(plan) = plan {
        aligned(Operand::Plan, plan.ptr, 4, "address must be 4-byte aligned")?;
    }
    aligned(Operand::Scratch, workspace.ptr, 16, "address must be 16-byte aligned")?;
    Ok(p)
}

/// One main-kernel launch's KV entries (per-head group sizes).
#[derive(Default)]
struct KvLaunch {
    entries: Vec<(u16, u16, u16, bool)>, // (kv head, first, count, accumulate)
    q_list: Vec<u16>,
}

/// Splits the query heads of one group size into launches of KV entries: a
/// KV head appears at most once per launch (its CTAs own its dK/dV rows);
/// `written` records the KV heads an earlier launch wrote, whose entries
/// then add to dK/dV instead of overwriting them (launches on one stream run in order).
fn kv_launches(p: &Problem, heads: &[usize], written: &mut [bool]) -> Result<Vec<KvLaunch>> {
    let overflow = || Error::from(CoreError::SizeOverflow { operand: Operand::GroupSizes });
    let u16_of = |x: usize| u16::try_from(x).map_err(|_| overflow());
    let mut launches = vec![KvLaunch::default()];
    for (hk, done) in written.iter_mut().enumerate() {
        let mine: Vec<usize> = heads.iter().copied().filter(|&h| p.kv_head(h) == hk).collect();
        for chunk in mine.chunks(QLIST_MAX) {
            let cur = launches.last_mut().expect("one launch");
            let has_hk = cur.entries.iter().any(|e| e.0 as usize == hk);
            if has_hk || cur.entries.len() == KV_MAX || cur.q_list.len() + chunk.len() > QLIST_MAX {
                launches.push(KvLaunch::default());
            }
            let cur = launches.last_mut().expect("one launch");
            let first = cur.q_list.len();
            for &h in chunk {
                cur.q_list.push(u16_of(h)?);
            }
            cur.entries.push((u16_of(hk)?, u16_of(first)?, u16_of(chunk.len())?, *done));
            *done = true;
        }
    }
    launches.retain(|l| !l.entries.is_empty());
    Ok(launches)
}

impl Engine {
    /// # Safety
    /// `params` must match the kernel's single by-value parameter.
    unsafe fn launch_block<P>(
        &self,
        f: Func,
        grid: (u32, u32, u32),
        block: u32,
        params: &P,
        stream: cu::CUstream,
    ) -> Result<()> {
        let mut args = [params as *const P as *mut c_void];
        check!(cuLaunchKernel(
            f.handle as cu::CUfunction,
            grid.0,
            grid.1,
            grid.2,
            block,
            1,
            1,
            f.smem,
            stream,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        ));
        Ok(())
    }

    /// Gradients of DistrAttention on a plan, asynchronously on `stream`:
    /// writes `grads.dq`, `grads.dk`, `grads.dv` (overwritten, not added to)
    /// from Q, K, V, the forward's output, LSE (as [`Engine::attention_raw`]
    /// writes them, on the same plan) and the output gradient. Heads with
    /// G = 1 are exact attention's gradients; `plan` may be `None` when every
    /// head has G = 1. `workspace` needs [`backward_workspace_len`] f32
    /// elements; its contents on entry do not matter. See [`check_backward`]
    /// for what is accepted.
    ///
    /// Rounding as in the forward: Q̂ and K̂ in the input type (so P is the
    /// forward's P), P and dS rounded to the input type as tensor-core
    /// operands, f32 accumulation. With per-head group sizes whose heads
    /// share a KV head, dK and dV of that KV head are summed over launches
    /// in their own type (a second rounding when they are f16/bf16).
    ///
    /// # Safety
    /// Every pointer must be a device allocation of the engine's context
    /// holding at least the given number of elements, valid until the stream
    /// has run the kernels; the gradients and the workspace must not overlap
    /// each other or any input; `stream` must belong to that context (or be null).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_backward_raw(
        &self,
        cfg: &Config<'_>,
        plan: Option<&RawPlan>,
        q: &RawTensor,
        k: &RawTensor,
        v: &RawTensor,
        fwd: &RawForward,
        grads: &RawGradients,
        workspace: &RawBuffer,
        stream: cu::CUstream,
    ) -> Result<()> {
        let p = check_backward(cfg, plan, q, k, v, fwd, grads, workspace)?;
        self.ensure_context()?;
        let dtype = if q.dtype == DType::BF16 { "bf16" } else { "f16" };
        let d = p.head_dim;
        let module: &'static str = crate::engine::MODULES
            .iter()
            .find(|m| m.name == format!("bwd_{dtype}_d{d}"))
            .map(|m| m.name)
            .expect("validated head_dim has a module");
        let hopper_module: &'static str = crate::engine::MODULES
            .iter()
            .find(|m| m.name == format!("hbwd_{dtype}_d{d}"))
            .map_or("", |m| m.name);
        let parts = workspace_parts(cfg, &p, fwd.d_out.dtype)?;
        let ws = workspace.ptr;
        let at = |off: usize| ws + 4 * off as u64;
        let (dq_acc, delta, qhat, qtil, do_conv) =
            (ws, at(parts.delta), at(parts.qhat), at(parts.qtil), at(parts.do_conv));
        let do_f32 = fwd.d_out.dtype == DType::F32;
        let scale = cfg.softmax_scale(d);
        let num_blocks = p.q_len.div_ceil(cfg.block_rows);
        let plan_ptr = plan.map_or(0, |pl| pl.ptr);
        let (ol, dol, dql) = (&fwd.o.layout, &fwd.d_out.layout, &grads.dq.layout);

        let mut by_g: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for h in 0..p.q_heads {
            by_g.entry(cfg.group_size(h)).or_default().push(h);
        }
        let i32c = |x: usize, operand| i32_of(x, operand);

        // ---- row kernels (prep, then dq after the main kernel) ----
        let mut row = BwdRowParams {
            q: q.ptr,
            qhat,
            qtil,
            o: fwd.o.ptr,
            d_out: fwd.d_out.ptr,
            do_conv,
            delta,
            dq_acc,
            plan: plan_ptr,
            dq: grads.dq.ptr,
            q_batch_stride: i64_of(q.layout.stride_batch, Operand::Q)?,
            q_row_stride: i64_of(q.layout.stride_seq, Operand::Q)?,
            q_head_stride: i64_of(q.layout.stride_head, Operand::Q)?,
            o_batch_stride: i64_of(ol.stride_batch, Operand::Output)?,
            o_row_stride: i64_of(ol.stride_seq, Operand::Output)?,
            o_head_stride: i64_of(ol.stride_head, Operand::Output)?,
            do_batch_stride: i64_of(dol.stride_batch, Operand::DOut)?,
            do_row_stride: i64_of(dol.stride_seq, Operand::DOut)?,
            do_head_stride: i64_of(dol.stride_head, Operand::DOut)?,
            dq_batch_stride: i64_of(dql.stride_batch, Operand::DQ)?,
            dq_row_stride: i64_of(dql.stride_seq, Operand::DQ)?,
            dq_head_stride: i64_of(dql.stride_head, Operand::DQ)?,
            q_len: i32c(p.q_len, Operand::Q)?,
            q_heads: i32c(p.q_heads, Operand::Q)?,
            group: 1,
            num_blocks: i32c(num_blocks, Operand::Plan)?,
            block_rows: cfg.block_rows as i32,
            batch_offset: 0,
            o_f32: (fwd.o.dtype == DType::F32) as i32,
            do_f32: do_f32 as i32,
            dq_f32: (grads.dq.dtype == DType::F32) as i32,
            sample: (cfg.fusion == Fusion::Sample) as i32,
            head_map_len: 0,
            scale,
            head_map: [0; HEAD_MAP_MAX],
        };
        let row_pass = |row: &mut BwdRowParams, f: Func| -> Result<()> {
            let grid_x = u32::try_from(p.q_len.div_ceil(ROWS_PER_CTA))
                .map_err(|_| Error::from(CoreError::SizeOverflow { operand: Operand::Q }))?;
            for (&g, heads) in &by_g {
                row.group = g as i32;
                let identity = heads.len() == p.q_heads && p.q_heads <= GRID_YZ_MAX;
                let chunks: Vec<&[usize]> =
                    if identity { vec![&heads[..]] } else { heads.chunks(HEAD_MAP_MAX).collect() };
                for chunk in chunks {
                    row.head_map_len = 0;
                    if !identity {
                        for (slot, &h) in row.head_map.iter_mut().zip(chunk) {
                            *slot = u16::try_from(h).map_err(|_| {
                                Error::from(CoreError::SizeOverflow { operand: Operand::GroupSizes })
                            })?;
                        }
                        row.head_map_len = chunk.len() as i32;
                    }
                    let mut b0 = 0;
                    while b0 < p.batch {
                        let nb = (p.batch - b0).min(GRID_YZ_MAX);
                        row.batch_offset = b0 as i32;
                        // SAFETY: `row` is the kernels' BwdRowParams; pointers validated by the caller.
                        unsafe {
                            self.launch_block(
                                f,
                                (grid_x, chunk.len() as u32, nb as u32),
                                ROW_THREADS,
                                row,
                                stream,
                            )?
                        };
                        b0 += nb;
                    }
                }
            }
            Ok(())
        };
        let prep = self.loaded.function(module, &format!("da_bwd_prep_{dtype}_d{d}"), false)?;
        let dq_kernel = self.loaded.function(module, &format!("da_bwd_dq_{dtype}_d{d}"), false)?;
        row_pass(&mut row, prep)?;

        // ---- main kernel, one launch series per group size ----
        let (ql, kl, vl, dkl, dvl) = (&q.layout, &k.layout, &v.layout, &grads.dk.layout, &grads.dv.layout);
        let (do_ptr, do_strides) = if do_f32 {
            let (n, hq) = (p.q_len, p.q_heads);
            (do_conv, (hq * n * d, d, n * d))
        } else {
            (fwd.d_out.ptr, (dol.stride_batch, dol.stride_seq, dol.stride_head))
        };
        let mut params = BwdParams {
            q: q.ptr,
            k: k.ptr,
            v: v.ptr,
            d_out: do_ptr,
            qhat,
            qtil,
            plan: plan_ptr,
            lse: fwd.lse.ptr,
            delta,
            dq_acc,
            dk: grads.dk.ptr,
            dv: grads.dv.ptr,
            q_batch_stride: i64_of(ql.stride_batch, Operand::Q)?,
            q_row_stride: i64_of(ql.stride_seq, Operand::Q)?,
            q_head_stride: i64_of(ql.stride_head, Operand::Q)?,
            k_batch_stride: i64_of(kl.stride_batch, Operand::K)?,
            k_row_stride: i64_of(kl.stride_seq, Operand::K)?,
            k_head_stride: i64_of(kl.stride_head, Operand::K)?,
            v_batch_stride: i64_of(vl.stride_batch, Operand::V)?,
            v_row_stride: i64_of(vl.stride_seq, Operand::V)?,
            v_head_stride: i64_of(vl.stride_head, Operand::V)?,
            do_batch_stride: i64_of(do_strides.0, Operand::DOut)?,
            do_row_stride: i64_of(do_strides.1, Operand::DOut)?,
            do_head_stride: i64_of(do_strides.2, Operand::DOut)?,
            dk_batch_stride: i64_of(dkl.stride_batch, Operand::DK)?,
            dk_row_stride: i64_of(dkl.stride_seq, Operand::DK)?,
            dk_head_stride: i64_of(dkl.stride_head, Operand::DK)?,
            dv_batch_stride: i64_of(dvl.stride_batch, Operand::DV)?,
            dv_row_stride: i64_of(dvl.stride_seq, Operand::DV)?,
            dv_head_stride: i64_of(dvl.stride_head, Operand::DV)?,
            q_len: i32c(p.q_len, Operand::Q)?,
            kv_len: i32c(p.kv_len, Operand::K)?,
            q_heads: i32c(p.q_heads, Operand::Q)?,
            heads_per_kv: (p.q_heads / p.kv_heads) as i32,
            num_blocks: i32c(num_blocks, Operand::Plan)?,
            block_rows: cfg.block_rows as i32,
            batch_offset: 0,
            scale_log2: scale * std::f32::consts::LOG2_E,
            scale,
            causal: cfg.causal as i32,
            dk_f32: (grads.dk.dtype == DType::F32) as i32,
            dv_f32: (grads.dv.dtype == DType::F32) as i32,
            kv_map_len: 0,
            sample: (cfg.fusion == Fusion::Sample) as i32,
            kv_head: [0; KV_MAX],
            kv_first: [0; KV_MAX],
            kv_count: [0; KV_MAX],
            kv_accum: [0; KV_MAX],
            q_list: [0; QLIST_MAX],
        };
        let grid_x = u32::try_from(p.kv_len.div_ceil(KEYS_PER_CTA))
            .map_err(|_| Error::from(CoreError::SizeOverflow { operand: Operand::K }))?;
        let mut written = vec![false; p.kv_heads];
        for (&g, heads) in &by_g {
            let (f, threads) = if self.wgmma() && hopper_backward(d, g) {
                let name = format!("da_hbwd_{dtype}_d{d}_g{g}");
                (self.loaded.function(hopper_module, &name, true)?, HOPPER_BWD_THREADS)
            } else {
                (self.loaded.function(module, &format!("da_bwd_{dtype}_d{d}_g{g}"), true)?, BWD_THREADS)
            };
            let launches: Vec<Option<KvLaunch>> = if heads.len() == p.q_heads && p.kv_heads <= GRID_YZ_MAX {
                vec![None]
            } else {
                kv_launches(&p, heads, &mut written)?.into_iter().map(Some).collect()
            };
            for launch in launches {
                let grid_y = match &launch {
                    None => {
                        params.kv_map_len = 0;
                        p.kv_heads
                    }
                    Some(l) => {
                        for (i, &(hk, first, count, acc)) in l.entries.iter().enumerate() {
                            params.kv_head[i] = hk;
                            params.kv_first[i] = first;
                            params.kv_count[i] = count;
                            params.kv_accum[i] = acc as u16;
                        }
                        params.q_list[..l.q_list.len()].copy_from_slice(&l.q_list);
                        params.kv_map_len = l.entries.len() as i32;
                        l.entries.len()
                    }
                };
                let mut b0 = 0;
                while b0 < p.batch {
                    let nb = (p.batch - b0).min(GRID_YZ_MAX);
                    params.batch_offset = b0 as i32;
                    self.launch_block(f, (grid_x, grid_y as u32, nb as u32), threads, &params, stream)?;
                    b0 += nb;
                }
            }
        }

        // ---- dQ from the accumulators ----
        row_pass(&mut row, dq_kernel)?;
        Ok(())
    }

    /// [`Engine::attention_backward_raw`] over cust buffers (same checks;
    /// asynchronous: keep the buffers alive until `stream` has run it).
    /// `workspace` needs [`backward_workspace_len`] elements.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: GpuElement, O: GpuOutput, D: GpuOutput, G: GpuOutput>(
        &self,
        cfg: &Config<'_>,
        plan: Option<&GpuPlan<'_>>,
        q: &GpuTensor<'_, T>,
        k: &GpuTensor<'_, T>,
        v: &GpuTensor<'_, T>,
        fwd: &GpuForward<'_, O, D>,
        grads: &mut GpuGradients<'_, G>,
        workspace: &mut DeviceSlice<f32>,
        stream: &Stream,
    ) -> Result<()> {
        let plan =
            plan.map(|p| RawPlan { ptr: p.data.as_device_ptr().as_raw(), len: p.data.len(), shape: p.shape });
        let (q, k, v) = (
            raw_tensor(q.data, q.layout, T::DTYPE),
            raw_tensor(k.data, k.layout, T::DTYPE),
            raw_tensor(v.data, v.layout, T::DTYPE),
        );
        let fwd = RawForward {
            o: raw_tensor(fwd.o.data, fwd.o.layout, O::DTYPE),
            lse: RawBuffer { ptr: fwd.lse.as_device_ptr().as_raw(), len: fwd.lse.len() },
            d_out: raw_tensor(fwd.d_out.data, fwd.d_out.layout, D::DTYPE),
        };
        let g = RawGradients {
            dq: raw_tensor(grads.dq.data, grads.dq.layout, G::DTYPE),
            dk: raw_tensor(grads.dk.data, grads.dk.layout, G::DTYPE),
            dv: raw_tensor(grads.dv.data, grads.dv.layout, G::DTYPE),
        };
        let ws = RawBuffer { ptr: workspace.as_device_ptr().as_raw(), len: workspace.len() };
        // SAFETY: cust slices are live device allocations of at least `len`
        // elements in the current context; the three gradients and the
        // workspace are borrowed mutably, so they overlap no input (they could
        // only overlap each other through one buffer borrowed twice, which the
        // borrow checker rejects).
        unsafe {
            self.attention_backward_raw(cfg, plan.as_ref(), &q, &k, &v, &fwd, &g, &ws, stream.as_inner())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(q_heads: usize, kv_heads: usize) -> Problem {
        let q = Layout::contiguous(1, 10, q_heads, 64);
        let k = Layout::contiguous(1, 12, kv_heads, 64);
        Problem::new(&q, &k, &k).unwrap()
    }

    #[test]
    fn kv_launches_cover_every_head_once_and_never_repeat_a_kv_head_in_a_launch() {
        for (hq, hkv) in [(8, 2), (300, 1), (300, 100), (600, 3), (70, 70)] {
            let p = problem(hq, hkv);
            let sizes: Vec<usize> = (0..hq).map(|h| [1, 2, 4][(h * 7 + h / 3) % 3]).collect();
            let mut written = vec![false; hkv];
            let mut seen = vec![0usize; hq];
            for g in [1, 2, 4] {
                let heads: Vec<usize> = (0..hq).filter(|&h| sizes[h] == g).collect();
                for l in kv_launches(&p, &heads, &mut written).unwrap() {
                    assert!(l.entries.len() <= KV_MAX && l.q_list.len() <= QLIST_MAX);
                    let mut kvs: Vec<u16> = l.entries.iter().map(|e| e.0).collect();
                    kvs.sort_unstable();
                    kvs.dedup();
                    assert_eq!(kvs.len(), l.entries.len(), "a KV head twice in one launch");
                    for &(hk, first, count, _) in &l.entries {
                        for &h in &l.q_list[first as usize..(first + count) as usize] {
                            assert_eq!(p.kv_head(h as usize), hk as usize);
                            assert_eq!(sizes[h as usize], g);
                            seen[h as usize] += 1;
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "every query head once");
            assert!(written.iter().all(|&w| w));
        }
    }

    #[test]
    fn kv_launches_accumulate_only_after_a_first_write() {
        let p = problem(4, 2);
        let mut written = vec![false; 2];
        let first = kv_launches(&p, &[0, 2], &mut written).unwrap();
        assert!(first.iter().flat_map(|l| &l.entries).all(|e| !e.3));
        let second = kv_launches(&p, &[1, 3], &mut written).unwrap();
        assert!(second.iter().flat_map(|l| &l.entries).all(|e| e.3));
    }

    #[test]
    fn workspace_grows_with_fused_heads_and_an_f32_output_gradient() {
        let p = problem(2, 1);
        let exact = Config::with_group_size(1);
        let t = backward_workspace_len(&exact, &p, DType::BF16).unwrap();
        assert_eq!(t, 2 * 10 * 64 + 20usize.div_ceil(4) * 4);
        assert_eq!(backward_workspace_len(&exact, &p, DType::F32).unwrap(), t + 2 * 10 * 64 / 2);
        let sizes = [1, 2];
        let mixed = Config { group_sizes: distr_attention_core::GroupSizes::PerHead(&sizes), ..exact };
        assert_eq!(backward_workspace_len(&mixed, &p, DType::BF16).unwrap(), t + 2 * 10 * 64);
    }
}
