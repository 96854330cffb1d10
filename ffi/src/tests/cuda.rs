//! The `da_cuda_*` entry points without a GPU: what a build without the
//! `cuda` feature answers, the handle's error paths, and (with the feature)
//! every argument check, which runs before any CUDA call on addresses that
//! are never dereferenced. The device paths run in `examples-c/cuda_*.cu` and
//! the Python tests on a GPU.

use core::ptr::{null, null_mut};

use super::{config, desc_raw, expect, message};
use crate::*;

/// Every compute entry point with a NULL handle and otherwise NULL arguments.
fn null_handle_calls() -> [da_status; 6] {
    let cfg = config();
    // SAFETY: NULL handles and pointers are rejected before anything is read.
    unsafe {
        [
            da_cuda_plan(null_mut(), &cfg, null(), null_mut(), 0, null_mut()),
            da_cuda_attention(
                null_mut(),
                &cfg,
                null(),
                0,
                null(),
                null(),
                null(),
                null(),
                null_mut(),
                0,
                null_mut(),
            ),
            da_cuda_exact_attention(
                null_mut(),
                &cfg,
                null(),
                null(),
                null(),
                null(),
                null_mut(),
                0,
                null_mut(),
            ),
            da_cuda_forward(
                null_mut(),
                &cfg,
                null(),
                null(),
                null(),
                null(),
                null_mut(),
                0,
                null_mut(),
                0,
                null_mut(),
            ),
            da_cuda_attention_backward(
                null_mut(),
                &cfg,
                null(),
                0,
                null(),
                null(),
                null(),
                null(),
                null(),
                0,
                null(),
                null(),
                null(),
                null(),
                null_mut(),
                0,
                null_mut(),
            ),
            da_cuda_exact_attention_backward(
                null_mut(),
                &cfg,
                null(),
                null(),
                null(),
                null(),
                null(),
                0,
                null(),
                null(),
                null(),
                null(),
                null_mut(),
                0,
                null_mut(),
            ),
        ]
    }
}

#[test]
fn handle_error_paths() {
    assert_eq!(da_cuda_built(), u32::from(cfg!(feature = "cuda")));
    let mut handle = core::ptr::dangling_mut::<da_cuda_context>();
    // SAFETY: `handle` is writable.
    let status = unsafe { da_cuda_context_create(&mut handle) };
    assert!(handle.is_null(), "a failed create leaves NULL behind");
    if cfg!(feature = "cuda") {
        // No CUDA context is current in the test process (nothing here uses the
        // runtime API), so creation fails on any machine: without a GPU in
        // cuInit, with one for want of a current context.
        expect(status, da_status::CudaError, "cu");
        let msg = message();
        assert!(msg.contains("cuInit failed") || msg.contains("no CUDA context is current"), "{msg}");
        // SAFETY: NULL is rejected.
        expect(unsafe { da_cuda_context_create(null_mut()) }, da_status::NullPointer, "out is NULL");
        for s in null_handle_calls() {
            assert_eq!(s, da_status::NullPointer);
            assert_eq!(message(), "context is NULL");
        }
    } else {
        expect(status, da_status::CudaUnavailable, "built without CUDA");
        // SAFETY: as above.
        expect(
            unsafe { da_cuda_context_create(null_mut()) },
            da_status::CudaUnavailable,
            "built without CUDA",
        );
        for s in null_handle_calls() {
            assert_eq!(s, da_status::CudaUnavailable);
            assert!(message().contains("built without CUDA"));
        }
        // The workspace query needs no handle, but the backend all the same.
        let cfg = config();
        let q = desc_raw(null(), da_dtype::Bf16, distr_attention_core::Layout::contiguous(1, 8, 2, 64));
        let mut size = 7usize;
        // SAFETY: live host structs.
        let s = unsafe { da_cuda_backward_workspace_size(&cfg, &q, &q, &mut size) };
        expect(s, da_status::CudaUnavailable, "built without CUDA");
        assert_eq!(size, 7, "nothing written");
    }
    // SAFETY: NULL is allowed.
    unsafe { da_cuda_context_destroy(null_mut()) };
}

