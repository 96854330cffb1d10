//! The fast CPU path: f32, tiled like FlashAttention-2 (a tile of query rows
//! against tiles of keys with an online softmax), no allocation. Inner loops
//! run over contiguous f32 rows so the compiler vectorises them.
//!
//! Per tile of query rows (inside one plan block, so one permutation):
//! Qhat (rows x d/G) is fused once, pre-multiplied by scale * log2(e); per
//! key tile Khat is fused and stored transposed (d/G x keys) so that the
//! score row is a sum of axpys, the softmax runs in base 2, and P V is
//! accumulated full width.

use crate::attention::Grouping;
use crate::config::{Config, Fusion};
use crate::layout::{Problem, Tensor, TensorMut};
use crate::Element;

/// Query rows per tile.
const TQ: usize = 64;
/// Keys per tile.
const TK: usize = 64;

const LOG2_E: f32 = core::f32::consts::LOG2_E;
const LN_2: f32 = core::f32::consts::LN_2;

pub(crate) fn scratch_len(head_dim: usize, v_dim: usize) -> Option<usize> {
    // qhat TQ*d, khat_t d*TK, s TQ*TK, acc TQ*dv, m TQ, sum TQ, vt TK*dv
    let d_part = head_dim.checked_mul(TQ + TK)?;
    let v_part = v_dim.checked_mul(TQ + TK)?;
    d_part.checked_add(v_part)?.checked_add(TQ * TK + 2 * TQ)
}

/// 2^x for x <= 0 (scores minus their running maximum), branch-free so loops
/// over slices vectorise. Relative error about 1e-7; 0 below 2^-127.
#[inline(always)]
fn exp2(x: f32) -> f32 {
    // Below -126 the result is flushed to 0 (the scale factor's exponent field becomes 0).
    let x = x.max(-127.0);
    // Round to nearest integer with the 1.5 * 2^23 trick (exact for |x| < 2^22).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x + MAGIC;
    let n = shifted - MAGIC;
    let f = x - n; // in [-0.5, 0.5]
    let ni = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // Taylor series of 2^f = e^(f ln 2) to degree 7 (error < 1e-8 on [-0.5, 0.5]).
    const C: [f32; 8] = [
        1.0,
        LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
        0.000_015_252_73,
    ];
    let mut p = C[7];
    for &c in C[..7].iter().rev() {
        p = p * f + c;
    }
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

struct Scratch<'s> {
    qhat: &'s mut [f32],
    khat_t: &'s mut [f32],
    s: &'s mut [f32],
    acc: &'s mut [f32],
    m: &'s mut [f32],
    sum: &'s mut [f32],
    vt: &'s mut [f32],
}

impl<'s> Scratch<'s> {
    fn split(buf: &'s mut [f32], d: usize, dv: usize) -> Self {
        let (qhat, rest) = buf.split_at_mut(TQ * d);
        let (khat_t, rest) = rest.split_at_mut(d * TK);
        let (s, rest) = rest.split_at_mut(TQ * TK);
        let (acc, rest) = rest.split_at_mut(TQ * dv);
        let (m, rest) = rest.split_at_mut(TQ);
        let (sum, rest) = rest.split_at_mut(TQ);
        let (vt, _) = rest.split_at_mut(TK * dv);
        Scratch { qhat, khat_t, s, acc, m, sum, vt }
    }
}

/// Runs attention on validated arguments.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<T: Element>(
    cfg: &Config<'_>,
    grouping: &Grouping<'_>,
    p: &Problem,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    mut lse: Option<&mut [f32]>,
    scratch: &mut [f32],
) {
    let d = p.head_dim;
    let dv = p.v_dim;
    let mut ws = Scratch::split(scratch, d, dv);
    let scale2 = cfg.softmax_scale(d) * LOG2_E;
    let block_rows = grouping.block_rows(p);
    let causal = cfg.causal;
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let hk = p.kv_head(h);
            let mut blk_start = 0;
            while blk_start < p.q_len {
                let blk = blk_start / block_rows;
                let blk_end = (blk_start + block_rows).min(p.q_len);
                let (g, sigma) = grouping.block(cfg, b, h, blk);
                // With G = 1 the permutation only reorders an exact sum: skip it.
                let sigma = if g == 1 { None } else { sigma };
                let mut r0 = blk_start;
                while r0 < blk_end {
                    let rows = (blk_end - r0).min(TQ);
                    let tile = RowTile { b, h, hk, r0, rows, g, sigma, causal };
                    tile.compute(cfg.fusion, scale2, p, q, k, v, &mut ws);
                    tile.store(p, out, lse.as_deref_mut(), &ws);
                    r0 += rows;
                }
                blk_start = blk_end;
            }
        }
    }
}

/// One tile of query rows of one head, all inside one plan block.
struct RowTile<'p> {
    b: usize,
    h: usize,
    hk: usize,
    r0: usize,
    rows: usize,
    g: usize,
    sigma: Option<&'p [u16]>,
    causal: bool,
}

