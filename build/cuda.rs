//! Builds the CUDA kernels' program from the table in `kernels/registry.rs`: writes the
//! single NVRTC source (`$OUT_DIR/gradsift_nvrtc.cu`, every header then every unit, which
//! src/cuda/kernels.rs embeds and NVRTC compiles at first use) and, when nvcc is present,
//! precompiles the units to PTX. Either way `$OUT_DIR/cuda_ptx.rs` defines
//! `PRECOMPILED_PTX: Option<&str>`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel table (`UNITS`, `HEADERS`, the `Kernel` handles src/cuda uses).
#[allow(dead_code)]
mod registry {
    // The rows' argument types name `src/cuda/abi.rs` structs, which a build script lacks.
    macro_rules! kernel_args {
        ($($t:tt)*) => {};
    }
    include!("../kernels/registry.rs");
}
use registry::{HEADERS, UNITS};

/// The whole program NVRTC compiles: headers first, then every unit, as one source.
fn nvrtc_program(kernels: &Path) -> String {
    let mut s = String::from("#define GRADSIFT_NVRTC 1\n");
    for name in HEADERS.iter().chain(UNITS) {
        let path = kernels.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("kernels/registry.rs lists {name}: {}: {e}", path.display())
        });
        s.push_str(&format!("// ---- {name}\n"));
        s.push_str(&text);
        s.push('\n');
    }
    s
}

pub fn run() {
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_PATH");
    println!("cargo::rerun-if-env-changed=GRADSIFT_NO_NVCC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let kernels = manifest.join("kernels");
    std::fs::write(out.join("gradsift_nvrtc.cu"), nvrtc_program(&kernels))
        .expect("write gradsift_nvrtc.cu");
    let ptx = if std::env::var_os("GRADSIFT_NO_NVCC").is_some() {
        None
    } else {
        find_nvcc().and_then(|nvcc| compile(&nvcc, &kernels, &out))
    };
    let rs = match ptx {
        Some(path) => format!(
            "/// PTX built by nvcc at build time (compute_80, runs on sm_80 and newer).\n\
             pub const PRECOMPILED_PTX: Option<&str> = Some(include_str!({:?}));\n",
            path.display().to_string()
        ),
        None => "/// No nvcc at build time: kernels are compiled by NVRTC at first use.\n\
                 pub const PRECOMPILED_PTX: Option<&str> = None;\n"
            .to_string(),
    };
    std::fs::write(out.join("cuda_ptx.rs"), rs).expect("write cuda_ptx.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Some(cuda) = std::env::var_os("CUDA_PATH") {
        candidates.push(PathBuf::from(cuda).join("bin").join("nvcc"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

fn compile(nvcc: &Path, kernels: &Path, out: &Path) -> Option<PathBuf> {
    // One translation unit, one module: the same program NVRTC would see.
    let unit = out.join("gradsift_all.cu");
    let body: String = UNITS
        .iter()
        .map(|u| format!("#include \"{}\"\n", kernels.join(u).display()))
        .collect();
    std::fs::write(&unit, body).ok()?;
    let ptx = out.join("gradsift.ptx");
    let status = Command::new(nvcc)
        .arg("--ptx")
        .arg("-arch=compute_80")
        .arg("--fmad=false")
        .arg("-std=c++17")
        .arg("-I")
        .arg(kernels)
        .arg("-o")
        .arg(&ptx)
        .arg(&unit)
        .status();
    match status {
        Ok(s) if s.success() => Some(ptx),
        Ok(s) => {
            println!(
                "cargo::warning=nvcc failed ({s}); gradsift will compile its kernels with NVRTC at runtime"
            );
            None
        }
        Err(e) => {
            println!(
                "cargo::warning=could not run nvcc ({e}); gradsift will compile its kernels with NVRTC at runtime"
            );
            None
        }
    }
}
