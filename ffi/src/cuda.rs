//! The CUDA entry points: plan, attention on a plan, exact attention, the
//! one-shot forward pass and the backward passes on device memory, launched
//! on the caller's stream, through the CUDA backend (`distr-attention-cuda`).
//!
//! The functions exist in every build, so that there is one header and one
//! symbol list: a library built without the `cuda` feature answers every
//! `da_cuda_*` call with `DA_STATUS_CUDA_UNAVAILABLE` ("built without CUDA"),
//! and `da_cuda_built` returns 0.
//!
//! Order of the checks of a call (with the feature): the handle; then every
//! argument, arithmetically, without a CUDA call (config, descriptors, shapes,
//! buffer lengths, what the kernels support, alignment, overlaps:
//! [`imp::check_call`], which the fuzz harness drives on its own); then what
//! needs the driver (the handle's context is current, the stream belongs to
//! it, every pointer is memory CUDA knows, on this device, with the extent
//! inside its allocation). Only then is anything launched, so a failed check
//! never touches device memory.

use core::ffi::c_void;

use crate::error::{boundary, boundary_or};
use crate::status::da_status;
use crate::types::{da_config, da_tensor};

#[cfg(feature = "cuda")]
pub(crate) mod imp;

#[cfg(not(feature = "cuda"))]
#[path = "cuda/stub.rs"]
pub(crate) mod imp;

/// An opaque handle of the CUDA backend, bound to the CUDA context that was
/// current on the calling thread when it was created (with the runtime API:
/// the device's primary context, current after `cudaSetDevice` or any runtime
/// call). It holds the loaded kernel modules (loaded once per CUDA context and
/// shared by the handles of that context) and the LSH projection matrices it
/// uploaded.
///
/// Create it with `da_cuda_context_create` and destroy it with
/// `da_cuda_context_destroy`. Every call needs the handle's context current on
/// the calling thread. A handle may be used by one thread at a time; different
/// handles may be used concurrently.
#[derive(Debug)]
pub struct da_cuda_context {
    #[cfg(feature = "cuda")]
    pub(crate) state: imp::State,
    #[cfg(not(feature = "cuda"))]
    _never: core::convert::Infallible,
}

/// Which `da_cuda_*` computation a call asks for, with its plan argument.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the stub reads no argument
pub(crate) enum Mode {
    /// `da_cuda_plan`: the caller's output buffer.
    Plan(*mut u16, usize),
    /// `da_cuda_attention`: the caller's plan (may be NULL when every head has G = 1).
    Attention(*const u16, usize),
    /// `da_cuda_exact_attention`.
    Exact,
    /// `da_cuda_forward`: NULL, or a buffer that receives the plan.
    Forward(*mut u16, usize),
}

/// The arguments of a `da_cuda_*_backward` call.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the stub reads no argument
pub(crate) struct Backward {
    /// `da_cuda_attention_backward`'s plan and its length (the pointer may be
    /// NULL when every head has G = 1); `None` for the exact backward.
    pub(crate) plan: Option<(*const u16, usize)>,
    /// Q, K, V, the forward's output O and the output gradient dO.
    pub(crate) inputs: [*const da_tensor; 5],
    pub(crate) lse: *const f32,
    pub(crate) lse_len: usize,
    /// dQ, dK, dV.
    pub(crate) grads: [*const da_tensor; 3],
    /// The caller's workspace (NULL: stream-ordered) and its size in bytes.
    pub(crate) workspace: *mut c_void,
    pub(crate) workspace_size: usize,
}

/// 1 when this library was built with the CUDA entry points (cargo feature
/// `cuda`), 0 when every `da_cuda_*` function returns
/// `DA_STATUS_CUDA_UNAVAILABLE`. Says nothing about the presence of a GPU:
/// `da_cuda_context_create` finds that out.
#[no_mangle]
pub extern "C" fn da_cuda_built() -> u32 {
    u32::from(cfg!(feature = "cuda"))
}

/// Creates a CUDA handle for the CUDA context current on the calling thread
/// and stores it in `*out`. Initialises the driver API (`cuInit`) if needed.
/// Fails with `DA_STATUS_CUDA_ERROR` when the driver cannot start (no device:
/// "cuInit failed: CUDA_ERROR_NO_DEVICE") or no context is current, and with
/// `DA_STATUS_UNSUPPORTED` on a device older than compute capability 8.0.
/// Kernel modules are loaded on first use.
///
/// On failure `*out` is set to NULL (when `out` itself is not NULL).
///
/// # Safety
/// `out` must be NULL (`DA_STATUS_NULL_POINTER`) or point to writable storage
/// for one pointer.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_context_create(out: *mut *mut da_cuda_context) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe { imp::create(out) })
}

