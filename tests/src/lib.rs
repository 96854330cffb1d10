//! Helpers shared by the integration tests: random problems with every
//! layout the API accepts, inputs whose unaddressed padding is NaN (so a
//! read outside a view poisons the result), and runners for the fast path
//! and the reference.

use distr_attention::{
    attention, exact_attention, plan, reference, Config, Element, Fusion, GroupSizes, Layout, Plan, Problem,
    Tensor, TensorMut,
};
use proptest::prelude::*;

/// SplitMix64: a small deterministic generator for test data.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// How a tensor is laid out in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Dense `[batch, seq, heads, dim]`.
    Contiguous,
    /// `[batch, seq, heads, dim]` with gaps after every head, row and batch.
    Padded,
    /// `[batch, heads, seq, dim]` memory order (a BHSD tensor viewed as BSHD), with gaps.
    HeadMajor,
}

pub fn layout(style: Style, batch: usize, seq: usize, heads: usize, dim: usize) -> Layout {
    match style {
        Style::Contiguous => Layout::contiguous(batch, seq, heads, dim),
        Style::Padded => {
            let stride_head = dim + 3;
            let stride_seq = heads * stride_head + 5;
            Layout { batch, seq, heads, dim, stride_head, stride_seq, stride_batch: seq * stride_seq + 7 }
        }
        Style::HeadMajor => {
            let stride_seq = dim + 1;
            let stride_head = seq * stride_seq + 2;
            Layout { batch, seq, heads, dim, stride_seq, stride_head, stride_batch: heads * stride_head }
        }
    }
}

/// A buffer for `layout` whose addressed elements come from `value` and
/// whose gaps are NaN.
pub fn fill<T: Element>(layout: &Layout, mut value: impl FnMut(usize, usize, usize, usize) -> f32) -> Vec<T> {
    let len = layout.required_len(distr_attention::Operand::Q).expect("valid test layout");
    let mut buf = vec![T::from_f32(f32::NAN); len];
    for b in 0..layout.batch {
        for s in 0..layout.seq {
            for h in 0..layout.heads {
                let o = layout.offset(b, s, h);
                for j in 0..layout.dim {
                    buf[o + j] = T::from_f32(value(b, s, h, j));
                }
            }
        }
    }
    buf
}

/// Reads the addressed elements of a buffer densely in `[b, s, h, d]` order.
pub fn gather(buf: &[f32], layout: &Layout) -> Vec<f32> {
    let mut out = Vec::with_capacity(layout.batch * layout.seq * layout.heads * layout.dim);
    for b in 0..layout.batch {
        for s in 0..layout.seq {
            for h in 0..layout.heads {
                let o = layout.offset(b, s, h);
                out.extend_from_slice(&buf[o..o + layout.dim]);
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DTypeCase {
    F32,
    F16,
    BF16,
}

/// A whole random attention problem.
#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub n: usize,
    pub m: usize,
    pub kv_heads: usize,
    pub q_per_kv: usize,
    pub d: usize,
    pub dv: usize,
    /// Index into the divisors of `d` per query head.
    pub g_choice: Vec<usize>,
    pub per_head: bool,
    pub block_rows: usize,
    pub projections: u32,
    pub seed: u64,
    pub fusion: Fusion,
    pub causal: bool,
    pub scale: Option<f32>,
    pub dtype: DTypeCase,
    pub styles: [Style; 4],
    pub data_seed: u64,
}

pub fn divisors(d: usize) -> Vec<usize> {
    (1..=d).filter(|g| d.is_multiple_of(*g)).collect()
}

impl Case {
    pub fn q_heads(&self) -> usize {
        self.kv_heads * self.q_per_kv
    }

    pub fn group_sizes(&self) -> Vec<usize> {
        let divs = divisors(self.d);
        (0..self.q_heads())
            .map(|h| divs[self.g_choice[if self.per_head { h } else { 0 }] % divs.len()])
            .collect()
    }

    pub fn config<'a>(&self, sizes: &'a [usize]) -> Config<'a> {
        Config {
            block_rows: self.block_rows,
            group_sizes: if self.per_head {
                GroupSizes::PerHead(sizes)
            } else {
                GroupSizes::Uniform(sizes[0])
            },
            num_projections: self.projections,
            seed: self.seed,
            fusion: self.fusion,
            causal: self.causal,
            scale: self.scale,
            grouping: distr_attention::GroupingMode::Lsh,
        }
    }

    pub fn layouts(&self) -> [Layout; 4] {
        let hq = self.q_heads();
        [
            layout(self.styles[0], self.batch, self.n, hq, self.d),
            layout(self.styles[1], self.batch, self.m, self.kv_heads, self.d),
            layout(self.styles[2], self.batch, self.m, self.kv_heads, self.dv),
            layout(self.styles[3], self.batch, self.n, hq, self.dv),
        ]
    }
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![Just(Style::Contiguous), Just(Style::Padded), Just(Style::HeadMajor)]
}

/// Random problems: shapes with tails, GQA/MQA, causal with N != M, every
/// dtype and layout style, per-head group sizes.
pub fn case() -> impl Strategy<Value = Case> {
    let shape = (1usize..=2, 1usize..=90, 1usize..=90, 1usize..=2, 1usize..=3);
    let dims = prop_oneof![Just(8usize), Just(16), Just(24), Just(32), Just(64)];
    let dv = prop_oneof![Just(0usize), Just(8), Just(40)];
    let cfg = (
        prop::collection::vec(0usize..8, 6),
        any::<bool>(),
        prop_oneof![Just(1usize), Just(5), Just(16), Just(64)],
        1u32..=32,
        any::<u64>(),
        prop_oneof![Just(Fusion::Mean), Just(Fusion::Sample)],
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(0.3f32))],
    );
    let data = (
        prop_oneof![Just(DTypeCase::F32), Just(DTypeCase::F16), Just(DTypeCase::BF16)],
        [style(), style(), style(), style()],
        any::<u64>(),
    );
    (shape, dims, dv, cfg, data).prop_map(
        |((batch, n, m, kv_heads, q_per_kv), d, dv, cfg, (dtype, styles, data_seed))| {
            let (g_choice, per_head, block_rows, projections, seed, fusion, causal, scale) = cfg;
            Case {
                batch,
                n,
                m,
                kv_heads,
                q_per_kv,
                d,
                dv: if dv == 0 { d } else { dv },
                g_choice,
                per_head,
                block_rows,
                projections,
                seed,
                fusion,
                causal,
                scale,
                dtype,
                styles,
                data_seed,
            }
        },
    )
}

