//! The reference implementation: ALGORITHM.md step by step, one output row
//! at a time, every sum in f64. Slow and obviously correct; the fast path
//! and every GPU kernel are tested against it.

use crate::attention::{validate, Grouping};
use crate::config::{Config, Fusion};
use crate::error::{Operand, Result};
use crate::layout::{Tensor, TensorMut};
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
    let (d, dv) = (p.head_dim, p.v_dim);
    let scale = cfg.softmax_scale(d) as f64;
    let block_rows = grouping.block_rows(&p);
    let mut qhat = crate::try_vec(d, 0f64, Operand::Scratch)?;
    let mut scores = crate::try_vec(p.kv_len, 0f64, Operand::Scratch)?;
    let mut o = crate::try_vec(dv, 0f64, Operand::Scratch)?;
    let x = |t: &Tensor<'_, T>, b: usize, s: usize, h: usize, j: usize| {
        t.data[t.layout.offset(b, s, h) + j].to_f32() as f64
    };
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let hk = p.kv_head(h);
            for i in 0..p.q_len {
                let (g, sigma) = grouping.block(cfg, b, h, i / block_rows);
                let col = |c: usize| sigma.map_or(c, |s| s[c] as usize);
                let group = |t: usize| (t * g..(t + 1) * g).map(col);
                // Step 4: fuse the query row.
                for (t, qt) in qhat[..d / g].iter_mut().enumerate() {
                    *qt = match cfg.fusion {
                        Fusion::Mean => group(t).map(|j| x(q, b, i, h, j)).sum::<f64>() / g as f64,
                        Fusion::Sample => x(q, b, i, h, col(t * g)),
                    };
                }
                // Step 5: scores against every visible key, with Khat fused per key.
                let visible = p.key_limit(cfg.causal, i);
                for (n, s) in scores[..visible].iter_mut().enumerate() {
                    let dot: f64 =
                        (0..d / g).map(|t| qhat[t] * group(t).map(|j| x(k, b, n, hk, j)).sum::<f64>()).sum();
                    *s = scale * dot;
                }
                let max = scores[..visible].iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let mut denom = 0.0;
                o.fill(0.0);
                for (n, &s) in scores[..visible].iter().enumerate() {
                    let w = libm::exp(s - max);
                    denom += w;
                    for (c, oc) in o.iter_mut().enumerate() {
                        *oc += w * x(v, b, n, hk, c);
                    }
                }
                let dst = &mut out.data[out.layout.offset(b, i, h)..][..dv];
                for (dst, &oc) in dst.iter_mut().zip(o.iter()) {
                    *dst = if visible > 0 { (oc / denom) as f32 } else { 0.0 };
                }
                if let Some(lse) = lse.as_deref_mut() {
                    lse[(b * p.q_heads + h) * p.q_len + i] =
                        if visible > 0 { (max + libm::log(denom)) as f32 } else { f32::NEG_INFINITY };
                }
            }
        }
    }
    Ok(())
}
