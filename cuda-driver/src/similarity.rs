//! Similarity and key-weighted plans on the GPU (`kernels/simplan.cu`): the
//! core's [`GroupingMode::Similarity`] and [`GroupingMode::KeyWeighted`]
//! plans, computed per (batch, head, query block) by one CTA in f32. A child
//! module of the engine (it launches with the engine's loaded kernels).
//!
//! [`Engine::plan_raw`] and [`Engine::plan`] compute these plans when
//! `cfg.grouping` asks for them; key-weighted grouping needs the keys,
//! through [`Engine::plan_with_keys_raw`] / [`Engine::plan_with_keys`]
//! (the core's `plan_with_keys`). A key-weighted plan first computes the
//! centred Gram matrix of K per (batch, KV head) into a stream-ordered
//! temporary allocation (`cuMemAllocAsync`, freed on the same stream).

use std::ffi::c_void;

use cust::memory::DeviceSlice;
use cust::stream::Stream;
use cust::sys as cu;
use distr_attention_core::{
    Config, DType, Error as CoreError, GroupSizes, GroupingMode, Operand, PlanShape, Problem,
};

use super::{raw_tensor, Engine, MODULES};
use crate::error::{check, Error, Result};
use crate::params::HEAD_MAP_MAX;
use crate::types::{GpuElement, GpuTensor};
use crate::validate::{
    aligned, buffer_len, check_dtype, i32_of, i64_of, strides_fit, strides_multiple, RawBuffer, RawTensor,
};

/// Head dimensions of the similarity plan kernels.
pub const SIMILARITY_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Group sizes of the similarity plan kernels (the core takes any power of two).
pub const SIMILARITY_GROUP_SIZES: [usize; 4] = [1, 2, 4, 8];
/// Largest block_rows of the similarity plan kernels.
pub const SIMILARITY_MAX_BLOCK_ROWS: usize = 128;

/// Threads per CTA of the similarity kernels (`kSimThreads`).
const SIM_THREADS: u32 = 256;

/// `SimPlanParams` of `kernels/simplan.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SimPlanParams {
    q: u64,
    plan: u64,
    gk: u64,
    q_batch_stride: i64,
    q_row_stride: i64,
    q_head_stride: i64,
    q_len: i32,
    heads: i32,
    block_rows: i32,
    num_blocks: i32,
    batch: i32,
    kv_heads: i32,
    heads_per_kv: i32,
    head_map_len: i32,
    head_map: [u16; HEAD_MAP_MAX],
}

/// `KGramParams` of `kernels/simplan.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct KGramParams {
    k: u64,
    gk: u64,
    k_batch_stride: i64,
    k_row_stride: i64,
    k_head_stride: i64,
    kv_len: i32,
    kv_heads: i32,
    batch: i32,
    pad: i32,
}

const _: () = assert!(std::mem::size_of::<SimPlanParams>() == 80 + 2 * HEAD_MAP_MAX);
const _: () = assert!(std::mem::size_of::<KGramParams>() == 56);

