//! Shared by the integration tests that drive programs in other languages:
//! the built C library, compilers, and the inputs of the examples.

#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("ffi/ has a parent").to_path_buf()
}

/// The C library as cargo builds it for the profile of this test executable.
#[derive(Debug)]
pub struct Library {
    /// Directory of `libdistr_attention.{so,a}`.
    pub dir: PathBuf,
    pub shared: PathBuf,
    pub static_lib: PathBuf,
}

/// Builds the C library (once per test executable) with the profile and
/// target directory this test executable was built with, found from its path
/// (`<target>/<profile>/deps/<test>`), and returns where it is.
///
/// `cargo test` compiles this package's library only as a test harness (it
/// has no rlib, see Cargo.toml), so the cdylib and staticlib are built here by
/// a nested cargo, which finds everything else up to date.
pub fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<test>");
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let profile = profile_dir.file_name().and_then(|s| s.to_str()).expect("profile directory name");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root())
            .args(["build", "--quiet", "-p", "distr-attention-ffi", "--lib", "--target-dir"])
            .arg(target_dir);
        // The library of the features these tests were built with.
        if cfg!(feature = "cuda") {
            cmd.args(["--features", "cuda"]);
        }
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let out = cmd.output().expect("run cargo");
        assert!(
            out.status.success(),
            "cargo build of the C library failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = Library {
            dir: profile_dir.to_path_buf(),
            shared: profile_dir.join("libdistr_attention.so"),
            static_lib: profile_dir.join("libdistr_attention.a"),
        };
        assert!(lib.shared.is_file() && lib.static_lib.is_file(), "no library in {}", lib.dir.display());
        lib
    })
}

/// Builds an example of the root package (`examples/NAME.rs`) with the
/// profile and target directory of this test executable, as [`library`] builds
/// the C library, and returns the path of its binary.
pub fn root_example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<test>");
    let target_dir = profile_dir.parent().expect("<target>/<profile>");
    let profile = profile_dir.file_name().and_then(|s| s.to_str()).expect("profile directory name");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root())
        .args(["build", "--quiet", "-p", "distr-attention", "--example", name, "--target-dir"])
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    run(&mut cmd);
    let bin = profile_dir.join("examples").join(name);
    assert!(bin.is_file(), "no example binary at {}", bin.display());
    bin
}

/// Reads `count` native-endian f64 from `bytes` at `*pos`, advancing it.
pub fn take_f64(bytes: &[u8], pos: &mut usize, count: usize) -> Vec<f64> {
    let v = bytes[*pos..*pos + 8 * count]
        .chunks_exact(8)
        .map(|c| f64::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    *pos += 8 * count;
    v
}

/// Reads `count` native-endian u32 from `bytes` at `*pos`, advancing it.
pub fn take_u32(bytes: &[u8], pos: &mut usize, count: usize) -> Vec<u32> {
    let v = bytes[*pos..*pos + 4 * count]
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    *pos += 4 * count;
    v
}

/// Writes f32 tensors `[batch, seq, heads, dim]` into a safetensors file (the
/// fixture format of `src/activations.rs`), with `__metadata__`.
pub fn write_safetensors(path: &Path, metadata: &[(&str, &str)], tensors: &[(&str, [usize; 4], &[f32])]) {
    let mut header = serde_json::Map::new();
    let meta: serde_json::Map<String, serde_json::Value> =
        metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
    header.insert("__metadata__".into(), meta.into());
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        let start = data.len();
        data.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend(json);
    file.extend(data);
    std::fs::write(path, file).expect("write the safetensors file");
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distr-attention-ffi").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}

/// What a program linking the static library needs from the system beyond
/// the C compiler's defaults: Rust's standard library's dependencies, and
/// with the `cuda` feature the driver (`-lcuda`; .ci/cuda.sh puts its
/// libcuda.so on `LIBRARY_PATH`).
pub fn static_libs() -> Vec<&'static str> {
    let mut libs = vec!["-lpthread", "-ldl", "-lm", "-lrt", "-lutil"];
    if cfg!(feature = "cuda") {
        libs.push("-lcuda");
    }
    libs
}

/// Runs a command, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// True when `program --version` runs.
pub fn available(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `examples-c/inputs.h` in Rust: the same numbers bit for bit.
pub fn hash(i: u32, salt: u32) -> u32 {
    let mut x = i.wrapping_mul(2_654_435_761).wrapping_add(salt.wrapping_mul(40_503));
    x ^= x >> 13;
    x = x.wrapping_mul(0x5bd1_e995);
    x ^= x >> 15;
    x
}

pub fn value(i: u32, salt: u32) -> f32 {
    (hash(i, salt) % 2001) as f32 / 1000.0 - 1.0
}

pub fn query(i: u32) -> f32 {
    let base = (hash(i & !1, 1) % 2001) as i32;
    let jitter = (hash(i, 4) % 101) as i32 - 50;
    (base + jitter) as f32 / 1000.0 - 1.0
}

/// Reads `count` native-endian f32 from `bytes` at `*pos`, advancing it.
pub fn take_f32(bytes: &[u8], pos: &mut usize, count: usize) -> Vec<f32> {
    let v = bytes[*pos..*pos + 4 * count]
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    *pos += 4 * count;
    v
}

/// Reads `count` native-endian u16 from `bytes` at `*pos`, advancing it.
pub fn take_u16(bytes: &[u8], pos: &mut usize, count: usize) -> Vec<u16> {
    let v = bytes[*pos..*pos + 2 * count]
        .chunks_exact(2)
        .map(|c| u16::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    *pos += 2 * count;
    v
}
