//! Helpers of the GPU tests: device discovery (tests skip with a printed
//! reason where no GPU or driver is found), deterministic random inputs,
//! uploads, poisoned outputs and the comparison with the core's reference.
#![allow(dead_code)]

use std::path::PathBuf;

use distr_attention::activations::Activations;
use distr_attention::metrics::head_relative_errors;
use distr_attention::{
    reference, Config, Element, GroupSizes, Layout, PlanRef, PlanShape, Problem, Tensor, TensorMut,
};
use distr_attention_cuda::cust::context::Context;
use distr_attention_cuda::cust::memory::{CopyDestination, DeviceBuffer};
use distr_attention_cuda::cust::stream::{Stream, StreamFlags};
use distr_attention_cuda::{Engine, GpuElement, GpuOutput, GpuPlan, GpuTensor, GpuTensorMut};

/// A CUDA context, an engine in it and a stream; `None` (after printing why)
/// where no GPU or driver is available.
pub struct Gpu {
    pub engine: Engine,
    pub stream: Stream,
    _ctx: Context,
}

pub fn gpu(test: &str) -> Option<Gpu> {
    let ctx = match distr_attention_cuda::cust::quick_init() {
        Ok(c) => c,
        Err(e) => {
            println!("SKIPPED {test}: no usable CUDA device or driver ({e:?}: {e})");
            return None;
        }
    };
    let engine = Engine::new().expect("engine for the current context");
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).expect("stream");
    println!(
        "{test}: running on compute capability {:?}, image {:?}, wgmma kernel {}",
        engine.capability(),
        engine.image(),
        engine.wgmma()
    );
    Some(Gpu { engine, stream, _ctx: ctx })
}

/// splitmix64-based generator: reproducible inputs without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// A strided layout: BHSD memory order with `pad` extra elements per row
/// and a gap between batches (all strides multiples of 8 elements).
/// One G for every head (a single entry) or one per head.
pub fn group_sizes(g: &[usize]) -> GroupSizes<'_> {
    if g.len() == 1 {
        GroupSizes::Uniform(g[0])
    } else {
        GroupSizes::PerHead(g)
    }
}

pub fn strided(batch: usize, seq: usize, heads: usize, dim: usize, pad: usize) -> Layout {
    let stride_seq = dim + pad;
    let stride_head = seq * stride_seq;
    let stride_batch = heads * stride_head + 8;
    Layout { batch, seq, heads, dim, stride_batch, stride_seq, stride_head }
}

/// Host data of a layout: random normal values (times `scale`) at addressed
/// elements, `fill` elsewhere.
pub fn random_tensor<T: Element>(rng: &mut Rng, layout: &Layout, scale: f32, fill: f32) -> Vec<T> {
    let len = layout.required_len(distr_attention::Operand::Q).expect("valid layout");
    let mut v = vec![T::from_f32(fill); len];
    for b in 0..layout.batch {
        for s in 0..layout.seq {
            for h in 0..layout.heads {
                let o = layout.offset(b, s, h);
                for x in &mut v[o..o + layout.dim] {
                    *x = T::from_f32(rng.normal() * scale);
                }
            }
        }
    }
    v
}

pub fn upload<G: GpuElement>(host: &[G::Host]) -> DeviceBuffer<G> {
    DeviceBuffer::from_slice(G::from_host(host)).expect("upload")
}

pub fn download<T: distr_attention_cuda::cust::memory::DeviceCopy + Default + Clone>(
    buf: &DeviceBuffer<T>,
) -> Vec<T> {
    let mut host = vec![T::default(); buf.len()];
    buf.copy_to(&mut host[..]).expect("download");
    host
}

/// Offsets a layout addresses.
pub fn addressed(layout: &Layout) -> Vec<usize> {
    let mut v = Vec::new();
    for b in 0..layout.batch {
        for s in 0..layout.seq {
            for h in 0..layout.heads {
                let o = layout.offset(b, s, h);
                v.extend(o..o + layout.dim);
            }
        }
    }
    v
}

