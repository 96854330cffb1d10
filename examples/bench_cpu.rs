//! CPU benchmark: the fast path's exact attention against DistrAttention at
//! G = 2, 4, 8 (plan included, and shown separately), one thread, f32,
//! random inputs. Ratios are measured in the same run.
//!
//! ```text
//! cargo run --release --example bench_cpu [-- --quick]
//! ```

use std::time::{Duration, Instant};

use distr_attention::{
    attention, exact_attention, plan, plan_with_keys, Config, GroupingMode, Layout, Tensor, TensorMut,
};

/// Median of `reps` timings of `f`, after one warm-up call.
fn time(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[reps / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (heads, reps) = if quick { (1, 3) } else { (2, 5) };
    let ns: &[usize] = if quick { &[512] } else { &[512, 2048] };
    println!("CPU fast path, 1 thread, f32, batch 1, {heads} heads, l=64, P=16, Mean; median of {reps} runs");
    println!("| N | d | exact (ms) | G | plan (ms) | attention (ms) | total (ms) | speed-up vs exact | FLOP bound |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rand = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for &n in ns {
        for d in [64usize, 128] {
            let layout = Layout::contiguous(1, n, heads, d);
            let len = n * heads * d;
            let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..len).map(|_| rand()).collect(),
                (0..len).map(|_| rand()).collect(),
                (0..len).map(|_| rand()).collect(),
            );
            let (tq, tk, tv) = (Tensor::new(&q, layout), Tensor::new(&k, layout), Tensor::new(&v, layout));
            let mut o = vec![0f32; len];
            let exact = time(reps, || {
                exact_attention(&Config::exact(), &tq, &tk, &tv, &mut TensorMut::new(&mut o, layout), None)
                    .unwrap()
            });
            for g in [2usize, 4, 8] {
                let cfg = Config::with_group_size(g);
                let t_plan = time(reps, || {
                    plan(&cfg, &tq).unwrap();
                });
                let p = plan(&cfg, &tq).unwrap();
                let t_attn = time(reps, || {
                    attention(&cfg, &p.as_ref(), &tq, &tk, &tv, &mut TensorMut::new(&mut o, layout), None)
                        .unwrap()
                });
                let total = t_plan + t_attn;
                let ms = |t: Duration| t.as_secs_f64() * 1e3;
                println!(
                    "| {n} | {d} | {:.2} | {g} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
                    ms(exact),
                    ms(t_plan),
                    ms(t_attn),
                    ms(total),
                    exact.as_secs_f64() / total.as_secs_f64(),
                    2.0 / (1.0 + 1.0 / g as f64)
                );
            }
        }
    }
    // All cores: the multi-threaded path on the largest shape.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (n, d) = (*ns.last().unwrap_or(&512), 128);
    let layout = Layout::contiguous(1, n, 2 * heads, d);
    let len = n * 2 * heads * d;
    let x: Vec<f32> = (0..len).map(|_| rand()).collect();
    let t = Tensor::new(&x, layout);
    let mut o = vec![0f32; len];
    let cfg = Config::with_group_size(2);
    let p = plan(&cfg, &t).unwrap();
    let one = time(reps, || {
        attention(&cfg, &p.as_ref(), &t, &t, &t, &mut TensorMut::new(&mut o, layout), None).unwrap()
    });
    let all = time(reps, || {
        distr_attention::parallel::attention(
            &cfg,
            &p.as_ref(),
            &t,
            &t,
            &t,
            &mut TensorMut::new(&mut o, layout),
            None,
            0,
        )
        .unwrap()
    });
    println!(
        "\nG=2, N={n}, d={d}, {} heads: 1 thread {:.2} ms, {threads} threads (parallel::attention) {:.2} ms ({:.2}x)",
        2 * heads,
        one.as_secs_f64() * 1e3,
        all.as_secs_f64() * 1e3,
        one.as_secs_f64() / all.as_secs_f64()
    );

    // Plan cost of each grouping mode (G = 2) next to one exact attention call.
    println!(
        "\n| N | d | exact attention (ms) | LSH plan (ms) | Similarity plan (ms) | KeyWeighted plan (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    for &n in ns {
        for d in [64usize, 128] {
            let layout = Layout::contiguous(1, n, heads, d);
            let len = n * heads * d;
            let (q, k): (Vec<f32>, Vec<f32>) =
                ((0..len).map(|_| rand()).collect(), (0..len).map(|_| rand()).collect());
            let (tq, tk) = (Tensor::new(&q, layout), Tensor::new(&k, layout));
            let mut o = vec![0f32; len];
            let exact = time(reps, || {
                exact_attention(&Config::exact(), &tq, &tk, &tk, &mut TensorMut::new(&mut o, layout), None)
                    .unwrap()
            });
            let mut cells = Vec::new();
            for mode in [GroupingMode::Lsh, GroupingMode::Similarity, GroupingMode::KeyWeighted] {
                let cfg = Config { grouping: mode, ..Config::with_group_size(2) };
                let t = time(reps, || {
                    plan_with_keys(&cfg, &tq, &tk).unwrap();
                });
                cells.push(format!("{:.2}", t.as_secs_f64() * 1e3));
            }
            println!("| {n} | {d} | {:.2} | {} |", exact.as_secs_f64() * 1e3, cells.join(" | "));
        }
    }
}