#[test]
fn statuses_of_the_cuda_entry_points() {
    // SAFETY: static strings.
    let text =
        |s: da_status| unsafe { core::ffi::CStr::from_ptr(da_status_string(s as u32)) }.to_str().unwrap();
    assert_eq!(da_status::CudaError as u32, 18);
    assert_eq!(da_status::CudaUnavailable as u32, 19);
    assert_eq!(text(da_status::CudaError), "a CUDA call failed");
    assert_eq!(text(da_status::CudaUnavailable), "this library was built without CUDA");
}

/// Addresses of a fake device heap, 1 GiB apart: the checks compute with them
/// and never read them (nothing is mapped there, so a read would crash the test).
#[cfg(feature = "cuda")]
fn addr(slot: usize) -> *const core::ffi::c_void {
    const HEAP: usize = 0x4000_0000_0000;
    const SPAN: usize = 1 << 30;
    (HEAP + slot * SPAN) as *const core::ffi::c_void
}

#[cfg(feature = "cuda")]
mod checks {
    use core::ffi::c_void;
    use core::ptr::{null, null_mut};

    use distr_attention_core::Layout;

    use super::super::{config, desc_raw, expect};
    use super::addr;
    use crate::cuda::imp::{check_call, PlanOut};
    use crate::cuda::Mode;
    use crate::error::boundary;
    use crate::*;

    /// A valid call: bf16 Q [2, 100, 4, 64], K and V [2, 100, 2, 64], bf16
    /// output, lse and a plan of the right sizes; causal, G = 2, l = 64.
    struct Call {
        cfg: da_config,
        t: [da_tensor; 4],
        lse: *mut f32,
        lse_len: usize,
        plan: *mut u16,
        plan_len: usize,
        sizes: [u32; 4],
    }

    impl Call {
        fn new() -> Call {
            let (b, n, hq, hk, d) = (2, 100, 4, 2, 64);
            let mut cfg = config();
            cfg.causal = 1;
            let lq = Layout::contiguous(b, n, hq, d);
            let lk = Layout::contiguous(b, n, hk, d);
            Call {
                cfg,
                t: [
                    desc_raw(addr(0), da_dtype::Bf16, lq),
                    desc_raw(addr(1), da_dtype::Bf16, lk),
                    desc_raw(addr(2), da_dtype::Bf16, lk),
                    desc_raw(addr(3), da_dtype::Bf16, lq),
                ],
                lse: addr(4) as *mut f32,
                lse_len: b * hq * n,
                plan: addr(5) as *mut u16,
                plan_len: b * hq * n.div_ceil(64) * d,
                sizes: [1, 2, 4, 8],
            }
        }

        /// The status and message of the checks of `mode`.
        fn check(&self, mode: Mode) -> da_status {
            let descs = self.t.each_ref().map(|t| t as *const da_tensor);
            let mut storage = Vec::new();
            // SAFETY: the config and descriptors are live host structs.
            boundary(|| unsafe {
                check_call(&self.cfg, mode, descs, self.lse, self.lse_len, &mut storage).map(|_| ())
            })
        }

        fn plan_out(&self, mode: Mode) -> PlanOut {
            let descs = self.t.each_ref().map(|t| t as *const da_tensor);
            let mut storage = Vec::new();
            // SAFETY: as above.
            unsafe { check_call(&self.cfg, mode, descs, self.lse, self.lse_len, &mut storage) }
                .unwrap()
                .plan_out
        }

        fn attention(&self) -> Mode {
            Mode::Attention(self.plan, self.plan_len)
        }

        fn forward(&self) -> Mode {
            Mode::Forward(self.plan, self.plan_len)
        }

        fn plan_mode(&self) -> Mode {
            Mode::Plan(self.plan, self.plan_len)
        }
    }

