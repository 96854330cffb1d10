//! The backward pass: gradients of DistrAttention with respect to Q, K and
//! V on a given plan (the plan is a choice, not a function of the inputs
//! that carries a gradient).
//!
//! With `S = scale * Qhat Khatᵀ`, `P = softmax(S)` (masked), `O = P V`:
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - rowsum(dO ∘ O))`,
//! `dQhat = scale dS Khat`, `dKhat = scale dSᵀ Qhat`. Fusion is linear:
//! with Mean each column of a group gets `dQhat / G`, with Sample the
//! group's first column gets `dQhat` and the others 0; every column of a
//! group gets `dKhat` (K columns are summed). Each query block has its own
//! Khat, so dK sums the blocks' contributions; with GQA, dK and dV sum over
//! the query heads that share a KV head.

use crate::attention::{check_plan_shape, Grouping};
use crate::config::{Config, Fusion};
use crate::error::{Dim, Error, Operand, Result};
use crate::layout::{check_buffer, check_finite, Layout, Problem, Tensor, TensorMut};
use crate::plan::PlanRef;
use crate::Element;

/// Gradient outputs, f32, each with its own (non-overlapping) layout:
/// `dq` like Q, `dk` like K, `dv` like V.
#[derive(Debug)]
pub struct Gradients<'a, 'b> {
    pub dq: &'b mut TensorMut<'a>,
    pub dk: &'b mut TensorMut<'a>,
    pub dv: &'b mut TensorMut<'a>,
}

/// The forward pass's results the backward pass reads: the output `o`
/// (`[batch, q_len, q_heads, v_dim]`, any strides), its row log-sum-exp
/// (dense `[batch, q_heads, q_len]`), and the output gradient `d_out`
/// (shaped like `o`).
#[derive(Clone, Copy, Debug)]
pub struct Forward<'a> {
    pub o: Tensor<'a, f32>,
    pub lse: &'a [f32],
    pub d_out: Tensor<'a, f32>,
}

fn expect_shape(operand: Operand, l: &Layout, shape: [usize; 4]) -> Result<()> {
    for (dim, expected, got) in [
        (Dim::Batch, shape[0], l.batch),
        (Dim::Seq, shape[1], l.seq),
        (Dim::Heads, shape[2], l.heads),
        (Dim::HeadDim, shape[3], l.dim),
    ] {
        if expected != got {
            return Err(Error::ShapeMismatch { operand, dim, expected, got });
        }
    }
    Ok(())
}

fn check_grad(operand: Operand, g: &TensorMut<'_>, shape: [usize; 4]) -> Result<()> {
    let needed = g.layout.required_len(operand)?;
    expect_shape(operand, &g.layout, shape)?;
    if !g.layout.is_non_overlapping() {
        return Err(Error::OverlappingOutput { operand });
    }
    if g.data.len() < needed {
        return Err(Error::BufferTooSmall { operand, needed, got: g.data.len() });
    }
    Ok(())
}

/// Validates every argument of a backward call.
pub(crate) fn validate_backward<T: Element>(
    cfg: &Config<'_>,
    grouping: &Grouping<'_>,
    (q, k, v): (&Tensor<'_, T>, &Tensor<'_, T>, &Tensor<'_, T>),
    fwd: &Forward<'_>,
    grads: &Gradients<'_, '_>,
) -> Result<Problem> {
    let p = Problem::new(&q.layout, &k.layout, &v.layout)?;
    cfg.validate(p.q_heads, p.head_dim)?;
    check_buffer(Operand::Q, q.data.len(), &q.layout)?;
    check_buffer(Operand::K, k.data.len(), &k.layout)?;
    check_buffer(Operand::V, v.data.len(), &v.layout)?;
    let o_shape = [p.batch, p.q_len, p.q_heads, p.v_dim];
    for (operand, t) in [(Operand::Output, &fwd.o), (Operand::DOut, &fwd.d_out)] {
        check_buffer(operand, t.data.len(), &t.layout)?;
        expect_shape(operand, &t.layout, o_shape)?;
    }
    let lse_len = p.lse_len()?;
    if fwd.lse.len() < lse_len {
        return Err(Error::BufferTooSmall { operand: Operand::Lse, needed: lse_len, got: fwd.lse.len() });
    }
    check_grad(Operand::DQ, grads.dq, [p.batch, p.q_len, p.q_heads, p.head_dim])?;
    check_grad(Operand::DK, grads.dk, [p.batch, p.kv_len, p.kv_heads, p.head_dim])?;
    check_grad(Operand::DV, grads.dv, [p.batch, p.kv_len, p.kv_heads, p.v_dim])?;
    if let Grouping::Plan(plan) = grouping {
        check_plan_shape(cfg, &p, plan)?;
    }
    check_finite(Operand::Q, q)?;
    check_finite(Operand::K, k)?;
    check_finite(Operand::V, v)?;
    check_finite(Operand::Output, &fwd.o)?;
    check_finite(Operand::DOut, &fwd.d_out)?;
    if let Some(i) = fwd.lse[..lse_len].iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(Error::NonFinite { operand: Operand::Lse, offset: i });
    }
    Ok(p)
}

/// Reference backward (f64, row by row, recomputing the softmax from Q, K,
/// V; `fwd.o` and `fwd.lse` are validated but not used).
pub mod reference {
    use super::*;

    /// Gradients of DistrAttention on `plan`.
    pub fn attention_backward<T: Element>(
        cfg: &Config<'_>,
        plan: &PlanRef<'_>,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        fwd: &Forward<'_>,
        grads: &mut Gradients<'_, '_>,
    ) -> Result<()> {
        run(cfg, &Grouping::Plan(*plan), (q, k, v), fwd, grads)
    }

    /// Gradients of exact attention.
    pub fn exact_attention_backward<T: Element>(
        cfg: &Config<'_>,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        fwd: &Forward<'_>,
        grads: &mut Gradients<'_, '_>,
    ) -> Result<()> {
        run(cfg, &Grouping::Exact, (q, k, v), fwd, grads)
    }

    // Index loops mirror the formulas on purpose.
    #[allow(clippy::needless_range_loop)]
    fn run<T: Element>(
        cfg: &Config<'_>,
        grouping: &Grouping<'_>,
        (q, k, v): (&Tensor<'_, T>, &Tensor<'_, T>, &Tensor<'_, T>),
        fwd: &Forward<'_>,
        grads: &mut Gradients<'_, '_>,
    ) -> Result<()> {
        let p = validate_backward(cfg, grouping, (q, k, v), fwd, grads)?;
        let (d, dv, m) = (p.head_dim, p.v_dim, p.kv_len);
        let scale = cfg.softmax_scale(d) as f64;
        let block_rows = grouping.block_rows(&p);
        let x = |t: &Tensor<'_, T>, b: usize, s: usize, h: usize, j: usize| {
            t.data[t.layout.offset(b, s, h) + j].to_f32() as f64
        };
        let f = |t: &Tensor<'_, f32>, b: usize, s: usize, h: usize, j: usize| {
            t.data[t.layout.offset(b, s, h) + j] as f64
        };
        let buf = |len| crate::try_vec(len, 0f64, Operand::Scratch);
        let (mut dk_acc, mut dv_acc) = (buf(m * d)?, buf(m * dv)?);
        let (mut qhat, mut khat, mut prob, mut dprob, mut o, mut dqhat) =
            (buf(d)?, buf(m * d)?, buf(m)?, buf(m)?, buf(dv)?, buf(d)?);
        for b in 0..p.batch {
            for hk in 0..p.kv_heads {
                dk_acc.fill(0.0);
                dv_acc.fill(0.0);
                for h in (0..p.q_heads).filter(|&h| p.kv_head(h) == hk) {
                    for i in 0..p.q_len {
                        let (g, sigma) = grouping.block(cfg, b, h, i / block_rows);
                        let t_len = d / g;
                        let col = |c: usize| sigma.map_or(c, |s| s[c] as usize);
                        let group = |t: usize| (t * g..(t + 1) * g).map(col);
                        for (t, qt) in qhat[..t_len].iter_mut().enumerate() {
                            *qt = match cfg.fusion {
                                Fusion::Mean => group(t).map(|j| x(q, b, i, h, j)).sum::<f64>() / g as f64,
                                Fusion::Sample => x(q, b, i, h, col(t * g)),
                            };
                        }
                        let visible = p.key_limit(cfg.causal, i);
                        // Forward for this row, recomputed.
                        let mut max = f64::NEG_INFINITY;
                        for n in 0..visible {
                            let kh = &mut khat[n * t_len..(n + 1) * t_len];
                            for (t, kt) in kh.iter_mut().enumerate() {
                                *kt = group(t).map(|j| x(k, b, n, hk, j)).sum();
                            }
                            prob[n] = scale * kh.iter().zip(&qhat[..t_len]).map(|(a, c)| a * c).sum::<f64>();
                            max = max.max(prob[n]);
                        }
                        let mut denom = 0.0;
                        for pn in prob[..visible].iter_mut() {
                            *pn = libm::exp(*pn - max);
                            denom += *pn;
                        }
                        o.fill(0.0);
                        for n in 0..visible {
                            prob[n] /= denom;
                            for (c, oc) in o.iter_mut().enumerate() {
                                *oc += prob[n] * x(v, b, n, hk, c);
                            }
                        }
                        // dP, D = dO . O, dS.
                        let d_row: f64 = (0..dv).map(|c| f(&fwd.d_out, b, i, h, c) * o[c]).sum();
                        for n in 0..visible {
                            let dp: f64 =
                                (0..dv).map(|c| f(&fwd.d_out, b, i, h, c) * x(v, b, n, hk, c)).sum();
                            dprob[n] = prob[n] * (dp - d_row); // dS
                            for c in 0..dv {
                                dv_acc[n * dv + c] += prob[n] * f(&fwd.d_out, b, i, h, c);
                            }
                        }
                        // dQhat, dKhat, then through the fusion.
                        dqhat[..t_len].fill(0.0);
                        for n in 0..visible {
                            let ds = scale * dprob[n];
                            for t in 0..t_len {
                                dqhat[t] += ds * khat[n * t_len + t];
                                for j in group(t) {
                                    dk_acc[n * d + j] += ds * qhat[t];
                                }
                            }
                        }
                        let dq = &mut grads.dq.data[grads.dq.layout.offset(b, i, h)..][..d];
                        for t in 0..t_len {
                            for (a, j) in group(t).enumerate() {
                                dq[j] = match cfg.fusion {
                                    Fusion::Mean => dqhat[t] / g as f64,
                                    Fusion::Sample if a == 0 => dqhat[t],
                                    Fusion::Sample => 0.0,
                                } as f32;
                            }
                        }
                    }
                }
                for n in 0..m {
                    let dk = &mut grads.dk.data[grads.dk.layout.offset(b, n, hk)..][..d];
                    for (dst, &src) in dk.iter_mut().zip(&dk_acc[n * d..(n + 1) * d]) {
                        *dst = src as f32;
                    }
                    let dvv = &mut grads.dv.data[grads.dv.layout.offset(b, n, hk)..][..dv];
                    for (dst, &src) in dvv.iter_mut().zip(&dv_acc[n * dv..(n + 1) * dv]) {
                        *dst = src as f32;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Query rows and keys per tile of the fast backward pass.
const BQ: usize = 64;
const BK: usize = 64;

/// Length of the f32 scratch buffer [`attention_backward_into`] needs.
pub fn backward_scratch_len(head_dim: usize, v_dim: usize) -> Result<usize> {
    // qhat, dqhat: BQ*d each; d_out: BQ*dv; delta, lse: BQ; khat, khat_t, dkhat: BK*d each;
    // v_t: dv*BK; p, dp: BQ*BK each.
    let f = || -> Option<usize> {
        let d = head_dim.checked_mul(2 * BQ + 3 * BK)?;
        let v = v_dim.checked_mul(BQ + BK)?;
        d.checked_add(v)?.checked_add(2 * BQ + 2 * BQ * BK)
    };
    f().ok_or(Error::SizeOverflow { operand: Operand::Scratch })
}

/// Fast backward pass (f32, tiled like FlashAttention-2's backward: S and P
/// are recomputed tile by tile from Qhat, Khat and the forward's LSE; no
/// `N x M` buffer). Same contract as [`reference::attention_backward`], but
/// it does use `fwd.o` and `fwd.lse`, which must come from the forward pass
/// on the same inputs and plan. `scratch` needs [`backward_scratch_len`] entries.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_into<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    fwd: &Forward<'_>,
    grads: &mut Gradients<'_, '_>,
    scratch: &mut [f32],
) -> Result<()> {
    fast_backward(cfg, &Grouping::Plan(*plan), (q, k, v), fwd, grads, scratch)
}

/// [`attention_backward_into`] for exact attention.
pub fn exact_attention_backward_into<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    fwd: &Forward<'_>,
    grads: &mut Gradients<'_, '_>,
    scratch: &mut [f32],
) -> Result<()> {
    fast_backward(cfg, &Grouping::Exact, (q, k, v), fwd, grads, scratch)
}

/// [`attention_backward_into`] with an allocated scratch buffer.
pub fn attention_backward<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    fwd: &Forward<'_>,
    grads: &mut Gradients<'_, '_>,
) -> Result<()> {
    Problem::new(&q.layout, &k.layout, &v.layout)?;
    let mut scratch =
        crate::try_vec(backward_scratch_len(q.layout.dim, v.layout.dim)?, 0f32, Operand::Scratch)?;
    attention_backward_into(cfg, plan, q, k, v, fwd, grads, &mut scratch)
}

/// [`exact_attention_backward_into`] with an allocated scratch buffer.
pub fn exact_attention_backward<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    fwd: &Forward<'_>,
    grads: &mut Gradients<'_, '_>,
) -> Result<()> {
    Problem::new(&q.layout, &k.layout, &v.layout)?;
    let mut scratch =
        crate::try_vec(backward_scratch_len(q.layout.dim, v.layout.dim)?, 0f32, Operand::Scratch)?;
    exact_attention_backward_into(cfg, q, k, v, fwd, grads, &mut scratch)
}

/// `y += a * x` over equal-length slices (vectorises).
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

fn fast_backward<T: Element>(
    cfg: &Config<'_>,
    grouping: &Grouping<'_>,
    (q, k, v): (&Tensor<'_, T>, &Tensor<'_, T>, &Tensor<'_, T>),
    fwd: &Forward<'_>,
    grads: &mut Gradients<'_, '_>,
    scratch: &mut [f32],
) -> Result<()> {
    let p = validate_backward(cfg, grouping, (q, k, v), fwd, grads)?;
    let needed = backward_scratch_len(p.head_dim, p.v_dim)?;
    if scratch.len() < needed {
        return Err(Error::BufferTooSmall { operand: Operand::Scratch, needed, got: scratch.len() });
    }
    let (d, dv) = (p.head_dim, p.v_dim);
    let scale = cfg.softmax_scale(d);
    let (qhat, rest) = scratch.split_at_mut(BQ * d);
    let (dqhat, rest) = rest.split_at_mut(BQ * d);
    let (d_out, rest) = rest.split_at_mut(BQ * dv);
    let (delta, rest) = rest.split_at_mut(BQ);
    let (lse, rest) = rest.split_at_mut(BQ);
    let (khat, rest) = rest.split_at_mut(BK * d);
    let (khat_t, rest) = rest.split_at_mut(d * BK);
    let (dkhat, rest) = rest.split_at_mut(BK * d);
    let (v_t, rest) = rest.split_at_mut(dv * BK);
    let (prob, rest) = rest.split_at_mut(BQ * BK);
    let (dprob, _) = rest.split_at_mut(BQ * BK);
    let block_rows = grouping.block_rows(&p);

    // dK and dV accumulate over query heads and blocks: start from zero.
    for (g, dim) in [(&mut *grads.dk, d), (&mut *grads.dv, dv)] {
        for b in 0..p.batch {
            for n in 0..p.kv_len {
                for hk in 0..p.kv_heads {
                    g.data[g.layout.offset(b, n, hk)..][..dim].fill(0.0);
                }
            }
        }
    }
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let hk = p.kv_head(h);
            let mut r0 = 0;
            while r0 < p.q_len {
                // A tile stays inside one plan block: one permutation.
                let blk = r0 / block_rows;
                let rows = (p.q_len - r0).min(BQ).min((blk + 1) * block_rows - r0);
                let (g, sigma) = grouping.block(cfg, b, h, blk);
                let t = d / g;
                let col = |c: usize| sigma.map_or(c, |s| s[c] as usize);
                for i in 0..rows {
                    let qrow = &q.data[q.layout.offset(b, r0 + i, h)..][..d];
                    for (c, x) in qhat[i * t..(i + 1) * t].iter_mut().enumerate() {
                        *x = scale
                            * match cfg.fusion {
                                Fusion::Mean => {
                                    (0..g).map(|j| qrow[col(c * g + j)].to_f32()).sum::<f32>() / g as f32
                                }
                                Fusion::Sample => qrow[col(c * g)].to_f32(),
                            };
                    }
                    let go = &fwd.d_out.data[fwd.d_out.layout.offset(b, r0 + i, h)..][..dv];
                    let o = &fwd.o.data[fwd.o.layout.offset(b, r0 + i, h)..][..dv];
                    d_out[i * dv..(i + 1) * dv].copy_from_slice(go);
                    delta[i] = go.iter().zip(o).map(|(a, b)| a * b).sum();
                    lse[i] = fwd.lse[(b * p.q_heads + h) * p.q_len + r0 + i];
                }
                dqhat[..rows * t].fill(0.0);
                let kend = p.key_limit(cfg.causal, r0 + rows - 1);
                let mut n0 = 0;
                while n0 < kend {
                    let nk = (kend - n0).min(BK);
                    for n in 0..nk {
                        let krow = &k.data[k.layout.offset(b, n0 + n, hk)..][..d];
                        for c in 0..t {
                            let x = (0..g).map(|j| krow[col(c * g + j)].to_f32()).sum::<f32>();
                            khat[n * t + c] = x;
                            khat_t[c * BK + n] = x;
                        }
                        let vrow = &v.data[v.layout.offset(b, n0 + n, hk)..][..dv];
                        for (c, x) in vrow.iter().enumerate() {
                            v_t[c * BK + n] = x.to_f32();
                        }
                    }
                    // P = exp(S - lse) on visible keys, dP = dO Vᵀ, dS = P (dP - D).
                    for i in 0..rows {
                        let vis = p.key_limit(cfg.causal, r0 + i).saturating_sub(n0).min(nk);
                        let pr = &mut prob[i * BK..i * BK + nk];
                        let dp = &mut dprob[i * BK..i * BK + nk];
                        pr.fill(0.0);
                        dp.fill(0.0);
                        for c in 0..t {
                            axpy(&mut pr[..vis], qhat[i * t + c], &khat_t[c * BK..c * BK + vis]);
                        }
                        for x in pr[..vis].iter_mut() {
                            *x = libm::expf(*x - lse[i]);
                        }
                        for c in 0..dv {
                            axpy(&mut dp[..vis], d_out[i * dv + c], &v_t[c * BK..c * BK + vis]);
                        }
                        for (dp, &pv) in dp[..vis].iter_mut().zip(pr[..vis].iter()) {
                            *dp = pv * (*dp - delta[i]);
                        }
                    }
                    // dQhat += dS Khat (scale applied when writing dQ), dKhat = dSᵀ (scale Qhat), dV += Pᵀ dO.
                    dkhat[..nk * t].fill(0.0);
                    for i in 0..rows {
                        for n in 0..nk {
                            let ds = dprob[i * BK + n];
                            if ds != 0.0 {
                                axpy(&mut dqhat[i * t..(i + 1) * t], ds, &khat[n * t..(n + 1) * t]);
                                axpy(&mut dkhat[n * t..(n + 1) * t], ds, &qhat[i * t..(i + 1) * t]);
                            }
                        }
                    }
                    for n in 0..nk {
                        let dk = &mut grads.dk.data[grads.dk.layout.offset(b, n0 + n, hk)..][..d];
                        for c in 0..t {
                            for j in 0..g {
                                dk[col(c * g + j)] += dkhat[n * t + c];
                            }
                        }
                        let dvr = &mut grads.dv.data[grads.dv.layout.offset(b, n0 + n, hk)..][..dv];
                        for i in 0..rows {
                            let pv = prob[i * BK + n];
                            if pv != 0.0 {
                                axpy(dvr, pv, &d_out[i * dv..(i + 1) * dv]);
                            }
                        }
                    }
                    n0 += nk;
                }
                for i in 0..rows {
                    let dq = &mut grads.dq.data[grads.dq.layout.offset(b, r0 + i, h)..][..d];
                    for c in 0..t {
                        let x = scale * dqhat[i * t + c];
                        for j in 0..g {
                            dq[col(c * g + j)] = match cfg.fusion {
                                Fusion::Mean => x / g as f32,
                                Fusion::Sample if j == 0 => x,
                                Fusion::Sample => 0.0,
                            };
                        }
                    }
                }
                r0 += rows;
            }
        }
    }
    Ok(())
}
