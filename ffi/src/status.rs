//! The one result type of the C ABI and its messages.

use core::ffi::{c_char, CStr};

use distr_attention_core::Error;

/// The result of every fallible function of the library.
///
/// `DA_STATUS_OK` is 0; every other value is an error, and the calling thread's
/// last-error message (`da_last_error_message`) then says what was wrong, naming
/// the offending argument. Values may be added in later versions: treat any
/// unknown nonzero value as an error.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum da_status {
    /// Success.
    Ok = 0,
    /// A required pointer argument (handle, descriptor, data or output pointer) is NULL.
    NullPointer = 1,
    /// A data pointer is not aligned to its element type (4 bytes for f32, 2 for f16,
    /// bf16 and plan entries).
    MisalignedPointer = 2,
    /// An argument has a value no class below covers: an unknown dtype, fusion,
    /// grouping or planner target value, a planner target out of its range, no
    /// calibration sample, a string that is not UTF-8, a layer found in several
    /// files of a table when no file was named, a config whose `struct_size`
    /// is too small, or (CUDA entry points) a pointer that is not memory CUDA
    /// knows, memory of another device, or a stream of another CUDA context.
    InvalidArgument = 3,
    /// The config is invalid: `block_rows` 0, `num_projections` outside 1..=32, a
    /// negative or infinite scale, a group size that is 0 or does not divide the head
    /// dimension, or per-head group sizes whose count is not the number of query heads.
    BadConfig = 4,
    /// A tensor has a zero-sized dimension, or a head dimension above 65536.
    InvalidShape = 5,
    /// Tensors disagree on a dimension (batch, key count, head dimension, KV heads,
    /// the output's shape), or the query heads are not a multiple of the KV heads.
    ShapeMismatch = 6,
    /// A size or an address computed from shapes and strides overflows.
    SizeOverflow = 7,
    /// A caller buffer (plan, lse, projections) is shorter than needed, or (CUDA
    /// entry points) a tensor's extent runs past the end of its CUDA allocation.
    BufferTooSmall = 8,
    /// A buffer the call writes overlaps another buffer of the call, or the output's
    /// strides make two of its elements share memory.
    OverlappingBuffers = 9,
    /// Q, K or V holds a NaN or an infinity.
    NonFinite = 10,
    /// A plan passed in is not a permutation of the head-dimension columns in every block.
    BadPlan = 11,
    /// A combination this build does not support: an output dtype other than f32
    /// (CUDA: f32 or Q's dtype), K or V of a dtype other than Q's (or calibration
    /// samples of different dtypes), a grouping mode the function cannot use
    /// (key-weighted plans need the keys: `da_plan_with_keys`; the GPU plans LSH
    /// only), a group size the grouping mode does not support (similarity modes
    /// need powers of two), a config field of a newer header (bytes past the
    /// known end of `da_config` that are not zero), or what the CUDA kernels do
    /// not cover (f32 inputs, head dimensions other than 32, 64 and 128,
    /// `block_rows` other than 64 and 128, G outside 1, 2, 4, 8, a device older
    /// than compute capability 8.0).
    Unsupported = 12,
    /// Scratch memory could not be allocated.
    AllocationFailed = 13,
    /// The library panicked (a bug); the panic was caught at the boundary. The
    /// context stays usable.
    Panic = 14,
    /// A file could not be read (the message has the system's reason).
    IoError = 15,
    /// A group-size table is not valid JSON or not in the format the planner
    /// writes (`examples/plan_heads.rs`), or its entry for the layer is invalid
    /// (a group size that is not a positive 32-bit integer, per-head records that
    /// disagree with the sizes).
    BadTable = 16,
    /// A group-size table has no entry for the requested layer (or file).
    NotFound = 17,
    /// A CUDA driver call of a `da_cuda_*` function failed: the message names the
    /// call and the driver's error (e.g. "cuInit failed: CUDA_ERROR_NO_DEVICE
    /// (100)"), or says that no CUDA context, or not the handle's, is current on the
    /// calling thread.
    CudaError = 18,
    /// A `da_cuda_*` function was called on a library built without CUDA (cargo
    /// feature `cuda` of distr-attention-ffi). `da_cuda_built` tells in advance.
    CudaUnavailable = 19,
}

