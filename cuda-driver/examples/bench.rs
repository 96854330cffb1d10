//! Benchmark of the CUDA kernels on the issue's shapes: bf16, B·N = 65536,
//! H·D = 2048, D in {64, 128}, N in {1024, 4096, 16384}, causal and not.
//! DistrAttention at G = 1, 2, 4 (block_rows 128, P = 16, Mean), the plan
//! kernel alone, and plan + attention; plus G = 2 at block_rows 64. On
//! compute capability 9.0 the engine runs the Hopper (wgmma) kernel where it
//! applies; G = 1, 2, 4 are also timed on the mma.sync kernel (`mma_*`).
//!
//! Timing: CUDA events around each launch (series) on one stream, after
//! warm-up; the median of the repetitions. Inputs are random (uniform with
//! unit variance), never zeros. Effective TFLOP/s = 4·B·H·N²·D / time,
//! halved for causal, for every variant (so G > 1 counts the work of exact
//! attention it replaces).
//!
//! ```text
//! bench [--json PATH] [--warmup N] [--reps N] [--quick] [--backward]
//! ```
//! `cuda-driver/bench/sdpa_peer.py --ours PATH` runs PyTorch's SDPA
//! (FlashAttention-2 and cuDNN backends) on the same shapes and prints the
//! joint table with ratios.
//!
//! `--backward` times training steps instead (forward with LSE, then the
//! backward pass; bf16 O, dO and gradients, as PyTorch's autograd has them)
//! on N in {1024, 4096}: G = 1 (forward + backward) and G = 2 (plan +
//! forward + backward), each also split into its forward and backward
//! times (G = 2 also plan + forward and forward + backward, to see what the
//! parts cost back to back). Effective TFLOP/s = 14·B·H·N²·D / time (forward 4, backward 10),
//! halved for causal. `sdpa_peer.py --backward --ours PATH` times
//! `torch.autograd.grad` through SDPA on the same shapes.

use std::io::Write;

use distr_attention_core::{Config, Layout, PlanShape};
use distr_attention_cuda::cust::memory::DeviceBuffer;
use distr_attention_cuda::cust::stream::{Stream, StreamFlags};
use distr_attention_cuda::{Bf16, Engine, GpuPlan, GpuTensor, GpuTensorMut};

#[path = "shared/bench_common.rs"]
mod bench_common;
use bench_common::{time, Args, RandomInputs, TOKENS, WIDTH};

