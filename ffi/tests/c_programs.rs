//! The C and C++ programs of `examples-c/`, compiled with the system's gcc and
//! g++ against `include/` and the built library only, and run: their results
//! must equal the Rust API's on the same inputs, and the C status test must
//! pass. Also the routes C users build by: the Makefile, the installed
//! pkg-config files and the CMake package (CMake only where it is installed).

mod common;

use std::path::Path;
use std::process::Command;

use common::{
    available, library, query, root, root_example, run, scratch_dir, static_libs, take_f32, take_f64,
    take_u16, take_u32, value, write_safetensors,
};
use distr_attention_core::backward::{attention_backward, Forward, Gradients};
use distr_attention_core::budget::{choose_group_sizes, Target};
use distr_attention_core::{
    attention, distr_attention, estimate_errors, plan_with_keys, Config, Fusion, GroupSizes, GroupingMode,
    Layout, Tensor, TensorMut,
};

const CFLAGS: [&str; 5] = ["-O2", "-Wall", "-Wextra", "-Werror", "-Wpedantic"];

/// Compiles one source of `examples-c/` against `include/` and the static library.
fn compile_static(compiler: &str, std: &str, source: &str, exe: &Path) {
    let lib = library();
    let src = root().join("examples-c").join(source);
    run(Command::new(compiler)
        .arg(std)
        .args(CFLAGS)
        .arg("-I")
        .arg(root().join("include"))
        .arg(src)
        .arg(&lib.static_lib)
        .args(static_libs())
        .arg("-o")
        .arg(exe));
}

/// Dense inputs of `examples-c/inputs.h` for Q `[b, n, hq, d]` and K, V `[b, n, hk, d]`.
fn inputs(b: usize, n: usize, hq: usize, hk: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let q = (0..b * n * hq * d).map(|i| query(i as u32)).collect();
    let k = (0..b * n * hk * d).map(|i| value(i as u32, 2)).collect();
    let v = (0..b * n * hk * d).map(|i| value(i as u32, 3)).collect();
    (q, k, v)
}

/// The Rust API's one-shot DistrAttention: output, lse and plan.
fn rust_result(
    cfg: &Config<'_>,
    b: usize,
    n: usize,
    hq: usize,
    hk: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<u16>) {
    let (q, k, v) = inputs(b, n, hq, hk, d);
    let (lq, lk) = (Layout::contiguous(b, n, hq, d), Layout::contiguous(b, n, hk, d));
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; b * hq * n];
    let plan = distr_attention(
        cfg,
        &Tensor::new(&q, lq),
        &Tensor::new(&k, lk),
        &Tensor::new(&v, lk),
        &mut TensorMut::new(&mut out, lq),
        Some(&mut lse),
    )
    .expect("the Rust API accepts the example's inputs");
    (out, lse, plan.into_vec())
}

fn assert_same(what: &str, c: &[f32], rust: &[f32]) {
    assert_eq!(c.len(), rust.len(), "{what}: lengths");
    let max = c.iter().zip(rust).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let differing = c.iter().zip(rust).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differing, 0, "{what}: {differing} elements differ from the Rust API, max |diff| {max}");
}

#[test]
fn c_example_matches_the_rust_api() {
    let dir = scratch_dir("c_example");
    let exe = dir.join("example");
    compile_static("gcc", "-std=c11", "example.c", &exe);
    // The example's problem: [1, 256, 4, 64] queries, 2 KV heads, causal,
    // block_rows 64, 16 projections, seed 0.
    let (b, n, hq, hk, d) = (1, 256, 4, 2, 64);
    for g in [2usize, 4] {
        let file = dir.join(format!("out_g{g}.bin"));
        let out = run(Command::new(&exe).arg(g.to_string()).arg(&file));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("group size {g}: relative error vs exact attention")), "{stdout}");
        assert!(stdout.contains("replay of the plan: identical"), "{stdout}");

        let cfg = Config { causal: true, ..Config::with_group_size(g) };
        let (want, _, want_plan) = rust_result(&cfg, b, n, hq, hk, d);
        let bytes = std::fs::read(&file).expect("the example wrote its output");
        let mut pos = 0;
        assert_same("C output", &take_f32(&bytes, &mut pos, want.len()), &want);
        assert_eq!(take_u16(&bytes, &mut pos, want_plan.len()), want_plan, "C plan");
        assert_eq!(pos, bytes.len(), "nothing else in the file");
    }
    // G = 1 is exact attention: the example prints a zero error.
    let out = run(Command::new(&exe).arg("1"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("relative error vs exact attention 0.000000"), "{stdout}");
}

