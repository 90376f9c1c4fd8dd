//! Compiles the FlashAttention kernels with nvcc into a static library, only with the `cuda`
//! feature. Needs nvcc on PATH (or in $CUDA_ROOT/bin) and CUTLASS headers in $CUTLASS_INCLUDE_DIR
//! (the folder holding `cute/` and `cutlass/`); `scripts/setup_cuda.sh` installs both from PyPI and
//! writes them into target/cuda/env.sh. Kernels are built for $CUDA_COMPUTE_CAP (default 90).
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 2] = ["skyreels_flash.cu", "flash_fwd_hdim128_bf16_sm80.cu"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "CUTLASS_INCLUDE_DIR",
        "CUDA_COMPUTE_CAP",
        "CUDA_ROOT",
        "NVCC",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build() {
        panic!("skyreels-flash-attn: {e}");
    }
}

fn build() -> Result<(), String> {
    let kernels = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("kernels");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cutlass = env::var("CUTLASS_INCLUDE_DIR").map_err(|_| {
        "CUTLASS_INCLUDE_DIR is not set: run scripts/setup_cuda.sh and `source target/cuda/env.sh`"
            .to_string()
    })?;
    if !Path::new(&cutlass).join("cute/tensor.hpp").is_file() {
        return Err(format!(
            "CUTLASS_INCLUDE_DIR={cutlass} has no cute/tensor.hpp"
        ));
    }
    let nvcc = env::var("NVCC").unwrap_or_else(|_| match env::var("CUDA_ROOT") {
        Ok(root) => format!("{root}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: u32 = cap
        .trim()
        .parse()
        .map_err(|_| format!("CUDA_COMPUTE_CAP={cap} is not a number like 90"))?;
    if cap < 80 {
        return Err(format!(
            "FlashAttention-2 needs compute capability 8.0 or newer (CUDA_COMPUTE_CAP={cap})"
        ));
    }
    // both translation units at once: the kernel instantiation dominates, the glue is quick
    let mut jobs = Vec::new();
    for src in SOURCES {
        let obj = out.join(src.replace(".cu", ".o"));
        let child = Command::new(&nvcc)
            .args([
                "-std=c++17",
                "-O3",
                "--use_fast_math",
                "-Xcompiler",
                "-fPIC",
            ])
            .arg(format!("--generate-code=arch=compute_{cap},code=sm_{cap}"))
            .arg(format!("-DSKYREELS_SM={cap}"))
            .args([
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_HALF2_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "--expt-relaxed-constexpr",
                "--expt-extended-lambda",
            ])
            .arg("-I")
            .arg(&cutlass)
            .arg("-I")
            .arg(&kernels)
            .arg("-c")
            .arg(kernels.join(src))
            .arg("-o")
            .arg(&obj)
            .spawn()
            .map_err(|e| format!("cannot run {nvcc}: {e}"))?;
        jobs.push((src, child, obj));
    }
    let mut objects = Vec::new();
    for (src, mut child, obj) in jobs {
        let status = child.wait().map_err(|e| format!("{nvcc}: {e}"))?;
        if !status.success() {
            return Err(format!("{nvcc} failed on kernels/{src} ({status})"));
        }
        objects.push(obj);
    }
    let lib = out.join("libskyreels_flash_attn.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new(env::var("AR").unwrap_or_else(|_| "ar".into()))
        .arg("crs")
        .arg(&lib)
        .args(&objects)
        .status()
        .map_err(|e| format!("cannot run ar: {e}"))?;
    if !status.success() {
        return Err(format!("ar failed ({status})"));
    }
    // the Rust side names the architecture in its "built for another GPU" error
    println!("cargo::rustc-env=SKYREELS_FLASH_ATTN_SM={cap}");
    println!("cargo::rustc-link-search=native={}", out.display());
    println!("cargo::rustc-link-lib=static=skyreels_flash_attn");
    println!("cargo::rustc-link-lib=dylib=cudart");
    println!("cargo::rustc-link-lib=dylib=stdc++");
    Ok(())
}
