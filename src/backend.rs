//! The backend contract: one set of names, argument orders, return types and errors that
//! the CPU reference, CUDA and wgpu all implement (docs/SPEC.md says what they compute).
//!
//! Three traits, one per role:
//! - [`Compress`]: a worker's error-feedback compressor (residual, momentum, payload);
//! - [`Aggregate`]: the server's decoder that averages K payloads into a dense update;
//! - [`Statistics`]: per-layer statistics and the K-worker variance estimator.
//!
//! Each has host-slice entry points (`step`, `aggregate`, `layer_stats`,
//! `estimate_variance`), which every backend accepts, and `*_device` entry points on the
//! backend's own buffer type (`[T]` on the CPU, `cudarc::driver::CudaSlice<T>` on CUDA,
//! `wgpu::Buffer` on wgpu) for data that already lives on the device.
//!
//! Code that picks the backend at run time uses [`Backend`] and [`Device`]: the enums
//! [`Compressor`], [`Aggregator`] and [`Stats`] dispatch to whichever backend the device
//! is, and implement the same traits, so a training loop written against them switches
//! backend by changing one value:
//!
//! ```
//! use gradsift::{Aggregate, Average, Backend, Compress, Config, Device, Layout, Mode};
//!
//! fn train(backend: Backend) -> gradsift::Result<Vec<f32>> {
//!     let device = Device::open(backend)?;
//!     let layout = Layout::new(&[1000, 24])?;
//!     let workers = 3;
//!     let mut plans = (0..workers)
//!         .map(|w| device.compressor(&layout, &Config::rtopk(0.05, 0.01).with_worker(w)))
//!         .collect::<gradsift::Result<Vec<_>>>()?;
//!     let mut server = device.aggregator(&layout, Mode::Global, Average::OverWorkers, workers as usize)?;
//!     let mut payloads = vec![gradsift::Payload::default(); workers as usize];
//!     let mut update = vec![0f32; layout.n()];
//!     for step in 0..3u64 {
//!         for (w, plan) in plans.iter_mut().enumerate() {
//!             let grad: Vec<f32> = (0..layout.n()).map(|i| ((i * 7 + w) % 13) as f32 - 6.0).collect();
//!             plan.step(&grad, step)?;
//!             plan.read_payload(&mut payloads[w])?;
//!         }
//!         server.aggregate(&payloads, &mut update)?;
//!     }
//!     Ok(update)
//! }
//! let on_cpu = train(Backend::Cpu)?;
//! // `Backend::Auto` takes CUDA, then wgpu, then the CPU; the selected indices and the
//! // aggregated update are the same bits on every backend (docs/SPEC.md §11).
//! assert_eq!(train(Backend::Auto)?, on_cpu);
//! # Ok::<(), gradsift::Error>(())
//! ```

use crate::contract::{Average, LayerStats, VarianceEstimate};
use crate::cpu;
use crate::{Config, Element, Error, Group, Layout, Mode, Payload, Result, SparsePayload};
use std::fmt;
use std::str::FromStr;

/// A worker's error-feedback compressor (docs/SPEC.md §4-§6, §10).
///
/// A plan is built once per layout and configuration and owns the residual `e`, the
/// momentum `u` and every scratch buffer: after the first step, stepping allocates nothing.
/// A step that fails leaves residual and momentum exactly as they were.
///
/// GPU backends enqueue work and report a rejected step (non-finite accumulated values) when
/// host data is next asked for ([`Compress::payload`], [`Compress::read_payload`],
/// [`Compress::check`]); the CPU reports it from the step itself and again from those calls.
pub trait Compress {
    /// The backend's own buffer of `T` gradient elements: `[T]` on the CPU,
    /// `cudarc::driver::CudaSlice<T>` on CUDA, `wgpu::Buffer` on wgpu (f16 and bf16 packed
    /// two per 32-bit word).
    type Buffer<T: Element>: ?Sized;

    /// One training step on a host gradient (length `n`): accumulate, select, keep what was
    /// not sent, and return the payload (valid until the next call). `step` is the training
    /// step `t` that keys random-k (docs/SPEC.md §3). GPU backends upload `grad` into a
    /// plan-owned device buffer (allocated on the first call) and wait for the payload.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `grad.len() != n`; [`Error::NonFinite`] when the
    /// accumulated vector (or a value scaled by [`crate::Scale::Unbiased`]) is not finite,
    /// with the state left as it was; [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Backend, Compress, Config, Device, Layout};
    /// let layout = Layout::new(&[8])?;
    /// let mut plan = Device::open(Backend::Cpu)?.compressor(&layout, &Config::topk(0.25))?;
    /// let payload = plan.step(&[0.1f32, -3.0, 0.2, 0.0, 5.0, 0.0, 0.0, 0.3], 0)?;
    /// assert_eq!(payload.as_sparse().unwrap().indices, [1, 4]);
    /// assert!(plan.step(&[f32::NAN; 8], 1).is_err()); // rejected, residual untouched
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn step<T: Element>(&mut self, grad: &[T], step: u64) -> Result<&Payload>;

