//! Compiles the CUDA kernels of `../kernels` when the `cuda` feature is on;
//! does nothing otherwise (the default build needs no CUDA toolkit).
//!
//! Each translation unit is compiled three times: a cubin for sm_90a
//! (Hopper), a cubin for sm_80 (runs on every 8.x device) and PTX for
//! compute_80 (JIT-compiled by the driver on newer architectures). The
//! outputs land in OUT_DIR and are embedded with `include_bytes!` through the
//! generated `kernels.rs`; nothing is compiled at run time except that PTX.
//!
//! `DISTR_ATTENTION_LINEINFO=1` adds line tables (for compute-sanitizer).
//!
//! nvcc is taken from `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else the PyPI
//! toolchain that `.ci/cuda.sh` installs under `.tools/`, else `nvcc` on PATH.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// One translation unit: a name, the source file and its `-D` definitions.
struct Unit {
    name: String,
    source: &'static str,
    defines: Vec<String>,
}

/// One nvcc run for a unit.
#[derive(Clone, Copy)]
enum Target {
    Sm90a,
    Sm80,
    Ptx80,
}

impl Target {
    fn suffix(self) -> &'static str {
        match self {
            Target::Sm90a => "sm_90a.cubin",
            Target::Sm80 => "sm_80.cubin",
            Target::Ptx80 => "compute_80.ptx",
        }
    }
    fn args(self) -> [&'static str; 2] {
        match self {
            Target::Sm90a => ["-gencode=arch=compute_90a,code=sm_90a", "-cubin"],
            Target::Sm80 => ["-gencode=arch=compute_80,code=sm_80", "-cubin"],
            Target::Ptx80 => ["-gencode=arch=compute_80,code=compute_80", "-ptx"],
        }
    }
}

/// Head dimensions and element types with an attention kernel.
pub const HEAD_DIMS: [usize; 3] = [32, 64, 128];
pub const DTYPES: [&str; 2] = ["f16", "bf16"];
/// Head dimensions with a Hopper (wgmma) attention kernel.
pub const HOPPER_HEAD_DIMS: [usize; 2] = [64, 128];

/// A unit of an attention kernel (`source` = hfwd.cu, fwd.cu, ...) for one
/// element type and head dim: `<stem>_<dtype>_d<d>`.
fn attention_unit(source: &'static str, dtype: &str, d: usize) -> Unit {
    Unit {
        name: format!("{}_{dtype}_d{d}", source.trim_end_matches(".cu")),
        source,
        defines: vec![
            format!("DA_DTYPE={dtype}"),
            format!("DA_DTYPE_IS_BF16={}", (dtype == "bf16") as u8),
            format!("DA_HEAD_DIM={d}"),
        ],
    }
}

fn units() -> Vec<Unit> {
    let mut v = vec![Unit { name: "plan".into(), source: "plan.cu", defines: vec![] }];
    // The Hopper forward and backward main kernels (kernels/hfwd.cu, hbwd.cu):
    // a real body only in the sm_90a image.
    for source in ["hfwd.cu", "hbwd.cu"] {
        for dtype in DTYPES {
            for d in HOPPER_HEAD_DIMS {
                v.push(attention_unit(source, dtype, d));
            }
        }
    }
    // Similarity/key-weighted plans: one unit per (dtype, head_dim).
    for dtype in DTYPES {
        for d in HEAD_DIMS {
            v.push(Unit {
                name: format!("simplan_{dtype}_d{d}"),
                source: "simplan.cu",
                defines: vec![
                    format!("DA_DTYPE_IS_BF16={}", (dtype == "bf16") as u8),
                    format!("DA_SIMPLAN_DIM={d}"),
                ],
            });
        }
    }
    for dtype in DTYPES {
        for d in HEAD_DIMS {
            for source in ["fwd.cu", "bwd.cu"] {
                v.push(attention_unit(source, dtype, d));
            }
        }
    }
    v
}

