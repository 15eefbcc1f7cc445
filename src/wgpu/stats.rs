//! Per-layer statistics and the K-worker variance estimator on the GPU (SPEC §8); shaders in
//! `shaders/stats.wgsl`. Reductions run in f32 (tile trees, then one workgroup per layer);
//! the second pass is centred on the first pass's mean and its residual sum corrects mean and
//! variance on the host, which keeps results within SPEC §8's tolerances of the f64 CPU.

use super::compress::{dtype_code, grad_bytes};
use super::context::{Context, dev_err, grid, prefix, words};
use super::passes::StatsPass as S;
use crate::{DType, Element, Error, LayerStats, Layout, Result, Statistics, VarianceEstimate};

const TILE: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StatsCfg {
    n: u32,
    num_layers: u32,
    num_tiles: u32,
    dtype: u32,
    workers: u32,
    tiles_off: u32,
    pad0: u32,
    pad1: u32,
}

/// A statistics plan for one layout: tile table, partial-sum and result buffers, built once
/// and reused by every [`Statistics`] call.
pub struct Stats {
    ctx: Context,
    layout: Layout,
    cfg: StatsCfg,
    cfg_buf: ::wgpu::Buffer,
    unused: ::wgpu::Buffer,
    plan: ::wgpu::Buffer,
    part: ::wgpu::Buffer,
    res: ::wgpu::Buffer,
    bad: ::wgpu::Buffer,
    staging: ::wgpu::Buffer,
    upload: Option<::wgpu::Buffer>,
    /// Host-side stack of the workers' bytes for the host variance entry point.
    host_stack: Vec<u8>,
    /// Per worker: non-finite count and first index of the last variance estimate.
    bad_acc: Vec<(u64, u32)>,
    /// When the stacked workers exceed one storage binding: plans over runs of whole layers
    /// that fit, for the (workers, dtype) they were built for (host entry point only).
    chunks: Option<Chunks>,
}

/// Plans over consecutive runs of layers, each `(first element, plan)`, with the per-call
/// scratch of [`Stats::estimate_variance_chunked`].
struct Chunks {
    workers: usize,
    dtype: DType,
    plans: Vec<(usize, Stats)>,
    part: Vec<VarianceEstimate>,
    bad: Vec<(u64, u32)>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("wgpu::Stats")
            .field("n", &self.layout.n())
            .finish()
    }
}

/// The error for the first worker holding a non-finite value (SPEC §8), from per-worker
/// `(count, first index)`.
fn first_non_finite(bad: &[(u64, u32)]) -> Result<()> {
    match bad.iter().find(|b| b.0 > 0) {
        Some(&(count, first_index)) => Err(Error::NonFinite { count, first_index }),
        None => Ok(()),
    }
}

/// Workers the variance estimator accepts per call (bounds the per-worker status words).
const MAX_WORKERS: usize = 4096;

impl Stats {
    /// Builds the plan. Errors when a buffer exceeds the device's binding limit.
    pub fn new(ctx: &Context, layout: &Layout) -> Result<Self> {
        let inner = &ctx.inner;
        let nl = layout.num_layers();
        let mut plan = Vec::with_capacity(nl * 4);
        let mut tiles = Vec::new();
        for l in 0..nl {
            let r = layout.layer(l);
            let t0 = tiles.len() / 4;
            let mut s = r.start;
            while s < r.end {
                let e = (s + TILE).min(r.end);
                tiles.extend_from_slice(&[l as u32, s as u32, e as u32, 0]);
                s = e;
            }
            plan.extend_from_slice(&[
                r.start as u32,
                r.end as u32,
                t0 as u32,
                (tiles.len() / 4) as u32,
            ]);
        }
        let num_tiles = tiles.len() / 4;
        let tiles_off = plan.len() as u32;
        plan.extend_from_slice(&tiles);
        let cfg = StatsCfg {
            n: layout.n() as u32,
            num_layers: nl as u32,
            num_tiles: num_tiles as u32,
            dtype: 0,
            workers: 1,
            tiles_off,
            pad0: 0,
            pad1: 0,
        };
        let none = ::wgpu::BufferUsages::empty();
        let uniform = ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST;
        Ok(Self {
            ctx: ctx.clone(),
            layout: layout.clone(),
            cfg,
            cfg_buf: inner.buffer("stats config", 32, uniform)?,
            unused: inner.buffer("unused", 16, uniform)?,
            plan: inner.storage_init("stats plan", &plan)?,
            part: inner.storage_buffer("tile partials", num_tiles as u64 * 32, none)?,
            res: inner.storage_buffer("layer results", nl as u64 * 32, none)?,
            bad: inner.storage_buffer("non-finite counts", MAX_WORKERS as u64 * 8, none)?,
            staging: inner.staging((nl as u64 * 32).max(MAX_WORKERS as u64 * 8))?,
            upload: None,
            host_stack: Vec::new(),
            bad_acc: Vec::new(),
            chunks: None,
        })
    }