    #[test]
    fn valid_calls_pass_the_checks() {
        let c = Call::new();
        for mode in [c.plan_mode(), c.attention(), Mode::Exact, c.forward(), Mode::Forward(null_mut(), 0)] {
            expect(c.check(mode), da_status::Ok, "");
        }
        assert_eq!(
            c.plan_out(c.forward()),
            PlanOut::Caller(distr_attention_cuda::RawBuffer { ptr: c.plan as u64, len: c.plan_len })
        );
        // Without a plan buffer the forward plans into a workspace ...
        assert_eq!(c.plan_out(Mode::Forward(null_mut(), 0)), PlanOut::Workspace(c.plan_len));
        // ... unless no head needs a plan.
        let mut g1 = Call::new();
        g1.cfg.group_size = 1;
        assert_eq!(g1.plan_out(Mode::Forward(null_mut(), 0)), PlanOut::None);
        expect(g1.check(Mode::Attention(null(), 0)), da_status::Ok, "");
        // f32 output, no lse, per-head group sizes, block_rows 128, sample fusion.
        let mut c = Call::new();
        c.t[3].dtype = da_dtype::F32 as u32;
        c.lse = null_mut();
        c.cfg.group_sizes = c.sizes.as_ptr();
        c.cfg.num_group_sizes = 4;
        c.cfg.block_rows = 128;
        c.plan_len = 2 * 4 * 64;
        c.cfg.fusion = da_fusion::Sample as u32;
        expect(c.check(c.forward()), da_status::Ok, "");
        expect(c.check(c.attention()), da_status::Ok, "");
        // Exact attention validates the config but needs no supported block_rows.
        let mut c = Call::new();
        c.cfg.block_rows = 32;
        c.plan_len *= 2;
        expect(c.check(Mode::Exact), da_status::Ok, "");
        expect(c.check(c.attention()), da_status::Unsupported, "block_rows");
    }

    #[test]
    fn null_pointers() {
        let c = Call::new();
        let mut x = Call::new();
        x.t[1].data = null();
        expect(x.check(c.forward()), da_status::NullPointer, "k: data pointer is NULL");
        expect(c.check(Mode::Plan(null_mut(), 10)), da_status::NullPointer, "plan");
        // A plan is needed once some head has G > 1.
        expect(c.check(Mode::Attention(null(), 0)), da_status::NullPointer, "no plan was given");
        let descs = c.t.each_ref().map(|t| t as *const da_tensor);
        let mut storage = Vec::new();
        // SAFETY: NULL config and descriptors are rejected unread.
        let s = boundary(|| unsafe {
            check_call(null(), Mode::Exact, descs, null_mut(), 0, &mut storage).map(|_| ())
        });
        expect(s, da_status::NullPointer, "config is NULL");
        let s = boundary(|| unsafe {
            check_call(
                &c.cfg,
                Mode::Exact,
                [descs[0], descs[1], null(), descs[3]],
                null_mut(),
                0,
                &mut storage,
            )
            .map(|_| ())
        });
        expect(s, da_status::NullPointer, "v: tensor descriptor is NULL");
    }

