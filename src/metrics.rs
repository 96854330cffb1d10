//! Error measures used by the evaluation, the tests and the benchmarks.

use distr_attention_core::Layout;

/// Relative Frobenius error `||out - exact|| / ||exact||` of every
/// (batch, head) slice of two tensors of the same layout, batch-major.
pub fn head_relative_errors(out: &[f32], exact: &[f32], layout: &Layout) -> Vec<f64> {
    let mut errs = Vec::with_capacity(layout.batch * layout.heads);
    for b in 0..layout.batch {
        for h in 0..layout.heads {
            let (mut num, mut den) = (0f64, 0f64);
            for s in 0..layout.seq {
                let o = layout.offset(b, s, h);
                for j in o..o + layout.dim {
                    let e = exact[j] as f64;
                    num += (out[j] as f64 - e).powi(2);
                    den += e * e;
                }
            }
            errs.push(if den > 0.0 { (num / den).sqrt() } else { num.sqrt() });
        }
    }
    errs
}

/// Relative Frobenius error of two whole buffers.
pub fn relative_error(out: &[f32], exact: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&o, &e) in out.iter().zip(exact) {
        num += (o as f64 - e as f64).powi(2);
        den += (e as f64).powi(2);
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

/// The `p`-quantile (0..=1) of `xs` by linear interpolation; NaN if empty.
pub fn quantile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = p.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

pub fn median(xs: &[f64]) -> f64 {
    quantile(xs, 0.5)
}
