//! The fuzz harness of the argument-validation surface, shared by the cargo-fuzz
//! target (`fuzz/fuzz_targets/c_abi.rs`, built with `--cfg fuzzing`) and a unit
//! test that runs it on a fixed set of inputs in every `cargo test`.
//!
//! One input describes one call of an exported function: which function, a
//! config (usually valid, sometimes mutated), tensor descriptors over one
//! arena of memory (shapes, strides, dtypes, byte offsets that may be
//! misaligned or overlap, NULL pointers), buffer lengths, and the arena's
//! contents (finite values or raw bytes). The harness keeps its own side of
//! the contract: every pointer it passes addresses memory it owns for the
//! extent it claims, except where it claims an extent whose size overflows,
//! which the library must reject unread.
//!
//! Checked after every call:
//! * no panic reached the boundary (`DA_STATUS_PANIC`), and the last-error
//!   message is empty exactly when the call succeeded;
//! * nothing outside the buffers the call may write changed, and nothing at
//!   all when it failed;
//! * a successful call had no written buffer overlapping another buffer;
//! * a successful plan is a permutation in every block, and an attention
//!   output on finite f32 inputs lies within the range of V (and 0);
//! * a successful table lookup or planner call returns group sizes of at least 1.
//!
//! The CUDA entry points (kind 14: plan, attention, exact attention, forward
//! and the two backward passes) are called with a NULL handle (no GPU is
//! needed): `DA_STATUS_NULL_POINTER` with the `cuda` feature,
//! `DA_STATUS_CUDA_UNAVAILABLE` without. With the feature, their argument
//! checks are then run on their own, on descriptors over a fake device heap
//! that nothing maps (a read would crash): a call that passes them meets the
//! kernels' alignment rules and writes no buffer that overlaps another.

use core::ffi::{c_char, c_void, CStr};
use core::mem::size_of;
use core::ptr::{null, null_mut};

use distr_attention_core::{Layout, Operand};

use crate::*;

const ARENA_BYTES: usize = 1 << 17;
/// Each tensor and buffer has its own part of the arena unless the input
/// moves it (so that overlaps are the fuzzer's choice, not the default).
const SLOT_BYTES: usize = 8 << 10;

/// Reads the fuzz input; zeros once it is exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | self.byte() as u64)
    }

    /// A value in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        if n <= 256 {
            self.byte() as usize % n
        } else {
            (self.u64() % n as u64) as usize
        }
    }

    /// True with probability about `1/n` (false once the input is exhausted,
    /// so that a short input takes the common paths).
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == n - 1
    }

    /// A size: usually `typical`, sometimes zero or huge.
    fn size(&mut self, typical: usize) -> usize {
        match self.below(16) {
            12 => 0,
            13 => usize::MAX / (1 + self.below(64)),
            14 => self.u64() as usize,
            15 => self.below(1 << 12),
            _ => typical,
        }
    }
}

/// The memory of one call: 8-byte aligned, fuzzed contents.
struct Arena {
    words: Vec<u64>,
}

impl Arena {
    fn base(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: a u64 buffer viewed as its bytes.
        unsafe { core::slice::from_raw_parts(self.words.as_ptr().cast(), ARENA_BYTES) }
    }
}

/// A buffer the harness hands to the library: where it is and how long the
/// library may take it to be (`None` when the claimed extent overflows).
#[derive(Clone, Copy, Debug)]
struct Region {
    /// The part of the arena it was placed in by default (which argument it is).
    slot: usize,
    start: usize,
    bytes: Option<usize>,
    written: bool,
    role: Role,
}

/// What a region holds: buffers with a length are used only up to what the
/// call needs, the rest of their claim is not the library's business.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Tensor,
    Lse,
    Plan,
    /// One value of this many bytes per (batch, query head): error estimates.
    PerBatchHead(usize),
    /// One value of this many bytes per query head: the planner's outputs.
    PerHead(usize),
    /// The group sizes of a table entry (u32, as many as the entry has heads).
    TableSizes,
    Other,
}

impl Region {
    fn overlaps(&self, o: &Region) -> bool {
        match (self.bytes, o.bytes) {
            (Some(a), Some(b)) if a > 0 && b > 0 => self.start < o.start + b && o.start < self.start + a,
            _ => false,
        }
    }
}

fn elem_size(dtype: u32) -> usize {
    match dtype {
        1 | 2 => 2,
        _ => 4,
    }
}

/// Builds a descriptor: a coherent shape, then maybe mutated; dense or fuzzed
/// strides; data at a fuzzed offset in the arena, or NULL when the extent
/// would not fit.
fn tensor(
    inp: &mut Input<'_>,
    arena: &mut Arena,
    regions: &mut Vec<Region>,
    slot: usize,
    shape: [usize; 4],
    dtype: u32,
    written: bool,
) -> da_tensor {
    let mut s = shape;
    if inp.one_in(12) {
        let i = inp.below(4);
        let typical = s[i].saturating_add(1);
        s[i] = inp.size(typical);
    }
    // Dense strides (saturating: a mutated size may be huge).
    let dense = Layout {
        batch: s[0],
        seq: s[1],
        heads: s[2],
        dim: s[3],
        stride_head: s[3],
        stride_seq: s[2].saturating_mul(s[3]),
        stride_batch: s[1].saturating_mul(s[2]).saturating_mul(s[3]),
    };
    let mut layout = dense;
    if inp.one_in(4) {
        let extra = [inp.below(8), inp.below(8), inp.below(s[3].saturating_mul(2).saturating_add(2))];
        layout.stride_batch = inp.size(dense.stride_batch.saturating_add(extra[0]));
        layout.stride_seq = inp.size(dense.stride_seq.saturating_add(extra[1]));
        layout.stride_head = inp.size(extra[2]);
    }
    let dtype = if inp.one_in(40) { inp.byte() as u32 } else { dtype };
    let elem = elem_size(dtype);
    let mut offset = if inp.one_in(8) {
        inp.below(ARENA_BYTES / 2)
    } else {
        slot * SLOT_BYTES + inp.below(SLOT_BYTES / 4)
    };
    if !inp.one_in(16) {
        offset -= offset % elem;
    }
    // The extent the library will take the descriptor to claim.
    let extent = layout.required_len(Operand::Q).ok().map(|len| len.checked_mul(elem));
    let data: *const c_void = match extent {
        _ if inp.one_in(50) => null(),
        // Zero dimension: rejected before the data is touched.
        None => arena.base().cast_const().cast(),
        // A byte extent that overflows, or exceeds what a Rust slice may span:
        // must be rejected unread.
        Some(None) => arena.base().wrapping_add(offset).cast_const().cast(),
        Some(Some(bytes)) if bytes > isize::MAX as usize => {
            arena.base().wrapping_add(offset).cast_const().cast()
        }
        Some(Some(bytes)) if offset.checked_add(bytes).is_some_and(|end| end <= ARENA_BYTES) => {
            regions.push(Region { slot, start: offset, bytes: Some(bytes), written, role: Role::Tensor });
            arena.base().wrapping_add(offset).cast_const().cast()
        }
        // Would run past the arena: the harness may not claim it.
        Some(Some(_)) => null(),
    };
    da_tensor {
        data,
        dtype,
        batch: layout.batch,
        seq: layout.seq,
        heads: layout.heads,
        head_dim: layout.dim,
        stride_batch: layout.stride_batch,
        stride_seq: layout.stride_seq,
        stride_head: layout.stride_head,
    }
}

