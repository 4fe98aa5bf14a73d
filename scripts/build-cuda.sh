#!/usr/bin/env bash
# Builds the engine's binaries with the `cuda` feature (release), on a machine with or without
# a system CUDA toolkit and with or without a GPU.
#
# Usage: scripts/build-cuda.sh [--toolkit-only] [-- extra cargo args]
#        scripts/build-cuda.sh --tests [-- extra cargo args]   (cargo test --no-run: GPU test binaries)
#
# Toolkit, in order of preference:
#   1. CUDA_TOOLKIT_DIR=/path  a toolkit root holding bin/nvcc, include/, lib/ (or lib64/).
#      A system install (/usr/local/cuda) works as is.
#   2. nvcc on PATH (CUDA_HOME derived from it).
#   3. Otherwise CUDA 13.0 is unpacked from NVIDIA's PyPI wheels into
#      CUDA_WHEELS_DIR (default ~/.cache/sdcrossframe-cuda13) the first time:
#        pip download --no-deps nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88
#          nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
#          nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
#      unzip them, add the unversioned .so links, and build a link-time stub libcuda.so
#      (the wheels carry no driver library; at run time the driver's libcuda.so.1 is used).
#      Keep 13.0: a 580 driver refuses PTX from a newer nvcc.
#
# cuDNN: f16/bf16 convolutions go through cuDNN 9 (the `cudnn` feature; about 30% faster per frame
# on an H100) when the build can link it: with the wheel toolkit a link-time stub is made here;
# with another toolkit a libcudnn.so must be on the linker path (a cuDNN 9 install).
# SDCROSSFRAME_CUDNN=0 builds without it. At run time such binaries need libcudnn.so.9 on the
# loader path (a cuDNN 9 install, or `pip install nvidia-cudnn-cu13` and its nvidia/cudnn/lib in
# LD_LIBRARY_PATH; PyTorch's CUDA 13 wheels bring it).
#
# Other environment:
#   CUDA_COMPUTE_CAP   GPU architecture for the kernels (default 90: H100/H200; 89: Ada, 86: Ampere).
#   CARGO_TARGET_DIR   default target-cuda/ (separate from CPU builds so the two do not share a lock).
#
# Output: $CARGO_TARGET_DIR/release/sdcrossframe, sdcrossframe-bench and libgstsdcrossframe.so. At run time they need
# an NVIDIA driver and the CUDA 13 runtime libraries (libcudart.so.13, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10) on the loader path; nothing from the build machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

TOOLKIT_ONLY=0
CARGO_COMMAND=(build)
if [ "${1:-}" = "--toolkit-only" ]; then TOOLKIT_ONLY=1; shift; fi
if [ "${1:-}" = "--tests" ]; then CARGO_COMMAND=(test --no-run); shift; fi
if [ "${1:-}" = "--" ]; then shift; fi

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}

unpack_wheels() {
    local w=$1
    mkdir -p "$w/whl" "$w/root"
    echo "build-cuda: downloading CUDA 13.0 wheels into $w" >&2
    python3 -m pip download -q --no-deps -d "$w/whl" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
    for f in "$w"/whl/*.whl; do unzip -q -o "$f" -d "$w/root"; done
    local p=$w/root/nvidia/cu13
    chmod +x "$p"/bin/* "$p"/nvvm/bin/*
    (cd "$p/lib" && ln -sf libcublas.so.13 libcublas.so && ln -sf libcublasLt.so.13 libcublasLt.so \
        && ln -sf libcurand.so.10 libcurand.so && ln -sf libnvrtc.so.13 libnvrtc.so \
        && ln -sf libcudart.so.13 libcudart.so)
    # Link-time stub for the driver library: every cu* symbol cudarc declares, as empty functions.
    cargo fetch --quiet
    local sys
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | head -n1 || true)
    if [ -z "$sys" ]; then
        echo "build-cuda: cudarc 0.19 sources not found in the cargo registry after cargo fetch" >&2
        exit 1
    fi
    mkdir -p "$p/lib/stubs"
    grep -oE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$sys" | awk '{print $NF}' | sort -u \
        | sed 's/.*/void &(void){}/' >"$w/cudastub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$p/lib/stubs/libcuda.so" "$w/cudastub.c"
    touch "$w/.complete"
}

