#!/usr/bin/env bash
# Builds the device binaries on a CPU machine (no GPU needed) and packs them
# into .devbin/ (git-ignored via .git/info/exclude), to be carried to the GPU
# machine and run by cuda-driver/bench/device_run.sh:
#   gpu_tests, hopper_tests, validation  the integration tests (cargo test --no-run)
#   smoke                  the small case for compute-sanitizer
#   bench                  the benchmark (release)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source .ci/cuda.sh --env-only
# DEVBIN=dir packs elsewhere (for example into the tree the device tool sends).
out="${DEVBIN:-.devbin}"
mkdir -p "$out"
rm -f "$out"/*.xz
msg=$(cargo test -p distr-attention-cuda --features cuda --no-run --message-format=json 2>/dev/null)
for t in gpu hopper validation; do
    exe=$(echo "$msg" | python3 -c "import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='$t' and m.get('executable'): print(m['executable'])" | tail -n1)
    name=$t; [ "$t" = gpu ] && name=gpu_tests; [ "$t" = hopper ] && name=hopper_tests
    xz -T2 -c "$exe" > "$out/$name.xz"
done
cargo build -p distr-attention-cuda --features cuda --example smoke
xz -T2 -c target/debug/examples/smoke > "$out/smoke.xz"
cargo build -p distr-attention-cuda --features cuda --release --example bench
xz -T2 -c target/release/examples/bench > "$out/bench.xz"
ls -la "$out"
