//! Writes case files for the host emulation of the similarity plan kernel
//! (`kernels/emu/simplan_emu.cpp`): Q (and K), the core's plan and, per
//! block, the smallest relative gap of a decision the CPU took (from the
//! instrumented replica of `tests/sim/replica.rs`). Needs no GPU.
//!
//! ```text
//! simplan_cases DIR          random shapes, f16, clear-cut inputs, the fixtures
//! simplan_cases DIR bench    the benchmark's input distribution (d 128, l 128)
//! ```

#[path = "../tests/sim/replica.rs"]
mod replica;

use std::io::Write;

use distr_attention::activations::{bundled_files, Activations};
use distr_attention::{plan_with_keys, Config, Element, GroupSizes, GroupingMode, Layout, Tensor};
use half::{bf16, f16};

trait Bits: Element {
    const CASE_DTYPE: u32;
    fn bits(self) -> u16;
}
impl Bits for bf16 {
    const CASE_DTYPE: u32 = 1;
    fn bits(self) -> u16 {
        self.to_bits()
    }
}
impl Bits for f16 {
    const CASE_DTYPE: u32 = 0;
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// One case: header (11 u32), Q, K (key-weighted only), the core's plan (u16)
/// and each block's smallest decision margin (f64), little-endian.
struct Case<'a, T> {
    q: (&'a [T], Layout),
    k: (&'a [T], Layout),
    g: usize,
    key_weighted: bool,
    block_rows: usize,
}

fn write_case<T: Bits>(path: &str, c: Case<'_, T>) {
    let mode = if c.key_weighted { GroupingMode::KeyWeighted } else { GroupingMode::Similarity };
    let cfg = Config {
        block_rows: c.block_rows,
        group_sizes: GroupSizes::Uniform(c.g),
        grouping: mode,
        ..Config::default()
    };
    let (ql, kl) = (c.q.1, c.k.1);
    let core = plan_with_keys(&cfg, &Tensor::new(c.q.0, ql), &Tensor::new(c.k.0, kl)).unwrap();
    let (perm, margins) = replica::plan(&cfg, c.q.0, &ql, Some((c.k.0, &kl)));
    assert_eq!(core.as_slice(), &perm[..], "the replica reproduces the core");
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let header = [
        0x3143_5053u32,
        T::CASE_DTYPE,
        ql.dim as u32,
        c.g as u32,
        c.key_weighted as u32,
        ql.batch as u32,
        ql.seq as u32,
        ql.heads as u32,
        kl.heads as u32,
        kl.seq as u32,
        c.block_rows as u32,
    ];
    for h in header {
        f.write_all(&h.to_le_bytes()).unwrap();
    }
    for x in c.q.0 {
        f.write_all(&x.bits().to_le_bytes()).unwrap();
    }
    if c.key_weighted {
        for x in c.k.0 {
            f.write_all(&x.bits().to_le_bytes()).unwrap();
        }
    }
    for x in core.as_slice() {
        f.write_all(&x.to_le_bytes()).unwrap();
    }
    for m in &margins {
        f.write_all(&m.min().to_le_bytes()).unwrap();
    }
    let mut sorted: Vec<f64> = margins.iter().map(|m| m.min()).collect();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{path}: {} blocks, margin min {:.2e} median {:.2e}",
        sorted.len(),
        sorted[0],
        sorted[sorted.len() / 2]
    );
}

fn mode_name(kw: bool) -> &'static str {
    if kw {
        "kw"
    } else {
        "sim"
    }
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: simplan_cases DIR [bench]");
    std::fs::create_dir_all(&dir).unwrap();
    // xorshift, uniform on [-1, 1).
    let mut state = 12345u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    if std::env::args().nth(2).as_deref() == Some("bench") {
        // The benchmark's inputs: uniform with unit variance.
        let ql = Layout::contiguous(1, 512, 2, 128);
        let q: Vec<bf16> = (0..512 * 2 * 128).map(|_| bf16::from_f32(rnd() * 1.732)).collect();
        for g in [2, 4, 8] {
            for kw in [false, true] {
                let case = Case { q: (&q, ql), k: (&q, ql), g, key_weighted: kw, block_rows: 128 };
                write_case(&format!("{dir}/bench_d128_g{g}_{}.case", mode_name(kw)), case);
            }
        }
        return;
    }
    // Random bf16: tails (l = 100, 16), GQA, a key column with a large mean.
    for d in [32usize, 64, 128] {
        for g in [1, 2, 4, 8] {
            for kw in [false, true] {
                if kw && g == 1 {
                    continue;
                }
                for l in [128, 100, 16] {
                    let (ql, kl) = (Layout::contiguous(1, 300, 2, d), Layout::contiguous(1, 170, 1, d));
                    let q: Vec<bf16> = (0..300 * 2 * d).map(|_| bf16::from_f32(rnd() * 2.0)).collect();
                    let k: Vec<bf16> = (0..170 * d)
                        .map(|i| bf16::from_f32(rnd() + if i % d == 3 { 20.0 } else { 0.0 }))
                        .collect();
                    let case = Case { q: (&q, ql), k: (&k, kl), g, key_weighted: kw, block_rows: l };
                    write_case(&format!("{dir}/rand_d{d}_g{g}_{}_l{l}.case", mode_name(kw)), case);
                }
            }
        }
    }
    // f16.
    for g in [2, 4] {
        let ql = Layout::contiguous(2, 130, 1, 64);
        let q: Vec<f16> = (0..2 * 130 * 64).map(|_| f16::from_f32(rnd() * 3.0)).collect();
        let k: Vec<f16> = (0..2 * 130 * 64).map(|_| f16::from_f32(rnd())).collect();
        for kw in [false, true] {
            let case = Case { q: (&q, ql), k: (&k, ql), g, key_weighted: kw, block_rows: 64 };
            write_case(&format!("{dir}/f16_d64_g{g}_{}.case", mode_name(kw)), case);
        }
    }
    // Clustered columns (clusters of G, pairs inside): clear-cut decisions.
    for (d, g) in [(128usize, 2usize), (128, 4), (128, 8), (64, 4), (32, 8)] {
        let n = 256;
        let ql = Layout::contiguous(1, n, 1, d);
        let centres: Vec<f32> = (0..n * d / g).map(|_| rnd() * 4.0).collect();
        let pairs: Vec<f32> = (0..n * d / 2).map(|_| rnd()).collect();
        let perm: Vec<usize> = (0..d).map(|j| (j * 37 + 11) % d).collect();
        let q: Vec<bf16> = (0..n * d)
            .map(|i| {
                let (r, j) = (i / d, perm[i % d]);
                bf16::from_f32(centres[r * d / g + j / g] + 0.3 * pairs[r * d / 2 + j / 2] + 0.02 * rnd())
            })
            .collect();
        let case = Case { q: (&q, ql), k: (&q, ql), g, key_weighted: false, block_rows: 128 };
        write_case(&format!("{dir}/clustered_d{d}_g{g}_sim.case"), case);
    }
    // Real fixtures, rounded to bf16.
    for (fi, file) in bundled_files().iter().enumerate() {
        let acts = Activations::load(file, None).unwrap();
        let s = &acts.samples[fi * 3];
        let q: Vec<bf16> = s.q.iter().map(|&x| bf16::from_f32(x)).collect();
        let k: Vec<bf16> = s.k.iter().map(|&x| bf16::from_f32(x)).collect();
        for g in [2, 4, 8] {
            for kw in [false, true] {
                let case =
                    Case { q: (&q, s.q_layout), k: (&k, s.k_layout), g, key_weighted: kw, block_rows: 64 };
                write_case(&format!("{dir}/fix{fi}_d{}_g{g}_{}.case", s.q_layout.dim, mode_name(kw)), case);
            }
        }
    }
}