/// Checks the arguments of a similarity or key-weighted plan on the GPU and
/// returns its shape. The core's checks first, in the order of its
/// `plan_with_keys` (K against Q when given) and `plan` (key-weighted
/// grouping without keys is `GroupingUnavailable`; plan shape, config, G a
/// power of two, Q's buffer), then the plan buffer's length, then this
/// backend's limits: f16/bf16 (K of Q's type), `head_dim` in
/// [`SIMILARITY_HEAD_DIMS`], `block_rows <= 128`, every G in
/// [`SIMILARITY_GROUP_SIZES`], and alignment (Q and K 8-byte aligned with
/// strides multiples of 4 elements; the plan 2-byte aligned).
///
/// Inputs are not scanned for NaN or infinities (the core reports
/// `NonFinite`).
pub fn check_similarity_plan(
    cfg: &Config<'_>,
    q: &RawTensor,
    k: Option<&RawTensor>,
    plan: &RawBuffer,
) -> Result<PlanShape> {
    if let Some(k) = k {
        Problem::new(&q.layout, &k.layout, &k.layout)?;
        buffer_len(Operand::K, k.len, &k.layout)?;
    }
    match cfg.grouping {
        GroupingMode::Lsh => return Err(CoreError::GroupingUnavailable {
            reason:
                "check_similarity_plan checks similarity and key-weighted plans; LSH plans use check_plan",
        }
        .into()),
        GroupingMode::KeyWeighted if k.is_none() => {
            return Err(CoreError::GroupingUnavailable {
                reason: "key-weighted grouping needs the keys: use plan_with_keys",
            }
            .into())
        }
        _ => {}
    }
    let shape = PlanShape::new(cfg, &q.layout)?;
    cfg.validate(q.layout.heads, q.layout.dim)?;
    for h in 0..q.layout.heads {
        let g = cfg.group_size(h);
        if !g.is_power_of_two() {
            return Err(CoreError::UnsupportedGroupSize { got: g }.into());
        }
        if matches!(cfg.group_sizes, GroupSizes::Uniform(_)) {
            break;
        }
    }
    buffer_len(Operand::Q, q.len, &q.layout)?;
    let needed = shape.num_entries()?;
    if plan.len < needed {
        return Err(CoreError::BufferTooSmall { operand: Operand::Plan, needed, got: plan.len }.into());
    }

    // What this backend restricts.
    check_dtype(Operand::Q, q.dtype, None)?;
    let key_weighted = cfg.grouping == GroupingMode::KeyWeighted;
    if let Some(k) = k.filter(|_| key_weighted) {
        check_dtype(Operand::K, k.dtype, Some(q.dtype))?;
    }
    if !SIMILARITY_HEAD_DIMS.contains(&shape.head_dim) {
        return Err(CoreError::UnsupportedHeadDim { got: shape.head_dim }.into());
    }
    if cfg.block_rows > SIMILARITY_MAX_BLOCK_ROWS {
        return Err(CoreError::UnsupportedBlockRows { got: cfg.block_rows }.into());
    }
    for h in 0..q.layout.heads {
        let g = cfg.group_size(h);
        if !SIMILARITY_GROUP_SIZES.contains(&g) {
            return Err(CoreError::UnsupportedGroupSize { got: g }.into());
        }
    }
    strides_fit(Operand::Q, &q.layout)?;
    // One CTA per (batch, head, block): the grid's x extent.
    let units = shape.num_blocks();
    if shape.batch.checked_mul(shape.heads).and_then(|x| x.checked_mul(shape.blocks)).is_none()
        || i32::try_from(units).is_err()
    {
        return Err(CoreError::SizeOverflow { operand: Operand::Plan }.into());
    }
    i32_of(shape.batch, Operand::Q)?;
    aligned(Operand::Q, q.ptr, 8, "address must be 8-byte aligned")?;
    strides_multiple(Operand::Q, &q.layout, 4, "strides must be multiples of 4 elements")?;
    if let Some(k) = k.filter(|_| key_weighted) {
        strides_fit(Operand::K, &k.layout)?;
        let grams = k.layout.batch.checked_mul(k.layout.heads);
        if grams.and_then(|n| i32::try_from(n).ok()).is_none() {
            return Err(CoreError::SizeOverflow { operand: Operand::K }.into());
        }
        aligned(Operand::K, k.ptr, 8, "address must be 8-byte aligned")?;
        strides_multiple(Operand::K, &k.layout, 4, "strides must be multiples of 4 elements")?;
    }
    aligned(Operand::Plan, plan.ptr, 2, "address must be 2-byte aligned")?;
    Ok(shape)
}

impl Engine {
    /// Launches one of the similarity kernels (256 threads per CTA).
    ///
    /// # Safety
    /// `params` must match the kernel's single by-value parameter.
    unsafe fn launch_sim<P>(
        &self,
        f: super::Func,
        grid: u32,
        params: &P,
        stream: cu::CUstream,
    ) -> Result<()> {
        let mut args = [params as *const P as *mut c_void];
        check!(cuLaunchKernel(
            f.handle as cu::CUfunction,
            grid,
            1,
            1,
            SIM_THREADS,
            1,
            1,
            f.smem,
            stream,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        ));
        Ok(())
    }

