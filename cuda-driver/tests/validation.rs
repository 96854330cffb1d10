//! Argument validation of the device entry points, without a GPU: every
//! shape/config/buffer error is the one the CPU core reports for the same
//! arguments, and the backend's own restrictions give their typed errors.
#![cfg(feature = "cuda")]

use distr_attention::{
    attention, plan_into, projections, Config, DType, Dim, Error as CoreError, GroupSizes, GroupingMode,
    Layout, Operand, PlanRef, PlanShape, Tensor, TensorMut,
};
use distr_attention_cuda::validate::{check_attention, check_plan};
use distr_attention_cuda::{Error, RawBuffer, RawPlan, RawTensor};
use half::bf16;

/// Arguments of one attention call, as host buffers for the core and as
/// (fake, aligned) device addresses for the driver.
#[derive(Clone)]
struct Args {
    q: Layout,
    k: Layout,
    v: Layout,
    out: Layout,
    q_len: Option<usize>,
    out_len: Option<usize>,
    lse_len: Option<usize>,
    plan_shape: Option<PlanShape>,
}

impl Args {
    fn base() -> Args {
        let q = Layout::contiguous(2, 100, 4, 64);
        let kv = Layout::contiguous(2, 80, 2, 64);
        Args { q, k: kv, v: kv, out: q, q_len: None, out_len: None, lse_len: None, plan_shape: None }
    }

    fn len(l: &Layout, op: Operand) -> usize {
        l.required_len(op).unwrap_or(1).min(1 << 24)
    }

    /// The core's verdict: `attention` on host buffers.
    fn core(&self, cfg: &Config<'_>) -> Result<(), CoreError> {
        let qn = self.q_len.unwrap_or_else(|| Args::len(&self.q, Operand::Q));
        let q = vec![bf16::from_f32(0.5); qn];
        let k = vec![bf16::from_f32(0.5); Args::len(&self.k, Operand::K)];
        let v = vec![bf16::from_f32(0.5); Args::len(&self.v, Operand::V)];
        let mut o = vec![0f32; self.out_len.unwrap_or_else(|| Args::len(&self.out, Operand::Output))];
        let mut lse = self.lse_len.map(|n| vec![0f32; n]);
        let shape = self.plan_shape.unwrap_or_else(|| {
            PlanShape::new(&Config { block_rows: cfg.block_rows.max(1), ..*cfg }, &self.q)
                .unwrap_or(PlanShape { batch: 1, heads: 1, blocks: 1, head_dim: 1, block_rows: 1 })
        });
        let perm: Vec<u16> =
            (0..shape.num_blocks()).flat_map(|_| (0..shape.head_dim as u16).collect::<Vec<_>>()).collect();
        let plan = PlanRef::new(shape, &perm).unwrap();
        attention(
            cfg,
            &plan,
            &Tensor::new(&q, self.q),
            &Tensor::new(&k, self.k),
            &Tensor::new(&v, self.v),
            &mut TensorMut::new(&mut o, self.out),
            lse.as_deref_mut(),
        )
    }

    /// The driver's verdict on the same arguments.
    fn driver(&self, cfg: &Config<'_>, dtypes: [DType; 4]) -> Result<(), Error> {
        let t = |ptr, len, layout, dtype| RawTensor { ptr, len, layout, dtype };
        let q = t(0x10000, self.q_len.unwrap_or_else(|| Args::len(&self.q, Operand::Q)), self.q, dtypes[0]);
        let k = t(0x20000, Args::len(&self.k, Operand::K), self.k, dtypes[1]);
        let v = t(0x30000, Args::len(&self.v, Operand::V), self.v, dtypes[2]);
        let o = t(
            0x40000,
            self.out_len.unwrap_or_else(|| Args::len(&self.out, Operand::Output)),
            self.out,
            dtypes[3],
        );
        let lse = self.lse_len.map(|len| RawBuffer { ptr: 0x50000, len });
        let shape = self.plan_shape.unwrap_or_else(|| {
            PlanShape::new(&Config { block_rows: cfg.block_rows.max(1), ..*cfg }, &self.q)
                .unwrap_or(PlanShape { batch: 1, heads: 1, blocks: 1, head_dim: 1, block_rows: 1 })
        });
        let plan = RawPlan { ptr: 0x60000, len: shape.num_entries().unwrap(), shape };
        check_attention(cfg, Some(&plan), &q, &k, &v, &o, lse.as_ref()).map(|_| ())
    }
}

const BF16: [DType; 4] = [DType::BF16, DType::BF16, DType::BF16, DType::F32];

