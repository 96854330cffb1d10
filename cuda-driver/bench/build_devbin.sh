#!/usr/bin/env bash
# Builds the device binaries on a CPU machine (no GPU needed) and packs them
# into .devbin/ (git-ignored via .git/info/exclude), to be carried to the GPU
# machine and run by cuda-driver/bench/device_run.sh:
#   gpu_tests, hopper_tests, validation, gpu_backward, gpu_similarity
#                          the integration tests (cargo test --no-run)
#   smoke, smoke_backward  the small cases for compute-sanitizer
#   bench                  the benchmark (release)
#   libdistr_attention.so, cuda_example, cuda_status_test
#                          the C library with the CUDA entry points and the
#                          C programs that use it (step `abi` of device_run.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source .ci/cuda.sh --env-only
# DEVBIN=dir packs elsewhere (for example into the tree the device tool sends).
out="${DEVBIN:-.devbin}"
mkdir -p "$out"
rm -f "$out"/*.xz
pack() { strip --strip-debug -o "$out/$2" "$1" && xz -T2 -f "$out/$2"; }
msg=$(cargo test -p distr-attention-cuda --features cuda --no-run --message-format=json 2>/dev/null)
for t in gpu hopper validation gpu_backward gpu_similarity; do
    exe=$(echo "$msg" | python3 -c "import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='$t' and m.get('executable'): print(m['executable'])" | tail -n1)
    name=$t; [ "$t" = gpu ] && name=gpu_tests; [ "$t" = hopper ] && name=hopper_tests
    pack "$exe" "$name"
done
cargo build -p distr-attention-cuda --features cuda --example smoke --example smoke_backward
pack target/debug/examples/smoke smoke
pack target/debug/examples/smoke_backward smoke_backward
cargo build -p distr-attention-cuda --features cuda --release --example bench
pack target/release/examples/bench bench
cargo build --release -p distr-attention-ffi --features cuda
pack target/release/libdistr_attention.so libdistr_attention.so
cudalib="$(dirname "$NVCC")/../lib"
for prog in cuda_example cuda_status_test; do
    "$NVCC" -std=c++17 -O2 -Iinclude "examples-c/$prog.cu" -L"$cudalib" -Ltarget/release -ldistr_attention -lcuda \
        -Xlinker -rpath,'$ORIGIN' -o "/tmp/$prog"
    pack "/tmp/$prog" "$prog"
done
ls -la "$out"