/// Every status, in numeric order.
pub(crate) const ALL_STATUSES: [da_status; 20] = [
    da_status::Ok,
    da_status::NullPointer,
    da_status::MisalignedPointer,
    da_status::InvalidArgument,
    da_status::BadConfig,
    da_status::InvalidShape,
    da_status::ShapeMismatch,
    da_status::SizeOverflow,
    da_status::BufferTooSmall,
    da_status::OverlappingBuffers,
    da_status::NonFinite,
    da_status::BadPlan,
    da_status::Unsupported,
    da_status::AllocationFailed,
    da_status::Panic,
    da_status::IoError,
    da_status::BadTable,
    da_status::NotFound,
    da_status::CudaError,
    da_status::CudaUnavailable,
];

impl da_status {
    /// The status a core error maps to.
    pub(crate) fn of_error(e: &Error) -> da_status {
        match e {
            Error::InvalidBlockRows { .. }
            | Error::InvalidNumProjections { .. }
            | Error::InvalidScale { .. }
            | Error::InvalidGroupSize { .. }
            | Error::GroupSizesLength { .. } => da_status::BadConfig,
            Error::EmptyDimension { .. } | Error::HeadDimTooLarge { .. } => da_status::InvalidShape,
            Error::ShapeMismatch { .. } | Error::HeadsNotDivisible { .. } => da_status::ShapeMismatch,
            Error::SizeOverflow { .. } => da_status::SizeOverflow,
            Error::BufferTooSmall { .. } => da_status::BufferTooSmall,
            Error::OverlappingOutput { .. } => da_status::OverlappingBuffers,
            Error::NonFinite { .. } => da_status::NonFinite,
            Error::AllocationFailed { .. } => da_status::AllocationFailed,
            Error::NotAPermutation { .. } => da_status::BadPlan,
            Error::UnsupportedDtype { .. }
            | Error::UnsupportedHeadDim { .. }
            | Error::UnsupportedBlockRows { .. }
            | Error::UnsupportedGroupSize { .. }
            | Error::GroupingUnavailable { .. } => da_status::Unsupported,
            Error::InvalidTarget { .. } => da_status::InvalidArgument,
            // Every variant of this core version is listed above. The enum is
            // non-exhaustive, so a variant added later still needs an arm: it is
            // reported as an invalid argument, with its own message.
            _ => da_status::InvalidArgument,
        }
    }

    fn description(self) -> &'static CStr {
        match self {
            da_status::Ok => c"success",
            da_status::NullPointer => c"a required pointer is NULL",
            da_status::MisalignedPointer => c"a pointer is not aligned to its element type",
            da_status::InvalidArgument => c"invalid argument",
            da_status::BadConfig => c"invalid configuration",
            da_status::InvalidShape => c"invalid tensor shape",
            da_status::ShapeMismatch => c"tensor shapes do not match",
            da_status::SizeOverflow => c"a size or address overflows",
            da_status::BufferTooSmall => c"a buffer is too small",
            da_status::OverlappingBuffers => c"an output buffer overlaps another buffer",
            da_status::NonFinite => c"an input holds NaN or infinity",
            da_status::BadPlan => c"the plan is not a permutation in every block",
            da_status::Unsupported => c"unsupported combination of arguments",
            da_status::AllocationFailed => c"memory allocation failed",
            da_status::Panic => c"internal error: the library panicked",
            da_status::IoError => c"a file could not be read",
            da_status::BadTable => c"the group-size table is malformed",
            da_status::NotFound => c"not found in the group-size table",
            da_status::CudaError => c"a CUDA call failed",
            da_status::CudaUnavailable => c"this library was built without CUDA",
        }
    }
}

/// A static, human-readable description of a status code (the class, not the
/// details: those are in `da_last_error_message`).
///
/// Any value is accepted; unknown values give "unknown status". The returned
/// string is never NULL, is NUL-terminated, lives for the whole program and
/// must not be freed.
#[no_mangle]
pub extern "C" fn da_status_string(status: u32) -> *const c_char {
    crate::error::boundary_or(c"unknown status".as_ptr(), || {
        ALL_STATUSES.get(status as usize).map_or(c"unknown status", |s| s.description()).as_ptr()
    })
}
