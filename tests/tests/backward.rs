//! Gradients of the reference backward pass against central finite
//! differences of the reference forward pass, on the same (fixed) plan.
//!
//! Loss: `L = sum(dO ∘ O)` with a random `dO`, so `dL/dX` is what the
//! backward pass returns for that `dO`. Inputs are O(1); with a step of
//! 1e-2 the f32 rounding of outputs and the O(step²) truncation keep the
//! difference below 2e-3 + 2e-2 |gradient|.

use distr_attention::backward::{reference, Forward, Gradients};
use distr_attention::{plan, Config, Fusion, GroupSizes, Layout, Plan, Problem, Tensor, TensorMut};
use distr_attention_tests::{divisors, Rng};
use proptest::prelude::*;

struct Problem3 {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lq: Layout,
    lk: Layout,
    lv: Layout,
}

fn forward(cfg: &Config<'_>, plan: Option<&Plan>, x: &Problem3) -> (Vec<f32>, Vec<f32>) {
    let p = Problem::new(&x.lq, &x.lk, &x.lv).unwrap();
    let lo = p.output_layout();
    let mut o = vec![0f32; lo.num_elements(distr_attention::Operand::Output).unwrap()];
    let mut lse = vec![0f32; p.lse_len().unwrap()];
    let (q, k, v) = (Tensor::new(&x.q, x.lq), Tensor::new(&x.k, x.lk), Tensor::new(&x.v, x.lv));
    let mut out = TensorMut::new(&mut o, lo);
    match plan {
        Some(plan) => {
            distr_attention::reference::attention(cfg, &plan.as_ref(), &q, &k, &v, &mut out, Some(&mut lse))
        }
        None => distr_attention::reference::exact_attention(cfg, &q, &k, &v, &mut out, Some(&mut lse)),
    }
    .unwrap();
    (o, lse)
}