/// An output element type as seen from the tests: NaN poison and f32 values.
pub trait OutHost: GpuOutput + Default + Clone {
    fn poison() -> Self;
    fn value(self) -> f32;
    fn is_poison(self) -> bool;
}
impl OutHost for f32 {
    fn poison() -> Self {
        f32::NAN
    }
    fn value(self) -> f32 {
        self
    }
    fn is_poison(self) -> bool {
        self.is_nan()
    }
}
impl OutHost for distr_attention_cuda::Bf16 {
    fn poison() -> Self {
        distr_attention_cuda::Bf16(half::bf16::NAN)
    }
    fn value(self) -> f32 {
        self.0.to_f32()
    }
    fn is_poison(self) -> bool {
        self.0.is_nan()
    }
}
impl OutHost for distr_attention_cuda::F16 {
    fn poison() -> Self {
        distr_attention_cuda::F16(half::f16::NAN)
    }
    fn value(self) -> f32 {
        self.0.to_f32()
    }
    fn is_poison(self) -> bool {
        self.0.is_nan()
    }
}

/// GPU results of one call, downloaded.
pub struct GpuRun {
    pub out: Vec<f32>,
    pub lse: Option<Vec<f32>>,
    pub plan: Option<Vec<u16>>,
    pub plan_shape: Option<PlanShape>,
    /// Elements outside the output layout that were overwritten, plus
    /// addressed elements left unwritten (still NaN).
    pub stray_writes: usize,
    pub unwritten: usize,
}

/// Runs the GPU plan (when some head has G > 1) and attention on host
/// inputs: outputs and LSE are poisoned with NaN first, and the whole
/// output buffer (gaps of a strided layout included) is checked afterwards.
#[allow(clippy::too_many_arguments)]
pub fn run_gpu<G: GpuElement, O: OutHost>(
    gpu: &Gpu,
    cfg: &Config<'_>,
    q: (&[G::Host], Layout),
    k: (&[G::Host], Layout),
    v: (&[G::Host], Layout),
    out_layout: Layout,
    with_lse: bool,
) -> GpuRun {
    run_gpu_on::<G, O>(&gpu.engine, &gpu.stream, cfg, q, k, v, out_layout, with_lse)
}

/// [`run_gpu`] on a given engine (of the current context) and stream.
#[allow(clippy::too_many_arguments)]
pub fn run_gpu_on<G: GpuElement, O: OutHost>(
    engine: &Engine,
    stream: &Stream,
    cfg: &Config<'_>,
    q: (&[G::Host], Layout),
    k: (&[G::Host], Layout),
    v: (&[G::Host], Layout),
    out_layout: Layout,
    with_lse: bool,
) -> GpuRun {
    let p = Problem::new(&q.1, &k.1, &v.1).expect("valid problem");
    let (dq, dk, dv) = (upload::<G>(q.0), upload::<G>(k.0), upload::<G>(v.0));
    let out_len = out_layout.required_len(distr_attention::Operand::Output).unwrap() + 16;
    let mut dout = DeviceBuffer::from_slice(&vec![O::poison(); out_len]).unwrap();
    let mut dlse = with_lse.then(|| DeviceBuffer::from_slice(&vec![f32::NAN; p.lse_len().unwrap()]).unwrap());
    let (tq, tk, tv) = (GpuTensor::new(&dq, q.1), GpuTensor::new(&dk, k.1), GpuTensor::new(&dv, v.1));
    let needs_plan = (0..p.q_heads).any(|h| cfg.group_size(h) > 1);
    let shape = PlanShape::new(cfg, &q.1).unwrap();
    let mut dplan = DeviceBuffer::from_slice(&vec![u16::MAX; shape.num_entries().unwrap()]).unwrap();
    let e = engine;
    if needs_plan {
        let got = e.plan(cfg, &tq, &mut dplan, stream).expect("gpu plan");
        assert_eq!(got, shape);
    }
    {
        let plan = GpuPlan::new(&dplan, shape);
        let mut tout = GpuTensorMut::new(&mut dout, out_layout);
        e.attention(cfg, needs_plan.then_some(&plan), &tq, &tk, &tv, &mut tout, dlse.as_deref_mut(), stream)
            .expect("gpu attention");
    }
    stream.synchronize().expect("kernels ran");
    let out_raw = download(&dout);
    let written: std::collections::HashSet<usize> = addressed(&out_layout).into_iter().collect();
    let mut stray_writes = 0;
    let mut unwritten = 0;
    let mut out = vec![f32::NAN; out_len];
    for (i, x) in out_raw.iter().enumerate() {
        let inside = written.contains(&i);
        if inside && x.is_poison() {
            unwritten += 1;
        }
        if !inside && !x.is_poison() {
            stray_writes += 1;
        }
        out[i] = x.value();
    }
    GpuRun {
        out,
        lse: dlse.as_ref().map(download),
        plan: needs_plan.then(|| download(&dplan)),
        plan_shape: needs_plan.then_some(shape),
        stray_writes,
        unwritten,
    }
}

