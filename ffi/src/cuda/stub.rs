//! The `da_cuda_*` bodies of a library built without the `cuda` feature:
//! every call fails with `DA_STATUS_CUDA_UNAVAILABLE`, before any argument
//! is read (no handle can exist, so nothing else could be checked).

use core::ffi::c_void;

use super::{da_cuda_context, Backward, Mode};
use crate::error::{Failure, FfiResult};
use crate::status::da_status;
use crate::types::{da_config, da_tensor};

fn unavailable() -> Failure {
    Failure::new(
        da_status::CudaUnavailable,
        "this library was built without CUDA (build distr-attention-ffi with --features cuda); \
         use the CPU entry points",
    )
}

/// # Safety
/// `out` is NULL or writable storage for a pointer.
pub(crate) unsafe fn create(out: *mut *mut da_cuda_context) -> FfiResult {
    if !out.is_null() {
        // SAFETY: per the contract; failures leave NULL behind, as with a CUDA build.
        unsafe { out.write_unaligned(core::ptr::null_mut()) };
    }
    Err(unavailable())
}

/// No handle can have been created: only NULL reaches here.
pub(crate) unsafe fn destroy(_ctx: *mut da_cuda_context) {}

pub(crate) unsafe fn call(
    _ctx: *mut da_cuda_context,
    _config: *const da_config,
    _mode: Mode,
    _tensors: [*const da_tensor; 4],
    _lse: *mut f32,
    _lse_len: usize,
    _stream: *mut c_void,
) -> FfiResult {
    Err(unavailable())
}

pub(crate) unsafe fn workspace_size(
    _config: *const da_config,
    _q: *const da_tensor,
    _d_out: *const da_tensor,
    _size: *mut usize,
) -> FfiResult {
    Err(unavailable())
}

pub(crate) unsafe fn backward(
    _ctx: *mut da_cuda_context,
    _config: *const da_config,
    _args: &Backward,
    _stream: *mut c_void,
) -> FfiResult {
    Err(unavailable())
}
