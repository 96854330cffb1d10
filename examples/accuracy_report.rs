//! Generates the accuracy tables of the README: the error of every grouping
//! mode and G on both bundled fixtures, and the planner's FLOP saving at
//! error targets 0.05, 0.1 and 0.2 (calibrated per layer on the file's own
//! sequences, so the targets hold on that data by construction).
//!
//! ```text
//! cargo run --release --example accuracy_report
//! ```

use distr_attention::activations::{bundled_files, Activations};
use distr_attention::budget::{choose_group_sizes, Target};
use distr_attention::metrics::{head_relative_errors, median, quantile};
use distr_attention::{
    attention, plan_with_keys, Config, GroupSizes, GroupingMode, Problem, Tensor, TensorMut,
};

const MODES: [GroupingMode; 3] = [GroupingMode::Lsh, GroupingMode::Similarity, GroupingMode::KeyWeighted];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<Activations> =
        bundled_files().iter().map(|f| Activations::load(f, None)).collect::<Result<_, _>>()?;
    let name =
        |a: &Activations| a.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();

    println!("Relative output error per head (median / p90 over layer x sequence x head), l=64, P=16, Mean fusion:\n");
    println!("| data | G | LSH (paper) | Similarity | KeyWeighted |");
    println!("|---|---|---|---|---|");
    for acts in &files {
        for g in [2usize, 4, 8] {
            let mut cells = Vec::new();
            for mode in MODES {
                let cfg = Config {
                    causal: acts.causal,
                    grouping: mode,
                    group_sizes: GroupSizes::Uniform(g),
                    ..Config::default()
                };
                let mut errs = Vec::new();
                for s in &acts.samples {
                    let (q, k, v) = (
                        Tensor::new(&s.q, s.q_layout),
                        Tensor::new(&s.k, s.k_layout),
                        Tensor::new(&s.v, s.v_layout),
                    );
                    let lay = Problem::new(&s.q_layout, &s.k_layout, &s.v_layout)?.output_layout();
                    let mut o = vec![0f32; lay.num_elements(distr_attention::Operand::Output)?];
                    let plan = plan_with_keys(&cfg, &q, &k)?;
                    attention(&cfg, &plan.as_ref(), &q, &k, &v, &mut TensorMut::new(&mut o, lay), None)?;
                    errs.extend(head_relative_errors(
                        &o,
                        s.o_exact.as_ref().ok_or("fixture without o_exact")?,
                        &lay,
                    ));
                }
                cells.push(format!("{:.3} / {:.3}", median(&errs), quantile(&errs, 0.9)));
            }
            println!("| {} | {g} | {} |", name(acts), cells.join(" | "));
        }
    }

    println!(
        "\nPlanner (candidates G = 2, 4, 8; per layer; mean over layers of the attention FLOPs saved):\n"
    );
    println!("| data | error target | LSH | Similarity | KeyWeighted |");
    println!("|---|---|---|---|---|");
    for acts in &files {
        for target in [0.05, 0.1, 0.2, 0.3, 0.5] {
            let mut cells = Vec::new();
            for mode in MODES {
                let cfg = Config { causal: acts.causal, grouping: mode, ..Config::exact() };
                let mut layers: Vec<(String, Vec<_>)> = Vec::new();
                for s in &acts.samples {
                    let layer = s.name.split(".seq").next().unwrap_or(&s.name).to_string();
                    let t = (
                        Tensor::new(&s.q, s.q_layout),
                        Tensor::new(&s.k, s.k_layout),
                        Tensor::new(&s.v, s.v_layout),
                    );
                    match layers.iter_mut().find(|(l, _)| *l == layer) {
                        Some((_, v)) => v.push(t),
                        None => layers.push((layer, vec![t])),
                    }
                }
                let mut saving = 0.0;
                for (_, samples) in &layers {
                    saving +=
                        choose_group_sizes(&cfg, &[2, 4, 8], samples, Target::MaxError(target))?.flop_saving;
                }
                cells.push(format!("{:.1}%", 100.0 * saving / layers.len() as f64));
            }
            println!("| {} | {target} | {} |", name(acts), cells.join(" | "));
        }
    }
    Ok(())
}
