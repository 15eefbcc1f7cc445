//! The backend conformance suite (SPEC §11): every case is written once, generically over the
//! backend under test, and instantiated per backend by [`backend_tests!`] (the shape of
//! candle's `test_device!`): `backends::cpu::<case>`, `backends::wgpu::<case>` (feature
//! `wgpu`) and `backends::cuda::<case>` (feature `cuda`). Each case compares the backend
//! under test with the CPU reference, `gradsift::cpu`, built directly.
//!
//! The cases live by operation: `compress.rs` (the error-feedback step of every method),
//! `aggregate.rs` (SPEC §7), `stats.rs` (§8), `lifecycle.rs` (reconfigure, revert, refund,
//! rejection counts, payload slots, device identity); `harness.rs` holds the per-backend
//! adapters, `compare.rs` the comparisons and configuration matrices, `data.rs` the inputs. A
//! new case is a function there and a line in the `backend_tests!` list below.
//!
//! A case reaches the backend two ways: through [`Harness::device`], the run-time-dispatched
//! `gradsift::Device` (host slices), and through the [`Harness`] adapter, which builds the
//! backend's own plan types and feeds them the backend's own buffers (`[T]`, `wgpu::Buffer`,
//! `CudaSlice<T>`) for the `*_device` entry points.
//!
//! Skipping: the CPU always runs. A GPU backend that cannot open prints
//! `SKIPPED: <backend>: <reason>` and passes, unless `GRADSIFT_REQUIRE_WGPU=1` /
//! `GRADSIFT_REQUIRE_CUDA=1`, which makes it a failure. The NVRTC compile tests (`nvrtc::*`)
//! need no GPU; they skip without NVRTC unless `GRADSIFT_REQUIRE_NVRTC=1`.
//!
//! Sizes: the full big-size matrices (every configuration at 2^20 + 3, 2^26) run where
//! [`Harness::full`] says so (CUDA); on the CPU (the reference against itself) and on wgpu
//! (lavapipe in CI is slow) a representative subset runs, and each case prints what it left
//! out. A size above a device limit asserts the typed error that names the limit.

#![allow(clippy::too_many_arguments)]

mod aggregate;
#[path = "../common/mod.rs"]
mod common;
mod compare;
mod compress;
mod data;
mod harness;
mod lifecycle;
mod stats;

use aggregate::*;
use compare::*;
use compress::*;
use data::*;
use gradsift::{
    Aggregate, Average, Backend, Compress, Config, Count, DType, Device, Element, Error,
    LayerStats, Layout, Method, Mode, Payload, Scale, SparsePayload, Statistics, VarianceEstimate,
    bf16, f16,
};
use harness::*;
use lifecycle::*;
use stats::*;
use std::time::Instant;
// ---- instantiation ----------------------------------------------------------------------

/// `backend_tests!(a, b)` expands to `mod cpu { #[test] fn a() ... }`, `mod wgpu { ... }` and
/// `mod cuda { ... }`, each test running the generic case `a::<Harness>` on that backend.
macro_rules! backend_tests {
    ($($case:ident),* $(,)?) => {
        mod cpu {
            $(
                #[test]
                fn $case() {
                    super::run(super::CpuHarness::open(), stringify!($case), super::$case);
                }
            )*
        }
        #[cfg(feature = "wgpu")]
        mod wgpu {
            $(
                #[test]
                fn $case() {
                    super::run(super::wgpu_dev::WgpuHarness::open(), stringify!($case), super::$case);
                }
            )*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(
                #[test]
                fn $case() {
                    super::run(super::cuda_dev::CudaHarness::open(), stringify!($case), super::$case);
                }
            )*
        }
    };
}

