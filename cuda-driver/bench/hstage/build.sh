#!/usr/bin/env bash
# Builds the hstage binaries (CPU machine, no GPU needed) into $DEV/hst, xz-packed:
# hstage_v2_d{64,128} (kernels v2, the copy beside this file) and
# hstage_v3_d{64,128} (kernels/hfwd.cu as checked out). Then on the GPU machine:
#   bash cuda-driver/bench/hstage/device.sh   (with DEV pointing at the same folder)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
source .ci/cuda.sh --env-only
dev="${DEV:-.devbin}"
mkdir -p "$dev/hst"
lib="$(dirname "$NVCC")/../lib"
for d in 128 64; do
    for v in v2 v3; do
        if [ $v = v2 ]; then file='"hfwd_v2.cu"'; inc="-Icuda-driver/bench/hstage -Ikernels"; else file='"hfwd.cu"'; inc="-Ikernels"; fi
        "$NVCC" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DDA_HSTAGE -DDA_HEAD_DIM=$d -DDA_DTYPE=bf16 \
            -DDA_DTYPE_IS_BF16=1 $inc -DHFWD_FILE="$file" ${HSTAGE_FLAGS:-} cuda-driver/bench/hstage/hstage.cu \
            -L"$lib" -o "$dev/hst/hstage_${v}_d$d"
        xz -f -T1 "$dev/hst/hstage_${v}_d$d"
    done
done
ls -la "$dev/hst"