#[test]
fn argument_errors_are_the_cores() {
    let cfg = Config::with_group_size(2);
    let mut cases: Vec<(&str, Args, Config<'static>)> = Vec::new();
    let b = Args::base;
    let mut a = b();
    a.k.batch = 3;
    cases.push(("k batch", a, cfg));
    let mut a = b();
    a.v = Layout::contiguous(2, 81, 2, 64);
    cases.push(("v seq", a, cfg));
    let mut a = b();
    a.k = Layout::contiguous(2, 80, 3, 64);
    a.v = a.k;
    cases.push(("heads not divisible", a, cfg));
    let mut a = b();
    a.k = Layout::contiguous(2, 80, 2, 32);
    a.v = a.k;
    cases.push(("head dim", a, cfg));
    let mut a = b();
    a.q = Layout::contiguous(2, 0, 4, 64);
    cases.push(("empty", a, cfg));
    cases.push(("group size 3", b(), Config::with_group_size(3)));
    cases.push(("block rows 0", b(), Config { block_rows: 0, ..cfg }));
    cases.push(("projections 33", b(), Config { num_projections: 33, ..cfg }));
    cases.push(("scale", b(), Config { scale: Some(-1.0), ..cfg }));
    let mut a = b();
    a.q_len = Some(100);
    cases.push(("q buffer", a, cfg));
    let mut a = b();
    a.out = Layout::contiguous(2, 100, 4, 32);
    cases.push(("output shape", a, cfg));
    let mut a = b();
    a.out.stride_head = 1;
    cases.push(("output overlaps", a, cfg));
    let mut a = b();
    a.out_len = Some(1000);
    cases.push(("output buffer", a, cfg));
    let mut a = b();
    a.lse_len = Some(799);
    cases.push(("lse buffer", a, cfg));
    let mut a = b();
    a.plan_shape = Some(PlanShape { batch: 2, heads: 4, blocks: 1, head_dim: 64, block_rows: 64 });
    cases.push(("plan blocks", a, cfg));
    let mut a = b();
    a.plan_shape = Some(PlanShape { batch: 1, heads: 4, blocks: 2, head_dim: 64, block_rows: 64 });
    cases.push(("plan batch", a, cfg));

    for (name, args, cfg) in &cases {
        let core = args.core(cfg).expect_err(name);
        let driver = args.driver(cfg, BF16).expect_err(name);
        println!("{name}: {core}");
        assert_eq!(driver, Error::Core(core), "{name}");
    }
    // The per-head length check, with a borrowed slice.
    let sizes = [2usize, 2, 2];
    let cfg = Config { group_sizes: GroupSizes::PerHead(&sizes), ..Config::with_group_size(2) };
    let core = b().core(&cfg).unwrap_err();
    assert_eq!(b().driver(&cfg, BF16).unwrap_err(), Error::Core(core));
    assert!(matches!(core, CoreError::GroupSizesLength { expected: 4, got: 3 }));
    // And the baseline is valid for both.
    b().core(&Config::with_group_size(2)).unwrap();
    b().driver(&Config::with_group_size(2), BF16).unwrap();
}

#[test]
fn backend_restrictions_have_typed_errors() {
    let cfg = Config::with_group_size(2);
    let core = |e| Err(Error::Core(e));
    let d = |q, k, v, o| [q, k, v, o];
    let (f32_, f16_, bf16_) = (DType::F32, DType::F16, DType::BF16);
    let a = Args::base();
    assert_eq!(
        a.driver(&cfg, d(f32_, f32_, f32_, f32_)),
        core(CoreError::UnsupportedDtype { operand: Operand::Q })
    );
    assert_eq!(
        a.driver(&cfg, d(bf16_, f16_, bf16_, f32_)),
        core(CoreError::UnsupportedDtype { operand: Operand::K })
    );
    assert_eq!(
        a.driver(&cfg, d(bf16_, bf16_, f16_, f32_)),
        core(CoreError::UnsupportedDtype { operand: Operand::V })
    );
    assert_eq!(
        a.driver(&cfg, d(bf16_, bf16_, bf16_, f16_)),
        core(CoreError::UnsupportedDtype { operand: Operand::Output })
    );
    a.driver(&cfg, d(f16_, f16_, f16_, f16_)).unwrap();
    a.driver(&cfg, d(bf16_, bf16_, bf16_, bf16_)).unwrap();

    let mut h48 = Args::base();
    for l in [&mut h48.q, &mut h48.k, &mut h48.v, &mut h48.out] {
        *l = Layout::contiguous(l.batch, l.seq, l.heads, 48);
    }
    assert_eq!(h48.driver(&cfg, BF16), core(CoreError::UnsupportedHeadDim { got: 48 }));
    let mut v32 = Args::base();
    v32.v = Layout::contiguous(2, 80, 2, 32);
    v32.out = Layout::contiguous(2, 100, 4, 32);
    assert_eq!(v32.driver(&cfg, BF16), core(CoreError::UnsupportedHeadDim { got: 32 }));
    assert_eq!(
        a.driver(&Config { block_rows: 32, ..cfg }, BF16),
        core(CoreError::UnsupportedBlockRows { got: 32 })
    );
    assert_eq!(
        a.driver(&Config::with_group_size(16), BF16),
        core(CoreError::UnsupportedGroupSize { got: 16 })
    );

    // A plan is optional only when every head is exact.
    let t = |ptr, layout| RawTensor { ptr, len: 1 << 24, layout, dtype: DType::BF16 };
    let (q, k, o) = (t(0x1000, a.q), t(0x2000, a.k), RawTensor { dtype: DType::F32, ..t(0x3000, a.out) });
    assert_eq!(check_attention(&cfg, None, &q, &k, &k, &o, None).unwrap_err(), Error::MissingPlan);
    check_attention(&Config::exact(), None, &q, &k, &k, &o, None).unwrap();

    // Alignment.
    let err = check_attention(&Config::exact(), None, &t(0x1008, a.q), &k, &k, &o, None).unwrap_err();
    assert!(matches!(err, Error::Misaligned { operand: Operand::Q, .. }), "{err}");
    let mut odd = a.k;
    odd.stride_seq = 2 * 64 + 4;
    odd.stride_batch = 80 * odd.stride_seq;
    let err = check_attention(&Config::exact(), None, &q, &t(0x2000, odd), &k, &o, None).unwrap_err();
    assert!(matches!(err, Error::Misaligned { operand: Operand::K, .. }), "{err}");
    let lse = RawBuffer { ptr: 0x4002, len: 800 };
    let err = check_attention(&Config::exact(), None, &q, &k, &k, &o, Some(&lse)).unwrap_err();
    assert!(matches!(err, Error::Misaligned { operand: Operand::Lse, .. }), "{err}");
    println!("example messages: {err}; {}", Error::MissingPlan);
}

#[test]
fn plan_errors_are_the_cores() {
    let q = Layout::contiguous(1, 300, 2, 64);
    let host = vec![bf16::from_f32(1.0); q.required_len(Operand::Q).unwrap()];
    let raw = |layout: Layout, len: usize, dtype| RawTensor { ptr: 0x1000, len, layout, dtype };
    let cfg = Config::with_group_size(2);
    let shape = PlanShape::new(&cfg, &q).unwrap();
    let entries = shape.num_entries().unwrap();

    // Output too small, Q too small, bad config: the core's plan_into errors.
    let core_plan = |cfg: &Config<'_>, qlen: usize, out: usize| {
        let r = projections(&Config { block_rows: cfg.block_rows.clamp(1, 300), ..*cfg }).unwrap_or_default();
        let mut perm = vec![0u16; out];
        let mut scratch = vec![0u64; 64];
        plan_into(cfg, &Tensor::new(&host[..qlen], q), &r, &mut perm, &mut scratch).map(|_| ())
    };
    for (name, cfg, qlen, out) in [
        ("plan buffer", cfg, host.len(), entries - 1),
        ("q buffer", cfg, host.len() - 1, entries),
        ("projections", Config { num_projections: 0, ..cfg }, host.len(), entries),
        ("grouping", Config { grouping: GroupingMode::Similarity, ..cfg }, host.len(), entries),
    ] {
        let core = core_plan(&cfg, qlen, out).expect_err(name);
        let driver = check_plan(&cfg, &raw(q, qlen, DType::BF16), &RawBuffer { ptr: 0x9000, len: out })
            .expect_err(name);
        match (core, &driver) {
            // Same variant; the reason names each backend's own limitation.
            (CoreError::GroupingUnavailable { .. }, Error::Core(CoreError::GroupingUnavailable { .. })) => {}
            _ => assert_eq!(driver, Error::Core(core), "{name}"),
        }
    }
    let ok = RawBuffer { ptr: 0x9000, len: entries };
    assert_eq!(check_plan(&cfg, &raw(q, host.len(), DType::BF16), &ok), Ok(shape));
    assert_eq!(
        check_plan(&cfg, &raw(q, host.len(), DType::F32), &ok),
        Err(Error::Core(CoreError::UnsupportedDtype { operand: Operand::Q }))
    );
    assert_eq!(
        check_plan(&Config { block_rows: 256, ..cfg }, &raw(q, host.len(), DType::BF16), &ok),
        Err(Error::Core(CoreError::UnsupportedBlockRows { got: 256 }))
    );
    let wide = Layout::contiguous(1, 10, 1, 512);
    let shape = PlanShape::new(&cfg, &wide).unwrap();
    assert_eq!(
        check_plan(
            &cfg,
            &raw(wide, 5120, DType::F16),
            &RawBuffer { ptr: 0x9000, len: shape.num_entries().unwrap() }
        ),
        Err(Error::Core(CoreError::UnsupportedHeadDim { got: 512 }))
    );
    // The plan kernel reads Q four columns at a time.
    let odd = Layout::contiguous(1, 10, 1, 33);
    let shape = PlanShape::new(&cfg, &odd).unwrap();
    let out = RawBuffer { ptr: 0x9000, len: shape.num_entries().unwrap() };
    assert_eq!(
        check_plan(&cfg, &raw(odd, 330, DType::F16), &out),
        Err(Error::Core(CoreError::UnsupportedHeadDim { got: 33 }))
    );
    let err =
        check_plan(&cfg, &RawTensor { ptr: 0x1002, ..raw(q, host.len(), DType::BF16) }, &ok).unwrap_err();
    assert!(matches!(err, Error::Misaligned { operand: Operand::Q, .. }), "{err}");
    let _ = Dim::Seq;
}
