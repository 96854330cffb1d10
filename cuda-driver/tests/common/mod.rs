//! Helpers of the GPU tests: device discovery (tests skip with a printed
//! reason where no GPU or driver is found), deterministic random inputs,
//! uploads, poisoned outputs and the comparison with the core's reference.
#![allow(dead_code)]

use std::path::PathBuf;

use distr_attention::activations::Activations;
use distr_attention::metrics::head_relative_errors;
use distr_attention::{
    reference, Config, Element, Fusion, GroupSizes, Layout, PlanRef, PlanShape, Problem, Tensor, TensorMut,
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

/// Layouts of Q, K, V, O, dO, dQ, dK, dV for the GPU tests: contiguous, or
/// BSHD with a different row padding for each (`strided`).
pub fn test_layouts(
    b: usize,
    n: usize,
    m: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    strided: bool,
) -> [Layout; 8] {
    if strided {
        [(n, hq, 8), (m, hkv, 16), (m, hkv, 8), (n, hq, 2), (n, hq, 24), (n, hq, 6), (m, hkv, 2), (m, hkv, 4)]
            .map(|(seq, heads, pad)| self::strided(b, seq, heads, d, pad))
    } else {
        let (q, k) = (Layout::contiguous(b, n, hq, d), Layout::contiguous(b, m, hkv, d));
        [q, k, k, q, q, q, k, k]
    }
}

/// Tolerances of the forward tests (max over (batch, head) of the relative
/// Frobenius error; LSE absolute): bf16 2e-2 / 3e-2, f16 5e-3 / 8e-3.
pub fn tolerances(is_bf16: bool) -> (f64, f64) {
    if is_bf16 {
        (2e-2, 3e-2)
    } else {
        (5e-3, 8e-3)
    }
}

/// One forward problem of the attention tests (gpu.rs and hopper.rs draw
/// their own from the shapes their kernels serve).
#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub n: usize,
    pub m: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub block_rows: usize,
    pub g: Vec<usize>,
    pub fusion: Fusion,
    pub causal: bool,
    pub bf16: bool,
    pub out_f32: bool,
    pub strided: bool,
    pub lse: bool,
}

