//! The per-backend adapter: [`Harness`] builds a backend's own plan types and feeds them
//! the backend's own buffers; one implementation per backend.

use super::*;

// ---- the per-backend adapter --------------------------------------------------------------

/// What a case needs from the backend under test beyond host slices: its own plan types and
/// its own buffers for the `*_device` entry points.
pub(crate) trait Harness {
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
pub(crate) struct CpuHarness {
    device: Device,
}
impl CpuHarness {
    pub(crate) fn open() -> Option<Self> {
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
pub(crate) mod wgpu_dev {
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
pub(crate) mod cuda_dev {
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
