//! The error-budget planner: choose a group size per query head from
//! calibration data, so that DistrAttention is applied only where it is
//! harmless (an error target) or where it hurts least (a FLOP target).
//!
//! For every candidate G and head it measures the output error against
//! exact attention on each calibration sample (fast path, the config's
//! grouping mode) and keeps the worst case over samples and batch entries; it
//! also records the cheap estimate ([`crate::estimate_errors`], 16 sampled
//! rows) so the two can be compared.

use alloc::vec::Vec;

use crate::config::{Config, GroupSizes};
use crate::error::{Error, Operand, Result};
use crate::layout::{Problem, Tensor, TensorMut};
use crate::Element;

/// What the planner aims for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Every approximated head keeps its relative output error (relative
    /// Frobenius norm of the head's output against exact attention) at or
    /// below this on every calibration sample.
    MaxError(f64),
    /// Save at least this fraction of the attention FLOPs (`0..1`), raising
    /// G where the measured error grows least.
    FlopSaving(f64),
}

/// One query head's choice.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadChoice {
    pub head: usize,
    pub group_size: usize,
    /// Worst measured error over the calibration samples at `group_size`.
    pub measured_error: f64,
    /// Worst estimated error (16 sampled rows) at `group_size`.
    pub estimated_error: f64,
    /// `(G, worst measured error, worst estimated error)` for every candidate.
    pub candidates: Vec<(usize, f64, f64)>,
}

/// The planner's result for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetPlan {
    pub heads: Vec<HeadChoice>,
    /// Fraction of attention FLOPs saved: `1 - sum_h (d/G_h + dv) / (H (d + dv))`.
    pub flop_saving: f64,
    /// Whether the target was reached (a FLOP target can be out of reach).
    pub target_met: bool,
}

impl BudgetPlan {
    /// The chosen sizes, one per query head, for [`GroupSizes::PerHead`].
    pub fn group_sizes(&self) -> Vec<usize> {
        self.heads.iter().map(|h| h.group_size).collect()
    }
}

/// One calibration sample: Q, K, V of one layer on one input.
pub type Sample<'a, T> = (Tensor<'a, T>, Tensor<'a, T>, Tensor<'a, T>);

fn flop_saving(sizes: &[usize], d: usize, dv: usize) -> f64 {
    let full = sizes.len() as f64 * (d + dv) as f64;
    1.0 - sizes.iter().map(|&g| (d / g + dv) as f64).sum::<f64>() / full
}

