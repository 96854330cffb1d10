//! The Hopper (wgmma) attention kernel against the core's reference and
//! against the mma.sync kernel, on the shapes it serves (head_dim 64 and
//! 128; G = 1 at any block_rows, G > 1 with block_rows 128): random shapes
//! with tails of N and M, causal (bottom-right) and not, GQA/MQA, strided
//! BSHD layouts, Mean and Sample, f16 and bf16, f32 and input-type outputs,
//! per-head G, LSE, poisoned outputs. Prints SKIPPED and passes where no GPU
//! is found; on a device without the Hopper kernel (not compute capability
//! 9.0, or `DISTR_ATTENTION_KERNEL=mma`) it checks only the mma.sync path.
//!
//! Tolerances as in gpu.rs (max over (batch, head) of the relative Frobenius
//! error): bf16 2e-2, f16 5e-3 against the reference on the GPU's plan, and
//! the same between the two kernels; LSE absolute 3e-2 / 8e-3.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use distr_attention::{Config, Element, Fusion, Layout, Problem};
use distr_attention_cuda::{Bf16, Engine, GpuElement, F16};

fn tol(is_bf16: bool) -> (f64, f64) {
    if is_bf16 {
        (2e-2, 3e-2)
    } else {
        (5e-3, 8e-3)
    }
}

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    n: usize,
    m: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    block_rows: usize,
    g: Vec<usize>,
    fusion: Fusion,
    causal: bool,
    bf16: bool,
    out_f32: bool,
    strided: bool,
    lse: bool,
}

impl Case {
    fn random(rng: &mut Rng) -> Case {
        let hkv = rng.pick(&[1, 2]);
        let hq = hkv * rng.pick(&[1, 2, 3]);
        let g: Vec<usize> = if rng.below(4) == 0 {
            (0..hq).map(|_| rng.pick(&[1, 2, 4, 8])).collect()
        } else {
            vec![rng.pick(&[1, 2, 2, 4, 8])]
        };
        // block_rows 64 only where every head has G = 1 (G > 1 needs 128 here).
        let block_rows = if g.iter().all(|&x| x == 1) { rng.pick(&[64, 128]) } else { 128 };
        Case {
            batch: rng.pick(&[1, 2]),
            n: 1 + rng.below(420),
            m: 1 + rng.below(420),
            hq,
            hkv,
            d: rng.pick(&[64, 128]),
            block_rows,
            g,
            fusion: rng.pick(&[Fusion::Mean, Fusion::Sample]),
            causal: rng.below(2) == 0,
            bf16: rng.below(2) == 0,
            out_f32: rng.below(2) == 0,
            strided: rng.below(2) == 0,
            lse: rng.below(4) != 0,
        }
    }

    fn config(&self) -> Config<'_> {
        let group_sizes = group_sizes(&self.g);
        Config {
            block_rows: self.block_rows,
            group_sizes,
            fusion: self.fusion,
            causal: self.causal,
            seed: 11,
            ..Config::with_group_size(1)
        }
    }

    fn layouts(&self) -> (Layout, Layout, Layout, Layout) {
        let (b, n, m, hq, hkv, d) = (self.batch, self.n, self.m, self.hq, self.hkv, self.d);
        if self.strided {
            (
                strided(b, n, hq, d, 8),
                strided(b, m, hkv, d, 16),
                strided(b, m, hkv, d, 8),
                strided(b, n, hq, d, 2),
            )
        } else {
            let c = Layout::contiguous;
            (c(b, n, hq, d), c(b, m, hkv, d), c(b, m, hkv, d), c(b, n, hq, d))
        }
    }
}

/// Errors of one case: (wgmma vs reference, mma.sync vs reference, wgmma vs mma.sync, LSE).
fn check_case(gpu: &Gpu, mma: &Engine, case: &Case, seed: u64) -> (f64, f64, f64, f64) {
    if case.bf16 {
        check_typed::<Bf16>(gpu, mma, case, seed)
    } else {
        check_typed::<F16>(gpu, mma, case, seed)
    }
}