/// A plain buffer of `T` in the arena, or NULL; its claimed length fits the arena.
#[allow(clippy::too_many_arguments)]
fn buffer<T>(
    inp: &mut Input<'_>,
    arena: &mut Arena,
    regions: &mut Vec<Region>,
    slot: usize,
    role: Role,
    typical: usize,
    written: bool,
) -> (*mut T, usize) {
    if inp.one_in(10) {
        return (null_mut(), inp.size(typical));
    }
    let mut offset = if inp.one_in(8) { inp.below(ARENA_BYTES) } else { slot * SLOT_BYTES + inp.below(1024) };
    if !inp.one_in(16) {
        offset -= offset % size_of::<T>();
    }
    let room = (ARENA_BYTES - offset) / size_of::<T>();
    let len = match inp.below(8) {
        6 => inp.below(typical.saturating_add(2)),
        7 => room,
        _ => typical,
    }
    .min(room);
    regions.push(Region { slot, start: offset, bytes: Some(len * size_of::<T>()), written, role });
    (arena.base().wrapping_add(offset).cast(), len)
}

/// One written `T` in the arena (sometimes misaligned, or a buffer the fuzzer
/// moved anywhere), or NULL.
fn scalar<T>(inp: &mut Input<'_>, arena: &mut Arena, regions: &mut Vec<Region>, slot: usize) -> *mut T {
    if inp.one_in(12) {
        return null_mut();
    }
    let mut offset = if inp.one_in(8) {
        inp.below(ARENA_BYTES - size_of::<T>())
    } else {
        slot * SLOT_BYTES + inp.below(1024)
    };
    if !inp.one_in(16) {
        offset -= offset % size_of::<T>();
    }
    regions.push(Region {
        slot,
        start: offset,
        bytes: Some(size_of::<T>()),
        written: true,
        role: Role::Other,
    });
    arena.base().wrapping_add(offset).cast()
}

/// A table in the planner's JSON format for `heads` query heads, from the
/// fuzz input: valid most of the time, with fuzzed sizes, names, settings, and
/// sometimes a damaged byte or a cut.
fn table(inp: &mut Input<'_>, heads: usize) -> Vec<u8> {
    let mut files = Vec::new();
    for f in 0..1 + inp.below(2) {
        let mut layers = Vec::new();
        for _ in 0..1 + inp.below(3) {
            let sizes: Vec<String> = (0..heads)
                .map(|_| {
                    ["2", "1", "4", "8", "0", "3", "-1", "5000000000", "2.5", "\"2\""][inp.below(10)]
                        .to_string()
                })
                .collect();
            let heads_records = if inp.one_in(3) {
                String::new()
            } else {
                let recs: Vec<String> = sizes
                    .iter()
                    .enumerate()
                    .map(|(h, g)| {
                        let g = if inp.one_in(10) { "7" } else { g.as_str() };
                        format!("{{\"head\": {h}, \"group_size\": {g}, \"measured_error\": 0.1}}")
                    })
                    .collect();
                format!(", \"heads\": [{}]", recs.join(", "))
            };
            layers.push(format!(
                "{{\"layer\": \"layer{}\", \"group_sizes\": [{}], \"flop_saving\": 0.1{heads_records}}}",
                inp.below(3),
                sizes.join(", ")
            ));
        }
        files.push(format!(
            "{{\"file\": \"{}f{f}.safetensors\", \"layers\": [{}]}}",
            ["", "dir/", "/abs/dir/"][inp.below(3)],
            layers.join(", ")
        ));
    }
    let grouping =
        ["\"Similarity\"", "\"Lsh\"", "\"KeyWeighted\"", "\"key-weighted\"", "\"Bogus\"", "3"][inp.below(6)];
    let block_rows = ["64", "1", "0", "-4", "\"64\""][inp.below(5)];
    let mut text = format!(
        "{{\"target\": {{\"max_error\": 0.2}}, \"grouping\": {grouping}, \"block_rows\": {block_rows}, \"files\": [{}]}}",
        files.join(", ")
    )
    .into_bytes();
    if inp.one_in(8) {
        let i = inp.below(text.len());
        text[i] = inp.byte();
    }
    if inp.one_in(12) {
        text.truncate(inp.below(text.len()));
    }
    text
}

fn message() -> &'static str {
    // SAFETY: NUL-terminated, thread-local; read before the next call.
    unsafe { CStr::from_ptr(da_last_error_message()) }.to_str().unwrap_or("<not UTF-8>")
}

/// Number of call kinds [`run`] chooses from.
pub(crate) const CALL_KINDS: usize = 15;