    /// One training step on the backend's own buffer. GPU backends only enqueue the work
    /// (no host synchronisation, no allocation); a rejection surfaces at the next
    /// [`Compress::payload`], [`Compress::read_payload`] or [`Compress::check`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for a buffer of the wrong length; [`Error::Device`] for a
    /// buffer from another device or a failed launch; on the CPU, as [`Compress::step`].
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[4])?, &Config::topk(0.5))?;
    /// plan.step_device(&[1.0f32, -4.0, 2.0, 0.5][..], 0)?;
    /// assert_eq!(plan.payload()?.as_sparse().unwrap().indices, [1, 2]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn step_device<T: Element>(&mut self, grad: &Self::Buffer<T>, step: u64) -> Result<()>;

    /// The last step's payload, read to the host (GPU backends wait for the step).
    ///
    /// # Errors
    /// [`Error::NonFinite`] when the last step was rejected; [`Error::InvalidConfig`] before
    /// the first step; [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[4])?, &Config::topk(0.25))?;
    /// assert!(plan.payload().is_err()); // no step yet
    /// plan.step(&[1.0f32, -4.0, 2.0, 0.5], 0)?;
    /// assert_eq!(plan.payload()?.as_sparse().unwrap().values, [-4.0]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn payload(&mut self) -> Result<&Payload>;

    /// The last step's payload copied into `out`, reusing its allocations (the form a
    /// loop over K workers uses to fill its `Vec<Payload>`).
    ///
    /// # Errors
    /// As [`Compress::payload`].
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, Payload, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[4])?, &Config::topk(0.25))?;
    /// let mut out = Payload::default();
    /// plan.step(&[1.0f32, -4.0, 2.0, 0.5], 0)?;
    /// plan.read_payload(&mut out)?;
    /// assert_eq!(out.as_sparse().unwrap().indices, [1]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn read_payload(&mut self, out: &mut Payload) -> Result<()> {
        out.clone_from(self.payload()?);
        Ok(())
    }

    /// Waits for the last step and says whether it was accepted.
    ///
    /// # Errors
    /// [`Error::NonFinite`] when the last step was rejected (the state is as it was before
    /// it); [`Error::Device`] when a GPU call fails. `Ok` before the first step.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[2])?, &Config::topk(0.5))?;
    /// let _ = plan.step(&[f32::INFINITY, 1.0], 0);
    /// assert!(matches!(plan.check(), Err(gradsift::Error::NonFinite { count: 1, first_index: 0 })));
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn check(&mut self) -> Result<()>;

    /// How many steps were rejected since the plan was built (waits for enqueued steps):
    /// a caller that steps several times between reads learns whether any was rejected.
    ///
    /// # Errors
    /// [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[2])?, &Config::topk(0.5))?;
    /// let _ = plan.step(&[f32::NAN, 1.0], 0);
    /// plan.step(&[1.0f32, 1.0], 1)?;
    /// assert_eq!(plan.rejected_steps()?, 1);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn rejected_steps(&mut self) -> Result<u64>;

    /// The residual `e` (f32, length `n`) copied into `out` (resized to `n`). After a
    /// rejected step it is the residual from before that step.
    ///
    /// # Errors
    /// [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[3])?, &Config::topk(0.3))?;
    /// plan.step(&[1.0f32, -4.0, 2.0], 0)?;
    /// let mut e = Vec::new();
    /// plan.residual(&mut e)?;
    /// assert_eq!(e, [1.0, 0.0, 2.0]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn residual(&mut self, out: &mut Vec<f32>) -> Result<()>;

    /// The momentum `u` copied into `out`; empty when the configuration has no momentum.
    ///
    /// # Errors
    /// [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut config = Config::topk(0.5);
    /// config.momentum = 0.5;
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[2])?, &config)?;
    /// plan.step(&[1.0f32, -4.0], 0)?;
    /// let mut u = Vec::new();
    /// plan.momentum(&mut u)?;
    /// assert_eq!(u, [1.0, 0.0]); // the sent coordinate's momentum is masked
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn momentum(&mut self, out: &mut Vec<f32>) -> Result<()>;

    /// Undoes the last step: residual and momentum return, bit for bit, to what they were
    /// before it, and its payload is no longer readable. A distributed caller uses it when
    /// another worker's step of the same round was rejected, so that every worker keeps its
    /// state without a second collective before the payloads move (docs/SPEC.md §10). It
    /// costs nothing on the step: the step already writes into the second half of a
    /// ping-pong pair, and undoing it points back at the first (GPU backends wait for the
    /// stream and rewrite one status word).
    ///
    /// A no-op (`Ok`) when the last step was rejected (its state is already the one from
    /// before it), and after [`Compress::reset`], [`Compress::reconfigure`] or an earlier
    /// `revert`: only the one step just taken can be undone.
    ///
    /// # Errors
    /// [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[3])?, &Config::topk(0.34))?;
    /// plan.step(&[1.0f32, -4.0, 2.0], 0)?; // sends -4 and 2, keeps 1
    /// plan.step(&[0.5f32, 0.5, 0.5], 1)?;
    /// plan.revert()?; // as if step 1 had never been taken
    /// let mut e = Vec::new();
    /// plan.residual(&mut e)?;
    /// assert_eq!(e, [1.0, 0.0, 0.0]);
    /// assert!(plan.payload().is_err());
    /// plan.revert()?; // nothing more to undo: the state stays
    /// plan.residual(&mut e)?;
    /// assert_eq!(e, [1.0, 0.0, 0.0]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn revert(&mut self) -> Result<()>;

    /// Returns sent entries to the residual: `e[i] += v` for every `(i, v)` of `back`, the
    /// entries of this plan's last payload that a distributed reduction did not use (the
    /// sparse all-reduce's global selection, docs/SPEC.md §12), so that error feedback
    /// loses nothing. The momentum stays as the step masked it. One f32 addition per entry,
    /// so every backend leaves the same bits. `back` must be sparse over this plan's `n`,
    /// with strictly ascending indices and at most as many entries as one payload sends;
    /// nothing changes on an error. A later [`Compress::revert`] undoes the step and the
    /// refunds together. The GPU backends upload `back` (no allocation) and add on the
    /// device, after waiting for the step to know it was accepted.
    ///
    /// # Errors
    /// [`Error::BadPayload`] when `back` is over another `n`, has unsorted or out-of-range
    /// indices, more entries than a payload of the plan, or lengths that disagree;
    /// [`Error::InvalidConfig`] on a scaled-sign plan, before the first step or after a
    /// revert (there is no payload to refund); the step's [`Error::NonFinite`] when it was
    /// rejected; [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, DType, Layout, SparsePayload, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[3])?, &Config::topk(0.34))?;
    /// plan.step(&[1.0f32, -4.0, 2.0], 0)?; // sends -4 and 2, keeps 1
    /// let back = SparsePayload { n: 3, values_dtype: DType::F32, indices: vec![2], values: vec![2.0] };
    /// plan.refund(&back)?; // the reduction used only -4
    /// let mut e = Vec::new();
    /// plan.residual(&mut e)?;
    /// assert_eq!(e, [1.0, 0.0, 2.0]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn refund(&mut self, back: &SparsePayload) -> Result<()>;

    /// Zeroes residual and momentum (after the model was reloaded, say).
    ///
    /// # Errors
    /// [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[2])?, &Config::topk(0.5))?;
    /// plan.step(&[1.0f32, -4.0], 0)?;
    /// plan.reset()?;
    /// let mut e = Vec::new();
    /// plan.residual(&mut e)?;
    /// assert_eq!(e, [0.0, 0.0]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn reset(&mut self) -> Result<()>;

    /// Switches to another configuration for the same layout, keeping the residual (and the
    /// momentum, when both configurations have one): DGC's sparsity warm-up changes the
    /// ratio every epoch without dropping what was not sent. May allocate; GPU backends copy
    /// the state device to device.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `config` is out of its domain for the layout (nothing
    /// changes then); [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[4])?, &Config::topk(0.5))?;
    /// plan.step(&[1.0f32, -4.0, 2.0, 0.5], 0)?;
    /// plan.reconfigure(&Config::topk(0.25))?;
    /// let mut e = Vec::new();
    /// plan.residual(&mut e)?;
    /// assert_eq!(e, [1.0, 0.0, 0.0, 0.5]);
    /// assert!(plan.reconfigure(&Config::topk(2.0)).is_err());
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn reconfigure(&mut self, config: &Config) -> Result<()>;

    /// The layout this plan was built for.
    ///
    /// # Errors
    /// None: plain access.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Device, Layout};
    /// let plan = Device::cpu().compressor(&Layout::new(&[3, 5])?, &Config::sign())?;
    /// assert_eq!(plan.layout().n(), 8);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn layout(&self) -> &Layout;

    /// The configuration this plan runs (after [`Compress::reconfigure`], the new one).
    ///
    /// # Errors
    /// None: plain access.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Device, Layout};
    /// let plan = Device::cpu().compressor(&Layout::new(&[8])?, &Config::topk(0.5).with_worker(3))?;
    /// assert_eq!(plan.config().worker, 3);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn config(&self) -> &Config;

    /// The selection groups (the whole buffer in global mode, one per layer in per-layer
    /// mode) with their resolved counts `r` and `k` (docs/SPEC.md §2).
    ///
    /// # Errors
    /// None: plain access.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Device, Layout, Mode};
    /// let mut config = Config::rtopk(0.5, 0.25);
    /// config.mode = Mode::PerLayer;
    /// let plan = Device::cpu().compressor(&Layout::new(&[4, 8])?, &config)?;
    /// let counts: Vec<_> = plan.groups().iter().map(|g| (g.r, g.k)).collect();
    /// assert_eq!(counts, [(2, 1), (4, 2)]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn groups(&self) -> &[Group];
}

