//! Per-layer statistics and the K-worker variance estimator on the GPU (SPEC §8).

use super::abi::{self, StatsArgs, StatsOut, VarArgs, VarOut};
use super::context::{Context, DevBuf, Pinned};
use super::kernels::typed as K;
use crate::Statistics;
use crate::{DType, Element, Error, LayerStats, Layout, Result, VarianceEstimate};
use cudarc::driver::{CudaSlice, DevicePtr};

/// A reusable statistics plan for one layout: work items, partials and outputs are
/// allocated once, so repeated calls allocate nothing on the device (host outputs are
/// reused `Vec`s).
///
/// Both reductions are segmented: each layer is cut into items of at most 4096 elements,
/// one block per item reads its slice once (coalesced) and keeps it in registers for the
/// centred second pass, and one block per layer merges its items with Chan's formula in f64.
#[derive(Debug)]
pub struct Stats {
    cx: Context,
    layout: Layout,
    items: DevBuf,
    n_items: u32,
    layer_items: DevBuf,
    layer_len: DevBuf,
    partial: DevBuf,
    out: DevBuf,
    host: Vec<StatsOut>,
    max_workers: usize,
    var_partial: DevBuf,
    var_out: DevBuf,
    var_host: Vec<VarOut>,
    worker_ptrs: DevBuf,
    host_ptrs: Vec<u64>,
    bad_count: DevBuf,
    bad_first: DevBuf,
    host_bad_count: Vec<u64>,
    host_bad_first: Vec<u32>,
    /// Device copy of host input (`Statistics::layer_stats` and friends), grown on demand.
    upload: Option<CudaSlice<u8>>,
    /// Page-locked staging of the variance estimator's results: one wait per call.
    pinned: Pinned,
}

impl Stats {
    /// A plan for `layout`, able to estimate variances over up to `max_workers` buffers.
    pub fn new(cx: &Context, layout: &Layout, max_workers: usize) -> Result<Self> {
        let ranges: Vec<_> = (0..layout.num_layers()).map(|l| layout.layer(l)).collect();
        let (items, first) = abi::items(&ranges);
        let lens: Vec<u32> = ranges.iter().map(|r| r.len() as u32).collect();
        let nl = layout.num_layers();
        Ok(Self {
            cx: cx.clone(),
            layout: layout.clone(),
            n_items: items.len() as u32,
            items: DevBuf::from_slice(cx, &items)?,
            layer_items: DevBuf::from_slice(cx, &first)?,
            layer_len: DevBuf::from_slice(cx, &lens)?,
            partial: DevBuf::zeroed(cx, items.len() * abi::STATS_PARTIAL_BYTES)?,
            out: DevBuf::zeroed(cx, nl * size_of::<StatsOut>())?,
            host: vec![StatsOut::default(); nl],
            max_workers,
            var_partial: DevBuf::zeroed(cx, items.len() * abi::VAR_PARTIAL_BYTES)?,
            var_out: DevBuf::zeroed(cx, nl * size_of::<VarOut>())?,
            var_host: vec![VarOut::default(); nl],
            worker_ptrs: DevBuf::zeroed(cx, max_workers * 8)?,
            host_ptrs: Vec::with_capacity(max_workers),
            bad_count: DevBuf::zeroed(cx, max_workers * 8)?,
            bad_first: DevBuf::zeroed(cx, max_workers * 4)?,
            host_bad_count: vec![0; max_workers],
            host_bad_first: vec![0; max_workers],
            upload: None,
            pinned: Pinned::new(cx),
        })
    }

    /// Statistics of each layer of `x`, written to `out` (cleared first). Waits for the
    /// stream, since the result is host data.
    fn layer_stats_on<T: Element>(
        &mut self,
        x: &CudaSlice<T>,
        out: &mut Vec<LayerStats>,
    ) -> Result<()> {
        self.layout.check_len("buffer", x.len())?;
        self.cx.same_context(x.context(), "the buffer")?;
        let stream = self.cx.stream.clone();
        let (ptr, _guard) = x.device_ptr(&stream);
        // SAFETY: `ptr` addresses `x.len()` elements of `T`.
        unsafe { self.layer_stats_raw(ptr, x.len(), T::DTYPE, out) }
    }