#[test]
fn cpp_example_matches_the_rust_api() {
    let dir = scratch_dir("cpp_example");
    let exe = dir.join("example_cpp");
    compile_static("g++", "-std=c++17", "example.cpp", &exe);
    let file = dir.join("out.bin");
    let out = run(Command::new(&exe).arg(&file));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("expected error (status 4): invalid configuration: group size 3"), "{stdout}");

    // The C++ example's problem and config.
    let (b, n, hq, hk, d) = (2, 100, 4, 4, 32);
    let sizes = [1usize, 2, 4, 8];
    let cfg = Config {
        block_rows: 32,
        group_sizes: GroupSizes::PerHead(&sizes),
        fusion: Fusion::Sample,
        seed: 7,
        ..Config::default()
    };
    let (want, want_lse, want_plan) = rust_result(&cfg, b, n, hq, hk, d);
    let bytes = std::fs::read(&file).expect("the example wrote its output");
    let mut pos = 0;
    assert_same("C++ output", &take_f32(&bytes, &mut pos, want.len()), &want);
    assert_same("C++ lse", &take_f32(&bytes, &mut pos, want_lse.len()), &want_lse);
    assert_eq!(take_u16(&bytes, &mut pos, want_plan.len()), want_plan, "C++ plan");
    assert_eq!(pos, bytes.len());
}

