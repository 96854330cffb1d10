//! Loading the embedded kernel images (once per CUDA context, shared by all
//! engines of that context) and launching the kernels on the caller's stream.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, Weak};

use cust::memory::{DeviceBuffer, DeviceSlice};
use cust::stream::Stream;
use cust::sys as cu;
use distr_attention_core::{Config, DType, Fusion, Operand, PlanShape};

use crate::error::{check, Error, Result};
use crate::params::{FwdParams, HTmaMaps, PlanParams, TmaDesc, HEAD_MAP_MAX};
use crate::types::{GpuElement, GpuOutput, GpuPlan, GpuTensor, GpuTensorMut};
use crate::validate::{check_attention, check_plan, i64_of, RawBuffer, RawPlan, RawTensor};

/// The three images of one translation unit.
pub(crate) struct ModuleImage {
    pub(crate) name: &'static str,
    sm90a: &'static [u8],
    sm80: &'static [u8],
    ptx: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

// Similarity and key-weighted plans (a child module: it launches with the engine's internals).
#[path = "similarity.rs"]
pub(crate) mod similarity;

const THREADS: u32 = 128;
/// Threads of the Hopper kernel's CTA (a producer and two consumer warpgroups).
const HOPPER_THREADS: u32 = 384;
/// Head dimensions with a Hopper kernel (kernels/hfwd.cu).
const HOPPER_HEAD_DIMS: [usize; 2] = [64, 128];
/// Rows of the Hopper kernel's CTA: with G > 1 the plan's block_rows must match.
const HOPPER_ROWS: usize = 128;
/// Environment variable that pins the mma.sync kernel on every device (`mma`),
/// for measurements and for testing the fallback on an H100.
const KERNEL_ENV: &str = "DISTR_ATTENTION_KERNEL";
/// Largest grid y and z extent.
pub(crate) const GRID_YZ_MAX: usize = 65535;

/// Which compiled image a context runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageKind {
    /// The sm_90a cubin (compute capability 9.0: H100, H200).
    Sm90a,
    /// The sm_80 cubin (compute capability 8.x).
    Sm80,
    /// The compute_80 PTX, compiled by the driver at load time (newer GPUs).
    Ptx,
}

impl ImageKind {
    /// The image for a device of compute capability `major.minor`.
    pub fn for_device(major: i32, minor: i32) -> Result<ImageKind> {
        match (major, minor) {
            (9, 0) => Ok(ImageKind::Sm90a),
            (8, _) => Ok(ImageKind::Sm80),
            (m, _) if m >= 9 => Ok(ImageKind::Ptx),
            _ => Err(Error::UnsupportedDevice { major, minor }),
        }
    }