fn main() {
    let a = Args::parse(10, &["--backward"]);
    let _ctx = distr_attention_cuda::cust::quick_init().expect("a CUDA device");
    let engine = Engine::new().unwrap();
    let mma = Engine::new().unwrap().with_wgmma(false);
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    println!(
        "device: compute capability {:?}, image {:?}, wgmma kernel {}",
        engine.capability(),
        engine.image(),
        engine.wgmma()
    );

    // Random inputs, one buffer per tensor, reused by every shape (B·N·H·D is
    // the same for all); `dout` is an output buffer.
    let mut inputs = RandomInputs::new();
    let (dq, dk, dv) = (inputs.upload(), inputs.upload(), inputs.upload());
    let mut dout = inputs.upload();
    let mut dplan: DeviceBuffer<u16> = DeviceBuffer::from_slice(&vec![0u16; TOKENS / 64 * WIDTH]).unwrap();

    let mut json = a.json.as_ref().map(|p| std::fs::File::create(p).expect("json output"));
    if a.set.contains(&"--backward") {
        drop((dout, dplan));
        backward::run(&a, &engine, &stream, (&dq, &dk, &dv), &mut inputs, json.as_mut());
        return;
    }
    println!(
        "{:>4} {:>6} {:>6} {:>3} {:>3} | {:>8} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} | TFLOP/s: {:>5} {:>5} {:>5} {:>6} {:>5} {:>6} | mma: {:>5} {:>5} {:>5}",
        "D", "N", "causal", "B", "H", "plan ms", "G1 ms", "G2 ms", "G4 ms", "G2+pl", "G4+pl", "G2 l64", "G1", "G2", "G4", "G2+pl",
        "G4+pl", "plan%", "G1", "G2", "G4"
    );
    let dims: &[usize] = if a.quick { &[128] } else { &[64, 128] };
    let lens: &[usize] = if a.quick { &[4096] } else { &[1024, 4096, 16384] };
    for &d in dims {
        for &n in lens {
            for causal in [false, true] {
                let (b, h) = (TOKENS / n, WIDTH / d);
                let layout = Layout::contiguous(b, n, h, d);
                let (tq, tk, tv) =
                    (GpuTensor::new(&dq, layout), GpuTensor::new(&dk, layout), GpuTensor::new(&dv, layout));
                let cfg = |g: usize, l: usize| Config { block_rows: l, causal, ..Config::with_group_size(g) };
                let (c1, c2, c4, c2_64) = (cfg(1, 128), cfg(2, 128), cfg(4, 128), cfg(2, 64));
                let shape128 = PlanShape::new(&c2, &layout).unwrap();
                let shape64 = PlanShape::new(&c2_64, &layout).unwrap();
                let (w, r) = (a.warmup, a.reps);
                let plan_ms = time(&stream, w, r, || {
                    engine.plan(&c2, &tq, &mut dplan, &stream).unwrap();
                });
                let mut attend_on = |engine: &Engine,
                                     c: &Config<'_>,
                                     shape: PlanShape,
                                     with_plan: bool,
                                     dplan: &mut DeviceBuffer<u16>| {
                    let dout = &mut dout;
                    time(&stream, w, r, || {
                        if with_plan {
                            engine.plan(c, &tq, dplan, &stream).unwrap();
                        }
                        let plan = GpuPlan::new(dplan, shape);
                        let uses_plan = c.group_size(0) > 1;
                        engine
                            .attention(
                                c,
                                uses_plan.then_some(&plan),
                                &tq,
                                &tk,
                                &tv,
                                &mut GpuTensorMut::new(dout, layout),
                                None,
                                &stream,
                            )
                            .unwrap();
                    })
                };
                // The plan buffer holds a real plan of this Q when G > 1 is timed alone.
                engine.plan(&c2, &tq, &mut dplan, &stream).unwrap();
                let g1 = attend_on(&engine, &c1, shape128, false, &mut dplan);
                let g2 = attend_on(&engine, &c2, shape128, false, &mut dplan);
                let g4 = attend_on(&engine, &c4, shape128, false, &mut dplan);
                let g2t = attend_on(&engine, &c2, shape128, true, &mut dplan);
                let g4t = attend_on(&engine, &c4, shape128, true, &mut dplan);
                let mma_g1 = attend_on(&mma, &c1, shape128, false, &mut dplan);
                let mma_g2 = attend_on(&mma, &c2, shape128, false, &mut dplan);
                let mma_g4 = attend_on(&mma, &c4, shape128, false, &mut dplan);
                engine.plan(&c2_64, &tq, &mut dplan, &stream).unwrap();
                let g2_64 = attend_on(&engine, &c2_64, shape64, false, &mut dplan);
                let flops = 4.0 * (b * h) as f64 * (n * n) as f64 * d as f64 / if causal { 2.0 } else { 1.0 };
                let tf = |ms: f64| flops / (ms * 1e-3) / 1e12;
                println!(
                    "{d:>4} {n:>6} {causal:>6} {b:>3} {h:>3} | {plan_ms:>8.3} | {g1:>7.3} {g2:>7.3} {g4:>7.3} {g2t:>7.3} {g4t:>7.3} {g2_64:>8.3} | {:>14.1} {:>5.1} {:>5.1} {:>6.1} {:>5.1} {:>5.1}% | {:>9.1} {:>5.1} {:>5.1}",
                    tf(g1),
                    tf(g2),
                    tf(g4),
                    tf(g2t),
                    tf(g4t),
                    100.0 * plan_ms / g2,
                    tf(mma_g1),
                    tf(mma_g2),
                    tf(mma_g4)
                );
                if let Some(f) = json.as_mut() {
                    writeln!(
                        f,
                        "{{\"d\": {d}, \"n\": {n}, \"causal\": {causal}, \"b\": {b}, \"h\": {h}, \"plan_ms\": {plan_ms}, \
                         \"g1_ms\": {g1}, \"g2_ms\": {g2}, \"g4_ms\": {g4}, \"g2_total_ms\": {g2t}, \"g4_total_ms\": {g4t}, \
                         \"g2_l64_ms\": {g2_64}, \"mma_g1_ms\": {mma_g1}, \"mma_g2_ms\": {mma_g2}, \"mma_g4_ms\": {mma_g4}}}"
                    )
                    .unwrap();
                }
            }
        }
    }
}

