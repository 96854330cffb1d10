#!/bin/sh
# Installs the DistrAttention C library under a prefix, with what C and C++
# build systems look for:
#   PREFIX/include/distr_attention.h, distr_attention.hpp
#   PREFIX/lib/libdistr_attention.so, libdistr_attention.a
#   PREFIX/lib/pkgconfig/distr_attention.pc, distr_attention-static.pc
#   PREFIX/lib/cmake/DistrAttention/DistrAttentionConfig.cmake (+ ConfigVersion)
# A library built with `--features cuda` is recognised, and its static link
# lines get -lcuda.
#
# Usage: ffi/dist/install.sh PREFIX [LIBRARY_DIR]
# Without LIBRARY_DIR, builds the library with `cargo build --release` first
# and installs it from target/release.
set -eu

if [ $# -lt 1 ]; then
    echo "usage: $0 PREFIX [LIBRARY_DIR]" >&2
    exit 2
fi
mkdir -p "$1"
prefix=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ $# -ge 2 ]; then
    built=$(cd "$2" && pwd)
else
    cargo build --release -p distr-attention-ffi --manifest-path "$root/Cargo.toml"
    built="$root/target/release"
fi

# The workspace version (the first `version = "..."` of the root manifest).
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
major=${version%%.*}
minor=${version#*.}
minor=${minor%%.*}
# What Rust's standard library needs from the system when linked statically
# (`cargo rustc --crate-type staticlib -- --print native-static-libs`, less
# what the C compiler links anyway).
native_libs="-lpthread -ldl -lm -lrt -lutil"
cmake_libs="Threads::Threads;\${CMAKE_DL_LIBS};m;rt;util"
cuda=OFF
# A library built with the `cuda` feature calls the CUDA driver: the static
# library then needs -lcuda too (the shared one records libcuda.so.1 itself).
if grep -qa cuLaunchKernel "$built/libdistr_attention.a"; then
    native_libs="$native_libs -lcuda"
    cmake_libs="$cmake_libs;cuda"
    cuda=ON
fi

install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/DistrAttention"
install -m 644 "$root/include/distr_attention.h" "$root/include/distr_attention.hpp" "$prefix/include/"
install -m 755 "$built/libdistr_attention.so" "$prefix/lib/"
install -m 644 "$built/libdistr_attention.a" "$prefix/lib/"
subst() {
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@VERSION_MAJOR@|$major|g" \
        -e "s|@VERSION_MINOR@|$minor|g" -e "s|@NATIVE_LIBS@|$native_libs|g" -e "s|@CMAKE_LIBS@|$cmake_libs|g" \
        -e "s|@CUDA@|$cuda|g" "$here/$1" >"$2"
}
subst distr_attention.pc.in "$prefix/lib/pkgconfig/distr_attention.pc"
subst distr_attention-static.pc.in "$prefix/lib/pkgconfig/distr_attention-static.pc"
subst DistrAttentionConfig.cmake.in "$prefix/lib/cmake/DistrAttention/DistrAttentionConfig.cmake"
subst DistrAttentionConfigVersion.cmake.in "$prefix/lib/cmake/DistrAttention/DistrAttentionConfigVersion.cmake"
echo "installed distr_attention $version under $prefix (CUDA entry points: $cuda)"
