//! Every class of bad input returns its typed error, and no argument values
//! make the public API panic.

use distr_attention::{
    attention, attention_into, distr_attention, exact_attention, plan, plan_into, projections_into,
    reference, Config, Dim, Error, GroupSizes, Layout, Operand, Plan, PlanRef, PlanShape, Tensor, TensorMut,
};
use proptest::prelude::*;

fn data(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5).collect()
}

/// Runs the one-shot call on dense tensors of the given layouts.
fn one_shot(cfg: &Config<'_>, lq: Layout, lk: Layout, lv: Layout, lo: Layout) -> Result<(), Error> {
    let len = |l: &Layout| l.required_len(Operand::Q).unwrap_or(0);
    let (q, k, v) = (data(len(&lq)), data(len(&lk)), data(len(&lv)));
    let mut o = vec![0f32; len(&lo)];
    distr_attention(
        cfg,
        &Tensor::new(&q, lq),
        &Tensor::new(&k, lk),
        &Tensor::new(&v, lv),
        &mut TensorMut::new(&mut o, lo),
        None,
    )
    .map(|_| ())
}

fn dense(n: usize, h: usize, d: usize) -> Layout {
    Layout::contiguous(1, n, h, d)
}

#[test]
fn config_errors() {
    let l = dense(8, 2, 32);
    let run = |cfg: Config<'_>| one_shot(&cfg, l, l, l, l);
    assert_eq!(run(Config { block_rows: 0, ..Config::default() }), Err(Error::InvalidBlockRows { got: 0 }));
    assert_eq!(
        run(Config { num_projections: 0, ..Config::default() }),
        Err(Error::InvalidNumProjections { got: 0 })
    );
    assert_eq!(
        run(Config { num_projections: 33, ..Config::default() }),
        Err(Error::InvalidNumProjections { got: 33 })
    );
    assert_eq!(
        run(Config::with_group_size(3)),
        Err(Error::InvalidGroupSize { head: 0, group_size: 3, head_dim: 32 })
    );
    assert_eq!(
        run(Config::with_group_size(0)),
        Err(Error::InvalidGroupSize { head: 0, group_size: 0, head_dim: 32 })
    );
    assert_eq!(
        run(Config { group_sizes: GroupSizes::PerHead(&[2, 5]), ..Config::default() }),
        Err(Error::InvalidGroupSize { head: 1, group_size: 5, head_dim: 32 })
    );
    assert_eq!(
        run(Config { group_sizes: GroupSizes::PerHead(&[2]), ..Config::default() }),
        Err(Error::GroupSizesLength { expected: 2, got: 1 })
    );
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            run(Config { scale: Some(s), ..Config::default() }),
            Err(Error::InvalidScale { .. })
        ));
    }
}

#[test]
fn shape_errors() {
    let c = Config::default();
    let l = dense(8, 2, 32);
    assert_eq!(
        one_shot(&c, l, dense(8, 2, 16), dense(8, 2, 32), l),
        Err(Error::ShapeMismatch { operand: Operand::K, dim: Dim::HeadDim, expected: 32, got: 16 })
    );
    assert_eq!(
        one_shot(&c, l, dense(8, 2, 32), dense(9, 2, 32), l),
        Err(Error::ShapeMismatch { operand: Operand::V, dim: Dim::Seq, expected: 8, got: 9 })
    );
    assert_eq!(
        one_shot(&c, dense(8, 3, 32), dense(8, 2, 32), dense(8, 2, 32), dense(8, 3, 32)),
        Err(Error::HeadsNotDivisible { q_heads: 3, kv_heads: 2 })
    );
    assert_eq!(
        one_shot(&c, l, l, l, dense(8, 2, 16)),
        Err(Error::ShapeMismatch { operand: Operand::Output, dim: Dim::HeadDim, expected: 32, got: 16 })
    );
    assert_eq!(
        one_shot(&c, Layout::contiguous(2, 8, 2, 32), l, l, l),
        Err(Error::ShapeMismatch { operand: Operand::K, dim: Dim::Batch, expected: 2, got: 1 })
    );
    assert_eq!(
        one_shot(&c, dense(0, 2, 32), l, l, l),
        Err(Error::EmptyDimension { operand: Operand::Q, dim: Dim::Seq })
    );
    assert_eq!(
        one_shot(&c, l, dense(8, 2, 0), l, l),
        Err(Error::EmptyDimension { operand: Operand::K, dim: Dim::HeadDim })
    );
}

