//! The checked-in header equals a fresh cbindgen generation.
//!
//! `DA_UPDATE_HEADER=1 cargo test -p distr-attention-ffi --test header`
//! rewrites `include/distr_attention.h` instead of failing.

use std::path::Path;

#[test]
fn header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("header is UTF-8");
    let path = crate_dir.join("../include/distr_attention.h");
    if std::env::var_os("DA_UPDATE_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write header");
        eprintln!("rewrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let first = committed.lines().zip(fresh.lines()).position(|(a, b)| a != b).map_or_else(
            || {
                format!(
                    "line counts differ ({} committed, {} generated)",
                    committed.lines().count(),
                    fresh.lines().count()
                )
            },
            |i| {
                format!(
                    "first difference at line {}:\n  committed: {}\n  generated: {}",
                    i + 1,
                    committed.lines().nth(i).unwrap_or(""),
                    fresh.lines().nth(i).unwrap_or("")
                )
            },
        );
        panic!(
            "{} is out of date ({first}).\nRegenerate it with: DA_UPDATE_HEADER=1 cargo test -p distr-attention-ffi --test header",
            path.display()
        );
    }
}
