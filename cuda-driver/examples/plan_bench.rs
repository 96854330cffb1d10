//! Plan time against attention time on the GPU: LSH, similarity and
//! key-weighted plans (the latter including the K Gram pre-pass and its
//! stream-ordered workspace) next to the attention kernel on the same
//! problem. Issue 5's bar: the similarity plan at most 5% of the attention
//! at N = 4096, D = 128 (bf16, B·N = 65536, H·D = 2048: B = 16, H = 16).
//!
//! Timing: CUDA events around each launch (series) on one stream, after
//! warm-up; the median of the repetitions. Inputs are random (uniform with
//! unit variance). Attention: block_rows 128, Mean fusion, output bf16, on
//! a plan of the same G.
//!
//! ```text
//! plan_bench [--json PATH] [--warmup N] [--reps N] [--quick]
//! ```

use std::io::Write;

use distr_attention_core::{Config, GroupingMode, Layout, PlanShape};
use distr_attention_cuda::cust::memory::DeviceBuffer;
use distr_attention_cuda::cust::stream::{Stream, StreamFlags};
use distr_attention_cuda::{Engine, GpuPlan, GpuTensor, GpuTensorMut};

#[path = "shared/bench_common.rs"]
mod bench_common;
use bench_common::{time, Args, RandomInputs, TOKENS, WIDTH};

fn main() {
    let a = Args::parse(11, &[]);
    let _ctx = distr_attention_cuda::cust::quick_init().expect("a CUDA device");
    let engine = Engine::new().unwrap();
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    println!("device: compute capability {:?}, image {:?}", engine.capability(), engine.image());

    // Random inputs, one buffer per tensor, reused by every shape (B·N·H·D is
    // the same for all); `dout` is an output buffer.
    let mut inputs = RandomInputs::new();
    let (dq, dk, dv) = (inputs.upload(), inputs.upload(), inputs.upload());
    let mut dout = inputs.upload();
    let mut dplan: DeviceBuffer<u16> = DeviceBuffer::from_slice(&vec![0u16; TOKENS / 64 * WIDTH]).unwrap();

    let mut json = a.json.as_ref().map(|p| std::fs::File::create(p).expect("json output"));
    println!(
        "{:>4} {:>6} {:>6} {:>3} {:>3} {:>2} | {:>9} {:>9} {:>9} | {:>9} | {:>6} {:>6} {:>6}",
        "D", "N", "causal", "B", "H", "G", "LSH ms", "sim ms", "kw ms", "attn ms", "LSH%", "sim%", "kw%"
    );
    let shapes: &[(usize, usize)] =
        if a.quick { &[(128, 4096)] } else { &[(128, 4096), (128, 1024), (128, 16384), (64, 4096)] };
    for &(d, n) in shapes {
        for causal in [false, true] {
            let (b, h) = (TOKENS / n, WIDTH / d);
            let layout = Layout::contiguous(b, n, h, d);
            let (tq, tk, tv) =
                (GpuTensor::new(&dq, layout), GpuTensor::new(&dk, layout), GpuTensor::new(&dv, layout));
            for g in [2usize, 4, 8] {
                if a.quick && g == 8 {
                    continue;
                }
                let (w, r) = (a.warmup, a.reps);
                let cfg =
                    |mode| Config { block_rows: 128, causal, grouping: mode, ..Config::with_group_size(g) };
                let mut plan_ms = |mode| {
                    let c = cfg(mode);
                    // Key-weighted G = 8 takes ~0.5 s a call (see kernels/NOTES.md): fewer repetitions.
                    let (w, r) = if mode == GroupingMode::KeyWeighted && g == 8 { (1, 3) } else { (w, r) };
                    time(&stream, w, r, || {
                        engine.plan_with_keys(&c, &tq, &tk, &mut dplan, &stream).unwrap();
                    })
                };
                let (lsh, sim, kw) = (
                    plan_ms(GroupingMode::Lsh),
                    plan_ms(GroupingMode::Similarity),
                    plan_ms(GroupingMode::KeyWeighted),
                );
                // Attention on the similarity plan (timed alone).
                let c = cfg(GroupingMode::Similarity);
                let shape = engine.plan_with_keys(&c, &tq, &tk, &mut dplan, &stream).unwrap();
                assert_eq!(shape, PlanShape::new(&c, &layout).unwrap());
                let attn = time(&stream, w, r, || {
                    engine
                        .attention(
                            &c,
                            Some(&GpuPlan::new(&dplan, shape)),
                            &tq,
                            &tk,
                            &tv,
                            &mut GpuTensorMut::new(&mut dout, layout),
                            None,
                            &stream,
                        )
                        .unwrap();
                });
                let pct = |x: f64| 100.0 * x / attn;
                println!(
                    "{d:>4} {n:>6} {causal:>6} {b:>3} {h:>3} {g:>2} | {lsh:>9.4} {sim:>9.4} {kw:>9.4} | {attn:>9.4} | {:>5.1}% {:>5.1}% {:>5.1}%",
                    pct(lsh),
                    pct(sim),
                    pct(kw)
                );
                if let Some(f) = json.as_mut() {
                    writeln!(
                        f,
                        "{{\"d\": {d}, \"n\": {n}, \"causal\": {causal}, \"b\": {b}, \"h\": {h}, \"g\": {g}, \
                         \"lsh_ms\": {lsh}, \"similarity_ms\": {sim}, \"key_weighted_ms\": {kw}, \"attention_ms\": {attn}}}"
                    )
                    .unwrap();
                }
            }
        }
    }
}
