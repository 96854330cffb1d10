//! Grouping rules beyond the paper's LSH, and the error they cause.
//!
//! Fusing a group g of columns replaces `sum_j q_j k_j^T` by `qhat_g sum_j k_j^T`,
//! so the block's score matrix changes by
//! `E_g = sum_{j in g} (qhat_g - q_j) k_j^T` (l x M). With the Gram matrices
//! `Gq = Q_blk^T Q_blk` (d x d over the block's rows) and `Gk = K^T K` (d x d
//! over the keys) every `<E_g, E_g'>` is a small sum over Gram entries, so the
//! exact Frobenius norm of the score error of a whole plan costs O(d^2) once
//! the Grams are known. [`GroupingMode::Similarity`] and
//! [`GroupingMode::KeyWeighted`] choose groups greedily to keep that error
//! small (Q-only with `Gk = I`, and with the real `Gk`), and
//! [`crate::estimate_errors`] reports it per head.

use alloc::vec::Vec;

use crate::config::Fusion;
use crate::layout::Tensor;
use crate::Element;

/// `d x d` Gram matrix of the columns of `rows` row vectors (each of length
/// `d`, given by `row(r)`), accumulated in f64 into `out`.
pub(crate) fn gram(
    d: usize,
    rows: usize,
    mut row: impl FnMut(usize, &mut [f64]),
    out: &mut [f64],
    buf: &mut [f64],
) {
    out[..d * d].fill(0.0);
    for r in 0..rows {
        row(r, &mut buf[..d]);
        for (j, &x) in buf[..d].iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            for (o, &y) in out[j * d..(j + 1) * d].iter_mut().zip(&buf[..d]) {
                *o += x * y;
            }
        }
    }
}

/// Gram matrix of the Q columns of rows `row0..row0 + rows` of head `h`.
pub(crate) fn query_gram<T: Element>(
    q: &Tensor<'_, T>,
    b: usize,
    h: usize,
    row0: usize,
    rows: usize,
    out: &mut [f64],
    buf: &mut [f64],
) {
    let d = q.layout.dim;
    gram(
        d,
        rows,
        |r, dst| {
            let src = &q.data[q.layout.offset(b, row0 + r, h)..][..d];
            for (x, y) in dst.iter_mut().zip(src) {
                *x = y.to_f32() as f64;
            }
        },
        out,
        buf,
    );
}

/// Gram matrix of the *centred* K columns of KV head `hk` over all keys.
/// Softmax ignores a change of a row's scores by a constant, and the part of
/// a score error that comes from the keys' mean is such a constant (a
/// column of K with a large mean, a "massive activation", shifts every score
/// of a row alike), so only deviations from the mean key count.
pub(crate) fn key_gram<T: Element>(k: &Tensor<'_, T>, b: usize, hk: usize, out: &mut [f64], buf: &mut [f64]) {
    let (d, m) = (k.layout.dim, k.layout.seq);
    let mut mean = alloc::vec![0f64; d];
    for n in 0..m {
        for (acc, x) in mean.iter_mut().zip(&k.data[k.layout.offset(b, n, hk)..][..d]) {
            *acc += x.to_f32() as f64;
        }
    }
    for x in mean.iter_mut() {
        *x /= m as f64;
    }
    gram(
        d,
        m,
        |n, dst| {
            let src = &k.data[k.layout.offset(b, n, hk)..][..d];
            for ((x, y), mu) in dst.iter_mut().zip(src).zip(&mean) {
                *x = y.to_f32() as f64 - mu;
            }
        },
        out,
        buf,
    );
}

