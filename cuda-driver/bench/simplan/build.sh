#!/usr/bin/env bash
# Builds the device binaries of the similarity-plan work on a CPU machine and
# packs them, with run.sh, into the folder given (default .dev-simplan/):
#   gpu_similarity  the similarity-plan tests (cargo test --no-run)
#   gpu_tests       the existing GPU tests (LSH plan and attention)
#   plan_bench      plan vs attention timing (release)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
dst="${1:-.dev-simplan}"
source .ci/cuda.sh --env-only
mkdir -p "$dst"
rm -f "$dst"/*.xz
msg=$(cargo test -p distr-attention-cuda --features cuda --no-run --message-format=json 2>/dev/null)
for t in gpu_similarity gpu; do
    exe=$(echo "$msg" | python3 -c "import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='$t' and m.get('executable'): print(m['executable'])" | tail -n1)
    name=$t; [ "$t" = gpu ] && name=gpu_tests
    xz -T2 -c "$exe" > "$dst/$name.xz"
done
cargo build -p distr-attention-cuda --features cuda --release --example plan_bench
xz -T2 -c target/release/examples/plan_bench > "$dst/plan_bench.xz"
cp cuda-driver/bench/simplan/run.sh "$dst/run.sh"
ls -la "$dst"
