//! The plan: for every (batch, query head, query block) a permutation of the
//! head-dimension columns 0..d, ordered by the inverse-Gray key of each
//! column's angular-LSH code, ties broken by column index (ALGORITHM.md,
//! steps 1-3). Consecutive runs of G entries form the groups.

use crate::config::{Config, GroupingMode};
use crate::error::{Error, Operand, Result};
use crate::layout::{check_buffer, check_finite, Layout, Tensor};
use crate::Element;

/// Position of `code` in the reflected binary Gray sequence: neighbours in
/// this order differ in one bit, so similar LSH codes sort close together.
#[inline]
pub const fn inverse_gray(code: u32) -> u32 {
    let mut n = code;
    n ^= n >> 1;
    n ^= n >> 2;
    n ^= n >> 4;
    n ^= n >> 8;
    n ^= n >> 16;
    n
}

/// Dimensions of a plan: `batch * heads * blocks` blocks of `head_dim`
/// column indices each, stored densely in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlanShape {
    pub batch: usize,
    pub heads: usize,
    /// Query blocks per head: `ceil(q_len / block_rows)`.
    pub blocks: usize,
    pub head_dim: usize,
    pub block_rows: usize,
}

impl PlanShape {
    /// The plan shape for queries of layout `q` (validated) under `cfg`.
    pub fn new(cfg: &Config<'_>, q: &Layout) -> Result<PlanShape> {
        cfg.validate_plan_params()?;
        q.required_len(Operand::Q)?;
        if q.dim > crate::MAX_HEAD_DIM {
            return Err(Error::HeadDimTooLarge { got: q.dim, max: crate::MAX_HEAD_DIM });
        }
        let shape = PlanShape {
            batch: q.batch,
            heads: q.heads,
            blocks: q.seq.div_ceil(cfg.block_rows),
            head_dim: q.dim,
            block_rows: cfg.block_rows,
        };
        shape.num_entries()?;
        Ok(shape)
    }

    /// Number of `u16` entries: `batch * heads * blocks * head_dim`.
    pub fn num_entries(&self) -> Result<usize> {
        self.num_blocks().checked_mul(self.head_dim).ok_or(Error::SizeOverflow { operand: Operand::Plan })
    }

    /// Number of permutations: `batch * heads * blocks`.
    pub fn num_blocks(&self) -> usize {
        self.batch.saturating_mul(self.heads).saturating_mul(self.blocks)
    }

    /// Index of block `(b, h, blk)` among the permutations.
    #[inline(always)]
    pub fn block_index(&self, b: usize, h: usize, blk: usize) -> usize {
        (b * self.heads + h) * self.blocks + blk
    }
}

/// A borrowed, validated plan.
#[derive(Clone, Copy, Debug)]
pub struct PlanRef<'a> {
    shape: PlanShape,
    perm: &'a [u16],
}

impl<'a> PlanRef<'a> {
    /// Wraps caller-provided permutations, checking the length and that every
    /// block is a permutation of `0..head_dim` (a plan from elsewhere, such as
    /// the GPU, is untrusted input).
    pub fn new(shape: PlanShape, perm: &'a [u16]) -> Result<Self> {
        let needed = shape.num_entries()?;
        if perm.len() != needed {
            return Err(Error::BufferTooSmall { operand: Operand::Plan, needed, got: perm.len() });
        }
        let d = shape.head_dim;
        let mut seen = [0u64; crate::MAX_HEAD_DIM / 64];
        for (block, cols) in perm.chunks_exact(d.max(1)).enumerate() {
            let words = d.div_ceil(64);
            seen[..words].fill(0);
            for &c in cols {
                let c = c as usize;
                if c >= d || seen[c / 64] & (1 << (c % 64)) != 0 {
                    return Err(Error::NotAPermutation { block });
                }
                seen[c / 64] |= 1 << (c % 64);
            }
        }
        Ok(PlanRef { shape, perm })
    }

