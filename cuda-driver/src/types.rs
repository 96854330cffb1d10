//! Element types and tensor views of the safe API over cust buffers.
//!
//! cust 0.3 implements `DeviceCopy` for `half` 1.x only, while the project
//! uses `half` 2.x, so the device element types are `#[repr(transparent)]`
//! wrappers ([`F16`], [`Bf16`]) with free conversions of whole slices.

use cust::memory::{DeviceCopy, DeviceSlice};
use distr_attention_core::{DType, Layout, PlanShape};

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::F16 {}
    impl Sealed for super::Bf16 {}
    impl Sealed for f32 {}
}

/// An f16 element in device memory.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct F16(pub half::f16);

/// A bf16 element in device memory.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bf16(pub half::bf16);

// SAFETY: plain 2-byte values without pointers or padding.
unsafe impl DeviceCopy for F16 {}
// SAFETY: as above.
unsafe impl DeviceCopy for Bf16 {}

/// An input element type of the kernels (Q, K, V).
pub trait GpuElement: DeviceCopy + sealed::Sealed {
    const DTYPE: DType;
    /// The `half` type it wraps.
    type Host: Copy;
    /// Views host values as device elements (same bits, no copy).
    fn from_host(s: &[Self::Host]) -> &[Self];
    /// Views device elements copied back to the host as `half` values.
    fn to_host(s: &[Self]) -> &[Self::Host];
}

macro_rules! gpu_element {
    ($t:ty, $host:ty, $dtype:expr) => {
        impl GpuElement for $t {
            const DTYPE: DType = $dtype;
            type Host = $host;
            fn from_host(s: &[$host]) -> &[$t] {
                // SAFETY: `$t` is `#[repr(transparent)]` over `$host`.
                unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
            }
            fn to_host(s: &[$t]) -> &[$host] {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
            }
        }
    };
}
gpu_element!(F16, half::f16, DType::F16);
gpu_element!(Bf16, half::bf16, DType::BF16);

/// An output element type: f32, or the input type.
pub trait GpuOutput: DeviceCopy + sealed::Sealed {
    const DTYPE: DType;
}
impl GpuOutput for f32 {
    const DTYPE: DType = DType::F32;
}
impl GpuOutput for F16 {
    const DTYPE: DType = DType::F16;
}
impl GpuOutput for Bf16 {
    const DTYPE: DType = DType::BF16;
}

/// A read-only device tensor: a cust buffer (or slice of one) and its layout.
#[derive(Clone, Copy, Debug)]
pub struct GpuTensor<'a, T: DeviceCopy> {
    pub data: &'a DeviceSlice<T>,
    pub layout: Layout,
}

impl<'a, T: DeviceCopy> GpuTensor<'a, T> {
    pub fn new(data: &'a DeviceSlice<T>, layout: Layout) -> Self {
        GpuTensor { data, layout }
    }
}

/// A writable device tensor.
#[derive(Debug)]
pub struct GpuTensorMut<'a, T: DeviceCopy> {
    pub data: &'a mut DeviceSlice<T>,
    pub layout: Layout,
}

impl<'a, T: DeviceCopy> GpuTensorMut<'a, T> {
    pub fn new(data: &'a mut DeviceSlice<T>, layout: Layout) -> Self {
        GpuTensorMut { data, layout }
    }
}

/// A plan in device memory with its shape.
#[derive(Clone, Copy, Debug)]
pub struct GpuPlan<'a> {
    pub data: &'a DeviceSlice<u16>,
    pub shape: PlanShape,
}

impl<'a> GpuPlan<'a> {
    pub fn new(data: &'a DeviceSlice<u16>, shape: PlanShape) -> Self {
        GpuPlan { data, shape }
    }
}
