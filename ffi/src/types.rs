//! The structs and enums of the ABI, and their validation into core types.
//!
//! Enum-valued fields are plain `uint32_t` on the Rust side: C may store any
//! integer in them, and an out-of-range value must become
//! `DA_STATUS_INVALID_ARGUMENT`, not undefined behaviour. Descriptors are read
//! with unaligned loads, so a misaligned descriptor pointer is harmless.

use core::ffi::c_void;
use core::mem::size_of;

use distr_attention_core::{Config, DType, Error, Fusion, GroupSizes, GroupingMode, Layout, Operand};

use crate::error::{Failure, FfiResult};
use crate::status::da_status;

/// Element type of a tensor (the `dtype` field of `da_tensor`). Outputs of the
/// CPU entry points are f32; those of the `da_cuda_*` entry points f32 or the
/// inputs' type.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum da_dtype {
    /// IEEE binary32; 4-byte aligned.
    F32 = 0,
    /// IEEE binary16; 2-byte aligned.
    F16 = 1,
    /// bfloat16 (the upper half of a binary32); 2-byte aligned.
    Bf16 = 2,
}

/// How the Q columns of a group are fused (the `fusion` field of `da_config`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum da_fusion {
    /// The mean of the group's columns (the paper's default).
    Mean = 0,
    /// The group's first column in plan order.
    Sample = 1,
}

/// How a plan groups the head-dimension columns of each query block (the
/// `grouping` field of `da_config`). The plan is only a permutation, so every
/// mode runs on the same attention code; the modes differ in what the plan
/// depends on and in the error they cause.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum da_grouping {
    /// The paper's angular LSH with inverse-Gray ordering (the default). The plan
    /// depends only on Q, `block_rows`, `num_projections` and `seed`; any group size.
    Lsh = 0,
    /// Exact similarity of the query block's columns (greedy merging that keeps the
    /// within-group spread small, then swaps). Depends on Q and the group sizes,
    /// which must be powers of two.
    Similarity = 1,
    /// Like `DA_GROUPING_SIMILARITY`, but minimises the score error itself, weighting
    /// column differences by the Gram matrix of the (centred) keys. Needs K: plan
    /// with `da_plan_with_keys` (`da_plan` refuses it) or use `da_forward`, which
    /// passes the keys. Group sizes must be powers of two.
    KeyWeighted = 2,
}

impl da_grouping {
    /// The core's mode for a raw config value, if it is one.
    pub(crate) fn from_raw(raw: u32) -> Option<GroupingMode> {
        match raw {
            x if x == da_grouping::Lsh as u32 => Some(GroupingMode::Lsh),
            x if x == da_grouping::Similarity as u32 => Some(GroupingMode::Similarity),
            x if x == da_grouping::KeyWeighted as u32 => Some(GroupingMode::KeyWeighted),
            _ => None,
        }
    }

    pub(crate) fn of_mode(mode: GroupingMode) -> da_grouping {
        match mode {
            GroupingMode::Lsh => da_grouping::Lsh,
            GroupingMode::Similarity => da_grouping::Similarity,
            GroupingMode::KeyWeighted => da_grouping::KeyWeighted,
        }
    }
}

/// What the error-budget planner (`da_choose_group_sizes`) aims for.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum da_budget_target {
    /// `target` is the largest relative output error (Frobenius norm of a head's
    /// output change over the norm of its exact output) that an approximated head
    /// may have on any calibration sample; at least 0. Heads that cannot meet it
    /// keep G = 1.
    MaxError = 0,
    /// `target` is the fraction of the attention FLOPs to save, in [0, 1): heads
    /// are raised to larger G where the measured error grows least, until the
    /// saving is reached (or every head has the largest candidate).
    FlopSaving = 1,
}

