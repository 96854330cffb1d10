//! The opaque context: scratch memory reused across calls.

use distr_attention_core::{projections_into, Config, Error, Operand};

use crate::error::{boundary, boundary_or, Failure, FfiResult};
use crate::status::da_status;

/// An opaque handle that owns the scratch memory of the compute functions
/// (attention tiles, LSH projections, plan workspace), so that repeated calls
/// allocate nothing once the buffers have grown to the largest problem seen.
///
/// Create it with `da_context_new` and destroy it with `da_context_free`. A
/// context holds no pointer to caller memory between calls. It is not
/// thread-safe: use one context per thread, or serialise the calls that share
/// one. Different contexts may be used concurrently.
#[derive(Debug, Default)]
pub struct da_context {
    pub(crate) attention_scratch: Vec<f32>,
    pub(crate) group_sizes: Vec<usize>,
    /// The plan of `da_forward`.
    pub(crate) plan: Vec<u16>,
    pub(crate) planner: Planner,
}

/// Scratch of the planner: the projection matrix and the sort keys.
#[derive(Debug, Default)]
pub(crate) struct Planner {
    scratch: Vec<u64>,
    projections: Vec<f32>,
    /// (seed, num_projections, rows) of `projections`; R for fewer rows is a prefix.
    projections_of: Option<(u64, u32, usize)>,
}

/// `v` grown to at least `len` entries (never shrunk), as a slice of exactly `len`.
pub(crate) fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize, operand: Operand) -> FfiResult<&mut [T]> {
    if v.len() < len {
        v.try_reserve_exact(len - v.len()).map_err(|_| Error::AllocationFailed { operand, len })?;
        v.resize(len, T::default());
    }
    Ok(&mut v[..len])
}

impl Planner {
    /// The projection matrix R for `cfg` restricted to its first `rows` rows
    /// (computed once per seed and P, and reused), and `scratch_len` sort keys.
    pub(crate) fn buffers(
        &mut self,
        cfg: &Config<'_>,
        rows: usize,
        scratch_len: usize,
    ) -> FfiResult<(&[f32], &mut [u64])> {
        let p = cfg.num_projections;
        let len =
            rows.checked_mul(p as usize).ok_or(Error::SizeOverflow { operand: Operand::Projections })?;
        let fresh = matches!(self.projections_of, Some((seed, pp, have)) if seed == cfg.seed && pp == p && have >= rows);
        if !fresh {
            self.projections_of = None;
            let buf = grow(&mut self.projections, len, Operand::Projections)?;
            projections_into(&Config { block_rows: rows, ..*cfg }, buf)?;
            self.projections_of = Some((cfg.seed, p, rows));
        }
        let scratch = grow(&mut self.scratch, scratch_len, Operand::Scratch)?;
        Ok((&self.projections[..len], scratch))
    }
}

/// The context behind a caller's handle.
///
/// # Safety
/// `ctx` is NULL or a live handle from `da_context_new`, not used by another
/// thread during the call.
pub(crate) unsafe fn context<'a>(ctx: *mut da_context) -> FfiResult<&'a mut da_context> {
    // SAFETY: per the contract, a non-NULL handle is live and exclusively ours.
    unsafe { ctx.as_mut() }.ok_or_else(|| Failure::new(da_status::NullPointer, "context is NULL"))
}

/// Creates a context and stores its handle in `*out`.
///
/// On success the caller owns the context and must release it with
/// `da_context_free`. On failure `*out` is set to NULL (when `out` itself is
/// not NULL).
///
/// # Safety
/// `out` must be NULL (`DA_STATUS_NULL_POINTER`) or point to writable storage for
/// one pointer.
#[no_mangle]
pub unsafe extern "C" fn da_context_new(out: *mut *mut da_context) -> da_status {
    boundary(|| {
        if out.is_null() {
            return Err(Failure::new(da_status::NullPointer, "out is NULL"));
        }
        // SAFETY: checked non-NULL; the caller provides storage for a pointer.
        unsafe { out.write_unaligned(core::ptr::null_mut()) };
        let ctx = Box::into_raw(Box::new(da_context::default()));
        // SAFETY: as above.
        unsafe { out.write_unaligned(ctx) };
        Ok(())
    })
}

/// Destroys a context and its scratch memory. `da_context_free(NULL)` does
/// nothing.
///
/// # Safety
/// `ctx` must be NULL or a handle from `da_context_new` that has not been freed
/// and is not in use by another thread. The handle is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn da_context_free(ctx: *mut da_context) {
    boundary_or((), || {
        if !ctx.is_null() {
            // SAFETY: per the contract, `ctx` came from `Box::into_raw` in
            // `da_context_new` and is freed once.
            drop(unsafe { Box::from_raw(ctx) });
        }
    })
}