    #[test]
    fn shapes_sizes_and_configs() {
        let c = Call::new();
        let mut x = Call::new();
        x.t[1].head_dim = 32;
        expect(x.check(c.forward()), da_status::ShapeMismatch, "k: dimension head_dim");
        let mut x = Call::new();
        x.t[0].heads = 3;
        expect(x.check(c.forward()), da_status::ShapeMismatch, "multiple");
        let mut x = Call::new();
        x.t[0].seq = 0;
        expect(x.check(c.plan_mode()), da_status::InvalidShape, "q: dimension seq is zero");
        let mut x = Call::new();
        x.t[0].stride_batch = usize::MAX / 2;
        expect(x.check(c.forward()), da_status::SizeOverflow, "address space");
        let mut x = Call::new();
        x.lse_len -= 1;
        expect(x.check(x.forward()), da_status::BufferTooSmall, "lse");
        let mut x = Call::new();
        x.plan_len -= 1;
        expect(x.check(x.attention()), da_status::BufferTooSmall, "plan");
        expect(x.check(x.forward()), da_status::BufferTooSmall, "plan");
        expect(x.check(x.plan_mode()), da_status::BufferTooSmall, "plan");
        let mut x = Call::new();
        x.cfg.group_size = 3;
        expect(x.check(x.forward()), da_status::BadConfig, "group size 3");
        let mut x = Call::new();
        x.cfg.block_rows = 0;
        expect(x.check(x.plan_mode()), da_status::BadConfig, "block_rows");
        let mut x = Call::new();
        x.cfg.num_group_sizes = 3;
        x.cfg.group_sizes = x.sizes.as_ptr();
        expect(x.check(x.forward()), da_status::BadConfig, "per-head group sizes");
        let mut x = Call::new();
        x.t[2].dtype = 7;
        expect(x.check(x.forward()), da_status::InvalidArgument, "v: dtype 7");
    }

    #[test]
    fn what_the_kernels_do_not_cover() {
        let mut x = Call::new();
        for t in x.t.iter_mut().take(3) {
            t.dtype = da_dtype::F32 as u32;
        }
        expect(x.check(x.forward()), da_status::Unsupported, "q: element type not supported");
        let mut x = Call::new();
        x.t[3].dtype = da_dtype::F16 as u32;
        expect(x.check(x.forward()), da_status::Unsupported, "output: element type");
        let mut x = Call::new();
        x.t[1].dtype = da_dtype::F16 as u32;
        expect(x.check(x.forward()), da_status::Unsupported, "k: element type");
        let mut x = Call::new();
        x.cfg.group_size = 16;
        expect(x.check(x.forward()), da_status::Unsupported, "group size 16");
        let mut x = Call::new();
        x.cfg.block_rows = 32;
        x.plan_len *= 2;
        expect(x.check(x.forward()), da_status::Unsupported, "block_rows");
        // Similarity plans need only Q; key-weighted ones need K, which
        // da_cuda_plan does not take.
        let mut x = Call::new();
        x.cfg.grouping = da_grouping::Similarity as u32;
        expect(x.check(x.plan_mode()), da_status::Ok, "");
        expect(x.check(x.forward()), da_status::Ok, "");
        x.cfg.group_size = 16;
        expect(x.check(x.plan_mode()), da_status::Unsupported, "group size 16");
        let mut x = Call::new();
        x.cfg.grouping = da_grouping::KeyWeighted as u32;
        expect(x.check(x.plan_mode()), da_status::Unsupported, "keys");
        expect(x.check(x.forward()), da_status::Ok, "");
        // Head dimension 16: the plan kernel takes it, the attention kernels do not.
        let mut x = Call::new();
        for t in x.t.iter_mut() {
            *t = desc_raw(t.data, da_dtype::Bf16, Layout::contiguous(t.batch, t.seq, t.heads, 16));
        }
        x.plan_len = 2 * 4 * 2 * 16;
        expect(x.check(x.plan_mode()), da_status::Ok, "");
        expect(x.check(x.forward()), da_status::Unsupported, "head");
        // A newer header's config field.
        #[repr(C)]
        struct Newer {
            cfg: da_config,
            extra: u64,
        }
        let c = Call::new();
        let newer =
            Newer { cfg: da_config { struct_size: core::mem::size_of::<Newer>(), ..c.cfg }, extra: 1 };
        let descs = c.t.each_ref().map(|t| t as *const da_tensor);
        // SAFETY: `newer` holds `struct_size` bytes.
        let s = boundary(|| unsafe {
            check_call(&newer.cfg, Mode::Exact, descs, null_mut(), 0, &mut Vec::new()).map(|_| ())
        });
        expect(s, da_status::Unsupported, "newer header");
    }

