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
use distr_attention::{Element, Fusion};
use distr_attention_cuda::{Bf16, Engine, GpuElement, F16};

/// Errors of one case: (wgmma vs reference, mma.sync vs reference, wgmma vs mma.sync, LSE).
fn check_case(gpu: &Gpu, mma: &Engine, case: &Case, seed: u64) -> (f64, f64, f64, f64) {
    if case.bf16 {
        check_typed::<Bf16>(gpu, mma, case, seed)
    } else {
        check_typed::<F16>(gpu, mma, case, seed)
    }
}

fn check_typed<G>(gpu: &Gpu, mma: &Engine, case: &Case, seed: u64) -> (f64, f64, f64, f64)
where
    G: GpuElement,
    G::Host: Element,
{
    let (q, k, v) = case.inputs::<G::Host>(seed);
    let fast = case.run::<G>(&gpu.engine, &gpu.stream, &q, &k, &v);
    let slow = case.run::<G>(mma, &gpu.stream, &q, &k, &v);
    assert_eq!(fast.plan, slow.plan, "{case:?}: both runs compute the same plan");
    let reference = case.reference(&fast, &q, &k, &v);
    let (out, err, lse_err) = case.check("wgmma kernel", &fast, &reference);
    let (out_mma, err_mma, _) = case.check("mma.sync kernel", &slow, &reference);
    let (tol_o, _) = tolerances(case.bf16);
    let between = max_head_error(&out, &out_mma, &reference.2);
    assert!(between <= tol_o, "{case:?}: wgmma vs mma.sync kernel {between:.3e} > {tol_o:.0e}");
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
        let case = Case::random(&mut rng, &[64, 128], 420, Some(128));
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