/// Destroys a CUDA handle. It first waits for the work of its CUDA context to
/// finish (`cuCtxSynchronize`, with the context made current for the
/// duration), because kernels launched through the handle read device memory
/// the handle owns (the LSH projections). `da_cuda_context_destroy(NULL)`
/// does nothing.
///
/// # Safety
/// `ctx` must be NULL or a handle from `da_cuda_context_create` that has not
/// been destroyed and is not in use by another thread. The handle is invalid
/// afterwards.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_context_destroy(ctx: *mut da_cuda_context) {
    // SAFETY: forwarded contract.
    boundary_or((), || unsafe { imp::destroy(ctx) })
}

/// Computes the plan of `q` on the GPU into `plan`, asynchronously on
/// `stream`: `uint16_t` entries in device memory, laid out as `da_plan`'s
/// (`da_get_plan_shape` gives the count). An LSH plan equals the CPU's
/// (`da_plan`) except where a projection's dot product is within rounding of
/// zero (the GPU accumulates in f32); a similarity plan
/// (`DA_GROUPING_SIMILARITY`) equals the CPU's except in blocks where one of
/// the grouping's decisions is a near-tie (the GPU decides in f32, the CPU in
/// f64).
///
/// * `q`: a `da_tensor` whose `data` is device memory, f16 or bf16, `head_dim`
///   in {16, 32, 64, 128} for LSH, {32, 64, 128} for similarity, 8-byte
///   aligned with strides multiples of 4.
/// * `config`: host memory; `block_rows` at most 128; LSH or similarity
///   grouping (key-weighted grouping needs the keys: `da_cuda_forward` plans
///   it on the GPU, or plan it on the CPU with `da_plan_with_keys` and upload
///   it); for similarity every head's G in {1, 2, 4, 8}.
/// * `plan`: device memory, `plan_len >= num_entries` entries, 2-byte aligned;
///   must not overlap Q.
/// * `stream`: a `CUstream` / `cudaStream_t` of the handle's context, or NULL
///   for the default stream (the legacy stream).
///
/// Returns once the kernel is queued; its errors surface at the caller's next
/// synchronisation. The buffers must stay allocated until the stream has run
/// it.
///
/// # Safety
/// `ctx` NULL or a live handle not used concurrently; `config` and `q` NULL
/// or readable host structs; `q->data` and `plan` device memory covering the
/// extents their shapes and lengths describe (checked against their CUDA
/// allocations where the driver knows them); `stream` NULL or a live stream.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_plan(
    ctx: *mut da_cuda_context,
    config: *const da_config,
    q: *const da_tensor,
    plan: *mut u16,
    plan_len: usize,
    stream: *mut c_void,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe {
        imp::call(
            ctx,
            config,
            Mode::Plan(plan, plan_len),
            [q, core::ptr::null(), core::ptr::null(), core::ptr::null()],
            core::ptr::null_mut(),
            0,
            stream,
        )
    })
}

/// DistrAttention on a plan on the GPU, asynchronously on `stream`.
///
/// * `q`: `[batch, q_len, q_heads, head_dim]`, `k`: `[batch, kv_len,
///   kv_heads, head_dim]`, `v`: `[batch, kv_len, kv_heads, head_dim]` in
///   device memory, f16 or bf16 (all the same), `head_dim` in {32, 64, 128},
///   16-byte aligned with strides multiples of 8 elements; `q_heads` a
///   multiple of `kv_heads`. They may share memory (a packed QKV buffer). Not
///   checked for NaN or infinity (they propagate to the output).
/// * `out`: `[batch, q_len, q_heads, head_dim]` in device memory, of dtype f32
///   or Q's dtype (the caller's choice), aligned to two elements with even
///   strides, elements not sharing memory; written.
/// * `lse`: NULL, or `lse_len >= batch * q_heads * q_len` floats of device
///   memory that receive the natural-log row log-sum-exp, dense `[batch,
///   q_heads, q_len]` (-infinity, with output 0, for a row that sees no key).
/// * `plan`: device memory, `plan_len >= num_entries` entries (from
///   `da_cuda_plan`, or a CPU plan uploaded); NULL when every head has G = 1.
///   Entries are clamped to `head_dim - 1` on the device: a corrupt plan gives
///   wrong numbers, never an out-of-bounds access.
/// * `config`: as for `da_attention`, with `block_rows` 64 or 128 and every
///   head's G in {1, 2, 4, 8}.
/// * `stream`: as for `da_cuda_plan`.
///
/// The buffers written (`out`, `lse`) must not overlap each other nor any
/// input. Asynchrony as for `da_cuda_plan`. A failed check launches nothing;
/// a CUDA error while launching (`DA_STATUS_CUDA_ERROR`) may leave kernels
/// already queued.
///
/// # Safety
/// As for `da_cuda_plan`, for every pointer of the call.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_attention(
    ctx: *mut da_cuda_context,
    config: *const da_config,
    plan: *const u16,
    plan_len: usize,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    out: *const da_tensor,
    lse: *mut f32,
    lse_len: usize,
    stream: *mut c_void,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe {
        imp::call(ctx, config, Mode::Attention(plan, plan_len), [q, k, v, out], lse, lse_len, stream)
    })
}

