#!/usr/bin/env bash
# CUDA stage of CI (called by .ci/run when present): installs the toolchain
# it needs into .tools/ (git-ignored, reused by later runs), compiles the
# kernels, links the `cuda` feature and runs its tests, which skip cleanly
# on a machine without a GPU.
#
#   * nvcc 13.0 from PyPI in a venv (.tools/cuda-venv), pinned as in
#     shared/docs/GPU_TOOLCHAIN.md (nvvm pinned too: 13.5's PTX is rejected
#     by the 13.0 ptxas);
#   * libcuda.so from Debian bookworm non-free (package libcuda1), unpacked
#     with a private apt state dir into .tools/libcuda/lib64, for linking
#     `cust` and for starting test binaries (cuInit then reports "no device").
#
# Environment it sets for cargo: NVCC, CUDA_LIBRARY_PATH, LD_LIBRARY_PATH,
# and LIBRARY_PATH (C programs linking the static C library built with CUDA
# need -lcuda).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
tools="$root/.tools"
mkdir -p "$tools"

# --- nvcc from PyPI -----------------------------------------------------------
venv="$tools/cuda-venv"
stamp="$venv/.installed-13.0"
if [ ! -f "$stamp" ]; then
    echo "-- installing nvcc 13.0 from PyPI into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*"
    touch "$stamp"
fi
nvcc=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n1)
[ -x "$nvcc" ] || { echo "nvcc not found in $venv" >&2; exit 1; }
export NVCC="$nvcc"
"$NVCC" --version | tail -n2

# --- libcuda.so from Debian (link time; run time without a GPU) ---------------
libcuda="$tools/libcuda"
if ! ls "$libcuda"/lib64/libcuda.so.1 >/dev/null 2>&1; then
    echo "-- fetching Debian's libcuda1 (bookworm non-free) into $libcuda"
    apt_dir="$tools/apt"
    rm -rf "$apt_dir" "$libcuda"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc/sources.list.d" \
        "$apt_dir/etc/preferences.d" "$apt_dir/deb" "$libcuda/lib64"
    cat > "$apt_dir/etc/sources.list.d/nonfree.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    : > "$apt_dir/etc/sources.list"
    apt_opts=(-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
        -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
        -o "Dir::Etc::SourceParts=$apt_dir/etc/sources.list.d"
        -o "Dir::Etc::Preferences=$apt_dir/etc/preferences" -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
        -o "APT::Architecture=amd64" -o "APT::Architectures=amd64" -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" update -qq
    (cd "$apt_dir/deb" && apt-get "${apt_opts[@]}" download -qq libcuda1)
    dpkg -x "$apt_dir"/deb/libcuda1_*.deb "$apt_dir/x"
    cp -a "$apt_dir"/x/usr/lib/x86_64-linux-gnu/nvidia/current/libcuda.so* "$libcuda/lib64/"
    ln -sf libcuda.so.1 "$libcuda/lib64/libcuda.so"
    rm -rf "$apt_dir"
fi
export CUDA_LIBRARY_PATH="$libcuda"
export LD_LIBRARY_PATH="$libcuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LIBRARY_PATH="$libcuda/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"

if [ "${1:-}" = "--env-only" ]; then
    # `source .ci/cuda.sh --env-only` prepares a developer shell and stops here.
    return 0 2>/dev/null || exit 0
fi

echo "== cargo clippy -p distr-attention-cuda --features cuda"
cargo clippy -p distr-attention-cuda --features cuda --all-targets -- -D warnings

echo "== cargo test -p distr-attention-cuda --features cuda"
cargo test -p distr-attention-cuda --features cuda -- --nocapture

# The wgmma wrappers are generated: the committed header is the generator's output.
echo "== kernels/wgmma_ops.cuh is kernels/gen_wgmma.py's output"
python3 kernels/gen_wgmma.py | diff -q - kernels/wgmma_ops.cuh

# The LSH plan kernel's logic under the host emulation (no GPU needed):
# fragments, the split of R, the tile pipeline (one or two tiles), the sort.
echo "== kernels/emu/plan_emu"
"${CXX:-c++}" -std=c++20 -O2 -fno-strict-aliasing -DDA_EMULATE -I kernels kernels/emu/plan_emu.cpp -o target/plan_emu
target/plan_emu 48 | tail -n 1
# The plan kernel's timing harness still builds (run on the GPU machine only).
echo "== cuda-driver/bench/planstage"
DEV=target/planstage bash cuda-driver/bench/planstage/build.sh > /dev/null

# The C ABI with its CUDA entry points: the same header (checked by the
# header test whatever the features), the Rust tests of the entry points'
# checks, the C/C++/Python programs against the CUDA build, and the CUDA
# programs built with nvcc (they skip without a GPU).
echo "== cargo clippy -p distr-attention-ffi --features cuda"
cargo clippy -p distr-attention-ffi --features cuda --all-targets -- -D warnings
echo "== cargo test -p distr-attention-ffi --features cuda"
cargo test -p distr-attention-ffi --features cuda
