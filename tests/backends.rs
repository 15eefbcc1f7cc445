//! The backend conformance suite (SPEC §11): every case is written once, generically over the
//! backend under test, and instantiated per backend by [`backend_tests!`] (the shape of
//! candle's `test_device!`): `backends::cpu::<case>`, `backends::wgpu::<case>` (feature
//! `wgpu`) and `backends::cuda::<case>` (feature `cuda`). Each case compares the backend
//! under test with the CPU reference, `gradsift::cpu`, built directly.
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

mod common;

use gradsift::{
    Aggregate, Average, Backend, Compress, Config, Count, DType, Device, Element, Error,
    LayerStats, Layout, Method, Mode, Payload, Scale, SparsePayload, Statistics, VarianceEstimate,
    bf16, f16,
};
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

// ---- the per-backend adapter --------------------------------------------------------------

/// What a case needs from the backend under test beyond host slices: its own plan types and
/// its own buffers for the `*_device` entry points.
trait Harness {
    /// The backend's own compressor (`gradsift::cpu::Compressor`, `wgpu::Compressor`, ...).
    type Comp: Compress;
    /// The backend's own aggregator.
    type Agg: Aggregate;
    /// The backend's own statistics plan.
    type St: Statistics;

    fn backend(&self) -> Backend;
    /// The run-time-dispatched device for this backend (host-slice entry points).
    fn device(&self) -> &Device;
    /// Whether the full big-size matrices run here (a real GPU). False on the CPU (the
    /// reference against itself) and on wgpu, whose CI device is software.
    fn full(&self) -> bool;
    /// Bytes one storage binding may span, where the backend has such a limit.
    fn max_binding_bytes(&self) -> Option<u64>;

    fn compressor(&self, layout: &Layout, config: &Config) -> gradsift::Result<Self::Comp>;
    fn aggregator(
        &self,
        layout: &Layout,
        mode: Mode,
        rule: Average,
        workers: usize,
    ) -> gradsift::Result<Self::Agg>;
    fn stats(&self, layout: &Layout, max_workers: usize) -> gradsift::Result<Self::St>;

    /// `step_device` on a device buffer holding `grad`.
    fn step_device<T: Element>(
        &self,
        plan: &mut Self::Comp,
        grad: &[T],
        step: u64,
    ) -> gradsift::Result<()>;
    /// `aggregate_device` into a device buffer initialised from `out`, copied back into
    /// `out` afterwards (also on error, so a case can check it was not written).
    fn aggregate_device(
        &self,
        plan: &mut Self::Agg,
        payloads: &[Payload],
        out: &mut [f32],
    ) -> gradsift::Result<()>;
    fn layer_stats_device<T: Element>(
        &self,
        plan: &mut Self::St,
        x: &[T],
        out: &mut Vec<LayerStats>,
    ) -> gradsift::Result<()>;
    fn estimate_variance_device<T: Element>(
        &self,
        plan: &mut Self::St,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> gradsift::Result<()>;
    /// `step_device` on a buffer of `grad` that lives on another device or context; `None`
    /// where the backend has no such thing.
    fn step_foreign(&self, plan: &mut Self::Comp, grad: &[f32]) -> Option<gradsift::Result<()>>;
    /// A device of its own and a function that loses it; `None` where that cannot be done
    /// on demand.
    fn losable(&self) -> Option<(Device, Box<dyn FnOnce()>)>;
}

struct CpuHarness {
    device: Device,
}

impl CpuHarness {
    fn open() -> Option<Self> {
        Some(Self {
            device: Device::open(Backend::Cpu).expect("the CPU always opens"),
        })
    }
}

impl Harness for CpuHarness {
    type Comp = gradsift::cpu::Compressor;
    type Agg = gradsift::cpu::Aggregator;
    type St = gradsift::cpu::Stats;

    fn backend(&self) -> Backend {
        Backend::Cpu
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn full(&self) -> bool {
        false
    }
    fn max_binding_bytes(&self) -> Option<u64> {
        None
    }
    fn compressor(&self, layout: &Layout, config: &Config) -> gradsift::Result<Self::Comp> {
        gradsift::cpu::Compressor::new(layout, config)
    }
    fn aggregator(
        &self,
        layout: &Layout,
        mode: Mode,
        rule: Average,
        workers: usize,
    ) -> gradsift::Result<Self::Agg> {
        gradsift::cpu::Aggregator::new(layout, mode, rule, workers)
    }
    fn stats(&self, layout: &Layout, _max_workers: usize) -> gradsift::Result<Self::St> {
        Ok(gradsift::cpu::Stats::new(layout))
    }
    fn step_device<T: Element>(
        &self,
        plan: &mut Self::Comp,
        grad: &[T],
        step: u64,
    ) -> gradsift::Result<()> {
        Compress::step_device::<T>(plan, grad, step)
    }
    fn aggregate_device(
        &self,
        plan: &mut Self::Agg,
        payloads: &[Payload],
        out: &mut [f32],
    ) -> gradsift::Result<()> {
        plan.aggregate_device(payloads, out)
    }
    fn layer_stats_device<T: Element>(
        &self,
        plan: &mut Self::St,
        x: &[T],
        out: &mut Vec<LayerStats>,
    ) -> gradsift::Result<()> {
        Statistics::layer_stats_device::<T>(plan, x, out)
    }
    fn estimate_variance_device<T: Element>(
        &self,
        plan: &mut Self::St,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> gradsift::Result<()> {
        Statistics::estimate_variance_device::<T>(plan, workers, out)
    }
    fn step_foreign(&self, _: &mut Self::Comp, _: &[f32]) -> Option<gradsift::Result<()>> {
        None // host slices belong to no device
    }
    fn losable(&self) -> Option<(Device, Box<dyn FnOnce()>)> {
        None // the CPU cannot be lost
    }
}

#[cfg(feature = "wgpu")]
mod wgpu_dev {
    use super::Harness;
    use gradsift::wgpu as gw;
    use gradsift::{
        Aggregate, Average, Backend, Compress, Config, Device, Element, LayerStats, Layout, Mode,
        Payload, Statistics, VarianceEstimate,
    };
    use std::sync::OnceLock;

    pub struct WgpuHarness {
        ctx: gw::Context,
        device: Device,
    }

    impl WgpuHarness {
        /// One context for the whole binary: building one compiles every pipeline, which
        /// takes a while on lavapipe.
        pub fn open() -> Option<Self> {
            static CTX: OnceLock<Result<gw::Context, String>> = OnceLock::new();
            match CTX.get_or_init(|| gw::Context::new().map_err(|e| e.to_string())) {
                Ok(ctx) => Some(Self {
                    ctx: ctx.clone(),
                    device: Device::from(ctx.clone()),
                }),
                Err(reason) => {
                    super::skip_or_fail(Backend::Wgpu, "GRADSIFT_REQUIRE_WGPU", reason);
                    None
                }
            }
        }
    }

    /// A buffer usable as a gradient, statistics input or aggregation output, holding `bytes`.
    fn buffer(ctx: &gw::Context, bytes: &[u8]) -> ::wgpu::Buffer {
        let size = (bytes.len() as u64).div_ceil(4).max(1) * 4;
        let buf = ctx.device().create_buffer(&::wgpu::BufferDescriptor {
            label: Some("test buffer"),
            size,
            usage: ::wgpu::BufferUsages::STORAGE
                | ::wgpu::BufferUsages::COPY_DST
                | ::wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut padded = bytes.to_vec();
        padded.resize(size as usize, 0);
        ctx.queue().write_buffer(&buf, 0, &padded);
        buf
    }

    fn read(ctx: &gw::Context, buf: &::wgpu::Buffer, bytes: u64) -> Vec<u8> {
        let dev = ctx.device();
        let staging = dev.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("test readback"),
            size: bytes.max(4),
            usage: ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = dev.create_command_encoder(&::wgpu::CommandEncoderDescriptor::default());
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, bytes);
        ctx.queue().submit([enc.finish()]);
        let slice = staging.slice(..);
        slice.map_async(::wgpu::MapMode::Read, |r| r.expect("map"));
        dev.poll(::wgpu::PollType::wait_indefinitely())
            .expect("poll");
        let v = slice.get_mapped_range().expect("mapped")[..bytes as usize].to_vec();
        staging.unmap();
        v
    }

    impl Harness for WgpuHarness {
        type Comp = gw::Compressor;
        type Agg = gw::Aggregator;
        type St = gw::Stats;

        fn backend(&self) -> Backend {
            Backend::Wgpu
        }
        fn device(&self) -> &Device {
            &self.device
        }
        fn full(&self) -> bool {
            // A software adapter (lavapipe in CI) runs the subset.
            !self.ctx.description().contains("llvmpipe")
        }
        fn max_binding_bytes(&self) -> Option<u64> {
            Some(self.ctx.max_binding_bytes())
        }
        fn compressor(&self, layout: &Layout, config: &Config) -> gradsift::Result<Self::Comp> {
            gw::Compressor::new(&self.ctx, layout, config)
        }
        fn aggregator(
            &self,
            layout: &Layout,
            mode: Mode,
            rule: Average,
            workers: usize,
        ) -> gradsift::Result<Self::Agg> {
            gw::Aggregator::new(&self.ctx, layout, mode, rule, workers)
        }
        fn stats(&self, layout: &Layout, _max_workers: usize) -> gradsift::Result<Self::St> {
            gw::Stats::new(&self.ctx, layout)
        }
        fn step_device<T: Element>(
            &self,
            plan: &mut Self::Comp,
            grad: &[T],
            step: u64,
        ) -> gradsift::Result<()> {
            let buf = self.ctx.upload(grad)?;
            Compress::step_device::<T>(plan, &buf, step)
        }
        fn aggregate_device(
            &self,
            plan: &mut Self::Agg,
            payloads: &[Payload],
            out: &mut [f32],
        ) -> gradsift::Result<()> {
            let mut buf = buffer(&self.ctx, bytemuck::cast_slice(out));
            let r = plan.aggregate_device(payloads, &mut buf);
            let back = read(&self.ctx, &buf, out.len() as u64 * 4);
            out.copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&back));
            r
        }
        fn layer_stats_device<T: Element>(
            &self,
            plan: &mut Self::St,
            x: &[T],
            out: &mut Vec<LayerStats>,
        ) -> gradsift::Result<()> {
            let buf = self.ctx.upload(x)?;
            Statistics::layer_stats_device::<T>(plan, &buf, out)
        }
        fn estimate_variance_device<T: Element>(
            &self,
            plan: &mut Self::St,
            workers: &[&[T]],
            out: &mut Vec<VarianceEstimate>,
        ) -> gradsift::Result<()> {
            let bufs = workers
                .iter()
                .map(|w| self.ctx.upload(w))
                .collect::<gradsift::Result<Vec<_>>>()?;
            let refs: Vec<&::wgpu::Buffer> = bufs.iter().collect();
            Statistics::estimate_variance_device::<T>(plan, &refs, out)
        }
        fn step_foreign(
            &self,
            plan: &mut Self::Comp,
            grad: &[f32],
        ) -> Option<gradsift::Result<()>> {
            // A buffer of a second Context's device (Contexts share one wgpu::Instance, so
            // this is a device mismatch wgpu reports, not an unknown resource).
            let other = gw::Context::new().ok()?;
            let buf = other.upload(grad).ok()?;
            Some(plan.step_device::<f32>(&buf, 1))
        }
        fn losable(&self) -> Option<(Device, Box<dyn FnOnce()>)> {
            // A context of its own: destroying it must not disturb the other tests.
            let ctx = gw::Context::new().ok()?;
            let device = Device::from(ctx.clone());
            Some((device, Box::new(move || ctx.device().destroy())))
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_dev {
    use super::Harness;
    use cudarc::driver::CudaSlice;
    use gradsift::cuda as gc;
    use gradsift::{
        Aggregate, Average, Backend, Compress, Config, DType, Device, Element, LayerStats, Layout,
        Mode, Payload, Statistics, VarianceEstimate, bf16, f16,
    };
    use std::any::Any;

    pub struct CudaHarness {
        cx: gc::Context,
        device: Device,
    }

    impl CudaHarness {
        pub fn open() -> Option<Self> {
            match gc::Context::new(0) {
                Ok(cx) => Some(Self {
                    device: Device::from(cx.clone()),
                    cx,
                }),
                Err(e) => {
                    super::skip_or_fail(Backend::Cuda, "GRADSIFT_REQUIRE_CUDA", &e.to_string());
                    None
                }
            }
        }
    }

    /// `x` on the device (at least one element: zero-length device buffers are not
    /// allocatable, so empty inputs go through the raw-pointer entry points instead).
    pub fn upload<T: Element>(cx: &gc::Context, x: &[T]) -> CudaSlice<T> {
        assert!(!x.is_empty());
        let s = cx.stream();
        // `Element` does not imply cudarc's `DeviceRepr`; go through the concrete type.
        let any: Box<dyn Any> = match T::DTYPE {
            DType::F32 => Box::new(s.clone_htod(bytemuck::cast_slice::<T, f32>(x)).unwrap()),
            DType::F16 => Box::new(s.clone_htod(bytemuck::cast_slice::<T, f16>(x)).unwrap()),
            DType::BF16 => Box::new(s.clone_htod(bytemuck::cast_slice::<T, bf16>(x)).unwrap()),
        };
        *any.downcast::<CudaSlice<T>>().expect("same type")
    }

    impl Harness for CudaHarness {
        type Comp = gc::Compressor;
        type Agg = gc::Aggregator;
        type St = gc::Stats;

        fn backend(&self) -> Backend {
            Backend::Cuda
        }
        fn device(&self) -> &Device {
            &self.device
        }
        fn full(&self) -> bool {
            true
        }
        fn max_binding_bytes(&self) -> Option<u64> {
            None
        }
        fn compressor(&self, layout: &Layout, config: &Config) -> gradsift::Result<Self::Comp> {
            gc::Compressor::new(&self.cx, layout, config)
        }
        fn aggregator(
            &self,
            layout: &Layout,
            mode: Mode,
            rule: Average,
            workers: usize,
        ) -> gradsift::Result<Self::Agg> {
            gc::Aggregator::new(&self.cx, layout, mode, rule, workers)
        }
        fn stats(&self, layout: &Layout, max_workers: usize) -> gradsift::Result<Self::St> {
            gc::Stats::new(&self.cx, layout, max_workers)
        }
        fn step_device<T: Element>(
            &self,
            plan: &mut Self::Comp,
            grad: &[T],
            step: u64,
        ) -> gradsift::Result<()> {
            if grad.is_empty() {
                // SAFETY: nothing is read from a zero-length buffer.
                return unsafe { plan.step_raw(0, 0, T::DTYPE, step) };
            }
            let dev = upload(&self.cx, grad);
            Compress::step_device::<T>(plan, &dev, step)?;
            // The upload must outlive the enqueued step.
            self.cx.synchronize()
        }
        fn aggregate_device(
            &self,
            plan: &mut Self::Agg,
            payloads: &[Payload],
            out: &mut [f32],
        ) -> gradsift::Result<()> {
            if out.is_empty() {
                // No zero-length device buffer: the host entry point stands in.
                return plan.aggregate(payloads, out);
            }
            let mut dev = self.cx.stream().clone_htod(&*out).unwrap();
            let r = Aggregate::aggregate_device(plan, payloads, &mut dev);
            let back = self.cx.stream().clone_dtoh(&dev).unwrap();
            out.copy_from_slice(&back);
            r
        }
        fn layer_stats_device<T: Element>(
            &self,
            plan: &mut Self::St,
            x: &[T],
            out: &mut Vec<LayerStats>,
        ) -> gradsift::Result<()> {
            if x.is_empty() {
                // SAFETY: nothing is read from a zero-length buffer.
                return unsafe { plan.layer_stats_raw(0, 0, T::DTYPE, out) };
            }
            let dev = upload(&self.cx, x);
            Statistics::layer_stats_device::<T>(plan, &dev, out)
        }
        fn estimate_variance_device<T: Element>(
            &self,
            plan: &mut Self::St,
            workers: &[&[T]],
            out: &mut Vec<VarianceEstimate>,
        ) -> gradsift::Result<()> {
            let devs: Vec<CudaSlice<T>> = workers.iter().map(|w| upload(&self.cx, w)).collect();
            let refs: Vec<&CudaSlice<T>> = devs.iter().collect();
            Statistics::estimate_variance_device::<T>(plan, &refs, out)
        }
        fn step_foreign(
            &self,
            plan: &mut Self::Comp,
            grad: &[f32],
        ) -> Option<gradsift::Result<()>> {
            // Another context needs another device: the primary context of device 0 is
            // shared by every `Context::new(0)`.
            let other = gc::Context::new(1).ok()?;
            let dev = upload(&other, grad);
            Some(Compress::step_device::<f32>(plan, &dev, 0))
        }
        fn losable(&self) -> Option<(Device, Box<dyn FnOnce()>)> {
            None // a CUDA device cannot be lost on demand from safe code
        }
    }
}

// ---- data ---------------------------------------------------------------------------------

/// Reproducible values: a 64-bit LCG, Gaussian-ish by summing uniforms.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..3 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
            acc
        })
        .collect()
}

/// Dyadic values (multiples of 2^-6 in [-4, 4]) so that momentum arithmetic is exact and a
/// fused multiply-add cannot change a bit: the selections must then agree exactly.
fn dyadic(n: usize, seed: u64) -> Vec<f32> {
    data(n, seed)
        .into_iter()
        .map(|x| (x * 256.0).round() / 64.0)
        .collect()
}

fn to<T: Element>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// The old CUDA suite's generator: an LCG with Box-Muller Gaussians.
struct Lcg(u64);

impl Lcg {
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn gaussian(&mut self) -> f32 {
        ((-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos())
            as f32
    }
    fn below(&mut self, n: u64) -> u64 {
        (self.next_u64() >> 33) % n.max(1)
    }
}

fn gaussian<T: Element>(n: usize, seed: u64, scale: f32) -> Vec<T> {
    let mut r = Lcg(seed);
    (0..n).map(|_| T::from_f32(r.gaussian() * scale)).collect()
}

/// Few distinct magnitudes, both zeros, subnormals: every tie rule gets exercised.
fn adversarial<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut r = Lcg(seed);
    let pool = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        2.0,
        -2.0,
        f32::from_bits(1),
        -f32::from_bits(3),
        1e-3,
    ];
    (0..n)
        .map(|_| T::from_f32(pool[r.below(pool.len() as u64) as usize]))
        .collect()
}

fn mixed_layout(layers: usize, seed: u64) -> Layout {
    let mut s = seed;
    let sizes: Vec<usize> = (0..layers)
        .map(|l| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match l % 10 {
                0 => 0,
                1 => 1,
                2 => 4096 + (s >> 60) as usize,
                3 if l % 100 == 3 => 20_000 + (s >> 50) as usize % 5000,
                _ => 1 + (s >> 33) as usize % 700,
            }
        })
        .collect();
    Layout::new(&sizes).unwrap()
}

