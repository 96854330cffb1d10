#!/usr/bin/env bash
# Builds the backward pass's device binaries on a CPU machine (no GPU needed)
# and packs them into $DEVBIN (default .devbin; git-ignored), to be carried to
# the GPU machine and run by cuda-driver/bench/device_run_backward.sh:
#   gpu_backward     its integration tests (cargo test --no-run)
#   smoke_backward   the small case for compute-sanitizer
#   bench            the benchmark (release; --backward times training steps)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source .ci/cuda.sh --env-only
out="${DEVBIN:-.devbin}"
mkdir -p "$out"
msg=$(cargo test -p distr-attention-cuda --features cuda --test gpu_backward --no-run --message-format=json 2>/dev/null)
exe=$(echo "$msg" | python3 -c "import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='gpu_backward' and m.get('executable'): print(m['executable'])" | tail -n1)
xz -T2 -c "$exe" > "$out/gpu_backward.xz"
cargo build -p distr-attention-cuda --features cuda --example smoke_backward
xz -T2 -c target/debug/examples/smoke_backward > "$out/smoke_backward.xz"
cargo build -p distr-attention-cuda --features cuda --release --example bench
xz -T2 -c target/release/examples/bench > "$out/bench.xz"
ls -la "$out"
