//! Links LibTorch so that CUDA is usable and the binary finds its libraries.
//!
//! Without `--no-as-needed` the linker drops `libtorch_cuda.so` (nothing refers
//! to it by symbol), and `tch::Cuda::is_available()` silently answers false.
//! The rpath lets the binary run without `LD_LIBRARY_PATH`. It also records
//! the tch and LibTorch versions, which every model's description carries.

use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(libtorch).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".to_string());
    let output = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    Some(PathBuf::from(String::from_utf8(output.stdout).ok()?.trim()))
}

/// The version of the `tch` crate in Cargo.lock.
fn tch_version() -> Option<String> {
    let lock = std::fs::read_to_string("Cargo.lock").ok()?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"tch\"" {
            let version = lines.next()?.strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_string());
        }
    }
    None
}

/// PyTorch's version string of the LibTorch linked (`build-version` of a
/// standalone LibTorch, else the Python package's `torch.__version__`).
fn libtorch_version(lib_dir: Option<&PathBuf>) -> Option<String> {
    if let Some(root) = lib_dir.and_then(|dir| dir.parent()) {
        if let Ok(version) = std::fs::read_to_string(root.join("build-version")) {
            return Some(version.trim().to_string());
        }
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".to_string());
    let output = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lib_dir = torch_lib_dir();
    println!(
        "cargo:rustc-env=PRETEXT_TCH_VERSION={}",
        tch_version().unwrap_or_else(|| "unknown".to_string())
    );
    println!(
        "cargo:rustc-env=PRETEXT_LIBTORCH_VERSION={}",
        libtorch_version(lib_dir.as_ref()).unwrap_or_else(|| "unknown".to_string())
    );
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(lib_dir) = lib_dir else {
        println!("cargo:warning=could not locate LibTorch; CUDA linking and rpath skipped");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
