//! Build-time work for the GPU backends: WGSL validation (`build/wgsl.rs`) and CUDA PTX
//! precompilation (`build/cuda.rs`). Each half runs only with its feature enabled.

#[path = "build/cuda.rs"]
mod cuda;
#[path = "build/wgsl.rs"]
mod wgsl;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=build");
    if std::env::var_os("CARGO_FEATURE_WGPU").is_some() {
        wgsl::run();
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda::run();
    }
}