    pub fn shape(&self) -> PlanShape {
        self.shape
    }

    /// All permutations, densely `[batch][heads][blocks][head_dim]`.
    pub fn as_slice(&self) -> &'a [u16] {
        self.perm
    }

    /// The permutation of query block `blk` of head `h` in batch `b`.
    #[inline(always)]
    pub fn block(&self, b: usize, h: usize, blk: usize) -> &'a [u16] {
        let d = self.shape.head_dim;
        let start = self.shape.block_index(b, h, blk) * d;
        &self.perm[start..start + d]
    }
}

/// An owned plan.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    shape: PlanShape,
    perm: alloc::vec::Vec<u16>,
}

#[cfg(feature = "alloc")]
impl Plan {
    /// Takes ownership of permutations after the same checks as [`PlanRef::new`].
    pub fn from_vec(shape: PlanShape, perm: alloc::vec::Vec<u16>) -> Result<Self> {
        PlanRef::new(shape, &perm)?;
        Ok(Plan { shape, perm })
    }

    pub fn as_ref(&self) -> PlanRef<'_> {
        PlanRef { shape: self.shape, perm: &self.perm }
    }

    pub fn shape(&self) -> PlanShape {
        self.shape
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.perm
    }

    pub fn into_vec(self) -> alloc::vec::Vec<u16> {
        self.perm
    }
}

/// Length of the `scratch` buffer [`plan_into`] needs: one `u64` per column.
pub fn plan_scratch_len(head_dim: usize) -> usize {
    head_dim
}

/// Computes the plan of `q` into caller buffers, with no allocation.
///
/// * `projections`: R from [`crate::projections_into`] for the same config,
///   row-major `[block_rows][num_projections]`; only the first
///   `min(block_rows, q_len)` rows are read, so a shorter prefix suffices.
/// * `out`: at least [`PlanShape::num_entries`] entries; written densely `[batch][heads][blocks][head_dim]`.
/// * `scratch`: at least [`plan_scratch_len`] entries.
///
/// The plan is the sign pattern of the dot products accumulated in f64 (in
/// row order) from the f32-rounded inputs. They are accumulated in f32 and
/// the f64 sum is computed only where a rounding-error bound cannot rule out
/// a different sign, so the result equals the f64 plan exactly. Q must be finite.
pub fn plan_into<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    projections: &[f32],
    out: &mut [u16],
    scratch: &mut [u64],
) -> Result<PlanShape> {
    let shape = PlanShape::new(cfg, &q.layout)?;
    if cfg.grouping != GroupingMode::Lsh {
        return Err(Error::GroupingUnavailable {
            reason: "plan_into computes LSH plans only; similarity grouping needs the allocating plan/plan_with_keys",
        });
    }
    check_buffer(Operand::Q, q.data.len(), &q.layout)?;
    check_finite(Operand::Q, q)?;
    // Only the rows a block actually has are read (a short Q needs fewer).
    let r_len = cfg.num_projections as usize * cfg.block_rows.min(q.layout.seq);
    if projections.len() < r_len {
        return Err(Error::BufferTooSmall {
            operand: Operand::Projections,
            needed: r_len,
            got: projections.len(),
        });
    }
    let needed = shape.num_entries()?;
    if out.len() < needed {
        return Err(Error::BufferTooSmall { operand: Operand::Plan, needed, got: out.len() });
    }
    let d = shape.head_dim;
    if scratch.len() < plan_scratch_len(d) {
        return Err(Error::BufferTooSmall { operand: Operand::Scratch, needed: d, got: scratch.len() });
    }
    let l = &q.layout;
    let p_count = cfg.num_projections as usize;
    let keys = &mut scratch[..d];
    for b in 0..l.batch {
        for h in 0..l.heads {
            for blk in 0..shape.blocks {
                let row0 = blk * cfg.block_rows;
                let rows = (l.seq - row0).min(cfg.block_rows);
                // Largest |R| of each projection over this block's rows.
                let mut w_max = [0f32; crate::MAX_PROJECTIONS];
                for proj in projections[..rows * p_count].chunks_exact(p_count) {
                    for (m, &w) in w_max.iter_mut().zip(proj) {
                        *m = m.max(w.abs());
                    }
                }
                let bound = SignBound::new(rows);
                // Four columns at a time share each row of R (and give the
                // accumulations independent dependency chains).
                for j0 in (0..d).step_by(4) {
                    let cols = (d - j0).min(4);
                    let mut acc = [[0f32; crate::MAX_PROJECTIONS]; 4];
                    let mut x_abs = [0f32; 4];
                    for r in 0..rows {
                        let base = l.offset(b, row0 + r, h) + j0;
                        let proj = &projections[r * p_count..(r + 1) * p_count];
                        for ((a, n), x) in acc.iter_mut().zip(&mut x_abs).zip(&q.data[base..base + cols]) {
                            let x = x.to_f32();
                            *n += x.abs();
                            for (a, &w) in a.iter_mut().zip(proj) {
                                *a += x * w;
                            }
                        }
                    }
                    for (c, (a, &xn)) in acc[..cols].iter().zip(&x_abs).enumerate() {
                        let mut code = 0u32;
                        for (p, &a) in a[..p_count].iter().enumerate() {
                            // The f32 sum decides the sign when it is provably the
                            // sign of the f64 sum; otherwise (rare: near zero, or
                            // out of f32 range) the f64 sum is computed.
                            let positive = if bound.decides(a, xn, w_max[p]) {
                                a > 0.0
                            } else {
                                let mut s = 0f64;
                                for r in 0..rows {
                                    let x = q.data[l.offset(b, row0 + r, h) + j0 + c].to_f32();
                                    s += x as f64 * projections[r * p_count + p] as f64;
                                }
                                s > 0.0
                            };
                            code |= (positive as u32) << p;
                        }
                        // (key, column) packed so that sorting the integers is the stable sort.
                        keys[j0 + c] = ((inverse_gray(code) as u64) << 32) | (j0 + c) as u64;
                    }
                }
                keys.sort_unstable();
                let start = shape.block_index(b, h, blk) * d;
                for (o, &key) in out[start..start + d].iter_mut().zip(keys.iter()) {
                    *o = key as u16;
                }
            }
        }
    }
    Ok(shape)
}

