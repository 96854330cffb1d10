#!/usr/bin/env bash
# C ABI stage of CI (called by .ci/run after `cargo test --workspace`, which
# already checks the generated header, runs the ABI's Rust tests and the fuzz
# harness on fixed inputs, and compiles and runs the C and C++ programs).
# This stage adds what needs tools from outside the workspace, installed
# under .tools/ (git-ignored, reused by later runs):
#
#   1. the Python module's tests with numpy, in a venv (cargo test runs the
#      numpy part only where the system python3 has numpy);
#   2. the cargo-fuzz target, built with coverage instrumentation on the
#      stable toolchain (`-s none`: AddressSanitizer needs nightly) and run
#      for a bounded time. Longer runs, locally:
#        cargo +nightly fuzz run c_abi -- -max_total_time=300
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
tools="$root/.tools"
mkdir -p "$tools"

echo "-- the C library"
cargo build --quiet -p distr-attention-ffi --lib
library="$root/target/debug/libdistr_attention.so"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

echo "-- Python module tests with numpy (the PyTorch and transformers tests skip without those)"
venv="$tools/ffi-venv"
if ! "$venv/bin/python" -c "import numpy" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "numpy>=1.24"
fi
log=$(DA_LIBRARY="$library" DA_EXPECT_VERSION="$version" "$venv/bin/python" python/test_distr_attention.py -v 2>&1) || {
    echo "$log"
    exit 1
}
echo "$log" | tail -n 3
if echo "$log" | grep -q "skipped 'numpy"; then
    echo "Python tests were skipped although numpy is installed" >&2
    exit 1
fi

echo "-- fuzz target c_abi (60 s)"
fuzz_version=0.13.2
export PATH="$tools/cargo-fuzz/bin:$PATH"
if ! cargo fuzz --version 2>/dev/null | grep -q "$fuzz_version"; then
    cargo install --quiet --locked --version "$fuzz_version" --root "$tools/cargo-fuzz" cargo-fuzz
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/corpus"
if ! cargo fuzz run --sanitizer none --debug-assertions c_abi "$work/corpus" -- \
    -max_total_time=60 -print_final_stats=1 >"$work/log" 2>&1; then
    tail -n 80 "$work/log"
    echo "the fuzz target failed (crash input under fuzz/artifacts/c_abi/)" >&2
    exit 1
fi
grep -E "^stat::(number_of_executed_units|new_units_added|peak_rss_mb)" "$work/log"
echo "-- C ABI stage passed"
