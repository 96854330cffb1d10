//! Multi-threaded CPU attention: the core's fast path run on independent
//! (batch, KV-head group) units in scoped threads. Each unit is a view of
//! one batch entry and the query heads that share one KV head, so its plan
//! is a contiguous slice of the whole plan; it computes into a private
//! dense buffer that is then copied into the caller's output, and writes its
//! own disjoint range of the log-sum-exp. Results are bitwise equal to the
//! single-threaded call.

use std::num::NonZeroUsize;
use std::thread;

use distr_attention_core::{
    attention_into, attention_scratch_len, exact_attention_into, validate_attention, Config, Element, Error,
    GroupSizes, Layout, Operand, PlanRef, PlanShape, Result, Tensor, TensorMut,
};

/// One unit of work: its index, its slice of the log-sum-exp, its output buffer.
type Unit<'o> = (usize, Option<&'o mut [f32]>, &'o mut [f32]);

/// Number of threads to use: `threads`, or the machine's parallelism if 0.
fn thread_count(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        thread::available_parallelism().map_or(1, NonZeroUsize::get)
    }
}

/// A view of heads `h0 .. h0 + heads` of batch entry `b`.
fn sub_view<'a, T>(t: &Tensor<'a, T>, b: usize, h0: usize, heads: usize) -> Tensor<'a, T> {
    let start = b * t.layout.stride_batch + h0 * t.layout.stride_head;
    Tensor::new(&t.data[start..], Layout { batch: 1, heads, ..t.layout })
}

/// DistrAttention on a plan with `threads` threads (0 = all cores).
/// Same contract and results as [`distr_attention_core::attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention<T: Element>(
    cfg: &Config<'_>,
    plan: &PlanRef<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
    threads: usize,
) -> Result<()> {
    run(cfg, Some(plan), q, k, v, out, lse, threads)
}

/// Exact attention with `threads` threads (0 = all cores).
pub fn exact_attention<T: Element>(
    cfg: &Config<'_>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
    threads: usize,
) -> Result<()> {
    run(cfg, None, q, k, v, out, lse, threads)
}

#[allow(clippy::too_many_arguments)]
fn run<T: Element>(
    cfg: &Config<'_>,
    plan: Option<&PlanRef<'_>>,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut [f32]>,
    threads: usize,
) -> Result<()> {
    // Validate the whole call first (cheap), so a bad argument is reported
    // exactly as by the single-threaded call and nothing is written.
    let p = validate_attention(cfg, plan, q, k, v, out, lse.as_deref())?;
    let r = p.q_heads / p.kv_heads;
    let units = p.batch * p.kv_heads;
    let threads = thread_count(threads).min(units);
    let sizes: Vec<usize> = (0..p.q_heads).map(|h| cfg.group_size(h)).collect();
    let unit_cfg =
        |hk: usize| Config { group_sizes: GroupSizes::PerHead(&sizes[hk * r..(hk + 1) * r]), ..*cfg };
    // One unit: batch b, KV head hk, query heads hk*r .. (hk+1)*r.
    let compute = |unit: usize, lse: Option<&mut [f32]>, o: &mut [f32], scratch: &mut [f32]| -> Result<()> {
        let (b, hk) = (unit / p.kv_heads, unit % p.kv_heads);
        let (uq, uk, uv) = (sub_view(q, b, hk * r, r), sub_view(k, b, hk, 1), sub_view(v, b, hk, 1));
        let o_layout = Layout::contiguous(1, p.q_len, r, p.v_dim);
        let mut uo = TensorMut::new(o, o_layout);
        let ucfg = unit_cfg(hk);
        match plan {
            Some(plan) => {
                let s = plan.shape();
                let shape = PlanShape { batch: 1, heads: r, ..s };
                let start = s.block_index(b, hk * r, 0) * s.head_dim;
                let sub = PlanRef::new(shape, &plan.as_slice()[start..start + shape.num_entries()?])?;
                attention_into(&ucfg, &sub, &uq, &uk, &uv, &mut uo, lse, scratch)
            }
            None => exact_attention_into(&ucfg, &uq, &uk, &uv, &mut uo, lse, scratch),
        }
    };
    let unit_out = p.q_len * r * p.v_dim;
    let unit_lse = p.q_len * r;
    let mut lse_parts: Vec<Option<&mut [f32]>> = match lse {
        Some(l) => l[..p.lse_len()?].chunks_mut(unit_lse).map(Some).collect(),
        None => (0..units).map(|_| None).collect(),
    };
    let total = units * unit_out;
    let mut outputs = Vec::new();
    outputs
        .try_reserve_exact(total)
        .map_err(|_| Error::AllocationFailed { operand: Operand::Output, len: total })?;
    outputs.resize(total, 0f32);
    let scratch_len = attention_scratch_len(p.head_dim, p.v_dim)?;
    let results: Vec<Result<()>> = thread::scope(|scope| {
        let mut work: Vec<Vec<Unit<'_>>> = (0..threads).map(|_| Vec::new()).collect();
        for (unit, (l, o)) in lse_parts.iter_mut().zip(outputs.chunks_mut(unit_out)).enumerate() {
            work[unit % threads].push((unit, l.take(), o));
        }
        let handles: Vec<_> = work
            .into_iter()
            .map(|items| {
                scope.spawn(move || -> Result<()> {
                    let mut scratch = Vec::new();
                    scratch.try_reserve_exact(scratch_len).map_err(|_| Error::AllocationFailed {
                        operand: Operand::Scratch,
                        len: scratch_len,
                    })?;
                    scratch.resize(scratch_len, 0f32);
                    for (unit, l, o) in items {
                        compute(unit, l, o, &mut scratch)?;
                    }
                    Ok(())
                })
            })
            .collect();
        // A panic in a worker is a bug; pass it on rather than hide it.
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    for r in results {
        r?;
    }
    // Scatter the dense unit outputs into the caller's layout.
    for unit in 0..units {
        let (b, hk) = (unit / p.kv_heads, unit % p.kv_heads);
        let src = &outputs[unit * unit_out..(unit + 1) * unit_out];
        for i in 0..p.q_len {
            for j in 0..r {
                let dst = out.layout.offset(b, i, hk * r + j);
                let from = (i * r + j) * p.v_dim;
                out.data[dst..dst + p.v_dim].copy_from_slice(&src[from..from + p.v_dim]);
            }
        }
    }
    Ok(())
}