/// The parameter server's decoder (docs/SPEC.md §7): averages one payload per worker into a
/// dense f32 update. Every payload is checked before anything is written.
pub trait Aggregate {
    /// The backend's own dense f32 buffer: `[f32]`, `CudaSlice<f32>` or `wgpu::Buffer`.
    type Output: ?Sized;

    /// Averages `payloads` (one per worker, in worker order) into the host buffer `out`
    /// (length `n`).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for the wrong number of payloads or a wrong `out` length;
    /// [`Error::BadPayload`] for a payload that does not fit (index out of range, duplicate,
    /// wrong `n`, non-finite value); `out` is untouched on every error.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Aggregate, Average, Layout, Mode, Payload, SparsePayload, cpu};
    /// let layout = Layout::new(&[4])?;
    /// let mut server = cpu::Aggregator::new(&layout, Mode::Global, Average::OverWorkers, 2)?;
    /// let p = |i: u32, v: f32| Payload::Sparse(SparsePayload { n: 4, indices: vec![i], values: vec![v], ..Default::default() });
    /// let mut out = [0f32; 4];
    /// server.aggregate(&[p(1, 2.0), p(1, 4.0)], &mut out)?;
    /// assert_eq!(out, [0.0, 3.0, 0.0, 0.0]);
    /// assert!(server.aggregate(&[p(9, 1.0), p(1, 1.0)], &mut out).is_err());
    /// assert_eq!(out, [0.0, 3.0, 0.0, 0.0]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn aggregate(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()>;