/// Inputs of a case in element type `T`.
pub struct Inputs<T> {
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub layouts: [Layout; 4],
}

impl<T: Element> Inputs<T> {
    pub fn new(case: &Case) -> Self {
        let layouts = case.layouts();
        let mut rng = Rng(case.data_seed);
        let q = fill(&layouts[0], |_, _, _, _| 2.0 * rng.uniform());
        let k = fill(&layouts[1], |_, _, _, _| 2.0 * rng.uniform());
        let v = fill(&layouts[2], |_, _, _, _| rng.uniform());
        Inputs { q, k, v, layouts }
    }

    pub fn tensors(&self) -> (Tensor<'_, T>, Tensor<'_, T>, Tensor<'_, T>) {
        (
            Tensor::new(&self.q, self.layouts[0]),
            Tensor::new(&self.k, self.layouts[1]),
            Tensor::new(&self.v, self.layouts[2]),
        )
    }

    pub fn problem(&self) -> Problem {
        Problem::new(&self.layouts[0], &self.layouts[1], &self.layouts[2]).expect("valid case")
    }
}

/// Output and row log-sum-exp of one run.
#[derive(Clone, Debug)]
pub struct Output {
    /// Dense `[batch, n, q_heads, dv]`, read through the output layout.
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Fast,
    Reference,
}

/// Runs one path; the output buffer is poisoned with NaN first, and the
/// gaps of a strided output must still be NaN afterwards.
pub fn run<T: Element>(
    cfg: &Config<'_>,
    plan: Option<&Plan>,
    inputs: &Inputs<T>,
    path: Path,
) -> Result<Output, distr_attention::Error> {
    let p = inputs.problem();
    let o_layout = inputs.layouts[3];
    let mut o = vec![f32::NAN; o_layout.required_len(distr_attention::Operand::Output)?];
    let mut lse = vec![f32::NAN; p.lse_len()?];
    let (q, k, v) = inputs.tensors();
    let mut out = TensorMut::new(&mut o, o_layout);
    match (path, plan) {
        (Path::Fast, Some(plan)) => attention(cfg, &plan.as_ref(), &q, &k, &v, &mut out, Some(&mut lse))?,
        (Path::Fast, None) => exact_attention(cfg, &q, &k, &v, &mut out, Some(&mut lse))?,
        (Path::Reference, Some(plan)) => {
            reference::attention(cfg, &plan.as_ref(), &q, &k, &v, &mut out, Some(&mut lse))?
        }
        (Path::Reference, None) => reference::exact_attention(cfg, &q, &k, &v, &mut out, Some(&mut lse))?,
    }
    let dense = gather(&o, &o_layout);
    let written = dense.iter().filter(|x| x.is_nan()).count();
    assert_eq!(written, 0, "{written} output elements left unwritten");
    let gaps = o.iter().filter(|x| !x.is_nan()).count() - dense.len();
    assert_eq!(gaps, 0, "{gaps} elements written outside the output view");
    Ok(Output { o: dense, lse })
}

/// Computes the plan of a case's queries.
pub fn plan_of<T: Element>(cfg: &Config<'_>, inputs: &Inputs<T>) -> Plan {
    plan(cfg, &inputs.tensors().0).expect("plan of a valid case")
}

/// Largest absolute difference, treating equal infinities as equal.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0.0, |m, x| {
        if x.is_nan() {
            f32::INFINITY
        } else {
            m.max(x)
        }
    })
}