/// `--backward`: training-step timings (forward with LSE + backward).
mod backward {
    use super::*;
    use distr_attention_core::{DType, Problem};
    use distr_attention_cuda::{backward_workspace_len, GpuForward, GpuGradients};

    pub fn run(
        a: &Args,
        engine: &Engine,
        stream: &Stream,
        (dq, dk, dv): (&DeviceBuffer<Bf16>, &DeviceBuffer<Bf16>, &DeviceBuffer<Bf16>),
        inputs: &mut RandomInputs,
        mut json: Option<&mut std::fs::File>,
    ) {
        let len = TOKENS * WIDTH;
        // dO: a fresh random draw.
        let d_out = inputs.upload();
        let zeros = vec![Bf16::default(); len];
        let mut out: DeviceBuffer<Bf16> = DeviceBuffer::from_slice(&zeros).unwrap();
        let (mut gq, mut gk, mut gv): (DeviceBuffer<Bf16>, DeviceBuffer<Bf16>, DeviceBuffer<Bf16>) = (
            DeviceBuffer::from_slice(&zeros).unwrap(),
            DeviceBuffer::from_slice(&zeros).unwrap(),
            DeviceBuffer::from_slice(&zeros).unwrap(),
        );
        drop(zeros);
        let mut dplan: DeviceBuffer<u16> =
            DeviceBuffer::from_slice(&vec![0u16; TOKENS / 64 * WIDTH]).unwrap();
        let probe = Problem::new(
            &Layout::contiguous(1, TOKENS, WIDTH / 32, 32),
            &Layout::contiguous(1, TOKENS, WIDTH / 32, 32),
            &Layout::contiguous(1, TOKENS, WIDTH / 32, 32),
        )
        .unwrap();
        // The largest workspace of the shapes (B·H·N is largest at D = 32; D = 64 and 128 need less).
        let ws_len = backward_workspace_len(&Config::with_group_size(2), &probe, DType::BF16).unwrap();
        let mut ws: DeviceBuffer<f32> = DeviceBuffer::from_slice(&vec![0f32; ws_len]).unwrap();
        println!(
            "{:>4} {:>6} {:>6} {:>3} {:>3} | {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} | TFLOP/s: {:>5} {:>5}",
            "D", "N", "causal", "B", "H", "plan ms", "G1 fwd", "G1 bwd", "G1 f+b", "G2 fwd", "G2 bwd", "G2 p+f+b",
            "G2 p+f", "G2 f+b", "G1", "G2"
        );
        let dims: &[usize] = if a.quick { &[128] } else { &[64, 128] };
        let lens: &[usize] = if a.quick { &[4096] } else { &[1024, 4096] };
        for &d in dims {
            for &n in lens {
                for causal in [false, true] {
                    let (b, h) = (TOKENS / n, WIDTH / d);
                    let layout = Layout::contiguous(b, n, h, d);
                    let (tq, tk, tv) =
                        (GpuTensor::new(dq, layout), GpuTensor::new(dk, layout), GpuTensor::new(dv, layout));
                    let cfg = |g: usize| Config { block_rows: 128, causal, ..Config::with_group_size(g) };
                    let (c1, c2) = (cfg(1), cfg(2));
                    let shape = PlanShape::new(&c2, &layout).unwrap();
                    let (w, r) = (a.warmup, a.reps);
                    let mut lse: DeviceBuffer<f32> =
                        DeviceBuffer::from_slice(&vec![0f32; b * h * n]).unwrap();
                    // One step: [plan] + forward (with LSE) when `fwd`, backward when `bwd`.
                    let mut step = |c: &Config<'_>, plan: bool, fwd: bool, bwd: bool| {
                        let uses_plan = c.group_size(0) > 1;
                        time(stream, w, r, || {
                            if plan {
                                engine.plan(c, &tq, &mut dplan, stream).unwrap();
                            }
                            let gp = GpuPlan::new(&dplan, shape);
                            if fwd {
                                engine
                                    .attention(
                                        c,
                                        uses_plan.then_some(&gp),
                                        &tq,
                                        &tk,
                                        &tv,
                                        &mut GpuTensorMut::new(&mut out, layout),
                                        Some(&mut lse),
                                        stream,
                                    )
                                    .unwrap();
                            }
                            if bwd {
                                let f = GpuForward {
                                    o: GpuTensor::new(&out, layout),
                                    lse: &lse,
                                    d_out: GpuTensor::new(&d_out, layout),
                                };
                                let mut g = GpuGradients {
                                    dq: GpuTensorMut::new(&mut gq, layout),
                                    dk: GpuTensorMut::new(&mut gk, layout),
                                    dv: GpuTensorMut::new(&mut gv, layout),
                                };
                                engine
                                    .attention_backward(
                                        c,
                                        uses_plan.then_some(&gp),
                                        &tq,
                                        &tk,
                                        &tv,
                                        &f,
                                        &mut g,
                                        &mut ws,
                                        stream,
                                    )
                                    .unwrap();
                            }
                        })
                    };
                    let plan_ms = step(&c2, true, false, false);
                    // G = 1: forward alone, then backward alone on its O and LSE, then both.
                    let g1_fwd = step(&c1, false, true, false);
                    let g1_bwd = step(&c1, false, false, true);
                    let g1_total = step(&c1, false, true, true);
                    // G = 2: the plan buffer holds this Q's plan (computed above).
                    let g2_fwd = step(&c2, false, true, false);
                    let g2_bwd = step(&c2, false, false, true);
                    let g2_total = step(&c2, true, true, true);
                    // Where a G = 2 step's time goes when its parts run back to back.
                    let g2_pf = step(&c2, true, true, false);
                    let g2_fb = step(&c2, false, true, true);
                    let flops =
                        14.0 * (b * h) as f64 * (n * n) as f64 * d as f64 / if causal { 2.0 } else { 1.0 };
                    let tf = |ms: f64| flops / (ms * 1e-3) / 1e12;
                    println!(
                        "{d:>4} {n:>6} {causal:>6} {b:>3} {h:>3} | {plan_ms:>8.3} | {g1_fwd:>8.3} {g1_bwd:>8.3} {g1_total:>8.3} | {g2_fwd:>8.3} {g2_bwd:>8.3} {g2_total:>8.3} | {g2_pf:>8.3} {g2_fb:>8.3} | {:>14.1} {:>5.1}",
                        tf(g1_total),
                        tf(g2_total)
                    );
                    if let Some(f) = json.as_mut() {
                        writeln!(
                            f,
                            "{{\"d\": {d}, \"n\": {n}, \"causal\": {causal}, \"b\": {b}, \"h\": {h}, \"plan_ms\": {plan_ms}, \
                             \"g1_fwd_ms\": {g1_fwd}, \"g1_bwd_ms\": {g1_bwd}, \"g1_total_ms\": {g1_total}, \
                             \"g2_fwd_ms\": {g2_fwd}, \"g2_bwd_ms\": {g2_bwd}, \"g2_total_ms\": {g2_total}, \"g2_plan_fwd_ms\": {g2_pf},                              \"g2_fwd_bwd_ms\": {g2_fb}}}"
                        )
                        .unwrap();
                    }
                }
            }
        }
    }
}