#[test]
fn stride_and_buffer_errors() {
    let c = Config::default();
    let l = dense(8, 2, 32);
    let huge = Layout { stride_seq: usize::MAX / 2, ..l };
    assert_eq!(one_shot(&c, huge, l, l, l), Err(Error::SizeOverflow { operand: Operand::Q }));
    // Output rows that overlap each other.
    let overlapping = Layout { stride_seq: 16, ..l };
    assert_eq!(
        one_shot(&c, l, l, l, overlapping),
        Err(Error::OverlappingOutput { operand: Operand::Output })
    );
    // Buffers shorter than their layouts.
    let x = data(8 * 2 * 32);
    let short = &x[..x.len() - 1];
    let mut o = vec![0f32; x.len()];
    let t = Tensor::new(&x, l);
    let err = exact_attention(&c, &Tensor::new(short, l), &t, &t, &mut TensorMut::new(&mut o, l), None);
    assert_eq!(err, Err(Error::BufferTooSmall { operand: Operand::Q, needed: x.len(), got: x.len() - 1 }));
    let mut o_short = vec![0f32; x.len() - 1];
    let err = exact_attention(&c, &t, &t, &t, &mut TensorMut::new(&mut o_short, l), None);
    assert!(matches!(err, Err(Error::BufferTooSmall { operand: Operand::Output, .. })));
    let mut lse = vec![0f32; 15];
    let err = exact_attention(&c, &t, &t, &t, &mut TensorMut::new(&mut o, l), Some(&mut lse));
    assert_eq!(err, Err(Error::BufferTooSmall { operand: Operand::Lse, needed: 16, got: 15 }));
    let p = plan(&c, &t).unwrap();
    let err =
        attention_into(&c, &p.as_ref(), &t, &t, &t, &mut TensorMut::new(&mut o, l), None, &mut [0f32; 10]);
    assert!(matches!(err, Err(Error::BufferTooSmall { operand: Operand::Scratch, .. })));
    let mut r = vec![0f32; 3];
    assert!(matches!(
        projections_into(&c, &mut r),
        Err(Error::BufferTooSmall { operand: Operand::Projections, .. })
    ));
    let mut r = vec![0f32; 64 * 16];
    projections_into(&c, &mut r).unwrap();
    let mut perm = vec![0u16; 10];
    let err = plan_into(&c, &t, &r, &mut perm, &mut [0u64; 32]);
    assert!(matches!(err, Err(Error::BufferTooSmall { operand: Operand::Plan, .. })));
    let mut perm = vec![0u16; 64];
    let err = plan_into(&c, &t, &r, &mut perm, &mut [0u64; 31]);
    assert!(matches!(err, Err(Error::BufferTooSmall { operand: Operand::Scratch, .. })));
    let err = plan_into(&c, &t, &r[..16 * 7], &mut perm, &mut [0u64; 32]);
    assert!(matches!(err, Err(Error::BufferTooSmall { operand: Operand::Projections, .. })));
}

#[test]
fn non_finite_inputs_are_rejected() {
    let c = Config::default();
    let l = dense(8, 2, 32);
    let x = data(8 * 2 * 32);
    let mut o = vec![0f32; x.len()];
    for (pos, bad) in [(5, f32::NAN), (100, f32::INFINITY), (511, f32::NEG_INFINITY)] {
        let mut y = x.clone();
        y[pos] = bad;
        let (good, bad_t) = (Tensor::new(&x, l), Tensor::new(&y, l));
        let err = exact_attention(&c, &good, &good, &bad_t, &mut TensorMut::new(&mut o, l), None);
        assert_eq!(err, Err(Error::NonFinite { operand: Operand::V, offset: pos }));
        let err = distr_attention(&c, &bad_t, &good, &good, &mut TensorMut::new(&mut o, l), None);
        assert_eq!(err, Err(Error::NonFinite { operand: Operand::Q, offset: pos }));
        let err = reference::exact_attention(&c, &good, &bad_t, &good, &mut TensorMut::new(&mut o, l), None);
        assert_eq!(err, Err(Error::NonFinite { operand: Operand::K, offset: pos }));
    }
    // NaN in the gaps of a strided view is never read and is fine.
    let padded = Layout { stride_head: 33, stride_seq: 70, stride_batch: 8 * 70, ..l };
    let mut y = vec![f32::NAN; padded.required_len(Operand::Q).unwrap()];
    for s in 0..8 {
        for h in 0..2 {
            for j in 0..32 {
                y[padded.offset(0, s, h) + j] = x[l.offset(0, s, h) + j];
            }
        }
    }
    let t = Tensor::new(&y, padded);
    exact_attention(&c, &t, &t, &t, &mut TensorMut::new(&mut o, l), None).unwrap();
    assert!(o.iter().all(|v| v.is_finite()));
}

