//! Similarity and key-weighted plans on the GPU against the core's CPU plans.
//!
//! The GPU computes the core's grouping in f32 (the core in f64), so a block
//! may differ where one of the grouping's many decisions (a greedy choice
//! between two merges, or a swap whose cost change is ~0) is a near-tie.
//! [`replica`] is an instrumented f64 copy of the core's grouping that
//! reproduces its plans exactly (checked here, without a GPU) and records
//! for every block the smallest relative gap of a decision the CPU took.
//! The GPU tests assert that every block that differs had such a near-tie
//! (gap below `TAU`), report how many did, and check inputs whose decisions
//! are all clear-cut for exact equality. They print a SKIPPED line and pass
//! where no CUDA device or driver is found.

#[path = "sim/replica.rs"]
mod replica;

use distr_attention::activations::{bundled_files, Activations};
use distr_attention::{plan_with_keys, Config, GroupSizes, GroupingMode, Layout, Tensor};
use half::bf16;

/// splitmix64, for inputs of the CPU-only test.
fn next(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// The instrumented replica computes exactly the core's plans (so its
/// margins describe the CPU's decisions), on random inputs and fixtures.
#[test]
fn replica_reproduces_the_core_plan() {
    let mut s = 7u64;
    for (d, g, mode) in [
        (32, 2, GroupingMode::Similarity),
        (64, 4, GroupingMode::Similarity),
        (32, 8, GroupingMode::Similarity),
        (64, 2, GroupingMode::KeyWeighted),
        (32, 4, GroupingMode::KeyWeighted),
        (32, 8, GroupingMode::KeyWeighted),
    ] {
        let (ql, kl) = (Layout::contiguous(2, 90, 2, d), Layout::contiguous(2, 70, 1, d));
        let q: Vec<bf16> = (0..ql.required_len(distr_attention::Operand::Q).unwrap())
            .map(|_| bf16::from_f32(next(&mut s)))
            .collect();
        let k: Vec<bf16> = (0..kl.required_len(distr_attention::Operand::K).unwrap())
            .map(|_| bf16::from_f32(next(&mut s)))
            .collect();
        let cfg = Config {
            block_rows: 32,
            group_sizes: GroupSizes::Uniform(g),
            grouping: mode,
            ..Config::default()
        };
        let core = plan_with_keys(&cfg, &Tensor::new(&q, ql), &Tensor::new(&k, kl)).unwrap();
        let (perm, _) = replica::plan(&cfg, &q, &ql, Some((&k, &kl)));
        assert_eq!(core.as_slice(), &perm[..], "d {d} G {g} {mode:?}");
    }
    // The fixture next to the sources, or under ./tests/data (a copy of the repository).
    let file =
        [bundled_files()[1].clone(), std::path::PathBuf::from("tests/data/smollm2_135m_dev.safetensors")]
            .into_iter()
            .find(|p| p.exists())
            .expect("fixture");
    let acts = Activations::load(&file, None).unwrap();
    let smp = &acts.samples[0];
    for mode in [GroupingMode::Similarity, GroupingMode::KeyWeighted] {
        let cfg = Config { grouping: mode, ..Config::with_group_size(4) };
        let core =
            plan_with_keys(&cfg, &Tensor::new(&smp.q, smp.q_layout), &Tensor::new(&smp.k, smp.k_layout))
                .unwrap();
        let (perm, _) = replica::plan(&cfg, &smp.q, &smp.q_layout, Some((&smp.k, &smp.k_layout)));
        assert_eq!(core.as_slice(), &perm[..], "fixture {mode:?}");
    }
}

#[cfg(feature = "cuda")]
mod common;

#[cfg(feature = "cuda")]
mod gpu_tests {
    use super::common::*;
    use super::replica;
    use distr_attention::metrics::{head_relative_errors, median};
    use distr_attention::{
        plan_with_keys, reference, Config, Element, Error as CoreError, Fusion, GroupSizes, GroupingMode,
        Layout, Operand, PlanRef, PlanShape, Problem, Tensor, TensorMut,
    };
    use distr_attention_cuda::cust::memory::DeviceBuffer;
    use distr_attention_cuda::{
        check_similarity_plan, Bf16, Error, GpuElement, GpuTensor, GpuTensorMut, RawBuffer, RawTensor, F16,
    };
    use half::{bf16, f16};

    /// Relative decision gap below which a block may differ: the f32 Gram
    /// entries carry up to ~l * 2^-24 (7.6e-6 at l = 128) of the columns'
    /// norms, and a decision adds up to a few dozen of them.
    const TAU: f64 = 1e-4;

    /// Per-block comparison of a GPU plan with the CPU plan.
    #[derive(Default, Debug)]
    struct Tally {
        blocks: usize,
        differ: usize,
        near_tie: usize,
        /// Differing blocks whose CPU decisions were all clear (must stay 0).
        unexplained: Vec<String>,
        largest_differing_margin: f64,
        /// Summed f64 cost (core's Q-only fusion error) of the differing
        /// blocks under the GPU and the CPU plan.
        cost_gpu: f64,
        cost_cpu: f64,
    }

    impl Tally {
        fn add(&mut self, other: Tally) {
            self.blocks += other.blocks;
            self.differ += other.differ;
            self.near_tie += other.near_tie;
            self.unexplained.extend(other.unexplained);
            self.largest_differing_margin = self.largest_differing_margin.max(other.largest_differing_margin);
            self.cost_gpu += other.cost_gpu;
            self.cost_cpu += other.cost_cpu;
        }

        fn report(&self, what: &str) {
            println!(
                "{what}: {} blocks, {} differ from the CPU plan, {} have a decision within {TAU:.0e} (near-tie); \
                 largest margin of a differing block {:.2e}; differing blocks' summed cost GPU/CPU {:.5}",
                self.blocks,
                self.differ,
                self.near_tie,
                self.largest_differing_margin,
                if self.cost_cpu > 0.0 { self.cost_gpu / self.cost_cpu } else { 1.0 }
            );
        }

        fn assert_explained(&self, what: &str) {
            assert!(
                self.unexplained.is_empty(),
                "{what}: blocks differ without a near-tie: {:?}",
                &self.unexplained[..self.unexplained.len().min(10)]
            );
        }
    }

    /// Mean-fusion score error (Q only) of the groups of `perm`, from the f64 Gram.
    fn q_cost(gq: &[f64], d: usize, perm: &[u16], g: usize) -> f64 {
        perm.chunks(g)
            .map(|c| {
                let s = c.len() as f64;
                let mut sum = 0.0;
                for &a in c {
                    for &b in c {
                        sum += gq[a as usize * d + b as usize];
                    }
                }
                c.iter().map(|&j| gq[j as usize * (d + 1)]).sum::<f64>() - sum / s
            })
            .sum()
    }

    /// GPU plan (plan_with_keys) of host inputs, downloaded.
    fn gpu_plan<G: GpuElement>(
        gpu: &Gpu,
        cfg: &Config<'_>,
        q: (&[G::Host], Layout),
        k: (&[G::Host], Layout),
    ) -> (Vec<u16>, PlanShape) {
        let (dq, dk) = (upload::<G>(q.0), upload::<G>(k.0));
        let shape = PlanShape::new(cfg, &q.1).unwrap();
        let mut dplan = DeviceBuffer::from_slice(&vec![u16::MAX; shape.num_entries().unwrap()]).unwrap();
        let got = gpu
            .engine
            .plan_with_keys(
                cfg,
                &GpuTensor::new(&dq, q.1),
                &GpuTensor::new(&dk, k.1),
                &mut dplan,
                &gpu.stream,
            )
            .expect("gpu plan");
        assert_eq!(got, shape);
        gpu.stream.synchronize().expect("plan kernels ran");
        let plan = download(&dplan);
        PlanRef::new(shape, &plan).expect("every GPU block is a permutation");
        (plan, shape)
    }

    /// Compares the GPU plan with the CPU plan block by block.
    fn compare<T: Element>(
        cfg: &Config<'_>,
        gpu: &[u16],
        q: (&[T], Layout),
        k: (&[T], Layout),
        what: &str,
    ) -> Tally {
        let cpu = plan_with_keys(cfg, &Tensor::new(q.0, q.1), &Tensor::new(k.0, k.1)).expect("cpu plan");
        let (rep, margins) = replica::plan(cfg, q.0, &q.1, Some((k.0, &k.1)));
        assert_eq!(cpu.as_slice(), &rep[..], "{what}: the replica reproduces the core");
        let shape = cpu.shape();
        let d = shape.head_dim;
        let mut t = Tally::default();
        for b in 0..shape.batch {
            for h in 0..shape.heads {
                for blk in 0..shape.blocks {
                    let i = shape.block_index(b, h, blk);
                    t.blocks += 1;
                    let m = margins[i].min();
                    t.near_tie += (m < TAU) as usize;
                    let (gb, cb) = (&gpu[i * d..(i + 1) * d], &cpu.as_slice()[i * d..(i + 1) * d]);
                    if gb != cb {
                        t.differ += 1;
                        t.largest_differing_margin = t.largest_differing_margin.max(m);
                        if m >= TAU {
                            t.unexplained.push(format!("{what} block ({b},{h},{blk}) margin {m:.2e}"));
                        }
                        let row0 = blk * cfg.block_rows;
                        let gq =
                            replica::query_gram(q.0, &q.1, b, h, row0, (q.1.seq - row0).min(cfg.block_rows));
                        let g = cfg.group_size(h);
                        t.cost_gpu += q_cost(&gq, d, gb, g);
                        t.cost_cpu += q_cost(&gq, d, cb, g);
                    }
                }
            }
        }
        t
    }

    fn mode_name(m: GroupingMode) -> &'static str {
        match m {
            GroupingMode::Lsh => "lsh",
            GroupingMode::Similarity => "similarity",
            GroupingMode::KeyWeighted => "key-weighted",
        }
    }

    /// Random shapes (tails, l not a multiple of 16, l = 1, per-head G,
    /// GQA, strides, f16 and bf16), both modes.
    #[test]
    fn gpu_similarity_plan_matches_the_cpu_plan_on_random_inputs() {
        let Some(gpu) = gpu("gpu_similarity_plan_matches_the_cpu_plan_on_random_inputs") else { return };
        let mut rng = Rng::new(4242);
        let mut totals = [Tally::default(), Tally::default()];
        for case in 0..40 {
            let d = rng.pick(&[32, 64, 128]);
            let block_rows = rng.pick(&[1, 16, 64, 100, 128]);
            let hkv = rng.pick(&[1, 2]);
            let hq = hkv * rng.pick(&[1, 2]);
            let (batch, n, m) = (rng.pick(&[1, 2]), 1 + rng.below(260), 1 + rng.below(200));
            let sizes: Vec<usize> = (0..hq).map(|_| rng.pick(&[1, 2, 4, 8])).collect();
            let uniform = rng.below(2) == 0;
            let group_sizes =
                if uniform { GroupSizes::Uniform(sizes[0]) } else { GroupSizes::PerHead(&sizes) };
            let mode = if case % 2 == 0 { GroupingMode::Similarity } else { GroupingMode::KeyWeighted };
            let cfg = Config { block_rows, group_sizes, grouping: mode, ..Config::default() };
            let (ql, kl) = if case % 3 == 0 {
                (strided(batch, n, hq, d, 8), strided(batch, m, hkv, d, 4))
            } else {
                (Layout::contiguous(batch, n, hq, d), Layout::contiguous(batch, m, hkv, d))
            };
            let what =
                format!("case {case} (d {d}, l {block_rows}, G {sizes:?}/{uniform}, {})", mode_name(mode));
            // A column with a large mean in K: the key Gram is centred.
            let tally = if case % 4 < 2 {
                let q: Vec<bf16> = random_tensor(&mut rng, &ql, 1.5, 0.0);
                let mut k: Vec<bf16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
                shift_column(&mut k, &kl, 3, 8.0);
                let (plan, _) = gpu_plan::<Bf16>(&gpu, &cfg, (&q, ql), (&k, kl));
                compare(&cfg, &plan, (&q, ql), (&k, kl), &what)
            } else {
                let q: Vec<f16> = random_tensor(&mut rng, &ql, 2.0, 0.0);
                let k: Vec<f16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
                let (plan, _) = gpu_plan::<F16>(&gpu, &cfg, (&q, ql), (&k, kl));
                compare(&cfg, &plan, (&q, ql), (&k, kl), &what)
            };
            totals[case % 2].add(tally);
        }
        totals[0].report("random, similarity");
        totals[1].report("random, key-weighted");
        for (t, m) in totals.iter().zip(["similarity", "key-weighted"]) {
            t.assert_explained(m);
            assert!(t.blocks > 300);
        }
    }

    fn shift_column<T: Element>(x: &mut [T], l: &Layout, col: usize, by: f32) {
        for b in 0..l.batch {
            for s in 0..l.seq {
                for h in 0..l.heads {
                    let o = l.offset(b, s, h) + col;
                    x[o] = T::from_f32(x[o].to_f32() + by);
                }
            }
        }
    }

    /// Columns in well-separated clusters of G (and pairs inside them):
    /// every decision is clear-cut, so the plans must be equal.
    #[test]
    fn clear_cut_inputs_give_the_cpu_plan_exactly() {
        let Some(gpu) = gpu("clear_cut_inputs_give_the_cpu_plan_exactly") else { return };
        let mut rng = Rng::new(99);
        let (mut blocks, mut clear) = (0, 0);
        for (d, g, mode) in [
            (128, 2, GroupingMode::Similarity),
            (128, 4, GroupingMode::Similarity),
            (64, 4, GroupingMode::Similarity),
            (64, 2, GroupingMode::KeyWeighted),
            (128, 4, GroupingMode::KeyWeighted),
        ] {
            let (n, m) = (512, 256);
            let ql = Layout::contiguous(1, n, 2, d);
            let kl = Layout::contiguous(1, m, 1, d);
            // Column j (scrambled) is in cluster j/G and pair j/2.
            let perm: Vec<usize> = (0..d).map(|j| (j * 37 + 11) % d).collect();
            let mut q = vec![bf16::ZERO; n * 2 * d];
            for r in 0..n * 2 {
                let centres: Vec<f32> = (0..d / g).map(|_| rng.normal() * 4.0).collect();
                let pairs: Vec<f32> = (0..d / 2).map(|_| rng.normal()).collect();
                for (j, &pj) in perm.iter().enumerate() {
                    let x = centres[pj / g] + 0.3 * pairs[pj / 2] + 0.02 * rng.normal();
                    q[r * d + j] = bf16::from_f32(x);
                }
            }
            let k: Vec<bf16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
            let cfg = Config { block_rows: 128, grouping: mode, ..Config::with_group_size(g) };
            let (plan, _) = gpu_plan::<Bf16>(&gpu, &cfg, (&q, ql), (&k, kl));
            let cpu = plan_with_keys(&cfg, &Tensor::new(&q, ql), &Tensor::new(&k, kl)).unwrap();
            let (_, margins) = replica::plan(&cfg, &q, &ql, Some((&k, &kl)));
            for (i, m) in margins.iter().enumerate() {
                blocks += 1;
                if m.min() >= 1e-3 {
                    clear += 1;
                    assert_eq!(
                        &plan[i * d..(i + 1) * d],
                        &cpu.as_slice()[i * d..(i + 1) * d],
                        "d {d} G {g} {mode:?}: block {i} (margin {:.2e}) differs",
                        m.min()
                    );
                }
            }
        }
        println!(
            "clear-cut inputs: {clear} of {blocks} blocks have every decision 1e-3 clear; all of them equal"
        );
        assert!(clear >= blocks / 2, "the construction should make most blocks clear-cut ({clear}/{blocks})");
    }

    /// Real activations (MiniLM d=32, SmolLM2 d=64 GQA), rounded to bf16.
    #[test]
    fn real_fixtures_gpu_plan_vs_cpu_plan() {
        let Some(gpu) = gpu("real_fixtures_gpu_plan_vs_cpu_plan") else { return };
        for acts in fixtures() {
            let name = acts.path.file_name().unwrap().to_string_lossy().to_string();
            for mode in [GroupingMode::Similarity, GroupingMode::KeyWeighted] {
                for g in [2, 4, 8] {
                    let cfg = Config { grouping: mode, causal: acts.causal, ..Config::with_group_size(g) };
                    let mut t = Tally::default();
                    for s in acts.samples.iter().step_by(2) {
                        let q: Vec<bf16> = s.q.iter().map(|&x| bf16::from_f32(x)).collect();
                        let k: Vec<bf16> = s.k.iter().map(|&x| bf16::from_f32(x)).collect();
                        let (plan, _) = gpu_plan::<Bf16>(&gpu, &cfg, (&q, s.q_layout), (&k, s.k_layout));
                        t.add(compare(&cfg, &plan, (&q, s.q_layout), (&k, s.k_layout), &s.name));
                    }
                    t.report(&format!("{name} {} G={g}", mode_name(mode)));
                    t.assert_explained(&name);
                }
            }
        }
    }

    /// A small problem of both modes and two group sizes (the case the
    /// device run gives compute-sanitizer), checked like the random ones.
    #[test]
    fn small_case() {
        let Some(gpu) = gpu("small_case") else { return };
        let mut rng = Rng::new(3);
        let (ql, kl) = (strided(1, 130, 2, 64, 8), Layout::contiguous(1, 90, 1, 64));
        let q: Vec<bf16> = random_tensor(&mut rng, &ql, 1.0, 0.0);
        let k: Vec<bf16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
        let sizes = [2, 4];
        let mut t = Tally::default();
        for mode in [GroupingMode::Similarity, GroupingMode::KeyWeighted] {
            let cfg =
                Config { grouping: mode, group_sizes: GroupSizes::PerHead(&sizes), ..Config::default() };
            let (plan, _) = gpu_plan::<Bf16>(&gpu, &cfg, (&q, ql), (&k, kl));
            t.add(compare(&cfg, &plan, (&q, ql), (&k, kl), mode_name(mode)));
        }
        t.report("small case");
        t.assert_explained("small case");
    }

    /// The widest head (d = 128, full 128-row blocks and a tail) with G = 2
    /// and 8, both modes: with `small_case`, what compute-sanitizer runs.
    #[test]
    fn small_case_wide() {
        let Some(gpu) = gpu("small_case_wide") else { return };
        let mut rng = Rng::new(5);
        let (ql, kl) = (Layout::contiguous(1, 200, 2, 128), Layout::contiguous(1, 150, 1, 128));
        let q: Vec<bf16> = random_tensor(&mut rng, &ql, 1.0, 0.0);
        let k: Vec<bf16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
        let sizes = [2, 8];
        let mut t = Tally::default();
        for mode in [GroupingMode::Similarity, GroupingMode::KeyWeighted] {
            let cfg = Config {
                block_rows: 128,
                grouping: mode,
                group_sizes: GroupSizes::PerHead(&sizes),
                ..Config::default()
            };
            let (plan, _) = gpu_plan::<Bf16>(&gpu, &cfg, (&q, ql), (&k, kl));
            t.add(compare(&cfg, &plan, (&q, ql), (&k, kl), mode_name(mode)));
        }
        t.report("small case, d = 128");
        t.assert_explained("small case, d = 128");
    }

    /// Same inputs, same plan twice (nothing depends on thread timing).
    #[test]
    fn gpu_similarity_plan_is_deterministic() {
        let Some(gpu) = gpu("gpu_similarity_plan_is_deterministic") else { return };
        let mut rng = Rng::new(1);
        let ql = Layout::contiguous(2, 700, 3, 128);
        let kl = Layout::contiguous(2, 500, 1, 128);
        let q: Vec<bf16> = random_tensor(&mut rng, &ql, 1.0, 0.0);
        let k: Vec<bf16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
        for mode in [GroupingMode::Similarity, GroupingMode::KeyWeighted] {
            let cfg = Config { block_rows: 128, grouping: mode, ..Config::with_group_size(4) };
            let a = gpu_plan::<Bf16>(&gpu, &cfg, (&q, ql), (&k, kl)).0;
            let b = gpu_plan::<Bf16>(&gpu, &cfg, (&q, ql), (&k, kl)).0;
            assert_eq!(a, b, "{mode:?}");
        }
    }

    /// GPU plan + GPU attention: output vs the f64 reference on the GPU's
    /// plan; on the fixtures, accuracy vs the shipped exact output next to
    /// the CPU similarity plan's and LSH's.
    #[test]
    fn attention_on_the_gpu_similarity_plan() {
        let Some(gpu) = gpu("attention_on_the_gpu_similarity_plan") else { return };
        // Random problems against the reference on the same plan.
        let mut rng = Rng::new(17);
        let mut worst = 0f64;
        for (i, (d, l, g, mode, causal)) in [
            (128, 128, 2, GroupingMode::Similarity, false),
            (128, 64, 4, GroupingMode::KeyWeighted, true),
            (64, 128, 8, GroupingMode::Similarity, true),
            (32, 64, 2, GroupingMode::KeyWeighted, false),
        ]
        .into_iter()
        .enumerate()
        {
            let (ql, kl) = (Layout::contiguous(2, 200 + 37 * i, 4, d), Layout::contiguous(2, 190, 2, d));
            let q: Vec<bf16> = random_tensor(&mut rng, &ql, 1.0, 0.0);
            let k: Vec<bf16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
            let v: Vec<bf16> = random_tensor(&mut rng, &kl, 1.0, 0.0);
            let cfg = Config {
                block_rows: l,
                grouping: mode,
                causal,
                fusion: Fusion::Mean,
                ..Config::with_group_size(g)
            };
            let (out, plan, shape) = attend::<Bf16>(&gpu, &cfg, (&q, ql), (&k, kl), (&v, kl));
            let (reference, dense) = reference_on_plan(&cfg, &plan, shape, (&q, ql), (&k, kl), (&v, kl));
            let err = max_head_error(&out, &reference, &dense);
            println!(
                "attention on the GPU {} plan, d {d} l {l} G {g}: max head error {err:.3e}",
                mode_name(mode)
            );
            assert!(err <= 2e-2);
            worst = worst.max(err);
        }
        // Fixtures: median error vs o_exact.
        for acts in fixtures() {
            let name = acts.path.file_name().unwrap().to_string_lossy().to_string();
            let mut lsh = Vec::new();
            for mode in [GroupingMode::Lsh, GroupingMode::Similarity, GroupingMode::KeyWeighted] {
                let cfg = Config { grouping: mode, causal: acts.causal, ..Config::with_group_size(2) };
                let (mut gpu_errs, mut cpu_errs, mut worst_ref) = (Vec::new(), Vec::new(), 0f64);
                for s in &acts.samples {
                    let conv = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
                    let (q, k, v) = (conv(&s.q), conv(&s.k), conv(&s.v));
                    let (out, plan, shape) =
                        attend::<Bf16>(&gpu, &cfg, (&q, s.q_layout), (&k, s.k_layout), (&v, s.v_layout));
                    let (reference, dense) = reference_on_plan(
                        &cfg,
                        &plan,
                        shape,
                        (&q, s.q_layout),
                        (&k, s.k_layout),
                        (&v, s.v_layout),
                    );
                    worst_ref = worst_ref.max(max_head_error(&out, &reference, &dense));
                    let exact = s.o_exact.as_ref().expect("fixture has o_exact");
                    gpu_errs.extend(head_relative_errors(&out, exact, &dense));
                    cpu_errs.extend(cpu_errors(&cfg, s, exact, &dense));
                }
                let (gm, cm) = (median(&gpu_errs), median(&cpu_errs));
                println!(
                    "{name} G=2 {}: median error vs o_exact, GPU plan+attention {gm:.4}, CPU {cm:.4}; \
                     max head error vs reference on the GPU plan {worst_ref:.3e}",
                    mode_name(mode)
                );
                assert!(worst_ref <= 2e-2);
                assert!((gm - cm).abs() <= 0.05, "GPU {gm} vs CPU {cm}");
                if mode == GroupingMode::Lsh {
                    lsh.push(gm);
                } else {
                    // Issue 5's accuracy bar (20% below LSH) is the core's test on
                    // f32 data; here, on bf16 and the GPU path, the ratio is
                    // reported and only checked to stay clearly below LSH.
                    println!("{name} G=2 {}: GPU median error / GPU LSH {:.3}", mode_name(mode), gm / lsh[0]);
                    assert!(gm <= 0.85 * lsh[0], "{mode:?}: GPU {gm} vs LSH {}", lsh[0]);
                }
            }
        }
        println!("random problems: worst head error vs reference {worst:.3e}");
    }

    fn cpu_errors(
        cfg: &Config<'_>,
        s: &distr_attention::activations::Sample,
        exact: &[f32],
        dense: &Layout,
    ) -> Vec<f64> {
        let mut o = vec![0f32; exact.len()];
        let (q, k, v) =
            (Tensor::new(&s.q, s.q_layout), Tensor::new(&s.k, s.k_layout), Tensor::new(&s.v, s.v_layout));
        let plan = plan_with_keys(cfg, &q, &k).unwrap();
        distr_attention::attention(
            cfg,
            &plan.as_ref(),
            &q,
            &k,
            &v,
            &mut TensorMut::new(&mut o, *dense),
            None,
        )
        .unwrap();
        head_relative_errors(&o, exact, dense)
    }

    /// GPU plan (any mode) and attention with f32 output in the dense layout.
    fn attend<G: GpuElement>(
        gpu: &Gpu,
        cfg: &Config<'_>,
        q: (&[G::Host], Layout),
        k: (&[G::Host], Layout),
        v: (&[G::Host], Layout),
    ) -> (Vec<f32>, Vec<u16>, PlanShape) {
        let p = Problem::new(&q.1, &k.1, &v.1).unwrap();
        let ol = p.output_layout();
        let (dq, dk, dv) = (upload::<G>(q.0), upload::<G>(k.0), upload::<G>(v.0));
        let shape = PlanShape::new(cfg, &q.1).unwrap();
        let mut dplan = DeviceBuffer::from_slice(&vec![u16::MAX; shape.num_entries().unwrap()]).unwrap();
        let mut dout =
            DeviceBuffer::from_slice(&vec![f32::NAN; ol.required_len(Operand::Output).unwrap()]).unwrap();
        let (tq, tk, tv) = (GpuTensor::new(&dq, q.1), GpuTensor::new(&dk, k.1), GpuTensor::new(&dv, v.1));
        gpu.engine
            .distr_attention(
                cfg,
                &mut dplan,
                &tq,
                &tk,
                &tv,
                &mut GpuTensorMut::new(&mut dout, ol),
                None,
                &gpu.stream,
            )
            .expect("gpu plan + attention");
        gpu.stream.synchronize().unwrap();
        (download(&dout), download(&dplan), shape)
    }

    fn reference_on_plan<T: Element>(
        cfg: &Config<'_>,
        plan: &[u16],
        shape: PlanShape,
        q: (&[T], Layout),
        k: (&[T], Layout),
        v: (&[T], Layout),
    ) -> (Vec<f32>, Layout) {
        let p = Problem::new(&q.1, &k.1, &v.1).unwrap();
        let lay = p.output_layout();
        let mut o = vec![f32::NAN; lay.required_len(Operand::Output).unwrap()];
        let plan = PlanRef::new(shape, plan).expect("a valid plan");
        reference::attention(
            cfg,
            &plan,
            &Tensor::new(q.0, q.1),
            &Tensor::new(k.0, k.1),
            &Tensor::new(v.0, v.1),
            &mut TensorMut::new(&mut o, lay),
            None,
        )
        .unwrap();
        (o, lay)
    }

    /// Argument errors: the core's where the core has one, else this backend's.
    #[test]
    fn similarity_plan_errors() {
        let q = Layout::contiguous(1, 300, 4, 64);
        let kl = Layout::contiguous(1, 200, 2, 64);
        let host = vec![bf16::from_f32(1.0); q.required_len(Operand::Q).unwrap()];
        let khost = vec![bf16::from_f32(1.0); kl.required_len(Operand::K).unwrap()];
        let raw = |ptr: u64, layout: Layout, len: usize| RawTensor {
            ptr,
            len,
            layout,
            dtype: distr_attention::DType::BF16,
        };
        let (tq, tk) = (raw(0x1000, q, host.len()), raw(0x100000, kl, khost.len()));
        let sim = Config { grouping: GroupingMode::Similarity, ..Config::with_group_size(2) };
        let kw = Config { grouping: GroupingMode::KeyWeighted, ..sim };
        let entries = PlanShape::new(&sim, &q).unwrap().num_entries().unwrap();
        let out = RawBuffer { ptr: 0x9000_0000, len: entries };
        assert!(check_similarity_plan(&sim, &tq, None, &out).is_ok());
        assert!(check_similarity_plan(&kw, &tq, Some(&tk), &out).is_ok());
        let core_err = |cfg: &Config<'_>, with_k: bool| {
            let (tq, tk) = (Tensor::new(&host[..], q), Tensor::new(&khost[..], kl));
            if with_k {
                plan_with_keys(cfg, &tq, &tk).unwrap_err()
            } else {
                distr_attention::plan(cfg, &tq).unwrap_err()
            }
        };
        // Key-weighted without keys, non-power-of-two G, G not dividing d, l = 0: the core's errors.
        let sizes = [2, 3, 2, 2];
        for (name, cfg, with_k) in [
            ("kw without keys", kw, false),
            ("G = 3", Config { group_sizes: GroupSizes::PerHead(&sizes), ..sim }, false),
            ("G = 5", Config { group_sizes: GroupSizes::Uniform(5), ..kw }, true),
            ("l = 0", Config { block_rows: 0, ..sim }, true),
        ] {
            let core = core_err(&cfg, with_k);
            let got = check_similarity_plan(&cfg, &tq, with_k.then_some(&tk), &out).unwrap_err();
            assert_eq!(got, Error::Core(core), "{name}");
        }
        // K that does not match Q (head count): the core's shape error.
        let bad_k = Layout::contiguous(1, 200, 3, 64);
        let core =
            plan_with_keys(&sim, &Tensor::new(&host[..], q), &Tensor::new(&khost[..], bad_k)).unwrap_err();
        let got =
            check_similarity_plan(&sim, &tq, Some(&raw(0x100000, bad_k, khost.len())), &out).unwrap_err();
        assert_eq!(got, Error::Core(core));
        // Backend limits.
        let err = |cfg: &Config<'_>, q: &RawTensor, k: Option<&RawTensor>, out: &RawBuffer| {
            check_similarity_plan(cfg, q, k, out).unwrap_err()
        };
        assert_eq!(
            err(&Config { group_sizes: GroupSizes::Uniform(16), ..sim }, &tq, None, &out),
            Error::Core(CoreError::UnsupportedGroupSize { got: 16 })
        );
        assert_eq!(
            err(&Config { block_rows: 256, ..sim }, &tq, None, &out),
            Error::Core(CoreError::UnsupportedBlockRows { got: 256 })
        );
        let d16 = Layout::contiguous(1, 300, 4, 16);
        let out16 =
            RawBuffer { ptr: 0x9000_0000, len: PlanShape::new(&sim, &d16).unwrap().num_entries().unwrap() };
        assert_eq!(
            err(&sim, &raw(0x1000, d16, 300 * 64), None, &out16),
            Error::Core(CoreError::UnsupportedHeadDim { got: 16 })
        );
        assert_eq!(
            err(&sim, &tq, None, &RawBuffer { ptr: 0x9000_0000, len: entries - 1 }),
            Error::Core(CoreError::BufferTooSmall {
                operand: Operand::Plan,
                needed: entries,
                got: entries - 1
            })
        );
        assert!(matches!(
            err(&sim, &raw(0x1004, q, host.len()), None, &out),
            Error::Misaligned { operand: Operand::Q, .. }
        ));
        assert!(matches!(
            err(&kw, &tq, Some(&raw(0x100002, kl, khost.len())), &out),
            Error::Misaligned { operand: Operand::K, .. }
        ));
        let f16k = RawTensor { dtype: distr_attention::DType::F16, ..tk };
        assert_eq!(
            err(&kw, &tq, Some(&f16k), &out),
            Error::Core(CoreError::UnsupportedDtype { operand: Operand::K })
        );
        // LSH is the LSH kernel's business.
        assert!(matches!(
            err(&Config::with_group_size(2), &tq, None, &out),
            Error::Core(CoreError::GroupingUnavailable { .. })
        ));
    }
}