fn workspace_root() -> PathBuf {
    Path::new(&env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("..")
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME").or_else(|| env::var_os("CUDA_PATH")) {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    // The PyPI toolchain of .ci/cuda.sh.
    let venv_lib = workspace_root().join(".tools").join("cuda-venv").join("lib");
    if let Ok(entries) = std::fs::read_dir(&venv_lib) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    let on_path = Command::new("nvcc").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    on_path.then(|| PathBuf::from("nvcc"))
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=DISTR_ATTENTION_LINEINFO");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let kernels = workspace_root().join("kernels");
    for f in [
        "common.cuh",
        "inverse_gray.cuh",
        "plan.cu",
        "fwd.cu",
        "hfwd.cu",
        "bwd.cu",
        "bwd_params.cuh",
        "hbwd.cu",
        "hopper.cuh",
        "wgmma_ops.cuh",
        "simplan.cu",
    ] {
        println!("cargo:rerun-if-changed={}", kernels.join(f).display());
    }
    let Some(nvcc) = find_nvcc() else {
        panic!(
            "\n\ndistr-attention-cuda: the `cuda` feature needs nvcc (CUDA 12.x or 13.x) and none was found.\n\
             Set NVCC=/path/to/nvcc or CUDA_HOME=/path/to/cuda, or install the pinned PyPI toolchain into\n\
             .tools/ with `source .ci/cuda.sh --env-only` (nvcc 13.0 from PyPI, see shared/docs/GPU_TOOLCHAIN.md).\n\
             Build without `--features cuda` to skip the CUDA backend.\n"
        );
    };
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));

    let mut jobs = Vec::new();
    for u in units() {
        for t in [Target::Sm90a, Target::Sm80, Target::Ptx80] {
            jobs.push((u.name.clone(), u.source, u.defines.clone(), t));
        }
    }
    let jobs = Arc::new(Mutex::new(jobs));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    // Line tables (for compute-sanitizer and profilers) triple the cubins' size.
    let lineinfo = env::var_os("DISTR_ATTENTION_LINEINFO").is_some_and(|v| v == "1");
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (jobs, errors, nvcc, kernels, out) = (jobs.clone(), errors.clone(), &nvcc, &kernels, &out);
            s.spawn(move || loop {
                let Some((name, source, defines, target)) = jobs.lock().unwrap().pop() else { break };
                let dst = out.join(format!("{name}.{}", target.suffix()));
                let mut cmd = Command::new(nvcc);
                cmd.args(["-std=c++17", "-O3"])
                    .args(lineinfo.then_some("-lineinfo"))
                    .args(target.args())
                    .args(defines.iter().map(|d| format!("-D{d}")))
                    .arg("-I")
                    .arg(kernels)
                    .arg(kernels.join(source))
                    .arg("-o")
                    .arg(&dst);
                match cmd.output() {
                    Ok(o) if o.status.success() => {
                        let warnings = String::from_utf8_lossy(&o.stderr);
                        for line in warnings.lines().filter(|l| !l.trim().is_empty()) {
                            println!("cargo:warning={name} ({}): {line}", target.suffix());
                        }
                        if matches!(target, Target::Ptx80) {
                            // cuModuleLoadData wants NUL-terminated PTX.
                            let mut ptx = std::fs::read(&dst).expect("read ptx");
                            ptx.push(0);
                            std::fs::write(&dst, ptx).expect("write ptx");
                        }
                    }
                    Ok(o) => errors.lock().unwrap().push(format!(
                        "nvcc failed for {name} ({}):\n{}{}",
                        target.suffix(),
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    Err(e) => errors.lock().unwrap().push(format!("could not run {}: {e}", nvcc.display())),
                }
            });
        }
    });
    let errors = errors.lock().unwrap();
    if !errors.is_empty() {
        panic!("\n{}", errors.join("\n"));
    }

    let mut src = String::from("// Generated by build.rs: the embedded kernel images.\n");
    src.push_str("pub(crate) static MODULES: &[ModuleImage] = &[\n");
    for u in units() {
        let _ = writeln!(
            src,
            "    ModuleImage {{ name: {:?}, sm90a: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.sm_90a.cubin\")), \
             sm80: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.sm_80.cubin\")), \
             ptx: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.compute_80.ptx\")) }},",
            u.name,
            n = u.name
        );
    }
    src.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), src).expect("write kernels.rs");
}
