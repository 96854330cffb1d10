//! A small end-to-end check, sized for compute-sanitizer (memcheck,
//! racecheck, synccheck): plan and attention for a few shapes with tails,
//! causal, GQA and every group size, compared with the core's reference on
//! the GPU's plan. Exits non-zero on any mismatch.
//!
//! ```text
//! compute-sanitizer --tool memcheck --error-exitcode 1 target/debug/examples/smoke
//! ```

use distr_attention_core::{
    reference, Config, Fusion, Layout, PlanRef, PlanShape, Problem, Tensor, TensorMut,
};
use distr_attention_cuda::cust::memory::{CopyDestination, DeviceBuffer};
use distr_attention_cuda::cust::stream::{Stream, StreamFlags};
use distr_attention_cuda::{Bf16, Engine, GpuElement, GpuPlan, GpuTensor, GpuTensorMut};
use half::bf16;

fn main() {
    let _ctx = match distr_attention_cuda::cust::quick_init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("smoke: no CUDA device ({e})");
            std::process::exit(2);
        }
    };
    let engine = Engine::new().expect("engine");
    println!("smoke: image {:?}, wgmma kernel {}", engine.image(), engine.wgmma());
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).expect("stream");
    let mut seed = 1u64;
    let mut rand = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut failures = 0;
    // (n, m, hq, hkv, d, block_rows, g, causal, fusion)
    let cases = [
        (100, 77, 2, 1, 64, 64, 2, true, Fusion::Mean),
        (70, 130, 2, 2, 128, 128, 4, false, Fusion::Sample),
        (129, 129, 3, 1, 32, 64, 8, true, Fusion::Mean),
        (65, 40, 2, 1, 128, 128, 1, true, Fusion::Mean),
        (33, 200, 1, 1, 64, 128, 1, false, Fusion::Mean),
        // Served by the Hopper (wgmma) kernel on compute capability 9.0 (so are
        // the second, fourth and fifth cases above).
        (150, 140, 2, 1, 128, 128, 2, true, Fusion::Mean),
        (130, 260, 2, 2, 64, 128, 8, false, Fusion::Sample),
        (200, 70, 1, 1, 64, 64, 1, true, Fusion::Mean),
    ];
    for (n, m, hq, hkv, d, block_rows, g, causal, fusion) in cases {
        let (ql, kl) = (Layout::contiguous(1, n, hq, d), Layout::contiguous(1, m, hkv, d));
        let gen = |len: usize, r: &mut dyn FnMut() -> f32| {
            (0..len).map(|_| bf16::from_f32(r())).collect::<Vec<_>>()
        };
        let q = gen(n * hq * d, &mut rand);
        let k = gen(m * hkv * d, &mut rand);
        let v = gen(m * hkv * d, &mut rand);
        let cfg = Config { block_rows, causal, fusion, ..Config::with_group_size(g) };
        let p = Problem::new(&ql, &kl, &kl).unwrap();
        let ol = p.output_layout();
        let up = |x: &[bf16]| DeviceBuffer::from_slice(Bf16::from_host(x)).unwrap();
        let (dq, dk, dv) = (up(&q), up(&k), up(&v));
        let shape = PlanShape::new(&cfg, &ql).unwrap();
        let mut dplan = DeviceBuffer::from_slice(&vec![0u16; shape.num_entries().unwrap()]).unwrap();
        let mut dout = DeviceBuffer::from_slice(&vec![f32::NAN; n * hq * d]).unwrap();
        let mut dlse = DeviceBuffer::from_slice(&vec![f32::NAN; hq * n]).unwrap();
        let tq = GpuTensor::new(&dq, ql);
        if g > 1 {
            engine.plan(&cfg, &tq, &mut dplan, &stream).unwrap();
        }
        let plan = GpuPlan::new(&dplan, shape);
        engine
            .attention(
                &cfg,
                (g > 1).then_some(&plan),
                &tq,
                &GpuTensor::new(&dk, kl),
                &GpuTensor::new(&dv, kl),
                &mut GpuTensorMut::new(&mut dout, ol),
                Some(&mut dlse),
                &stream,
            )
            .unwrap();
        stream.synchronize().expect("kernels ran");
        let mut out = vec![0f32; n * hq * d];
        dout.copy_to(&mut out[..]).unwrap();
        let mut perm = vec![0u16; shape.num_entries().unwrap()];
        dplan.copy_to(&mut perm[..]).unwrap();
        let mut reference = vec![0f32; out.len()];
        let (tq, tk, tv) = (Tensor::new(&q, ql), Tensor::new(&k, kl), Tensor::new(&v, kl));
        let mut tout = TensorMut::new(&mut reference, ol);
        if g > 1 {
            let plan = PlanRef::new(shape, &perm).expect("valid GPU plan");
            reference::attention(&cfg, &plan, &tq, &tk, &tv, &mut tout, None).unwrap();
        } else {
            reference::exact_attention(&cfg, &tq, &tk, &tv, &mut tout, None).unwrap();
        }
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in out.iter().zip(&reference) {
            num += (*a as f64 - *b as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        let err = (num / den.max(1e-30)).sqrt();
        let ok = err < 2e-2 && out.iter().all(|x| x.is_finite());
        println!(
            "n {n} m {m} hq {hq} hkv {hkv} d {d} l {block_rows} G {g} causal {causal}: rel. error {err:.2e}"
        );
        failures += (!ok) as usize;
    }
    if failures > 0 {
        eprintln!("smoke: {failures} case(s) failed");
        std::process::exit(1);
    }
    println!("smoke: all cases passed");
}
