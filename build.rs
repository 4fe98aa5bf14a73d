//! Compiles the CUDA kernels in `kernels/` to PTX when the `cuda` feature is on; without it
//! nothing is compiled (CI has no CUDA toolkit).
//!
//! nvcc comes from `CUDA_TOOLKIT_DIR`, `CUDA_HOME` or `CUDA_PATH` (`bin/nvcc`), else `PATH`;
//! the architecture from `CUDA_COMPUTE_CAP` (e.g. 90 for H100, default 90). The kernel uses
//! `mma.sync` bf16 tensor-core instructions, which need sm_80 or newer: for an older target no
//! PTX is made and the engine keeps its unfused attention (cfg `sdcrossframe_flash_ptx` unset).
//! `kernels/group_norm.cu` (cfg `sdcrossframe_group_norm_ptx`), `kernels/elementwise.cu` (cfg
//! `sdcrossframe_elementwise_ptx`), `kernels/im2col.cu` (cfg `sdcrossframe_im2col_ptx`) and
//! `kernels/channels_last.cu` (cfg `sdcrossframe_channels_last_ptx`) build for any architecture.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const FLASH_KERNEL: &str = "kernels/flash_attention.cu";
const GROUP_NORM_KERNEL: &str = "kernels/group_norm.cu";
const ELEMENTWISE_KERNEL: &str = "kernels/elementwise.cu";
const IM2COL_KERNEL: &str = "kernels/im2col.cu";
const CHANNELS_LAST_KERNEL: &str = "kernels/channels_last.cu";
/// Included by the element-wise and GroupNorm kernels.
const KERNEL_HELPERS: &str = "kernels/common.cuh";

fn main() {
    println!("cargo::rerun-if-changed={FLASH_KERNEL}");
    println!("cargo::rerun-if-changed={GROUP_NORM_KERNEL}");
    println!("cargo::rerun-if-changed={ELEMENTWISE_KERNEL}");
    println!("cargo::rerun-if-changed={IM2COL_KERNEL}");
    println!("cargo::rerun-if-changed={CHANNELS_LAST_KERNEL}");
    println!("cargo::rerun-if-changed={KERNEL_HELPERS}");
    for var in ["CUDA_TOOLKIT_DIR", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(sdcrossframe_flash_ptx)");
    println!("cargo::rustc-check-cfg=cfg(sdcrossframe_group_norm_ptx)");
    println!("cargo::rustc-check-cfg=cfg(sdcrossframe_elementwise_ptx)");
    println!("cargo::rustc-check-cfg=cfg(sdcrossframe_im2col_ptx)");
    println!("cargo::rustc-check-cfg=cfg(sdcrossframe_channels_last_ptx)");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }

    let cap = compute_cap();
    compile_ptx(GROUP_NORM_KERNEL, "group_norm.ptx", cap);
    println!("cargo::rustc-cfg=sdcrossframe_group_norm_ptx");
    compile_ptx(ELEMENTWISE_KERNEL, "elementwise.ptx", cap);
    println!("cargo::rustc-cfg=sdcrossframe_elementwise_ptx");
    compile_ptx(IM2COL_KERNEL, "im2col.ptx", cap);
    println!("cargo::rustc-cfg=sdcrossframe_im2col_ptx");
    compile_ptx(CHANNELS_LAST_KERNEL, "channels_last.ptx", cap);
    println!("cargo::rustc-cfg=sdcrossframe_channels_last_ptx");
    if cap < 80 {
        println!(
            "cargo::warning=CUDA_COMPUTE_CAP={cap}: the fused attention kernel needs sm_80 or newer; \
             attention stays unfused"
        );
        return;
    }
    compile_ptx(FLASH_KERNEL, "flash_attention.ptx", cap);
    println!("cargo::rustc-cfg=sdcrossframe_flash_ptx");
}

/// `nvcc --ptx` of `kernel` into `$OUT_DIR/ptx_name`.
fn compile_ptx(kernel: &str, ptx_name: &str, cap: u32) {
    let nvcc = find_nvcc();
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(ptx_name);
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--ptx", &format!("-arch=sm_{cap}"), "-O3", "-std=c++17", kernel, "-o"]).arg(&out);
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        cmd.args(["-ccbin", &ccbin]);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run nvcc at {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed ({status}) compiling {kernel} for sm_{cap}: see the compiler output above");
    }
}

/// `CUDA_COMPUTE_CAP` as a number: "90", "9.0" and "sm_90" all mean 90.
fn compute_cap() -> u32 {
    match env::var("CUDA_COMPUTE_CAP") {
        Ok(s) => {
            let digits: String = s.trim().trim_start_matches("sm_").chars().filter(|c| *c != '.').collect();
            digits.parse().unwrap_or_else(|_| {
                panic!("CUDA_COMPUTE_CAP={s:?} is not a compute capability (expected e.g. 90 for H100, 86, 80)")
            })
        }
        Err(_) => {
            println!("cargo::warning=CUDA_COMPUTE_CAP is not set: building the fused attention kernel for sm_90");
            90
        }
    }
}

fn find_nvcc() -> PathBuf {
    for var in ["CUDA_TOOLKIT_DIR", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let nvcc = PathBuf::from(root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    panic!(
        "the `cuda` feature compiles the kernels in kernels/ with nvcc, but no nvcc was found: set CUDA_HOME (or \
         CUDA_TOOLKIT_DIR) to a CUDA toolkit holding bin/nvcc, put nvcc on PATH, or build with \
         scripts/build-cuda.sh, which provides one"
    );
}
