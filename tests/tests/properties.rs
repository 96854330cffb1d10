//! The properties of ALGORITHM.md, plus agreement of the fast path with the
//! reference, checked on random problems (shapes with tails, strides, GQA,
//! causal masks with N != M, f32/f16/bf16, per-head group sizes).
//!
//! Tolerances: the fast path accumulates in f32, the reference in f64, on
//! the same converted inputs (|q|, |k| <= 2, |v| <= 1, d <= 64), so outputs
//! agree to 2e-5 absolute and log-sum-exp to 2e-4 (observed: about 1e-6).

use distr_attention::{plan_into, projections_into, Config, Fusion, GroupSizes, Layout, PlanRef, Tensor};
use distr_attention_tests::*;
use half::{bf16, f16};
use proptest::prelude::*;

const OUT_TOL: f32 = 2e-5;
const LSE_TOL: f32 = 2e-4;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() }
}

/// Runs a closure with the case's inputs in its dtype.
macro_rules! with_inputs {
    ($case:expr, |$inputs:ident| $body:expr) => {
        match $case.dtype {
            DTypeCase::F32 => {
                let $inputs = Inputs::<f32>::new(&$case);
                $body
            }
            DTypeCase::F16 => {
                let $inputs = Inputs::<f16>::new(&$case);
                $body
            }
            DTypeCase::BF16 => {
                let $inputs = Inputs::<bf16>::new(&$case);
                $body
            }
        }
    };
}