fn sizes_layouts(n: usize) -> Vec<Layout> {
    let mut v = vec![Layout::single(n).unwrap()];
    if n >= 3 {
        v.push(Layout::new(&[n / 3, 0, n - n / 3]).unwrap());
    }
    v
}

// ---- comparison -----------------------------------------------------------------------------

/// How closely a backend must reproduce the CPU (SPEC §11).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Tol {
    /// Payload, residual and momentum bit-identical.
    Bits,
    /// Indices (and first-step signs) identical, floating results within `rel` of the
    /// element or of the vector's largest magnitude.
    Within(f32),
}

impl Tol {
    /// Sparse methods and QSGD (a maximum, SPEC §13) are bit-identical unless a momentum
    /// that is not a power of two lets a GPU fuse `m u + g` (1 ulp); scaled sign has a
    /// reduction in its scale.
    fn of(config: &Config) -> Tol {
        let m = config.momentum;
        if config.method == Method::Sign {
            Tol::Within(1e-5)
        } else if m == 0.0 || (m.to_bits() & 0x007F_FFFF) == 0 {
            Tol::Bits
        } else {
            Tol::Within(2.4e-7)
        }
    }
}

fn close(a: f32, b: f32, rel: f32) -> bool {
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs()) || (a.is_nan() && b.is_nan())
}

/// `Within(rel)` compares elementwise relative to the vector's largest magnitude: residuals
/// of a sign step are differences of nearly equal numbers.
fn compare_f32(want: &[f32], got: &[f32], tol: Tol, what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let norm = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let ok = match tol {
            Tol::Bits => a.to_bits() == b.to_bits(),
            Tol::Within(rel) => close(*a, *b, rel) || (a - b).abs() <= rel * norm,
        };
        assert!(ok, "{what}: element {i}: cpu {a:e} backend {b:e}");
    }
}

fn compare_payload(want: &Payload, got: &Payload, tol: Tol, what: &str, first: bool) {
    match (want, got) {
        (Payload::Sparse(w), Payload::Sparse(g)) => {
            assert_eq!(w.n, g.n, "{what}: n");
            assert_eq!(w.values_dtype, g.values_dtype, "{what}: dtype");
            if w.indices != g.indices {
                let i = w
                    .indices
                    .iter()
                    .zip(&g.indices)
                    .position(|(a, b)| a != b)
                    .unwrap_or(w.indices.len().min(g.indices.len()));
                panic!(
                    "{what}: indices differ at {i} of {}/{}: cpu {:?} backend {:?}",
                    w.indices.len(),
                    g.indices.len(),
                    &w.indices[i.saturating_sub(2)..(i + 3).min(w.indices.len())],
                    &g.indices[i.saturating_sub(2)..(i + 3).min(g.indices.len())]
                );
            }
            // Values rounded to 16 bits may land one 16-bit ulp apart when p is 1 ulp apart.
            let tol = match (tol, w.values_dtype) {
                (Tol::Bits, _) => Tol::Bits,
                (Tol::Within(r), DType::F32) => Tol::Within(r),
                (Tol::Within(r), DType::F16) => Tol::Within(r.max(1e-3)),
                (Tol::Within(r), DType::BF16) => Tol::Within(r.max(8e-3)),
            };
            compare_f32(&w.values, &g.values, tol, &format!("{what}: values"));
        }
        (Payload::Sign(w), Payload::Sign(g)) => {
            assert_eq!(w.n, g.n, "{what}: n");
            if first || tol == Tol::Bits {
                assert_eq!(w.negative, g.negative, "{what}: sign bits");
            } else {
                // Later steps: only elements whose p sits at rounding distance from 0 may
                // flip, since the scales (a reduction) may differ in the last bits.
                let diff: u32 = w
                    .negative
                    .iter()
                    .zip(&g.negative)
                    .map(|(a, b)| (a ^ b).count_ones())
                    .sum();
                assert!(
                    diff as usize <= 1 + w.n as usize / 1000,
                    "{what}: {diff} sign bits differ"
                );
            }
            assert_eq!(w.scales.len(), g.scales.len(), "{what}: scales");
            compare_f32(
                &w.scales,
                &g.scales,
                Tol::Within(1e-5),
                &format!("{what}: scales"),
            );
        }
        (Payload::Qsgd(w), Payload::Qsgd(g)) => {
            assert_eq!((w.n, w.levels), (g.n, g.levels), "{what}: n, levels");
            if tol == Tol::Bits {
                assert_eq!(
                    common::bits(&w.scales),
                    common::bits(&g.scales),
                    "{what}: scales"
                );
                if let Some(i) = (0..w.codes.len()).find(|&i| w.codes[i] != g.codes[i]) {
                    panic!(
                        "{what}: code {i}: cpu {} backend {}",
                        w.codes[i], g.codes[i]
                    );
                }
            } else {
                // 1-ulp inputs move a level only where a - floor(a) meets u.
                compare_f32(&w.scales, &g.scales, tol, &format!("{what}: scales"));
                let moved = w.codes.iter().zip(&g.codes).filter(|(a, b)| a != b).count();
                assert!(
                    moved <= 1 + w.n as usize / 1000,
                    "{what}: {moved} codes differ"
                );
            }
        }
        _ => panic!("{what}: payload kinds differ"),
    }
}

/// Runs the gradients through the CPU reference and the backend's own plan and compares
/// payloads, errors, residuals and momenta after every step. Steps alternate between the
/// host entry point (`step`) and the device one (`step_device` on a device buffer, then
/// `read_payload` into a reused payload), so both paths see every configuration.
fn compare<H: Harness, T: Element>(
    h: &H,
    layout: &Layout,
    config: &Config,
    grads: &[Vec<T>],
    what: &str,
) {
    let tol = Tol::of(config);
    let mut c = gradsift::cpu::Compressor::new(layout, config).unwrap();
    let mut g = h
        .compressor(layout, config)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut slot = Payload::default();
    let (mut re, mut rm) = (Vec::new(), Vec::new());
    for (i, grad) in grads.iter().enumerate() {
        // Reductions (sign scales) differ in the last bits, so after the first step the
        // residuals, hence the inputs of later steps, are no longer bit-identical.
        let first = i == 0;
        let t = i as u64 * 7 + 3;
        let want = c.step(grad, t).cloned();
        let got = if i % 2 == 0 {
            g.step(grad, t).cloned()
        } else {
            h.step_device(&mut g, grad, t)
                .and_then(|()| g.read_payload(&mut slot))
                .map(|()| slot.clone())
        };
        let path = if i % 2 == 0 { "host" } else { "device" };
        // Elements whose sign flipped (allowed after the first step, see compare_payload)
        // have residuals p - s and p + s: equal magnitudes, opposite signs.
        let flips: Vec<usize> = match (&want, &got) {
            (Ok(Payload::Sign(w)), Ok(Payload::Sign(p))) => (0..w.n as usize)
                .filter(|&i| w.is_negative(i) != p.is_negative(i))
                .collect(),
            _ => Vec::new(),
        };
        match (&want, &got) {
            (Ok(w), Ok(p)) => {
                compare_payload(w, p, tol, &format!("{what} step {t} ({path})"), first)
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{what} step {t} ({path}): errors differ"),
            _ => panic!("{what} step {t} ({path}): cpu {want:?} vs backend {got:?}"),
        }
        g.residual(&mut re).unwrap();
        let mut want_e = c.residual_slice().to_vec();
        for &i in &flips {
            assert!(
                close(want_e[i].abs(), re[i].abs(), 1e-5),
                "{what} residual step {t}: flipped element {i}: cpu {} backend {}",
                want_e[i],
                re[i]
            );
            want_e[i] = re[i];
        }
        compare_f32(&want_e, &re, tol, &format!("{what} residual step {t}"));
        g.momentum(&mut rm).unwrap();
        compare_f32(
            c.momentum_slice(),
            &rm,
            tol,
            &format!("{what} momentum step {t}"),
        );
    }
}

fn sparse_methods() -> Vec<(&'static str, Config)> {
    vec![
        ("topk", Config::topk(0.01)),
        ("rtopk", Config::rtopk(0.05, 0.01)),
        ("randomk", Config::randomk(0.01)),
        (
            "rtopk-exact",
            Config::new(Method::RTopK {
                r: Count::Exact(300),
                k: Count::Exact(37),
            }),
        ),
    ]
}

/// The old CUDA suite's configuration matrix (14 configurations).
fn configs() -> Vec<(String, Config)> {
    let mut out = Vec::new();
    let methods = [
        (
            "rtopk",
            Method::RTopK {
                r: Count::Ratio(0.05),
                k: Count::Ratio(0.01),
            },
        ),
        (
            "topk",
            Method::TopK {
                k: Count::Ratio(0.01),
            },
        ),
        (
            "randomk",
            Method::RandomK {
                k: Count::Ratio(0.01),
            },
        ),
        (
            "rtopk_exact",
            Method::RTopK {
                r: Count::Exact(300),
                k: Count::Exact(7),
            },
        ),
        (
            "all",
            Method::TopK {
                k: Count::Ratio(1.0),
            },
        ),
        ("sign", Method::Sign),
    ];
    for (name, m) in methods {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut c = Config::new(m);
            c.mode = mode;
            c.seed = 0x1234_5678_9abc_def0;
            c.worker = 3;
            out.push((format!("{name}/{mode:?}"), c.clone()));
            if name == "rtopk" {
                let mut c2 = c.clone();
                c2.momentum = 0.9;
                c2.scale = Scale::Unbiased;
                c2.values = DType::F16;
                out.push((format!("{name}/{mode:?}/momentum/unbiased/f16"), c2));
                let mut c3 = c.clone();
                c3.values = DType::BF16;
                c3.scale = Scale::Unbiased;
                out.push((format!("{name}/{mode:?}/bf16"), c3));
            }
            if name == "sign" {
                let mut c2 = c.clone();
                c2.momentum = 0.5;
                out.push((format!("{name}/{mode:?}/momentum"), c2));
            }
        }
    }
    out
}