/// Squared Frobenius norm of the score error of fusing `groups` (each a run
/// of `g` column indices in `perm`), given `gq` and `gk` (`None` = identity).
///
/// With `c_j = qhat - q_j` (qhat the group's fused column):
/// `||E||^2 = sum_{j, j'} <c_j, c_j'> Gk[j, j']`, where `<c_j, c_j'>` is
/// expanded over `gq`.
pub(crate) fn fusion_error2(
    gq: &[f64],
    gk: Option<&[f64]>,
    d: usize,
    perm: &[u16],
    g: usize,
    fusion: Fusion,
) -> f64 {
    if g == 1 {
        return 0.0;
    }
    // coef[j][a]: c_j = sum_a coef[j][a] q_a (sparse: only members of j's group).
    // <c_j, c_j'> = sum_{a in grp(j), b in grp(j')} coef[j][a] coef[j'][b] Gq[a, b].
    let coef = |j: usize, a: usize| -> f64 {
        let w = match fusion {
            Fusion::Mean => 1.0 / g as f64,
            Fusion::Sample => (a == 0) as u8 as f64,
        };
        w - (a == j) as u8 as f64
    };
    let gk_at = |x: usize, y: usize| match gk {
        Some(gk) => gk[x * d + y],
        None => (x == y) as u8 as f64,
    };
    let mut total = 0.0;
    let groups: Vec<&[u16]> = perm.chunks(g).collect();
    for ga in &groups {
        for gb in &groups {
            // Without K weighting, columns of different groups do not interact.
            if gk.is_none() && !core::ptr::eq(*ga, *gb) {
                continue;
            }
            for (j, &cj) in ga.iter().enumerate() {
                for (jj, &cjj) in gb.iter().enumerate() {
                    let w = gk_at(cj as usize, cjj as usize);
                    if w == 0.0 {
                        continue;
                    }
                    let mut dot = 0.0;
                    for (a, &ca) in ga.iter().enumerate() {
                        let x = coef(j, a);
                        if x == 0.0 {
                            continue;
                        }
                        for (b, &cb) in gb.iter().enumerate() {
                            let y = coef(jj, b);
                            if y != 0.0 {
                                dot += x * y * gq[ca as usize * d + cb as usize];
                            }
                        }
                    }
                    total += dot * w;
                }
            }
        }
    }
    total.max(0.0)
}

/// Squared Frobenius norm of the unfused scores `Q_blk K^T`: `sum Gq .* Gk`.
pub(crate) fn score_norm2(gq: &[f64], gk: Option<&[f64]>, d: usize) -> f64 {
    match gk {
        Some(gk) => gq[..d * d].iter().zip(&gk[..d * d]).map(|(a, b)| a * b).sum(),
        None => (0..d).map(|j| gq[j * d + j]).sum(),
    }
}

/// Score error (squared) of fusing the columns `members` into one with
/// Mean fusion, without K weighting (`gk = None`) or with it. `r` is scratch
/// of at least `members.len()` entries.
fn cluster_cost(gq: &[f64], gk: Option<&[f64]>, d: usize, members: &[u16], r: &mut [f64]) -> f64 {
    let s = members.len() as f64;
    let at = |g: &[f64], x: u16, y: u16| g[x as usize * d + y as usize];
    for (rx, &j) in r.iter_mut().zip(members) {
        *rx = members.iter().map(|&a| at(gq, a, j)).sum::<f64>() / s;
    }
    let r = &r[..members.len()];
    let m = r.iter().sum::<f64>() / s;
    let mut cost = 0.0;
    for (x, &j) in members.iter().enumerate() {
        match gk {
            None => cost += at(gq, j, j) - 2.0 * r[x] + m,
            Some(gk) => {
                for (y, &jj) in members.iter().enumerate() {
                    cost += (at(gq, j, jj) - r[x] - r[y] + m) * at(gk, j, jj);
                }
            }
        }
    }
    cost
}

/// [`cluster_cost`] of a pair in O(1): the fused error is
/// `|q_a - q_b|^2 / 2` without K weighting and `|q_a - q_b|^2 |k_a - k_b|^2 / 4` with it.
#[inline]
fn pair_cost(gq: &[f64], gk: Option<&[f64]>, d: usize, a: u16, b: u16) -> f64 {
    let dist = |g: &[f64]| {
        let (a, b) = (a as usize, b as usize);
        g[a * d + a] + g[b * d + b] - 2.0 * g[a * d + b]
    };
    match gk {
        None => dist(gq) / 2.0,
        Some(gk) => dist(gq) * dist(gk) / 4.0,
    }
}