    fn run(&mut self, x: &::wgpu::Buffer, bytes: u64, entries: &[(S, bool)]) -> Result<()> {
        let inner = self.ctx.inner.clone();
        if x.size() < bytes {
            return Err(Error::LengthMismatch {
                what: "statistics input (bytes)",
                expected: bytes as usize,
                got: x.size() as usize,
            });
        }
        let bind = bytes.max(4);
        if bind > inner.limits.max_storage_buffer_binding_size {
            return Err(dev_err(format!(
                "the input needs {bind} bytes, above this device's limit of {} bytes per storage binding",
                inner.limits.max_storage_buffer_binding_size
            )));
        }
        inner
            .queue
            .write_buffer(&self.cfg_buf, 0, bytemuck::bytes_of(&self.cfg));
        let scope = inner
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let res = [
            self.unused.as_entire_binding(),
            self.cfg_buf.as_entire_binding(),
            self.plan.as_entire_binding(),
            prefix(x, 0, bind),
            self.part.as_entire_binding(),
            self.res.as_entire_binding(),
            self.bad.as_entire_binding(),
        ];
        let bg = inner.bind_group("stats", &inner.stats.layouts[0], res);
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(dev_err(format!("binding the statistics input: {err}")));
        }
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor { label: None });
        enc.clear_buffer(&self.part, 0, None);
        enc.clear_buffer(&self.res, 0, None);
        // Per worker: count 0, first index u32::MAX.
        let init: &[u32] = &[0, u32::MAX];
        for k in 0..self.cfg.workers as u64 {
            inner
                .queue
                .write_buffer(&self.bad, k * 8, bytemuck::cast_slice(init));
        }
        {
            let mut cp = enc.begin_compute_pass(&::wgpu::ComputePassDescriptor {
                label: Some("stats"),
                timestamp_writes: None,
            });
            cp.set_bind_group(0, &bg, &[]);
            for &(entry, per_tile) in entries {
                let g = grid(if per_tile {
                    u64::from(self.cfg.num_tiles)
                } else {
                    u64::from(self.cfg.num_layers)
                });
                if g.0 > 0 {
                    cp.set_pipeline(inner.stats.pipeline(entry));
                    cp.dispatch_workgroups(g.0, g.1, 1);
                }
            }
        }
        inner.submit(enc)
    }

    /// Statistics of each layer of the `n` elements of `dtype` in `x`, written to `out`
    /// (cleared first). Same conventions as [`crate::cpu::layer_stats`].
    pub fn layer_stats_buffer(
        &mut self,
        x: &::wgpu::Buffer,
        dtype: DType,
        out: &mut Vec<LayerStats>,
    ) -> Result<()> {
        self.cfg.dtype = dtype_code(dtype);
        self.cfg.workers = 1;
        self.run(
            x,
            grad_bytes(self.layout.n(), dtype),
            &[
                (S::StatsPartial, true),
                (S::StatsReduce, false),
                (S::M2Partial, true),
                (S::M2Reduce, false),
            ],
        )?;
        let nl = self.layout.num_layers();
        let inner = self.ctx.inner.clone();
        inner.read_back(&self.staging, &[(&self.res, 0, nl as u64 * 32)], |b| {
            let w: Vec<u32> = words(&b[..nl * 32]).collect();
            out.clear();
            for l in 0..nl {
                let r = &w[l * 8..l * 8 + 8];
                let f = |j: usize| f64::from(f32::from_bits(r[j]));
                let fin = r[0] as u64;
                let count = self.layout.layer(l).len() as u64;
                // Moments over the finite elements; none: NaN (SPEC §8).
                let mut st = LayerStats {
                    count,
                    mean: f64::NAN,
                    var: f64::NAN,
                    min: f32::INFINITY,
                    max: f32::NEG_INFINITY,
                    max_abs: 0.0,
                    non_finite: r[1] as u64,
                };
                if fin > 0 {
                    let c = fin as f64;
                    let m0 = f64::from(f32::from_bits(r[2]) / fin as f32);
                    let (d1, d2) = (f(6), f(7));
                    st.mean = m0 + d1 / c;
                    st.var = ((d2 - d1 * d1 / c) / c).max(0.0);
                    st.min = f32::from_bits(r[3]);
                    st.max = f32::from_bits(r[4]);
                    st.max_abs = f32::from_bits(r[5]);
                }
                out.push(st);
            }
        })
    }

    fn upload_buffer(&mut self, bytes: u64) -> Result<::wgpu::Buffer> {
        match &self.upload {
            Some(b) if b.size() >= bytes => Ok(b.clone()),
            _ => {
                let b = self.ctx.inner.storage_buffer(
                    "statistics upload",
                    bytes,
                    ::wgpu::BufferUsages::empty(),
                )?;
                self.upload = Some(b.clone());
                Ok(b)
            }
        }
    }

    /// Per-layer `sigma_X^2` and `sigma_N^2` (SPEC §8) from `workers` (`K >= 2`) buffers
    /// stacked in `x`: worker `k`'s element `i` at position `k * n + i` (16-bit types packed
    /// two per word over the whole stack). Errors like [`crate::cpu::estimate_variance`],
    /// including [`Error::NonFinite`] for the first worker holding a non-finite value.
    pub fn estimate_variance_stacked(
        &mut self,
        x: &::wgpu::Buffer,
        workers: usize,
        dtype: DType,
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        crate::contract::check_workers(workers)?;
        if workers > MAX_WORKERS {
            return Err(Error::InvalidConfig(format!(
                "the wgpu variance estimator takes at most {MAX_WORKERS} workers, got {workers}"
            )));
        }
        let total = self.layout.n() as u64 * workers as u64;
        if total > crate::MAX_ELEMENTS {
            return Err(Error::TooLarge { n: total });
        }
        self.variance_passes(x, workers, dtype, total)?;
        let mut bad = std::mem::take(&mut self.bad_acc);
        bad.clear();
        bad.resize(workers, (0, u32::MAX));
        let r = self
            .accumulate_bad(workers, 0, &mut bad)
            .and_then(|()| first_non_finite(&bad));
        self.bad_acc = bad;
        r?;
        out.clear();
        self.read_variance(workers, out)
    }

    fn variance_passes(
        &mut self,
        x: &::wgpu::Buffer,
        workers: usize,
        dtype: DType,
        total: u64,
    ) -> Result<()> {
        self.cfg.dtype = dtype_code(dtype);
        self.cfg.workers = workers as u32;
        self.run(
            x,
            grad_bytes(total as usize, dtype),
            &[
                (S::VarPartial, true),
                (S::VarReduce, false),
                (S::VarM2Partial, true),
                (S::M2Reduce, false),
            ],
        )
    }

    /// Adds each worker's non-finite count of the last variance passes to `acc[k].0` and
    /// lowers `acc[k].1` to its first such index plus `offset` (the plan's first element).
    fn accumulate_bad(&self, workers: usize, offset: usize, acc: &mut [(u64, u32)]) -> Result<()> {
        self.ctx
            .inner
            .read_back(&self.staging, &[(&self.bad, 0, workers as u64 * 8)], |b| {
                for (k, c) in words(&b[..workers * 8])
                    .collect::<Vec<u32>>()
                    .chunks_exact(2)
                    .enumerate()
                {
                    if c[0] > 0 {
                        acc[k].0 += u64::from(c[0]);
                        acc[k].1 = acc[k].1.min(c[1] + offset as u32);
                    }
                }
            })
    }

    /// Plans over runs of whole layers whose `workers` stacked buffers of `dtype` each fit
    /// one storage binding of `limit` bytes.
    fn plan_chunks(&self, workers: usize, dtype: DType, limit: u64) -> Result<Chunks> {
        let fits = |len: usize| grad_bytes(len * workers, dtype) <= limit;
        let mut plans = Vec::new();
        let mut first = 0;
        while first < self.layout.num_layers() {
            let start = self.layout.layer(first).start;
            if !fits(self.layout.layer(first).len()) {
                return Err(dev_err(format!(
                    "variance estimate: layer {first} ({} elements) of {workers} workers needs {} bytes, above this device's limit of {limit} bytes per storage binding",
                    self.layout.layer(first).len(),
                    grad_bytes(self.layout.layer(first).len() * workers, dtype)
                )));
            }
            let mut last = first + 1;
            while last < self.layout.num_layers() && fits(self.layout.layer(last).end - start) {
                last += 1;
            }
            let sizes: Vec<usize> = (first..last).map(|l| self.layout.layer(l).len()).collect();
            plans.push((start, Stats::new(&self.ctx, &Layout::new(&sizes)?)?));
            first = last;
        }
        Ok(Chunks {
            workers,
            dtype,
            plans,
            part: Vec::new(),
            bad: vec![(0, u32::MAX); workers],
        })
    }

    /// The host variance entry point over stacked workers larger than one storage binding:
    /// one upload and estimate per run of layers (plans built on the first such call, kept
    /// for the same workers and dtype); the non-finite error is over every run, as one call
    /// would give it.
    fn estimate_variance_chunked<T: Element>(
        &mut self,
        workers: &[&[T]],
        limit: u64,
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        let k = workers.len();
        if !matches!(&self.chunks, Some(c) if c.workers == k && c.dtype == T::DTYPE) {
            self.chunks = Some(self.plan_chunks(k, T::DTYPE, limit)?);
        }
        let Some(ch) = self.chunks.as_mut() else {
            unreachable!("planned above")
        };
        ch.bad.iter_mut().for_each(|b| *b = (0, u32::MAX));
        ch.part.clear();
        for (start, plan) in &mut ch.plans {
            let len = plan.layout.n();
            let up = plan.upload_stacked(workers, *start)?;
            plan.variance_passes(&up, k, T::DTYPE, (k * len) as u64)?;
            plan.accumulate_bad(k, *start, &mut ch.bad)?;
            plan.read_variance(k, &mut ch.part)?;
        }
        first_non_finite(&ch.bad)?;
        out.clear();
        out.extend_from_slice(&ch.part);
        Ok(())
    }

    /// Uploads elements `start..start + n` of every worker (`n` this plan's length), stacked
    /// worker after worker, into the plan's upload buffer (grown when too small).
    fn upload_stacked<T: Element>(
        &mut self,
        workers: &[&[T]],
        start: usize,
    ) -> Result<::wgpu::Buffer> {
        let len = self.layout.n();
        let mut stack = std::mem::take(&mut self.host_stack);
        stack.clear();
        for w in workers {
            stack.extend_from_slice(bytemuck::cast_slice(&w[start..start + len]));
        }
        let up = self.upload_buffer(grad_bytes(workers.len() * len, T::DTYPE));
        if let Ok(up) = &up {
            self.ctx.inner.write_padded(up, 0, &stack);
        }
        self.host_stack = stack;
        up
    }

    /// Appends the estimates of the last variance passes to `out`.
    fn read_variance(&self, workers: usize, out: &mut Vec<VarianceEstimate>) -> Result<()> {
        let nl = self.layout.num_layers();
        let kf = workers as f64;
        self.ctx
            .inner
            .read_back(&self.staging, &[(&self.res, 0, nl as u64 * 32)], |b| {
                let w: Vec<u32> = words(&b[..nl * 32]).collect();
                for l in 0..nl {
                    let r = &w[l * 8..l * 8 + 8];
                    let nlf = self.layout.layer(l).len() as f64;
                    if nlf == 0.0 {
                        out.push(VarianceEstimate::default());
                        continue;
                    }
                    let f = |j: usize| f64::from(f32::from_bits(r[j]));
                    let sigma_n2 = f(1) / (nlf * (kf - 1.0));
                    let (d1, d2) = (f(6), f(7));
                    let var_ybar = ((d2 - d1 * d1 / nlf) / nlf).max(0.0);
                    out.push(VarianceEstimate {
                        sigma_x2: (var_ybar - sigma_n2 / kf).max(0.0),
                        sigma_n2,
                    });
                }
            })
    }
}