    fn bytes(self, m: &ModuleImage) -> &'static [u8] {
        match self {
            ImageKind::Sm90a => m.sm90a,
            ImageKind::Sm80 => m.sm80,
            ImageKind::Ptx => m.ptx,
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Func {
    pub(crate) handle: usize, // CUfunction
    pub(crate) smem: u32,
}

/// The modules of one context (loaded lazily, one translation unit at a time).
pub(crate) struct Loaded {
    ctx: usize, // CUcontext
    image: ImageKind,
    modules: Mutex<HashMap<&'static str, usize>>, // CUmodule
    funcs: Mutex<HashMap<String, Func>>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let modules = std::mem::take(self.modules.get_mut().unwrap_or_else(|e| e.into_inner()));
        // SAFETY: the handles were loaded into `ctx`; if that context is gone the
        // calls fail and the failure is ignored (the driver freed them with it).
        unsafe {
            if cu::cuCtxPushCurrent_v2(self.ctx as cu::CUcontext) == cu::CUresult::CUDA_SUCCESS {
                for (_, m) in modules {
                    cu::cuModuleUnload(m as cu::CUmodule);
                }
                let mut prev: cu::CUcontext = std::ptr::null_mut();
                cu::cuCtxPopCurrent_v2(&mut prev);
            }
        }
    }
}

/// Loaded modules per (context, image); an entry lives while an engine uses it.
static LOADED: Mutex<Vec<(usize, ImageKind, Weak<Loaded>)>> = Mutex::new(Vec::new());

fn current_context() -> Result<usize> {
    let mut ctx: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: writes one handle.
    unsafe { check!(cuCtxGetCurrent(&mut ctx)) };
    if ctx.is_null() {
        return Err(Error::Cuda {
            call: "cuCtxGetCurrent",
            code: cu::CUresult::CUDA_ERROR_INVALID_CONTEXT as u32,
            name: "no CUDA context is current on this thread".into(),
        });
    }
    Ok(ctx as usize)
}

/// Compute capability and multiprocessor count of the current context's device.
fn device_capability() -> Result<(i32, i32, usize)> {
    let mut dev: cu::CUdevice = 0;
    let (mut major, mut minor, mut sms) = (0i32, 0i32, 0i32);
    // SAFETY: plain queries writing integers.
    unsafe {
        check!(cuCtxGetDevice(&mut dev));
        check!(cuDeviceGetAttribute(
            &mut major,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            dev
        ));
        check!(cuDeviceGetAttribute(
            &mut minor,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            dev
        ));
        check!(cuDeviceGetAttribute(
            &mut sms,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            dev
        ));
    }
    Ok((major, minor, sms.max(1) as usize))
}

impl Loaded {
    fn module(&self, name: &'static str) -> Result<usize> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&m) = modules.get(name) {
            return Ok(m);
        }
        let image = MODULES.iter().find(|m| m.name == name).expect("module compiled by build.rs");
        let mut m: cu::CUmodule = std::ptr::null_mut();
        // SAFETY: the image is a cubin for this architecture or NUL-terminated PTX
        // (build.rs), loaded into the current context, which is `self.ctx`.
        unsafe { check!(cuModuleLoadData(&mut m, self.image.bytes(image).as_ptr().cast())) };
        modules.insert(name, m as usize);
        Ok(m as usize)
    }

    /// A kernel of module `module`. With `smem_symbol`, its dynamic
    /// shared-memory size is read from the device constant `<name>_smem` and
    /// the kernel's limit raised to it; otherwise the launch passes its own
    /// size (at most 48 KiB).
    pub(crate) fn function(&self, module: &'static str, name: &str, smem_symbol: bool) -> Result<Func> {
        if let Some(&f) = self.funcs.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(f);
        }
        let m = self.module(module)? as cu::CUmodule;
        let cname = CString::new(name).expect("kernel names have no NUL");
        let mut f: cu::CUfunction = std::ptr::null_mut();
        // SAFETY: `m` is a loaded module of the current context; out-pointers are valid.
        let smem = unsafe {
            check!(cuModuleGetFunction(&mut f, m, cname.as_ptr()));
            if smem_symbol {
                let sym = CString::new(format!("{name}_smem")).expect("no NUL");
                let (mut ptr, mut size): (cu::CUdeviceptr, usize) = (0, 0);
                check!(cuModuleGetGlobal_v2(&mut ptr, &mut size, m, sym.as_ptr()));
                let mut value = 0i32;
                assert_eq!(size, 4, "{name}_smem is an int");
                check!(cuMemcpyDtoH_v2((&mut value as *mut i32).cast::<c_void>(), ptr, 4));
                check!(cuFuncSetAttribute(
                    f,
                    cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    value
                ));
                value as u32
            } else {
                0
            }
        };
        let func = Func { handle: f as usize, smem };
        self.funcs.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), func);
        Ok(func)
    }
}

/// The CUDA backend bound to one CUDA context: kernel modules (loaded once
/// per context and cached) and the uploaded projection matrices.
///
/// All launches go to the stream the caller passes and return without
/// waiting; errors of the asynchronous work surface at the caller's next
/// synchronisation.
pub struct Engine {
    pub(crate) loaded: Arc<Loaded>,
    capability: (i32, i32),
    sm_count: usize,
    /// Whether attention may use the Hopper (wgmma) kernel where it applies.
    wgmma: bool,
    projections: Mutex<HashMap<(u64, usize, u32), DeviceBuffer<f32>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("context", &(self.loaded.ctx as *const c_void))
            .field("capability", &self.capability)
            .field("image", &self.loaded.image)
            .field("wgmma", &self.wgmma)
            .finish()
    }
}