/// Parameters of DistrAttention (see ALGORITHM.md of the project).
///
/// Initialise it with `da_config_default(&config, sizeof config)`, which also
/// sets `struct_size`, then change the fields you need. The struct can grow in
/// later versions: new fields are added at the end, and a library reads only
/// the first `struct_size` bytes (fields past them keep their defaults), so a
/// program compiled against an older header keeps working. A library older than
/// the header accepts the larger struct only if the fields it does not know are
/// zero, and otherwise returns `DA_STATUS_UNSUPPORTED`.
///
/// The library copies the config during each call and keeps no pointer to it
/// or to `group_sizes` after the call returns.
///
/// History: version 0.1.0 introduced the struct with a last field `reserved`
/// that had to be zero; `grouping` took its place, so a config of an older
/// program (same size, that field zero) selects the default LSH grouping, and an
/// older library refuses a config that selects another grouping
/// (`DA_STATUS_UNSUPPORTED`) rather than ignoring it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct da_config {
    /// `sizeof(da_config)` as the caller was compiled; set by `da_config_default`.
    pub struct_size: usize,
    /// l: query rows that share one grouping (default 64). A short last block is
    /// zero-padded. 1 gives a strictly causal plan.
    pub block_rows: usize,
    /// Optional per-query-head group sizes: NULL for the uniform `group_size`
    /// (default), or `num_group_sizes` entries, one per query head. Read during
    /// the call only.
    pub group_sizes: *const u32,
    /// Number of entries of `group_sizes`; must be 0 when `group_sizes` is NULL.
    pub num_group_sizes: usize,
    /// Fixes the LSH projections, so that every backend and run groups
    /// identically (default 0).
    pub seed: u64,
    /// G for every query head when `group_sizes` is NULL (default 2). Must divide
    /// the head dimension; 1 is exact attention.
    pub group_size: u32,
    /// P: random hyperplanes of the angular LSH, 1..=32 (default 16).
    pub num_projections: u32,
    /// A `da_fusion` value (default `DA_FUSION_MEAN`).
    pub fusion: u32,
    /// Nonzero for the lower-triangular mask, bottom-right aligned when the query
    /// and key lengths differ (default 0). See the causality caveat in the
    /// library's documentation: with G > 1 a row's plan sees the later rows of its
    /// own block.
    pub causal: u32,
    /// Softmax scale. 0 (the default) or NaN means 1/sqrt(head_dim); otherwise it
    /// must be finite and positive.
    pub scale: f32,
    /// A `da_grouping` value (default `DA_GROUPING_LSH`): how plans group the
    /// columns.
    pub grouping: u32,
}

/// Descriptor of a `[batch, seq, heads, head_dim]` tensor: in host memory for
/// the `da_*` entry points, in memory the GPU can read (device, managed or
/// page-locked host memory) for the `da_cuda_*` ones.
///
/// The last dimension is contiguous; the other strides are in elements (not
/// bytes) and may describe views, e.g. Q, K and V interleaved in one buffer.
/// Element `(b, s, h, j)` is at `data[b*stride_batch + s*stride_seq +
/// h*stride_head + j]`. The tensor's *extent* is the memory from `data` to one
/// past its last element; the caller guarantees it is readable (and, for
/// outputs, writable). The library reads or writes only the tensor's elements
/// and keeps no pointer after the call returns. The extent of a buffer a call
/// writes must not overlap any other buffer of the call, even where strides
/// leave gaps (`DA_STATUS_OVERLAPPING_BUFFERS`); inputs may overlap each other.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct da_tensor {
    /// First element; aligned to the element size. Written only when the
    /// descriptor is an output.
    pub data: *const c_void,
    /// A `da_dtype` value.
    pub dtype: u32,
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub stride_batch: usize,
    pub stride_seq: usize,
    pub stride_head: usize,
}

/// Dimensions of a plan: `batch * heads * blocks` permutations of `head_dim`
/// column indices each, stored densely in that order (`uint16_t` entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct da_plan_shape {
    pub batch: usize,
    pub heads: usize,
    /// Query blocks per head: ceil(q_len / block_rows).
    pub blocks: usize,
    pub head_dim: usize,
    pub block_rows: usize,
    /// Number of `uint16_t` entries: batch * heads * blocks * head_dim.
    pub num_entries: usize,
}

/// Largest `struct_size` accepted: anything above is taken for garbage rather
/// than a future header (reading it would run past the caller's struct).
pub(crate) const MAX_CONFIG_SIZE: usize = 4096;