    #[test]
    fn alignment_and_overlaps() {
        let mut x = Call::new();
        x.t[0].data = (addr(0) as usize + 2) as *const c_void;
        expect(x.check(x.forward()), da_status::MisalignedPointer, "q: address must be 16-byte aligned");
        let mut x = Call::new();
        x.t[0].data = (addr(0) as usize + 1) as *const c_void;
        expect(x.check(x.forward()), da_status::MisalignedPointer, "q: data pointer");
        let mut x = Call::new();
        x.t[1].stride_seq = 2 * 64 + 4;
        x.t[1].stride_batch = 100 * (2 * 64 + 4);
        expect(x.check(x.forward()), da_status::MisalignedPointer, "k: strides must be multiples of 8");
        let mut x = Call::new();
        x.t[0].stride_head = 68;
        x.t[0].stride_seq = 4 * 68;
        x.t[0].stride_batch = 100 * 4 * 68;
        x.plan_len = 2 * 4 * 2 * 64;
        // Strides that are multiples of 4 suit the plan kernel, not the attention kernels.
        expect(x.check(x.plan_mode()), da_status::Ok, "");
        expect(x.check(x.forward()), da_status::MisalignedPointer, "q: strides");
        let mut x = Call::new();
        x.t[3].stride_head = 65;
        x.t[3].stride_seq = 4 * 65;
        x.t[3].stride_batch = 100 * 4 * 65;
        expect(x.check(x.forward()), da_status::MisalignedPointer, "output: strides must be even");
        let mut x = Call::new();
        x.lse = (addr(4) as usize + 2) as *mut f32;
        expect(x.check(x.forward()), da_status::MisalignedPointer, "lse");
        // Outputs over inputs, over each other, and output elements sharing memory.
        let mut x = Call::new();
        x.t[3].data = addr(1);
        expect(
            x.check(x.forward()),
            da_status::OverlappingBuffers,
            "output: the buffer written overlaps the buffer of k",
        );
        let mut x = Call::new();
        x.lse = (addr(3) as usize + 64) as *mut f32;
        expect(x.check(x.forward()), da_status::OverlappingBuffers, "overlaps");
        let mut x = Call::new();
        x.plan = addr(2) as *mut u16;
        expect(x.check(x.forward()), da_status::OverlappingBuffers, "plan");
        expect(x.check(x.plan_mode()), da_status::Ok, "");
        x.plan = addr(0) as *mut u16;
        expect(
            x.check(x.plan_mode()),
            da_status::OverlappingBuffers,
            "plan: the buffer written overlaps the buffer of q",
        );
        // The attention only reads the plan: it may share memory with the inputs.
        let mut x = Call::new();
        x.plan = addr(3) as *mut u16;
        expect(x.check(x.attention()), da_status::OverlappingBuffers, "output");
        let mut x = Call::new();
        x.t[3].stride_head = 0;
        expect(x.check(x.forward()), da_status::OverlappingBuffers, "output");
        // Inputs may overlap each other (a packed QKV buffer).
        let mut x = Call::new();
        x.t[2].data = addr(1);
        expect(x.check(x.forward()), da_status::Ok, "");
    }
}

/// The backward entry points' checks (with the feature): every argument
/// before any CUDA call, on a fake device heap that is never read.
#[cfg(feature = "cuda")]
mod backward_checks {
    use core::ffi::c_void;
    use core::ptr::{null, null_mut};

    use distr_attention_core::{DType, Layout, Problem};

    use super::super::{config, desc_raw, expect};
    use super::addr;
    use crate::cuda::imp::{check_backward_call, BackwardWorkspace};
    use crate::cuda::Backward;
    use crate::error::boundary;
    use crate::*;

    /// A valid backward call: bf16 Q [2, 100, 6, 64], K and V [2, 90, 2, 64]
    /// (GQA 3:1), f32 O, bf16 dO, f32 dQ, bf16 dK and dV, causal, G = 2,
    /// l = 64, a plan and a caller's workspace of the size the query gives.
    struct Call {
        cfg: da_config,
        /// q, k, v, o, d_out, dq, dk, dv
        t: [da_tensor; 8],
        lse: *const f32,
        lse_len: usize,
        plan: *const u16,
        plan_len: usize,
        workspace: *mut c_void,
        workspace_size: usize,
        exact: bool,
        sizes: [u32; 6],
    }