/// The configurations a big-size case runs: all of them where the backend is fast
/// ([`Harness::full`]), else the ones at `picks` (with a printed note).
fn configs_for<H: Harness>(h: &H, picks: &[usize], what: &str) -> Vec<(String, Config)> {
    let all = configs();
    if h.full() {
        return all;
    }
    let total = all.len();
    let some: Vec<_> = all
        .into_iter()
        .enumerate()
        .filter(|(i, _)| picks.contains(i))
        .map(|(_, c)| c)
        .collect();
    let names: Vec<&str> = some.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "NOTE: {}: {what}: {} of {total} configurations ({names:?}); the full matrix runs on CUDA",
        h.backend(),
        some.len()
    );
    some
}

/// The layouts of a big-size case: both where the backend is fast, else the single layer.
fn layouts_for<H: Harness>(h: &H, n: usize) -> Vec<Layout> {
    let mut v = sizes_layouts(n);
    if !h.full() {
        v.truncate(1);
    }
    v
}

/// Around the thread-block sizes (256, 512, 1024) and the global block/grid threshold (2^15).
const EDGE_SIZES: [usize; 14] = [
    0, 1, 2, 255, 256, 257, 511, 512, 513, 1023, 1025, 32767, 32768, 32769,
];

const BIG: usize = (1 << 20) + 3;

fn payloads_from(c: &mut gradsift::cpu::Compressor, workers: usize, n: usize) -> Vec<Payload> {
    (0..workers)
        .map(|k| c.step(&data(n, k as u64 + 50), k as u64).unwrap().clone())
        .collect()
}

fn payloads_for(layout: &Layout, config: &Config, k: usize, step: u64) -> Vec<Payload> {
    (0..k)
        .map(|w| {
            let mut c = config.clone();
            c.worker = w as u32;
            let mut comp = gradsift::cpu::Compressor::new(layout, &c).unwrap();
            comp.step(&gaussian::<f32>(layout.n(), 1000 + w as u64, 1.0), step)
                .unwrap()
                .clone()
        })
        .collect()
}

/// The aggregation of `payloads` on the CPU, then on the backend through the host entry
/// point (the dispatched `Device` plan) and the device one (the backend's own plan on its
/// own buffer): all bit-identical.
fn compare_aggregation<H: Harness>(
    h: &H,
    layout: &Layout,
    mode: Mode,
    rule: Average,
    payloads: &[Payload],
    what: &str,
) {
    let n = layout.n();
    let k = payloads.len();
    let mut want = vec![0.0f32; n];
    gradsift::cpu::Aggregator::new(layout, mode, rule, k)
        .unwrap()
        .aggregate(payloads, &mut want)
        .unwrap();
    let mut got = vec![7.0f32; n];
    h.device()
        .aggregator(layout, mode, rule, k)
        .unwrap()
        .aggregate(payloads, &mut got)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    compare_f32(&want, &got, Tol::Bits, what);
    let mut agg = h.aggregator(layout, mode, rule, k).unwrap();
    let mut dev = vec![f32::NAN; n];
    h.aggregate_device(&mut agg, payloads, &mut dev)
        .unwrap_or_else(|e| panic!("{what} (device): {e}"));
    compare_f32(&want, &dev, Tol::Bits, &format!("{what} (device)"));
}

fn close_var(w: &VarianceEstimate, g: &VarianceEstimate, what: &str) {
    let scale = w.sigma_x2 + w.sigma_n2;
    assert!(
        (w.sigma_n2 - g.sigma_n2).abs() <= 1e-4 * w.sigma_n2.abs() + 1e-12,
        "{what}: sigma_n2 {w:?} vs {g:?}"
    );
    assert!(
        (w.sigma_x2 - g.sigma_x2).abs() <= 1e-4 * scale + 1e-12,
        "{what}: sigma_x2 {w:?} vs {g:?}"
    );
}

/// The wgpu backend cannot stack 16-bit device buffers of odd length (a worker would start
/// mid-word); it says so with `InvalidConfig` (documented on its `estimate_variance_device`).
fn odd_16bit_on_wgpu<H: Harness, T: Element>(h: &H, n: usize) -> bool {
    h.backend() == Backend::Wgpu && T::DTYPE != DType::F32 && n % 2 == 1
}

// ---- cases from the old wgpu suite ----------------------------------------------------------

fn sizes_every_sparse_method_global<H: Harness>(h: &H) {
    for n in [0usize, 1, 2, 255, 256, 257, 4095, 4096, 4097, 100_003] {
        let layout = Layout::single(n).unwrap();
        for (name, cfg) in sparse_methods() {
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s + n as u64)).collect();
            compare(h, &layout, &cfg, &grads, &format!("{name} n={n}"));
        }
    }
}

fn philox_and_rounding_conformance_through_randomk_and_f16_values<H: Harness>(h: &H) {
    // Random-k indices depend only on Philox keys: seeds, workers and 64-bit steps with
    // non-zero high words exercise every word of counter and key.
    let n = 5000;
    let layout = Layout::single(n).unwrap();
    for (seed, worker) in [(0u64, 0u32), (u64::MAX, u32::MAX), (0x299f31d0_a4093822, 7)] {
        let mut cfg = Config::randomk(0.02);
        cfg.seed = seed;
        cfg.worker = worker;
        let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
        let mut g = h.compressor(&layout, &cfg).unwrap();
        let x = data(n, 9);
        for (i, t) in [0u64, 1, u64::MAX, 0x0000_0007_0000_0003]
            .into_iter()
            .enumerate()
        {
            let w = c.step(&x, t).unwrap().clone();
            let p = if i % 2 == 0 {
                g.step(&x, t).unwrap().clone()
            } else {
                h.step_device(&mut g, &x, t).unwrap();
                g.payload().unwrap().clone()
            };
            compare_payload(
                &w,
                &p,
                Tol::Bits,
                &format!("randomk seed={seed} t={t}"),
                true,
            );
        }
    }
    // Values near every rounding boundary of f16/bf16: ties, subnormals, overflow.
    let mut x = Vec::new();
    for e in -30i32..20 {
        for m in [
            0x000u32, 0x001, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001,
            0x18000,
        ] {
            let base = 2f32.powi(e);
            let v = f32::from_bits(base.to_bits() | m);
            x.push(v);
            x.push(-v);
        }
    }
    x.extend_from_slice(&[
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        f32::MAX,
        -f32::MAX,
        3e38,
        0.0,
        -0.0,
    ]);
    x.extend_from_slice(&[1e-40, -1e-40, 6e-8, 3e-8, 2.98e-8]);
    let n = x.len();
    let layout = Layout::single(n).unwrap();
    for dt in [DType::F16, DType::BF16, DType::F32] {
        for scale in [Scale::None, Scale::Unbiased] {
            let mut cfg = Config::rtopk(1.0, 0.5);
            cfg.values = dt;
            cfg.scale = scale;
            compare(
                h,
                &layout,
                &cfg,
                &[x.clone()],
                &format!("rounding {dt:?} {scale:?}"),
            );
            if scale == Scale::Unbiased {
                // Doubled, f32::MAX and 3e38 overflow, so the step above is rejected on both
                // sides (SPEC §5); without them the scaled values' rounding is compared.
                let tame: Vec<f32> = x
                    .iter()
                    .map(|&v| if v.abs() > 1e38 { 1.0 } else { v })
                    .collect();
                let mut cfg = Config::rtopk(1.0, 0.5);
                cfg.values = dt;
                cfg.scale = scale;
                compare(
                    h,
                    &layout,
                    &cfg,
                    &[tame],
                    &format!("rounding {dt:?} {scale:?}, no overflow"),
                );
            }
            let mut cfg = Config::topk(1.0);
            cfg.values = dt;
            compare(
                h,
                &layout,
                &cfg,
                &[x.clone(), x.clone()],
                &format!("rounding all {dt:?}"),
            );
        }
    }
}

fn gradient_dtypes_f16_bf16<H: Harness>(h: &H) {
    for n in [1usize, 255, 257, 10_001] {
        let layout = Layout::single(n).unwrap();
        for (name, cfg) in sparse_methods() {
            let g16: Vec<Vec<f16>> = (0..2).map(|s| to(&data(n, s))).collect();
            compare(h, &layout, &cfg, &g16, &format!("{name} f16 n={n}"));
            let gb: Vec<Vec<bf16>> = (0..2).map(|s| to(&data(n, s + 5))).collect();
            compare(h, &layout, &cfg, &gb, &format!("{name} bf16 n={n}"));
        }
        // Subnormal, infinite and NaN f16 inputs widen exactly (the step then fails alike).
        let mut special: Vec<f16> = to(&data(n, 1));
        special[0] = f16::from_bits(0x0001);
        if n > 2 {
            special[1] = f16::from_bits(0x83FF);
            special[2] = f16::from_bits(0x7BFF);
        }
        compare(
            h,
            &layout,
            &Config::topk(0.5),
            &[special.clone()],
            "f16 subnormals",
        );
        special[n - 1] = f16::INFINITY;
        compare(h, &layout, &Config::topk(0.5), &[special], "f16 inf");
    }
}

fn per_layer_thousand_mixed_layers<H: Harness>(h: &H) {
    let layout = mixed_layout(1000, 42);
    let n = layout.n();
    for (name, mut cfg) in sparse_methods()
        .into_iter()
        .chain([("sign", Config::sign())])
    {
        cfg.mode = Mode::PerLayer;
        cfg.scale = Scale::Unbiased;
        let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s + 100)).collect();
        compare(h, &layout, &cfg, &grads, &format!("per-layer {name}"));
    }
}

fn group_counts_match_cpu<H: Harness>(h: &H) {
    let layout = mixed_layout(60, 7);
    let n = layout.n();
    let mut cfg = Config::rtopk(0.05, 0.01);
    cfg.mode = Mode::PerLayer;
    cfg.scale = Scale::Unbiased;
    // Every shape of group: nothing sent, k = r, r = n_l, k well below r.
    cfg.group_counts = layout
        .sizes()
        .enumerate()
        .map(|(l, nl)| {
            let k = ((l % 5) * nl / 40 + l % 3).min(nl) as u64;
            let r = match l % 4 {
                0 => k,
                1 => nl as u64,
                _ => (k * (1 + (l % 4) as u64)).min(nl as u64),
            };
            (r, k)
        })
        .collect();
    let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s + 300)).collect();
    compare(h, &layout, &cfg, &grads, "per-layer group_counts");
}

fn sign_global_and_per_layer<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 257, 4097, 70_001] {
        let layout = Layout::new(&[n / 3, 0, n - n / 3]).unwrap();
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut cfg = Config::sign();
            cfg.mode = mode;
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s)).collect();
            compare(h, &layout, &cfg, &grads, &format!("sign n={n} {mode:?}"));
        }
    }
}