#[test]
fn cpp_training_example_matches_the_rust_api() {
    let dir = scratch_dir("training");
    let exe = dir.join("training");
    compile_static("g++", "-std=c++17", "training.cpp", &exe);
    let file = dir.join("out.bin");
    let out = run(Command::new(&exe).arg(&file));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("replayed identically") && stdout.contains("table read back"), "{stdout}");

    // The example's problem, config and output gradient.
    let (b, n, hq, hk, d) = (1, 96, 4, 2, 32);
    let (q, k, v) = inputs(b, n, hq, hk, d);
    let d_out: Vec<f32> = (0..q.len()).map(|i| value(i as u32, 5)).collect();
    let (lq, lk) = (Layout::contiguous(b, n, hq, d), Layout::contiguous(b, n, hk, d));
    let (tq, tk, tv) = (Tensor::new(&q, lq), Tensor::new(&k, lk), Tensor::new(&v, lk));
    let sizes = [1usize, 2, 4, 2];
    let cfg = Config {
        block_rows: 32,
        causal: true,
        grouping: GroupingMode::KeyWeighted,
        group_sizes: GroupSizes::PerHead(&sizes),
        ..Config::default()
    };
    let plan = plan_with_keys(&cfg, &tq, &tk).unwrap();
    let mut o = vec![0f32; q.len()];
    let mut lse = vec![0f32; b * hq * n];
    attention(&cfg, &plan.as_ref(), &tq, &tk, &tv, &mut TensorMut::new(&mut o, lq), Some(&mut lse)).unwrap();
    let est = estimate_errors(&cfg, &plan.as_ref(), &tq, &tk, &tv, 16).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    let fwd = Forward { o: Tensor::new(&o, lq), lse: &lse, d_out: Tensor::new(&d_out, lq) };
    let (mut gq, mut gk, mut gv) =
        (TensorMut::new(&mut dq, lq), TensorMut::new(&mut dk, lk), TensorMut::new(&mut dv, lk));
    attention_backward(
        &cfg,
        &plan.as_ref(),
        &tq,
        &tk,
        &tv,
        &fwd,
        &mut Gradients { dq: &mut gq, dk: &mut gk, dv: &mut gv },
    )
    .unwrap();
    let calib = Config { group_sizes: GroupSizes::Uniform(1), ..cfg };
    let budget = choose_group_sizes(&calib, &[2, 4, 8], &[(tq, tk, tv)], Target::MaxError(0.5)).unwrap();

    let bytes = std::fs::read(&file).expect("the example wrote its output");
    let mut pos = 0;
    assert_same("C++ output", &take_f32(&bytes, &mut pos, o.len()), &o);
    assert_same("C++ lse", &take_f32(&bytes, &mut pos, lse.len()), &lse);
    assert_eq!(take_u16(&bytes, &mut pos, plan.as_slice().len()), plan.as_slice(), "C++ plan");
    assert_same("C++ dq", &take_f32(&bytes, &mut pos, dq.len()), &dq);
    assert_same("C++ dk", &take_f32(&bytes, &mut pos, dk.len()), &dk);
    assert_same("C++ dv", &take_f32(&bytes, &mut pos, dv.len()), &dv);
    let bits = |x: Vec<f64>| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let want = |f: fn(&distr_attention_core::HeadErrorEstimate) -> f64| bits(est.iter().map(f).collect());
    assert_eq!(bits(take_f64(&bytes, &mut pos, hq)), want(|e| e.relative_score_error));
    assert_eq!(bits(take_f64(&bytes, &mut pos, hq)), want(|e| e.rms_logit_error));
    assert_eq!(bits(take_f64(&bytes, &mut pos, hq)), want(|e| e.sampled_output_error));
    let chosen: Vec<u32> = budget.group_sizes().iter().map(|&g| g as u32).collect();
    assert_eq!(take_u32(&bytes, &mut pos, hq), chosen, "planner's sizes");
    assert_eq!(
        bits(take_f64(&bytes, &mut pos, hq)),
        bits(budget.heads.iter().map(|h| h.measured_error).collect())
    );
    assert_eq!(take_f64(&bytes, &mut pos, 1)[0].to_bits(), budget.flop_saving.to_bits());
    assert_eq!(pos, bytes.len());
}