/// The call kind of the CUDA entry points.
pub(crate) const CUDA_KIND: usize = 14;

/// Kind 14: the CUDA entry points (see the module documentation).
fn run_cuda(inp: &mut Input<'_>) -> da_status {
    // A coherent problem the kernels take, then fuzzed.
    let b = 1 + inp.below(2);
    let n = 1 + inp.below(300);
    let m = 1 + inp.below(300);
    let hk = 1 + inp.below(2);
    let hq = hk * (1 + inp.below(3));
    let d = [64, 32, 128, 16, 8][inp.below(5)];
    let dtype = [2, 1, 2, 1, 0][inp.below(5)] as u32;
    let out_dtype = [dtype, dtype, 0, 1, 2][inp.below(5)];
    let group_sizes: Vec<u32> = (0..8).map(|_| [2, 1, 4, 8, 3, 16][inp.below(6)]).collect();
    let mut cfg = da_config {
        block_rows: [64, 128, 64, 32, 1, 256][inp.below(6)],
        group_size: [2, 1, 4, 8, 3, 16][inp.below(6)],
        num_projections: 1 + inp.below(32) as u32,
        seed: inp.u64(),
        fusion: inp.below(2) as u32,
        causal: inp.below(2) as u32,
        grouping: [0, 0, 0, 1, 2][inp.below(5)],
        ..da_config::defaults()
    };
    if inp.one_in(4) {
        cfg.group_sizes = group_sizes.as_ptr();
        cfg.num_group_sizes = if inp.one_in(4) { inp.below(7) } else { hq };
    }
    match inp.below(20) {
        16 => cfg.block_rows = inp.size(0),
        17 => cfg.group_size = inp.byte() as u32,
        18 => cfg.num_projections = inp.byte() as u32,
        19 => cfg.scale = [f32::NAN, -1.0, f32::INFINITY, 0.5][inp.below(4)],
        _ => {}
    }

    // Slots of a fake device heap: q, k, v, out, lse, plan, and the
    // backward's d_out, dq, dk, dv, workspace.
    const HEAP: usize = 0x4000_0000_0000;
    const SPAN: usize = 1 << 32;
    let address = |inp: &mut Input<'_>, slot: usize| -> usize {
        let slot = if inp.one_in(12) { inp.below(11) } else { slot };
        let offset = 16 * inp.below(64) + [0, 0, 0, 0, 0, 0, 2, 4, 8, 1][inp.below(10)];
        HEAP + slot * SPAN + offset
    };
    let tensor = |inp: &mut Input<'_>, slot: usize, shape: [usize; 4], dtype: u32| -> da_tensor {
        let mut s = shape;
        if inp.one_in(12) {
            let i = inp.below(4);
            s[i] = inp.size(s[i].saturating_add(1));
        }
        let pad = [0, 0, 0, 8, 16, 4, 2, 1][inp.below(8)];
        let stride_head = s[3].saturating_add(pad);
        let mut l = Layout {
            batch: s[0],
            seq: s[1],
            heads: s[2],
            dim: s[3],
            stride_head,
            stride_seq: s[2].saturating_mul(stride_head),
            stride_batch: s[1].saturating_mul(s[2]).saturating_mul(stride_head),
        };
        if inp.one_in(10) {
            l.stride_seq = inp.size(l.stride_seq);
            l.stride_batch = inp.size(l.stride_batch);
            l.stride_head = inp.size(l.stride_head);
        }
        let dtype = if inp.one_in(40) { inp.byte() as u32 } else { dtype };
        da_tensor {
            data: if inp.one_in(60) { null() } else { address(inp, slot) as *const c_void },
            dtype,
            batch: l.batch,
            seq: l.seq,
            heads: l.heads,
            head_dim: l.dim,
            stride_batch: l.stride_batch,
            stride_seq: l.stride_seq,
            stride_head: l.stride_head,
        }
    };
    let which = inp.below(6);
    let mut t = [
        tensor(inp, 0, [b, n, hq, d], dtype),
        tensor(inp, 1, [b, m, hk, d], dtype),
        tensor(inp, 2, [b, m, hk, d], dtype),
        tensor(inp, 3, [b, n, hq, d], out_dtype),
    ];
    // The backward's output gradient and gradients.
    let d_out_dtype = [dtype, dtype, 0][inp.below(3)];
    let grad_dtype = [0, dtype, dtype][inp.below(3)];
    let mut g = [
        tensor(inp, 6, [b, n, hq, d], d_out_dtype),
        tensor(inp, 7, [b, n, hq, d], grad_dtype),
        tensor(inp, 8, [b, m, hk, d], grad_dtype),
        tensor(inp, 9, [b, m, hk, d], grad_dtype),
    ];
    // A backward call has eleven pointers that must all be aligned (and
    // needs the lse): often enough they are (and it has one).
    let backward = which >= 4;
    let align_all = backward && !inp.one_in(4);
    let aligned = |p: usize| if align_all { p & !15 } else { p };
    for x in t.iter_mut().chain(g.iter_mut()) {
        x.data = aligned(x.data as usize) as *const c_void;
    }
    let descs: [*const da_tensor; 4] =
        t.each_ref().map(|x| if inp.one_in(60) { null() } else { x as *const da_tensor });
    let grads: [*const da_tensor; 4] =
        g.each_ref().map(|x| if inp.one_in(60) { null() } else { x as *const da_tensor });
    let lse_typical = b * hq * n;
    let (lse, lse_len) = if (backward && !inp.one_in(8)) || inp.one_in(2) {
        (aligned(address(inp, 4)) as *mut f32, [lse_typical, lse_typical, lse_typical - 1, 0][inp.below(4)])
    } else {
        (null_mut(), inp.below(3))
    };
    let plan_typical = b * hq * n.div_ceil(cfg.block_rows.max(1)) * d;
    let plan = if inp.one_in(6) { null_mut() } else { aligned(address(inp, 5)) as *mut u16 };
    let plan_len =
        [plan_typical, plan_typical, plan_typical.saturating_sub(1), inp.size(plan_typical)][inp.below(4)];
    let config_ptr: *const da_config = if inp.one_in(40) { null() } else { &cfg };
    let workspace = if inp.one_in(3) { null_mut() } else { aligned(address(inp, 10)) as *mut c_void };
    let workspace_size = inp.size(1 << 30);

    // The exported function, without a handle.
    // SAFETY: a NULL handle is rejected before any other argument is read.
    let exported = unsafe {
        let [q, k, v, o] = descs;
        match which {
            0 => da_cuda_plan(null_mut(), config_ptr, q, plan, plan_len, null_mut()),
            1 => da_cuda_attention(
                null_mut(),
                config_ptr,
                plan,
                plan_len,
                q,
                k,
                v,
                o,
                lse,
                lse_len,
                null_mut(),
            ),
            2 => da_cuda_exact_attention(null_mut(), config_ptr, q, k, v, o, lse, lse_len, null_mut()),
            3 => {
                da_cuda_forward(null_mut(), config_ptr, q, k, v, o, lse, lse_len, plan, plan_len, null_mut())
            }
            4 => {
                let [d_out, dq, dk, dv] = grads;
                da_cuda_attention_backward(
                    null_mut(),
                    config_ptr,
                    plan,
                    plan_len,
                    q,
                    k,
                    v,
                    o,
                    lse,
                    lse_len,
                    d_out,
                    dq,
                    dk,
                    dv,
                    workspace,
                    workspace_size,
                    null_mut(),
                )
            }
            _ => {
                let [d_out, dq, dk, dv] = grads;
                da_cuda_exact_attention_backward(
                    null_mut(),
                    config_ptr,
                    q,
                    k,
                    v,
                    o,
                    lse,
                    lse_len,
                    d_out,
                    dq,
                    dk,
                    dv,
                    workspace,
                    workspace_size,
                    null_mut(),
                )
            }
        }
    };
    #[cfg(not(feature = "cuda"))]
    {
        assert_eq!(exported, da_status::CudaUnavailable, "{}", message());
        exported
    }
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::{imp, Backward, Mode};
        assert_eq!(exported, da_status::NullPointer, "{}", message());
        if which >= 4 {
            return run_cuda_backward(
                config_ptr,
                Backward {
                    plan: (which == 4).then_some((plan as *const u16, plan_len)),
                    inputs: [descs[0], descs[1], descs[2], descs[3], grads[0]],
                    lse,
                    lse_len,
                    grads: [grads[1], grads[2], grads[3]],
                    workspace,
                    workspace_size,
                },
            );
        }
        let mode = match which {
            0 => Mode::Plan(plan, plan_len),
            1 => Mode::Attention(plan, plan_len),
            2 => Mode::Exact,
            _ => Mode::Forward(if inp.one_in(2) { null_mut() } else { plan }, plan_len),
        };
        let mut storage = Vec::new();
        let mut checked = None;
        let status = crate::error::boundary(|| {
            // SAFETY: the config and descriptors are live host structs; the
            // data pointers are never dereferenced by the checks.
            let c = unsafe { imp::check_call(config_ptr, mode, descs, lse, lse_len, &mut storage)? };
            checked = Some((c.q, c.attend, c.buffers.clone(), c.written.clone()));
            Ok(())
        });
        assert_ne!(status, da_status::Panic, "panic reached the boundary: {}", message());
        assert_eq!(
            status == da_status::Ok,
            message().is_empty(),
            "status {status:?}, message {:?}",
            message()
        );
        if let Some((q, attend, buffers, written)) = checked {
            let align = if attend.is_some() { 16 } else { 8 };
            assert!(q.ptr.is_multiple_of(align), "q at {:#x} passed the checks", q.ptr);
            if let Some((k, v, o, _)) = attend {
                assert!(k.ptr.is_multiple_of(16) && v.ptr.is_multiple_of(16) && o.ptr.is_multiple_of(4));
                assert!(
                    [q, k, v].iter().all(|t| t.dtype == q.dtype)
                        && (o.dtype == q.dtype || o.dtype == distr_attention_core::DType::F32)
                );
            }
            assert_disjoint(&buffers, &written);
        }
        status
    }
}

