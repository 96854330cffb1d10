#!/usr/bin/env bash
# The device binaries of a backward run (CPU machine), xz-packed into $DEV:
# gpu_backward (tests/gpu_backward.rs), smoke_backward (the sanitizer cases),
# bench (release; `bench --backward`), then the bwdstage binaries (build.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
source .ci/cuda.sh --env-only > /dev/null
dev="${DEV:-.devbin}"
mkdir -p "$dev"
pack() { strip --strip-debug -o "$dev/$2" "$1" && xz -T2 -f "$dev/$2"; }
msg=$(cargo test -p distr-attention-cuda --features cuda --test gpu_backward --no-run --message-format=json 2>/dev/null)
exe=$(echo "$msg" | python3 -c "import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='gpu_backward' and m.get('executable'): print(m['executable'])" | tail -n1)
pack "$exe" gpu_backward
cargo build -p distr-attention-cuda --features cuda --example smoke_backward
pack target/debug/examples/smoke_backward smoke_backward
cargo build -p distr-attention-cuda --features cuda --release --example bench
pack target/release/examples/bench bench
DEV="$dev" bash cuda-driver/bench/bwdstage/build.sh
ls -la "$dev"
