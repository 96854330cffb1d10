//! What the benchmark examples share (`#[path]`-included by `bench.rs` and
//! `plan_bench.rs`): the command line, event timing and random inputs.

use distr_attention_cuda::cust::event::{Event, EventFlags};
use distr_attention_cuda::cust::memory::DeviceBuffer;
use distr_attention_cuda::cust::stream::Stream;
use distr_attention_cuda::Bf16;

/// Tokens (B·N) and width (H·D) of every benchmark shape.
pub const TOKENS: usize = 65536;
pub const WIDTH: usize = 2048;

/// `[--json PATH] [--warmup N] [--reps N] [--quick]` plus the boolean
/// `flags` a benchmark adds (set ones are in `set`).
pub struct Args {
    pub json: Option<String>,
    pub warmup: usize,
    pub reps: usize,
    pub quick: bool,
    pub set: Vec<&'static str>,
}

impl Args {
    pub fn parse(reps: usize, flags: &[&'static str]) -> Args {
        let mut a = Args { json: None, warmup: 3, reps, quick: false, set: Vec::new() };
        let mut it = std::env::args().skip(1);
        while let Some(x) = it.next() {
            match x.as_str() {
                "--json" => a.json = it.next(),
                "--warmup" => a.warmup = it.next().and_then(|s| s.parse().ok()).expect("--warmup N"),
                "--reps" => a.reps = it.next().and_then(|s| s.parse().ok()).expect("--reps N"),
                "--quick" => a.quick = true,
                other => match flags.iter().find(|f| **f == other) {
                    Some(f) => a.set.push(f),
                    None => panic!("unknown argument {other}"),
                },
            }
        }
        a
    }
}

/// Median milliseconds of `f` timed with events on `stream`.
pub fn time(stream: &Stream, warmup: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    let (start, stop) = (Event::new(EventFlags::DEFAULT).unwrap(), Event::new(EventFlags::DEFAULT).unwrap());
    for _ in 0..warmup {
        f();
    }
    stream.synchronize().unwrap();
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        start.record(stream).unwrap();
        f();
        stop.record(stream).unwrap();
        stop.synchronize().unwrap();
        ms.push(stop.elapsed_time_f32(&start).unwrap() as f64);
    }
    ms.sort_by(f64::total_cmp);
    ms[reps / 2]
}

/// Uploads of TOKENS x WIDTH random bf16 values (uniform on
/// [-sqrt(3), sqrt(3)]: unit variance, never all zeros), a fresh draw each call.
pub struct RandomInputs {
    state: u64,
    host: Vec<Bf16>,
}

impl RandomInputs {
    pub fn new() -> RandomInputs {
        RandomInputs { state: 0x2545_F491_4F6C_DD1D, host: vec![Bf16::default(); TOKENS * WIDTH] }
    }

    pub fn upload(&mut self) -> DeviceBuffer<Bf16> {
        for x in self.host.iter_mut() {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let u = (self.state >> 40) as f32 / (1u64 << 24) as f32;
            *x = Bf16(half::bf16::from_f32((u * 2.0 - 1.0) * 1.732));
        }
        DeviceBuffer::from_slice(&self.host).unwrap()
    }
}