impl da_config {
    /// The defaults of the core (`Config::default()`), with `struct_size` set to
    /// this library's size.
    pub(crate) fn defaults() -> Self {
        let d = Config::default();
        da_config {
            struct_size: size_of::<da_config>(),
            block_rows: d.block_rows,
            group_sizes: core::ptr::null(),
            num_group_sizes: 0,
            seed: d.seed,
            group_size: d.group_size(0) as u32,
            num_projections: d.num_projections,
            fusion: da_fusion::Mean as u32,
            causal: d.causal as u32,
            scale: 0.0,
            grouping: da_grouping::of_mode(d.grouping) as u32,
        }
    }
}

/// Reads the caller's config: the first `struct_size` bytes over the defaults.
///
/// # Safety
/// `ptr` is NULL or points to `struct_size` readable bytes (any alignment).
pub(crate) unsafe fn read_config(ptr: *const da_config) -> FfiResult<Settings> {
    if ptr.is_null() {
        return Err(Failure::new(da_status::NullPointer, "config is NULL"));
    }
    // SAFETY: every config starts with its size; the caller provides at least that.
    let struct_size = unsafe { ptr.cast::<usize>().read_unaligned() };
    let known = size_of::<da_config>();
    if struct_size < known {
        // Version 1 is the smallest config there is.
        return Err(Failure::new(
            da_status::InvalidArgument,
            format!(
                "config: struct_size is {struct_size}, at least {known} expected \
                 (initialise the config with da_config_default)"
            ),
        ));
    }
    if struct_size > MAX_CONFIG_SIZE {
        return Err(Failure::new(
            da_status::InvalidArgument,
            format!("config: struct_size {struct_size} is implausible (uninitialised config?)"),
        ));
    }
    let bytes = ptr.cast::<u8>();
    for offset in known..struct_size {
        // SAFETY: the caller's struct holds `struct_size` bytes.
        if unsafe { bytes.add(offset).read() } != 0 {
            return Err(Failure::new(
                da_status::Unsupported,
                format!(
                    "config: byte {offset} is set, past the {known} bytes this library \
                     (version {}) knows: a field of a newer header",
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
    }
    // SAFETY: at least `known` readable bytes, and every bit pattern is a valid
    // `da_config` (integers, a float and a raw pointer).
    let raw = unsafe { ptr.read_unaligned() };
    Settings::new(&raw)
}

/// A config whose scalar fields are checked for representable values; the core
/// checks the rest against the problem's shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    block_rows: usize,
    group_size: u32,
    group_sizes: *const u32,
    num_group_sizes: usize,
    num_projections: u32,
    seed: u64,
    fusion: Fusion,
    causal: bool,
    scale: Option<f32>,
    grouping: GroupingMode,
}

impl Settings {
    fn new(raw: &da_config) -> FfiResult<Self> {
        let fusion = match raw.fusion {
            x if x == da_fusion::Mean as u32 => Fusion::Mean,
            x if x == da_fusion::Sample as u32 => Fusion::Sample,
            other => {
                return Err(Failure::new(
                    da_status::InvalidArgument,
                    format!("config: fusion {other} is not a da_fusion value (0 mean, 1 sample)"),
                ))
            }
        };
        let grouping = da_grouping::from_raw(raw.grouping).ok_or_else(|| {
            Failure::new(
                da_status::InvalidArgument,
                format!(
                    "config: grouping {} is not a da_grouping value (0 lsh, 1 similarity, 2 key-weighted)",
                    raw.grouping
                ),
            )
        })?;
        if raw.group_sizes.is_null() && raw.num_group_sizes != 0 {
            return Err(Failure::new(
                da_status::NullPointer,
                format!("config: group_sizes is NULL but num_group_sizes is {}", raw.num_group_sizes),
            ));
        }
        let scale = if raw.scale == 0.0 || raw.scale.is_nan() { None } else { Some(raw.scale) };
        Ok(Settings {
            block_rows: raw.block_rows,
            group_size: raw.group_size,
            group_sizes: raw.group_sizes,
            num_group_sizes: raw.num_group_sizes,
            num_projections: raw.num_projections,
            seed: raw.seed,
            fusion,
            causal: raw.causal != 0,
            scale,
            grouping,
        })
    }

    /// The grouping mode of the config.
    pub(crate) fn grouping(&self) -> GroupingMode {
        self.grouping
    }

    /// The config with the uniform `group_size` for every head: the per-head
    /// array is not read. Enough for LSH plans (group sizes do not influence
    /// them), plan shapes, projections and the planner (which sets the sizes).
    pub(crate) fn plan_config(&self) -> Config<'static> {
        Config {
            block_rows: self.block_rows,
            group_sizes: GroupSizes::Uniform(self.group_size as usize),
            num_projections: self.num_projections,
            seed: self.seed,
            fusion: self.fusion,
            causal: self.causal,
            scale: self.scale,
            grouping: self.grouping,
        }
    }

    /// The full config for a problem with `q_heads` query heads, with the
    /// per-head group sizes copied into `storage`.
    ///
    /// # Safety
    /// A non-NULL `group_sizes` points to `num_group_sizes` readable `uint32_t`.
    pub(crate) unsafe fn config<'a>(
        &self,
        q_heads: usize,
        storage: &'a mut Vec<usize>,
    ) -> FfiResult<Config<'a>> {
        let mut cfg = self.plan_config();
        if !self.group_sizes.is_null() {
            let n = self.num_group_sizes;
            // Checked before the array is touched, so a wild count reads nothing.
            if n != q_heads {
                return Err(Error::GroupSizesLength { expected: q_heads, got: n }.into());
            }
            ByteRange::of_buffer(self.group_sizes, n, Operand::GroupSizes.name())?;
            // SAFETY: checked non-NULL and aligned; the caller provides `n` entries.
            let sizes = unsafe { core::slice::from_raw_parts(self.group_sizes, n) };
            storage.clear();
            storage
                .try_reserve_exact(n)
                .map_err(|_| Error::AllocationFailed { operand: Operand::GroupSizes, len: n })?;
            storage.extend(sizes.iter().map(|&g| g as usize));
            cfg.group_sizes = GroupSizes::PerHead(storage);
        }
        Ok(cfg)
    }
}