fn run<G>(engine: &Engine, gpu: &Gpu, case: &Case, q: &[G::Host], k: &[G::Host], v: &[G::Host]) -> GpuRun
where
    G: GpuElement,
    G::Host: Element,
{
    let (ql, kl, vl, ol) = case.layouts();
    let cfg = case.config();
    let s = &gpu.stream;
    let run = if case.out_f32 {
        run_gpu_on::<G, f32>(engine, s, &cfg, (q, ql), (k, kl), (v, vl), ol, case.lse)
    } else if case.bf16 {
        run_gpu_on::<G, Bf16>(engine, s, &cfg, (q, ql), (k, kl), (v, vl), ol, case.lse)
    } else {
        run_gpu_on::<G, F16>(engine, s, &cfg, (q, ql), (k, kl), (v, vl), ol, case.lse)
    };
    assert_eq!(run.unwritten, 0, "{case:?}: output elements left unwritten");
    assert_eq!(run.stray_writes, 0, "{case:?}: writes outside the output layout");
    run
}

fn check_typed<G>(gpu: &Gpu, mma: &Engine, case: &Case, seed: u64) -> (f64, f64, f64, f64)
where
    G: GpuElement,
    G::Host: Element,
{
    let mut rng = Rng::new(seed);
    let (ql, kl, vl, ol) = case.layouts();
    let q: Vec<G::Host> = random_tensor(&mut rng, &ql, 1.0, 0.0);
    let k: Vec<G::Host> = random_tensor(&mut rng, &kl, 1.0, 0.0);
    let v: Vec<G::Host> = random_tensor(&mut rng, &vl, 1.0, 0.0);
    let cfg = case.config();
    let fast = run::<G>(&gpu.engine, gpu, case, &q, &k, &v);
    let slow = run::<G>(mma, gpu, case, &q, &k, &v);
    assert_eq!(fast.plan, slow.plan, "{case:?}: both runs compute the same plan");
    let plan = fast.plan.as_deref().zip(fast.plan_shape);
    let (reference, ref_lse, dense) = reference_on(&cfg, plan, (&q, ql), (&k, kl), (&v, vl));
    let out = densify(&fast.out, &ol, &dense);
    let out_mma = densify(&slow.out, &ol, &dense);
    assert!(out.iter().all(|x| x.is_finite()), "{case:?}: non-finite output");
    let (tol_o, tol_lse) = tol(case.bf16);
    let err = max_head_error(&out, &reference, &dense);
    let err_mma = max_head_error(&out_mma, &reference, &dense);
    let between = max_head_error(&out, &out_mma, &dense);
    assert!(err <= tol_o, "{case:?}: wgmma kernel head error {err:.3e} > {tol_o:.0e}");
    assert!(err_mma <= tol_o, "{case:?}: mma.sync kernel head error {err_mma:.3e} > {tol_o:.0e}");
    assert!(between <= tol_o, "{case:?}: wgmma vs mma.sync kernel {between:.3e} > {tol_o:.0e}");
    let mut lse_err = 0.0;
    if let Some(lse) = &fast.lse {
        let (e, inf_mismatch) = lse_error(lse, &ref_lse);
        assert_eq!(inf_mismatch, 0, "{case:?}: LSE -inf / NaN mismatches");
        assert!(e <= tol_lse, "{case:?}: LSE error {e:.3e} > {tol_lse:.0e}");
        lse_err = e;
    }
    // Rows that see no key (causal, N > M) are exactly zero.
    let p = Problem::new(&ql, &kl, &vl).unwrap();
    for i in 0..p.q_len {
        if p.key_limit(case.causal, i) == 0 {
            for b in 0..p.batch {
                for h in 0..p.q_heads {
                    let o = dense.offset(b, i, h);
                    assert!(out[o..o + p.v_dim].iter().all(|&x| x == 0.0), "{case:?}: row {i} sees no key");
                }
            }
        }
    }
    (err, err_mma, between, lse_err)
}

fn mma_engine() -> Engine {
    Engine::new().expect("engine").with_wgmma(false)
}