    /// The similarity or key-weighted plan (`cfg.grouping`) of `q` into
    /// `plan`; `k` is validated against `q` when given and read by the
    /// key-weighted mode. See [`check_similarity_plan`].
    ///
    /// # Safety
    /// As [`Engine::plan_with_keys_raw`].
    pub(crate) unsafe fn similarity_plan_raw(
        &self,
        cfg: &Config<'_>,
        q: &RawTensor,
        k: Option<&RawTensor>,
        plan: &RawBuffer,
        stream: cu::CUstream,
    ) -> Result<PlanShape> {
        let shape = check_similarity_plan(cfg, q, k, plan)?;
        self.ensure_context()?;
        let dtype = if q.dtype == DType::BF16 { "bf16" } else { "f16" };
        let d = shape.head_dim;
        let module: &'static str = MODULES
            .iter()
            .find(|m| m.name == format!("simplan_{dtype}_d{d}"))
            .map(|m| m.name)
            .expect("validated head_dim has a module");
        let key_weighted = cfg.grouping == GroupingMode::KeyWeighted;
        let lay = &q.layout;
        let mut params = SimPlanParams {
            q: q.ptr,
            plan: plan.ptr,
            gk: 0,
            q_batch_stride: i64_of(lay.stride_batch, Operand::Q)?,
            q_row_stride: i64_of(lay.stride_seq, Operand::Q)?,
            q_head_stride: i64_of(lay.stride_head, Operand::Q)?,
            q_len: i32_of(lay.seq, Operand::Q)?,
            heads: i32_of(lay.heads, Operand::Q)?,
            block_rows: cfg.block_rows as i32,
            num_blocks: i32_of(shape.blocks, Operand::Plan)?,
            batch: i32_of(lay.batch, Operand::Q)?,
            kv_heads: 1,
            heads_per_kv: 1,
            head_map_len: 0,
            head_map: [0; HEAD_MAP_MAX],
        };

        // Key-weighted: the centred K Gram of every (batch, KV head) first,
        // into a temporary buffer ordered on the stream.
        let mut workspace: cu::CUdeviceptr = 0;
        if let Some(k) = k.filter(|_| key_weighted) {
            let kl = &k.layout;
            let grams = kl.batch * kl.heads;
            let bytes =
                grams.checked_mul(d * d * 4).ok_or(CoreError::SizeOverflow { operand: Operand::Scratch })?;
            let f = self.loaded.function(module, &format!("da_kgram_{dtype}_d{d}"), true)?;
            check!(cuMemAllocAsync(&mut workspace, bytes, stream));
            let kp = KGramParams {
                k: k.ptr,
                gk: workspace,
                k_batch_stride: i64_of(kl.stride_batch, Operand::K)?,
                k_row_stride: i64_of(kl.stride_seq, Operand::K)?,
                k_head_stride: i64_of(kl.stride_head, Operand::K)?,
                kv_len: i32_of(kl.seq, Operand::K)?,
                kv_heads: kl.heads as i32,
                batch: kl.batch as i32,
                pad: 0,
            };
            if let Err(e) = self.launch_sim(f, grams as u32, &kp, stream) {
                cu::cuMemFreeAsync(workspace, stream);
                return Err(e);
            }
            params.gk = workspace;
            params.kv_heads = kl.heads as i32;
            params.heads_per_kv = (lay.heads / kl.heads) as i32;
        }
        let result =
            self.launch_plan_groups(cfg, module, dtype, d, key_weighted, &shape, &mut params, stream);
        if workspace != 0 {
            let r = cu::cuMemFreeAsync(workspace, stream);
            if result.is_ok() && r != cu::CUresult::CUDA_SUCCESS {
                return Err(Error::cuda("cuMemFreeAsync", r));
            }
        }
        result.map(|()| shape)
    }