#[test]
fn budget_example_runs_with_the_planners_json_table() {
    // Calibration data in the fixture format: layer0 is exactly the C example's
    // input, layer1 other data; the planner command writes its JSON table for
    // them, and the C example runs layer0 with the sizes it chose.
    let dir = scratch_dir("budget");
    let (b, n, hq, hk, d) = (1, 128, 4, 2, 32);
    let (q, k, v) = inputs(b, n, hq, hk, d);
    let other = |salt: u32, len: usize| (0..len).map(|i| value(i as u32, salt)).collect::<Vec<f32>>();
    let (q1, k1, v1) = (other(7, q.len()), other(8, k.len()), other(9, v.len()));
    let calibration = dir.join("calibration.safetensors");
    let (sq, skv) = ([b, n, hq, d], [b, n, hk, d]);
    write_safetensors(
        &calibration,
        &[("causal", "true"), ("num_heads", "4"), ("num_kv_heads", "2")],
        &[
            ("layer0.seq0.q", sq, &q),
            ("layer0.seq0.k", skv, &k),
            ("layer0.seq0.v", skv, &v),
            ("layer1.seq0.q", sq, &q1),
            ("layer1.seq0.k", skv, &k1),
            ("layer1.seq0.v", skv, &v1),
        ],
    );
    let target = 0.18;
    let table = dir.join("table.json");
    run(Command::new(root_example("plan_heads"))
        .arg(&calibration)
        .args(["--target-error", &target.to_string(), "--grouping", "similarity"])
        .args(["--candidates", "2,4,8", "--block-rows", "32", "--out"])
        .arg(&table));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&table).unwrap()).unwrap();
    let layers = json["files"][0]["layers"].as_array().expect("layers in the table");
    let layer0 = layers.iter().find(|l| l["layer"] == "layer0").expect("layer0 in the table");
    let sizes: Vec<usize> =
        layer0["group_sizes"].as_array().unwrap().iter().map(|g| g.as_u64().unwrap() as usize).collect();
    let measured: Vec<f64> =
        layer0["heads"].as_array().unwrap().iter().map(|h| h["measured_error"].as_f64().unwrap()).collect();
    assert_eq!(sizes.len(), hq);
    assert!(sizes.iter().any(|&g| g > 1), "the planner approximated no head: {sizes:?}");

    let exe = dir.join("budget");
    compile_static("gcc", "-std=c11", "budget.c", &exe);
    let file = dir.join("out.bin");
    let out = run(Command::new(&exe).arg(&table).arg("layer0").arg("calibration.safetensors").arg(&file));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("similarity grouping, block_rows 32"), "{stdout}");
    for (h, g) in sizes.iter().enumerate() {
        assert!(stdout.contains(&format!("| {h} | {g} | ")), "head {h}: {stdout}");
    }

    let cfg = Config {
        block_rows: 32,
        causal: true,
        grouping: GroupingMode::Similarity,
        group_sizes: GroupSizes::PerHead(&sizes),
        ..Config::default()
    };
    let (lq, lk) = (Layout::contiguous(b, n, hq, d), Layout::contiguous(b, n, hk, d));
    let (tq, tk, tv) = (Tensor::new(&q, lq), Tensor::new(&k, lk), Tensor::new(&v, lk));
    let plan = plan_with_keys(&cfg, &tq, &tk).unwrap();
    let mut want = vec![0f32; q.len()];
    attention(&cfg, &plan.as_ref(), &tq, &tk, &tv, &mut TensorMut::new(&mut want, lq), None).unwrap();
    let est = estimate_errors(&cfg, &plan.as_ref(), &tq, &tk, &tv, 16).unwrap();

    let bytes = std::fs::read(&file).expect("the example wrote its output");
    let mut pos = 0;
    assert_same("C output", &take_f32(&bytes, &mut pos, want.len()), &want);
    let errors = take_f64(&bytes, &mut pos, hq);
    for h in 0..hq {
        // The table's measured error (5 decimals) is the error the C program sees,
        // and within the target on this calibration sample.
        assert!(
            (errors[h] - measured[h]).abs() <= 6e-6,
            "head {h}: C {} vs table {}",
            errors[h],
            measured[h]
        );
        assert!(errors[h] <= target, "head {h}: error {} above the target", errors[h]);
        assert_eq!(errors[h] == 0.0, sizes[h] == 1, "head {h}");
    }
    for field in [
        |e: &distr_attention_core::HeadErrorEstimate| e.relative_score_error,
        |e: &distr_attention_core::HeadErrorEstimate| e.rms_logit_error,
        |e: &distr_attention_core::HeadErrorEstimate| e.sampled_output_error,
    ] {
        let got = take_f64(&bytes, &mut pos, hq);
        let want: Vec<f64> = est.iter().map(field).collect();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    assert_eq!(pos, bytes.len());

    // layer1 without a file name (it is in one file only); a missing layer fails with the library's message.
    run(Command::new(&exe).arg(&table).arg("layer1").arg("-"));
    let missing = Command::new(&exe).arg(&table).arg("layer9").output().unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("not found in the group-size table") && stderr.contains("layer9"), "{stderr}");
}

/// Runs the C status test and checks its summary line.
fn check_status_test(exe: &Path) {
    let out = run(&mut Command::new(exe));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().last().unwrap_or("");
    let passed: usize = summary.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(summary.ends_with(" passed, 0 failed") && passed >= 100, "{stdout}");
}

