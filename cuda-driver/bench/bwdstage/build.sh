#!/usr/bin/env bash
# Builds the bwdstage binaries (CPU machine) into $DEV/bst, xz-packed: one per
# version of the Hopper backward's main kernel, each with bwd.cu's row passes:
#   old         kernels/hbwd.cu and bwd.cu at revision $OLD (default HEAD)
#   old_noatom  the same without the dQhat atomics (wrong dQ: timing only;
#               a version before the bulk reductions, OLD=f8d9ead)
#   new         kernels/hbwd.cu and bwd.cu as checked out
#   NAME        for each NAME=FILE in $ALT: FILE as hbwd.cu, with bwd.cu as checked out
# Then on the GPU machine: bash cuda-driver/bench/bwdstage/device.sh (DEV = the same folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
source .ci/cuda.sh --env-only > /dev/null
dev="${DEV:-.devbin}"
old="${OLD:-HEAD}"
here=cuda-driver/bench/bwdstage
mkdir -p "$dev/bst"
tmp=$(mktemp -d)
vs="old new"
git show "$old:kernels/hbwd.cu" > "$tmp/old.cu"
git show "$old:kernels/bwd.cu" > "$tmp/old_bwd.cu"
if grep -q "if (t < DG) red_add2(" "$tmp/old.cu"; then
    sed 's/if (t < DG) red_add2(/if (t < 0) red_add2(/' "$tmp/old.cu" > "$tmp/old_noatom.cu"
    cp "$tmp/old_bwd.cu" "$tmp/old_noatom_bwd.cu"
    vs="old old_noatom new"
fi
cp kernels/hbwd.cu "$tmp/new.cu"
cp kernels/bwd.cu "$tmp/new_bwd.cu"
# ALT="name=file ...": more versions, those hbwd.cu files with the checked-out bwd.cu.
for a in ${ALT:-}; do
    cp "${a#*=}" "$tmp/${a%%=*}.cu"
    cp kernels/bwd.cu "$tmp/${a%%=*}_bwd.cu"
    vs="$vs ${a%%=*}"
done
flags="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DDA_DTYPE=bf16 -DDA_DTYPE_IS_BF16=1 -DDA_HEAD_DIM=128 -Ikernels -Icuda-driver/bench"
lib="$(dirname "$NVCC")/../lib"
"$NVCC" -c $here/shadows.cpp -o "$tmp/shadows.o"
rm -f "$dev"/bst/*.xz
for v in $vs; do
    "$NVCC" $flags -DBWD_FILE="\"$tmp/${v}_bwd.cu\"" -c $here/rows.cu -o "$tmp/${v}_rows.o" &
    "$NVCC" $flags -DHBWD_FILE="\"$tmp/$v.cu\"" -c $here/bwdstage.cu -o "$tmp/$v.o" &
    wait
    "$NVCC" -gencode=arch=compute_90a,code=sm_90a "$tmp/shadows.o" "$tmp/$v.o" "$tmp/${v}_rows.o" -L"$lib" \
        -o "$dev/bst/bwdstage_$v"
    xz -f -T1 "$dev/bst/bwdstage_$v"
done
rm -rf "$tmp"
ls -la "$dev/bst"
