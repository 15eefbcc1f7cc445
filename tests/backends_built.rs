//! Says which GPU backends this `cargo test` run covers, so that a plain `cargo test` on a
//! machine without the features prints what it skipped instead of skipping silently.

#[test]
fn report_gpu_backends_in_this_build() {
    if cfg!(feature = "wgpu") {
        println!(
            "wgpu backend: built; tests/backends/ runs its wgpu:: instantiation (SKIPPED lines there if no adapter)"
        );
    } else {
        println!(
            "SKIPPED: wgpu backend tests (build with --features wgpu, as scripts/test.sh does)"
        );
    }
    if cfg!(feature = "cuda") {
        println!(
            "cuda backend: built; tests/backends/ compiles every kernel with NVRTC (nvrtc::) and runs its cuda:: instantiation if there is a device"
        );
    } else {
        println!(
            "SKIPPED: cuda backend tests (build with --features cuda, as scripts/test.sh does)"
        );
    }
    if cfg!(feature = "mpi") {
        println!("mpi: built; cli/tests/dist.rs runs `mpirun -n 3` against the simulation");
    } else {
        println!(
            "SKIPPED: MPI tests (build with --features mpi, as scripts/test.sh does when OpenMPI and libclang are installed)"
        );
    }
    // CI sets these; a build without the backend it requires must fail, not skip.
    for (var, feature, on) in [
        ("GRADSIFT_REQUIRE_WGPU", "wgpu", cfg!(feature = "wgpu")),
        ("GRADSIFT_REQUIRE_NVRTC", "cuda", cfg!(feature = "cuda")),
        ("GRADSIFT_REQUIRE_MPI", "mpi", cfg!(feature = "mpi")),
    ] {
        if std::env::var(var).is_ok_and(|v| v == "1") {
            assert!(
                on,
                "{var}=1 but this test binary was built without --features {feature}"
            );
        }
    }
}