    /// As [`Aggregate::aggregate`], into the backend's own buffer. GPU backends wait once,
    /// to report a rejected payload as an error.
    ///
    /// # Errors
    /// As [`Aggregate::aggregate`]; [`Error::Device`] for a buffer of another device or a
    /// failed GPU call.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Aggregate, Average, Layout, Mode, Payload, SignPayload, cpu};
    /// let layout = Layout::new(&[2])?;
    /// let mut server = cpu::Aggregator::new(&layout, Mode::Global, Average::OverWorkers, 1)?;
    /// let sign = Payload::Sign(SignPayload { n: 2, scales: vec![0.5], negative: vec![0b10] });
    /// let mut out = vec![0f32; 2];
    /// server.aggregate_device(&[sign], &mut out[..])?;
    /// assert_eq!(out, [0.5, -0.5]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn aggregate_device(&mut self, payloads: &[Payload], out: &mut Self::Output) -> Result<()>;

    /// The averaging rule this plan applies.
    ///
    /// # Errors
    /// None: plain access.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Aggregate, Average, Device, Layout, Mode};
    /// let server = Device::cpu().aggregator(&Layout::new(&[4])?, Mode::Global, Average::OverSenders, 3)?;
    /// assert_eq!(server.rule(), Average::OverSenders);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn rule(&self) -> Average;
}

/// Per-layer statistics and the K-worker variance estimator (docs/SPEC.md §8).
pub trait Statistics {
    /// The backend's own buffer of `T` elements, as for [`Compress::Buffer`].
    type Buffer<T: Element>: ?Sized;