    impl Call {
        fn new() -> Call {
            let (b, n, m, hq, hk, d) = (2, 100, 90, 6, 2, 64);
            let mut cfg = config();
            cfg.causal = 1;
            let (lq, lk) = (Layout::contiguous(b, n, hq, d), Layout::contiguous(b, m, hk, d));
            let bf = da_dtype::Bf16;
            let t = [
                desc_raw(addr(0), bf, lq),
                desc_raw(addr(1), bf, lk),
                desc_raw(addr(2), bf, lk),
                desc_raw(addr(3), da_dtype::F32, lq),
                desc_raw(addr(6), bf, lq),
                desc_raw(addr(7), da_dtype::F32, lq),
                desc_raw(addr(8), bf, lk),
                desc_raw(addr(9), bf, lk),
            ];
            let mut size = 0;
            // SAFETY: live host structs.
            let s = unsafe { da_cuda_backward_workspace_size(&cfg, &t[0], &t[4], &mut size) };
            expect(s, da_status::Ok, "");
            Call {
                cfg,
                t,
                lse: addr(4).cast(),
                lse_len: b * hq * n,
                plan: addr(5).cast(),
                plan_len: b * hq * n.div_ceil(64) * d,
                workspace: addr(10) as *mut c_void,
                workspace_size: size,
                exact: false,
                sizes: [1, 2, 4, 8, 2, 1],
            }
        }

        fn args(&self) -> Backward {
            let d = |i: usize| &self.t[i] as *const da_tensor;
            Backward {
                plan: (!self.exact).then_some((self.plan, self.plan_len)),
                inputs: [d(0), d(1), d(2), d(3), d(4)],
                lse: self.lse,
                lse_len: self.lse_len,
                grads: [d(5), d(6), d(7)],
                workspace: self.workspace,
                workspace_size: self.workspace_size,
            }
        }

        fn check(&self) -> da_status {
            let mut storage = Vec::new();
            // SAFETY: the config and descriptors are live host structs.
            boundary(|| unsafe { check_backward_call(&self.cfg, &self.args(), &mut storage).map(|_| ()) })
        }

        fn workspace(&self) -> BackwardWorkspace {
            let mut storage = Vec::new();
            // SAFETY: as above.
            unsafe { check_backward_call(&self.cfg, &self.args(), &mut storage) }.unwrap().workspace
        }

        fn query(&self) -> (da_status, usize) {
            let mut size = 0;
            // SAFETY: live host structs.
            let s = unsafe { da_cuda_backward_workspace_size(&self.cfg, &self.t[0], &self.t[4], &mut size) };
            (s, size)
        }
    }