    /// [`Statistics::layer_stats_device`] on a raw device pointer.
    ///
    /// # Safety
    /// `x` must address `len` elements of `dtype` on this context's device.
    pub unsafe fn layer_stats_raw(
        &mut self,
        x: u64,
        len: usize,
        dtype: DType,
        out: &mut Vec<LayerStats>,
    ) -> Result<()> {
        self.layout.check_len("buffer", len)?;
        self.cx.bind()?;
        let a = StatsArgs {
            x,
            items: self.items.ptr(),
            partial: self.partial.ptr(),
            layer_items: self.layer_items.ptr(),
            out: self.out.ptr(),
            nlayers: self.layout.num_layers() as u32,
            pad: 0,
        };
        self.cx
            .launch_for(K::StatsItems, dtype, self.n_items, 256, &a)?;
        self.cx.launch(K::StatsMerge, a.nlayers, 256, &a)?;
        self.out.download(&self.cx, &mut self.host)?;
        out.clear();
        for (l, s) in self.host.iter().enumerate() {
            let count = self.layout.layer(l).len() as u64;
            out.push(LayerStats {
                count,
                mean: s.mean,
                var: s.var,
                min: s.min,
                max: s.max,
                max_abs: s.max_abs,
                non_finite: s.non_finite,
            });
        }
        Ok(())
    }

    /// Per-layer `sigma_X^2` and `sigma_N^2` from `K >= 2` workers' buffers (SPEC §8),
    /// written to `out`. Errors as [`crate::cpu::estimate_variance`] does, including
    /// [`Error::NonFinite`] for the first worker holding a NaN or infinity.
    fn estimate_variance_on<T: Element>(
        &mut self,
        workers: &[&CudaSlice<T>],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        crate::contract::check_workers(workers.len())?;
        for w in workers {
            self.layout.check_len("worker buffer", w.len())?;
            self.cx.same_context(w.context(), "a worker buffer")?;
        }
        let stream = self.cx.stream.clone();
        let mut guards = Vec::with_capacity(workers.len());
        let mut ptrs = std::mem::take(&mut self.host_ptrs);
        ptrs.clear();
        for w in workers {
            let (p, g) = w.device_ptr(&stream);
            ptrs.push(p);
            guards.push(g);
        }
        // SAFETY: every pointer addresses a live buffer of the layout's length.
        let r = unsafe { self.estimate_variance_raw(&ptrs, T::DTYPE, out) };
        self.host_ptrs = ptrs;
        r
    }

    /// [`Statistics::estimate_variance_device`] on raw device pointers, one per worker.
    ///
    /// # Safety
    /// Each address must hold the layout's `n` elements of `dtype` on this device.
    pub unsafe fn estimate_variance_raw(
        &mut self,
        workers: &[u64],
        dtype: DType,
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        let k = workers.len();
        crate::contract::check_workers(k)?;
        if k > self.max_workers {
            return Err(Error::InvalidConfig(format!(
                "this plan was built for at most {} workers, got {k}",
                self.max_workers
            )));
        }
        self.cx.bind()?;
        let cx = &self.cx;
        self.worker_ptrs.upload(cx, workers)?;
        self.bad_count.fill(cx, 0, k * 8)?;
        self.bad_first.fill(cx, 0xFF, k * 4)?;
        let a = VarArgs {
            workers: self.worker_ptrs.ptr(),
            items: self.items.ptr(),
            partial: self.var_partial.ptr(),
            layer_items: self.layer_items.ptr(),
            layer_len: self.layer_len.ptr(),
            out: self.var_out.ptr(),
            bad_count: self.bad_count.ptr(),
            bad_first: self.bad_first.ptr(),
            k: k as u32,
            nlayers: self.layout.num_layers() as u32,
        };
        cx.launch_for(K::VarItems, dtype, self.n_items, 256, &a)?;
        cx.launch(K::VarMerge, a.nlayers, 256, &a)?;
        // Every result into pinned memory, then one wait.
        let a16 = |b: usize| b.next_multiple_of(16);
        let out_bytes = self.var_host.len() * size_of::<VarOut>();
        let (o1, o2) = (a16(k * 8), a16(k * 8) + a16(k * 4));
        self.pinned.reserve(cx, o2 + out_bytes)?;
        self.pinned.download(cx, 0, k * 8, self.bad_count.ptr())?;
        self.pinned.download(cx, o1, k * 4, self.bad_first.ptr())?;
        self.pinned
            .download(cx, o2, out_bytes, self.var_out.ptr())?;
        cx.synchronize()?;
        let bytes = self.pinned.bytes();
        self.host_bad_count[..k].copy_from_slice(bytemuck::cast_slice(&bytes[..k * 8]));
        self.host_bad_first[..k].copy_from_slice(bytemuck::cast_slice(&bytes[o1..o1 + k * 4]));
        if let Some(w) = (0..k).find(|&w| self.host_bad_count[w] > 0) {
            return Err(Error::NonFinite {
                count: self.host_bad_count[w],
                first_index: self.host_bad_first[w],
            });
        }
        bytemuck::cast_slice_mut::<VarOut, u8>(&mut self.var_host)
            .copy_from_slice(&bytes[o2..o2 + out_bytes]);
        out.clear();
        out.extend(self.var_host.iter().map(|v| VarianceEstimate {
            sigma_x2: v.sigma_x2,
            sigma_n2: v.sigma_n2,
        }));
        Ok(())
    }
}