    /// Statistics of each layer of the host buffer `x` (length `n`), written to `out`
    /// (cleared first). Moments are over the finite elements.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `x.len() != n`; [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Layout, Statistics, cpu};
    /// let mut stats = cpu::Stats::new(&Layout::new(&[2, 2])?);
    /// let mut out = Vec::new();
    /// stats.layer_stats(&[1.0f32, 3.0, f32::NAN, -2.0], &mut out)?;
    /// assert_eq!((out[0].mean, out[0].var), (2.0, 1.0));
    /// assert_eq!((out[1].mean, out[1].non_finite), (-2.0, 1));
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn layer_stats<T: Element>(&mut self, x: &[T], out: &mut Vec<LayerStats>) -> Result<()>;

    /// [`Statistics::layer_stats`] on the backend's own buffer.
    ///
    /// # Errors
    /// As [`Statistics::layer_stats`]; [`Error::Device`] for a buffer of another device.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Layout, Statistics, cpu};
    /// let mut stats = cpu::Stats::new(&Layout::new(&[3])?);
    /// let mut out = Vec::new();
    /// stats.layer_stats_device(&[1.0f32, -1.0, 0.0][..], &mut out)?;
    /// assert_eq!(out[0].max_abs, 1.0);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn layer_stats_device<T: Element>(
        &mut self,
        x: &Self::Buffer<T>,
        out: &mut Vec<LayerStats>,
    ) -> Result<()>;

    /// Per-layer `sigma_X^2` and `sigma_N^2` from `K >= 2` workers' host buffers of one step,
    /// written to `out` (cleared first).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `K < 2` (or more workers than the plan was built for);
    /// [`Error::LengthMismatch`] for a buffer of the wrong length; [`Error::NonFinite`] for
    /// the first worker holding a NaN or infinity; [`Error::Device`] when a GPU call fails.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Layout, Statistics, cpu};
    /// let mut stats = cpu::Stats::new(&Layout::new(&[2])?);
    /// let mut out = Vec::new();
    /// stats.estimate_variance(&[&[1.0f32, 1.0][..], &[3.0, 3.0][..]], &mut out)?;
    /// assert_eq!(out[0].sigma_n2, 2.0); // ((1-2)^2 + (3-2)^2) * 2 coordinates / (n = 2 * (K - 1) = 1)
    /// assert!(stats.estimate_variance(&[&[1.0f32, 1.0][..]], &mut out).is_err());
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn estimate_variance<T: Element>(
        &mut self,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()>;

    /// [`Statistics::estimate_variance`] on the backend's own buffers, one per worker.
    ///
    /// # Errors
    /// As [`Statistics::estimate_variance`]; [`Error::Device`] for a buffer of another device.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Layout, Statistics, cpu};
    /// let mut stats = cpu::Stats::new(&Layout::new(&[2])?);
    /// let (a, b) = ([1.0f32, 1.0], [3.0f32, 3.0]);
    /// let mut out = Vec::new();
    /// stats.estimate_variance_device(&[&a[..], &b[..]], &mut out)?;
    /// assert_eq!(out[0].sigma_x2, 0.0);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn estimate_variance_device<T: Element>(
        &mut self,
        workers: &[&Self::Buffer<T>],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()>;
}

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Backend {
    /// The CPU reference (always available).
    #[default]
    Cpu,
    /// CUDA through cudarc (needs the `cuda` feature, an NVIDIA driver and NVRTC).
    Cuda,
    /// WGSL compute shaders through wgpu (needs the `wgpu` feature and a Vulkan, Metal or
    /// DX12 adapter; Mesa's lavapipe will do).
    Wgpu,
    /// CUDA, then wgpu, then the CPU: the first that opens. [`Device::skipped`] says why
    /// each earlier one was passed over.
    Auto,
}

impl Backend {
    /// Every concrete backend, in the order [`Backend::Auto`] tries them.
    pub const PREFERENCE: [Backend; 3] = [Backend::Cuda, Backend::Wgpu, Backend::Cpu];

    /// The lower-case name used on the command line (`cpu`, `cuda`, `wgpu`, `auto`), which
    /// [`str::parse`] reads back.
    ///
    /// # Errors
    /// None; parsing an unknown name is an [`Error::InvalidConfig`].
    ///
    /// # Examples
    /// ```
    /// use gradsift::Backend;
    /// assert_eq!(Backend::Wgpu.name(), "wgpu");
    /// assert_eq!("CUDA".parse::<Backend>()?, Backend::Cuda);
    /// assert!("tpu".parse::<Backend>().is_err());
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Wgpu => "wgpu",
            Backend::Auto => "auto",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda),
            "wgpu" => Ok(Backend::Wgpu),
            "auto" => Ok(Backend::Auto),
            other => Err(Error::InvalidConfig(format!(
                "unknown backend {other:?}: expected cpu, cuda, wgpu or auto"
            ))),
        }
    }
}