/// Asserts that no buffer written overlaps another buffer of the call.
#[cfg(feature = "cuda")]
fn assert_disjoint(buffers: &[crate::types::ByteRange], written: &[crate::types::ByteRange]) {
    for (i, a) in buffers.iter().enumerate() {
        for bb in &buffers[i + 1..] {
            if written.contains(a) || written.contains(bb) {
                assert!(!a.overlaps(bb), "written buffer overlapped: {a:?} {bb:?}");
            }
        }
    }
}

/// The argument checks of a `da_cuda_*_backward` call on their own: a call
/// that passes them meets the kernels' dtype and alignment rules, has a
/// workspace (or allocates one), and writes no buffer that overlaps another.
#[cfg(feature = "cuda")]
fn run_cuda_backward(config: *const da_config, args: crate::cuda::Backward) -> da_status {
    use crate::cuda::imp::{self, BackwardWorkspace};
    use distr_attention_core::DType;

    let mut storage = Vec::new();
    let mut checked = None;
    let status = crate::error::boundary(|| {
        // SAFETY: the config and descriptors are live host structs; the data
        // pointers are never dereferenced by the checks.
        let c = unsafe { imp::check_backward_call(config, &args, &mut storage)? };
        checked = Some((c.q, c.k, c.v, c.fwd, c.grads, c.workspace, c.buffers.clone(), c.written.clone()));
        Ok(())
    });
    assert_ne!(status, da_status::Panic, "panic reached the boundary: {}", message());
    assert_eq!(status == da_status::Ok, message().is_empty(), "status {status:?}, message {:?}", message());
    if let Some((q, k, v, fwd, grads, workspace, buffers, written)) = checked {
        assert!([q, k, v].iter().all(|t| t.ptr.is_multiple_of(16) && t.dtype == q.dtype));
        assert!(q.dtype != DType::F32);
        for t in [fwd.o, fwd.d_out, grads.dq, grads.dk, grads.dv] {
            assert!(t.dtype == DType::F32 || t.dtype == q.dtype);
            assert!(t.ptr.is_multiple_of(if t.dtype == DType::F32 { 8 } else { 4 }));
        }
        if let BackwardWorkspace::Caller(w) = workspace {
            assert!(
                w.ptr.is_multiple_of(16) && w.len.checked_mul(4).is_some_and(|n| n <= args.workspace_size)
            );
        }
        assert_disjoint(&buffers, &written);
    }
    status
}

