//! The error-budget planner as a command (the main job's companion): from
//! calibration activations, choose a group size per query head of every
//! layer and write the table as JSON.
//!
//! ```text
//! cargo run --release --example plan_heads -- [FILE ...] (--target-error E | --target-flops F)
//!     [--grouping lsh|similarity|key-weighted] [--candidates 2,4,8] [--block-rows L] [--out FILE.json]
//! ```
//! Samples are grouped into layers by the tensor-name prefix before `.seq`
//! (`layer3.seq0`, `layer3.seq1` calibrate `layer3`). Without files the two
//! bundled fixtures are used.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use distr_attention::activations::{bundled_files, Activations};
use distr_attention::budget::{choose_group_sizes, BudgetPlan, Target};
use distr_attention::{Config, GroupingMode, Tensor};

struct Options {
    files: Vec<PathBuf>,
    target: Target,
    grouping: GroupingMode,
    candidates: Vec<usize>,
    block_rows: usize,
    out: Option<PathBuf>,
}

fn parse_grouping(s: &str) -> Result<GroupingMode, String> {
    match s {
        "lsh" => Ok(GroupingMode::Lsh),
        "similarity" => Ok(GroupingMode::Similarity),
        "key-weighted" => Ok(GroupingMode::KeyWeighted),
        _ => Err(format!("unknown grouping {s} (lsh, similarity, key-weighted)")),
    }
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        files: Vec::new(),
        target: Target::MaxError(0.1),
        grouping: GroupingMode::Similarity,
        candidates: vec![2, 4, 8],
        block_rows: 64,
        out: None,
    };
    let mut target = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--target-error" => {
                target = Some(Target::MaxError(value()?.parse().map_err(|e| format!("{e}"))?))
            }
            "--target-flops" => {
                target = Some(Target::FlopSaving(value()?.parse().map_err(|e| format!("{e}"))?))
            }
            "--grouping" => o.grouping = parse_grouping(&value()?)?,
            "--candidates" => {
                o.candidates = value()?
                    .split(',')
                    .map(|g| g.trim().parse().map_err(|e| format!("--candidates: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--block-rows" => o.block_rows = value()?.parse().map_err(|e| format!("--block-rows: {e}"))?,
            "--out" => o.out = Some(value()?.into()),
            "-h" | "--help" => return Err(String::new()),
            f if f.starts_with('-') => return Err(format!("unknown option {f}")),
            f => o.files.push(f.into()),
        }
    }
    o.target = target.ok_or("give --target-error E or --target-flops F")?;
    if o.files.is_empty() {
        o.files = bundled_files();
    }
    Ok(o)
}

/// Plans every layer of one file.
fn plan_file(opts: &Options, acts: &Activations) -> Result<Vec<(String, BudgetPlan)>, String> {
    let cfg = Config {
        block_rows: opts.block_rows,
        causal: acts.causal,
        grouping: opts.grouping,
        ..Config::exact()
    };
    // Layers in file order (the loader sorts names naturally: layer7 before layer13).
    let mut layers: Vec<(String, Vec<_>)> = Vec::new();
    for s in &acts.samples {
        let layer = s.name.split(".seq").next().unwrap_or(&s.name).to_string();
        match layers.iter_mut().find(|(l, _)| *l == layer) {
            Some((_, v)) => v.push(s),
            None => layers.push((layer, vec![s])),
        }
    }
    let mut out = Vec::new();
    for (layer, samples) in layers {
        let tensors: Vec<_> = samples
            .iter()
            .map(|s| {
                (Tensor::new(&s.q, s.q_layout), Tensor::new(&s.k, s.k_layout), Tensor::new(&s.v, s.v_layout))
            })
            .collect();
        let plan = choose_group_sizes(&cfg, &opts.candidates, &tensors, opts.target)
            .map_err(|e| format!("{layer}: {e}"))?;
        out.push((layer, plan));
    }
    Ok(out)
}

fn json(opts: &Options, files: &[(PathBuf, Vec<(String, BudgetPlan)>)]) -> String {
    let mut j = String::from("{\n");
    let target = match opts.target {
        Target::MaxError(e) => format!("{{\"max_error\": {e}}}"),
        Target::FlopSaving(f) => format!("{{\"flop_saving\": {f}}}"),
    };
    let _ = writeln!(j, "  \"target\": {target},");
    let _ = writeln!(j, "  \"grouping\": \"{:?}\",", opts.grouping);
    let _ = writeln!(j, "  \"block_rows\": {},", opts.block_rows);
    j.push_str("  \"files\": [\n");
    for (fi, (path, layers)) in files.iter().enumerate() {
        let _ = writeln!(j, "    {{\"file\": {:?}, \"layers\": [", path.display().to_string());
        for (li, (layer, plan)) in layers.iter().enumerate() {
            let sizes: Vec<String> = plan.heads.iter().map(|h| h.group_size.to_string()).collect();
            let _ = write!(
                j,
                "      {{\"layer\": {layer:?}, \"group_sizes\": [{}], \"flop_saving\": {:.4}, \"target_met\": {}, \"heads\": [",
                sizes.join(", "),
                plan.flop_saving,
                plan.target_met
            );
            for (hi, h) in plan.heads.iter().enumerate() {
                let _ = write!(
                    j,
                    "{}{{\"head\": {}, \"group_size\": {}, \"measured_error\": {:.5}, \"estimated_error\": {:.5}}}",
                    if hi > 0 { ", " } else { "" },
                    h.head,
                    h.group_size,
                    h.measured_error,
                    h.estimated_error
                );
            }
            let _ = writeln!(j, "]}}{}", if li + 1 < layers.len() { "," } else { "" });
        }
        let _ = writeln!(j, "    ]}}{}", if fi + 1 < files.len() { "," } else { "" });
    }
    j.push_str("  ]\n}\n");
    j
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!("usage: plan_heads [FILE ...] (--target-error E | --target-flops F) [--grouping lsh|similarity|key-weighted] [--candidates 2,4,8] [--block-rows L] [--out FILE.json]");
            return ExitCode::from(2);
        }
    };
    let mut results = Vec::new();
    for path in &opts.files {
        let r = Activations::load(path, None).map_err(|e| e.to_string()).and_then(|a| plan_file(&opts, &a));
        match r {
            Ok(layers) => {
                println!("{} ({:?} grouping, target {:?})", path.display(), opts.grouping, opts.target);
                println!(
                    "| layer | G per head | FLOP saving | worst measured error | worst estimated error |"
                );
                println!("|---|---|---|---|---|");
                for (layer, plan) in &layers {
                    let worst = |f: fn(&distr_attention::budget::HeadChoice) -> f64| {
                        plan.heads.iter().map(f).fold(0.0, f64::max)
                    };
                    println!(
                        "| {layer} | {:?} | {:.1}% | {:.3} | {:.3} |",
                        plan.group_sizes(),
                        100.0 * plan.flop_saving,
                        worst(|h| h.measured_error),
                        worst(|h| h.estimated_error)
                    );
                }
                results.push((path.clone(), layers));
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(out) = &opts.out {
        if let Err(e) = std::fs::write(out, json(&opts, &results)) {
            eprintln!("error: {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", out.display());
    }
    ExitCode::SUCCESS
}