/// The core's f64 reference on the GPU's own plan (exact reference when no
/// plan was needed): output in `out_layout`'s shape, densely laid out, and LSE.
pub fn reference_on<T: Element>(
    cfg: &Config<'_>,
    plan: Option<(&[u16], PlanShape)>,
    q: (&[T], Layout),
    k: (&[T], Layout),
    v: (&[T], Layout),
) -> (Vec<f32>, Vec<f32>, Layout) {
    let p = Problem::new(&q.1, &k.1, &v.1).unwrap();
    let lay = p.output_layout();
    let mut o = vec![f32::NAN; lay.batch * lay.seq * lay.heads * lay.dim];
    let mut lse = vec![f32::NAN; p.lse_len().unwrap()];
    let (tq, tk, tv) = (Tensor::new(q.0, q.1), Tensor::new(k.0, k.1), Tensor::new(v.0, v.1));
    match plan {
        Some((perm, shape)) => {
            let plan = PlanRef::new(shape, perm).expect("GPU plan is a valid plan");
            reference::attention(cfg, &plan, &tq, &tk, &tv, &mut TensorMut::new(&mut o, lay), Some(&mut lse))
        }
        None => {
            reference::exact_attention(cfg, &tq, &tk, &tv, &mut TensorMut::new(&mut o, lay), Some(&mut lse))
        }
    }
    .expect("reference");
    (o, lse, lay)
}

/// Re-packs a strided output into the dense layout of `dense`.
pub fn densify(out: &[f32], from: &Layout, dense: &Layout) -> Vec<f32> {
    let mut v = vec![0f32; dense.batch * dense.seq * dense.heads * dense.dim];
    for b in 0..from.batch {
        for s in 0..from.seq {
            for h in 0..from.heads {
                let (o, d) = (from.offset(b, s, h), dense.offset(b, s, h));
                v[d..d + from.dim].copy_from_slice(&out[o..o + from.dim]);
            }
        }
    }
    v
}

/// Largest per-(batch, head) relative Frobenius error.
pub fn max_head_error(out: &[f32], reference: &[f32], layout: &Layout) -> f64 {
    head_relative_errors(out, reference, layout).into_iter().fold(0.0, f64::max)
}

/// Largest absolute LSE difference; -inf must match exactly (counted in the second value).
pub fn lse_error(gpu: &[f32], reference: &[f32]) -> (f64, usize) {
    let mut worst = 0f64;
    let mut mismatched_inf = 0;
    for (&g, &r) in gpu.iter().zip(reference) {
        if r == f32::NEG_INFINITY || g == f32::NEG_INFINITY || !g.is_finite() {
            if g != r {
                mismatched_inf += 1;
            }
        } else {
            worst = worst.max((g as f64 - r as f64).abs());
        }
    }
    (worst, mismatched_inf)
}

/// The real-data fixtures of tests/data: `$DISTR_ATTENTION_DATA`, the
/// workspace's tests/data, or ./tests/data (a copy of the repository).
pub fn fixtures() -> Vec<Activations> {
    let names = ["minilm_l6_dev.safetensors", "smollm2_135m_dev.safetensors"];
    let dirs = [
        std::env::var_os("DISTR_ATTENTION_DATA").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("tests").join("data")),
        Some(PathBuf::from("tests").join("data")),
    ];
    let dir = dirs
        .into_iter()
        .flatten()
        .find(|d| d.join(names[0]).exists())
        .expect("fixtures: set DISTR_ATTENTION_DATA or run from the repository root");
    names.iter().map(|n| Activations::load(&dir.join(n), None).expect("fixture loads")).collect()
}