impl RowTile<'_> {
    #[inline(always)]
    fn col(&self, c: usize) -> usize {
        match self.sigma {
            Some(s) => s[c] as usize,
            None => c,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn compute<T: Element>(
        &self,
        fusion: Fusion,
        scale2: f32,
        p: &Problem,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        ws: &mut Scratch<'_>,
    ) {
        let (d, dv, g) = (p.head_dim, p.v_dim, self.g);
        let t = d / g;
        // Fuse Qhat once for the tile, folding in the softmax scale.
        let qscale = match fusion {
            Fusion::Mean => scale2 / g as f32,
            Fusion::Sample => scale2,
        };
        for i in 0..self.rows {
            let row = &q.data[q.layout.offset(self.b, self.r0 + i, self.h)..][..d];
            let dst = &mut ws.qhat[i * t..(i + 1) * t];
            for (c, x) in dst.iter_mut().enumerate() {
                let sum = match fusion {
                    Fusion::Mean => (0..g).map(|j| row[self.col(c * g + j)].to_f32()).sum::<f32>(),
                    Fusion::Sample => row[self.col(c * g)].to_f32(),
                };
                *x = sum * qscale;
            }
        }
        ws.m[..self.rows].fill(f32::NEG_INFINITY);
        ws.sum[..self.rows].fill(0.0);
        ws.acc[..self.rows * dv].fill(0.0);

        // Keys any row of the tile may see.
        let kend = p.key_limit(self.causal, self.r0 + self.rows - 1);
        let mut n0 = 0;
        while n0 < kend {
            let nk = (kend - n0).min(TK);
            // Khat transposed: khat_t[c][n] = sum of K[n0+n][group c].
            for c in 0..t {
                let dst = &mut ws.khat_t[c * TK..c * TK + nk];
                for (n, x) in dst.iter_mut().enumerate() {
                    let krow = &k.data[k.layout.offset(self.b, n0 + n, self.hk)..][..d];
                    *x = (0..g).map(|j| krow[self.col(c * g + j)].to_f32()).sum::<f32>();
                }
            }
            for n in 0..nk {
                let vrow = &v.data[v.layout.offset(self.b, n0 + n, self.hk)..][..dv];
                for (x, y) in ws.vt[n * dv..(n + 1) * dv].iter_mut().zip(vrow) {
                    *x = y.to_f32();
                }
            }
            for i in 0..self.rows {
                let lim = p.key_limit(self.causal, self.r0 + i);
                if lim <= n0 {
                    continue;
                }
                let vis = (lim - n0).min(nk);
                let srow = &mut ws.s[i * TK..i * TK + vis];
                srow.fill(0.0);
                for (c, &a) in ws.qhat[i * t..(i + 1) * t].iter().enumerate() {
                    for (s, &kv) in srow.iter_mut().zip(&ws.khat_t[c * TK..c * TK + vis]) {
                        *s += a * kv;
                    }
                }
                let tile_max = srow.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let m_old = ws.m[i];
                let m_new = m_old.max(tile_max);
                let mut tile_sum = 0.0;
                for s in srow.iter_mut() {
                    *s = exp2(*s - m_new);
                    tile_sum += *s;
                }
                let acc = &mut ws.acc[i * dv..(i + 1) * dv];
                if m_old != m_new {
                    let alpha = if m_old == f32::NEG_INFINITY { 0.0 } else { exp2(m_old - m_new) };
                    ws.sum[i] *= alpha;
                    for a in acc.iter_mut() {
                        *a *= alpha;
                    }
                }
                ws.sum[i] += tile_sum;
                ws.m[i] = m_new;
                for (n, &pn) in srow.iter().enumerate() {
                    for (a, &x) in acc.iter_mut().zip(&ws.vt[n * dv..(n + 1) * dv]) {
                        *a += pn * x;
                    }
                }
            }
            n0 += nk;
        }
    }

    fn store(&self, p: &Problem, out: &mut TensorMut<'_>, lse: Option<&mut [f32]>, ws: &Scratch<'_>) {
        let dv = p.v_dim;
        for i in 0..self.rows {
            let dst = &mut out.data[out.layout.offset(self.b, self.r0 + i, self.h)..][..dv];
            let sum = ws.sum[i];
            if sum > 0.0 {
                let inv = 1.0 / sum;
                for (o, &a) in dst.iter_mut().zip(&ws.acc[i * dv..(i + 1) * dv]) {
                    *o = a * inv;
                }
            } else {
                dst.fill(0.0);
            }
        }
        if let Some(lse) = lse {
            let base = (self.b * p.q_heads + self.h) * p.q_len + self.r0;
            for (i, l) in lse[base..base + self.rows].iter_mut().enumerate() {
                let sum = ws.sum[i];
                *l = if sum > 0.0 { (ws.m[i] + libm::log2f(sum)) * LN_2 } else { f32::NEG_INFINITY };
            }
        }
    }
}