impl Engine {
    /// An engine for the CUDA context current on this thread (for example the
    /// one `cust::quick_init()` returns, or an engine's own), running the
    /// image that fits its device.
    pub fn new() -> Result<Engine> {
        Engine::with_image(None)
    }

    /// Like [`Engine::new`], forcing an image (`None`: the device's own).
    /// Forcing [`ImageKind::Ptx`] exercises the JIT path on any device.
    pub fn with_image(image: Option<ImageKind>) -> Result<Engine> {
        let ctx = current_context()?;
        let (major, minor, sm_count) = device_capability()?;
        let capability = (major, minor);
        let native = ImageKind::for_device(major, minor)?;
        let image = image.unwrap_or(native);
        let mut table = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        table.retain(|(_, _, w)| w.strong_count() > 0);
        let loaded =
            match table.iter().find(|(c, i, _)| *c == ctx && *i == image).and_then(|(_, _, w)| w.upgrade()) {
                Some(l) => l,
                None => {
                    let l = Arc::new(Loaded {
                        ctx,
                        image,
                        modules: Mutex::new(HashMap::new()),
                        funcs: Mutex::new(HashMap::new()),
                    });
                    table.push((ctx, image, Arc::downgrade(&l)));
                    l
                }
            };
        // The Hopper kernel exists in the sm_90a image only.
        let pinned_mma = std::env::var(KERNEL_ENV).is_ok_and(|v| v == "mma");
        let wgmma = image == ImageKind::Sm90a && !pinned_mma;
        Ok(Engine { loaded, capability, sm_count, wgmma, projections: Mutex::new(HashMap::new()) })
    }

    /// The same engine with the Hopper (wgmma) attention kernel allowed or
    /// not. It is on by default on compute capability 9.0 (unless the
    /// environment variable `DISTR_ATTENTION_KERNEL=mma` pins the mma.sync
    /// kernel) and used for head_dim 64 or 128 with G = 1 or
    /// `block_rows` = 128; everything else runs the mma.sync kernel. Turning
    /// it on has no effect on other images.
    pub fn with_wgmma(mut self, on: bool) -> Engine {
        self.wgmma = on && self.loaded.image == ImageKind::Sm90a;
        self
    }

    /// Whether attention uses the Hopper (wgmma) kernel where it applies.
    pub fn wgmma(&self) -> bool {
        self.wgmma
    }

    /// Compute capability of the engine's device.
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// The image this engine runs.
    pub fn image(&self) -> ImageKind {
        self.loaded.image
    }

    pub(crate) fn ensure_context(&self) -> Result<()> {
        if current_context()? != self.loaded.ctx {
            return Err(Error::Cuda {
                call: "cuCtxGetCurrent",
                code: cu::CUresult::CUDA_ERROR_INVALID_CONTEXT as u32,
                name: "the engine's context is not current on this thread".into(),
            });
        }
        Ok(())
    }

    /// Device address of R (block_rows x P, f32) for `cfg`, uploaded once per
    /// (seed, block_rows, P) from the core's generator.
    fn projections(&self, cfg: &Config<'_>) -> Result<u64> {
        let key = (cfg.seed, cfg.block_rows, cfg.num_projections);
        let mut cache = self.projections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(buf) = cache.get(&key) {
            return Ok(buf.as_device_ptr().as_raw());
        }
        let r = distr_attention_core::projections(cfg)?;
        let buf = DeviceBuffer::from_slice(&r)?;
        // A copy from pageable memory may return before the data lands; a
        // kernel on a non-blocking stream could then read it early. Once per
        // config, so a context-wide wait is cheap.
        // SAFETY: a plain driver call on the current context.
        unsafe { check!(cuCtxSynchronize()) };
        let ptr = buf.as_device_ptr().as_raw();
        cache.insert(key, buf);
        Ok(ptr)
    }