#[test]
fn plan_errors() {
    let c = Config::default();
    let l = dense(100, 2, 32);
    let x = data(100 * 2 * 32);
    let t = Tensor::new(&x, l);
    let p = plan(&c, &t).unwrap();
    let shape = p.shape();
    assert_eq!(shape.blocks, 2);
    // Not a permutation: a repeated column, then an out-of-range one.
    let mut bad = p.as_slice().to_vec();
    bad[40] = bad[41];
    assert_eq!(PlanRef::new(shape, &bad).err(), Some(Error::NotAPermutation { block: 1 }));
    let mut bad = p.as_slice().to_vec();
    bad[3] = 32;
    assert_eq!(Plan::from_vec(shape, bad).err(), Some(Error::NotAPermutation { block: 0 }));
    assert!(matches!(
        PlanRef::new(shape, &p.as_slice()[1..]),
        Err(Error::BufferTooSmall { operand: Operand::Plan, .. })
    ));
    // A plan made for other block rows or heads.
    let mut o = vec![0f32; x.len()];
    let other = Config { block_rows: 32, ..c };
    let err = attention(&other, &p.as_ref(), &t, &t, &t, &mut TensorMut::new(&mut o, l), None);
    assert!(matches!(err, Err(Error::ShapeMismatch { operand: Operand::Plan, .. })));
    let one_head = PlanShape { heads: 1, ..shape };
    let sub = PlanRef::new(one_head, &p.as_slice()[..one_head.num_entries().unwrap()]).unwrap();
    let err = attention(&c, &sub, &t, &t, &t, &mut TensorMut::new(&mut o, l), None);
    assert_eq!(
        err,
        Err(Error::ShapeMismatch { operand: Operand::Plan, dim: Dim::Heads, expected: 2, got: 1 })
    );
}

#[test]
fn errors_have_readable_messages() {
    let e = Error::InvalidGroupSize { head: 3, group_size: 5, head_dim: 64 };
    assert_eq!(e.to_string(), "group size 5 of query head 3 must be at least 1 and divide head_dim 64");
    let e = Error::NonFinite { operand: Operand::K, offset: 12 };
    assert!(e.to_string().starts_with("k: non-finite value"));
    let boxed: Box<dyn std::error::Error> = Box::new(Error::InvalidBlockRows { got: 0 });
    assert!(boxed.to_string().contains("block_rows"));
}