/// Exact attention (every head G = 1, no plan) on the GPU, with the arguments
/// of `da_cuda_attention` less the plan. The config's group sizes and
/// `block_rows` are validated (as by the core) but do not change the result;
/// `causal` and `scale` apply.
///
/// # Safety
/// As for `da_cuda_attention`.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_exact_attention(
    ctx: *mut da_cuda_context,
    config: *const da_config,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    out: *const da_tensor,
    lse: *mut f32,
    lse_len: usize,
    stream: *mut c_void,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe { imp::call(ctx, config, Mode::Exact, [q, k, v, out], lse, lse_len, stream) })
}

/// One-shot DistrAttention on the GPU: the plan of Q (as `da_cuda_plan`; for
/// `DA_GROUPING_KEY_WEIGHTED` from Q and K, as `da_plan_with_keys` on the CPU),
/// then attention with it (as `da_cuda_attention`), both on `stream`.
/// Arguments as for `da_cuda_attention`, except the plan:
///
/// * `plan_out`: NULL, or `plan_len >= num_entries` entries of device memory
///   that receive the plan (e.g. to replay it on the CPU); it must not overlap
///   any other buffer. With NULL, the plan lives in a workspace allocated and
///   freed in stream order (`cuMemAllocAsync` / `cuMemFreeAsync`) on `stream`;
///   when additionally every head has G = 1 no plan is computed at all.
///
/// All arguments of both steps are checked before the first launch.
///
/// # Safety
/// As for `da_cuda_attention`; `plan_out` NULL or device memory of `plan_len`
/// entries.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_forward(
    ctx: *mut da_cuda_context,
    config: *const da_config,
    q: *const da_tensor,
    k: *const da_tensor,
    v: *const da_tensor,
    out: *const da_tensor,
    lse: *mut f32,
    lse_len: usize,
    plan_out: *mut u16,
    plan_len: usize,
    stream: *mut c_void,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe {
        imp::call(ctx, config, Mode::Forward(plan_out, plan_len), [q, k, v, out], lse, lse_len, stream)
    })
}

/// The workspace size in bytes that `da_cuda_attention_backward` needs for
/// `config` and the shapes of `q` and `d_out` (only their shapes and dtypes
/// are read: the data pointers are ignored and may be NULL), stored in
/// `*size`. Pure arithmetic: no handle, no CUDA call, callable before any
/// allocation (like cuDNN's workspace queries). With `R = batch * q_heads *
/// q_len` rows and `d = head_dim` it is about `4 * R * (d + 1)` bytes (f32
/// dQ̂ accumulators and row sums), plus `4 * R * d` when some head has G > 1
/// (Q̂ and Q̃ in the inputs' type), plus `2 * R * d` when `d_out` is f32 (its
/// copy in the inputs' type).
///
/// For `da_cuda_exact_attention_backward` query with a config whose group
/// sizes are all 1 (`group_size = 1`): its workspace is smaller; any larger
/// workspace works as well.
///
/// # Safety
/// `config`, `q` and `d_out` NULL or readable host structs (the config's
/// `group_sizes` too); `size` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_backward_workspace_size(
    config: *const da_config,
    q: *const da_tensor,
    d_out: *const da_tensor,
    size: *mut usize,
) -> da_status {
    // SAFETY: forwarded contract.
    boundary(|| unsafe { imp::workspace_size(config, q, d_out, size) })
}

