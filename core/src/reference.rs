//! The reference implementation: ALGORITHM.md step by step, one output row
//! at a time, every sum in f64. Slow and obviously correct; the fast path
//! and every GPU kernel are tested against it.

use crate::attention::{validate, Grouping};
use crate::config::{Config, Fusion};
use alloc::vec::Vec;

use crate::error::{Operand, Result};
use crate::layout::{Problem, Tensor, TensorMut};
use crate::plan::PlanRef;
use crate::Element;

/// Reference DistrAttention on a given plan (same contract as [`crate::attention`]).
pub fn attention<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    run(cfg, &Grouping::Plan(*plan), q, k, v, out, lse)
}

/// Reference exact attention (same contract as [`crate::exact_attention`]).
pub fn exact_attention<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    run(cfg, &Grouping::Exact, q, k, v, out, lse)
}

/// Buffers for one output row.
pub(crate) struct RowScratch {
    qhat: Vec<f64>,
    scores: Vec<f64>,
    /// The output row after [`attend_row`].
    pub(crate) o: Vec<f64>,
}

impl RowScratch {
    pub(crate) fn new(p: &Problem) -> Result<Self> {
        Ok(RowScratch {
            qhat: crate::try_vec(p.head_dim, 0f64, Operand::Scratch)?,
            scores: crate::try_vec(p.kv_len, 0f64, Operand::Scratch)?,
            o: crate::try_vec(p.v_dim, 0f64, Operand::Scratch)?,
        })
    }
}

/// ALGORITHM.md steps 4 and 5 for output row `i` of head `h` in batch `b`,
/// in f64: writes the row into `row.o` and returns its log-sum-exp (a row
/// that sees no key gets 0 and `-inf`). Arguments must be validated.
pub(crate) fn attend_row<T: Element>(
    cfg: &Config<'_>,
    grouping: &Grouping<'_>,
    p: &Problem,
    (q, k, v): (&Tensor<'_, T>, &Tensor<'_, T>, &Tensor<'_, T>),
    (b, h, i): (usize, usize, usize),
    row: &mut RowScratch,
) -> f64 {
    let d = p.head_dim;
    let scale = cfg.softmax_scale(d) as f64;
    let x = |t: &Tensor<'_, T>, b: usize, s: usize, h: usize, j: usize| {
        t.data[t.layout.offset(b, s, h) + j].to_f32() as f64
    };
    let hk = p.kv_head(h);
    let (g, sigma) = grouping.block(cfg, b, h, i / grouping.block_rows(p));
    let col = |c: usize| sigma.map_or(c, |s| s[c] as usize);
    let group = |t: usize| (t * g..(t + 1) * g).map(col);
    // Step 4: fuse the query row.
    for (t, qt) in row.qhat[..d / g].iter_mut().enumerate() {
        *qt = match cfg.fusion {
            Fusion::Mean => group(t).map(|j| x(q, b, i, h, j)).sum::<f64>() / g as f64,
            Fusion::Sample => x(q, b, i, h, col(t * g)),
        };
    }
    // Step 5: scores against every visible key, with Khat fused per key.
    let visible = p.key_limit(cfg.causal, i);
    let qhat = &row.qhat;
    for (n, s) in row.scores[..visible].iter_mut().enumerate() {
        let dot: f64 = (0..d / g).map(|t| qhat[t] * group(t).map(|j| x(k, b, n, hk, j)).sum::<f64>()).sum();
        *s = scale * dot;
    }
    let max = row.scores[..visible].iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let mut denom = 0.0;
    row.o.fill(0.0);
    for (n, &s) in row.scores[..visible].iter().enumerate() {
        let w = libm::exp(s - max);
        denom += w;
        for (c, oc) in row.o.iter_mut().enumerate() {
            *oc += w * x(v, b, n, hk, c);
        }
    }
    if visible == 0 {
        return f64::NEG_INFINITY;
    }
    for oc in row.o.iter_mut() {
        *oc /= denom;
    }
    max + libm::log(denom)
}

fn run<T: Element>(
    cfg: &Config<'_>,
    grouping: &Grouping<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    mut lse: Option<&mut [f32]>,
) -> Result<()> {
    let p = validate(cfg, grouping, q, k, v, out, lse.as_deref())?;
    let mut row = RowScratch::new(&p)?;
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            for i in 0..p.q_len {
                let lse_i = attend_row(cfg, grouping, &p, (q, k, v), (b, h, i), &mut row);
                let dst = &mut out.data[out.layout.offset(b, i, h)..][..p.v_dim];
                for (dst, &oc) in dst.iter_mut().zip(row.o.iter()) {
                    *dst = oc as f32;
                }
                if let Some(lse) = lse.as_deref_mut() {
                    lse[(b * p.q_heads + h) * p.q_len + i] = lse_i as f32;
                }
            }
        }
    }
    Ok(())
}