proptest! {
    #![proptest_config(config())]

    /// The fast path computes the reference's function on the same plan.
    #[test]
    fn fast_path_matches_reference(case in case()) {
        let sizes = case.group_sizes();
        let cfg = case.config(&sizes);
        with_inputs!(case, |inputs| {
            let plan = plan_of(&cfg, &inputs);
            let fast = run(&cfg, Some(&plan), &inputs, Path::Fast).unwrap();
            let refr = run(&cfg, Some(&plan), &inputs, Path::Reference).unwrap();
            prop_assert!(max_abs_diff(&fast.o, &refr.o) <= OUT_TOL, "output differs by {}", max_abs_diff(&fast.o, &refr.o));
            prop_assert!(max_abs_diff(&fast.lse, &refr.lse) <= LSE_TOL, "lse differs by {}", max_abs_diff(&fast.lse, &refr.lse));
        });
    }

    /// Exact attention: fast path against reference.
    #[test]
    fn exact_fast_path_matches_reference(case in case()) {
        let cfg = Config { causal: case.causal, scale: case.scale, ..Config::exact() };
        with_inputs!(case, |inputs| {
            let fast = run(&cfg, None, &inputs, Path::Fast).unwrap();
            let refr = run(&cfg, None, &inputs, Path::Reference).unwrap();
            prop_assert!(max_abs_diff(&fast.o, &refr.o) <= OUT_TOL);
            prop_assert!(max_abs_diff(&fast.lse, &refr.lse) <= LSE_TOL);
        });
    }

    /// G = 1 gives exact attention, whatever the plan's column order.
    #[test]
    fn group_size_one_is_exact(case in case()) {
        let sizes = vec![1; case.q_heads()];
        let cfg = Config { group_sizes: GroupSizes::Uniform(1), ..case.config(&sizes) };
        with_inputs!(case, |inputs| {
            let plan = plan_of(&cfg, &inputs);
            let exact = run(&cfg, None, &inputs, Path::Reference).unwrap();
            for path in [Path::Reference, Path::Fast] {
                let got = run(&cfg, Some(&plan), &inputs, path).unwrap();
                prop_assert!(max_abs_diff(&got.o, &exact.o) <= OUT_TOL, "{path:?}");
            }
        });
    }

    /// If inside every group the Q columns are identical, the result equals exact attention.
    #[test]
    fn identical_columns_in_groups_give_exact(case in case()) {
        let g = *divisors(case.d).iter().filter(|&&g| g > 1).nth(case.g_choice[0] % 2).unwrap_or(&1);
        let cfg = Config {
            group_sizes: GroupSizes::Uniform(g),
            num_projections: case.projections.max(16),
            ..case.config(&[g])
        };
        // Columns come in G identical copies at shuffled positions.
        let mut rng = Rng(case.data_seed);
        let mut source: Vec<usize> = (0..case.d).map(|j| j / g).collect();
        for i in (1..source.len()).rev() {
            source.swap(i, rng.below(i + 1));
        }
        let base = Inputs::<f32>::new(&case);
        let l = base.layouts[0];
        let q = fill::<f32>(&l, |b, s, h, j| base.q[l.offset(b, s, h) + source[j]]);
        let inputs = Inputs { q, ..base };
        let plan = plan_of(&cfg, &inputs);
        // Precondition: the plan grouped equal columns together (an LSH
        // collision between different columns could split them).
        let grouped = plan.as_slice().chunks(g).all(|grp| grp.iter().all(|&c| source[c as usize] == source[grp[0] as usize]));
        prop_assume!(grouped);
        let exact = run(&cfg, None, &inputs, Path::Reference).unwrap();
        for path in [Path::Reference, Path::Fast] {
            let got = run(&cfg, Some(&plan), &inputs, path).unwrap();
            prop_assert!(max_abs_diff(&got.o, &exact.o) <= OUT_TOL, "{path:?}: {}", max_abs_diff(&got.o, &exact.o));
        }
    }

    /// Each block of a plan is a permutation, and the plan depends only on
    /// Q's values, l, P and the seed: not on K, V, the layout or the dtype of storage.
    #[test]
    fn plan_is_a_permutation_depending_only_on_q(case in case()) {
        let sizes = case.group_sizes();
        let cfg = case.config(&sizes);
        let inputs = Inputs::<f32>::new(&case);
        let plan = plan_of(&cfg, &inputs);
        let d = case.d;
        for block in plan.as_slice().chunks(d) {
            let mut sorted = block.to_vec();
            sorted.sort_unstable();
            prop_assert!(sorted.iter().enumerate().all(|(i, &c)| c as usize == i));
        }
        // Same values, another layout: same plan.
        let dense_layout = Layout::contiguous(case.batch, case.n, case.q_heads(), d);
        let dense = gather(&inputs.q, &inputs.layouts[0]);
        let again = distr_attention::plan(&cfg, &Tensor::new(&dense, dense_layout)).unwrap();
        prop_assert_eq!(again.as_slice(), plan.as_slice());
        // Other group sizes, fusion, mask or scale: same plan.
        let other = Config { group_sizes: GroupSizes::Uniform(1), fusion: Fusion::Sample, causal: !cfg.causal, scale: Some(2.0), ..cfg };
        prop_assert_eq!(plan_of(&other, &inputs), plan);
    }

    /// Scaling a block's Q by a positive constant does not change its plan
    /// (powers of two, so the scaled inputs are exact).
    #[test]
    fn plan_is_invariant_to_positive_scaling_of_a_block(case in case(), exp in -6i32..=6, blk_pick in any::<usize>()) {
        let cfg = case.config(&[1]);
        let inputs = Inputs::<f32>::new(&case);
        let plan = plan_of(&cfg, &inputs);
        let blocks = case.n.div_ceil(case.block_rows);
        let blk = blk_pick % blocks;
        let c = 2f32.powi(exp);
        let l = inputs.layouts[0];
        let rows = blk * case.block_rows..((blk + 1) * case.block_rows).min(case.n);
        let q = fill::<f32>(&l, |b, s, h, j| {
            let x = inputs.q[l.offset(b, s, h) + j];
            if rows.contains(&s) { x * c } else { x }
        });
        let scaled = Inputs { q, k: inputs.k.clone(), v: inputs.v.clone(), layouts: inputs.layouts };
        prop_assert_eq!(plan_of(&cfg, &scaled), plan);
    }

    /// Output rows are convex combinations of V rows.
    #[test]
    fn outputs_lie_within_the_range_of_v(case in case()) {
        let sizes = case.group_sizes();
        let cfg = case.config(&sizes);
        with_inputs!(case, |inputs| {
            let plan = plan_of(&cfg, &inputs);
            let p = inputs.problem();
            let v = gather(&inputs.v.iter().map(|x| distr_attention::Element::to_f32(*x)).collect::<Vec<_>>(), &inputs.layouts[2]);
            for path in [Path::Fast, Path::Reference] {
                let out = run(&cfg, Some(&plan), &inputs, path).unwrap();
                for b in 0..p.batch {
                    for h in 0..p.q_heads {
                        let hk = p.kv_head(h);
                        for c in 0..p.v_dim {
                            let col = (0..p.kv_len).map(|n| v[((b * p.kv_len + n) * p.kv_heads + hk) * p.v_dim + c]);
                            let (lo, hi) = col.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
                            for i in 0..p.q_len {
                                let o = out.o[((b * p.q_len + i) * p.q_heads + h) * p.v_dim + c];
                                let visible = p.key_limit(cfg.causal, i) > 0;
                                prop_assert!(!visible || (o >= lo - 1e-6 && o <= hi + 1e-6), "{path:?}: {o} outside [{lo}, {hi}]");
                                prop_assert!(visible || o == 0.0);
                            }
                        }
                    }
                }
            }
        });
    }

    /// Causal: O[i] does not depend on keys masked for row i (bitwise, on both paths).
    #[test]
    fn causal_rows_ignore_masked_keys(case in case(), row_pick in any::<usize>()) {
        let sizes = case.group_sizes();
        let cfg = Config { causal: true, ..case.config(&sizes) };
        let inputs = Inputs::<f32>::new(&case);
        let p = inputs.problem();
        let i0 = row_pick % case.n;
        let limit = p.key_limit(true, i0);
        // Replace every key and value row from `limit` on.
        let mut rng = Rng(case.data_seed ^ 0xABCD);
        let (lk, lv) = (inputs.layouts[1], inputs.layouts[2]);
        let k = fill::<f32>(&lk, |b, s, h, j| if s >= limit { 5.0 * rng.uniform() } else { inputs.k[lk.offset(b, s, h) + j] });
        let v = fill::<f32>(&lv, |b, s, h, j| if s >= limit { 7.0 } else { inputs.v[lv.offset(b, s, h) + j] });
        let changed = Inputs { q: inputs.q.clone(), k, v, layouts: inputs.layouts };
        let plan = plan_of(&cfg, &inputs);
        for path in [Path::Fast, Path::Reference] {
            let a = run(&cfg, Some(&plan), &inputs, path).unwrap();
            let b = run(&cfg, Some(&plan), &changed, path).unwrap();
            for bb in 0..p.batch {
                for i in (0..p.q_len).filter(|&i| p.key_limit(true, i) <= limit) {
                    let at = ((bb * p.q_len + i) * p.q_heads) * p.v_dim;
                    let len = p.q_heads * p.v_dim;
                    prop_assert_eq!(&a.o[at..at + len], &b.o[at..at + len], "{:?} row {}", path, i);
                }
            }
        }
    }

    /// The allocation-free plan equals the allocating one.
    #[test]
    fn plan_into_equals_plan(case in case()) {
        let cfg = case.config(&[1]);
        let inputs = Inputs::<f32>::new(&case);
        let plan = plan_of(&cfg, &inputs);
        let mut r = vec![0f32; distr_attention::projections_len(&cfg).unwrap()];
        projections_into(&cfg, &mut r).unwrap();
        let mut out = vec![u16::MAX; plan.as_slice().len() + 3];
        let mut scratch = vec![0u64; distr_attention::plan_scratch_len(case.d)];
        let shape = plan_into(&cfg, &inputs.tensors().0, &r, &mut out, &mut scratch).unwrap();
        prop_assert_eq!(shape, plan.shape());
        prop_assert_eq!(&out[..plan.as_slice().len()], plan.as_slice());
        prop_assert!(out[plan.as_slice().len()..].iter().all(|&x| x == u16::MAX));
        prop_assert!(PlanRef::new(shape, &out[..plan.as_slice().len()]).is_ok());
    }
}

