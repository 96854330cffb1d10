//! The ctypes module `python/distr_attention.py` against the built library:
//! its own tests (those needing numpy skip without it), and, with numpy, its
//! result on the examples' inputs compared with the Rust API's.
//! Skipped with a message when there is no python3.

mod common;

use std::process::Command;

use common::{available, library, query, root, run, scratch_dir, take_f32, take_u16, value};
use distr_attention_core::{distr_attention, Config, Layout, Tensor, TensorMut};

fn python() -> Option<Command> {
    if !available("python3") {
        eprintln!("skipped: python3 is not installed");
        return None;
    }
    let mut cmd = Command::new("python3");
    cmd.env("DA_LIBRARY", &library().shared).env("DA_EXPECT_VERSION", env!("CARGO_PKG_VERSION"));
    Some(cmd)
}

fn has_numpy() -> bool {
    Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn python_module_tests_pass() {
    let Some(mut cmd) = python() else { return };
    let out = run(cmd.arg(root().join("python/test_distr_attention.py")).arg("-v"));
    let log = String::from_utf8_lossy(&out.stderr);
    let passed = |name: &str| log.lines().any(|l| l.starts_with(name) && l.ends_with("... ok"));
    assert!(passed("test_struct_layout_matches_the_library"), "{log}");
    if log.contains("skipped 'numpy is not installed'") {
        eprintln!("the numpy tests of the Python module were skipped: numpy is not installed");
    } else {
        for test in [
            "test_plan_then_attention_equals_forward",
            "test_every_grouping_mode_plans_and_attends",
            "test_estimates",
            "test_planner",
            "test_backward_matches_finite_differences",
            "test_exact_backward_matches_the_textbook_gradients",
        ] {
            assert!(passed(test), "{test}: {log}");
        }
    }
    assert!(passed("test_tables_without_numpy"), "{log}");
}

#[test]
fn python_forward_matches_the_rust_api() {
    let Some(mut cmd) = python() else { return };
    if !has_numpy() {
        eprintln!("skipped: numpy is not installed for python3");
        return;
    }
    let (b, n, h, d) = (2, 70, 3, 16);
    let file = scratch_dir("python").join("out.bin");
    // examples-c/inputs.h in numpy (uint32 arithmetic wraps like C's).
    let script = format!(
        r#"
import sys
import numpy as np
sys.path.insert(0, {module_dir:?})
import distr_attention as da

def h(i, salt):
    x = (i.astype(np.uint32) * np.uint32(2654435761) + np.uint32(salt * 40503)).astype(np.uint32)
    x ^= x >> np.uint32(13)
    x = (x * np.uint32(0x5bd1e995)).astype(np.uint32)
    x ^= x >> np.uint32(15)
    return x

i = np.arange({b} * {n} * {h} * {d}, dtype=np.uint32)
q = (((h(i & ~np.uint32(1), 1) % 2001).astype(np.int32) + (h(i, 4) % 101).astype(np.int32) - 50).astype(np.float32)
     / np.float32(1000) - np.float32(1)).reshape({b}, {n}, {h}, {d})
k = ((h(i, 2) % 2001).astype(np.float32) / np.float32(1000) - np.float32(1)).reshape(q.shape)
v = ((h(i, 3) % 2001).astype(np.float32) / np.float32(1000) - np.float32(1)).reshape(q.shape)
out, lse, plan = da.forward(q, k, v, da.Config(group_size=4, block_rows=16, causal=True, seed=11),
                            return_lse=True, return_plan=True)
with open({file:?}, "wb") as f:
    f.write(out.tobytes()); f.write(lse.tobytes()); f.write(plan.tobytes())
"#,
        module_dir = root().join("python").display().to_string(),
        file = file.display().to_string(),
    );
    run(cmd.arg("-c").arg(script));

    let total = b * n * h * d;
    let q: Vec<f32> = (0..total).map(|i| query(i as u32)).collect();
    let k: Vec<f32> = (0..total).map(|i| value(i as u32, 2)).collect();
    let v: Vec<f32> = (0..total).map(|i| value(i as u32, 3)).collect();
    let l = Layout::contiguous(b, n, h, d);
    let cfg = Config { block_rows: 16, causal: true, seed: 11, ..Config::with_group_size(4) };
    let mut want = vec![0f32; total];
    let mut want_lse = vec![0f32; b * h * n];
    let want_plan = distr_attention(
        &cfg,
        &Tensor::new(&q, l),
        &Tensor::new(&k, l),
        &Tensor::new(&v, l),
        &mut TensorMut::new(&mut want, l),
        Some(&mut want_lse),
    )
    .unwrap();

    let bytes = std::fs::read(&file).unwrap();
    let mut pos = 0;
    let got = take_f32(&bytes, &mut pos, total);
    let got_lse = take_f32(&bytes, &mut pos, want_lse.len());
    let got_plan = take_u16(&bytes, &mut pos, want_plan.as_slice().len());
    assert_eq!(pos, bytes.len());
    assert!(
        got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
        "Python output differs from Rust"
    );
    assert!(got_lse.iter().zip(&want_lse).all(|(a, b)| a.to_bits() == b.to_bits()), "Python lse differs");
    assert_eq!(got_plan, want_plan.as_slice());
}