fn qsgd_global_and_per_layer<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 257, 4097, 70_001] {
        let layout = Layout::new(&[n / 3, 0, n - n / 3]).unwrap();
        for (mode, levels, momentum) in [
            (Mode::Global, 7u8, 0.0f32),
            (Mode::PerLayer, 1, 0.5),
            (Mode::PerLayer, 127, 0.0),
        ] {
            let mut cfg = Config::qsgd(levels);
            cfg.mode = mode;
            cfg.momentum = momentum;
            cfg.seed = 0x5EED_0000_0001;
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s + 40)).collect();
            compare(
                h,
                &layout,
                &cfg,
                &grads,
                &format!("qsgd s={levels} n={n} {mode:?}"),
            );
        }
    }
    // Magnitudes across the exponent range, exact zeros and a group whose max is subnormal
    // (inv = +inf: level s for every non-zero element, SPEC §13).
    let layout = Layout::new(&[3000, 64, 10]).unwrap();
    let mut wide: Vec<f32> = (0..3000)
        .map(|i| {
            let e = (i % 60) - 30;
            let m = 1.0 + (i as f32 * 0.618).fract();
            if i % 11 == 0 {
                0.0
            } else if i % 2 == 0 {
                -m * 2f32.powi(e)
            } else {
                m * 2f32.powi(e)
            }
        })
        .collect();
    wide.extend((0..64).map(|i| (i as f32 - 32.0) * 1e-41));
    wide.extend([0.0f32; 10]);
    for levels in [1u8, 3, 100, 127] {
        let mut cfg = Config::qsgd(levels);
        cfg.mode = Mode::PerLayer;
        compare(
            h,
            &layout,
            &cfg,
            &[wide.clone(), wide.clone()],
            &format!("qsgd wide s={levels}"),
        );
    }
    // 1,500 small layers, each with its own scale anywhere in f32's range: 3,000 quotients
    // per step (wgpu divides with integers, SPEC §13), each seen through codes and residual.
    let sizes: Vec<usize> = (0..1500).map(|l| 1 + l % 5).collect();
    let layout = Layout::new(&sizes).unwrap();
    let mut rng = common::Rng::new(77);
    let x: Vec<f32> = (0..layout.n())
        .map(|_| f32::from_bits(rng.next_u32() & 0xFF7F_FFFF)) // finite, either sign
        .collect();
    for (levels, error_feedback) in [(3u8, true), (100, true), (100, false)] {
        let mut cfg = Config::new(Method::Qsgd {
            levels,
            error_feedback,
        });
        cfg.mode = Mode::PerLayer;
        compare(
            h,
            &layout,
            &cfg,
            std::slice::from_ref(&x),
            &format!("qsgd scales everywhere s={levels} feedback={error_feedback}"),
        );
    }
}

fn momentum_exact_on_dyadic_inputs<H: Harness>(h: &H) {
    let layout = mixed_layout(60, 7);
    let n = layout.n();
    for (name, mut cfg) in sparse_methods()
        .into_iter()
        .chain([("sign", Config::sign())])
    {
        for mode in [Mode::Global, Mode::PerLayer] {
            cfg.mode = mode;
            cfg.momentum = 0.5;
            let grads: Vec<Vec<f32>> = (0..4).map(|s| dyadic(n, s)).collect();
            compare(
                h,
                &layout,
                &cfg,
                &grads,
                &format!("momentum {name} {mode:?}"),
            );
        }
    }
    // A momentum that is not a power of two: multiply-add may fuse, so values within 1 ulp.
    let layout = Layout::single(3000).unwrap();
    let mut cfg = Config::topk(0.5);
    cfg.momentum = 0.9;
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    let mut g = h.device().compressor(&layout, &cfg).unwrap();
    let mut m = Vec::new();
    for t in 0..3 {
        let x = data(3000, t);
        c.step(&x, t).unwrap();
        g.step(&x, t).unwrap();
        g.momentum(&mut m).unwrap();
        compare_f32(c.momentum_slice(), &m, Tol::Within(2.4e-7), "momentum 0.9");
    }
}

fn adversarial_ties_resolve_to_lower_index<H: Harness>(h: &H) {
    for n in [257usize, 4097, 50_000] {
        let layout = Layout::single(n).unwrap();
        let inputs: Vec<(&str, Vec<f32>)> = vec![
            ("all equal", vec![1.0; n]),
            (
                "signed zeros",
                (0..n)
                    .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
                    .collect(),
            ),
            (
                "+-equal",
                (0..n)
                    .map(|i| if i % 3 == 0 { -2.5 } else { 2.5 })
                    .collect(),
            ),
            (
                "two levels",
                (0..n).map(|i| if i % 7 == 0 { 3.0 } else { 1.0 }).collect(),
            ),
            (
                "subnormals",
                (0..n).map(|i| f32::from_bits((i % 5) as u32 + 1)).collect(),
            ),
            ("ramp", (0..n).map(|i| (i / 16) as f32).collect()),
        ];
        for (name, x) in inputs {
            for (m, cfg) in sparse_methods() {
                compare(
                    h,
                    &layout,
                    &cfg,
                    &[x.clone(), x.clone()],
                    &format!("ties {name} {m} n={n}"),
                );
            }
        }
    }
}

fn nan_injection_leaves_state_untouched<H: Harness>(h: &H) {
    let layout = mixed_layout(30, 3);
    let n = layout.n();
    for (name, mut cfg) in sparse_methods()
        .into_iter()
        .chain([("sign", Config::sign())])
    {
        for momentum in [0.0, 0.5] {
            cfg.momentum = momentum;
            let mut grads: Vec<Vec<f32>> = (0..4).map(|s| dyadic(n, s)).collect();
            grads[1][n / 2] = f32::NAN;
            grads[1][n / 3] = f32::INFINITY;
            grads[1][n - 1] = f32::NEG_INFINITY;
            grads[2][0] = f32::NAN;
            compare(
                h,
                &layout,
                &cfg,
                &grads,
                &format!("nan {name} m={momentum}"),
            );
        }
    }
    // Overflow of e + g to infinity is non-finite too.
    let layout = Layout::single(10).unwrap();
    let mut g = h.device().compressor(&layout, &Config::topk(0.1)).unwrap();
    let big = vec![f32::MAX; 10];
    g.step(&big, 0).unwrap();
    let err = g.step(&big, 1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                count: 9,
                first_index: 1
            }
        ),
        "{err:?}"
    );
}

/// SPEC §5: a sent value that only `Scale::Unbiased` makes non-finite (`|p| * scale >
/// f32::MAX`) fails the step like a non-finite `p`: the same `Error::NonFinite` (count and
/// first index of those values) as the CPU, residual and momentum untouched, later steps
/// identical. Block-sized and grid-wide groups, f32 and f16 values, with and without
/// momentum, every top-r candidate overflowing (1 in 5 planted) or only some (1 in 97).
fn unbiased_scale_overflow_is_rejected<H: Harness>(h: &H) {
    let mut layouts = vec![mixed_layout(30, 4)];
    for n in [3000usize, 40_000, (1 << 20) + 3] {
        if n < 1 << 20 || h.full() {
            layouts.push(Layout::new(&[n / 2, n - n / 2]).unwrap());
        }
    }
    for layout in &layouts {
        let n = layout.n();
        for mode in [Mode::Global, Mode::PerLayer] {
            for (values, momentum) in [(DType::F32, 0.0), (DType::F16, 0.5)] {
                for every in [5usize, 97] {
                    let mut cfg = Config::rtopk(0.05, 0.01);
                    cfg.scale = Scale::Unbiased;
                    cfg.mode = mode;
                    cfg.values = values;
                    cfg.momentum = momentum;
                    let mut grads: Vec<Vec<f32>> = (0..4).map(|s| dyadic(n, s + 10)).collect();
                    for i in (0..n).step_by(every) {
                        grads[1][i] = if i % 2 == 0 { 1e38 } else { -1e38 };
                    }
                    let what =
                        format!("scaled overflow n={n} {mode:?} {values:?} m={momentum} 1/{every}");
                    // The reference rejects the planted step (compare steps at t = 3, 10, ..),
                    // so the comparison is not vacuous.
                    let mut c = gradsift::cpu::Compressor::new(layout, &cfg).unwrap();
                    c.step(&grads[0], 3).unwrap();
                    let r = c.step(&grads[1], 10).map(|_| ());
                    assert!(matches!(r, Err(Error::NonFinite { .. })), "{what}: {r:?}");
                    compare(h, layout, &cfg, &grads, &what);
                }
            }
        }
    }
}

fn large_buffer_two_to_the_twenty_plus_three<H: Harness>(h: &H) {
    let n = BIG;
    let layout = Layout::single(n).unwrap();
    let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s)).collect();
    compare(
        h,
        &layout,
        &Config::rtopk(0.01, 0.001),
        &grads,
        "rtopk 2^20+3",
    );
    let g16: Vec<Vec<bf16>> = vec![to(&grads[0])];
    compare(h, &layout, &Config::topk(0.001), &g16, "topk bf16 2^20+3");
    let mut cfg = Config::sign();
    cfg.momentum = 0.5;
    compare(h, &layout, &cfg, &grads[..1], "sign 2^20+3");
    compare(
        h,
        &layout,
        &Config::randomk(0.001),
        &grads[..1],
        "randomk 2^20+3",
    );
}

fn device_buffer_api_and_errors<H: Harness>(h: &H) {
    let n = 1000;
    let layout = Layout::single(n).unwrap();
    let cfg = Config::topk(0.01);
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let mut p = Payload::default();
    assert!(g.read_payload(&mut p).is_err(), "read before any step");
    // 16-bit elements on a device buffer (packed two per word on wgpu).
    let x: Vec<f16> = to(&data(n, 1));
    h.step_device(&mut g, &x, 5).unwrap();
    g.read_payload(&mut p).unwrap();
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    compare_payload(c.step(&x, 5).unwrap(), &p, Tol::Bits, "device buffer", true);
    // A buffer too short for n elements: on wgpu the old suite's 16-bit buffer passed as
    // f32 (2000 of 4000 bytes) took this same byte-length check.
    let short: Vec<f32> = data(n - 1, 2);
    assert!(matches!(
        h.step_device(&mut g, &short, 6),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        g.step(&data(10, 1), 6),
        Err(Error::LengthMismatch { .. })
    ));
    let bad = Config::rtopk(0.1, 0.2);
    assert!(matches!(
        h.compressor(&layout, &bad),
        Err(Error::InvalidConfig(_))
    ));
    // A plan larger than one storage binding is rejected with the limit in the message.
    if let Some(max) = h.max_binding_bytes() {
        if max / 4 < u32::MAX as u64 {
            let huge = Layout::single((max / 4 + 1) as usize).unwrap();
            let e = h.compressor(&huge, &cfg).err().expect("above the limit");
            assert!(e.to_string().contains(&max.to_string()), "{e}");
        }
    }
}

fn aggregation_bit_identical<H: Harness>(h: &H) {
    let layout = mixed_layout(50, 11);
    let n = layout.n();
    for mode in [Mode::Global, Mode::PerLayer] {
        for rule in [Average::OverWorkers, Average::OverSenders] {
            for (name, mut cfg) in sparse_methods()
                .into_iter()
                .chain([("sign", Config::sign()), ("qsgd", Config::qsgd(7))])
            {
                cfg.mode = mode;
                let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
                let k = 5;
                let mut payloads = payloads_from(&mut c, k, n);
                if name == "topk" {
                    // Mixed kinds in one round.
                    let mut s = Config::sign();
                    s.mode = mode;
                    let mut cs = gradsift::cpu::Compressor::new(&layout, &s).unwrap();
                    payloads[2] = cs.step(&data(n, 1), 0).unwrap().clone();
                    let mut q = Config::qsgd(3);
                    q.mode = mode;
                    let mut cq = gradsift::cpu::Compressor::new(&layout, &q).unwrap();
                    payloads[4] = cq.step(&data(n, 2), 0).unwrap().clone();
                }
                compare_aggregation(
                    h,
                    &layout,
                    mode,
                    rule,
                    &payloads,
                    &format!("aggregate {name} {mode:?} {rule:?}"),
                );
                // Bad payloads are rejected before anything is written.
                let mut agg = h.device().aggregator(&layout, mode, rule, k).unwrap();
                let mut bad = payloads.clone();
                if let Payload::Sparse(p) = &mut bad[3] {
                    if p.indices.len() >= 2 {
                        p.indices[1] = p.indices[0];
                        let mut out = vec![7.0; n];
                        assert!(matches!(
                            agg.aggregate(&bad, &mut out),
                            Err(Error::BadPayload { worker: 3, .. })
                        ));
                        assert!(out.iter().all(|&v| v == 7.0));
                    }
                }
                if let Payload::Qsgd(p) = &mut bad[3] {
                    p.codes[n / 2] = 8; // beyond 7 levels
                    let mut out = vec![7.0; n];
                    let err = agg.aggregate(&bad, &mut out).unwrap_err();
                    assert!(
                        matches!(&err, Error::BadPayload { worker: 3, reason } if reason.contains("beyond")),
                        "{err}"
                    );
                    assert!(out.iter().all(|&v| v == 7.0));
                }
            }
        }
    }
    assert!(
        h.device()
            .aggregator(&layout, Mode::Global, Average::OverWorkers, 0)
            .is_err()
    );
    assert!(
        h.aggregator(&layout, Mode::Global, Average::OverWorkers, 0)
            .is_err()
    );
}

