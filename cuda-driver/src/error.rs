//! The error type of the CUDA backend: argument errors exactly as the core
//! reports them, the few conditions only a device path has, and failed CUDA
//! calls named by the call.

use std::fmt;

use cust::sys as cu;
use distr_attention_core::{Error as CoreError, Operand};

/// Everything that can go wrong in this crate.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// Invalid arguments, reported with the same typed error the CPU core
    /// gives for the same shapes and config (including the backend variants
    /// `UnsupportedDtype`, `UnsupportedHeadDim`, `UnsupportedBlockRows`,
    /// `UnsupportedGroupSize`).
    Core(CoreError),
    /// A device address or stride breaks the kernels' alignment rules
    /// (see the crate documentation).
    Misaligned { operand: Operand, what: &'static str },
    /// Some head has G > 1 but no plan was given.
    MissingPlan,
    /// The device is older than compute capability 8.0.
    UnsupportedDevice { major: i32, minor: i32 },
    /// A CUDA driver call failed: the call, the driver's result code and its name.
    Cuda { call: &'static str, code: u32, name: String },
}

impl Error {
    pub(crate) fn cuda(call: &'static str, code: cu::CUresult) -> Error {
        // The bindings' Debug form is the driver's name, e.g. CUDA_ERROR_INVALID_VALUE.
        Error::Cuda { call, code: code as u32, name: format!("{code:?}") }
    }
}

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        Error::Core(e)
    }
}

impl From<cust::error::CudaError> for Error {
    fn from(e: cust::error::CudaError) -> Self {
        Error::Cuda { call: "cust", code: e as u32, name: format!("{e:?}") }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Core(e) => e.fmt(f),
            Error::Misaligned { operand, what } => write!(f, "{}: {what}", operand.name()),
            Error::MissingPlan => f.write_str("plan: some head has group size > 1 but no plan was given"),
            Error::UnsupportedDevice { major, minor } => {
                write!(f, "compute capability {major}.{minor} is not supported (8.0 or newer needed)")
            }
            Error::Cuda { call, code, name } => write!(f, "{call} failed: {name} ({code})"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs a raw driver call and names it in the error.
macro_rules! check {
    ($call:ident ( $($arg:expr),* $(,)? )) => {{
        let r = cust::sys::$call($($arg),*);
        if r != cust::sys::CUresult::CUDA_SUCCESS {
            return Err($crate::error::Error::cuda(stringify!($call), r));
        }
    }};
}
pub(crate) use check;