# Link-time stub for cuDNN 9 (the `cudnn` feature): every cudnn* symbol cudarc declares. At run
# time the real libcudnn.so.9 is used (a cuDNN 9 install, or the nvidia-cudnn-cu13 wheel that
# PyTorch's CUDA 13 builds depend on, on the loader path).
make_cudnn_stub() {
    local stubs=$1 sys
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/cudnn/sys/mod.rs 2>/dev/null | head -n1 || true)
    if [ -z "$sys" ]; then
        cargo fetch --quiet
        sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/cudnn/sys/mod.rs | head -n1)
    fi
    mkdir -p "$stubs"
    grep -oE 'pub (unsafe )?fn cudnn[A-Za-z0-9_]+' "$sys" | awk '{print $NF}' | sort -u \
        | sed 's/.*/void &(void){}/' >"$stubs/cudnnstub.c"
    gcc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$stubs/libcudnn.so" "$stubs/cudnnstub.c"
}

if [ -n "${CUDA_TOOLKIT_DIR:-}" ]; then
    CUDA_HOME=$CUDA_TOOLKIT_DIR
elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)
else
    W=${CUDA_WHEELS_DIR:-$HOME/.cache/sdcrossframe-cuda13}
    [ -f "$W/.complete" ] || unpack_wheels "$W"
    CUDA_HOME=$W/root/nvidia/cu13
    export CUDARC_CUDA_VERSION=13000
    [ -f "$CUDA_HOME/lib/stubs/libcudnn.so" ] || make_cudnn_stub "$CUDA_HOME/lib/stubs"
fi
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "build-cuda: no nvcc at $CUDA_HOME/bin/nvcc" >&2
    exit 1
fi
export CUDA_HOME CUDA_PATH=$CUDA_HOME NVCC=$CUDA_HOME/bin/nvcc PATH=$CUDA_HOME/bin:$PATH
LIBDIRS="$CUDA_HOME/lib:$CUDA_HOME/lib64:$CUDA_HOME/lib/stubs:$CUDA_HOME/lib64/stubs"
export LIBRARY_PATH=$LIBDIRS${LIBRARY_PATH:+:$LIBRARY_PATH}
echo "build-cuda: CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR" >&2
"$NVCC" --version | tail -n 2 >&2
[ "$TOOLKIT_ONLY" = 1 ] && exit 0

FEATURES=cuda
if [ "${SDCROSSFRAME_CUDNN:-1}" != 0 ]; then
    if [ -f "$CUDA_HOME/lib/stubs/libcudnn.so" ] || ls "$CUDA_HOME"/lib*/libcudnn.so >/dev/null 2>&1 \
        || ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so '; then
        FEATURES=cudnn
    else
        echo "build-cuda: no libcudnn.so to link: building without cuDNN (convolutions use im2col)" >&2
    fi
fi
echo "build-cuda: features $FEATURES" >&2

start=$(date +%s)
# Extra arguments pick the targets (e.g. --bin sdcrossframe-bench, --test gpu); default: the
# whole workspace (the engine, the CLI, the benchmark and the GStreamer plugin,
# libgstsdcrossframe.so, which `sdcrossframe run` loads from beside itself). Every member
# gets the feature, so their own CUDA-only code is built too.
features=""
for package in sdcrossframe sdcrossframe-cli sdcrossframe-bench gst-plugin-sdcrossframe; do
    features="$features,$package/$FEATURES"
done
cargo "${CARGO_COMMAND[@]}" --release --workspace --features "${features#,}" "$@"
echo "build-cuda: built in $(( $(date +%s) - start )) s" >&2

# Wiring check: the binaries must load the CUDA libraries, so the feature really reached candle.
for bin in sdcrossframe sdcrossframe-bench libgstsdcrossframe.so; do
    exe=$CARGO_TARGET_DIR/release/$bin
    [ -f "$exe" ] || continue
    needed=$(readelf -d "$exe" | grep NEEDED || true)
    libs="libcuda.so.1 libcublas.so libcurand.so"
    [ "$FEATURES" = cudnn ] && libs="$libs libcudnn.so"
    for lib in $libs; do
        if ! grep -q "$lib" <<<"$needed"; then
            echo "build-cuda: $exe does not link $lib: the cuda feature did not reach candle" >&2
            exit 1
        fi
    done
    echo "build-cuda: $exe ($(du -h "$exe" | cut -f1)) links: $(grep -oE 'lib(cuda|cublas|cublasLt|curand|cudart|nvrtc|cudnn)\.so[.0-9]*' <<<"$needed" | tr '\n' ' ')" >&2
done