    /// # Safety
    /// `params` must match the kernel's single by-value parameter.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch<P>(
        &self,
        f: Func,
        grid: (u32, u32, u32),
        threads: u32,
        smem: u32,
        params: &P,
        stream: cu::CUstream,
    ) -> Result<()> {
        self.launch_args(f, grid, threads, smem, &mut [params as *const P as *mut c_void], stream)
    }

    /// [`Engine::launch`] with one pointer per kernel parameter.
    unsafe fn launch_args(
        &self,
        f: Func,
        grid: (u32, u32, u32),
        threads: u32,
        smem: u32,
        args: &mut [*mut c_void],
        stream: cu::CUstream,
    ) -> Result<()> {
        check!(cuLaunchKernel(
            f.handle as cu::CUfunction,
            grid.0,
            grid.1,
            grid.2,
            threads,
            1,
            1,
            smem,
            stream,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        ));
        Ok(())
    }

    /// Computes the plan of `q` on the GPU into `plan` (`u16`, dense
    /// `[batch][heads][blocks][head_dim]`, at least
    /// [`PlanShape::num_entries`] entries), asynchronously on `stream`.
    ///
    /// LSH: dot products run on tensor cores with f32 accumulation (R split
    /// exactly into three parts of Q's type; the core's CPU plan uses f64):
    /// the two agree except where a projection's dot product is within
    /// rounding of zero. `GroupingMode::Similarity` runs the similarity plan
    /// kernel (see [`Engine::plan_with_keys_raw`]); `KeyWeighted` needs the
    /// keys and is refused here, as by the core's `plan`.
    ///
    /// # Safety
    /// `q.ptr` and `plan.ptr` must be device allocations of the engine's
    /// context holding at least `q.len` and `plan.len` elements, and stay
    /// valid until the stream has run the kernel; `stream` must be a stream
    /// of that context (or null for the legacy default stream).
    pub unsafe fn plan_raw(
        &self,
        cfg: &Config<'_>,
        q: &RawTensor,
        plan: &RawBuffer,
        stream: cu::CUstream,
    ) -> Result<PlanShape> {
        if cfg.grouping != distr_attention_core::GroupingMode::Lsh {
            return self.similarity_plan_raw(cfg, q, None, plan, stream);
        }
        let shape = check_plan(cfg, q, plan)?;
        self.ensure_context()?;
        let proj = self.projections(cfg)?;
        let (l, p, d) = (cfg.block_rows, cfg.num_projections as usize, shape.head_dim);
        let pmax = [8, 16, 32].into_iter().find(|&m| p <= m).expect("P <= 32 is validated");
        let name = format!("da_plan_{}_p{pmax}", if q.dtype == DType::BF16 { "bf16" } else { "f16" });
        // kernels/plan.cu (plan_smem_bytes): R's three parts [3 pmax][lp + 8],
        // plan_stages(d) Q tiles [lp][d + 8] (T; one at d = 128, else two),
        // d sort keys (u32 for pmax <= 16, else u64), partial ranks (one i32
        // per thread). Its CTA size is plan_threads(d): 8 warps at d = 128,
        // else 4.
        let (threads, stages): (u32, usize) = if d > 64 { (256, 1) } else { (128, 2) };
        let lp = l.div_ceil(16) * 16;
        let key_bytes = if pmax <= 16 { 4 } else { 8 };
        let smem = 3 * pmax * (lp + 8) * 2 + stages * lp * (d + 8) * 2 + d * key_bytes + 4 * threads as usize;
        let f = self.loaded.function("plan", &name, true)?;
        debug_assert!(smem <= f.smem as usize, "the kernel's limit covers block_rows <= 128, d <= 128");
        let lay = &q.layout;
        let params = PlanParams {
            q: q.ptr,
            plan: plan.ptr,
            proj,
            q_batch_stride: i64_of(lay.stride_batch, Operand::Q)?,
            q_row_stride: i64_of(lay.stride_seq, Operand::Q)?,
            q_head_stride: i64_of(lay.stride_head, Operand::Q)?,
            q_len: lay.seq as i32,
            heads: lay.heads as i32,
            head_dim: d as i32,
            block_rows: l as i32,
            num_proj: p as i32,
            num_blocks: shape.blocks as i32,
            batch_offset: 0,
            batch: i32::try_from(lay.batch)
                .map_err(|_| distr_attention_core::Error::SizeOverflow { operand: Operand::Q })?,
        };
        // A persistent grid of resident CTAs (one wave), each walking blocks
        // one at a time.
        let mut per_sm = 0i32;
        check!(cuOccupancyMaxActiveBlocksPerMultiprocessor(
            &mut per_sm,
            f.handle as cu::CUfunction,
            threads as i32,
            smem
        ));
        let units = shape.num_blocks();
        let grid = units.min(self.sm_count * per_sm.max(1) as usize).max(1);
        self.launch(f, (grid as u32, 1, 1), threads, smem as u32, &params, stream)?;
        Ok(shape)
    }

    /// DistrAttention on a plan, asynchronously on `stream`: writes `out`
    /// (`[batch, q_len, q_heads, head_dim]`, f32 or the input type, any
    /// non-overlapping even strides) and, if given, `lse` (f32, natural-log
    /// row log-sum-exp, dense `[batch, q_heads, q_len]`). Heads with G = 1
    /// compute exact attention and never read the plan; `plan` may be `None`
    /// when every head has G = 1. Per-head group sizes run one launch per
    /// distinct G. See [`check_attention`] for what is accepted.
    ///
    /// # Safety
    /// Every pointer must be a device allocation of the engine's context
    /// holding at least the given number of elements, valid until the stream
    /// has run the kernels; the output must not overlap the inputs; `stream`
    /// must belong to that context (or be null).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_raw(
        &self,
        cfg: &Config<'_>,
        plan: Option<&RawPlan>,
        q: &RawTensor,
        k: &RawTensor,
        v: &RawTensor,
        out: &RawTensor,
        lse: Option<&RawBuffer>,
        stream: cu::CUstream,
    ) -> Result<()> {
        let p = check_attention(cfg, plan, q, k, v, out, lse)?;
        self.ensure_context()?;
        let dtype = if q.dtype == DType::BF16 { "bf16" } else { "f16" };
        let d = p.head_dim;
        let module: &'static str = MODULES
            .iter()
            .find(|m| m.name == format!("fwd_{dtype}_d{d}"))
            .map(|m| m.name)
            .expect("validated head_dim has a module");
        let hopper_module: &'static str =
            MODULES.iter().find(|m| m.name == format!("hfwd_{dtype}_d{d}")).map_or("", |m| m.name);
        let (ql, kl, vl, ol) = (&q.layout, &k.layout, &v.layout, &out.layout);
        let mut params = FwdParams {
            q: q.ptr,
            k: k.ptr,
            v: v.ptr,
            o: out.ptr,
            lse: lse.map_or(0, |l| l.ptr),
            plan: plan.map_or(0, |pl| pl.ptr),
            q_batch_stride: i64_of(ql.stride_batch, Operand::Q)?,
            q_row_stride: i64_of(ql.stride_seq, Operand::Q)?,
            q_head_stride: i64_of(ql.stride_head, Operand::Q)?,
            k_batch_stride: i64_of(kl.stride_batch, Operand::K)?,
            k_row_stride: i64_of(kl.stride_seq, Operand::K)?,
            k_head_stride: i64_of(kl.stride_head, Operand::K)?,
            v_batch_stride: i64_of(vl.stride_batch, Operand::V)?,
            v_row_stride: i64_of(vl.stride_seq, Operand::V)?,
            v_head_stride: i64_of(vl.stride_head, Operand::V)?,
            o_batch_stride: i64_of(ol.stride_batch, Operand::Output)?,
            o_row_stride: i64_of(ol.stride_seq, Operand::Output)?,
            o_head_stride: i64_of(ol.stride_head, Operand::Output)?,
            q_len: p.q_len as i32,
            kv_len: p.kv_len as i32,
            q_heads: p.q_heads as i32,
            heads_per_kv: (p.q_heads / p.kv_heads) as i32,
            num_blocks: 0,
            batch_offset: 0,
            scale_log2: cfg.softmax_scale(d) * std::f32::consts::LOG2_E,
            causal: cfg.causal as i32,
            sample: (cfg.fusion == Fusion::Sample) as i32,
            out_f32: (out.dtype == DType::F32) as i32,
            head_map_len: 0,
            head_map: [0; HEAD_MAP_MAX],
        };

        // The Hopper kernel loads K and V by TMA; where the driver refuses a
        // descriptor (for example a zero stride) the mma.sync kernel runs.
        let maps = if self.wgmma && HOPPER_HEAD_DIMS.contains(&d) {
            tma_desc(k).zip(tma_desc(v)).map(|(k, v)| HTmaMaps { k, v })
        } else {
            None
        };

        // One launch (series) per distinct group size.
        let mut by_g: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for h in 0..p.q_heads {
            by_g.entry(cfg.group_size(h)).or_default().push(h);
        }
        for (g, heads) in by_g {
            // The Hopper kernel: 128-row CTAs, so with G > 1 the plan blocks must be 128 rows.
            let hopper = maps.is_some() && (g == 1 || cfg.block_rows == HOPPER_ROWS);
            // G = 1 never reads the plan, so its tile height is free: 128-row
            // tiles are faster (measured on the H100) except for short queries.
            let tile_rows = if hopper {
                HOPPER_ROWS
            } else if g == 1 {
                if p.q_len <= 64 {
                    64
                } else {
                    128
                }
            } else {
                cfg.block_rows
            };
            let num_blocks = p.q_len.div_ceil(tile_rows);
            params.num_blocks = num_blocks as i32;
            let (f, threads) = if hopper {
                let name = format!("da_hfwd_{dtype}_d{d}_g{g}");
                (self.loaded.function(hopper_module, &name, true)?, HOPPER_THREADS)
            } else {
                let name = format!("da_fwd_{dtype}_d{d}_g{g}_l{tile_rows}");
                (self.loaded.function(module, &name, true)?, THREADS)
            };
            let identity = heads.len() == p.q_heads && p.q_heads <= GRID_YZ_MAX;
            let chunks: Vec<&[usize]> =
                if identity { vec![&heads[..]] } else { heads.chunks(HEAD_MAP_MAX).collect() };
            for chunk in chunks {
                if identity {
                    params.head_map_len = 0;
                } else {
                    for (slot, &h) in params.head_map.iter_mut().zip(chunk) {
                        *slot = u16::try_from(h).map_err(|_| distr_attention_core::Error::SizeOverflow {
                            operand: Operand::GroupSizes,
                        })?;
                    }
                    params.head_map_len = chunk.len() as i32;
                }
                let mut b0 = 0;
                while b0 < p.batch {
                    let nb = (p.batch - b0).min(GRID_YZ_MAX);
                    params.batch_offset = b0 as i32;
                    let grid = (num_blocks as u32, chunk.len() as u32, nb as u32);
                    match maps.as_ref().filter(|_| hopper) {
                        Some(m) => {
                            let mut args = [
                                &params as *const FwdParams as *mut c_void,
                                m as *const HTmaMaps as *mut c_void,
                            ];
                            self.launch_args(f, grid, threads, f.smem, &mut args, stream)?
                        }
                        None => self.launch(f, grid, threads, f.smem, &params, stream)?,
                    }
                    b0 += nb;
                }
            }
        }
        Ok(())
    }

    /// [`Engine::plan_raw`] over cust buffers.
    ///
    /// Lengths and layouts are checked before the launch, so the kernel stays
    /// inside the buffers. The launch is asynchronous: keep the buffers alive
    /// until `stream` has run it (synchronise before dropping them).
    pub fn plan<T: GpuElement>(
        &self,
        cfg: &Config<'_>,
        q: &GpuTensor<'_, T>,
        plan: &mut DeviceSlice<u16>,
        stream: &Stream,
    ) -> Result<PlanShape> {
        let q = raw_tensor(q.data, q.layout, T::DTYPE);
        let out = RawBuffer { ptr: plan.as_device_ptr().as_raw(), len: plan.len() };
        // SAFETY: cust slices are live device allocations of at least `len`
        // elements, created in the current context; the stream is a cust stream.
        unsafe { self.plan_raw(cfg, &q, &out, stream.as_inner()) }
    }

    /// [`Engine::attention_raw`] over cust buffers (same checks and
    /// asynchrony as [`Engine::plan`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention<T: GpuElement, O: GpuOutput>(
        &self,
        cfg: &Config<'_>,
        plan: Option<&GpuPlan<'_>>,
        q: &GpuTensor<'_, T>,
        k: &GpuTensor<'_, T>,
        v: &GpuTensor<'_, T>,
        out: &mut GpuTensorMut<'_, O>,
        lse: Option<&mut DeviceSlice<f32>>,
        stream: &Stream,
    ) -> Result<()> {
        let plan =
            plan.map(|p| RawPlan { ptr: p.data.as_device_ptr().as_raw(), len: p.data.len(), shape: p.shape });
        let lse = lse.map(|l| RawBuffer { ptr: l.as_device_ptr().as_raw(), len: l.len() });
        let (q, k, v) = (
            raw_tensor(q.data, q.layout, T::DTYPE),
            raw_tensor(k.data, k.layout, T::DTYPE),
            raw_tensor(v.data, v.layout, T::DTYPE),
        );
        let o = raw_tensor(out.data, out.layout, O::DTYPE);
        // SAFETY: as in `plan`; `out` is borrowed mutably, so it overlaps no input.
        unsafe { self.attention_raw(cfg, plan.as_ref(), &q, &k, &v, &o, lse.as_ref(), stream.as_inner()) }
    }

    /// Plan and attention in one call: computes the plan of `q` into `plan`
    /// (see [`Engine::plan_with_keys`]: any grouping mode) and attends with
    /// it. Returns the plan's shape.
    #[allow(clippy::too_many_arguments)]
    pub fn distr_attention<T: GpuElement, O: GpuOutput>(
        &self,
        cfg: &Config<'_>,
        plan: &mut DeviceSlice<u16>,
        q: &GpuTensor<'_, T>,
        k: &GpuTensor<'_, T>,
        v: &GpuTensor<'_, T>,
        out: &mut GpuTensorMut<'_, O>,
        lse: Option<&mut DeviceSlice<f32>>,
        stream: &Stream,
    ) -> Result<PlanShape> {
        let shape = self.plan_with_keys(cfg, q, k, plan, stream)?;
        let plan = GpuPlan::new(plan, shape);
        self.attention(cfg, Some(&plan), q, k, v, out, lse, stream)?;
        Ok(shape)
    }
}

