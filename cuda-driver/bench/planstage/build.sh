#!/usr/bin/env bash
# Builds the planstage harness (CPU machine, no GPU needed) into $DEV/pst:
# planstage (host, driver API) and one sm_90a cubin per version of the plan
# kernel. VERSIONS="name=file ..." (files relative to the repository root;
# default: head=kernels/plan.cu at git HEAD, new=kernels/plan.cu as checked
# out). The first version is the reference of the byte-for-byte plan check.
# Then on the GPU machine: bash cuda-driver/bench/planstage/device.sh (same DEV).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
source .ci/cuda.sh --env-only
dev="${DEV:-.devbin}"
mkdir -p "$dev/pst"
tmp=$(mktemp -d)
git show HEAD:kernels/plan.cu > "$tmp/plan_head.cu"
versions="${VERSIONS:-head=$tmp/plan_head.cu new=kernels/plan.cu}"
here=cuda-driver/bench/planstage
: > "$dev/pst/versions"
for v in $versions; do
    name="${v%%=*}"; file="$(realpath "${v#*=}")"
    "$NVCC" -std=c++17 -O3 -cubin -gencode=arch=compute_90a,code=sm_90a -Ikernels -I"$(dirname "$file")" \
        -DPLAN_FILE="\"$file\"" $here/plan_variant.cu -o "$dev/pst/$name.cubin"
    echo "$name" >> "$dev/pst/versions"
done
lib="$(dirname "$NVCC")/../lib"
"$NVCC" -std=c++17 -O2 -x cu -gencode=arch=compute_90a,code=sm_90a -Ikernels $here/planstage.cpp -L"$lib" \
    -L"${CUDA_LIBRARY_PATH:-$lib}" -lcuda -o "$dev/pst/planstage"
rm -rf "$tmp"
ls -la "$dev/pst"