fn layer_statistics_within_spec_tolerance<H: Harness>(h: &H) {
    let layout = mixed_layout(1000, 5);
    let n = layout.n();
    let mut x: Vec<f32> = data(n, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 3.0 + (i % 17) as f32)
        .collect();
    x[5] = f32::NAN;
    x[n / 2] = f32::INFINITY;
    // A layer with nothing finite: NaN moments (SPEC §8); layers l % 10 == 0 are empty.
    for (j, i) in layout.layer(2).enumerate() {
        x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
    }
    stats_case(h, &layout, &x, "mixed f32");
    stats_case::<H, f16>(h, &layout, &to(&x), "mixed f16");
    stats_case::<H, bf16>(h, &layout, &to(&x), "mixed bf16");
    let big = Layout::new(&[BIG, 0, 1]).unwrap();
    stats_case(
        h,
        &big,
        &data(big.n(), 8)
            .iter()
            .map(|v| v + 100.0)
            .collect::<Vec<_>>(),
        "2^20+3 offset",
    );
}

fn variance_estimator_within_spec_tolerance<H: Harness>(h: &H) {
    let layout = mixed_layout(200, 9);
    let n = layout.n();
    let signal = data(n, 1);
    for k in [2usize, 3, 8] {
        let workers: Vec<Vec<f32>> = (0..k)
            .map(|w| {
                signal
                    .iter()
                    .zip(data(n, 10 + w as u64))
                    .map(|(s, e)| s + 0.3 * e)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = workers.iter().map(|w| w.as_slice()).collect();
        let mut a = Vec::new();
        gradsift::cpu::estimate_variance(&refs, &layout, &mut a).unwrap();
        let mut stats = h.device().stats(&layout, k).unwrap();
        let mut b = Vec::new();
        stats.estimate_variance(&refs, &mut b).unwrap();
        let mut own = h.stats(&layout, k).unwrap();
        let mut d = Vec::new();
        h.estimate_variance_device(&mut own, &refs, &mut d).unwrap();
        assert_eq!((a.len(), a.len()), (b.len(), d.len()));
        for (l, ((a, b), d)) in a.iter().zip(&b).zip(&d).enumerate() {
            close_var(a, b, &format!("K={k} layer {l}"));
            close_var(a, d, &format!("K={k} layer {l} (device)"));
        }
        let mut bad = workers.clone();
        bad[1][7] = f32::NAN;
        bad[1][3] = f32::INFINITY;
        let refs: Vec<&[f32]> = bad.iter().map(|w| w.as_slice()).collect();
        let e1 = gradsift::cpu::estimate_variance(&refs, &layout, &mut a).unwrap_err();
        let e2 = stats.estimate_variance(&refs, &mut b).unwrap_err();
        assert_eq!(e1, e2);
        let e3 = h
            .estimate_variance_device(&mut own, &refs, &mut d)
            .unwrap_err();
        assert_eq!(e1, e3, "device");
    }
    let one = [signal.as_slice()];
    let mut stats = h.device().stats(&layout, 2).unwrap();
    assert!(stats.estimate_variance(&one, &mut Vec::new()).is_err());
}

fn reports_the_device<H: Harness>(h: &H) {
    let d = h.device();
    println!(
        "{}: {}; max storage binding {:?} bytes",
        h.backend(),
        d.description(),
        h.max_binding_bytes()
    );
    assert_eq!(d.backend(), h.backend());
    assert!(!d.description().is_empty());
    assert!(d.description().starts_with(h.backend().name()));
    // `Device::open` itself opens this backend too.
    let opened = Device::open(h.backend()).unwrap();
    assert_eq!(opened.backend(), h.backend());
    assert!(opened.skipped().is_empty());
}

fn randomized_configs_match_cpu<H: Harness>(h: &H) {
    let mut s = 0x5eed_u64;
    let mut next = |m: u64| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) % m.max(1)
    };
    for case in 0..24 {
        let layers = 1 + next(40) as usize;
        let sizes: Vec<usize> = (0..layers)
            .map(|_| match next(4) {
                0 => 0,
                1 => next(300) as usize,
                _ => next(6000) as usize,
            })
            .collect();
        let layout = Layout::new(&sizes).unwrap();
        let n = layout.n();
        let rho_r = [0.0, 0.001, 0.05, 0.3, 1.0][next(5) as usize];
        let rho_k = rho_r * [0.0, 0.1, 0.5, 1.0][next(4) as usize];
        let mut cfg = match next(5) {
            0 => Config::rtopk(rho_r, rho_k),
            1 => Config::topk(rho_k),
            2 => Config::randomk(rho_k),
            3 => Config::new(Method::RTopK {
                r: Count::Exact(next(500)),
                k: Count::Exact(next(50)),
            }),
            _ => Config::sign(),
        };
        if let Method::RTopK {
            r: Count::Exact(r),
            k: Count::Exact(k),
        } = cfg.method
        {
            cfg.method = Method::RTopK {
                r: Count::Exact(r.max(k)),
                k: Count::Exact(k),
            };
        }
        cfg.mode = if next(2) == 0 {
            Mode::Global
        } else {
            Mode::PerLayer
        };
        cfg.scale = if next(2) == 0 {
            Scale::None
        } else {
            Scale::Unbiased
        };
        cfg.values = [DType::F32, DType::F16, DType::BF16][next(3) as usize];
        cfg.momentum = if next(3) == 0 { 0.5 } else { 0.0 };
        cfg.seed = (next(u64::MAX) << 20) | next(1 << 20);
        cfg.worker = next(1 << 31) as u32;
        let grads: Vec<Vec<f32>> = (0..3).map(|t| dyadic(n, case * 10 + t)).collect();
        let what = format!("random case {case}: {cfg:?} layers {sizes:?}");
        match next(3) {
            0 => compare(h, &layout, &cfg, &grads, &what),
            1 => {
                let g: Vec<Vec<f16>> = grads.iter().map(|g| to(g)).collect();
                compare(h, &layout, &cfg, &g, &what)
            }
            _ => {
                let g: Vec<Vec<bf16>> = grads.iter().map(|g| to(g)).collect();
                compare(h, &layout, &cfg, &g, &what)
            }
        }
    }
}

/// Generic, but only wgpu can lose its device on demand (`wgpu::Device::destroy`); the CPU
/// has none and CUDA offers no safe way, so those print a note.
fn lost_device_is_a_typed_error<H: Harness>(h: &H) {
    let Some((device, lose)) = h.losable() else {
        println!(
            "NOTE: {}: cannot lose the device on demand; nothing to check",
            h.backend()
        );
        return;
    };
    let layout = Layout::single(5000).unwrap();
    let mut g = device.compressor(&layout, &Config::topk(0.01)).unwrap();
    let x = data(5000, 1);
    g.step(&x, 0).unwrap();
    lose();
    let r = g.step(&x, 1).map(|_| ());
    let name = h.backend().name();
    assert!(
        matches!(&r, Err(Error::Device { backend, .. }) if *backend == name),
        "{r:?}"
    );
    let r = device.compressor(&layout, &Config::topk(0.01));
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
}

fn edge_sizes_for_aggregation_and_statistics<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 256, 257, BIG] {
        let layout = Layout::new(&[n / 2, 0, n - n / 2]).unwrap();
        // Aggregation: sparse and sign payloads, both rules, per-layer groups.
        for rule in [Average::OverWorkers, Average::OverSenders] {
            for cfg in [Config::rtopk(0.1, 0.05), Config::sign()] {
                let mut cfg = cfg;
                cfg.mode = Mode::PerLayer;
                cfg.values = DType::BF16;
                let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
                let payloads = payloads_from(&mut c, 3, n);
                compare_aggregation(
                    h,
                    &layout,
                    Mode::PerLayer,
                    rule,
                    &payloads,
                    &format!("aggregate n={n} {rule:?}"),
                );
            }
        }
        // Statistics on every dtype.
        let x: Vec<f32> = data(n, 2).iter().map(|v| v * 10.0 - 3.0).collect();
        stats_case(h, &layout, &x, &format!("n={n} f32"));
        stats_case::<H, f16>(h, &layout, &to(&x), &format!("n={n} f16"));
        // Variance estimator, K = 2, bf16.
        let y: Vec<bf16> = to(&data(n, 3));
        let z: Vec<bf16> = to(&data(n, 4));
        let refs: [&[bf16]; 2] = [&y, &z];
        let (mut va, mut vb) = (Vec::new(), Vec::new());
        gradsift::cpu::estimate_variance(&refs, &layout, &mut va).unwrap();
        let mut stats = h.device().stats(&layout, 2).unwrap();
        stats.estimate_variance(&refs, &mut vb).unwrap();
        for (a, b) in va.iter().zip(&vb) {
            let scale = a.sigma_x2 + a.sigma_n2;
            assert!(
                (a.sigma_n2 - b.sigma_n2).abs() <= 1e-4 * scale + 1e-12,
                "n={n}: {a:?} {b:?}"
            );
            assert!(
                (a.sigma_x2 - b.sigma_x2).abs() <= 1e-4 * scale + 1e-12,
                "n={n}: {a:?} {b:?}"
            );
        }
    }
}

fn rejected_step_rolls_back_on_the_device_without_a_host_read<H: Harness>(h: &H) {
    let n = 9000;
    let layout = Layout::single(n).unwrap();
    let mut cfg = Config::rtopk(0.05, 0.01);
    cfg.momentum = 0.5;
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let good: Vec<Vec<f32>> = (0..3).map(|s| dyadic(n, s)).collect();
    let mut bad = good[1].clone();
    bad[4321] = f32::NAN;
    c.step(&good[0], 0).unwrap();
    h.step_device(&mut g, &good[0], 0).unwrap();
    // Rejected on both; on a GPU the step is not read, so only the device knows (the CPU
    // reports it from the step itself).
    assert!(c.step(&bad, 1).is_err());
    let r = h.step_device(&mut g, &bad, 1);
    if h.backend() == Backend::Cpu {
        assert!(matches!(r, Err(Error::NonFinite { .. })), "{r:?}");
    } else {
        r.unwrap();
    }
    let want = c.step(&good[2], 2).unwrap().clone();
    h.step_device(&mut g, &good[2], 2).unwrap();
    let mut p = Payload::default();
    g.read_payload(&mut p).unwrap();
    assert_eq!(
        g.rejected_steps().unwrap(),
        1,
        "the unread rejection is counted"
    );
    compare_payload(&want, &p, Tol::Bits, "after an unread rejected step", true);
    h.step_device(&mut g, &good[2], 3).unwrap();
    g.read_payload(&mut p).unwrap();
    assert_eq!(
        g.rejected_steps().unwrap(),
        1,
        "counted since the plan was built, not since the last read"
    );
    c.step(&good[2], 3).unwrap();
    let mut r = Vec::new();
    g.residual(&mut r).unwrap();
    compare_f32(
        c.residual_slice(),
        &r,
        Tol::Bits,
        "residual after an unread rejected step",
    );
    g.momentum(&mut r).unwrap();
    compare_f32(
        c.momentum_slice(),
        &r,
        Tol::Bits,
        "momentum after an unread rejected step",
    );
    // reset() zeroes both on the device.
    g.reset().unwrap();
    g.residual(&mut r).unwrap();
    assert!(r.iter().all(|&v| v == 0.0));
    g.momentum(&mut r).unwrap();
    assert!(r.len() == n && r.iter().all(|&v| v == 0.0));
}

// ---- cases from the old CUDA suite ----------------------------------------------------------

fn run_all_configs<H: Harness, T: Element>(h: &H, sizes: &[usize], configs: &[(String, Config)]) {
    for &n in sizes {
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            let grads: Vec<Vec<T>> = (0..3).map(|s| gaussian::<T>(n, 17 + s, 1.0)).collect();
            for (name, config) in configs {
                compare(
                    h,
                    &layout,
                    config,
                    &grads,
                    &format!(
                        "{}/n={n}/L={}/{name}",
                        std::any::type_name::<T>(),
                        layout.num_layers()
                    ),
                );
            }
        }
    }
}

fn compressor_matches_cpu<H: Harness, T: Element>(h: &H) {
    run_all_configs::<H, T>(h, &EDGE_SIZES, &configs());
    let big = configs_for(
        h,
        &[0, 4, 7, 9, 11, 13, 16],
        &format!("{} 2^20+3", std::any::type_name::<T>()),
    );
    run_all_configs::<H, T>(h, &[BIG], &big);
}

fn compressor_matches_cpu_f32<H: Harness>(h: &H) {
    compressor_matches_cpu::<H, f32>(h);
}

fn compressor_matches_cpu_f16<H: Harness>(h: &H) {
    compressor_matches_cpu::<H, f16>(h);
}

fn compressor_matches_cpu_bf16<H: Harness>(h: &H) {
    compressor_matches_cpu::<H, bf16>(h);
}