// The driver's TMA descriptor encoder (libcuda of CUDA 12.0 on; cust 0.3's
// bindings predate it).
#[link(name = "cuda")]
extern "C" {
    fn cuTensorMapEncodeTiled(
        tensor_map: *mut TmaDesc,
        data_type: u32,
        rank: u32,
        global_address: *mut c_void,
        global_dim: *const u64,
        global_strides: *const u64,
        box_dim: *const u32,
        element_strides: *const u32,
        interleave: u32,
        swizzle: u32,
        l2_promotion: u32,
        oob_fill: u32,
    ) -> u32;
}

/// The Hopper kernel's TMA descriptor of K or V (`HTmaMaps` in
/// kernels/common.cuh): the 4-D tensor (d, n, head, batch) of 16-bit
/// elements, 64 x 64 boxes (d x n), 128-byte swizzle, zeros past the ends.
/// `None` where the driver refuses the tensor.
fn tma_desc(t: &RawTensor) -> Option<TmaDesc> {
    const UINT16: u32 = 1;
    const SWIZZLE_128B: u32 = 3;
    const L2_PROMOTION_256B: u32 = 3;
    let l = &t.layout;
    // The stride of an extent-1 dimension is never used: any valid value.
    let stride = |extent: usize, s: usize| -> Option<u64> {
        if extent <= 1 {
            Some(16)
        } else {
            u64::try_from(s.checked_mul(2)?).ok()
        }
    };
    let dims = [l.dim as u64, l.seq as u64, l.heads as u64, l.batch as u64];
    let strides =
        [stride(l.seq, l.stride_seq)?, stride(l.heads, l.stride_head)?, stride(l.batch, l.stride_batch)?];
    let boxes = [64u32, 64, 1, 1];
    let element_strides = [1u32; 4];
    let mut map = TmaDesc([0; 16]);
    // SAFETY: the pointers address live local arrays of the lengths the
    // driver reads for rank 4; the global address is only recorded.
    let status = unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            UINT16,
            4,
            t.ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            0,
            SWIZZLE_128B,
            L2_PROMOTION_256B,
            0,
        )
    };
    (status == 0).then_some(map)
}

pub(crate) fn raw_tensor<T: cust::memory::DeviceCopy>(
    data: &DeviceSlice<T>,
    layout: distr_attention_core::Layout,
    dtype: DType,
) -> RawTensor {
    RawTensor { ptr: data.as_device_ptr().as_raw(), len: data.len(), layout, dtype }
}