#[test]
fn c_status_test_passes_against_the_shared_library() {
    let lib = library();
    let dir = scratch_dir("status_test");
    let exe = dir.join("status_test");
    run(Command::new("gcc")
        .arg("-std=c11")
        .args(CFLAGS)
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("examples-c/status_test.c"))
        .arg("-L")
        .arg(&lib.dir)
        .arg("-ldistr_attention")
        .arg(format!("-Wl,-rpath,{}", lib.dir.display()))
        .arg("-lm")
        .arg("-o")
        .arg(&exe));
    check_status_test(&exe);
}

#[test]
fn makefile_builds_and_runs_the_examples() {
    if !available("make") {
        eprintln!("skipped: make is not installed");
        return;
    }
    let lib = library();
    let dir = scratch_dir("makefile");
    let out = run(Command::new("make")
        .arg("-C")
        .arg(root().join("examples-c"))
        .arg(format!("LIBDIR={}", lib.dir.display()))
        .arg(format!("BUILD={}", dir.display()))
        .arg("run"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("replay of the plan: identical") && stdout.contains(" passed, 0 failed"),
        "{stdout}"
    );
}

#[test]
fn installed_package_works_with_pkg_config_and_cmake() {
    let lib = library();
    let dir = scratch_dir("install");
    let prefix = dir.join("prefix");
    run(Command::new("sh").arg(root().join("ffi/dist/install.sh")).arg(&prefix).arg(&lib.dir));
    for file in [
        "include/distr_attention.h",
        "include/distr_attention.hpp",
        "lib/libdistr_attention.so",
        "lib/libdistr_attention.a",
        "lib/cmake/DistrAttention/DistrAttentionConfig.cmake",
        "lib/cmake/DistrAttention/DistrAttentionConfigVersion.cmake",
    ] {
        assert!(prefix.join(file).is_file(), "{file} not installed");
    }
    let pc_path = prefix.join("lib/pkgconfig");
    let pc = std::fs::read_to_string(pc_path.join("distr_attention.pc")).unwrap();
    assert!(pc.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))), "{pc}");
    // A library with the CUDA entry points links the driver statically.
    let static_pc = std::fs::read_to_string(pc_path.join("distr_attention-static.pc")).unwrap();
    assert_eq!(static_pc.contains("-lcuda"), cfg!(feature = "cuda"), "{static_pc}");
    let cmake_config =
        std::fs::read_to_string(prefix.join("lib/cmake/DistrAttention/DistrAttentionConfig.cmake")).unwrap();
    let flag = if cfg!(feature = "cuda") { "ON" } else { "OFF" };
    assert!(cmake_config.contains(&format!("set(DistrAttention_CUDA {flag})")), "{cmake_config}");

    if available("pkg-config") {
        let flags = |package: &str| {
            let out = run(Command::new("pkg-config")
                .env("PKG_CONFIG_PATH", &pc_path)
                .args(["--cflags", "--libs", package]));
            String::from_utf8(out.stdout).unwrap().split_whitespace().map(str::to_owned).collect::<Vec<_>>()
        };
        // Shared: the status test, with the library found through an rpath.
        let exe = dir.join("status_test_pc");
        run(Command::new("gcc")
            .arg("-std=c11")
            .args(CFLAGS)
            .arg(root().join("examples-c/status_test.c"))
            .args(flags("distr_attention"))
            .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
            .arg("-lm")
            .arg("-o")
            .arg(&exe));
        check_status_test(&exe);
        // Static: the C example.
        let exe = dir.join("example_pc");
        run(Command::new("gcc")
            .arg("-std=c11")
            .args(CFLAGS)
            .arg(root().join("examples-c/example.c"))
            .args(flags("distr_attention-static"))
            .arg("-o")
            .arg(&exe));
        let out = run(&mut Command::new(&exe));
        assert!(String::from_utf8_lossy(&out.stdout).contains("replay of the plan: identical"));
    } else {
        eprintln!("skipped the pkg-config build: pkg-config is not installed");
    }

    if available("cmake") {
        let build = dir.join("cmake-build");
        run(Command::new("cmake")
            .arg("-S")
            .arg(root().join("examples-c"))
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display())));
        run(Command::new("cmake").arg("--build").arg(&build));
        let out = run(&mut Command::new(build.join("example")));
        assert!(String::from_utf8_lossy(&out.stdout).contains("replay of the plan: identical"));
        run(&mut Command::new(build.join("example_cpp")));
        // The shared library is found through the build tree's rpath or the prefix.
        check_status_test_with_path(&build.join("status_test"), &prefix.join("lib"));
        // A version the package does not meet is refused.
        let refused = dir.join("cmake-refused");
        std::fs::create_dir_all(&refused).unwrap();
        std::fs::write(
            refused.join("CMakeLists.txt"),
            "cmake_minimum_required(VERSION 3.16)\nproject(p C)\nfind_package(DistrAttention 9.0 REQUIRED)\n",
        )
        .unwrap();
        let out = Command::new("cmake")
            .arg("-S")
            .arg(&refused)
            .arg("-B")
            .arg(refused.join("build"))
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
            .output()
            .unwrap();
        assert!(!out.status.success(), "find_package(DistrAttention 9.0) succeeded");
    } else {
        eprintln!("skipped the CMake build: cmake is not installed");
    }
}