impl Stats {
    /// Copies `parts` back to back into the plan's upload buffer (grown when too small) and
    /// returns the device address of each part.
    fn upload_parts<T: Element>(&mut self, parts: &[&[T]], ptrs: &mut Vec<u64>) -> Result<()> {
        self.cx.bind()?;
        let stream = self.cx.stream.clone();
        let bytes: usize = parts.iter().map(|p| std::mem::size_of_val(*p)).sum();
        if self.upload.as_ref().is_none_or(|b| b.len() < bytes) {
            let buf = stream
                .alloc_zeros::<u8>(bytes.max(4))
                .map_err(|e| super::context::device_err("allocating the statistics upload", e))?;
            self.upload = Some(buf);
        }
        let up = self.upload.as_mut().expect("allocated above");
        ptrs.clear();
        let mut at = 0;
        for p in parts {
            let b: &[u8] = bytemuck::cast_slice(p);
            let mut dst = up.slice_mut(at..at + b.len());
            stream
                .memcpy_htod(b, &mut dst)
                .map_err(|e| super::context::device_err("uploading statistics input", e))?;
            at += b.len();
        }
        let (base, _guard) = up.device_ptr(&stream);
        let mut at = 0u64;
        for p in parts {
            ptrs.push(base + at);
            at += std::mem::size_of_val(*p) as u64;
        }
        Ok(())
    }
}

impl Statistics for Stats {
    type Buffer<T: Element> = CudaSlice<T>;

    /// Uploads `x` into a plan-owned device buffer (allocated on the first call), then as
    /// [`Statistics::layer_stats_device`].
    fn layer_stats<T: Element>(&mut self, x: &[T], out: &mut Vec<LayerStats>) -> Result<()> {
        self.layout.check_len("buffer", x.len())?;
        let mut ptrs = std::mem::take(&mut self.host_ptrs);
        let r = self.upload_parts(&[x], &mut ptrs).and_then(|()| {
            // SAFETY: the upload buffer holds `x` at `ptrs[0]`, ordered on this stream.
            unsafe { self.layer_stats_raw(ptrs[0], x.len(), T::DTYPE, out) }
        });
        self.host_ptrs = ptrs;
        r
    }

    fn layer_stats_device<T: Element>(
        &mut self,
        x: &CudaSlice<T>,
        out: &mut Vec<LayerStats>,
    ) -> Result<()> {
        self.layer_stats_on(x, out)
    }

    /// Uploads the workers' buffers back to back into a plan-owned device buffer, then as
    /// [`Statistics::estimate_variance_device`].
    fn estimate_variance<T: Element>(
        &mut self,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        crate::contract::check_workers(workers.len())?;
        for w in workers {
            self.layout.check_len("worker buffer", w.len())?;
        }
        // The plan's pointer scratch, as in `layer_stats`: no host allocation per call.
        let mut ptrs = std::mem::take(&mut self.host_ptrs);
        let r = self.upload_parts(workers, &mut ptrs).and_then(|()| {
            // SAFETY: each pointer addresses one worker's `n` elements in the upload buffer.
            unsafe { self.estimate_variance_raw(&ptrs, T::DTYPE, out) }
        });
        self.host_ptrs = ptrs;
        r
    }

    fn estimate_variance_device<T: Element>(
        &mut self,
        workers: &[&CudaSlice<T>],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        self.estimate_variance_on(workers, out)
    }
}

/// One-off [`Statistics::layer_stats_device`] (builds a plan; keep a [`Stats`] to avoid that per call).
pub fn layer_stats<T: Element>(
    cx: &Context,
    x: &CudaSlice<T>,
    layout: &Layout,
    out: &mut Vec<LayerStats>,
) -> Result<()> {
    layout.check_len("buffer", x.len())?;
    Stats::new(cx, layout, 0)?.layer_stats_on(x, out)
}

/// One-off [`Statistics::estimate_variance_device`] (builds a plan sized for `workers.len()`).
pub fn estimate_variance<T: Element>(
    cx: &Context,
    workers: &[&CudaSlice<T>],
    layout: &Layout,
    out: &mut Vec<VarianceEstimate>,
) -> Result<()> {
    crate::contract::check_workers(workers.len())?;
    Stats::new(cx, layout, workers.len())?.estimate_variance_on(workers, out)
}
