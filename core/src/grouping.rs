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

/// Score error (squared) of fusing the members of `members` into one
/// column with Mean fusion, without K weighting (`gk = None`) or with it.
fn cluster_cost(gq: &[f64], gk: Option<&[f64]>, d: usize, members: &[u16]) -> f64 {
    let s = members.len() as f64;
    let r: Vec<f64> = members
        .iter()
        .map(|&j| members.iter().map(|&a| gq[a as usize * d + j as usize]).sum::<f64>() / s)
        .collect();
    let m = r.iter().sum::<f64>() / s;
    let mut cost = 0.0;
    for (x, &j) in members.iter().enumerate() {
        match gk {
            None => cost += gq[j as usize * d + j as usize] - 2.0 * r[x] + m,
            Some(gk) => {
                for (y, &jj) in members.iter().enumerate() {
                    let c = gq[j as usize * d + jj as usize] - r[x] - r[y] + m;
                    cost += c * gk[j as usize * d + jj as usize];
                }
            }
        }
    }
    cost
}

/// Greedy agglomerative grouping: start from single columns; in each round
/// merge disjoint pairs of clusters in order of increasing added score error
/// (ties by cluster order), until clusters have `g` columns (a power of
/// two). Writes the clusters, ordered by their smallest column, into `perm`.
pub(crate) fn similarity_groups(gq: &[f64], gk: Option<&[f64]>, d: usize, g: usize, perm: &mut [u16]) {
    let mut clusters: Vec<Vec<u16>> = (0..d as u16).map(|j| alloc::vec![j]).collect();
    while clusters[0].len() < g {
        let costs: Vec<f64> = clusters.iter().map(|c| cluster_cost(gq, gk, d, c)).collect();
        let mut pairs = Vec::with_capacity(clusters.len() * (clusters.len() - 1) / 2);
        for a in 0..clusters.len() {
            for b in a + 1..clusters.len() {
                let merged: Vec<u16> = clusters[a].iter().chain(&clusters[b]).copied().collect();
                let delta = cluster_cost(gq, gk, d, &merged) - costs[a] - costs[b];
                pairs.push((delta, a, b));
            }
        }
        pairs.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let mut taken = alloc::vec![false; clusters.len()];
        let mut next = Vec::with_capacity(clusters.len() / 2);
        for (_, a, b) in pairs {
            if !taken[a] && !taken[b] {
                taken[a] = true;
                taken[b] = true;
                next.push(clusters[a].iter().chain(&clusters[b]).copied().collect::<Vec<u16>>());
            }
        }
        next.sort_by_key(|c| c.iter().copied().min());
        clusters = next;
    }
    refine(gq, gk, d, &mut clusters);
    for (dst, &j) in perm.iter_mut().zip(clusters.iter().flatten()) {
        *dst = j;
    }
}

/// Local search after the greedy rounds: swap single columns between two
/// groups while that lowers the summed cost (at most 8 passes; on the
/// fixtures it converges in 4).
fn refine(gq: &[f64], gk: Option<&[f64]>, d: usize, clusters: &mut [Vec<u16>]) {
    let mut costs: Vec<f64> = clusters.iter().map(|c| cluster_cost(gq, gk, d, c)).collect();
    for _ in 0..8 {
        let mut improved = false;
        for a in 0..clusters.len() {
            for b in a + 1..clusters.len() {
                for x in 0..clusters[a].len() {
                    for y in 0..clusters[b].len() {
                        let (mut ca, mut cb) = (clusters[a].clone(), clusters[b].clone());
                        core::mem::swap(&mut ca[x], &mut cb[y]);
                        let (na, nb) = (cluster_cost(gq, gk, d, &ca), cluster_cost(gq, gk, d, &cb));
                        if na + nb < (costs[a] + costs[b]) * (1.0 - 1e-12) {
                            clusters[a] = ca;
                            clusters[b] = cb;
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
