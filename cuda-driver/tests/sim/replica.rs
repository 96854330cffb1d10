//! An instrumented f64 copy of the core's similarity grouping
//! (`core/src/grouping.rs`, `similarity_groups` and `refine`), used to tell
//! whether a block where the GPU plan differs from the CPU plan had a
//! near-tie on the CPU's path. It must reproduce the core's plan exactly
//! (checked by a test), and it records for every decision the CPU took how
//! close it was:
//!
//! * greedy rounds: for every pair (a, b) taken, the gap between its added
//!   cost and that of every other pair it beat for a or b (pairs (a, x) and
//!   (b, x) with x still free when (a, b) was taken);
//! * refinement: for every swap evaluated, `|(na + nb) - (ca + cb)|`.
//!
//! Gaps are divided by a local scale: the summed Gram diagonals of the
//! columns involved (for key-weighted costs, the product of the Q and K
//! diagonal sums). If every gap exceeds the GPU's rounding error, the f32 GPU
//! plan takes the same decisions and equals the CPU plan.
#![allow(dead_code)]

use distr_attention::{Config, Element, GroupingMode, Layout};

/// How close the CPU's decisions in one block came to a tie.
#[derive(Clone, Copy, Debug)]
pub struct Margins {
    /// Smallest relative gap of a greedy decision.
    pub greedy: f64,
    /// Smallest relative gap of a refinement decision.
    pub refine: f64,
    /// Refinement passes run and swaps accepted.
    pub passes: usize,
    pub swaps: usize,
}

impl Margins {
    pub fn min(&self) -> f64 {
        self.greedy.min(self.refine)
    }
}

/// The core's Gram of `rows` rows (f64, row order, from the f32-rounded values).
pub fn gram(d: usize, rows: usize, row: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    let mut buf = vec![0f64; d];
    for r in 0..rows {
        for (j, x) in buf.iter_mut().enumerate() {
            *x = row(r, j);
        }
        for (j, &x) in buf.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            for (o, &y) in out[j * d..(j + 1) * d].iter_mut().zip(&buf) {
                *o += x * y;
            }
        }
    }
    out
}

pub fn query_gram<T: Element>(q: &[T], l: &Layout, b: usize, h: usize, row0: usize, rows: usize) -> Vec<f64> {
    gram(l.dim, rows, |r, j| q[l.offset(b, row0 + r, h) + j].to_f32() as f64)
}

/// The core's centred key Gram of KV head `hk`.
pub fn key_gram<T: Element>(k: &[T], l: &Layout, b: usize, hk: usize) -> Vec<f64> {
    let d = l.dim;
    let mut mean = vec![0f64; d];
    for n in 0..l.seq {
        for (acc, x) in mean.iter_mut().zip(&k[l.offset(b, n, hk)..][..d]) {
            *acc += x.to_f32() as f64;
        }
    }
    for x in mean.iter_mut() {
        *x /= l.seq as f64;
    }
    gram(d, l.seq, |n, j| k[l.offset(b, n, hk) + j].to_f32() as f64 - mean[j])
}