/// Decides when an f32 dot product of `n` terms has the sign of the same dot
/// product accumulated in f64. Both differ from the exact sum by at most
/// `gamma_n * sum |x_i w_i| <= gamma_n * max|w| * sum |x_i|` (`gamma_n =
/// n u / (1 - n u)`, `u` the unit roundoff), plus at most `2^-149` per term
/// where f32 products underflow. If `|f32 sum|` exceeds the sum of both bounds
/// (with margin), the exact sum, and hence the f64 sum, has its sign.
struct SignBound {
    rel: f64,
    abs: f64,
}

impl SignBound {
    fn new(n: usize) -> Self {
        let gamma = |u: f64| {
            let nu = (n + 1) as f64 * u;
            nu / (1.0 - nu).max(0.5)
        };
        let (u32_, u64_) = (f32::EPSILON as f64 / 2.0, f64::EPSILON / 2.0);
        // A factor 2 covers the f32 rounding of sum |x_i| and of this bound itself.
        SignBound {
            rel: 2.0 * (gamma(u32_) + gamma(u64_)),
            abs: 2.0 * (n as f64 + 1.0) * f32::from_bits(1) as f64,
        }
    }

    /// `a`: the f32 sum; `x_abs`: the f32 sum of `|x_i|`; `w_max`: `max |w_i|`.
    fn decides(&self, a: f32, x_abs: f32, w_max: f32) -> bool {
        let bound = self.rel * x_abs as f64 * w_max as f64 + self.abs;
        // False for NaN and infinities (f32 overflow): those fall back to f64.
        a.is_finite() && (a.abs() as f64) > bound
    }
}