/// Causality caveat (ALGORITHM.md): with G = 1 a token-by-token decode
/// reproduces the prefill; with G > 1 it does not, because a block's plan
/// sees later query rows of the block.
#[test]
fn decode_matches_prefill_only_for_exact() {
    let (n, h, d) = (48, 2, 32);
    let mut rng = Rng(7);
    let lay = Layout::contiguous(1, n, h, d);
    let q: Vec<f32> = (0..n * h * d).map(|_| 2.0 * rng.uniform()).collect();
    let k: Vec<f32> = (0..n * h * d).map(|_| 2.0 * rng.uniform()).collect();
    let v: Vec<f32> = (0..n * h * d).map(|_| rng.uniform()).collect();
    let row = |x: &[f32], i: usize| x[i * h * d..(i + 1) * h * d].to_vec();
    for g in [1, 2] {
        let cfg = Config { causal: true, block_rows: 16, ..Config::with_group_size(g) };
        let mut prefill = vec![0f32; n * h * d];
        let t = |x| Tensor::new(x, lay);
        distr_attention::distr_attention(
            &cfg,
            &t(&q),
            &t(&k),
            &t(&v),
            &mut distr_attention::TensorMut::new(&mut prefill, lay),
            None,
        )
        .unwrap();
        let mut max_diff = 0f32;
        for i in 0..n {
            let (qi, kv) = (row(&q, i), Layout::contiguous(1, i + 1, h, d));
            let mut o = vec![0f32; h * d];
            distr_attention::distr_attention(
                &cfg,
                &Tensor::new(&qi, Layout::contiguous(1, 1, h, d)),
                &Tensor::new(&k[..(i + 1) * h * d], kv),
                &Tensor::new(&v[..(i + 1) * h * d], kv),
                &mut distr_attention::TensorMut::new(&mut o, Layout::contiguous(1, 1, h, d)),
                None,
            )
            .unwrap();
            max_diff = max_diff.max(max_abs_diff(&o, &row(&prefill, i)));
        }
        if g == 1 {
            assert!(max_diff < 1e-5, "exact decode differs from prefill by {max_diff}");
        } else {
            assert!(max_diff > 1e-3, "G={g}: decode unexpectedly equals prefill ({max_diff})");
        }
    }
}