/// Runs one fuzz input and returns the call kind (`0..CALL_KINDS`) and its
/// status. Panics when an invariant of the library is broken.
///
/// Kinds: 0 plan shape, 1 plan, 2 attention, 3 exact attention, 4 forward,
/// 5 projections, 6 config default, 7 last-error copy, 8 plan with keys,
/// 9 error estimate, 10 backward, 11 exact backward, 12 planner, 13 table
/// lookup, 14 the CUDA entry points.
pub fn run(data: &[u8]) -> (usize, da_status) {
    let mut inp = Input(data);
    let which = inp.below(CALL_KINDS);
    if which == CUDA_KIND {
        return (which, run_cuda(&mut inp));
    }
    let backward = matches!(which, 10 | 11);
    // The kinds that write the attention output and the lse.
    let attends = matches!(which, 2..=4);
    let mut arena = Arena { words: vec![0u64; ARENA_BYTES / 8] };
    let finite = !inp.one_in(4);
    let mut seed = inp.u64() | 1;
    for w in arena.words.iter_mut() {
        // Two f32 in [-1, 1) per word, or raw bits (NaN, infinities, anything).
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        *w = if finite {
            let f = |x: u64| ((x % 2000) as f32 / 1000.0 - 1.0).to_bits() as u64;
            f(seed >> 33) | (f(seed >> 11) << 32)
        } else {
            seed
        };
    }

    // A coherent problem to start from.
    let b = 1 + inp.below(2);
    let n = 1 + inp.below(9);
    let m = 1 + inp.below(9);
    let hk = 1 + inp.below(2);
    let hq = hk * (1 + inp.below(2));
    let d = [16, 8, 4, 2, 1][inp.below(5)];
    let dv = 1 + inp.below(8);
    let dtype = [0, 0, 1, 2][inp.below(4)] as u32;

    // Config.
    let group_sizes: Vec<u32> = (0..8).map(|_| [2, 1, 4, 8, 3, 0][inp.below(6)]).collect();
    let mut cfg = da_config {
        block_rows: [4, 1, 2, 3, 8, 64][inp.below(6)],
        group_size: [2, 1, 4, 8][inp.below(4)],
        num_projections: 1 + inp.below(32) as u32,
        seed: inp.u64(),
        fusion: inp.below(2) as u32,
        causal: inp.below(2) as u32,
        grouping: [0, 0, 1, 2][inp.below(4)],
        ..da_config::defaults()
    };
    if inp.one_in(4) {
        cfg.group_sizes = group_sizes.as_ptr();
        cfg.num_group_sizes = if inp.one_in(4) { inp.below(7) } else { hq };
    }
    match inp.below(24) {
        16 => cfg.block_rows = inp.size(0),
        17 => cfg.group_size = inp.byte() as u32,
        18 => cfg.num_projections = inp.byte() as u32,
        19 => cfg.fusion = inp.byte() as u32,
        20 => cfg.scale = [f32::NAN, -1.0, f32::INFINITY, 0.5, 1e-30][inp.below(5)],
        21 => cfg.struct_size = inp.below(size_of::<da_config>() + 193),
        22 => cfg.grouping = inp.byte() as u32,
        23 => cfg.num_group_sizes = inp.below(7),
        _ => {}
    }
    // Room past the struct, so that a fuzzed `struct_size` up to 256 stays
    // inside memory the harness owns; its bytes are a newer header's fields.
    #[repr(C)]
    struct Padded {
        cfg: da_config,
        newer: [u8; 192],
    }
    let mut padded = Padded { cfg, newer: [0; 192] };
    if inp.one_in(8) {
        padded.newer[inp.below(192)] = inp.byte();
    }
    let config_ptr: *const da_config = if inp.one_in(40) { null() } else { &padded.cfg };

    let mut ctx = null_mut();
    // SAFETY: `ctx` is writable.
    assert_eq!(unsafe { da_context_new(&mut ctx) }, da_status::Ok);
    let ctx_arg = if inp.one_in(40) { null_mut() } else { ctx };

    let mut regions = Vec::new();
    let q = tensor(&mut inp, &mut arena, &mut regions, 0, [b, n, hq, d], dtype, false);
    let k = tensor(&mut inp, &mut arena, &mut regions, 1, [b, m, hk, d], dtype, false);
    let v = tensor(&mut inp, &mut arena, &mut regions, 2, [b, m, hk, dv], dtype, false);
    // The attention output, or the forward's output that a backward pass reads.
    let out = tensor(&mut inp, &mut arena, &mut regions, 3, [b, n, hq, dv], 0, attends);
    let descs: [*const da_tensor; 4] =
        [&q, &k, &v, &out].map(|t| if inp.one_in(60) { null() } else { t as *const da_tensor });
    let lse = if backward || inp.one_in(2) {
        buffer::<f32>(&mut inp, &mut arena, &mut regions, 4, Role::Lse, b * hq * n, attends)
    } else {
        (null_mut(), 0)
    };
    let blocks = n.div_ceil(cfg.block_rows.max(1));
    let plan_entries = b * hq * blocks * d;

    // The plan read by da_attention, da_estimate_errors and da_attention_backward:
    // a real plan of Q (copied into the arena), or the arena's bytes; for the
    // estimate sometimes none (it plans itself).
    let mut plan_in = (null::<u16>(), 0usize);
    if matches!(which, 2 | 9 | 10) && !(which == 9 && inp.one_in(3)) {
        let (p, len) = buffer::<u16>(&mut inp, &mut arena, &mut regions, 5, Role::Plan, plan_entries, false);
        if inp.below(3) < 2 && !p.is_null() && !q.data.is_null() {
            let mut tmp = vec![0u16; len];
            // SAFETY: `tmp` holds `len` entries; Q and K are valid descriptors or rejected.
            let s = unsafe { da_plan_with_keys(ctx, &padded.cfg, &q, &k, tmp.as_mut_ptr(), len) };
            if s == da_status::Ok {
                // SAFETY: `p` addresses `len` entries of the arena, maybe misaligned:
                // copied as bytes.
                unsafe { core::ptr::copy_nonoverlapping(tmp.as_ptr().cast::<u8>(), p.cast::<u8>(), 2 * len) };
            }
        }
        plan_in = (p.cast_const(), len);
    }
    // The table read by da_load_group_sizes, in the arena.
    let mut table_in = (null::<c_char>(), 0usize);
    if which == 13 {
        let text = table(&mut inp, hq);
        let offset = 6 * SLOT_BYTES + inp.below(1024);
        let len = text.len().min(SLOT_BYTES);
        // SAFETY: `len` bytes from `offset` lie inside the arena (slot 6 and the next).
        unsafe { core::ptr::copy_nonoverlapping(text.as_ptr(), arena.base().add(offset), len) };
        regions.push(Region { slot: 6, start: offset, bytes: Some(len), written: false, role: Role::Other });
        table_in = (arena.base().wrapping_add(offset).cast_const().cast(), len);
        if inp.one_in(30) {
            table_in.0 = null();
        }
    }
    let snapshot = arena.bytes().to_vec();
    let mut table_heads = 0usize;

    // SAFETY (every call): each pointer is NULL or addresses memory of the
    // arena (or of this frame) for the extent it claims; claims whose size
    // overflows are passed on purpose and must be rejected unread.
    let status = unsafe {
        match which {
            0 => {
                let mut shape = da_plan_shape::default();
                let s = da_get_plan_shape(config_ptr, descs[0], &mut shape);
                if s == da_status::Ok {
                    assert_eq!(shape.num_entries, shape.batch * shape.heads * shape.blocks * shape.head_dim);
                }
                s
            }
            1 | 8 => {
                let (p, len) =
                    buffer::<u16>(&mut inp, &mut arena, &mut regions, 5, Role::Plan, plan_entries, true);
                let s = if which == 1 {
                    da_plan(ctx_arg, config_ptr, descs[0], p, len)
                } else {
                    da_plan_with_keys(ctx_arg, config_ptr, descs[0], descs[1], p, len)
                };
                if s == da_status::Ok {
                    check_plan(config_ptr, descs[0], p, len);
                }
                s
            }
            2 => {
                let [q, k, v, o] = descs;
                da_attention(ctx_arg, config_ptr, plan_in.0, plan_in.1, q, k, v, o, lse.0, lse.1)
            }
            3 => {
                let [q, k, v, o] = descs;
                da_exact_attention(ctx_arg, config_ptr, q, k, v, o, lse.0, lse.1)
            }
            4 => {
                let (p, len) = if inp.one_in(2) {
                    buffer::<u16>(&mut inp, &mut arena, &mut regions, 5, Role::Plan, plan_entries, true)
                } else {
                    (null_mut(), 0)
                };
                let [q, k, v, o] = descs;
                let s = da_forward(ctx_arg, config_ptr, q, k, v, o, lse.0, lse.1, p, len);
                if s == da_status::Ok && !p.is_null() {
                    check_plan(config_ptr, q, p, len);
                }
                s
            }
            5 => {
                let mut len = 0usize;
                let s = da_projections_len(config_ptr, &mut len);
                let (p, room) = buffer::<f32>(&mut inp, &mut arena, &mut regions, 6, Role::Other, len, true);
                let s2 = da_projections(config_ptr, p, room);
                assert!(s != da_status::Ok || s2 != da_status::Ok || room >= len);
                s2
            }
            6 => {
                let (p, room) = buffer::<u8>(
                    &mut inp,
                    &mut arena,
                    &mut regions,
                    6,
                    Role::Other,
                    size_of::<da_config>(),
                    true,
                );
                da_config_default(p.cast(), room)
            }
            7 => {
                let (p, room) =
                    buffer::<c_char>(&mut inp, &mut arena, &mut regions, 6, Role::Other, 40, true);
                let before = message().len();
                let n = da_last_error_copy(p, room);
                assert_eq!(n, before);
                da_status::Ok
            }
            9 => {
                let mut outs = [(null_mut::<f64>(), 0usize); 3];
                for (slot, o) in (11..14).zip(outs.iter_mut()) {
                    if !inp.one_in(4) {
                        *o = buffer::<f64>(
                            &mut inp,
                            &mut arena,
                            &mut regions,
                            slot,
                            Role::PerBatchHead(8),
                            b * hq,
                            true,
                        );
                    }
                }
                let len = outs.iter().map(|o| o.1).min().unwrap_or(0);
                let sample_rows = [0, 1, 3, 16, usize::MAX][inp.below(5)];
                let [q, k, v, _] = descs;
                let s = da_estimate_errors(
                    ctx_arg,
                    config_ptr,
                    plan_in.0,
                    plan_in.1,
                    q,
                    k,
                    v,
                    sample_rows,
                    outs[0].0,
                    outs[1].0,
                    outs[2].0,
                    len,
                );
                if s == da_status::Ok {
                    // The two estimates are never negative; the sampled error
                    // (third output) is NaN where no row was sampled.
                    let sampled = sample_rows.min((*descs[0]).seq);
                    for (i, (p, _)) in outs.iter().enumerate().filter(|(_, o)| !o.0.is_null()) {
                        let count = (*descs[0]).batch * (*descs[0]).heads;
                        // SAFETY: written by the call; `count` doubles.
                        let xs = core::slice::from_raw_parts(*p, count);
                        let ok = |x: f64| x >= 0.0 || (i == 2 && sampled == 0 && x.is_nan());
                        assert!(xs.iter().all(|&x| ok(x)), "negative error estimate (output {i}): {xs:?}");
                    }
                }
                s
            }
            10 | 11 => {
                let d_out = tensor(&mut inp, &mut arena, &mut regions, 7, [b, n, hq, dv], 0, false);
                let dq = tensor(&mut inp, &mut arena, &mut regions, 8, [b, n, hq, d], 0, true);
                let dk = tensor(&mut inp, &mut arena, &mut regions, 9, [b, m, hk, d], 0, true);
                let dv_t = tensor(&mut inp, &mut arena, &mut regions, 10, [b, m, hk, dv], 0, true);
                let grads: [*const da_tensor; 4] = [&d_out, &dq, &dk, &dv_t].map(|t| {
                    if inp.one_in(60) {
                        null()
                    } else {
                        t as *const da_tensor
                    }
                });
                let [q, k, v, o] = descs;
                let lse = (lse.0.cast_const(), lse.1);
                if which == 10 {
                    let (p, len) = plan_in;
                    da_attention_backward(
                        ctx_arg, config_ptr, p, len, q, k, v, o, lse.0, lse.1, grads[0], grads[1], grads[2],
                        grads[3],
                    )
                } else {
                    da_exact_attention_backward(
                        ctx_arg, config_ptr, q, k, v, o, lse.0, lse.1, grads[0], grads[1], grads[2], grads[3],
                    )
                }
            }
            12 => {
                let count = 1 + inp.below(2);
                let arrays: [Vec<da_tensor>; 3] = [vec![q; count], vec![k; count], vec![v; count]];
                let ptrs = arrays.each_ref().map(|a| if inp.one_in(40) { null() } else { a.as_ptr() });
                let num_samples = if inp.one_in(20) { 0 } else { count };
                let candidates: Vec<u32> =
                    (0..inp.below(4)).map(|_| [2, 4, 8, 1, 0, 3, 16][inp.below(7)]).collect();
                let cand_ptr =
                    if candidates.is_empty() && inp.one_in(2) { null() } else { candidates.as_ptr() };
                let kind = [0, 1, 0, 1, 2, 77][inp.below(6)];
                let target = [0.0, 0.1, 0.5, 1.0, 2.0, 0.99, -1.0, f64::NAN][inp.below(8)];
                let (gs, gs_len) =
                    buffer::<u32>(&mut inp, &mut arena, &mut regions, 11, Role::PerHead(4), hq, true);
                let mut heads = gs_len;
                let mut per_head =
                    |inp: &mut Input<'_>, arena: &mut Arena, regions: &mut Vec<Region>, slot| {
                        if inp.one_in(3) {
                            return null_mut();
                        }
                        let (p, len) = buffer::<f64>(inp, arena, regions, slot, Role::PerHead(8), hq, true);
                        heads = heads.min(len);
                        p
                    };
                let measured = per_head(&mut inp, &mut arena, &mut regions, 12);
                let estimated = per_head(&mut inp, &mut arena, &mut regions, 13);
                // Every per-head output claims `heads` entries (within what the harness owns).
                for r in regions.iter_mut() {
                    if let Role::PerHead(elem) = r.role {
                        r.bytes = r.bytes.map(|b| b.min(heads * elem));
                    }
                }
                let flop_saving = if inp.one_in(2) {
                    scalar::<f64>(&mut inp, &mut arena, &mut regions, 14)
                } else {
                    null_mut()
                };
                let met = if inp.one_in(2) {
                    scalar::<u32>(&mut inp, &mut arena, &mut regions, 15)
                } else {
                    null_mut()
                };
                let s = da_choose_group_sizes(
                    config_ptr,
                    ptrs[0],
                    ptrs[1],
                    ptrs[2],
                    num_samples,
                    cand_ptr,
                    candidates.len(),
                    kind,
                    target,
                    gs,
                    measured,
                    estimated,
                    heads,
                    flop_saving,
                    met,
                );
                if s == da_status::Ok {
                    // SAFETY: written by the call: one size per query head.
                    let sizes = core::slice::from_raw_parts(gs, q.heads);
                    assert!(sizes.iter().all(|&g| g == 1 || candidates.contains(&g)), "sizes {sizes:?}");
                }
                s
            }
            _ => {
                let layer = std::ffi::CString::new(format!("layer{}", inp.below(4))).unwrap();
                let file = [
                    None,
                    Some(c"f0.safetensors"),
                    Some(c"f1.safetensors"),
                    Some(c"dir/f1.safetensors"),
                    Some(c"nope"),
                ][inp.below(5)];
                let (gs, cap) = if inp.one_in(4) {
                    (null_mut(), 0)
                } else {
                    buffer::<u32>(&mut inp, &mut arena, &mut regions, 11, Role::TableSizes, hq, true)
                };
                let heads = scalar::<usize>(&mut inp, &mut arena, &mut regions, 12);
                let cfg_out: *mut da_config = if inp.one_in(2) { null_mut() } else { &mut padded.cfg };
                let layer_ptr = if inp.one_in(40) { null() } else { layer.as_ptr() };
                let s = da_load_group_sizes(
                    table_in.0,
                    table_in.1,
                    file.map_or(null(), |f| f.as_ptr()),
                    layer_ptr,
                    gs,
                    cap,
                    heads,
                    cfg_out,
                );
                if s == da_status::Ok {
                    table_heads = heads.read_unaligned();
                    assert!(table_heads >= 1);
                    if !gs.is_null() {
                        // SAFETY: written by the call.
                        let sizes = core::slice::from_raw_parts(gs, table_heads);
                        assert!(sizes.iter().all(|&g| g >= 1), "sizes {sizes:?}");
                    }
                }
                s
            }
        }
    };
    assert_ne!(status, da_status::Panic, "panic reached the boundary: {}", message());
    if which != 7 {
        assert_eq!(
            status == da_status::Ok,
            message().is_empty(),
            "status {status:?}, message {:?}",
            message()
        );
    }

    // Nothing outside the writable regions changed; nothing at all on failure.
    let after = arena.bytes();
    for (i, (x, y)) in snapshot.iter().zip(after).enumerate() {
        if x != y {
            let allowed = status == da_status::Ok
                && regions
                    .iter()
                    .any(|r| r.written && r.bytes.is_some_and(|len| (r.start..r.start + len).contains(&i)));
            assert!(allowed, "byte {i} of the arena changed (status {status:?}, call {which})");
        }
    }
    if status == da_status::Ok && !matches!(which, 0 | 5 | 6 | 7) {
        // A successful call had disjoint written buffers, over the part of
        // each buffer the call uses.
        let lse_bytes = q.batch * q.heads * q.seq * 4;
        let plan_bytes = if regions.iter().any(|r| r.role == Role::Plan) {
            let mut shape = da_plan_shape::default();
            // SAFETY: the call succeeded with this config and Q.
            assert_eq!(unsafe { da_get_plan_shape(config_ptr, descs[0], &mut shape) }, da_status::Ok);
            2 * shape.num_entries
        } else {
            0
        };
        let used = |r: &Region| {
            let cap = match r.role {
                Role::Lse => lse_bytes,
                Role::Plan => plan_bytes,
                Role::PerBatchHead(elem) => q.batch * q.heads * elem,
                Role::PerHead(elem) => q.heads * elem,
                Role::TableSizes => 4 * table_heads,
                Role::Tensor | Role::Other => usize::MAX,
            };
            Region { bytes: r.bytes.map(|b| b.min(cap)), ..*r }
        };
        // The arguments of the call, by slot (other regions were made but not passed).
        let passed: &[usize] = match which {
            1 => &[0, 5],
            8 => &[0, 1, 5],
            9 => &[0, 1, 2, 5, 11, 12, 13],
            10 | 11 => &[0, 1, 2, 3, 4, 5, 7, 8, 9, 10],
            12 => &[0, 1, 2, 11, 12, 13, 14, 15],
            13 => &[6, 11, 12],
            _ => &[0, 1, 2, 3, 4, 5],
        };
        let regions: Vec<Region> = regions.iter().filter(|r| passed.contains(&r.slot)).map(used).collect();
        for (i, r) in regions.iter().enumerate() {
            for o in &regions[i + 1..] {
                assert!(
                    !(r.written || o.written) || !r.overlaps(o),
                    "written buffer overlapped: {r:?} {o:?}"
                );
            }
        }
        if (2..=4).contains(&which)
            && finite
            && dtype == 0
            && q.dtype == 0
            && (v.data as usize).is_multiple_of(4)
            && (out.data as usize).is_multiple_of(4)
        {
            check_output_range(&arena, &v, &out);
        }
    }
    // SAFETY: created above, freed once.
    unsafe { da_context_free(ctx) };
    (which, status)
}