/// Computes the plan of `q` under the config's grouping mode (allocating).
/// [`GroupingMode::KeyWeighted`] needs the keys: use [`plan_with_keys`].
#[cfg(feature = "alloc")]
pub fn plan<T: Element>(cfg: &Config<'_>, q: &Tensor<'_, T>) -> Result<Plan> {
    match cfg.grouping {
        GroupingMode::Lsh => {
            let shape = PlanShape::new(cfg, &q.layout)?;
            let rows_used = Config { block_rows: cfg.block_rows.min(q.layout.seq), ..*cfg };
            let r = crate::projections(&rows_used)?;
            let mut perm = crate::try_vec(shape.num_entries()?, 0u16, Operand::Plan)?;
            let mut scratch = crate::try_vec(plan_scratch_len(shape.head_dim), 0u64, Operand::Scratch)?;
            plan_into(cfg, q, &r, &mut perm, &mut scratch)?;
            Ok(Plan { shape, perm })
        }
        GroupingMode::Similarity => similarity_plan(cfg, q, None),
        GroupingMode::KeyWeighted => Err(Error::GroupingUnavailable {
            reason: "key-weighted grouping needs the keys: use plan_with_keys",
        }),
    }
}

/// Computes the plan of `q` under any grouping mode; `k` (the keys the plan
/// will attend to) is read by [`GroupingMode::KeyWeighted`] and validated
/// against `q` in every mode.
#[cfg(feature = "alloc")]
pub fn plan_with_keys<T: Element>(cfg: &Config<'_>, q: &Tensor<'_, T>, k: &Tensor<'_, T>) -> Result<Plan> {
    crate::Problem::new(&q.layout, &k.layout, &k.layout)?;
    check_buffer(Operand::K, k.data.len(), &k.layout)?;
    check_finite(Operand::K, k)?;
    match cfg.grouping {
        GroupingMode::KeyWeighted => similarity_plan(cfg, q, Some(k)),
        _ => plan(cfg, q),
    }
}