backend_tests!(
    // From the old wgpu suite.
    sizes_every_sparse_method_global,
    philox_and_rounding_conformance_through_randomk_and_f16_values,
    gradient_dtypes_f16_bf16,
    per_layer_thousand_mixed_layers,
    sign_global_and_per_layer,
    // docs/SPEC.md §13: QSGD's scales and codes bit for bit, its residual too.
    qsgd_global_and_per_layer,
    momentum_exact_on_dyadic_inputs,
    adversarial_ties_resolve_to_lower_index,
    nan_injection_leaves_state_untouched,
    large_buffer_two_to_the_twenty_plus_three,
    device_buffer_api_and_errors,
    aggregation_bit_identical,
    layer_statistics_within_spec_tolerance,
    variance_estimator_within_spec_tolerance,
    variance_beyond_one_binding,
    reports_the_device,
    randomized_configs_match_cpu,
    lost_device_is_a_typed_error,
    edge_sizes_for_aggregation_and_statistics,
    rejected_step_rolls_back_on_the_device_without_a_host_read,
    // From the old CUDA suite.
    compressor_matches_cpu_f32,
    compressor_matches_cpu_f16,
    compressor_matches_cpu_bf16,
    compressor_matches_cpu_2_pow_26,
    thousand_mixed_layers,
    adversarial_ties,
    nan_steps_are_rejected_and_leave_state_untouched,
    bad_input_is_an_error,
    layer_stats_match_cpu,
    variance_matches_cpu,
    aggregation_matches_cpu_bit_for_bit,
    bad_payloads_are_rejected_and_out_untouched,
    backend_payloads_round_trip,
    random_k_uses_the_spec_keys,
    // The contract's methods that neither old suite covered.
    reconfigure_keeps_residual_and_momentum,
    rejected_steps_counts_every_rejection_since_the_plan_was_built,
    payload_and_check_before_the_first_step_and_after_a_rejection,
    read_payload_reuses_the_slot,
    aggregate_device_matches_aggregate,
    buffer_of_another_device_is_rejected,
    // Config::group_counts (SPEC §2): explicit per-layer (r, k), what adaptive training uses.
    group_counts_match_cpu,
    // docs/SPEC.md §5: scaled values that overflow reject the step.
    unbiased_scale_overflow_is_rejected,
    // docs/SPEC.md §5: undoing the last step (what the hook does when another rank's failed).
    revert_restores_the_state_before_the_last_step,
    // docs/SPEC.md §12: what the sparse all-reduce's global selection dropped returns.
    refund_returns_entries_to_the_residual_bit_for_bit,
);
fn run<H: Harness>(h: Option<H>, name: &str, case: fn(&H)) {
    let Some(h) = h else { return };
    let t0 = Instant::now();
    case(&h);
    println!(
        "TIME {} {name}: {:.2} s",
        h.backend(),
        t0.elapsed().as_secs_f64()
    );
}
fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}
/// Prints `SKIPPED: <backend>: <reason>`, or panics when `var` requires the backend.
#[allow(dead_code)]
fn skip_or_fail(backend: Backend, var: &str, reason: &str) {
    if required(var) {
        panic!("{var}=1 but the {backend} backend cannot open: {reason}");
    }
    println!("SKIPPED: {backend}: {reason}");
}
/// NVRTC compiles every kernel for sm_80 and sm_90: needs libnvrtc only, no GPU. Skips with
/// a printed reason when NVRTC is missing, unless `GRADSIFT_REQUIRE_NVRTC=1` (CI).
#[cfg(feature = "cuda")]
mod nvrtc {
    use gradsift::{Error, cuda};

    fn nvrtc_or_skip() -> bool {
        match cuda::probe_nvrtc() {
            Ok(()) => true,
            Err(e) if super::required("GRADSIFT_REQUIRE_NVRTC") => {
                panic!("GRADSIFT_REQUIRE_NVRTC=1 but NVRTC is unavailable: {e}")
            }
            Err(e) => {
                println!("SKIPPED: NVRTC not found ({e})");
                false
            }
        }
    }

    fn compile_for(arch: &str) {
        if !nvrtc_or_skip() {
            return;
        }
        // Machine code first: ptxas must accept every kernel for the real architecture.
        let sm = arch.replace("compute_", "sm_");
        let (cubin, log) = cuda::compile_cubin(&sm).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cubin.is_empty(), "empty cubin for {sm}");
        for name in cuda::KERNEL_NAMES {
            assert!(
                log.contains(&format!("'{name}'")),
                "ptxas did not report {name} for {sm}"
            );
        }
        for line in log.lines().filter(|l| l.contains("spill stores")) {
            if !line.contains(" 0 bytes spill stores, 0 bytes spill loads") {
                println!("warning: {sm}: register spills: {line}");
            }
        }
        println!("{sm}: cubin {} bytes", cubin.len());
        let ptx = cuda::compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        // scripts/gpu-stage.sh keeps these for devices without a usable NVRTC.
        if let Some(dir) = std::env::var_os("GRADSIFT_DUMP_PTX") {
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{arch}.ptx")), &ptx).unwrap();
        }
        for name in cuda::KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "kernel {name} missing from the {arch} PTX"
            );
        }
    }

    #[test]
    fn kernels_compile_for_sm80() {
        compile_for("compute_80");
    }

    #[test]
    fn kernels_compile_for_sm90() {
        compile_for("compute_90");
    }

    #[test]
    fn no_device_is_an_error_not_a_panic() {
        // On a machine without a driver or GPU this must be a typed error; with one, a context.
        match cuda::Context::new(0) {
            Ok(cx) => println!("CUDA context: {cx:?}"),
            Err(Error::BackendUnavailable { backend, reason }) => {
                assert_eq!(backend, "cuda");
                assert!(!reason.is_empty());
            }
            Err(e) => panic!("expected BackendUnavailable, got {e:?}"),
        }
        assert!(cuda::Context::new(4096).is_err());
    }
}
/// CUDA only: `cuda::TopR`, a selection plan with no counterpart in the other backends.
#[cfg(feature = "cuda")]
mod cuda_only {
    use super::{adversarial, cuda_dev, gaussian};
    use gradsift::cuda;

    #[test]
    fn top_r_alone_matches_cpu() {
        let Some(_) = cuda_dev::CudaHarness::open() else {
            return;
        };
        let cx = cuda::Context::new(0).unwrap();
        for n in [1usize, 257, 32769, super::BIG] {
            let inputs = [
                gaussian::<f32>(n, 31, 1.0),
                adversarial::<f32>(n, 32),
                vec![0.25f32; n],
            ];
            for x in &inputs {
                let dev = cuda_dev::upload(&cx, x);
                for r in [0, 1, n / 1000 + 1, n / 2, n.saturating_sub(1), n] {
                    let want = gradsift::cpu::top_r(x, r).unwrap();
                    let mut plan = cuda::TopR::new(&cx, n, r).unwrap();
                    plan.select(&dev).unwrap();
                    let mut got = Vec::new();
                    plan.read(&mut got).unwrap();
                    assert_eq!(got, want, "top_r n={n} r={r}");
                }
            }
        }
    }
}
