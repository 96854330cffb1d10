//! The main job: DistrAttention's accuracy and CPU speed on real activations.
//!
//! ```text
//! cargo run --release --example evaluate                 # the two bundled files
//! cargo run --release --example evaluate -- FILE ...     # your own safetensors files
//! options: --causal | --no-causal (override the file's metadata),
//!          --block-rows L (64), --projections P (16), --seed S (0)
//! ```
//! For each file and each G in {1, 2, 4, 8} dividing the head dimension and
//! each fusion, prints the relative Frobenius error of every head's output
//! against the exact output (median and 90th percentile over
//! layer x sequence x head) and the fast CPU path's time, plan included,
//! with its speed-up over the exact fast path measured in the same run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use distr_attention::activations::{bundled_files, Activations, Sample};
use distr_attention::metrics::{head_relative_errors, median, quantile};
use distr_attention::{distr_attention, exact_attention, Config, Fusion, GroupSizes, Tensor, TensorMut};

struct Options {
    files: Vec<PathBuf>,
    causal: Option<bool>,
    block_rows: usize,
    projections: u32,
    seed: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options { files: Vec::new(), causal: None, block_rows: 64, projections: 16, seed: 0 };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--causal" => o.causal = Some(true),
            "--no-causal" => o.causal = Some(false),
            "--block-rows" => o.block_rows = value(&a)?.parse().map_err(|e| format!("--block-rows: {e}"))?,
            "--projections" => {
                o.projections = value(&a)?.parse().map_err(|e| format!("--projections: {e}"))?
            }
            "--seed" => o.seed = value(&a)?.parse().map_err(|e| format!("--seed: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            f if f.starts_with('-') => return Err(format!("unknown option {f}")),
            f => o.files.push(f.into()),
        }
    }
    if o.files.is_empty() {
        o.files = bundled_files();
    }
    Ok(o)
}

/// Output of one sample under `cfg` (exact when `exact`), and the time taken.
fn run(cfg: &Config<'_>, s: &Sample, exact: bool) -> Result<(Vec<f32>, Duration), distr_attention::Error> {
    let (q, k, v) =
        (Tensor::new(&s.q, s.q_layout), Tensor::new(&s.k, s.k_layout), Tensor::new(&s.v, s.v_layout));
    let o_layout = distr_attention::Problem::new(&s.q_layout, &s.k_layout, &s.v_layout)?.output_layout();
    let mut o = vec![0f32; o_layout.num_elements(distr_attention::Operand::Output)?];
    let start = Instant::now();
    let mut out = TensorMut::new(&mut o, o_layout);
    if exact {
        exact_attention(cfg, &q, &k, &v, &mut out, None)?;
    } else {
        distr_attention(cfg, &q, &k, &v, &mut out, None)?;
    }
    Ok((o, start.elapsed()))
}

fn evaluate(opts: &Options, acts: &Activations) -> Result<(), distr_attention::Error> {
    let d = acts.samples[0].q_layout.dim;
    let base = Config {
        block_rows: opts.block_rows,
        num_projections: opts.projections,
        seed: opts.seed,
        causal: acts.causal,
        ..Config::exact()
    };
    // Reference outputs: the file's o_exact, or the exact path's output.
    let mut exact_time = Duration::MAX;
    let mut references = Vec::new();
    for rep in 0..3 {
        let mut total = Duration::ZERO;
        for s in &acts.samples {
            let (o, t) = run(&base, s, true)?;
            total += t;
            if rep == 0 {
                references.push(s.o_exact.clone().unwrap_or(o));
            }
        }
        exact_time = exact_time.min(total);
    }
    let from_file = acts.samples.iter().all(|s| s.o_exact.is_some());
    println!(
        "\n{} ({} layer x sequence samples, head_dim {d}, causal {}, l={}, P={}, seed {}; errors against {})",
        acts.path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(&acts.path).display(),
        acts.samples.len(),
        acts.causal,
        opts.block_rows,
        opts.projections,
        opts.seed,
        if from_file { "the file's o_exact" } else { "the exact fast path" }
    );
    println!("| G | fusion | median rel. error | p90 rel. error | CPU time (ms) | speed-up vs exact |");
    println!("|---|---|---|---|---|---|");
    for g in [1usize, 2, 4, 8].into_iter().filter(|g| d.is_multiple_of(*g)) {
        let fusions: &[Fusion] = if g == 1 { &[Fusion::Mean] } else { &[Fusion::Mean, Fusion::Sample] };
        for &fusion in fusions {
            let cfg = Config { group_sizes: GroupSizes::Uniform(g), fusion, ..base };
            let mut errs = Vec::new();
            let mut best = Duration::MAX;
            for rep in 0..3 {
                let mut total = Duration::ZERO;
                for (s, reference) in acts.samples.iter().zip(&references) {
                    let (o, t) = run(&cfg, s, g == 1)?;
                    total += t;
                    if rep == 0 {
                        let layout = distr_attention::Problem::new(&s.q_layout, &s.k_layout, &s.v_layout)?
                            .output_layout();
                        errs.extend(head_relative_errors(&o, reference, &layout));
                    }
                }
                best = best.min(total);
            }
            let err = |e: f64| if e < 1e-3 { format!("{e:.1e}") } else { format!("{e:.4}") };
            println!(
                "| {g} | {} | {} | {} | {:.2} | {:.2}x |",
                if g == 1 { "exact".to_string() } else { format!("{fusion:?}") },
                err(median(&errs)),
                err(quantile(&errs, 0.9)),
                best.as_secs_f64() * 1e3,
                exact_time.as_secs_f64() / best.as_secs_f64()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!("usage: evaluate [FILE.safetensors ...] [--causal|--no-causal] [--block-rows L] [--projections P] [--seed S]");
            return ExitCode::from(2);
        }
    };
    println!(
        "DistrAttention on real activations: relative Frobenius error per head, fast CPU path (1 thread)."
    );
    for path in &opts.files {
        let result = Activations::load(path, opts.causal)
            .map_err(|e| e.to_string())
            .and_then(|acts| evaluate(&opts, &acts).map_err(|e| format!("{}: {e}", path.display())));
        if let Err(e) = result {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