/// The bytes a buffer argument occupies, for the overlap checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ByteRange {
    /// The argument, for messages.
    pub(crate) name: &'static str,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl ByteRange {
    /// Checks a pointer to `count` elements of `T`: not NULL, aligned, and an
    /// extent that neither overflows the address space nor exceeds `isize::MAX`
    /// bytes (the limit of a Rust slice).
    pub(crate) fn of_buffer<T>(ptr: *const T, count: usize, name: &'static str) -> FfiResult<ByteRange> {
        Self::of_raw(ptr.cast(), count, size_of::<T>(), size_of::<T>(), name)
    }

    /// Like [`ByteRange::of_buffer`] for `count` elements of `elem` bytes that
    /// need no alignment (structs read with unaligned loads, bytes).
    pub(crate) fn of_unaligned(
        ptr: *const c_void,
        count: usize,
        elem: usize,
        name: &'static str,
    ) -> FfiResult<ByteRange> {
        Self::of_raw(ptr, count, elem, 1, name)
    }

    fn of_raw(
        ptr: *const c_void,
        count: usize,
        elem: usize,
        align: usize,
        name: &'static str,
    ) -> FfiResult<ByteRange> {
        if ptr.is_null() {
            return Err(Failure::new(da_status::NullPointer, format!("{name}: pointer is NULL")));
        }
        let start = ptr as usize;
        if !start.is_multiple_of(align) {
            return Err(Failure::new(
                da_status::MisalignedPointer,
                format!("{name}: pointer {ptr:p} is not aligned to {align} bytes"),
            ));
        }
        let len = count
            .checked_mul(elem)
            .filter(|&len| len <= isize::MAX as usize && start.checked_add(len).is_some())
            .ok_or_else(|| {
                Failure::new(
                    da_status::SizeOverflow,
                    format!("{name}: {count} elements of {elem} bytes at {ptr:p} exceed the address space"),
                )
            })?;
        Ok(ByteRange { name, start, len })
    }

    /// True when the two ranges share a byte.
    pub(crate) fn overlaps(&self, other: &ByteRange) -> bool {
        self.len > 0
            && other.len > 0
            && self.start < other.start + other.len
            && other.start < self.start + self.len
    }
}