fn compressor_matches_cpu_2_pow_26<H: Harness>(h: &H) {
    let n = 1usize << 26;
    let layout = Layout::single(n).unwrap();
    if let Some(max) = h.max_binding_bytes() {
        if (n as u64) * 4 > max {
            // Above this device's storage binding limit: the typed error that names it.
            let e = h
                .compressor(&layout, &Config::topk(0.001))
                .err()
                .expect("above the limit");
            assert!(
                matches!(&e, Error::Device { .. }) && e.to_string().contains(&max.to_string()),
                "{e:?}"
            );
            println!(
                "NOTE: {}: 2^26 f32 is above the {max}-byte binding limit: checked the error, no comparison",
                h.backend()
            );
            return;
        }
    }
    if !h.full() {
        println!(
            "NOTE: {}: the 2^26 comparison runs on CUDA only (too slow here)",
            h.backend()
        );
        return;
    }
    let grads: Vec<Vec<f32>> = (0..2).map(|s| gaussian::<f32>(n, 5 + s, 1.0)).collect();
    for config in [
        Config::rtopk(0.01, 0.001),
        Config::topk(0.001),
        Config::randomk(0.001),
    ] {
        compare(
            h,
            &layout,
            &config,
            &grads,
            &format!("2^26/{:?}", config.method),
        );
    }
    // 32 layers of 2^20 take CUDA's block path, two of 2^24 the grid path.
    let mut sizes: Vec<usize> = (0..32).map(|_| 1 << 20).collect();
    sizes.extend([1 << 24, 1 << 24]);
    let layout = Layout::new(&sizes).unwrap();
    let mut c = Config::rtopk(0.01, 0.001);
    c.mode = Mode::PerLayer;
    compare(h, &layout, &c, &grads, "2^26/per-layer");
}

fn thousand_mixed_layers<H: Harness>(h: &H) {
    let mut r = Lcg(99);
    let mut sizes: Vec<usize> = (0..1000)
        .map(|i| match i % 10 {
            0 => 0,
            1..=6 => 1 + r.below(3000) as usize,
            7 | 8 => 20_000 + r.below(20_000) as usize,
            _ => 1 + r.below(40) as usize,
        })
        .collect();
    // Around CUDA's per-layer block/grid threshold (2^20).
    sizes[500] = 1 << 20;
    sizes[501] = (1 << 20) + 1;
    sizes[999] = 300_001;
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let grads: Vec<Vec<f32>> = (0..3).map(|s| gaussian::<f32>(n, 40 + s, 1.0)).collect();
    for (name, mut config) in configs_for(h, &[3, 4, 9, 17], "1000 layers") {
        config.mode = Mode::PerLayer;
        compare(h, &layout, &config, &grads, &format!("1000 layers/{name}"));
    }
}

fn adversarial_ties<H: Harness>(h: &H) {
    for n in [1000usize, 32769, BIG] {
        let grads: Vec<Vec<f32>> = (0..3).map(|s| adversarial::<f32>(n, 7 + s)).collect();
        let zeros = vec![vec![0.0f32; n]; 2];
        let equal = vec![vec![1.5f32; n]; 2];
        let configs = if n == BIG {
            configs_for(h, &[0, 7, 17], "ties 2^20+3")
        } else {
            configs()
        };
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            for (name, config) in &configs {
                let tag = format!("ties/n={n}/L={}/{name}", layout.num_layers());
                compare(h, &layout, config, &grads, &tag);
                compare(h, &layout, config, &zeros, &format!("{tag}/zeros"));
                compare(h, &layout, config, &equal, &format!("{tag}/equal"));
            }
        }
        let grads16: Vec<Vec<bf16>> = (0..2).map(|s| adversarial::<bf16>(n, 70 + s)).collect();
        compare(
            h,
            &Layout::single(n).unwrap(),
            &Config::rtopk(0.3, 0.1),
            &grads16,
            "ties/bf16",
        );
    }
}

fn nan_steps_are_rejected_and_leave_state_untouched<H: Harness>(h: &H) {
    for n in [100usize, 40_000, BIG] {
        let configs = if n == BIG {
            configs_for(h, &[1, 9, 17], "nan 2^20+3")
        } else {
            configs()
        };
        for (name, mut config) in configs {
            config.momentum = if name.contains("momentum") { 0.9 } else { 0.0 };
            let layout = Layout::new(&[n / 2, n - n / 2]).unwrap();
            let mut bad = gaussian::<f32>(n, 3, 1.0);
            bad[n / 3] = f32::NAN;
            bad[n - 1] = f32::INFINITY;
            let mut huge = gaussian::<f32>(n, 4, 1.0);
            huge[7] = f32::MAX;
            let grads = vec![
                gaussian::<f32>(n, 1, 1.0),
                bad,
                gaussian::<f32>(n, 2, 1.0),
                huge.clone(),
                huge,
            ];
            compare(h, &layout, &config, &grads, &format!("nan/n={n}/{name}"));
        }
    }
}

fn bad_input_is_an_error<H: Harness>(h: &H) {
    let layout = Layout::single(100).unwrap();
    let mut g = h.compressor(&layout, &Config::topk(0.1)).unwrap();
    assert!(matches!(
        h.step_device(&mut g, &[1.0f32; 99], 1),
        Err(Error::LengthMismatch { .. })
    ));
    let mut p = Payload::Sparse(SparsePayload::default());
    assert!(g.read_payload(&mut p).is_err(), "no step yet");
    assert!(h.compressor(&layout, &Config::rtopk(0.1, 0.2)).is_err());
    assert!(
        h.device()
            .compressor(&layout, &Config::rtopk(0.1, 0.2))
            .is_err()
    );
}

/// Statistics of `x` on the CPU, and on the backend through the host entry point and the
/// device one, within SPEC §8's tolerance; a second call on the same plan gives the same
/// result.
fn stats_case<H: Harness, T: Element>(h: &H, layout: &Layout, x: &[T], what: &str) {
    let mut want = Vec::new();
    gradsift::cpu::layer_stats(x, layout, &mut want).unwrap();
    let mut host = h.device().stats(layout, 4).unwrap();
    let mut got = Vec::new();
    host.layer_stats(x, &mut got)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut plan = h.stats(layout, 4).unwrap();
    let mut dev = Vec::new();
    h.layer_stats_device(&mut plan, x, &mut dev)
        .unwrap_or_else(|e| panic!("{what} (device): {e}"));
    assert_eq!(want.len(), got.len(), "{what}: layers");
    assert_eq!(want.len(), dev.len(), "{what}: layers (device)");
    for (l, ((w, g), d)) in want.iter().zip(&got).zip(&dev).enumerate() {
        common::assert_stats_close(w, g, &format!("{what}: layer {l}"));
        common::assert_stats_close(w, d, &format!("{what}: layer {l} (device)"));
    }
    // Reuse: a second call on the same plan gives the same result.
    let mut again = Vec::new();
    h.layer_stats_device(&mut plan, x, &mut again).unwrap();
    // Debug strings: layers without a finite element have NaN moments (SPEC §8), NaN != NaN.
    assert_eq!(
        format!("{dev:?}"),
        format!("{again:?}"),
        "{what}: deterministic"
    );
}

fn layer_stats_match_cpu<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 4095, 4096, 4097, BIG] {
        for layout in sizes_layouts(n) {
            let mut x = gaussian::<f32>(n, 8, 3.0);
            stats_case(h, &layout, &x, &format!("f32 n={n}"));
            // An offset mean: the centred second pass must keep the variance.
            let off: Vec<f32> = x.iter().map(|v| v + 1000.0).collect();
            stats_case(h, &layout, &off, &format!("f32+1000 n={n}"));
            if n > 10 {
                x[3] = f32::NAN;
                x[n - 1] = f32::NEG_INFINITY;
                stats_case(h, &layout, &x, &format!("f32 nan n={n}"));
                // A layer with nothing finite: NaN moments (SPEC §8).
                let mut y = x.clone();
                for (j, i) in layout.layer(0).enumerate() {
                    y[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
                }
                stats_case(h, &layout, &y, &format!("f32 all-bad layer 0 n={n}"));
            }
            stats_case(
                h,
                &layout,
                &gaussian::<f16>(n, 9, 2.0),
                &format!("f16 n={n}"),
            );
            stats_case(
                h,
                &layout,
                &gaussian::<bf16>(n, 10, 2.0),
                &format!("bf16 n={n}"),
            );
        }
    }
    let mut r = Lcg(5);
    let sizes: Vec<usize> = (0..1000)
        .map(|i| {
            if i % 7 == 0 {
                0
            } else {
                r.below(9000) as usize
            }
        })
        .collect();
    let layout = Layout::new(&sizes).unwrap();
    stats_case(
        h,
        &layout,
        &gaussian::<f32>(layout.n(), 11, 1.0),
        "1000 layers",
    );
    let n = 1usize << 26;
    let big = Layout::single(n).unwrap();
    if let Some(max) = h.max_binding_bytes() {
        if (n as u64) * 4 > max {
            // Above the binding limit: the typed error that names it (zeroed pages, cheap).
            let x = vec![0f32; n];
            let e = h
                .device()
                .stats(&big, 1)
                .and_then(|mut s| s.layer_stats(&x, &mut Vec::new()))
                .unwrap_err();
            assert!(
                matches!(&e, Error::Device { .. }) && e.to_string().contains(&max.to_string()),
                "{e:?}"
            );
            println!(
                "NOTE: {}: 2^26 statistics are above the {max}-byte binding limit: checked the error",
                h.backend()
            );
            return;
        }
    }
    if h.full() {
        stats_case(h, &big, &gaussian::<f32>(n, 12, 1.0), "2^26");
    } else {
        println!(
            "NOTE: {}: 2^26 statistics run on CUDA only (too slow here)",
            h.backend()
        );
    }
}

fn var_case<H: Harness, T: Element>(h: &H, layout: &Layout, k: usize, what: &str) {
    let n = layout.n();
    let x = gaussian::<f32>(n, 100, 2.0);
    let ys: Vec<Vec<T>> = (0..k)
        .map(|w| {
            let noise = gaussian::<f32>(n, 200 + w as u64, 0.5);
            x.iter()
                .zip(&noise)
                .map(|(a, b)| T::from_f32(a + b))
                .collect()
        })
        .collect();
    let refs: Vec<&[T]> = ys.iter().map(|v| v.as_slice()).collect();
    let mut want = Vec::new();
    gradsift::cpu::estimate_variance(&refs, layout, &mut want).unwrap();
    let mut got = Vec::new();
    let mut plan = h.stats(layout, k).unwrap();
    let r = h.estimate_variance_device(&mut plan, &refs, &mut got);
    if odd_16bit_on_wgpu::<H, T>(h, n) {
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "{what}: {r:?}");
        // The host entry point stacks them itself.
        Statistics::estimate_variance(&mut plan, &refs, &mut got).unwrap();
    } else {
        r.unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert_eq!(want.len(), got.len());
    for (l, (w, g)) in want.iter().zip(&got).enumerate() {
        close_var(w, g, &format!("{what}: layer {l}"));
    }
}

fn variance_matches_cpu<H: Harness>(h: &H) {
    for n in [1usize, 4097, BIG] {
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            let ks: &[usize] = if n == BIG && !h.full() {
                &[3]
            } else {
                &[2, 3, 8]
            };
            for &k in ks {
                var_case::<H, f32>(h, &layout, k, &format!("f32 n={n} K={k}"));
                var_case::<H, f16>(h, &layout, k, &format!("f16 n={n} K={k}"));
                var_case::<H, bf16>(h, &layout, k, &format!("bf16 n={n} K={k}"));
            }
        }
    }
    // Even n: the wgpu device path stacks 16-bit buffers too.
    let layout = Layout::new(&[1000, 3000]).unwrap();
    var_case::<H, f16>(h, &layout, 3, "f16 n=4000 K=3");
    var_case::<H, bf16>(h, &layout, 2, "bf16 n=4000 K=2");
    // Non-finite input: the same error as the CPU.
    let layout = Layout::single(1000).unwrap();
    let a = gaussian::<f32>(1000, 1, 1.0);
    let mut b = gaussian::<f32>(1000, 2, 1.0);
    b[10] = f32::NAN;
    b[500] = f32::INFINITY;
    let want = gradsift::cpu::estimate_variance(&[&a[..], &b[..]], &layout, &mut Vec::new());
    let mut plan = h.stats(&layout, 2).unwrap();
    let got = h.estimate_variance_device(&mut plan, &[&a[..], &b[..]], &mut Vec::new());
    assert_eq!(want, got);
    assert!(matches!(
        h.estimate_variance_device(&mut plan, &[&a[..]], &mut Vec::new()),
        Err(Error::InvalidConfig(_))
    ));
}

fn aggregation_matches_cpu_bit_for_bit<H: Harness>(h: &H) {
    for n in [1usize, 257, 4097, BIG] {
        let configs = if n == BIG {
            configs_for(h, &[0, 7, 16], "aggregation 2^20+3")
        } else {
            configs()
        };
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            for (name, config) in &configs {
                let ks: &[usize] = if n == BIG && !h.full() {
                    &[3]
                } else {
                    &[1, 3, 8]
                };
                for &k in ks {
                    let ps = payloads_for(&layout, config, k, 1);
                    for rule in [Average::OverWorkers, Average::OverSenders] {
                        compare_aggregation(
                            h,
                            &layout,
                            config.mode,
                            rule,
                            &ps,
                            &format!("agg n={n} L={} {name} {rule:?} K={k}", layout.num_layers()),
                        );
                    }
                }
            }
        }
    }
}