impl Statistics for Stats {
    type Buffer<T: Element> = ::wgpu::Buffer;

    /// Copies `x` into a plan-owned device buffer (allocated on the first call), then as
    /// [`Statistics::layer_stats_device`].
    fn layer_stats<T: Element>(&mut self, x: &[T], out: &mut Vec<LayerStats>) -> Result<()> {
        self.layout.check_len("buffer", x.len())?;
        let up = self.upload_buffer(grad_bytes(x.len(), T::DTYPE))?;
        self.ctx.inner.write_padded(&up, 0, bytemuck::cast_slice(x));
        self.layer_stats_buffer(&up, T::DTYPE, out)
    }

    /// `x` holds `n` elements of `T` (16-bit types packed two per word), `STORAGE` usage.
    fn layer_stats_device<T: Element>(
        &mut self,
        x: &::wgpu::Buffer,
        out: &mut Vec<LayerStats>,
    ) -> Result<()> {
        self.layer_stats_buffer(x, T::DTYPE, out)
    }

    /// Stacks the workers' buffers into a plan-owned device buffer (grown when too small),
    /// then as [`Stats::estimate_variance_stacked`]. When the stack exceeds one storage
    /// binding of this device, the estimate runs per run of whole layers that fits (plans
    /// built on the first such call); a single layer whose workers exceed it is an
    /// [`Error::Device`].
    fn estimate_variance<T: Element>(
        &mut self,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        for w in workers {
            self.layout.check_len("worker buffer", w.len())?;
        }
        crate::contract::check_workers(workers.len())?;
        let total = (workers.len() * self.layout.n()) as u64;
        if total > crate::MAX_ELEMENTS {
            return Err(Error::TooLarge { n: total });
        }
        let limit = self.ctx.inner.limits.max_storage_buffer_binding_size;
        if grad_bytes(total as usize, T::DTYPE) > limit {
            return self.estimate_variance_chunked(workers, limit, out);
        }
        let up = self.upload_stacked(workers, 0)?;
        self.estimate_variance_stacked(&up, workers.len(), T::DTYPE, out)
    }

