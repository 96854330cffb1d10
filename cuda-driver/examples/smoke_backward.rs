//! A small end-to-end check of the backward pass, sized for
//! compute-sanitizer (memcheck, racecheck, synccheck, initcheck): plan,
//! forward and backward for shapes with tails, causal with N > M and N < M,
//! GQA, per-head group sizes sharing a KV head, both fusions, an f32 dO (the
//! conversion path), compared with the core's reference backward on the
//! GPU's plan. Exits non-zero on any mismatch.
//!
//! ```text
//! compute-sanitizer --tool memcheck --error-exitcode 1 target/debug/examples/smoke_backward
//! ```

use distr_attention_core::backward::{reference, Forward, Gradients};
use distr_attention_core::{
    Config, Fusion, GroupSizes, Layout, PlanRef, PlanShape, Problem, Tensor, TensorMut,
};
use distr_attention_cuda::cust::memory::{CopyDestination, DeviceBuffer};
use distr_attention_cuda::cust::stream::{Stream, StreamFlags};
use distr_attention_cuda::{
    backward_workspace_len, Bf16, DType, Engine, GpuElement, GpuForward, GpuGradients, GpuPlan, GpuTensor,
    GpuTensorMut,
};
use half::bf16;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn main() {
    let _ctx = match distr_attention_cuda::cust::quick_init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("smoke_backward: no CUDA device ({e})");
            std::process::exit(2);
        }
    };
    let engine = Engine::new().expect("engine");
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).expect("stream");
    let mut seed = 7u64;
    let mut rand = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let per_head = [2usize, 1, 4, 8];
    let mut failures = 0;
    // (n, m, hq, hkv, d, block_rows, g (0: per head), causal, fusion, dO f32)
    let cases = [
        (100, 77, 2, 1, 64, 64, 2, true, Fusion::Mean, false),
        (70, 150, 2, 2, 128, 128, 4, true, Fusion::Sample, true),
        (129, 40, 3, 1, 32, 64, 8, true, Fusion::Mean, false),
        (65, 130, 2, 1, 128, 128, 1, false, Fusion::Mean, true),
        (90, 90, 4, 2, 64, 64, 0, true, Fusion::Mean, false),
        // Hopper main kernel (sm_90): D = 128 with G = 2, tails, GQA, 64-row plan blocks.
        (150, 200, 4, 2, 128, 64, 2, true, Fusion::Mean, false),
        (70, 130, 2, 1, 128, 128, 2, false, Fusion::Sample, true),
    ];
    for (n, m, hq, hkv, d, block_rows, g, causal, fusion, do_f32) in cases {
        let (ql, kl) = (Layout::contiguous(1, n, hq, d), Layout::contiguous(1, m, hkv, d));
        let gen = |len: usize, r: &mut dyn FnMut() -> f32| {
            (0..len).map(|_| bf16::from_f32(r())).collect::<Vec<_>>()
        };
        let (q, k, v) =
            (gen(n * hq * d, &mut rand), gen(m * hkv * d, &mut rand), gen(m * hkv * d, &mut rand));
        // dO: f32 values exactly representable in bf16, so both paths see the same numbers.
        let d_out: Vec<f32> = gen(n * hq * d, &mut rand).iter().map(|x| x.to_f32()).collect();
        let group_sizes = if g == 0 { GroupSizes::PerHead(&per_head[..hq]) } else { GroupSizes::Uniform(g) };
        let cfg = Config { block_rows, causal, fusion, group_sizes, ..Config::with_group_size(1) };
        let p = Problem::new(&ql, &kl, &kl).unwrap();
        let needs_plan = (0..hq).any(|h| cfg.group_size(h) > 1);
        let up = |x: &[bf16]| DeviceBuffer::from_slice(Bf16::from_host(x)).unwrap();
        let (dq_in, dk_in, dv_in) = (up(&q), up(&k), up(&v));
        let shape = PlanShape::new(&cfg, &ql).unwrap();
        let mut plan = DeviceBuffer::from_slice(&vec![0u16; shape.num_entries().unwrap()]).unwrap();
        let mut out = DeviceBuffer::from_slice(&vec![f32::NAN; n * hq * d]).unwrap();
        let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; hq * n]).unwrap();
        let (tq, tk, tv) =
            (GpuTensor::new(&dq_in, ql), GpuTensor::new(&dk_in, kl), GpuTensor::new(&dv_in, kl));
        if needs_plan {
            engine.plan(&cfg, &tq, &mut plan, &stream).unwrap();
        }
        let gplan = GpuPlan::new(&plan, shape);
        let plan_arg = needs_plan.then_some(&gplan);
        engine
            .attention(
                &cfg,
                plan_arg,
                &tq,
                &tk,
                &tv,
                &mut GpuTensorMut::new(&mut out, ql),
                Some(&mut lse),
                &stream,
            )
            .unwrap();
        let (mut gq, mut gk, mut gv) = (
            DeviceBuffer::from_slice(&vec![f32::NAN; n * hq * d]).unwrap(),
            DeviceBuffer::from_slice(&vec![f32::NAN; m * hkv * d]).unwrap(),
            DeviceBuffer::from_slice(&vec![f32::NAN; m * hkv * d]).unwrap(),
        );
        let do_type = if do_f32 { DType::F32 } else { <Bf16 as GpuElement>::DTYPE };
        let mut ws =
            DeviceBuffer::from_slice(&vec![f32::NAN; backward_workspace_len(&cfg, &p, do_type).unwrap()])
                .unwrap();
        let do_f32_buf = DeviceBuffer::from_slice(&d_out).unwrap();
        let do_bf16: Vec<bf16> = d_out.iter().map(|&x| bf16::from_f32(x)).collect();
        let do_bf16_buf = up(&do_bf16);
        {
            let mut grads = GpuGradients {
                dq: GpuTensorMut::new(&mut gq, ql),
                dk: GpuTensorMut::new(&mut gk, kl),
                dv: GpuTensorMut::new(&mut gv, kl),
            };
            let o = GpuTensor::new(&out, ql);
            let r = if do_f32 {
                let fwd = GpuForward { o, lse: &lse, d_out: GpuTensor::new(&do_f32_buf, ql) };
                engine.attention_backward(&cfg, plan_arg, &tq, &tk, &tv, &fwd, &mut grads, &mut ws, &stream)
            } else {
                let fwd = GpuForward { o, lse: &lse, d_out: GpuTensor::new(&do_bf16_buf, ql) };
                engine.attention_backward(&cfg, plan_arg, &tq, &tk, &tv, &fwd, &mut grads, &mut ws, &stream)
            };
            r.unwrap();
        }
        stream.synchronize().expect("kernels ran");
        let host = |b: &DeviceBuffer<f32>| {
            let mut h = vec![0f32; b.len()];
            b.copy_to(&mut h[..]).unwrap();
            h
        };
        let (got_q, got_k, got_v, o_host, lse_host) =
            (host(&gq), host(&gk), host(&gv), host(&out), host(&lse));
        let mut perm = vec![0u16; shape.num_entries().unwrap()];
        plan.copy_to(&mut perm[..]).unwrap();
        let (mut rq, mut rk, mut rv) =
            (vec![0f32; n * hq * d], vec![0f32; m * hkv * d], vec![0f32; m * hkv * d]);
        let fwd = Forward { o: Tensor::new(&o_host, ql), lse: &lse_host, d_out: Tensor::new(&d_out, ql) };
        let (mut a, mut b, mut c) =
            (TensorMut::new(&mut rq, ql), TensorMut::new(&mut rk, kl), TensorMut::new(&mut rv, kl));
        let mut grads = Gradients { dq: &mut a, dk: &mut b, dv: &mut c };
        let (hq_t, hk_t, hv_t) = (Tensor::new(&q, ql), Tensor::new(&k, kl), Tensor::new(&v, kl));
        if needs_plan {
            let plan = PlanRef::new(shape, &perm).expect("valid GPU plan");
            reference::attention_backward(&cfg, &plan, &hq_t, &hk_t, &hv_t, &fwd, &mut grads).unwrap();
        } else {
            reference::exact_attention_backward(&cfg, &hq_t, &hk_t, &hv_t, &fwd, &mut grads).unwrap();
        }
        let errs = [rel(&got_q, &rq), rel(&got_k, &rk), rel(&got_v, &rv)];
        let finite = [&got_q, &got_k, &got_v].iter().all(|g| g.iter().all(|x| x.is_finite()));
        let ok = finite && errs.iter().all(|&e| e < 3e-2);
        println!(
            "n {n} m {m} hq {hq} hkv {hkv} d {d} l {block_rows} G {g} causal {causal} {fusion:?} dO f32 {do_f32}: \
             rel. errors dq {:.2e} dk {:.2e} dv {:.2e}",
            errs[0], errs[1], errs[2]
        );
        failures += (!ok) as usize;
    }
    if failures > 0 {
        eprintln!("smoke_backward: {failures} case(s) failed");
        std::process::exit(1);
    }
    println!("smoke_backward: all cases passed");
}