    /// One launch (series) per distinct group size, as the attention does:
    /// all heads at once when they share G, else chunks of at most
    /// `HEAD_MAP_MAX` heads through the head map.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_plan_groups(
        &self,
        cfg: &Config<'_>,
        module: &'static str,
        dtype: &str,
        d: usize,
        key_weighted: bool,
        shape: &PlanShape,
        params: &mut SimPlanParams,
        stream: cu::CUstream,
    ) -> Result<()> {
        let mut by_g: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
        for h in 0..shape.heads {
            by_g.entry(cfg.group_size(h)).or_default().push(h);
        }
        for (g, heads) in by_g {
            let mode = if key_weighted && g > 1 { "kw" } else { "sim" };
            let f = self.loaded.function(module, &format!("da_simplan_{dtype}_d{d}_g{g}_{mode}"), true)?;
            let chunks: Vec<&[usize]> = if heads.len() == shape.heads {
                vec![&heads[..]]
            } else {
                heads.chunks(HEAD_MAP_MAX).collect()
            };
            for chunk in chunks {
                if heads.len() == shape.heads {
                    params.head_map_len = 0;
                } else {
                    for (slot, &h) in params.head_map.iter_mut().zip(chunk) {
                        *slot = u16::try_from(h)
                            .map_err(|_| CoreError::SizeOverflow { operand: Operand::GroupSizes })?;
                    }
                    params.head_map_len = chunk.len() as i32;
                }
                // Validated: batch * heads * blocks fits an i32.
                let grid = shape.batch * chunk.len() * shape.blocks;
                self.launch_sim(f, grid as u32, params, stream)?;
            }
        }
        Ok(())
    }

    /// Computes the plan of `q` under any grouping mode, reading the keys
    /// `k` where key-weighted grouping needs them (the core's
    /// `plan_with_keys`): `k` is validated against `q` in every mode; LSH
    /// and similarity plans do not read it. Asynchronous on `stream`.
    ///
    /// Similarity and key-weighted plans are the core's greedy grouping
    /// and refinement computed in f32 (the core uses f64): they agree
    /// except where one of the grouping's decisions is a near-tie.
    ///
    /// # Safety
    /// `q.ptr`, `k.ptr` and `plan.ptr` must be device allocations of the
    /// engine's context holding at least `len` elements, valid until the
    /// stream has run the kernels; `stream` must belong to that context (or
    /// be null).
    pub unsafe fn plan_with_keys_raw(
        &self,
        cfg: &Config<'_>,
        q: &RawTensor,
        k: &RawTensor,
        plan: &RawBuffer,
        stream: cu::CUstream,
    ) -> Result<PlanShape> {
        match cfg.grouping {
            GroupingMode::Lsh => {
                Problem::new(&q.layout, &k.layout, &k.layout)?;
                buffer_len(Operand::K, k.len, &k.layout)?;
                self.plan_raw(cfg, q, plan, stream)
            }
            _ => self.similarity_plan_raw(cfg, q, Some(k), plan, stream),
        }
    }

    /// [`Engine::plan_with_keys_raw`] over cust buffers (same checks and
    /// asynchrony as [`Engine::plan`]).
    pub fn plan_with_keys<T: GpuElement>(
        &self,
        cfg: &Config<'_>,
        q: &GpuTensor<'_, T>,
        k: &GpuTensor<'_, T>,
        plan: &mut DeviceSlice<u16>,
        stream: &Stream,
    ) -> Result<PlanShape> {
        let q = raw_tensor(q.data, q.layout, T::DTYPE);
        let k = raw_tensor(k.data, k.layout, T::DTYPE);
        let out = RawBuffer { ptr: plan.as_device_ptr().as_raw(), len: plan.len() };
        // SAFETY: cust slices are live device allocations of at least `len`
        // elements, created in the current context; the stream is a cust stream.
        unsafe { self.plan_with_keys_raw(cfg, &q, &k, &out, stream.as_inner()) }
    }
}