/// A successful plan is a permutation in every block.
///
/// # Safety
/// `p` addresses `len` entries; `config` and `q` are valid (the call succeeded).
unsafe fn check_plan(config: *const da_config, q: *const da_tensor, p: *const u16, len: usize) {
    let mut shape = da_plan_shape::default();
    // SAFETY: forwarded.
    assert_eq!(unsafe { da_get_plan_shape(config, q, &mut shape) }, da_status::Ok);
    assert!(len >= shape.num_entries);
    // SAFETY: `len` entries.
    let plan = unsafe { core::slice::from_raw_parts(p, shape.num_entries) };
    for block in plan.chunks(shape.head_dim) {
        let mut seen = vec![false; shape.head_dim];
        for &c in block {
            assert!(!core::mem::replace(&mut seen[c as usize], true), "plan block is not a permutation");
        }
    }
}

/// Output rows are convex combinations of V rows (or 0 for a row that sees no key).
fn check_output_range(arena: &Arena, v: &da_tensor, out: &da_tensor) {
    let floats = |t: &da_tensor| {
        let l = Layout::contiguous(t.batch, t.seq, t.heads, t.head_dim);
        let l = Layout {
            stride_batch: t.stride_batch,
            stride_seq: t.stride_seq,
            stride_head: t.stride_head,
            ..l
        };
        let start = (t.data as usize - arena.words.as_ptr() as usize) / 4;
        let mut xs = Vec::new();
        for b in 0..l.batch {
            for s in 0..l.seq {
                for h in 0..l.heads {
                    for j in 0..l.dim {
                        let i = start + l.offset(b, s, h) + j;
                        let w = arena.words[i / 2];
                        xs.push(f32::from_bits(if i.is_multiple_of(2) {
                            w as u32
                        } else {
                            (w >> 32) as u32
                        }));
                    }
                }
            }
        }
        xs
    };
    let vs = floats(v);
    let lo = vs.iter().fold(0f32, |a, &b| a.min(b));
    let hi = vs.iter().fold(0f32, |a, &b| a.max(b));
    let tol = 1e-4 * (1.0 + hi - lo);
    for o in floats(out) {
        assert!(o >= lo - tol && o <= hi + tol, "output {o} outside [{lo}, {hi}]");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::da_status;

    /// The harness on a fixed set of inputs: what CI runs of the fuzz target.
    /// It must reach success for every call kind and most error classes, or
    /// it would test little.
    #[test]
    fn fuzz_harness_on_fixed_inputs() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut seen: HashMap<(usize, da_status), usize> = HashMap::new();
        *seen.entry(super::run(&[])).or_default() += 1;
        for case in 0..6000 {
            let len = (next() % 200) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = input.first_mut() {
                *first = (case % super::CALL_KINDS) as u8;
            }
            *seen.entry(super::run(&input)).or_default() += 1;
        }
        for which in 0..super::CALL_KINDS {
            if which == super::CUDA_KIND && !cfg!(feature = "cuda") {
                // Without the feature every CUDA call is refused.
                assert!(seen.contains_key(&(which, da_status::CudaUnavailable)), "{seen:?}");
                continue;
            }
            assert!(
                seen.contains_key(&(which, da_status::Ok)),
                "call kind {which} never succeeded: {seen:?}"
            );
        }
        for status in [
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
            da_status::BadTable,
            da_status::NotFound,
        ] {
            assert!(seen.keys().any(|&(_, s)| s == status), "{status:?} never returned: {seen:?}");
        }
    }
}