/// Chooses G per query head among `candidates` (values of G; 1 is always
/// allowed) for the calibration `samples` of one layer, under `cfg`
/// (its group sizes are ignored; grouping mode, block rows, fusion, mask
/// and scale are used). All samples must have the same head counts and
/// head dimensions.
pub fn choose_group_sizes<T: Element>(
    cfg: &Config<'_>,
    candidates: &[usize],
    samples: &[Sample<'_, T>],
    target: Target,
) -> Result<BudgetPlan> {
    let first =
        samples.first().ok_or(Error::EmptyDimension { operand: Operand::Q, dim: crate::Dim::Batch })?;
    let p0 = Problem::new(&first.0.layout, &first.1.layout, &first.2.layout)?;
    let (hq, d, dv) = (p0.q_heads, p0.head_dim, p0.v_dim);
    match target {
        Target::MaxError(e) if !(e >= 0.0 && e.is_finite()) => return Err(Error::InvalidTarget { got: e }),
        Target::FlopSaving(f) if !(0.0..1.0).contains(&f) => return Err(Error::InvalidTarget { got: f }),
        _ => {}
    }
    let mut gs: Vec<usize> = candidates.iter().copied().filter(|&g| g > 1).collect();
    gs.sort_unstable();
    gs.dedup();
    for &g in &gs {
        Config { group_sizes: GroupSizes::Uniform(g), ..*cfg }.validate(hq, d)?;
    }
    // measured[c][h], estimated[c][h] for candidate c.
    let mut measured = alloc::vec![alloc::vec![0f64; hq]; gs.len()];
    let mut estimated = alloc::vec![alloc::vec![0f64; hq]; gs.len()];
    for (q, k, v) in samples {
        let p = Problem::new(&q.layout, &k.layout, &v.layout)?;
        if (p.q_heads, p.head_dim, p.v_dim) != (hq, d, dv) {
            return Err(Error::ShapeMismatch {
                operand: Operand::Q,
                dim: crate::Dim::Heads,
                expected: hq,
                got: p.q_heads,
            });
        }
        let o_layout = p.output_layout();
        let len = o_layout.num_elements(Operand::Output)?;
        let mut exact = crate::try_vec(len, 0f32, Operand::Output)?;
        let mut approx = crate::try_vec(len, 0f32, Operand::Output)?;
        crate::exact_attention(cfg, q, k, v, &mut TensorMut::new(&mut exact, o_layout), None)?;
        for (c, &g) in gs.iter().enumerate() {
            let gcfg = Config { group_sizes: GroupSizes::Uniform(g), ..*cfg };
            let plan = crate::plan_with_keys(&gcfg, q, k)?;
            crate::attention(
                &gcfg,
                &plan.as_ref(),
                q,
                k,
                v,
                &mut TensorMut::new(&mut approx, o_layout),
                None,
            )?;
            for b in 0..p.batch {
                for (h, worst) in measured[c].iter_mut().enumerate() {
                    let (mut num, mut den) = (0f64, 0f64);
                    for i in 0..p.q_len {
                        let o = o_layout.offset(b, i, h);
                        for (x, y) in approx[o..o + dv].iter().zip(&exact[o..o + dv]) {
                            num += (*x as f64 - *y as f64) * (*x as f64 - *y as f64);
                            den += *y as f64 * *y as f64;
                        }
                    }
                    let err = libm::sqrt(if den > 0.0 { num / den } else { num });
                    *worst = worst.max(err);
                }
            }
            for e in crate::estimate_errors(&gcfg, &plan.as_ref(), q, k, v, 16)? {
                estimated[c][e.head] = estimated[c][e.head].max(e.sampled_output_error);
            }
        }
    }
    // choice[h] = index into gs + 1 (0 = G of 1).
    let mut choice = alloc::vec![0usize; hq];
    let sizes = |choice: &[usize]| -> Vec<usize> {
        choice.iter().map(|&c| if c == 0 { 1 } else { gs[c - 1] }).collect()
    };
    let target_met = match target {
        Target::MaxError(e) => {
            for (h, ch) in choice.iter_mut().enumerate() {
                // The largest G whose error meets the target, and every smaller one too.
                *ch = (0..gs.len()).take_while(|&c| measured[c][h] <= e).count();
            }
            true
        }
        Target::FlopSaving(f) => loop {
            if flop_saving(&sizes(&choice), d, dv) >= f {
                break true;
            }
            // The step (one head to its next G) with the smallest resulting error.
            let step = (0..hq)
                .filter(|&h| choice[h] < gs.len())
                .min_by(|&a, &b| measured[choice[a]][a].total_cmp(&measured[choice[b]][b]).then(a.cmp(&b)));
            match step {
                Some(h) => choice[h] += 1,
                None => break false,
            }
        },
    };
    let sizes = sizes(&choice);
    let heads = (0..hq)
        .map(|h| {
            let c = choice[h];
            HeadChoice {
                head: h,
                group_size: sizes[h],
                measured_error: if c == 0 { 0.0 } else { measured[c - 1][h] },
                estimated_error: if c == 0 { 0.0 } else { estimated[c - 1][h] },
                candidates: gs
                    .iter()
                    .enumerate()
                    .map(|(i, &g)| (g, measured[i][h], estimated[i][h]))
                    .collect(),
            }
        })
        .collect();
    Ok(BudgetPlan { heads, flop_saving: flop_saving(&sizes, d, dv), target_met })
}
