#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, then builds and runs every
# test. Written for a fresh Debian 12 machine (root, no GPU, no CUDA); run from anywhere.
# A second run installs nothing.
#
# - Debian packages: libclang1 (bindgen loads it to check kernels/params.h against
#   src/device/params.rs).
# - The CUDA 12.4 compiler as pip wheels, pinned, into .tools/cuda (git-ignored): NVRTC, the CUDA
#   headers and ptxas. 12.4 because a driver refuses PTX newer than itself: NVRTC 12.4 emits PTX
#   ISA 8.4, which drivers from R550 on accept (see build/ptx.rs).
#
# In this command a missing compiler or libclang is a failure, not a fallback
# (LORAFUSE_REQUIRE_PTX=1, LORAFUSE_REQUIRE_BINDGEN=1; set either to 0 to relax).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

apt_packages=(libclang1)
tools=$root/.tools/cuda
cuda_wheels=(
    nvidia-cuda-nvrtc-cu12==12.4.127
    nvidia-cuda-runtime-cu12==12.4.127
    nvidia-cuda-nvcc-cu12==12.4.131
)
stamp=$tools/.lorafuse-stamp # read by build/ptx.rs: a new stamp re-runs the build script

now_ms() { date +%s%3N; }
timings=()
# phase NAME COMMAND...: runs COMMAND, printing its wall time.
phase() {
    local name=$1 start
    shift
    echo "==> $name"
    start=$(now_ms)
    "$@"
    local ms=$(($(now_ms) - start))
    local secs=$((ms / 1000)).$((ms % 1000 / 100))
    timings+=("$(printf '%-12s %7s s' "$name" "$secs")")
    echo "==> $name: $secs s"
}

install_apt_packages() {
    local missing=()
    for pkg in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        echo "Debian packages present: ${apt_packages[*]}"
        return
    fi
    local sudo=()
    if [[ $(id -u) != 0 ]]; then sudo=(sudo -n); fi
    echo "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

install_cuda_wheels() {
    local want
    want=$(printf '%s\n' "${cuda_wheels[@]}")
    if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
        echo "CUDA wheels present in $tools: ${cuda_wheels[*]}"
        return
    fi
    echo "installing into $tools: ${cuda_wheels[*]}"
    # A fresh folder: pip --target does not replace an older pin's files.
    rm -rf "$tools"
    python3 -m pip install --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
        --no-input --root-user-action=ignore --target "$tools" "${cuda_wheels[@]}"
    printf '%s\n' "$want" >"$stamp"
}

phase apt install_apt_packages
phase cuda-wheels install_cuda_wheels

export LORAFUSE_CUDA_TOOLS=$tools
export LORAFUSE_REQUIRE_PTX=${LORAFUSE_REQUIRE_PTX:-1}
export LORAFUSE_REQUIRE_BINDGEN=${LORAFUSE_REQUIRE_BINDGEN:-1}

phase build cargo build --release
# The ptxas resource table (registers, shared memory, spills per kernel and architecture).
phase info cargo run --release --quiet -- info
phase test cargo test --release
# API docs: shapes like [M,K] in doc comments must sit in code spans, or rustdoc reads them as links.
phase docs env RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps

echo "==> timings"
printf '  %s\n' "${timings[@]}"