fn cluster_cost(gq: &[f64], gk: Option<&[f64]>, d: usize, members: &[u16]) -> f64 {
    let s = members.len() as f64;
    let at = |g: &[f64], x: u16, y: u16| g[x as usize * d + y as usize];
    let r: Vec<f64> =
        members.iter().map(|&j| members.iter().map(|&a| at(gq, a, j)).sum::<f64>() / s).collect();
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

fn group_cost(gq: &[f64], gk: Option<&[f64]>, d: usize, members: &[u16]) -> f64 {
    match *members {
        [a, b] => pair_cost(gq, gk, d, a, b),
        _ => cluster_cost(gq, gk, d, members),
    }
}

/// Scale of a decision about the columns `cols`.
fn scale(gq: &[f64], gk: Option<&[f64]>, d: usize, cols: impl Iterator<Item = u16> + Clone) -> f64 {
    let sq: f64 = cols.clone().map(|j| gq[j as usize * (d + 1)]).sum();
    match gk {
        None => sq,
        Some(gk) => sq * cols.map(|j| gk[j as usize * (d + 1)]).sum::<f64>(),
    }
}

/// The core's grouping of one block, with its margins.
pub fn similarity_groups(gq: &[f64], gk: Option<&[f64]>, d: usize, g: usize) -> (Vec<u16>, Margins) {
    let mut margins = Margins { greedy: f64::INFINITY, refine: f64::INFINITY, passes: 0, swaps: 0 };
    let mut cur: Vec<u16> = (0..d as u16).collect();
    let mut size = 1;
    while size < g {
        let n = d / size;
        let costs: Vec<f64> = cur.chunks(size).map(|c| group_cost(gq, gk, d, c)).collect();
        let mut delta = vec![0f64; n * n];
        let mut pairs = Vec::with_capacity(n * (n - 1) / 2);
        for a in 0..n {
            for b in a + 1..n {
                let mut m = cur[a * size..(a + 1) * size].to_vec();
                m.extend_from_slice(&cur[b * size..(b + 1) * size]);
                let dl = group_cost(gq, gk, d, &m) - costs[a] - costs[b];
                delta[a * n + b] = dl;
                delta[b * n + a] = dl;
                pairs.push((dl, a as u32, b as u32));
            }
        }
        pairs.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let mut taken = vec![false; n];
        let mut next = Vec::with_capacity(d);
        let members = |i: usize| cur[i * size..(i + 1) * size].iter().copied();
        for (dl, a, b) in pairs {
            let (a, b) = (a as usize, b as usize);
            if !taken[a] && !taken[b] {
                // Every pair (a, x) or (b, x) with x free lost to (a, b).
                for x in (0..n).filter(|&x| !taken[x] && x != a && x != b) {
                    for (y, other) in [(a, delta[a * n + x]), (b, delta[b * n + x])] {
                        let s = scale(gq, gk, d, members(y).chain(members(x)).chain(members(a + b - y)));
                        margins.greedy = margins.greedy.min((other - dl).abs() / s);
                    }
                }
                taken[a] = true;
                taken[b] = true;
                next.extend(members(a));
                next.extend(members(b));
            }
        }
        size *= 2;
        let mut groups: Vec<&[u16]> = next.chunks(size).collect();
        groups.sort_by_key(|c| c.iter().copied().min());
        cur = groups.concat();
    }
    if g >= 2 {
        let n = d / g;
        let mut costs: Vec<f64> = cur.chunks(g).map(|c| group_cost(gq, gk, d, c)).collect();
        for _ in 0..8 {
            margins.passes += 1;
            let mut improved = false;
            for a in 0..n {
                for b in a + 1..n {
                    for x in 0..g {
                        for y in 0..g {
                            let mut ga = cur[a * g..(a + 1) * g].to_vec();
                            let mut gb = cur[b * g..(b + 1) * g].to_vec();
                            std::mem::swap(&mut ga[x], &mut gb[y]);
                            let (na, nb) = (group_cost(gq, gk, d, &ga), group_cost(gq, gk, d, &gb));
                            let s = scale(gq, gk, d, ga.iter().chain(&gb).copied());
                            margins.refine = margins.refine.min((na + nb - (costs[a] + costs[b])).abs() / s);
                            if na + nb < (costs[a] + costs[b]) * (1.0 - 1e-12) {
                                cur[a * g..(a + 1) * g].copy_from_slice(&ga);
                                cur[b * g..(b + 1) * g].copy_from_slice(&gb);
                                costs[a] = na;
                                costs[b] = nb;
                                improved = true;
                                margins.swaps += 1;
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
    (cur, margins)
}

/// The plan of every block (as the core's `plan`/`plan_with_keys` for the
/// similarity modes) and each block's margins, `[batch][heads][blocks]`.
pub fn plan<T: Element>(
    cfg: &Config<'_>,
    q: &[T],
    ql: &Layout,
    k: Option<(&[T], &Layout)>,
) -> (Vec<u16>, Vec<Margins>) {
    let d = ql.dim;
    let blocks = ql.seq.div_ceil(cfg.block_rows);
    let mut perm = Vec::new();
    let mut margins = Vec::new();
    for b in 0..ql.batch {
        for h in 0..ql.heads {
            let g = cfg.group_size(h);
            let gk = match (cfg.grouping, k) {
                (GroupingMode::KeyWeighted, Some((k, kl))) => {
                    Some(key_gram(k, kl, b, h / (ql.heads / kl.heads)))
                }
                _ => None,
            };
            for blk in 0..blocks {
                if g == 1 {
                    perm.extend(0..d as u16);
                    margins.push(Margins {
                        greedy: f64::INFINITY,
                        refine: f64::INFINITY,
                        passes: 0,
                        swaps: 0,
                    });
                    continue;
                }
                let row0 = blk * cfg.block_rows;
                let gq = query_gram(q, ql, b, h, row0, (ql.seq - row0).min(cfg.block_rows));
                let (p, m) = similarity_groups(&gq, gk.as_deref(), d, g);
                perm.extend(p);
                margins.push(m);
            }
        }
    }
    (perm, margins)
}