fn bad_payloads_are_rejected_and_out_untouched<H: Harness>(h: &H) {
    let n = 5000;
    let layout = Layout::single(n).unwrap();
    let good = payloads_for(&layout, &Config::topk(0.01), 3, 1);
    let mut cases: Vec<(String, Vec<Payload>)> = Vec::new();
    let mutate = |f: &dyn Fn(&mut SparsePayload)| {
        let mut ps = good.clone();
        if let Payload::Sparse(p) = &mut ps[1] {
            f(p);
        }
        ps
    };
    cases.push((
        "out of range".into(),
        mutate(&|p| *p.indices.last_mut().unwrap() = n as u32),
    ));
    cases.push(("duplicate".into(), mutate(&|p| p.indices[1] = p.indices[0])));
    cases.push(("unsorted".into(), mutate(&|p| p.indices.swap(0, 1))));
    cases.push(("nan value".into(), mutate(&|p| p.values[2] = f32::NAN)));
    cases.push((
        "length".into(),
        mutate(&|p| {
            p.values.pop();
        }),
    ));
    cases.push(("wrong n".into(), mutate(&|p| p.n = 4999)));
    let mut both = mutate(&|p| p.values[0] = f32::INFINITY);
    if let Payload::Sparse(p) = &mut both[2] {
        p.indices[0] = u32::MAX;
    }
    cases.push(("first bad worker wins".into(), both));
    for rule in [Average::OverWorkers, Average::OverSenders] {
        let mut cpu_agg = gradsift::cpu::Aggregator::new(&layout, Mode::Global, rule, 3).unwrap();
        let mut host_agg = h
            .device()
            .aggregator(&layout, Mode::Global, rule, 3)
            .unwrap();
        let mut dev_agg = h.aggregator(&layout, Mode::Global, rule, 3).unwrap();
        for (name, ps) in &cases {
            let mut a = vec![7.0f32; n];
            let mut b = vec![7.0f32; n];
            let want = cpu_agg.aggregate(ps, &mut a);
            let got = host_agg.aggregate(ps, &mut b);
            assert!(want.is_err(), "{name}: the reference accepts it");
            assert_eq!(want, got, "{name}");
            assert!(b.iter().all(|&v| v == 7.0), "{name}: out was written");
            let mut d = vec![7.0f32; n];
            let got = h.aggregate_device(&mut dev_agg, ps, &mut d);
            assert_eq!(want, got, "{name} (device)");
            assert!(
                d.iter().all(|&v| v == 7.0),
                "{name}: device out was written"
            );
        }
        assert!(host_agg.aggregate(&good[..2], &mut vec![0.0; n]).is_err());
        assert!(host_agg.aggregate(&good, &mut vec![0.0; n - 1]).is_err());
    }
    assert!(
        h.aggregator(&layout, Mode::Global, Average::OverWorkers, 0)
            .is_err()
    );
}

/// The backend's own payloads feed its aggregator: the end-to-end path of a training step.
fn backend_payloads_round_trip<H: Harness>(h: &H) {
    let layout = Layout::new(&[1000, 70_000, 3]).unwrap();
    let n = layout.n();
    let mut config = Config::rtopk(0.1, 0.02);
    config.mode = Mode::PerLayer;
    config.scale = Scale::Unbiased;
    let mut ps = Vec::new();
    for w in 0..4u32 {
        let mut g = h
            .compressor(&layout, &config.clone().with_worker(w))
            .unwrap();
        h.step_device(&mut g, &gaussian::<f32>(n, 60 + u64::from(w), 1.0), 9)
            .unwrap();
        let mut p = Payload::default();
        g.read_payload(&mut p).unwrap();
        ps.push(p);
    }
    compare_aggregation(
        h,
        &layout,
        Mode::PerLayer,
        Average::OverWorkers,
        &ps,
        "round trip",
    );
}

/// Philox through random-k with `r = n`: identical indices on every backend (SPEC §3).
fn random_k_uses_the_spec_keys<H: Harness>(h: &H) {
    for n in [10usize, 5000, 100_000] {
        let layout = Layout::single(n).unwrap();
        let x = gaussian::<f32>(n, 1, 1.0);
        let mut c = Config::randomk(0.05);
        c.seed = u64::MAX;
        c.worker = u32::MAX;
        let want = gradsift::cpu::rtopk(
            &x,
            n,
            Count::Ratio(0.05).resolve(n),
            c.worker,
            u64::MAX,
            c.seed,
        )
        .unwrap();
        let mut g = h.compressor(&layout, &c).unwrap();
        h.step_device(&mut g, &x, u64::MAX).unwrap();
        let p = g.payload().unwrap();
        assert_eq!(p.as_sparse().unwrap().indices, want, "n={n}");
    }
}

// ---- the contract's methods that neither old suite covered ------------------------------------