/// Broadcast views: K and V with sequence stride 0 (every key is the same
/// row) give that V row as output, on both paths, for every dtype path of V.
#[test]
fn zero_stride_key_value_views() {
    let (n, m, h, d) = (37, 50, 2, 16);
    let mut rng = Rng(11);
    let lq = Layout::contiguous(1, n, h, d);
    let q: Vec<f32> = (0..n * h * d).map(|_| rng.uniform()).collect();
    let lkv = Layout { stride_seq: 0, ..Layout::contiguous(1, m, h, d) };
    let k: Vec<f32> = (0..h * d).map(|_| rng.uniform()).collect();
    let v: Vec<f32> = (0..h * d).map(|_| rng.uniform()).collect();
    let cfg = Config { causal: true, ..Config::with_group_size(2) };
    let (tq, tk, tv) = (Tensor::new(&q, lq), Tensor::new(&k, lkv), Tensor::new(&v, lkv));
    let plan = distr_attention::plan(&cfg, &tq).unwrap();
    for path in [Path::Fast, Path::Reference] {
        let mut o = vec![f32::NAN; n * h * d];
        let mut out = distr_attention::TensorMut::new(&mut o, lq);
        match path {
            Path::Fast => distr_attention::attention(&cfg, &plan.as_ref(), &tq, &tk, &tv, &mut out, None),
            Path::Reference => {
                distr_attention::reference::attention(&cfg, &plan.as_ref(), &tq, &tk, &tv, &mut out, None)
            }
        }
        .unwrap();
        for i in 0..n {
            for hh in 0..h {
                let got = &o[(i * h + hh) * d..][..d];
                assert!(max_abs_diff(got, &v[hh * d..(hh + 1) * d]) < 1e-6, "{path:?} row {i} head {hh}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// The multi-threaded path gives bitwise the single-threaded results
    /// (output, gaps of a strided output untouched, log-sum-exp).
    #[test]
    fn parallel_equals_single_threaded(case in case(), threads in 0usize..4, exact in any::<bool>()) {
        let sizes = case.group_sizes();
        let cfg = case.config(&sizes);
        let inputs = Inputs::<f32>::new(&case);
        let plan = plan_of(&cfg, &inputs);
        let single = run(&cfg, if exact { None } else { Some(&plan) }, &inputs, Path::Fast).unwrap();
        let lo = inputs.layouts[3];
        let mut o = vec![f32::NAN; lo.required_len(distr_attention::Operand::Output).unwrap()];
        let mut lse = vec![f32::NAN; inputs.problem().lse_len().unwrap()];
        let (q, k, v) = inputs.tensors();
        let mut out = distr_attention::TensorMut::new(&mut o, lo);
        if exact {
            distr_attention::parallel::exact_attention(&cfg, &q, &k, &v, &mut out, Some(&mut lse), threads).unwrap();
        } else {
            distr_attention::parallel::attention(&cfg, &plan.as_ref(), &q, &k, &v, &mut out, Some(&mut lse), threads).unwrap();
        }
        let dense = gather(&o, &lo);
        prop_assert_eq!(dense.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), single.o.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        prop_assert_eq!(lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), single.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        prop_assert_eq!(o.iter().filter(|x| !x.is_nan()).count(), dense.len());
    }
}

#[test]
fn parallel_rejects_bad_arguments_like_the_core() {
    let l = Layout::contiguous(1, 8, 2, 32);
    let x = vec![0.5f32; 8 * 2 * 32];
    let mut y = x.clone();
    y[9] = f32::NAN;
    let mut o = vec![1.0f32; x.len()];
    let t = Tensor::new(&x, l);
    let err = distr_attention::parallel::exact_attention(
        &Config::exact(),
        &t,
        &Tensor::new(&y, l),
        &t,
        &mut distr_attention::TensorMut::new(&mut o, l),
        None,
        2,
    );
    assert_eq!(
        err,
        Err(distr_attention::Error::NonFinite { operand: distr_attention::Operand::K, offset: 9 })
    );
    assert!(o.iter().all(|&v| v == 1.0), "nothing written on error");
}