    /// Copies the workers' buffers into one stacked device buffer (device to device), then
    /// as [`Stats::estimate_variance_stacked`]. With 16-bit elements and an odd `n` a worker
    /// would start mid-word, which a buffer copy cannot do: that is an
    /// [`Error::InvalidConfig`]; stack the buffers yourself or use the host entry point.
    fn estimate_variance_device<T: Element>(
        &mut self,
        workers: &[&::wgpu::Buffer],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        let n = self.layout.n() as u64;
        let each = n * u64::from(T::DTYPE.bits() / 8);
        if each % 4 != 0 {
            return Err(Error::InvalidConfig(format!(
                "wgpu: stacking {:?} buffers of {n} 16-bit elements needs an even n; pass a stacked buffer to Stats::estimate_variance_stacked or use the host entry point",
                T::DTYPE
            )));
        }
        crate::contract::check_workers(workers.len())?;
        for w in workers {
            if w.size() < each {
                return Err(Error::LengthMismatch {
                    what: "worker buffer (bytes)",
                    expected: each as usize,
                    got: w.size() as usize,
                });
            }
        }
        let total = each * workers.len() as u64;
        let up = self.upload_buffer(total)?;
        let inner = self.ctx.inner.clone();
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                label: Some("stack workers"),
            });
        for (k, w) in workers.iter().enumerate() {
            enc.copy_buffer_to_buffer(w, 0, &up, k as u64 * each, each);
        }
        inner.submit(enc)?;
        self.estimate_variance_stacked(&up, workers.len(), T::DTYPE, out)
    }
}

/// One-shot [`Statistics::layer_stats`]: builds a plan per call (allocates; keep a [`Stats`]
/// for repeated use).
pub fn layer_stats<T: Element>(
    ctx: &Context,
    x: &[T],
    layout: &Layout,
    out: &mut Vec<LayerStats>,
) -> Result<()> {
    layout.check_len("buffer", x.len())?;
    Statistics::layer_stats(&mut Stats::new(ctx, layout)?, x, out)
}

/// One-shot [`Statistics::estimate_variance`] (allocates a plan per call).
pub fn estimate_variance<T: Element>(
    ctx: &Context,
    workers: &[&[T]],
    layout: &Layout,
    out: &mut Vec<VarianceEstimate>,
) -> Result<()> {
    Statistics::estimate_variance(&mut Stats::new(ctx, layout)?, workers, out)
}

#[cfg(test)]
mod tests {
    use super::super::layout::{check, mirror};
    use super::StatsCfg;

    #[test]
    fn uniforms_have_the_wgsl_layout() {
        check(
            "stats.wgsl",
            "StatsCfg",
            mirror!(StatsCfg {
                n,
                num_layers,
                num_tiles,
                dtype,
                workers,
                tiles_off,
                pad0,
                pad1
            }),
        );
    }
}