/// `reconfigure` keeps residual and momentum (device to device on GPUs), exactly as the
/// CPU's `reconfigure`, and later steps run the new configuration on that state.
fn reconfigure_keeps_residual_and_momentum<H: Harness>(h: &H) {
    let layout = Layout::new(&[3000, 0, 1234]).unwrap();
    let n = layout.n();
    let mut first = Config::rtopk(0.2, 0.05);
    first.momentum = 0.5;
    first.mode = Mode::PerLayer;
    let mut c = gradsift::cpu::Compressor::new(&layout, &first).unwrap();
    let mut g = h.device().compressor(&layout, &first).unwrap();
    let grads: Vec<Vec<f32>> = (0..6).map(|s| dyadic(n, 300 + s)).collect();
    let mut bad = grads[1].clone();
    bad[17] = f32::NAN;
    for (t, x) in [&grads[0], &bad, &grads[1]].into_iter().enumerate() {
        let want = c.step(x, t as u64).cloned();
        let got = g.step(x, t as u64).cloned();
        assert_eq!(want, got, "before reconfigure, step {t}");
    }
    let (mut e, mut u) = (Vec::new(), Vec::new());
    // Out of domain: an error, and nothing changes.
    assert!(matches!(
        g.reconfigure(&Config::rtopk(0.1, 0.2)),
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(g.config(), &first);
    g.residual(&mut e).unwrap();
    compare_f32(
        c.residual_slice(),
        &e,
        Tol::Bits,
        "after a failed reconfigure",
    );
    // Warm-up: a denser ratio, same momentum; then one without momentum; then sign.
    let mut warm = Config::topk(0.01);
    warm.momentum = 0.5;
    let mut plain = Config::rtopk(0.3, 0.1);
    plain.values = DType::BF16;
    let mut sign = Config::sign();
    sign.momentum = 0.5;
    for (i, next) in [warm, plain, sign].into_iter().enumerate() {
        c.reconfigure(&next).unwrap();
        g.reconfigure(&next).unwrap();
        assert_eq!(g.config(), &next);
        assert_eq!(g.groups(), c.groups(), "groups after reconfigure {i}");
        assert_eq!(g.layout(), &layout);
        g.residual(&mut e).unwrap();
        compare_f32(
            c.residual_slice(),
            &e,
            Tol::Bits,
            &format!("residual kept by reconfigure {i}"),
        );
        g.momentum(&mut u).unwrap();
        compare_f32(
            c.momentum_slice(),
            &u,
            Tol::Bits,
            &format!("momentum kept by reconfigure {i}"),
        );
        assert_eq!(
            g.rejected_steps().unwrap(),
            1,
            "rejections survive reconfigure"
        );
        let t = 10 + i as u64;
        let want = c.step(&grads[2 + i], t).unwrap().clone();
        let got = g.step(&grads[2 + i], t).unwrap().clone();
        compare_payload(
            &want,
            &got,
            Tol::of(&next),
            &format!("step after reconfigure {i}"),
            i < 2,
        );
        g.residual(&mut e).unwrap();
        compare_f32(
            c.residual_slice(),
            &e,
            Tol::of(&next),
            &format!("residual after reconfigure {i}"),
        );
    }
}

/// `rejected_steps` counts every rejection since the plan was built, with several steps (on
/// device buffers, unread) between reads.
fn rejected_steps_counts_every_rejection_since_the_plan_was_built<H: Harness>(h: &H) {
    let n = 4000;
    let layout = Layout::single(n).unwrap();
    let cfg = Config::rtopk(0.1, 0.02);
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    assert_eq!(g.rejected_steps().unwrap(), 0, "a new plan");
    let good = |s: u64| data(n, s);
    let bad = |s: u64| {
        let mut x = data(n, s);
        x[(s as usize * 131) % n] = f32::INFINITY;
        x
    };
    // good, bad, bad, good, bad: three rejections, none read.
    let seq = [good(1), bad(2), bad(3), good(4), bad(5)];
    for (t, x) in seq.iter().enumerate() {
        let _ = c.step(x, t as u64);
        let _ = h.step_device(&mut g, x, t as u64);
    }
    assert_eq!(c.rejected_steps().unwrap(), 3);
    assert_eq!(g.rejected_steps().unwrap(), 3, "three unread rejections");
    assert_eq!(g.rejected_steps().unwrap(), 3, "reading does not reset it");
    // The last step was rejected: payload and check say so.
    assert_eq!(g.check(), c.check());
    assert!(matches!(g.check(), Err(Error::NonFinite { count: 1, .. })));
    // Two more good steps, one more bad, through the host entry point this time.
    for (t, x) in [good(6), bad(7), good(8)].iter().enumerate() {
        let t = 10 + t as u64;
        assert_eq!(c.step(x, t).cloned(), g.step(x, t).cloned(), "step {t}");
    }
    assert_eq!(g.rejected_steps().unwrap(), 4);
    assert_eq!(g.check(), Ok(()));
    let mut e = Vec::new();
    g.residual(&mut e).unwrap();
    compare_f32(
        c.residual_slice(),
        &e,
        Tol::Bits,
        "residual after rejections",
    );
    // reset() zeroes the state, not the count.
    g.reset().unwrap();
    assert_eq!(g.rejected_steps().unwrap(), 4);
}

/// `payload()` and `check()` before the first step and after a rejected one, on the
/// dispatched plan and the backend's own (device entry point).
fn payload_and_check_before_the_first_step_and_after_a_rejection<H: Harness>(h: &H) {
    let n = 3000;
    let layout = Layout::new(&[1000, 2000]).unwrap();
    for cfg in [Config::topk(0.01), Config::sign()] {
        let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
        let mut g = h.device().compressor(&layout, &cfg).unwrap();
        let mut own = h.compressor(&layout, &cfg).unwrap();
        // Before the first step: no payload (InvalidConfig), but check() is Ok.
        assert!(matches!(c.payload(), Err(Error::InvalidConfig(_))));
        assert!(matches!(g.payload(), Err(Error::InvalidConfig(_))));
        assert!(matches!(own.payload(), Err(Error::InvalidConfig(_))));
        let mut slot = Payload::default();
        assert!(matches!(
            own.read_payload(&mut slot),
            Err(Error::InvalidConfig(_))
        ));
        assert_eq!(g.check(), Ok(()));
        assert_eq!(own.check(), Ok(()));
        let x = data(n, 1);
        let want = c.step(&x, 0).unwrap().clone();
        let tol = Tol::of(&cfg);
        compare_payload(&want, g.step(&x, 0).unwrap(), tol, "first step", true);
        h.step_device(&mut own, &x, 0).unwrap();
        assert_eq!(own.check(), Ok(()));
        compare_payload(
            &want,
            own.payload().unwrap(),
            tol,
            "first step (device)",
            true,
        );
        // payload() repeats the last step's.
        compare_payload(&want, g.payload().unwrap(), tol, "payload() again", true);
        // A rejected step: payload() and check() give the step's error, every time.
        let mut bad = data(n, 2);
        bad[1500] = f32::NAN;
        bad[2999] = f32::NEG_INFINITY;
        let err = c.step(&bad, 1).unwrap_err();
        assert_eq!(
            err,
            Error::NonFinite {
                count: 2,
                first_index: 1500
            }
        );
        assert_eq!(g.step(&bad, 1).map(|_| ()), Err(err.clone()));
        let _ = h.step_device(&mut own, &bad, 1);
        for _ in 0..2 {
            assert_eq!(g.check(), Err(err.clone()));
            assert_eq!(g.payload().map(|_| ()), Err(err.clone()));
            assert_eq!(own.check(), Err(err.clone()));
            assert_eq!(own.payload().map(|_| ()), Err(err.clone()));
            assert_eq!(own.read_payload(&mut slot), Err(err.clone()));
        }
        // The next good step clears it.
        let x = data(n, 3);
        let want = c.step(&x, 2).unwrap().clone();
        compare_payload(&want, g.step(&x, 2).unwrap(), tol, "after", false);
        h.step_device(&mut own, &x, 2).unwrap();
        assert_eq!(own.check(), Ok(()));
        compare_payload(&want, own.payload().unwrap(), tol, "after (device)", false);
    }
}

/// `read_payload` into one reused `Payload`: sparse into a slot that held a sign payload
/// and back, larger and smaller payloads, no stale elements left behind.
fn read_payload_reuses_the_slot<H: Harness>(h: &H) {
    let layout = Layout::single(5000).unwrap();
    let mut slot = Payload::default();
    let plans = [
        Config::topk(0.1),
        Config::sign(),
        Config::topk(0.001),
        Config::rtopk(0.2, 0.05),
        Config::sign(),
    ];
    for (i, cfg) in plans.iter().enumerate() {
        let mut c = gradsift::cpu::Compressor::new(&layout, cfg).unwrap();
        let mut g = h.device().compressor(&layout, cfg).unwrap();
        let mut own = h.compressor(&layout, cfg).unwrap();
        for t in 0..2u64 {
            let x = data(5000, i as u64 * 10 + t);
            let want = c.step(&x, t).unwrap().clone();
            g.step(&x, t).unwrap();
            g.read_payload(&mut slot).unwrap();
            compare_payload(
                &want,
                &slot,
                Tol::of(cfg),
                &format!("plan {i} step {t}"),
                t == 0,
            );
            h.step_device(&mut own, &x, t).unwrap();
            own.read_payload(&mut slot).unwrap();
            compare_payload(
                &want,
                &slot,
                Tol::of(cfg),
                &format!("plan {i} step {t} (device)"),
                t == 0,
            );
        }
    }
}

/// `aggregate_device` into the backend's own buffer equals `aggregate` into a host slice,
/// and a wrong count of payloads leaves the device buffer as it was.
fn aggregate_device_matches_aggregate<H: Harness>(h: &H) {
    let layout = Layout::new(&[700, 0, 6000]).unwrap();
    let n = layout.n();
    for cfg in [Config::rtopk(0.1, 0.02), Config::sign()] {
        let ps = payloads_for(&layout, &cfg, 4, 3);
        for rule in [Average::OverWorkers, Average::OverSenders] {
            let mut agg = h.aggregator(&layout, Mode::Global, rule, 4).unwrap();
            let mut host = vec![0.0f32; n];
            agg.aggregate(&ps, &mut host).unwrap();
            let mut dev = vec![-1.0f32; n];
            h.aggregate_device(&mut agg, &ps, &mut dev).unwrap();
            compare_f32(&host, &dev, Tol::Bits, "aggregate_device vs aggregate");
            assert_eq!(agg.rule(), rule);
            let mut untouched = vec![3.0f32; n];
            assert!(matches!(
                h.aggregate_device(&mut agg, &ps[..3], &mut untouched),
                Err(Error::LengthMismatch { .. })
            ));
            assert!(untouched.iter().all(|&v| v == 3.0));
            let mut short = vec![0.0f32; n - 1];
            assert!(agg.aggregate(&ps, &mut short).is_err());
        }
    }
}

/// A gradient buffer of another device: `Error::Device`, and the plan still works. Only
/// wgpu can make one here (a second adapter context); CUDA needs a second GPU; host slices
/// belong to no device.
fn buffer_of_another_device_is_rejected<H: Harness>(h: &H) {
    let layout = Layout::single(1000).unwrap();
    let cfg = Config::topk(0.01);
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let x = data(1000, 4);
    let Some(r) = h.step_foreign(&mut g, &x) else {
        println!("NOTE: {}: no buffer of another device to try", h.backend());
        return;
    };
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    let want = c.step(&x, 1).unwrap().clone();
    h.step_device(&mut g, &x, 1).unwrap();
    assert_eq!(g.payload().unwrap(), &want);
}

// ---- not per backend ----------------------------------------------------------------------

/// `Backend::Auto` takes the first backend of `Backend::PREFERENCE` that opens and lists
/// every one before it with its reason; it computes what the CPU computes.
#[test]
fn auto_reports_skipped_backends() {
    let d = Device::open(Backend::Auto).unwrap();
    let pos = Backend::PREFERENCE
        .iter()
        .position(|b| *b == d.backend())
        .expect("auto opens a concrete backend");
    let skipped: Vec<Backend> = d.skipped().iter().map(|s| s.backend).collect();
    assert_eq!(skipped, Backend::PREFERENCE[..pos], "{d:?}");
    for s in d.skipped() {
        println!("auto skipped {}: {}", s.backend, s.reason);
        assert!(!s.reason.is_empty());
        let e = Device::open(s.backend).unwrap_err();
        assert!(matches!(e, Error::BackendUnavailable { .. }), "{e:?}");
        if s.backend == Backend::Cuda && !cfg!(feature = "cuda") {
            assert!(s.reason.contains("--features cuda"), "{}", s.reason);
        }
        if s.backend == Backend::Wgpu && !cfg!(feature = "wgpu") {
            assert!(s.reason.contains("--features wgpu"), "{}", s.reason);
        }
    }
    println!("auto opened {}", d.description());
    if required("GRADSIFT_REQUIRE_CUDA") {
        assert_eq!(d.backend(), Backend::Cuda);
    } else if required("GRADSIFT_REQUIRE_WGPU") && skipped.contains(&Backend::Cuda) {
        assert_eq!(d.backend(), Backend::Wgpu);
    }
    // The same training step on Auto and on the CPU: the same bits (SPEC §11).
    let layout = Layout::new(&[1000, 24]).unwrap();
    let mut update = Vec::new();
    for device in [Device::cpu(), d] {
        let mut plan = device
            .compressor(&layout, &Config::rtopk(0.05, 0.01))
            .unwrap();
        let mut server = device
            .aggregator(&layout, Mode::Global, Average::OverWorkers, 1)
            .unwrap();
        let mut out = vec![0f32; layout.n()];
        let p = plan.step(&data(layout.n(), 1), 0).unwrap().clone();
        server.aggregate(&[p], &mut out).unwrap();
        update.push(out);
    }
    assert_eq!(update[0], update[1]);
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

/// `Compress::revert` (SPEC §5): after an accepted step the residual and momentum return,
/// bit for bit, to the plan's state from before it, for every method (sparse with
/// momentum, plain top-k, sign with momentum) and whether the step came from the host or the
/// device buffer; a second revert, a revert after a rejected step and one after `reset`
/// change nothing; the plan then steps on exactly as a twin plan that never took the undone
/// steps.
fn revert_restores_the_state_before_the_last_step<H: Harness>(h: &H) {
    let layout = Layout::new(&[700, 0, 333]).unwrap();
    let n = layout.n();
    let mut rtopk = Config::rtopk(0.2, 0.05);
    rtopk.momentum = 0.5;
    rtopk.mode = Mode::PerLayer;
    let mut sign = Config::sign();
    sign.momentum = 0.25;
    let state = |g: &mut H::Comp| {
        let (mut e, mut u) = (Vec::new(), Vec::new());
        g.residual(&mut e).unwrap();
        g.momentum(&mut u).unwrap();
        (common::bits(&e), common::bits(&u))
    };
    for (ci, cfg) in [rtopk, Config::topk(0.01), sign].into_iter().enumerate() {
        let mut g = h.compressor(&layout, &cfg).unwrap();
        let mut twin = h.compressor(&layout, &cfg).unwrap();
        let grads: Vec<Vec<f32>> = (0..4)
            .map(|s| dyadic(n, 900 + 10 * ci as u64 + s))
            .collect();
        g.step(&grads[0], 0).unwrap();
        twin.step(&grads[0], 0).unwrap();
        let before = state(&mut g);
        assert!(
            before.0.iter().any(|&b| b != 0),
            "config {ci}: a residual to keep"
        );
        g.step(&grads[1], 1).unwrap();
        assert_ne!(
            state(&mut g),
            before,
            "config {ci}: the step changed the state"
        );
        g.revert().unwrap();
        assert_eq!(state(&mut g), before, "config {ci}: state after revert");
        assert!(
            g.payload().is_err(),
            "config {ci}: an undone step has no payload"
        );
        h.step_device(&mut g, &grads[1], 1).unwrap();
        g.revert().unwrap();
        g.revert().unwrap(); // nothing more to undo
        assert_eq!(
            state(&mut g),
            before,
            "config {ci}: after a device step and two reverts"
        );
        let mut bad = grads[2].clone();
        bad[5] = f32::INFINITY;
        let _ = g.step(&bad, 1);
        assert!(
            g.check().is_err(),
            "config {ci}: the infinite gradient is rejected"
        );
        g.revert().unwrap(); // must not undo step 0
        assert_eq!(
            state(&mut g),
            before,
            "config {ci}: revert after a rejection"
        );
        for t in 1..4u64 {
            let want = twin.step(&grads[t as usize], t).cloned().unwrap();
            let got = g.step(&grads[t as usize], t).cloned().unwrap();
            assert_eq!(want, got, "config {ci}: step {t} after the reverts");
        }
        assert_eq!(
            state(&mut g),
            state(&mut twin),
            "config {ci}: state at the end"
        );
        g.reset().unwrap();
        g.revert().unwrap();
        let (e, _) = state(&mut g);
        assert!(
            e.iter().all(|&b| b == 0),
            "config {ci}: revert after reset brought a state back"
        );
    }
}

/// `Compress::refund` (SPEC §12): after a step (host or device buffer) the entries given back
/// are added to the residual with the CPU reference's bits, for top-k, rTop-k per layer with
/// momentum and f16 values, and random-k; refunds accumulate until the next step, which then
/// matches a CPU twin that got the same refunds. Bad refunds (another n, unsorted, more
/// entries than a payload, lengths that disagree) are `BadPayload`; before a step, after a
/// revert and on a sign plan `InvalidConfig`; after a rejected step its `NonFinite`; none of
/// them changes the state. A revert undoes the step and its refunds together.
fn refund_returns_entries_to_the_residual_bit_for_bit<H: Harness>(h: &H) {
    let layout = Layout::new(&[700, 0, 333, 5]).unwrap();
    let n = layout.n();
    let mut rtopk = Config::rtopk(0.2, 0.05);
    rtopk.momentum = 0.5;
    rtopk.mode = Mode::PerLayer;
    rtopk.values = DType::F16;
    let configs = [Config::topk(0.02), rtopk, Config::randomk(0.05)];
    for (ci, cfg) in configs.into_iter().enumerate() {
        let mut g = h.compressor(&layout, &cfg).unwrap();
        let mut cpu = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
        let some = SparsePayload {
            n: n as u32,
            values_dtype: DType::F32,
            indices: vec![3],
            values: vec![1.0],
        };
        assert!(
            matches!(g.refund(&some), Err(Error::InvalidConfig(_))),
            "config {ci}: refund before the first step"
        );
        for t in 0..4u64 {
            let grad = dyadic(n, 1300 + 10 * ci as u64 + t);
            let want = cpu.step(&grad, t).cloned().unwrap();
            if t % 2 == 0 {
                g.step(&grad, t).unwrap();
            } else {
                h.step_device(&mut g, &grad, t).unwrap();
            }
            let sent = want.as_sparse().expect("a sparse payload").clone();
            assert!(sent.indices.len() > 4, "config {ci}: a payload to refund");
            // Every other entry, then the rest in a second call (refunds add up).
            let pick = |par: usize| SparsePayload {
                indices: sent.indices.iter().copied().skip(par).step_by(2).collect(),
                values: sent.values.iter().copied().skip(par).step_by(2).collect(),
                ..sent.clone()
            };
            let before = ef_bits(&mut g);
            let mut unsorted = pick(0);
            unsorted.indices.swap(0, 1);
            let mut too_many = sent.clone();
            too_many.indices.push(u32::MAX);
            too_many.values.push(0.0);
            let mut uneven = pick(0);
            uneven.values.pop();
            let other_n = SparsePayload {
                n: n as u32 + 1,
                ..pick(0)
            };
            for (what, bad) in [
                ("unsorted", &unsorted),
                ("too many", &too_many),
                ("uneven", &uneven),
                ("another n", &other_n),
            ] {
                assert!(
                    matches!(g.refund(bad), Err(Error::BadPayload { .. })),
                    "config {ci} step {t}: {what}"
                );
                assert!(
                    matches!(cpu.refund(bad), Err(Error::BadPayload { .. })),
                    "config {ci} step {t}: {what} on the CPU"
                );
            }
            assert_eq!(ef_bits(&mut g), before, "config {ci} step {t}: bad refunds");
            for par in [0, 1] {
                let back = pick(par);
                g.refund(&back).unwrap();
                cpu.refund(&back).unwrap();
                assert_eq!(
                    ef_bits(&mut g),
                    ef_bits(&mut cpu),
                    "config {ci} step {t}: after refund {par}"
                );
            }
            let empty = SparsePayload {
                indices: vec![],
                values: vec![],
                ..sent.clone()
            };
            g.refund(&empty).unwrap();
            assert_eq!(
                ef_bits(&mut g),
                ef_bits(&mut cpu),
                "config {ci}: empty refund"
            );
        }
        // A revert undoes the step together with its refunds.
        let before = ef_bits(&mut g);
        let grad = dyadic(n, 1399 + ci as u64);
        let sent = g.step(&grad, 4).unwrap().as_sparse().unwrap().clone();
        g.refund(&sent).unwrap();
        g.revert().unwrap();
        assert_eq!(
            ef_bits(&mut g),
            before,
            "config {ci}: revert after a refund"
        );
        assert!(
            matches!(g.refund(&sent), Err(Error::InvalidConfig(_))),
            "config {ci}: refund after a revert"
        );
        let mut bad = grad.clone();
        bad[7] = f32::NAN;
        let _ = g.step(&bad, 4);
        assert!(
            matches!(g.refund(&sent), Err(Error::NonFinite { .. })),
            "config {ci}: refund after a rejected step"
        );
        assert_eq!(ef_bits(&mut g), before, "config {ci}: after the rejection");
    }
    let mut sign = h.compressor(&layout, &Config::sign()).unwrap();
    sign.step(&dyadic(n, 1390), 0).unwrap();
    let back = SparsePayload {
        n: n as u32,
        values_dtype: DType::F32,
        indices: vec![1],
        values: vec![1.0],
    };
    assert!(
        matches!(sign.refund(&back), Err(Error::InvalidConfig(_))),
        "a sign plan has nothing to refund"
    );
}

/// Residual and momentum bits of a plan.
fn ef_bits<C: Compress>(c: &mut C) -> (Vec<u32>, Vec<u32>) {
    let (mut e, mut u) = (Vec::new(), Vec::new());
    c.residual(&mut e).unwrap();
    c.momentum(&mut u).unwrap();
    (common::bits(&e), common::bits(&u))
}