fn loss(cfg: &Config<'_>, plan: Option<&Plan>, x: &Problem3, d_out: &[f32]) -> f64 {
    forward(cfg, plan, x).0.iter().zip(d_out).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn check(cfg: &Config<'_>, x: &mut Problem3, exact: bool, seed: u64) {
    let pr = Problem::new(&x.lq, &x.lk, &x.lv).unwrap();
    let plan = if exact { None } else { Some(plan(cfg, &Tensor::new(&x.q, x.lq)).unwrap()) };
    let lo = pr.output_layout();
    let mut rng = Rng(seed);
    let d_out: Vec<f32> =
        (0..lo.num_elements(distr_attention::Operand::Output).unwrap()).map(|_| rng.uniform()).collect();
    let (o, lse) = forward(cfg, plan.as_ref(), x);
    let (mut dq, mut dk, mut dv) =
        (vec![f32::NAN; x.q.len()], vec![f32::NAN; x.k.len()], vec![f32::NAN; x.v.len()]);
    {
        let (q, k, v) = (Tensor::new(&x.q, x.lq), Tensor::new(&x.k, x.lk), Tensor::new(&x.v, x.lv));
        let fwd = Forward { o: Tensor::new(&o, lo), lse: &lse, d_out: Tensor::new(&d_out, lo) };
        let (mut tq, mut tk, mut tv) =
            (TensorMut::new(&mut dq, x.lq), TensorMut::new(&mut dk, x.lk), TensorMut::new(&mut dv, x.lv));
        let mut grads = Gradients { dq: &mut tq, dk: &mut tk, dv: &mut tv };
        match &plan {
            Some(p) => reference::attention_backward(cfg, &p.as_ref(), &q, &k, &v, &fwd, &mut grads),
            None => reference::exact_attention_backward(cfg, &q, &k, &v, &fwd, &mut grads),
        }
        .unwrap();
    }
    let h = 1e-2f32;
    for which in 0..3 {
        let n = [x.q.len(), x.k.len(), x.v.len()][which];
        for idx in 0..n {
            let buf = match which {
                0 => &mut x.q,
                1 => &mut x.k,
                _ => &mut x.v,
            };
            let orig = buf[idx];
            let (up, down) = (orig + h, orig - h);
            buf[idx] = up;
            let lp = loss(cfg, plan.as_ref(), x, &d_out);
            let buf = match which {
                0 => &mut x.q,
                1 => &mut x.k,
                _ => &mut x.v,
            };
            buf[idx] = down;
            let lm = loss(cfg, plan.as_ref(), x, &d_out);
            let buf = match which {
                0 => &mut x.q,
                1 => &mut x.k,
                _ => &mut x.v,
            };
            buf[idx] = orig;
            let fd = (lp - lm) / (up as f64 - down as f64);
            let g = [&dq, &dk, &dv][which][idx] as f64;
            assert!(
                (fd - g).abs() <= 2e-3 + 2e-2 * g.abs(),
                "{} [{idx}]: finite difference {fd}, backward {g} (cfg {cfg:?})",
                ["dq", "dk", "dv"][which]
            );
        }
    }
}

fn random_problem(rng: &mut Rng, n: usize, m: usize, hq: usize, hkv: usize, d: usize, dv: usize) -> Problem3 {
    let (lq, lk, lv) = (
        Layout::contiguous(1, n, hq, d),
        Layout::contiguous(1, m, hkv, d),
        Layout::contiguous(1, m, hkv, dv),
    );
    let mut gen = |len| (0..len).map(|_| 1.5 * rng.uniform()).collect::<Vec<f32>>();
    Problem3 { q: gen(n * hq * d), k: gen(m * hkv * d), v: gen(m * hkv * dv), lq, lk, lv }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_gradients_match_finite_differences(
        n in 1usize..12, m in 1usize..12, hkv in 1usize..=2, per_kv in 1usize..=2,
        d in prop_oneof![Just(4usize), Just(8)], dv in prop_oneof![Just(3usize), Just(8)],
        g_pick in prop::collection::vec(0usize..4, 4), block_rows in prop_oneof![Just(1usize), Just(4), Just(64)],
        causal in any::<bool>(), sample in any::<bool>(), seed in any::<u64>(), exact in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let hq = hkv * per_kv;
        let divs = divisors(d);
        let sizes: Vec<usize> = (0..hq).map(|h| divs[g_pick[h % 4] % divs.len()]).collect();
        let cfg = Config {
            block_rows,
            group_sizes: GroupSizes::PerHead(&sizes),
            num_projections: 8,
            seed,
            fusion: if sample { Fusion::Sample } else { Fusion::Mean },
            causal,
            ..Config::default()
        };
        let mut x = random_problem(&mut rng, n, m, hq, hkv, d, dv);
        check(&cfg, &mut x, exact, seed ^ 1);
    }
}

/// Runs the forward (reference) then both backward passes on a random
/// case; returns (fast, reference) gradients, dense.
fn both_backwards<T: distr_attention::Element>(
    case: &distr_attention_tests::Case,
    exact: bool,
) -> [(Vec<f32>, Vec<f32>); 3] {
    use distr_attention_tests::{gather, Inputs};
    let sizes = case.group_sizes();
    let cfg = case.config(&sizes);
    let inputs = Inputs::<T>::new(case);
    let pr = inputs.problem();
    let (q, k, v) = inputs.tensors();
    let plan = if exact { None } else { Some(distr_attention::plan(&cfg, &q).unwrap()) };
    let lo = inputs.layouts[3];
    let mut o = vec![f32::NAN; lo.required_len(distr_attention::Operand::Output).unwrap()];
    let mut lse = vec![0f32; pr.lse_len().unwrap()];
    match &plan {
        Some(p) => distr_attention::attention(
            &cfg,
            &p.as_ref(),
            &q,
            &k,
            &v,
            &mut TensorMut::new(&mut o, lo),
            Some(&mut lse),
        ),
        None => distr_attention::exact_attention(
            &cfg,
            &q,
            &k,
            &v,
            &mut TensorMut::new(&mut o, lo),
            Some(&mut lse),
        ),
    }
    .unwrap();
    let mut rng = Rng(case.data_seed ^ 77);
    let d_out = distr_attention_tests::fill::<f32>(&lo, |_, _, _, _| rng.uniform());
    let fwd = Forward { o: Tensor::new(&o, lo), lse: &lse, d_out: Tensor::new(&d_out, lo) };
    let [lq, lk, lv, _] = inputs.layouts;
    let run = |fast: bool| {
        let mut bufs =
            [lq, lk, lv].map(|l| vec![f32::NAN; l.required_len(distr_attention::Operand::Q).unwrap()]);
        let [bq, bk, bv] = &mut bufs;
        let (mut tq, mut tk, mut tv) =
            (TensorMut::new(bq, lq), TensorMut::new(bk, lk), TensorMut::new(bv, lv));
        let mut grads = Gradients { dq: &mut tq, dk: &mut tk, dv: &mut tv };
        match (&plan, fast) {
            (Some(p), true) => {
                distr_attention::backward::attention_backward(&cfg, &p.as_ref(), &q, &k, &v, &fwd, &mut grads)
            }
            (None, true) => {
                distr_attention::backward::exact_attention_backward(&cfg, &q, &k, &v, &fwd, &mut grads)
            }
            (Some(p), false) => {
                reference::attention_backward(&cfg, &p.as_ref(), &q, &k, &v, &fwd, &mut grads)
            }
            (None, false) => reference::exact_attention_backward(&cfg, &q, &k, &v, &fwd, &mut grads),
        }
        .unwrap();
        let [bq, bk, bv] = &bufs;
        [gather(bq, &lq), gather(bk, &lk), gather(bv, &lv)]
    };
    let (fast, refr) = (run(true), run(false));
    let [fq, fk, fv] = fast;
    let [rq, rk, rv] = refr;
    [(fq, rq), (fk, rk), (fv, rv)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// The fast backward pass computes the reference's gradients (same plan,
    /// same forward output and LSE): within 1e-4 absolute for O(1) inputs,
    /// also on strided, GQA, causal and f16/bf16 problems.
    #[test]
    fn fast_backward_matches_reference(case in distr_attention_tests::case(), exact in any::<bool>()) {
        use distr_attention_tests::DTypeCase;
        let pairs = match case.dtype {
            DTypeCase::F32 => both_backwards::<f32>(&case, exact),
            DTypeCase::F16 => both_backwards::<half::f16>(&case, exact),
            DTypeCase::BF16 => both_backwards::<half::bf16>(&case, exact),
        };
        for (name, (fast, refr)) in ["dq", "dk", "dv"].iter().zip(pairs.iter()) {
            prop_assert!(fast.iter().all(|x| x.is_finite()), "{} has unwritten or non-finite entries", name);
            let diff = distr_attention_tests::max_abs_diff(fast, refr);
            prop_assert!(diff <= 1e-4, "{}: {}", name, diff);
        }
    }
}