/// A backend [`Backend::Auto`] passed over, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The backend that did not open.
    pub backend: Backend,
    /// The error it gave, in words.
    pub reason: String,
}

#[derive(Clone)]
enum Opened {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Context),
    #[cfg(feature = "wgpu")]
    Wgpu(crate::wgpu::Context),
}

/// An opened backend: the CPU, a CUDA context (device and stream) or a wgpu device. Builds
/// the run-time-dispatched plans [`Compressor`], [`Aggregator`] and [`Stats`]. Cloning is
/// cheap and shares the device.
#[derive(Clone)]
pub struct Device {
    opened: Opened,
    skipped: Vec<Skipped>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("backend", &self.backend())
            .field("description", &self.description())
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl Device {
    /// Opens `backend`: the CPU always opens; CUDA opens device 0 on a new stream; wgpu opens
    /// the default adapter; [`Backend::Auto`] tries them in [`Backend::PREFERENCE`] order.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] when the backend cannot run here: not compiled in (the
    /// message names the cargo feature), no driver, no device or no adapter. `Auto` never
    /// fails, since the CPU always opens.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Backend, Device};
    /// let device = Device::open(Backend::Auto)?;
    /// for s in device.skipped() {
    ///     println!("skipped {}: {}", s.backend, s.reason);
    /// }
    /// println!("running on {}", device.description());
    /// assert_eq!(Device::open(Backend::Cpu)?.backend(), Backend::Cpu);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn open(backend: Backend) -> Result<Self> {
        match backend {
            Backend::Auto => {
                let mut skipped = Vec::new();
                for b in Backend::PREFERENCE {
                    match Self::open(b) {
                        Ok(mut d) => {
                            d.skipped = skipped;
                            return Ok(d);
                        }
                        Err(e) => skipped.push(Skipped {
                            backend: b,
                            reason: e.to_string(),
                        }),
                    }
                }
                unreachable!("the CPU backend always opens")
            }
            Backend::Cpu => Ok(Self::cpu()),
            Backend::Cuda => Self::open_cuda(),
            Backend::Wgpu => Self::open_wgpu(),
        }
    }