fn check_status_test_with_path(exe: &Path, lib_dir: &Path) {
    // Prepended: the CUDA build also needs the driver's directory that may be there.
    let mut path = std::ffi::OsString::from(lib_dir);
    if let Some(rest) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(rest);
    }
    let out = run(Command::new(exe).env("LD_LIBRARY_PATH", path));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().last().unwrap_or("").ends_with(" passed, 0 failed"), "{stdout}");
}

/// nvcc: `$NVCC` (set by .ci/cuda.sh) or the one on the PATH, with the
/// library directory of its toolkit (the PyPI toolchain's cudart is not on
/// nvcc's default search path).
#[cfg(feature = "cuda")]
fn nvcc() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let nvcc = std::env::var_os("NVCC")
        .map(std::path::PathBuf::from)
        .or_else(|| available("nvcc").then(|| std::path::PathBuf::from("nvcc")))?;
    let toolkit_lib = nvcc.parent().and_then(Path::parent).map(|p| p.join("lib")).unwrap_or_default();
    Some((nvcc, toolkit_lib))
}

/// The CUDA programs, built with nvcc against the shared library with the
/// CUDA entry points, and run: without a GPU they must say so and succeed;
/// with one, the example must find the GPU and the CPU in agreement and the
/// status test must pass.
#[cfg(feature = "cuda")]
#[test]
fn cuda_programs_build_and_run_or_skip() {
    let Some((nvcc, toolkit_lib)) = nvcc() else {
        eprintln!("skipped: no nvcc (source .ci/cuda.sh --env-only)");
        return;
    };
    let lib = library();
    let dir = scratch_dir("cuda_programs");
    for (source, extra, done) in [
        ("cuda_example.cu", None, "GPU and CPU agree"),
        ("cuda_status_test.cu", Some("-lcuda"), " passed, 0 failed"),
    ] {
        let exe = dir.join(source.trim_end_matches(".cu"));
        run(Command::new(&nvcc)
            .args(["-std=c++17", "-O2", "-Xcompiler", "-Wall,-Wextra,-Werror"])
            .arg("-I")
            .arg(root().join("include"))
            .arg(root().join("examples-c").join(source))
            .arg(format!("-L{}", toolkit_lib.display()))
            .arg(format!("-L{}", lib.dir.display()))
            .arg("-ldistr_attention")
            .arg("-Xlinker")
            .arg(format!("-rpath,{}", lib.dir.display()))
            .args(extra)
            .arg("-o")
            .arg(&exe));
        let out = run(&mut Command::new(&exe));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("skipped: no CUDA device") || stdout.contains(done), "{source}: {stdout}");
    }
}