#[test]
fn hopper_kernel_is_chosen_on_sm90() {
    let Some(gpu) = gpu("hopper_kernel_is_chosen_on_sm90") else { return };
    let pinned = std::env::var("DISTR_ATTENTION_KERNEL").is_ok_and(|v| v == "mma");
    assert_eq!(gpu.engine.wgmma(), gpu.engine.capability() == (9, 0) && !pinned);
    assert!(!mma_engine().wgmma());
}

#[test]
fn hopper_random_shapes_match_reference_and_mma_kernel() {
    let Some(gpu) = gpu("hopper_random_shapes_match_reference_and_mma_kernel") else { return };
    let mma = mma_engine();
    let mut rng = Rng::new(6060);
    let (mut worst, mut worst_mma, mut worst_between, mut worst_lse) = (0f64, 0f64, 0f64, 0f64);
    let cases = 60;
    for i in 0..cases {
        let case = Case::random(&mut rng);
        let (e, em, eb, el) = check_case(&gpu, &mma, &case, 7000 + i);
        worst = worst.max(e);
        worst_mma = worst_mma.max(em);
        worst_between = worst_between.max(eb);
        worst_lse = worst_lse.max(el);
    }
    println!(
        "{cases} random cases (wgmma kernel {}): max head rel. error wgmma {worst:.3e}, mma.sync {worst_mma:.3e}, \
         between {worst_between:.3e}; max LSE error {worst_lse:.3e}",
        gpu.engine.wgmma()
    );
}

/// Tails around the 128-row and 128-key tiles, causal with N > M (rows that
/// see nothing) and N < M, MQA, strides, every G, both head dims and types.
#[test]
fn hopper_edge_shapes_match_reference_and_mma_kernel() {
    let Some(gpu) = gpu("hopper_edge_shapes_match_reference_and_mma_kernel") else { return };
    let mma = mma_engine();
    let base = Case {
        batch: 1,
        n: 1,
        m: 1,
        hq: 3,
        hkv: 1,
        d: 64,
        block_rows: 128,
        g: vec![2],
        fusion: Fusion::Mean,
        causal: true,
        bf16: true,
        out_f32: true,
        strided: true,
        lse: true,
    };
    let shapes = [(1, 1), (1, 300), (300, 1), (127, 129), (129, 127), (128, 128), (256, 384), (385, 255)];
    let mut seed = 1;
    let mut worst_between = 0f64;
    for (n, m) in shapes {
        for (d, g, bf16, fusion) in [
            (64, 1, true, Fusion::Mean),
            (128, 2, false, Fusion::Sample),
            (64, 4, true, Fusion::Mean),
            (128, 8, true, Fusion::Mean),
            (128, 1, false, Fusion::Mean),
            (64, 8, false, Fusion::Sample),
        ] {
            for causal in [false, true] {
                let case = Case { n, m, d, g: vec![g], causal, bf16, fusion, ..base.clone() };
                let (_, _, between, _) = check_case(&gpu, &mma, &case, seed);
                worst_between = worst_between.max(between);
                seed += 1;
            }
        }
    }
    println!("edge shapes: max head rel. difference wgmma vs mma.sync {worst_between:.3e}");
}

/// Several CTAs per head, long K loops (many pipeline phases), both types.
#[test]
fn hopper_long_sequences_match_reference() {
    let Some(gpu) = gpu("hopper_long_sequences_match_reference") else { return };
    let mma = mma_engine();
    for (i, (n, m, d, g, causal, bf16)) in [
        (1000, 1500, 128, 2, true, true),
        (1500, 1000, 64, 2, false, false),
        (777, 2049, 128, 4, false, true),
        (2049, 777, 64, 1, true, true),
        (900, 900, 128, 1, false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let case = Case {
            batch: 1,
            n,
            m,
            hq: 2,
            hkv: 1,
            d,
            block_rows: 128,
            g: vec![g],
            fusion: Fusion::Mean,
            causal,
            bf16,
            out_f32: false,
            strided: false,
            lse: true,
        };
        let (e, em, eb, el) = check_case(&gpu, &mma, &case, 900 + i as u64);
        println!(
            "n {n} m {m} d {d} G {g} causal {causal}: wgmma {e:.3e}, mma.sync {em:.3e}, between {eb:.3e}, LSE {el:.3e}"
        );
    }
}
