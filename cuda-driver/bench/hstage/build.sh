#!/usr/bin/env bash
# Builds the hstage binaries (CPU machine, no GPU needed) into $DEV/hst, xz-packed:
# hstage_d{64,128}, each linking four versions of the kernel (hstage_k.cu
# compiled four times, namespaces renamed): v2 (hfwd_v2.cu beside this
# file, the reference of `check`), old and mid (kernels/hfwd.cu at git
# revisions $OLD, default the v5 kernel, and $MID, default v6's cp.async
# producer; both take the FwdParams only) and new (kernels/hfwd.cu as
# checked out, with its TMA descriptors). OLD_FILE / MID_FILE take a file
# instead of a revision; OLD_FLAGS / MID_FLAGS add nvcc flags (-DHS_TMA=1 for a
# version with TMA descriptors, v7 and later). Then on
# the GPU machine: bash cuda-driver/bench/hstage/device.sh (DEV = the same folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
source .ci/cuda.sh --env-only
dev="${DEV:-.devbin}"
old="${OLD:-a6c2aee}"
mid="${MID:-9e14f83}"
mkdir -p "$dev/hst"
lib="$(dirname "$NVCC")/../lib"
tmp=$(mktemp -d)
if [ -n "${OLD_FILE:-}" ]; then cp "$OLD_FILE" "$tmp/hfwd_old.cu"; else git show "$old:kernels/hfwd.cu" > "$tmp/hfwd_old.cu"; fi
if [ -n "${MID_FILE:-}" ]; then cp "$MID_FILE" "$tmp/hfwd_mid.cu"; else git show "$mid:kernels/hfwd.cu" > "$tmp/hfwd_mid.cu"; fi
here=cuda-driver/bench/hstage
flags="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DDA_HSTAGE -DDA_DTYPE=bf16 -DDA_DTYPE_IS_BF16=1 -Ikernels -Icuda-driver/bench"
for d in 128 64; do
    "$NVCC" $flags -DDA_HEAD_DIM=$d -I$here -DHFWD_FILE='"hfwd_v2.cu"' -Dda=da_v2 -DHS_NS=hs_v2 -c $here/hstage_k.cu -o "$tmp/v2.o" &
    "$NVCC" $flags -DDA_HEAD_DIM=$d -I"$tmp" -DHFWD_FILE='"hfwd_old.cu"' -Dda=da_old -DHS_NS=hs_old ${OLD_FLAGS:-} -c $here/hstage_k.cu -o "$tmp/old.o" &
    wait
    "$NVCC" $flags -DDA_HEAD_DIM=$d -I"$tmp" -DHFWD_FILE='"hfwd_mid.cu"' -Dda=da_mid -DHS_NS=hs_mid ${MID_FLAGS:-} -c $here/hstage_k.cu -o "$tmp/mid.o" &
    "$NVCC" $flags -DDA_HEAD_DIM=$d -DHFWD_FILE='"hfwd.cu"' -DHS_NS=hs_new -DHS_PROF=1 -DHS_TMA=1 ${HSTAGE_FLAGS:-} \
        -c $here/hstage_k.cu -o "$tmp/new.o" &
    wait
    "$NVCC" $flags -DDA_HEAD_DIM=$d -c $here/hstage.cu -o "$tmp/main.o"
    # -lcuda: cuTensorMapEncodeTiled (libcuda from .ci/cuda.sh's CUDA_LIBRARY_PATH here, the driver's there).
    "$NVCC" -gencode=arch=compute_90a,code=sm_90a "$tmp/main.o" "$tmp/v2.o" "$tmp/old.o" "$tmp/mid.o" "$tmp/new.o" -L"$lib" \
        -L"${CUDA_LIBRARY_PATH:-$lib}" -lcuda -o "$dev/hst/hstage_d$d"
    xz -f -T1 "$dev/hst/hstage_d$d"
done
rm -rf "$tmp"
ls -la "$dev/hst"