impl Case {
    /// A random problem: head_dim from `dims`, N and M in 1..=`max_len`, 1 or
    /// 2 KV heads with 1 to 3 query heads each, one G or one per head, both
    /// fusions, input and output types and layouts; block_rows 64 or 128, or
    /// `fused_rows` wherever some head has G > 1.
    pub fn random(rng: &mut Rng, dims: &[usize], max_len: usize, fused_rows: Option<usize>) -> Case {
        let hkv = rng.pick(&[1, 2]);
        let hq = hkv * rng.pick(&[1, 2, 3]);
        let g: Vec<usize> = if rng.below(4) == 0 {
            (0..hq).map(|_| rng.pick(&[1, 2, 4, 8])).collect()
        } else {
            vec![rng.pick(&[1, 2, 2, 4, 8])]
        };
        let block_rows = match fused_rows {
            Some(rows) if g.iter().any(|&x| x > 1) => rows,
            _ => rng.pick(&[64, 128]),
        };
        Case {
            batch: rng.pick(&[1, 2]),
            n: 1 + rng.below(max_len),
            m: 1 + rng.below(max_len),
            hq,
            hkv,
            d: rng.pick(dims),
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

    /// The case's config (projection seed 7).
    pub fn config(&self) -> Config<'_> {
        Config {
            block_rows: self.block_rows,
            group_sizes: group_sizes(&self.g),
            fusion: self.fusion,
            causal: self.causal,
            seed: 7,
            ..Config::with_group_size(1)
        }
    }

    /// Q, K, V and output layouts: contiguous, or BSHD with padded rows.
    pub fn layouts(&self) -> (Layout, Layout, Layout, Layout) {
        let [q, k, v, o, ..] =
            test_layouts(self.batch, self.n, self.m, self.hq, self.hkv, self.d, self.strided);
        (q, k, v, o)
    }

    /// Random Q, K, V (unit variance) from `seed`.
    pub fn inputs<T: Element>(&self, seed: u64) -> (Vec<T>, Vec<T>, Vec<T>) {
        let mut rng = Rng::new(seed);
        let (ql, kl, vl, _) = self.layouts();
        let q = random_tensor(&mut rng, &ql, 1.0, 0.0);
        let k = random_tensor(&mut rng, &kl, 1.0, 0.0);
        let v = random_tensor(&mut rng, &vl, 1.0, 0.0);
        (q, k, v)
    }

    /// Plan (where needed) and attention on `engine`, in the case's output
    /// type; asserts that every output element was written and nothing
    /// outside the output layout.
    pub fn run<G>(
        &self,
        engine: &Engine,
        stream: &Stream,
        q: &[G::Host],
        k: &[G::Host],
        v: &[G::Host],
    ) -> GpuRun
    where
        G: GpuElement,
        G::Host: Element,
    {
        let (ql, kl, vl, ol) = self.layouts();
        let cfg = self.config();
        let (q, k, v) = ((q, ql), (k, kl), (v, vl));
        let run = if self.out_f32 {
            run_gpu_on::<G, f32>(engine, stream, &cfg, q, k, v, ol, self.lse)
        } else if self.bf16 {
            run_gpu_on::<G, distr_attention_cuda::Bf16>(engine, stream, &cfg, q, k, v, ol, self.lse)
        } else {
            run_gpu_on::<G, distr_attention_cuda::F16>(engine, stream, &cfg, q, k, v, ol, self.lse)
        };
        assert_eq!(run.unwritten, 0, "{self:?}: output elements left unwritten");
        assert_eq!(run.stray_writes, 0, "{self:?}: writes outside the output layout");
        run
    }

    /// The core's reference on `run`'s plan: (output, LSE, dense layout).
    pub fn reference<T: Element>(
        &self,
        run: &GpuRun,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> (Vec<f32>, Vec<f32>, Layout) {
        let (ql, kl, vl, _) = self.layouts();
        reference_on(&self.config(), run.plan.as_deref().zip(run.plan_shape), (q, ql), (k, kl), (v, vl))
    }

    /// Checks `run` against `reference` (from [`Case::reference`]): finite,
    /// max head error and LSE error within [`tolerances`], rows that see no
    /// key exactly zero. Returns the dense output and the two errors.
    pub fn check(
        &self,
        kernel: &str,
        run: &GpuRun,
        reference: &(Vec<f32>, Vec<f32>, Layout),
    ) -> (Vec<f32>, f64, f64) {
        let (ref_out, ref_lse, dense) = reference;
        let (ql, kl, vl, ol) = self.layouts();
        let out = densify(&run.out, &ol, dense);
        assert!(out.iter().all(|x| x.is_finite()), "{self:?}: {kernel}: non-finite output");
        let (tol_o, tol_lse) = tolerances(self.bf16);
        let err = max_head_error(&out, ref_out, dense);
        assert!(err <= tol_o, "{self:?}: {kernel}: max head relative error {err:.3e} > {tol_o:.0e}");
        let mut lse_err = 0.0;
        if let Some(lse) = &run.lse {
            let (e, inf_mismatch) = lse_error(lse, ref_lse);
            assert_eq!(inf_mismatch, 0, "{self:?}: {kernel}: LSE -inf / NaN mismatches");
            assert!(e <= tol_lse, "{self:?}: {kernel}: LSE error {e:.3e} > {tol_lse:.0e}");
            lse_err = e;
        }
        let p = Problem::new(&ql, &kl, &vl).unwrap();
        for i in 0..p.q_len {
            if p.key_limit(self.causal, i) == 0 {
                for b in 0..p.batch {
                    for h in 0..p.q_heads {
                        let o = dense.offset(b, i, h);
                        let zero = out[o..o + p.v_dim].iter().all(|&x| x == 0.0);
                        assert!(zero, "{self:?}: {kernel}: row {i} sees no key");
                    }
                }
            }
        }
        (out, err, lse_err)
    }
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