/// Gradients of DistrAttention on a plan with respect to Q, K and V on the
/// GPU (`dQ`, `dK`, `dV`), asynchronously on `stream`: the function of the
/// CPU's `da_attention_backward`, with f16/bf16 inputs and f32 accumulation
/// (no `q_len x kv_len` buffer; P is recomputed from Q̂, K̂ and the LSE).
///
/// * `q`, `k`, `v`, `config`, `plan`: those of the forward pass
///   (`da_cuda_forward`'s `plan_out` or `da_cuda_plan`; a CPU plan uploaded
///   works too), with the requirements of `da_cuda_attention`. `plan` may be
///   NULL when every head has G = 1.
/// * `o`: the forward's output (`[batch, q_len, q_heads, head_dim]`, f32 or
///   the inputs' type); `lse`: its log-sum-exp (`lse_len >= batch * q_heads *
///   q_len` floats, dense `[batch, q_heads, q_len]`, as `da_cuda_forward`
///   writes it; not NULL). Both from the forward on the same inputs and plan.
///   Keep O in f32 for training: `Delta = rowsum(dO * O)` inherits O's
///   rounding, and with a bf16 O the error of dQ can be large on peaked rows.
/// * `d_out`: the gradient of the loss with respect to O, shaped like it,
///   f32 or the inputs' type.
/// * `dq`, `dk`, `dv`: shaped like Q, K and V, f32 or the inputs' type (each
///   its own choice), elements not sharing memory; overwritten. dQ sums f32
///   atomic adds in a varying order, so it is not bit-reproducible between
///   runs (as in FlashAttention-2); dK and dV are.
/// * `workspace`: `workspace_size` bytes of device memory, at least what
///   `da_cuda_backward_workspace_size` says, 16-byte aligned, contents
///   irrelevant; used only until the queued kernels finish, so a caller may
///   reuse it for the next call on the same stream. NULL: the library
///   allocates it on `stream` with `cuMemAllocAsync` and frees it after the
///   kernels with `cuMemFreeAsync` (the device's default memory pool).
///   Engines with their own allocator pass theirs; the handle caches nothing.
/// * `stream`: as for `da_cuda_plan` (NULL: the legacy default stream).
///
/// Alignment as for `da_cuda_attention`: Q, K, V and a `d_out` of the inputs'
/// type 16-byte aligned with strides multiples of 8 elements; O, an f32
/// `d_out` and the gradients aligned to two elements with even strides; LSE
/// and the plan 4-byte aligned. The buffers written (`dq`, `dk`, `dv` and the
/// workspace) must not overlap each other nor any input; inputs may overlap.
/// Every argument is checked before the first launch (including that each
/// pointer is memory CUDA knows on the handle's device, with its extent
/// inside its allocation); a failed check launches nothing. Asynchrony as for
/// `da_cuda_plan`.
///
/// # Safety
/// As for `da_cuda_attention`, for every pointer of the call.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_attention_backward(
    ctx: *mut da_cuda_context,
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
    workspace: *mut c_void,
    workspace_size: usize,
    stream: *mut c_void,
) -> da_status {
    let args = Backward {
        plan: Some((plan, plan_len)),
        inputs: [q, k, v, o, d_out],
        lse,
        lse_len,
        grads: [dq, dk, dv],
        workspace,
        workspace_size,
    };
    // SAFETY: forwarded contract.
    boundary(|| unsafe { imp::backward(ctx, config, &args, stream) })
}

/// Gradients of exact attention (every head G = 1, no plan) on the GPU: the
/// arguments and contract of `da_cuda_attention_backward` without the plan;
/// `o` and `lse` from `da_cuda_exact_attention` (or a forward with G = 1).
/// The config is validated as by `da_cuda_exact_attention`; its group sizes
/// and `block_rows` do not change the result.
///
/// # Safety
/// As for `da_cuda_attention_backward`.
#[no_mangle]
pub unsafe extern "C" fn da_cuda_exact_attention_backward(
    ctx: *mut da_cuda_context,
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
    workspace: *mut c_void,
    workspace_size: usize,
    stream: *mut c_void,
) -> da_status {
    let args = Backward {
        plan: None,
        inputs: [q, k, v, o, d_out],
        lse,
        lse_len,
        grads: [dq, dk, dv],
        workspace,
        workspace_size,
    };
    // SAFETY: forwarded contract.
    boundary(|| unsafe { imp::backward(ctx, config, &args, stream) })
}
