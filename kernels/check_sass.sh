#!/usr/bin/env bash
# SASS check of the Hopper kernels (kernels/hfwd.cu, the backward's
# kernels/hbwd.cu): compiles each translation unit for sm_90a with `-Xptxas
# -v` and fails unless every da_hfwd_* / da_hbwd_* kernel has no stack frame
# and no spills (ptxas report), contains
# HGMMA (wgmma) instructions and no local-memory access (LDL/STL) in its
# SASS (cuobjdump --dump-sass), ptxas reports no serialised or compiler-
# injected wgmma waits (C7510-C7519), and the consumers' softmax overlaps the
# P V GEMM (forward only): at least 64 MUFU.EX2 (one tile's exponentials per
# thread) between a `wgmma.wait_group 1` (WARPGROUP.DEPBAR.LE gsb0, 0x1) and
# the next `wait_group 0`.
#
#   bash kernels/check_sass.sh [outdir]
#
# nvcc: $NVCC (see .ci/cuda.sh --env-only). cuobjdump: $CUOBJDUMP, else on
# PATH, else a venv under .tools/sass-venv with the PyPI packages
# nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm (installed on first use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
nvcc="${NVCC:-nvcc}"
cuobjdump="${CUOBJDUMP:-}"
if [ -z "$cuobjdump" ]; then
    if command -v cuobjdump >/dev/null; then
        cuobjdump=cuobjdump
    else
        venv=../.tools/sass-venv
        if [ ! -x "$venv/bin/python" ]; then
            python3 -m venv "$venv"
            "$venv/bin/pip" install -q --disable-pip-version-check nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
        fi
        cuobjdump=$(find "$venv" -name cuobjdump -type f | head -n1)
    fi
fi
# cuobjdump needs nvdisasm beside it or on PATH.
export PATH="$(dirname "$(command -v "$cuobjdump" || echo "$cuobjdump")"):$PATH"
status=0
for unit in hfwd hbwd; do
for dtype in bf16 f16; do
    for d in 64 128; do
        is_bf16=$([ $dtype = bf16 ] && echo 1 || echo 0)
        cubin="$out/${unit}_${dtype}_d${d}.sm_90a.cubin"
        "$nvcc" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -cubin -Xptxas -v \
            -DDA_DTYPE=$dtype -DDA_DTYPE_IS_BF16=$is_bf16 -DDA_HEAD_DIM=$d -I. $unit.cu -o "$cubin" \
            > "$out/ptxas_${unit}_${dtype}_d${d}.txt" 2>&1
        "$cuobjdump" --dump-sass "$cubin" > "$out/${unit}_${dtype}_d${d}.sass"
        # Per kernel: registers, stack, spills, HGMMA count, LDL/STL count.
        python3 - "$out/ptxas_${unit}_${dtype}_d${d}.txt" "$out/${unit}_${dtype}_d${d}.sass" $unit <<'PY' || status=1
import re, sys
ptxas, sass = open(sys.argv[1]).read(), open(sys.argv[2]).read()
fwd = sys.argv[3] == "hfwd"
ok = True
for name, body in re.findall(r"Function properties for (\S+)\n(.*?)(?=Compiling entry|\Z)", ptxas, re.S):
    stack = int(re.search(r"(\d+) bytes stack frame", body).group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", body)]
    regs = re.search(r"Used (\d+) registers", body).group(1)
    m = re.search(r"Function : " + re.escape(name) + r"\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S)
    code = m.group(1) if m else ""
    hgmma = len(re.findall(r"\bHGMMA\.", code))
    local = len(re.findall(r"\b(?:LDL|STL)\b", code))
    serial = len(re.findall(r"\(C751\d\)[^\n]*'" + re.escape(name) + "'", ptxas))
    overlap = max([len(re.findall(r"MUFU\.EX2", w)) for w in
                   re.findall(r"DEPBAR\.LE gsb0, 0x1 ;(.*?)DEPBAR\.LE gsb0, 0x0 ;", code, re.S)] or [0])
    good = stack == 0 and sum(spills) == 0 and hgmma > 0 and local == 0 and serial == 0 and (overlap >= 64 or not fwd)
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'} {name}: {regs} registers (cap at entry), stack {stack} B, "
          f"spills {sum(spills)} B, HGMMA {hgmma}, LDL/STL {local}, wgmma serialised {serial}"
          + (f", EX2 under the P V GEMM {overlap}" if fwd else ""))
sys.exit(0 if ok else 1)
PY
    done
done
done
[ $status -eq 0 ] && echo "check_sass: all Hopper kernels use HGMMA, no spills, no local memory" || echo "check_sass: FAILED"
exit $status
