//! Kernel parameter blocks, `#[repr(C)]` mirrors of `PlanParams`,
//! `FwdParams` and `HTmaMaps` in `kernels/common.cuh` (keep both in sync;
//! the sizes are asserted on both sides).

/// Query heads one attention launch can address through `head_map`
/// (`DA_HEAD_MAP_MAX`).
pub(crate) const HEAD_MAP_MAX: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PlanParams {
    pub q: u64,
    pub plan: u64,
    pub proj: u64,
    pub q_batch_stride: i64,
    pub q_row_stride: i64,
    pub q_head_stride: i64,
    pub q_len: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub block_rows: i32,
    pub num_proj: i32,
    pub num_blocks: i32,
    /// Unused by the plan kernel (its grid is persistent); kept for the layout.
    pub batch_offset: i32,
    pub batch: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub plan: u64,
    pub q_batch_stride: i64,
    pub q_row_stride: i64,
    pub q_head_stride: i64,
    pub k_batch_stride: i64,
    pub k_row_stride: i64,
    pub k_head_stride: i64,
    pub v_batch_stride: i64,
    pub v_row_stride: i64,
    pub v_head_stride: i64,
    pub o_batch_stride: i64,
    pub o_row_stride: i64,
    pub o_head_stride: i64,
    pub q_len: i32,
    pub kv_len: i32,
    pub q_heads: i32,
    pub heads_per_kv: i32,
    pub num_blocks: i32,
    pub batch_offset: i32,
    pub scale_log2: f32,
    pub causal: i32,
    pub sample: i32,
    pub out_f32: i32,
    pub head_map_len: i32,
    pub head_map: [u16; HEAD_MAP_MAX],
}

/// A CUDA tensor map (`CUtensorMap`: 128 opaque bytes, 64-byte aligned),
/// written by the driver's `cuTensorMapEncodeTiled`.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct TmaDesc(pub [u64; 16]);

/// The Hopper kernel's second parameter: the TMA descriptors of K and V.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct HTmaMaps {
    pub k: TmaDesc,
    pub v: TmaDesc,
}

const _: () = assert!(std::mem::size_of::<PlanParams>() == 80);
const _: () = assert!(std::mem::size_of::<HTmaMaps>() == 256);
const _: () = assert!(std::mem::size_of::<FwdParams>() == 704);
