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
use crate::plan::PlanRef;
use crate::Element;

/// Query rows per tile. A tile may span several plan blocks: the
/// transposed K tile is shared by all of them.
const TQ: usize = 256;
/// Keys per tile.
const TK: usize = 64;
/// Register block of the matrix micro-kernel: MR rows by NR columns.
const MR: usize = 4;
const NR: usize = 8;

const LOG2_E: f32 = core::f32::consts::LOG2_E;
const LN_2: f32 = core::f32::consts::LN_2;

/// `x` rounded up to a multiple of NR.
const fn pad(x: usize) -> usize {
    x.div_ceil(NR) * NR
}

pub(crate) fn scratch_len(head_dim: usize, v_dim: usize) -> Option<usize> {
    // qhat (TQ+MR)*d, kt d*TK, khat_t d*TK, s (TQ+MR)*TK, acc TQ*dvp, m TQ, sum TQ, vt TK*dvp
    let dvp = v_dim.checked_add(NR)?;
    let d_part = head_dim.checked_mul(TQ + MR + 2 * TK)?;
    let v_part = dvp.checked_mul(TQ + TK)?;
    d_part.checked_add(v_part)?.checked_add((TQ + MR) * TK + 2 * TQ)
}

/// `c += a * b` for an MR x NR block: `a` is MR rows of length `k` (row
/// stride `lda`), `b` is `k` rows of NR columns (row stride `ldb`). The
/// accumulators stay in registers; both attention products use it.
#[inline(always)]
fn micro_kernel(a: &[f32], lda: usize, b: &[f32], ldb: usize, k: usize, c: &mut [[f32; NR]; MR]) {
    // Slices of exactly k elements let the compiler drop the bounds checks.
    let a_rows: [&[f32]; MR] = core::array::from_fn(|r| &a[r * lda..r * lda + k]);
    for p in 0..k {
        let bv: [f32; NR] = b[p * ldb..p * ldb + NR].try_into().expect("NR columns");
        let av: [f32; MR] = core::array::from_fn(|r| a_rows[r][p]);
        for r in 0..MR {
            for j in 0..NR {
                c[r][j] += av[r] * bv[j];
            }
        }
    }
}

/// 2^x for x <= 0 (scores minus their running maximum), branch-free so loops
/// over slices vectorise. Relative error below 3e-7; 0 below 2^-127.
#[inline(always)]
fn exp2(x: f32) -> f32 {
    // Below -127 the scale factor's exponent field becomes 0, flushing to 0.
    // (A comparison rather than f32::max: no NaN reaches here, and it maps to one instruction.)
    let x = if x < -127.0 { -127.0 } else { x };
    // Round to nearest integer with the 1.5 * 2^23 trick (exact for |x| < 2^22).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x + MAGIC;
    let n = shifted - MAGIC;
    let f = x - n; // in [-0.5, 0.5]
    let ni = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // Degree-5 polynomial for 2^f on [-0.5, 0.5], fitted for relative error (2.2e-7).
    const C: [f32; 6] = [1.000_000_1, 0.693_146_94, 0.240_221_22, 0.055_507_425, 0.009_675_46, 0.001_326_697];
    let mut p = C[5];
    for &c in C[..5].iter().rev() {
        p = p * f + c;
    }
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Maximum of a slice (-inf if empty), in NR independent lanes so it vectorises.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; NR];
    let chunks = x.chunks_exact(NR);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..NR {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
        }
    }
    tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Replaces each `x` by `2^(x - m)` and returns their sum, in NR lanes.
#[inline(always)]
fn exp2_sum(x: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0f32; NR];
    let mut chunks = x.chunks_exact_mut(NR);
    for c in &mut chunks {
        for j in 0..NR {
            c[j] = exp2(c[j] - m);
            lanes[j] += c[j];
        }
    }
    let mut sum = 0.0;
    for e in chunks.into_remainder() {
        *e = exp2(*e - m);
        sum += *e;
    }
    sum + lanes.iter().sum::<f32>()
}

struct Scratch<'s> {
    qhat: &'s mut [f32],
    kt: &'s mut [f32],
    khat_t: &'s mut [f32],
    s: &'s mut [f32],
    acc: &'s mut [f32],
    m: &'s mut [f32],
    sum: &'s mut [f32],
    vt: &'s mut [f32],
}