/// Plans by [`GroupingMode::Similarity`] (`k = None`) or
/// [`GroupingMode::KeyWeighted`]: one greedy grouping per block and head.
/// Heads with G = 1 get the identity.
#[cfg(feature = "alloc")]
fn similarity_plan<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: Option<&Tensor<'_, T>>,
) -> Result<Plan> {
    let shape = PlanShape::new(cfg, &q.layout)?;
    cfg.validate(q.layout.heads, q.layout.dim)?;
    for h in 0..q.layout.heads {
        let g = cfg.group_size(h);
        if !g.is_power_of_two() {
            return Err(Error::UnsupportedGroupSize { got: g });
        }
    }
    check_buffer(Operand::Q, q.data.len(), &q.layout)?;
    check_finite(Operand::Q, q)?;
    let d = shape.head_dim;
    let mut perm = crate::try_vec(shape.num_entries()?, 0u16, Operand::Plan)?;
    let mut gq = crate::try_vec(d * d, 0f64, Operand::Scratch)?;
    let mut gk = crate::try_vec(if k.is_some() { d * d } else { 0 }, 0f64, Operand::Scratch)?;
    let mut row = crate::try_vec(d, 0f64, Operand::Scratch)?;
    let l = &q.layout;
    for b in 0..l.batch {
        for h in 0..l.heads {
            let g = cfg.group_size(h);
            if let Some(k) = k {
                let hk = h / (l.heads / k.layout.heads);
                crate::grouping::key_gram(k, b, hk, &mut gk, &mut row);
            }
            for blk in 0..shape.blocks {
                let start = shape.block_index(b, h, blk) * d;
                let dst = &mut perm[start..start + d];
                if g == 1 {
                    for (j, x) in dst.iter_mut().enumerate() {
                        *x = j as u16;
                    }
                    continue;
                }
                let row0 = blk * cfg.block_rows;
                let rows = (l.seq - row0).min(cfg.block_rows);
                crate::grouping::query_gram(q, b, h, row0, rows, &mut gq, &mut row);
                let gk = if k.is_some() { Some(&gk[..]) } else { None };
                crate::grouping::similarity_groups(&gq, gk, d, g, dst);
            }
        }
    }
    Ok(Plan { shape, perm })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Layout, Tensor};
    use alloc::vec::Vec;

    /// The plan as ALGORITHM.md states it, written plainly: f64 dot products
    /// in row order, inverse-Gray keys, stable sort by key.
    fn plain_plan(cfg: &Config<'_>, q: &[f32], n: usize, d: usize) -> Vec<u16> {
        let p_count = cfg.num_projections as usize;
        let r = crate::projections(&Config { block_rows: cfg.block_rows.min(n), ..*cfg }).unwrap();
        let mut out = Vec::new();
        for row0 in (0..n).step_by(cfg.block_rows) {
            let rows = (n - row0).min(cfg.block_rows);
            let mut cols: Vec<(u32, u16)> = (0..d)
                .map(|j| {
                    let mut code = 0u32;
                    for p in 0..p_count {
                        let s: f64 =
                            (0..rows).map(|i| q[(row0 + i) * d + j] as f64 * r[i * p_count + p] as f64).sum();
                        code |= ((s > 0.0) as u32) << p;
                    }
                    (inverse_gray(code), j as u16)
                })
                .collect();
            cols.sort_by_key(|&(key, _)| key); // stable
            out.extend(cols.iter().map(|&(_, j)| j));
        }
        out
    }

    /// The f32 accumulation with its f64 fallback gives the f64 plan exactly,
    /// also where dot products cancel to (nearly) zero or leave f32's range.
    #[test]
    fn fast_plan_equals_the_f64_plan_near_zero_and_at_the_range_limits() {
        let (n, d, l) = (40usize, 16usize, 16usize);
        let cfg = Config { block_rows: l, ..Config::with_group_size(2) };
        let p_count = cfg.num_projections as usize;
        let r = crate::projections(&Config { block_rows: l, ..cfg }).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut fallbacks_expected = 0;
        for scale in [1.0f32, 1e-42, 1e-30, 1e30, 3e37] {
            let mut q: Vec<f32> = (0..n * d).map(|_| rand() * scale).collect();
            // Make column j's dot product with projection j % P cancel: its
            // last row in each block solves sum_i x_i w_i = 0 (rounded).
            for row0 in (0..n).step_by(l) {
                let rows = (n - row0).min(l);
                for j in (0..d).step_by(2) {
                    let p = j % p_count;
                    let last = rows - 1;
                    let partial: f64 =
                        (0..last).map(|i| q[(row0 + i) * d + j] as f64 * r[i * p_count + p] as f64).sum();
                    let x = (-partial / r[last * p_count + p] as f64) as f32;
                    if x.is_finite() {
                        q[(row0 + last) * d + j] = x;
                        fallbacks_expected += 1;
                    }
                }
            }
            let layout = Layout::contiguous(1, n, 1, d);
            let fast = plan(&cfg, &Tensor::new(&q, layout)).unwrap();
            assert_eq!(fast.as_slice(), &plain_plan(&cfg, &q, n, d)[..], "scale {scale}");
        }
        assert!(fallbacks_expected > 0);
    }

    #[test]
    fn inverse_gray_inverts_the_gray_code() {
        for i in (0u32..1 << 16).chain([u32::MAX, u32::MAX - 1, 1 << 31]) {
            let gray = i ^ (i >> 1);
            assert_eq!(inverse_gray(gray), i);
        }
        // Gray-sequence neighbours differ in one bit.
        for i in 0u32..1000 {
            let (a, b) = (i ^ (i >> 1), (i + 1) ^ ((i + 1) >> 1));
            assert_eq!((a ^ b).count_ones(), 1);
        }
    }
}