fn any_layout() -> impl Strategy<Value = Layout> {
    let extent = prop_oneof![Just(0usize), 1usize..6, Just(usize::MAX / 3)];
    let stride = prop_oneof![Just(0usize), 1usize..200, Just(usize::MAX / 5)];
    (
        extent.clone(),
        extent.clone(),
        extent.clone(),
        prop_oneof![Just(0usize), 1usize..40],
        stride.clone(),
        stride.clone(),
        stride,
    )
        .prop_map(|(batch, seq, heads, dim, stride_batch, stride_seq, stride_head)| Layout {
            batch,
            seq,
            heads,
            dim,
            stride_batch,
            stride_seq,
            stride_head,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary layouts, buffer lengths and configs: every call returns
    /// (Ok or a typed error) and never panics.
    #[test]
    fn no_argument_values_panic(
        lq in any_layout(), lk in any_layout(), lv in any_layout(), lo in any_layout(),
        lens in prop::collection::vec(0usize..3000, 4),
        block_rows in prop_oneof![Just(0usize), 1usize..100, Just(usize::MAX)],
        g in 0usize..9, p in 0u32..40, causal in any::<bool>(),
        lse_len in 0usize..100,
    ) {
        let cfg = Config { block_rows, num_projections: p, causal, ..Config::with_group_size(g) };
        let (q, k, v) = (data(lens[0]), data(lens[1]), data(lens[2]));
        let mut o = vec![0f32; lens[3]];
        let mut lse = vec![0f32; lse_len];
        let (tq, tk, tv) = (Tensor::new(&q, lq), Tensor::new(&k, lk), Tensor::new(&v, lv));
        let _ = distr_attention(&cfg, &tq, &tk, &tv, &mut TensorMut::new(&mut o, lo), Some(&mut lse));
        let _ = exact_attention(&cfg, &tq, &tk, &tv, &mut TensorMut::new(&mut o, lo), None);
        let _ = reference::exact_attention(&cfg, &tq, &tk, &tv, &mut TensorMut::new(&mut o, lo), Some(&mut lse));
        if let Ok(p) = plan(&cfg, &tq) {
            let _ = reference::attention(&cfg, &p.as_ref(), &tq, &tk, &tv, &mut TensorMut::new(&mut o, lo), None);
        }
        let _ = PlanShape::new(&cfg, &lq).and_then(|s| PlanRef::new(s, &[0u16; 7]).map(|_| ()));
    }
}

#[test]
fn backward_errors() {
    use distr_attention::backward::{attention_backward, reference, Forward, Gradients};
    let c = Config::default();
    let l = dense(8, 2, 32);
    let x = data(8 * 2 * 32);
    let t = Tensor::new(&x, l);
    let p = plan(&c, &t).unwrap();
    let lse = vec![0.5f32; 16];
    let (mut dq, mut dk, mut dv) = (vec![0f32; x.len()], vec![0f32; x.len()], vec![0f32; x.len()]);
    let run = |fwd: &Forward<'_>, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dq_layout: Layout| {
        let (mut a, mut b, mut cc) =
            (TensorMut::new(dq, dq_layout), TensorMut::new(dk, l), TensorMut::new(dv, l));
        let mut g = Gradients { dq: &mut a, dk: &mut b, dv: &mut cc };
        let fast = attention_backward(&c, &p.as_ref(), &t, &t, &t, fwd, &mut g);
        let refr = reference::attention_backward(&c, &p.as_ref(), &t, &t, &t, fwd, &mut g);
        assert_eq!(fast, refr, "both paths validate alike");
        fast
    };
    let fwd = Forward { o: t, lse: &lse, d_out: t };
    assert_eq!(run(&fwd, &mut dq, &mut dk, &mut dv, l), Ok(()));
    // A short LSE, NaN in LSE or dO, a wrong d_out shape, an overlapping or short gradient.
    let short = Forward { lse: &lse[..15], ..fwd };
    assert!(matches!(
        run(&short, &mut dq, &mut dk, &mut dv, l),
        Err(Error::BufferTooSmall { operand: Operand::Lse, .. })
    ));
    let mut bad_lse = lse.clone();
    bad_lse[3] = f32::NAN;
    let nan = Forward { lse: &bad_lse, ..fwd };
    assert_eq!(
        run(&nan, &mut dq, &mut dk, &mut dv, l),
        Err(Error::NonFinite { operand: Operand::Lse, offset: 3 })
    );
    let mut y = x.clone();
    y[7] = f32::INFINITY;
    let inf = Forward { d_out: Tensor::new(&y, l), ..fwd };
    assert_eq!(
        run(&inf, &mut dq, &mut dk, &mut dv, l),
        Err(Error::NonFinite { operand: Operand::DOut, offset: 7 })
    );
    let small = dense(8, 2, 16);
    let shape = Forward { d_out: Tensor::new(&x, small), ..fwd };
    assert!(matches!(
        run(&shape, &mut dq, &mut dk, &mut dv, l),
        Err(Error::ShapeMismatch { operand: Operand::DOut, .. })
    ));
    let overlap = Layout { stride_seq: 8, ..l };
    assert_eq!(
        run(&fwd, &mut dq, &mut dk, &mut dv, overlap),
        Err(Error::OverlappingOutput { operand: Operand::DQ })
    );
    let mut dq_short = vec![0f32; 10];
    assert!(matches!(
        run(&fwd, &mut dq_short, &mut dk, &mut dv, l),
        Err(Error::BufferTooSmall { operand: Operand::DQ, .. })
    ));
    // -inf LSE (a row that saw no key) is valid.
    let mut no_key = lse.clone();
    no_key[0] = f32::NEG_INFINITY;
    assert_eq!(run(&Forward { lse: &no_key, ..fwd }, &mut dq, &mut dk, &mut dv, l), Ok(()));
}

#[test]
fn estimate_and_planner_errors() {
    use distr_attention::budget::{choose_group_sizes, Target};
    use distr_attention::estimate_errors;
    let c = Config::default();
    let l = dense(8, 2, 32);
    let x = data(8 * 2 * 32);
    let t = Tensor::new(&x, l);
    let p = plan(&c, &t).unwrap();
    assert_eq!(estimate_errors(&c, &p.as_ref(), &t, &t, &t, 4).unwrap().len(), 2);
    let other = Config { block_rows: 4, ..c };
    assert!(matches!(
        estimate_errors(&other, &p.as_ref(), &t, &t, &t, 4),
        Err(Error::ShapeMismatch { operand: Operand::Plan, .. })
    ));
    let mut y = x.clone();
    y[1] = f32::NAN;
    assert!(matches!(
        estimate_errors(&c, &p.as_ref(), &t, &Tensor::new(&y, l), &t, 4),
        Err(Error::NonFinite { operand: Operand::K, .. })
    ));
    assert_eq!(
        choose_group_sizes(&c, &[3], &[(t, t, t)], Target::MaxError(0.1)).err(),
        Some(Error::InvalidGroupSize { head: 0, group_size: 3, head_dim: 32 })
    );
    assert_eq!(
        choose_group_sizes(&c, &[2], &[(t, t, t)], Target::MaxError(f64::NAN))
            .err()
            .map(|e| e.to_string().contains("target")),
        Some(true)
    );
}