impl<'s> Scratch<'s> {
    fn split(buf: &'s mut [f32], d: usize, dv: usize) -> Self {
        let dvp = pad(dv);
        let (qhat, rest) = buf.split_at_mut((TQ + MR) * d);
        let (kt, rest) = rest.split_at_mut(d * TK);
        let (khat_t, rest) = rest.split_at_mut(d * TK);
        let (s, rest) = rest.split_at_mut((TQ + MR) * TK);
        let (acc, rest) = rest.split_at_mut(TQ * dvp);
        let (m, rest) = rest.split_at_mut(TQ);
        let (sum, rest) = rest.split_at_mut(TQ);
        let (vt, _) = rest.split_at_mut(TK * dvp);
        Scratch { qhat, kt, khat_t, s, acc, m, sum, vt }
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
    let mut ws = Scratch::split(scratch, p.head_dim, p.v_dim);
    let scale2 = cfg.softmax_scale(p.head_dim) * LOG2_E;
    let block_rows = grouping.block_rows(p);
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let plan = match grouping {
                // With G = 1 the permutation only reorders an exact sum: skip it.
                Grouping::Plan(plan) if cfg.group_size(h) > 1 => Some(*plan),
                _ => None,
            };
            let g = if plan.is_some() { cfg.group_size(h) } else { 1 };
            let mut r0 = 0;
            while r0 < p.q_len {
                let rows = (p.q_len - r0).min(TQ);
                let tile =
                    RowTile { b, h, hk: p.kv_head(h), r0, rows, g, plan, block_rows, causal: cfg.causal };
                tile.compute(cfg.fusion, scale2, p, q, k, v, &mut ws);
                tile.store(p, out, lse.as_deref_mut(), &ws);
                r0 += rows;
            }
        }
    }
}

/// One tile of query rows of one head. Rows of different plan blocks use
/// their own block's permutation.
struct RowTile<'p> {
    b: usize,
    h: usize,
    hk: usize,
    r0: usize,
    rows: usize,
    g: usize,
    /// `None` for exact heads (G = 1).
    plan: Option<PlanRef<'p>>,
    block_rows: usize,
    causal: bool,
}