    #[test]
    fn the_workspace_query_is_the_backends_length_in_bytes() {
        let c = Call::new();
        let (q, k) = (c.t[0], c.t[1]);
        let layout = |t: &da_tensor| Layout {
            batch: t.batch,
            seq: t.seq,
            heads: t.heads,
            dim: t.head_dim,
            ..Layout::contiguous(1, 1, 1, 1)
        };
        let p = Problem::new(&layout(&q), &layout(&k), &layout(&k)).unwrap();
        let want = |g: usize, d_out| {
            let cfg = distr_attention_core::Config::with_group_size(g);
            4 * distr_attention_cuda::backward_workspace_len(&cfg, &p, d_out).unwrap()
        };
        assert_eq!(c.query(), (da_status::Ok, want(2, DType::BF16)));
        // An f32 d_out needs room for its conversion; G = 1 needs no fused Q.
        let mut x = Call::new();
        x.t[4].dtype = da_dtype::F32 as u32;
        assert_eq!(x.query(), (da_status::Ok, want(2, DType::F32)));
        let mut x = Call::new();
        x.cfg.group_size = 1;
        let exact = x.query().1;
        assert_eq!(exact, want(1, DType::BF16));
        assert!(exact < c.workspace_size);
        // The data pointers are not read (NULL is fine), the shapes and config are.
        let mut x = Call::new();
        x.t[0].data = null();
        x.t[4].data = null();
        assert_eq!(x.query().0, da_status::Ok);
        let mut x = Call::new();
        x.cfg.group_size = 3;
        expect(x.query().0, da_status::BadConfig, "group size 3");
        let mut x = Call::new();
        x.t[0].seq = 0;
        expect(x.query().0, da_status::InvalidShape, "q: dimension seq is zero");
        let mut x = Call::new();
        x.t[4].dtype = 9;
        expect(x.query().0, da_status::InvalidArgument, "d_out: dtype 9");
        // SAFETY: NULL pointers are rejected unread.
        let s = unsafe { da_cuda_backward_workspace_size(&c.cfg, &c.t[0], &c.t[4], null_mut()) };
        expect(s, da_status::NullPointer, "size is NULL");
        // SAFETY: as above.
        let s = unsafe { da_cuda_backward_workspace_size(null(), &c.t[0], &c.t[4], &mut 0) };
        expect(s, da_status::NullPointer, "config is NULL");
    }

    #[test]
    fn valid_backward_calls_pass_the_checks() {
        let c = Call::new();
        expect(c.check(), da_status::Ok, "");
        assert_eq!(
            c.workspace(),
            BackwardWorkspace::Caller(distr_attention_cuda::RawBuffer {
                ptr: c.workspace as u64,
                len: c.workspace_size / 4
            })
        );
        // Without a workspace the call allocates one in stream order.
        let mut x = Call::new();
        x.workspace = null_mut();
        x.workspace_size = 0;
        assert_eq!(x.workspace(), BackwardWorkspace::Stream(c.workspace_size / 4));
        // The exact backward takes no plan, and a smaller workspace suffices.
        let mut x = Call::new();
        x.exact = true;
        x.plan = null();
        x.workspace_size = {
            let mut g1 = Call::new();
            g1.cfg.group_size = 1;
            g1.query().1
        };
        expect(x.check(), da_status::Ok, "");
        // A NULL plan is fine when every head has G = 1.
        let mut x = Call::new();
        x.cfg.group_size = 1;
        x.plan = null();
        x.workspace_size = x.query().1;
        expect(x.check(), da_status::Ok, "");
        // Every dtype choice of O, dO and the gradients: f32 or the inputs' type.
        for (o, d_out, grads) in
            [(da_dtype::Bf16, da_dtype::F32, da_dtype::F32), (da_dtype::F32, da_dtype::F32, da_dtype::Bf16)]
        {
            let mut x = Call::new();
            x.t[3].dtype = o as u32;
            x.t[4].dtype = d_out as u32;
            for g in &mut x.t[5..] {
                g.dtype = grads as u32;
            }
            x.workspace_size = x.query().1;
            expect(x.check(), da_status::Ok, "");
        }
        // f16 inputs, per-head group sizes, block_rows 128, sample fusion.
        let mut x = Call::new();
        for i in [0, 1, 2, 4, 6, 7] {
            x.t[i].dtype = da_dtype::F16 as u32;
        }
        x.cfg.group_sizes = x.sizes.as_ptr();
        x.cfg.num_group_sizes = 6;
        x.cfg.block_rows = 128;
        x.cfg.fusion = da_fusion::Sample as u32;
        x.plan_len = 2 * 6 * 64;
        x.workspace_size = x.query().1;
        expect(x.check(), da_status::Ok, "");
        // Inputs may overlap each other (a packed QKV buffer).
        let mut x = Call::new();
        x.t[2].data = addr(1);
        expect(x.check(), da_status::Ok, "");
    }

