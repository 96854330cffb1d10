#!/usr/bin/env bash
# Builds the device binaries on a CPU machine (no GPU needed) and packs them
# into .devbin/ (git-ignored via .git/info/exclude), to be carried to the GPU
# machine and run by cuda-driver/bench/device_run.sh:
#   gpu_tests, validation  the integration tests (cargo test --no-run)
#   smoke                  the small case for compute-sanitizer
#   bench                  the benchmark (release)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source .ci/cuda.sh --env-only
mkdir -p .devbin
rm -f .devbin/*
msg=$(cargo test -p distr-attention-cuda --features cuda --no-run --message-format=json 2>/dev/null)
for t in gpu validation; do
    exe=$(echo "$msg" | python3 -c "import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='$t' and m.get('executable'): print(m['executable'])" | tail -n1)
    name=$t; [ "$t" = gpu ] && name=gpu_tests
    xz -T2 -c "$exe" > ".devbin/$name.xz"
done
cargo build -p distr-attention-cuda --features cuda --example smoke
xz -T2 -c target/debug/examples/smoke > .devbin/smoke.xz
cargo build -p distr-attention-cuda --features cuda --release --example bench
xz -T2 -c target/release/examples/bench > .devbin/bench.xz
ls -la .devbin
