//! The checked-in header equals a fresh cbindgen generation, and the built
//! library exports exactly the functions it declares (run with and without
//! the `cuda` feature: both builds have one header).
//!
//! `DA_UPDATE_HEADER=1 cargo test -p distr-attention-ffi --test header`
//! rewrites `include/distr_attention.h` instead of failing.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

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

#[test]
fn library_exports_exactly_the_declared_functions() {
    if !common::available("nm") {
        eprintln!("skipped: nm is not installed");
        return;
    }
    let header =
        std::fs::read_to_string(common::root().join("include/distr_attention.h")).expect("read header");
    let declared: BTreeSet<String> = header
        .lines()
        .filter(|l| !l.trim_start().starts_with("//") && !l.starts_with('#'))
        .flat_map(|l| {
            l.match_indices("da_").filter_map(move |(i, _)| {
                let name: String =
                    l[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let before_ok = i == 0 || !l[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
                (before_ok && l[i + name.len()..].starts_with('(')).then_some(name)
            })
        })
        .collect();
    let lib = common::library();
    let out = common::run(Command::new("nm").args(["-D", "--defined-only"]).arg(&lib.shared));
    let exported: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [_, "T", name] if name.starts_with("da_") => Some(name.to_owned()),
            _ => None,
        })
        .collect();
    assert!(declared.len() >= 29 && declared.iter().any(|n| n.starts_with("da_cuda_")), "{declared:?}");
    assert_eq!(exported, declared, "exported (cuda feature: {}) vs declared", cfg!(feature = "cuda"));
}