    #[cfg(feature = "cuda")]
    fn open_cuda() -> Result<Self> {
        Ok(Self::from(crate::cuda::Context::new(0)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn open_cuda() -> Result<Self> {
        Err(Error::BackendUnavailable {
            backend: "cuda",
            reason: "this build of gradsift has no CUDA backend; rebuild with `--features cuda`"
                .into(),
        })
    }

    #[cfg(feature = "wgpu")]
    fn open_wgpu() -> Result<Self> {
        Ok(Self::from(crate::wgpu::Context::new()?))
    }

    #[cfg(not(feature = "wgpu"))]
    fn open_wgpu() -> Result<Self> {
        Err(Error::BackendUnavailable {
            backend: "wgpu",
            reason: "this build of gradsift has no wgpu backend; rebuild with `--features wgpu`"
                .into(),
        })
    }

    /// The CPU backend (what [`Device::open`] gives for [`Backend::Cpu`]).
    ///
    /// # Errors
    /// None: the CPU always opens.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Backend, Device};
    /// assert_eq!(Device::cpu().backend(), Backend::Cpu);
    /// ```
    pub fn cpu() -> Self {
        Self {
            opened: Opened::Cpu,
            skipped: Vec::new(),
        }
    }

    /// Which backend this is (never [`Backend::Auto`]).
    ///
    /// # Errors
    /// None: plain access.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Backend, Device};
    /// assert_ne!(Device::open(Backend::Auto)?.backend(), Backend::Auto);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn backend(&self) -> Backend {
        match &self.opened {
            Opened::Cpu => Backend::Cpu,
            #[cfg(feature = "cuda")]
            Opened::Cuda(_) => Backend::Cuda,
            #[cfg(feature = "wgpu")]
            Opened::Wgpu(_) => Backend::Wgpu,
        }
    }

    /// The backend and device in words (`"cpu"`, `"cuda: ..."`, `"wgpu: llvmpipe ...
    /// (Vulkan, Cpu)"`).
    ///
    /// # Errors
    /// None: plain access.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(gradsift::Device::cpu().description(), "cpu");
    /// ```
    pub fn description(&self) -> String {
        match &self.opened {
            Opened::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Opened::Cuda(cx) => format!("cuda: {cx:?}"),
            #[cfg(feature = "wgpu")]
            Opened::Wgpu(cx) => format!("wgpu: {}", cx.description()),
        }
    }

    /// The backends that [`Backend::Auto`] passed over before this one, with the reasons
    /// (empty when a backend was named explicitly).
    ///
    /// # Errors
    /// None: plain access.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Backend, Device};
    /// let device = Device::open(Backend::Auto)?;
    /// // Auto ends on the CPU at the latest, having skipped every backend before it.
    /// let tried = Backend::PREFERENCE.iter().position(|b| *b == device.backend()).unwrap();
    /// assert_eq!(device.skipped().len(), tried);
    /// assert!(Device::cpu().skipped().is_empty());
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// A worker's compressor on this device.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `config` is out of its domain for `layout`;
    /// [`Error::Device`] when the device runs out of memory or a binding limit is exceeded.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Device, Layout};
    /// let mut plan = Device::cpu().compressor(&Layout::new(&[4])?, &Config::topk(0.5))?;
    /// assert_eq!(plan.step(&[0.0f32, 2.0, -3.0, 1.0], 0)?.as_sparse().unwrap().indices, [1, 2]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn compressor(&self, layout: &Layout, config: &Config) -> Result<Compressor> {
        Ok(match &self.opened {
            Opened::Cpu => Compressor::Cpu(cpu::Compressor::new(layout, config)?),
            #[cfg(feature = "cuda")]
            Opened::Cuda(cx) => Compressor::Cuda(crate::cuda::Compressor::new(cx, layout, config)?),
            #[cfg(feature = "wgpu")]
            Opened::Wgpu(cx) => Compressor::Wgpu(crate::wgpu::Compressor::new(cx, layout, config)?),
        })
    }

    /// The server's aggregator on this device, for `workers` payloads per call.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `workers == 0`; [`Error::Device`] when the device runs out
    /// of memory or a binding limit is exceeded.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Average, Device, Layout, Mode};
    /// let layout = Layout::new(&[4])?;
    /// assert!(Device::cpu().aggregator(&layout, Mode::Global, Average::OverSenders, 0).is_err());
    /// let _server = Device::cpu().aggregator(&layout, Mode::Global, Average::OverSenders, 2)?;
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn aggregator(
        &self,
        layout: &Layout,
        mode: Mode,
        rule: Average,
        workers: usize,
    ) -> Result<Aggregator> {
        Ok(match &self.opened {
            Opened::Cpu => Aggregator::Cpu(cpu::Aggregator::new(layout, mode, rule, workers)?),
            #[cfg(feature = "cuda")]
            Opened::Cuda(cx) => Aggregator::Cuda(crate::cuda::Aggregator::new(
                cx, layout, mode, rule, workers,
            )?),
            #[cfg(feature = "wgpu")]
            Opened::Wgpu(cx) => Aggregator::Wgpu(crate::wgpu::Aggregator::new(
                cx, layout, mode, rule, workers,
            )?),
        })
    }

    /// A statistics plan on this device, for variance estimates over up to `max_workers`
    /// buffers.
    ///
    /// # Errors
    /// [`Error::Device`] when the device runs out of memory or a binding limit is exceeded.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Device, Layout, Statistics};
    /// let mut stats = Device::cpu().stats(&Layout::new(&[2])?, 2)?;
    /// let mut out = Vec::new();
    /// stats.layer_stats(&[1.0f32, 3.0], &mut out)?;
    /// assert_eq!(out[0].mean, 2.0);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn stats(&self, layout: &Layout, max_workers: usize) -> Result<Stats> {
        let _ = max_workers;
        Ok(match &self.opened {
            Opened::Cpu => Stats::Cpu(cpu::Stats::new(layout)),
            #[cfg(feature = "cuda")]
            Opened::Cuda(cx) => Stats::Cuda(crate::cuda::Stats::new(cx, layout, max_workers)?),
            #[cfg(feature = "wgpu")]
            Opened::Wgpu(cx) => Stats::Wgpu(crate::wgpu::Stats::new(cx, layout)?),
        })
    }
}

#[cfg(feature = "cuda")]
impl From<crate::cuda::Context> for Device {
    fn from(cx: crate::cuda::Context) -> Self {
        Self {
            opened: Opened::Cuda(cx),
            skipped: Vec::new(),
        }
    }
}

#[cfg(feature = "wgpu")]
impl From<crate::wgpu::Context> for Device {
    fn from(cx: crate::wgpu::Context) -> Self {
        Self {
            opened: Opened::Wgpu(cx),
            skipped: Vec::new(),
        }
    }
}

/// Calls `$body` with `$x` bound to the backend plan inside `$e`, whichever it is.
macro_rules! dispatch {
    ($enum:ident, $e:expr, $x:ident => $body:expr) => {
        match $e {
            $enum::Cpu($x) => $body,
            #[cfg(feature = "cuda")]
            $enum::Cuda($x) => $body,
            #[cfg(feature = "wgpu")]
            $enum::Wgpu($x) => $body,
        }
    };
}