/// Cost of a group of any size, using the O(1) form for pairs.
fn group_cost(gq: &[f64], gk: Option<&[f64]>, d: usize, members: &[u16], r: &mut [f64]) -> f64 {
    match *members {
        [a, b] => pair_cost(gq, gk, d, a, b),
        _ => cluster_cost(gq, gk, d, members, r),
    }
}

/// Greedy agglomerative grouping followed by local search.
///
/// Groups start as single columns; each round merges disjoint pairs of
/// groups in order of increasing added score error (ties by position), until
/// groups have `g` columns (a power of two); then single columns are swapped
/// between groups while the summed error drops. Writes the groups, each
/// ordered as merged and ordered by their smallest column, into `perm`.
pub(crate) fn similarity_groups(gq: &[f64], gk: Option<&[f64]>, d: usize, g: usize, perm: &mut [u16]) {
    let mut cur: Vec<u16> = (0..d as u16).collect();
    let mut r = alloc::vec![0f64; g.max(2)];
    let mut merged = alloc::vec![0u16; g.max(2)];
    let mut size = 1;
    while size < g {
        let n = d / size;
        let costs: Vec<f64> = cur.chunks(size).map(|c| group_cost(gq, gk, d, c, &mut r)).collect();
        let mut pairs = Vec::with_capacity(n * (n - 1) / 2);
        for a in 0..n {
            for b in a + 1..n {
                let m = &mut merged[..2 * size];
                m[..size].copy_from_slice(&cur[a * size..(a + 1) * size]);
                m[size..].copy_from_slice(&cur[b * size..(b + 1) * size]);
                let delta = group_cost(gq, gk, d, m, &mut r) - costs[a] - costs[b];
                pairs.push((delta, a as u32, b as u32));
            }
        }
        pairs.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let mut taken = alloc::vec![false; n];
        let mut next = Vec::with_capacity(d);
        for (_, a, b) in pairs {
            let (a, b) = (a as usize, b as usize);
            if !taken[a] && !taken[b] {
                taken[a] = true;
                taken[b] = true;
                next.extend_from_slice(&cur[a * size..(a + 1) * size]);
                next.extend_from_slice(&cur[b * size..(b + 1) * size]);
            }
        }
        size *= 2;
        // Order groups by their smallest column, for a canonical plan.
        let mut groups: Vec<&[u16]> = next.chunks(size).collect();
        groups.sort_by_key(|c| c.iter().copied().min());
        cur = groups.concat();
    }
    refine(gq, gk, d, g, &mut cur, &mut r);
    perm[..d].copy_from_slice(&cur);
}

/// Local search after the greedy rounds: swap single columns between two
/// groups while that lowers the summed cost (at most 8 passes; on the
/// fixtures it converges in 4).
fn refine(gq: &[f64], gk: Option<&[f64]>, d: usize, g: usize, cur: &mut [u16], r: &mut [f64]) {
    if g < 2 {
        return;
    }
    let n = d / g;
    let mut costs: Vec<f64> = cur.chunks(g).map(|c| group_cost(gq, gk, d, c, r)).collect();
    let mut ga = alloc::vec![0u16; g];
    let mut gb = alloc::vec![0u16; g];
    for _ in 0..8 {
        let mut improved = false;
        for a in 0..n {
            for b in a + 1..n {
                for x in 0..g {
                    for y in 0..g {
                        ga.copy_from_slice(&cur[a * g..(a + 1) * g]);
                        gb.copy_from_slice(&cur[b * g..(b + 1) * g]);
                        core::mem::swap(&mut ga[x], &mut gb[y]);
                        let (na, nb) = (group_cost(gq, gk, d, &ga, r), group_cost(gq, gk, d, &gb, r));
                        if na + nb < (costs[a] + costs[b]) * (1.0 - 1e-12) {
                            cur[a * g..(a + 1) * g].copy_from_slice(&ga);
                            cur[b * g..(b + 1) * g].copy_from_slice(&gb);
                            costs[a] = na;
                            costs[b] = nb;
                            improved = true;
                        }
                    }
                }
            }
        }
        if !improved {
            break;
        }
    }
}