    #[test]
    fn bad_backward_arguments() {
        let mut x = Call::new();
        x.lse = null();
        expect(x.check(), da_status::NullPointer, "lse: pointer is NULL");
        let mut x = Call::new();
        x.lse_len -= 1;
        expect(x.check(), da_status::BufferTooSmall, "lse");
        let mut x = Call::new();
        x.plan_len -= 1;
        expect(x.check(), da_status::BufferTooSmall, "plan");
        let mut x = Call::new();
        x.plan = null();
        expect(x.check(), da_status::NullPointer, "no plan was given");
        let mut x = Call::new();
        x.t[5].data = null();
        expect(x.check(), da_status::NullPointer, "dq: data pointer is NULL");
        // Shapes.
        let mut x = Call::new();
        x.t[6].seq = 89;
        expect(x.check(), da_status::ShapeMismatch, "dk");
        let mut x = Call::new();
        x.t[4].heads = 3;
        expect(x.check(), da_status::ShapeMismatch, "d_out");
        let mut x = Call::new();
        x.t[3].seq = 99;
        expect(x.check(), da_status::ShapeMismatch, "output");
        // What the kernels do not cover.
        let mut x = Call::new();
        for i in [0, 1, 2] {
            x.t[i].dtype = da_dtype::F32 as u32;
        }
        expect(x.check(), da_status::Unsupported, "f16 or bf16");
        let mut x = Call::new();
        x.t[4].dtype = da_dtype::F16 as u32;
        expect(x.check(), da_status::Unsupported, "d_out: element type");
        let mut x = Call::new();
        x.t[7].dtype = da_dtype::F16 as u32;
        expect(x.check(), da_status::Unsupported, "the gradients");
        let mut x = Call::new();
        x.cfg.group_size = 16;
        expect(x.check(), da_status::Unsupported, "group size 16");
        let mut x = Call::new();
        x.cfg.group_size = 3;
        expect(x.check(), da_status::BadConfig, "group size 3");
        // The exact backward validates the config as the forward does.
        x.exact = true;
        expect(x.check(), da_status::BadConfig, "group size 3");
        // Alignment.
        let mut x = Call::new();
        x.t[4].data = (addr(6) as usize + 2) as *const c_void;
        expect(x.check(), da_status::MisalignedPointer, "d_out: address must be 16-byte aligned");
        let mut x = Call::new();
        x.t[5].stride_head = 65;
        x.t[5].stride_seq = 6 * 65;
        x.t[5].stride_batch = 100 * 6 * 65;
        expect(x.check(), da_status::MisalignedPointer, "dq: strides must be even");
        let mut x = Call::new();
        x.lse = (addr(4) as usize + 2) as *const f32;
        expect(x.check(), da_status::MisalignedPointer, "lse");
        // The workspace: size in bytes, 16-byte alignment, no overlap.
        let mut x = Call::new();
        x.workspace_size -= 1;
        expect(x.check(), da_status::BufferTooSmall, "workspace: ");
        let mut x = Call::new();
        x.workspace = (addr(10) as usize + 8) as *mut c_void;
        expect(x.check(), da_status::MisalignedPointer, "workspace: pointer");
        let mut x = Call::new();
        x.workspace = addr(7) as *mut c_void;
        expect(x.check(), da_status::OverlappingBuffers, "overlaps");
        // Gradients over inputs or each other.
        let mut x = Call::new();
        x.t[5].data = addr(0);
        x.t[5].dtype = da_dtype::Bf16 as u32;
        expect(x.check(), da_status::OverlappingBuffers, "dq: the buffer written overlaps the buffer of q");
        let mut x = Call::new();
        x.t[7].data = addr(8);
        expect(x.check(), da_status::OverlappingBuffers, "dk");
        let mut x = Call::new();
        x.t[6].data = addr(4);
        expect(x.check(), da_status::OverlappingBuffers, "lse");
        let mut x = Call::new();
        x.t[6].stride_head = 0;
        expect(x.check(), da_status::OverlappingBuffers, "dk");
    }
}