/// A worker's compressor on whichever backend its [`Device`] is. Its device-buffer entry
/// point takes host slices (the one buffer type every backend accepts); use the backend's
/// own type (`gradsift::cuda::Compressor`, ...) for device buffers.
#[derive(Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // one plan per worker, built once: size does not matter
pub enum Compressor {
    /// The CPU reference.
    Cpu(cpu::Compressor),
    /// CUDA.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Compressor),
    /// wgpu.
    #[cfg(feature = "wgpu")]
    Wgpu(crate::wgpu::Compressor),
}

impl Compress for Compressor {
    type Buffer<T: Element> = [T];

    fn step<T: Element>(&mut self, grad: &[T], step: u64) -> Result<&Payload> {
        dispatch!(Compressor, self, c => Compress::step(c, grad, step))
    }
    fn step_device<T: Element>(&mut self, grad: &[T], step: u64) -> Result<()> {
        self.step(grad, step).map(|_| ())
    }
    fn payload(&mut self) -> Result<&Payload> {
        dispatch!(Compressor, self, c => Compress::payload(c))
    }
    fn read_payload(&mut self, out: &mut Payload) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::read_payload(c, out))
    }
    fn check(&mut self) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::check(c))
    }
    fn rejected_steps(&mut self) -> Result<u64> {
        dispatch!(Compressor, self, c => Compress::rejected_steps(c))
    }
    fn residual(&mut self, out: &mut Vec<f32>) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::residual(c, out))
    }
    fn momentum(&mut self, out: &mut Vec<f32>) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::momentum(c, out))
    }
    fn revert(&mut self) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::revert(c))
    }
    fn refund(&mut self, back: &SparsePayload) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::refund(c, back))
    }
    fn reset(&mut self) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::reset(c))
    }
    fn reconfigure(&mut self, config: &Config) -> Result<()> {
        dispatch!(Compressor, self, c => Compress::reconfigure(c, config))
    }
    fn layout(&self) -> &Layout {
        dispatch!(Compressor, self, c => Compress::layout(c))
    }
    fn config(&self) -> &Config {
        dispatch!(Compressor, self, c => Compress::config(c))
    }
    fn groups(&self) -> &[Group] {
        dispatch!(Compressor, self, c => Compress::groups(c))
    }
}

/// The server's aggregator on whichever backend its [`Device`] is (output on the host).
#[derive(Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // one plan per worker, built once: size does not matter
pub enum Aggregator {
    /// The CPU reference.
    Cpu(cpu::Aggregator),
    /// CUDA.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Aggregator),
    /// wgpu.
    #[cfg(feature = "wgpu")]
    Wgpu(crate::wgpu::Aggregator),
}

impl Aggregate for Aggregator {
    type Output = [f32];
    fn aggregate(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()> {
        dispatch!(Aggregator, self, a => Aggregate::aggregate(a, payloads, out))
    }
    fn aggregate_device(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()> {
        self.aggregate(payloads, out)
    }
    fn rule(&self) -> Average {
        dispatch!(Aggregator, self, a => Aggregate::rule(a))
    }
}

/// Statistics on whichever backend its [`Device`] is (host input).
#[derive(Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // one plan per worker, built once: size does not matter
pub enum Stats {
    /// The CPU reference.
    Cpu(cpu::Stats),
    /// CUDA.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Stats),
    /// wgpu.
    #[cfg(feature = "wgpu")]
    Wgpu(crate::wgpu::Stats),
}

impl Statistics for Stats {
    type Buffer<T: Element> = [T];
    fn layer_stats<T: Element>(&mut self, x: &[T], out: &mut Vec<LayerStats>) -> Result<()> {
        dispatch!(Stats, self, s => Statistics::layer_stats(s, x, out))
    }
    fn layer_stats_device<T: Element>(&mut self, x: &[T], out: &mut Vec<LayerStats>) -> Result<()> {
        Statistics::layer_stats(self, x, out)
    }
    fn estimate_variance<T: Element>(
        &mut self,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        dispatch!(Stats, self, s => Statistics::estimate_variance(s, workers, out))
    }
    fn estimate_variance_device<T: Element>(
        &mut self,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        Statistics::estimate_variance(self, workers, out)
    }
}

/// The error of [`Compress::refund`] on a plan with no accepted step to refund into.
pub(crate) fn nothing_to_refund() -> Error {
    Error::InvalidConfig(
        "refund returns entries of the last accepted step's payload: there is none (no step yet, or it was reverted)".into(),
    )
}