impl<'p> RowTile<'p> {
    /// The tile's rows split at plan-block boundaries: `(start, end, permutation)`
    /// with rows relative to the tile.
    fn sub_blocks(&self) -> impl Iterator<Item = (usize, usize, Option<&'p [u16]>)> + '_ {
        let step = if self.plan.is_some() { self.block_rows } else { usize::MAX };
        let mut s0 = 0;
        core::iter::from_fn(move || {
            if s0 >= self.rows {
                return None;
            }
            let abs = self.r0 + s0;
            let blk = if step == usize::MAX { 0 } else { abs / step };
            let s1 = if step == usize::MAX { self.rows } else { ((blk + 1) * step - self.r0).min(self.rows) };
            let sigma = self.plan.map(|p| p.block(self.b, self.h, blk));
            let item = (s0, s1, sigma);
            s0 = s1;
            Some(item)
        })
    }

    /// Fuses Qhat (rows x t, zero rows up to MR past the end), folding in the softmax scale.
    fn fuse_q<T: Element>(&self, fusion: Fusion, scale2: f32, q: &Tensor<'_, T>, d: usize, qhat: &mut [f32]) {
        let (g, t) = (self.g, d / self.g);
        let qscale = match fusion {
            Fusion::Mean => scale2 / g as f32,
            Fusion::Sample => scale2,
        };
        for (s0, s1, sigma) in self.sub_blocks() {
            let col = |c: usize| sigma.map_or(c, |s| s[c] as usize);
            for i in s0..s1 {
                let row = &q.data[q.layout.offset(self.b, self.r0 + i, self.h)..][..d];
                for (c, x) in qhat[i * t..(i + 1) * t].iter_mut().enumerate() {
                    let sum = match fusion {
                        Fusion::Mean => (0..g).map(|j| row[col(c * g + j)].to_f32()).sum::<f32>(),
                        Fusion::Sample => row[col(c * g)].to_f32(),
                    };
                    *x = sum * qscale;
                }
            }
        }
        qhat[self.rows * t..(self.rows + MR) * t].fill(0.0);
    }

    /// Transposes and converts the K rows `n0..n0 + nk` into `kt` (d x TK),
    /// with zero columns up to a multiple of NR.
    fn transpose_k<T: Element>(&self, k: &Tensor<'_, T>, d: usize, n0: usize, nk: usize, kt: &mut [f32]) {
        for n in 0..nk {
            let krow = &k.data[k.layout.offset(self.b, n0 + n, self.hk)..][..d];
            for (c, x) in krow.iter().enumerate() {
                kt[c * TK + n] = x.to_f32();
            }
        }
        for c in 0..d {
            kt[c * TK + nk..c * TK + pad(nk)].fill(0.0);
        }
    }

    /// Khat transposed (t x TK): each group's rows of `kt` summed.
    fn fuse_khat(&self, sigma: &[u16], t: usize, nkp: usize, kt: &[f32], khat_t: &mut [f32]) {
        let g = self.g;
        for c in 0..t {
            let dst = &mut khat_t[c * TK..c * TK + nkp];
            dst.copy_from_slice(&kt[sigma[c * g] as usize * TK..][..nkp]);
            for &j in &sigma[c * g + 1..(c + 1) * g] {
                for (x, &y) in dst.iter_mut().zip(&kt[j as usize * TK..][..nkp]) {
                    *x += y;
                }
            }
        }
    }

    /// V rows `n0..n0 + nk` as f32 rows of NR-padded width: in place for f32
    /// inputs whose rows need no padding, else converted into `vt`.
    /// Returns the rows and their stride.
    fn v_rows<'w, T: Element>(
        &self,
        v: &'w Tensor<'_, T>,
        dv: usize,
        n0: usize,
        nk: usize,
        vt: &'w mut [f32],
    ) -> (&'w [f32], usize) {
        let first = v.layout.offset(self.b, n0, self.hk);
        if let Some(data) = T::as_f32_slice(v.data) {
            // Rows may overlap (stride below dv) or repeat (stride 0): then copy.
            if dv.is_multiple_of(NR) && v.layout.stride_seq >= dv {
                return (&data[first..], v.layout.stride_seq);
            }
        }
        let dvp = pad(dv);
        for n in 0..nk {
            let vrow = &v.data[v.layout.offset(self.b, n0 + n, self.hk)..][..dv];
            let dst = &mut vt[n * dvp..(n + 1) * dvp];
            for (x, y) in dst.iter_mut().zip(vrow) {
                *x = y.to_f32();
            }
            dst[dv..].fill(0.0);
        }
        (vt, dvp)
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
        let (d, dv) = (p.head_dim, p.v_dim);
        let (t, dvp) = (d / self.g, pad(dv));
        let rows_p = self.rows.next_multiple_of(MR);
        self.fuse_q(fusion, scale2, q, d, ws.qhat);
        ws.m[..rows_p].fill(f32::NEG_INFINITY);
        ws.sum[..rows_p].fill(0.0);
        ws.acc[..rows_p * dvp].fill(0.0);

        // Keys any row of the tile may see.
        let kend = p.key_limit(self.causal, self.r0 + self.rows - 1);
        let mut n0 = 0;
        while n0 < kend {
            let nk = (kend - n0).min(TK);
            let nkp = pad(nk);
            self.transpose_k(k, d, n0, nk, ws.kt);

            // S = Qhat Khat^T (already scaled, base 2), per plan block. A
            // register block may run past its plan block's last row; the
            // next plan block overwrites those rows.
            for (s0, s1, sigma) in self.sub_blocks() {
                let khat_t: &[f32] = match sigma {
                    Some(sigma) => {
                        self.fuse_khat(sigma, t, nkp, ws.kt, ws.khat_t);
                        ws.khat_t
                    }
                    None => ws.kt,
                };
                for r in (s0..s1).step_by(MR) {
                    for j in (0..nkp).step_by(NR) {
                        let mut c = [[0f32; NR]; MR];
                        micro_kernel(&ws.qhat[r * t..], t, &khat_t[j..], TK, t, &mut c);
                        for (i, row) in c.iter().enumerate() {
                            ws.s[(r + i) * TK + j..][..NR].copy_from_slice(row);
                        }
                    }
                }
            }

            // Online softmax per row; masked and padded keys get weight exactly 0.
            for i in 0..rows_p {
                let srow = &mut ws.s[i * TK..i * TK + nk];
                let vis = if i < self.rows {
                    p.key_limit(self.causal, self.r0 + i).saturating_sub(n0).min(nk)
                } else {
                    0
                };
                let m_old = ws.m[i];
                let m_new = m_old.max(lane_max(&srow[..vis]));
                if m_new == f32::NEG_INFINITY {
                    srow.fill(0.0); // no visible key yet
                    continue;
                }
                let tile_sum = exp2_sum(&mut srow[..vis], m_new);
                srow[vis..].fill(0.0);
                if m_old != m_new {
                    let alpha = exp2(m_old - m_new); // 0 when m_old is -inf
                    ws.sum[i] *= alpha;
                    for a in ws.acc[i * dvp..(i + 1) * dvp].iter_mut() {
                        *a *= alpha;
                    }
                }
                ws.sum[i] += tile_sum;
                ws.m[i] = m_new;
            }

            // O += P V, full width.
            let (v_rows, ldv) = self.v_rows(v, dv, n0, nk, ws.vt);
            for r in (0..rows_p).step_by(MR) {
                for j in (0..dvp).step_by(NR) {
                    let mut c: [[f32; NR]; MR] =
                        core::array::from_fn(|i| ws.acc[(r + i) * dvp + j..][..NR].try_into().expect("NR"));
                    micro_kernel(&ws.s[r * TK..], TK, &v_rows[j..], ldv, nk, &mut c);
                    for (i, row) in c.iter().enumerate() {
                        ws.acc[(r + i) * dvp + j..][..NR].copy_from_slice(row);
                    }
                }
            }
            n0 += nk;
        }
    }

    fn store(&self, p: &Problem, out: &mut TensorMut<'_>, lse: Option<&mut [f32]>, ws: &Scratch<'_>) {
        let (dv, dvp) = (p.v_dim, pad(p.v_dim));
        for i in 0..self.rows {
            let dst = &mut out.data[out.layout.offset(self.b, self.r0 + i, self.h)..][..dv];
            let sum = ws.sum[i];
            if sum > 0.0 {
                let inv = 1.0 / sum;
                for (o, &a) in dst.iter_mut().zip(&ws.acc[i * dvp..i * dvp + dv]) {
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