/// Fails if a range the call writes shares a byte with any other range of the
/// call (Rust may not hold a `&mut` slice that aliases another slice).
pub(crate) fn check_disjoint(written: &[ByteRange], read: &[ByteRange]) -> FfiResult {
    for (i, w) in written.iter().enumerate() {
        for other in written[i + 1..].iter().chain(read) {
            if w.overlaps(other) {
                return Err(Failure::new(
                    da_status::OverlappingBuffers,
                    format!(
                        "{}: the buffer written overlaps the buffer of {} (bytes {:#x}..{:#x} and {:#x}..{:#x})",
                        w.name, other.name,
                        w.start,
                        w.start + w.len,
                        other.start,
                        other.start + other.len
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A validated tensor descriptor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostTensor {
    pub(crate) data: *const c_void,
    pub(crate) dtype: DType,
    pub(crate) layout: Layout,
    /// Elements of the extent: one past the largest offset.
    pub(crate) len: usize,
    pub(crate) range: ByteRange,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

/// Reads a descriptor and checks its dtype and shape, not its data pointer.
///
/// # Safety
/// `desc` is NULL or points to a readable `da_tensor`.
pub(crate) unsafe fn read_layout(
    desc: *const da_tensor,
    operand: Operand,
) -> FfiResult<(da_tensor, DType, Layout)> {
    let name = operand.name();
    if desc.is_null() {
        return Err(Failure::new(da_status::NullPointer, format!("{name}: tensor descriptor is NULL")));
    }
    // SAFETY: non-NULL and readable per the contract; any bit pattern is valid.
    let t = unsafe { desc.read_unaligned() };
    let dtype = match t.dtype {
        x if x == da_dtype::F32 as u32 => DType::F32,
        x if x == da_dtype::F16 as u32 => DType::F16,
        x if x == da_dtype::Bf16 as u32 => DType::BF16,
        other => {
            return Err(Failure::new(
                da_status::InvalidArgument,
                format!("{name}: dtype {other} is not a da_dtype value (0 f32, 1 f16, 2 bf16)"),
            ))
        }
    };
    let layout = Layout {
        batch: t.batch,
        seq: t.seq,
        heads: t.heads,
        dim: t.head_dim,
        stride_batch: t.stride_batch,
        stride_seq: t.stride_seq,
        stride_head: t.stride_head,
    };
    layout.required_len(operand)?;
    Ok((t, dtype, layout))
}

impl HostTensor {
    /// Reads and checks a descriptor: the descriptor and data pointers, the dtype,
    /// no zero dimension, the alignment, and an extent without overflow.
    ///
    /// # Safety
    /// `desc` is NULL or points to a readable `da_tensor`.
    pub(crate) unsafe fn read(desc: *const da_tensor, operand: Operand) -> FfiResult<HostTensor> {
        // SAFETY: forwarded contract.
        let (t, dtype, layout) = unsafe { read_layout(desc, operand)? };
        let name = operand.name();
        if t.data.is_null() {
            return Err(Failure::new(da_status::NullPointer, format!("{name}: data pointer is NULL")));
        }
        let elem = dtype.size_bytes();
        if !(t.data as usize).is_multiple_of(elem) {
            return Err(Failure::new(
                da_status::MisalignedPointer,
                format!(
                    "{name}: data pointer {:p} is not aligned to {elem} bytes ({})",
                    t.data,
                    dtype_name(dtype)
                ),
            ));
        }
        let len = layout.required_len(operand)?;
        let range = ByteRange::of_raw(t.data, len, elem, elem, name)?;
        Ok(HostTensor { data: t.data, dtype, layout, len, range })
    }

    /// Fails unless the tensor holds `dtype`.
    pub(crate) fn expect_dtype(&self, dtype: DType, why: &str) -> FfiResult {
        if self.dtype == dtype {
            return Ok(());
        }
        Err(Failure::new(
            da_status::Unsupported,
            format!("{}: dtype is {}, {why} {}", self.range.name, dtype_name(self.dtype), dtype_name(dtype)),
        ))
    }
}
