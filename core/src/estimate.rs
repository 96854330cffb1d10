//! A cheap per-head estimate of the error DistrAttention causes, from Q, K
//! and the plan alone (no attention is computed): the exact Frobenius norm
//! of the change of the score matrix Q Kᵀ caused by fusion, via Gram
//! matrices (see `grouping.rs`). Cost per head: `d^2 (N + M)` plus `O(d^2 G^2)`
//! per block, against `N M d` for attention itself.

use alloc::vec::Vec;

use crate::attention::{check_plan_shape, Grouping};
use crate::config::Config;
use crate::error::{Operand, Result};
use crate::grouping::{fusion_error2, key_gram, query_gram, score_norm2};
use crate::layout::{check_buffer, check_finite, Problem, Tensor};
use crate::plan::PlanRef;
use crate::reference::{attend_row, RowScratch};
use crate::Element;

/// The estimate for one (batch, query head).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadErrorEstimate {
    pub batch: usize,
    pub head: usize,
    /// `||E||_F / ||Q Kᵀ||_F`: relative change of the (unscaled) scores.
    pub relative_score_error: f64,
    /// `scale * ||E||_F / sqrt(N M)`: root-mean-square change of the softmax
    /// logits, in nats.
    pub rms_logit_error: f64,
    /// Relative Frobenius error of the output on `sample_rows` evenly spaced
    /// query rows, computed exactly (f64) with and without fusion. NaN when
    /// no row was sampled.
    pub sampled_output_error: f64,
}

/// Estimates, for every (batch, query head), the error fusion under `plan`
/// causes: from Q, K and the plan, the change of the scores (keys all
/// counted, also where a causal mask hides them); and, if `sample_rows > 0`,
/// the measured output error on that many evenly spaced query rows (costs
/// `sample_rows / q_len` of two attention passes). Heads with G = 1 get 0.
pub fn estimate_errors<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    sample_rows: usize,
) -> Result<Vec<HeadErrorEstimate>> {
    let p = Problem::new(&q.layout, &k.layout, &v.layout)?;
    check_buffer(Operand::V, v.data.len(), &v.layout)?;
    check_finite(Operand::V, v)?;
    cfg.validate(p.q_heads, p.head_dim)?;
    check_buffer(Operand::Q, q.data.len(), &q.layout)?;
    check_buffer(Operand::K, k.data.len(), &k.layout)?;
    check_plan_shape(cfg, &p, plan)?;
    check_finite(Operand::Q, q)?;
    check_finite(Operand::K, k)?;
    let d = p.head_dim;
    let scale = cfg.softmax_scale(d) as f64;
    let mut gq = crate::try_vec(d * d, 0f64, Operand::Scratch)?;
    let mut gk = crate::try_vec(d * d, 0f64, Operand::Scratch)?;
    let mut row = crate::try_vec(d, 0f64, Operand::Scratch)?;
    let (mut exact_row, mut fused_row) = (RowScratch::new(&p)?, RowScratch::new(&p)?);
    let mut out = Vec::new();
    out.try_reserve_exact(p.batch * p.q_heads).map_err(|_| crate::Error::AllocationFailed {
        operand: Operand::Scratch,
        len: p.batch * p.q_heads,
    })?;
    let blocks = plan.shape().blocks;
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            key_gram(k, b, p.kv_head(h), &mut gk, &mut row);
            let (mut err2, mut norm2) = (0.0, 0.0);
            for blk in 0..blocks {
                let row0 = blk * cfg.block_rows;
                let rows = (p.q_len - row0).min(cfg.block_rows);
                query_gram(q, b, h, row0, rows, &mut gq, &mut row);
                err2 +=
                    fusion_error2(&gq, Some(&gk), d, plan.block(b, h, blk), cfg.group_size(h), cfg.fusion);
                norm2 += score_norm2(&gq, Some(&gk), d);
            }
            let rows = sample_rows.min(p.q_len);
            let (mut diff2, mut ref2) = (0.0, 0.0);
            for r in 0..rows {
                let i = (2 * r + 1) * p.q_len / (2 * rows);
                attend_row(cfg, &Grouping::Exact, &p, (q, k, v), (b, h, i), &mut exact_row);
                attend_row(cfg, &Grouping::Plan(*plan), &p, (q, k, v), (b, h, i), &mut fused_row);
                for (x, y) in fused_row.o.iter().zip(&exact_row.o) {
                    diff2 += (x - y) * (x - y);
                    ref2 += y * y;
                }
            }
            out.push(HeadErrorEstimate {
                batch: b,
                head: h,
                relative_score_error: if norm2 > 0.0 { libm::sqrt(err2 / norm2) } else { 0.0 },
                rms_logit_error: scale * libm::sqrt(err2 / (p.q_len as f64 * p.kv_len as f64)),
                sampled_output_error: if rows == 0 {
                    f64::NAN
                } else if ref2 > 0.0 {
                    libm::sqrt(diff2 / ref2)
                } else {
                    libm::sqrt(diff2)
                },
            });
        }
    }
    Ok(out)
}
