//! The parameter server's decoder on the GPU (SPEC §7).

use super::abi::{self, AggArgs};
use super::context::{Context, DevBuf, Pinned};
use super::kernels::typed as K;
use crate::contract::{Average, check_payload};
use crate::{Aggregate, Error, Layout, Mode, Payload, Result};
use cudarc::driver::{CudaSlice, DevicePtrMut};
use std::ops::Range;

/// Per-worker device staging for uploaded payloads; grows to the largest payload seen and
/// is then reused, so a steady stream of same-sized payloads allocates nothing.
#[derive(Debug)]
struct Staging {
    idx: DevBuf,
    val: DevBuf,
    cap: usize,
}

/// Server-side plan on the GPU: the same contract as [`crate::cpu::Aggregator`].
///
/// Payloads are validated twice over: cheap structural checks on the host (lengths, `n`,
/// scale counts), then indices (in range, strictly ascending) and values (finite) on the
/// device, where the kernels that write `out` first read a device flag and do nothing if
/// any payload failed. Workers are summed one launch each in worker order, one f32 add per
/// worker per coordinate, so the result has the CPU's bits.
#[derive(Debug)]
pub struct Aggregator {
    cx: Context,
    n: usize,
    groups: Vec<Range<usize>>,
    rule: Average,
    workers: usize,
    out: DevBuf,
    counts: Option<DevBuf>,
    inv: DevBuf,
    items: DevBuf,
    n_items: u32,
    err_idx: DevBuf,
    err_val: DevBuf,
    any: DevBuf,
    host_err_idx: Vec<u32>,
    host_err_val: Vec<u32>,
    staging: Vec<Staging>,
    /// Per worker: the scales of a sign or QSGD payload, a sign payload's bits, a QSGD
    /// payload's codes (each allocated at the first payload of its kind, then reused).
    scales: Vec<DevBuf>,
    sign_words: Vec<DevBuf>,
    qsgd_codes: Vec<DevBuf>,
    /// Page-locked staging of every host transfer of a call (uploads, the check results,
    /// the host output), so the call enqueues everything and waits once.
    pinned: Pinned,
    /// Where the check results land in `pinned` during the current call.
    err_at: usize,
}

impl Aggregator {
    /// Errors when `workers == 0`.
    pub fn new(
        cx: &Context,
        layout: &Layout,
        mode: Mode,
        rule: Average,
        workers: usize,
    ) -> Result<Self> {
        if workers == 0 {
            return Err(Error::InvalidConfig(
                "aggregation needs K >= 1 workers".into(),
            ));
        }
        let n = layout.n();
        let groups = layout.groups(mode);
        let inv = crate::contract::reciprocals(workers);
        let (items, _) = abi::items(&groups);
        Ok(Self {
            cx: cx.clone(),
            n,
            rule,
            workers,
            out: DevBuf::zeroed(cx, n * 4)?,
            counts: if rule == Average::OverSenders {
                Some(DevBuf::zeroed(cx, n * 4)?)
            } else {
                None
            },
            inv: DevBuf::from_slice(cx, &inv)?,
            n_items: items.len() as u32,
            items: DevBuf::from_slice(cx, &items)?,
            err_idx: DevBuf::zeroed(cx, workers * 4)?,
            err_val: DevBuf::zeroed(cx, workers * 4)?,
            any: DevBuf::zeroed(cx, 4)?,
            host_err_idx: vec![0; workers],
            host_err_val: vec![0; workers],
            staging: Vec::new(),
            scales: Vec::new(),
            sign_words: Vec::new(),
            qsgd_codes: Vec::new(),
            pinned: Pinned::new(cx),
            err_at: 0,
            groups,
        })
    }

    /// Averages `payloads` (one per worker, in worker order) into the host buffer `out`
    /// (length `n`). Every payload is checked before anything is written: on error `out`
    /// is untouched. Waits for the stream (the result is host data).
    pub fn aggregate(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()> {
        if out.len() != self.n {
            self.check_count(payloads)?;
            return Err(Error::LengthMismatch {
                what: "aggregation output",
                expected: self.n,
                got: out.len(),
            });
        }
        let dst = self.out.ptr();
        self.enqueue(payloads, dst, self.n * 4)?;
        self.report(payloads, Some(out))
    }

    /// As [`Aggregator::aggregate`], into a device buffer. Waits for the stream once, to
    /// report a rejected payload as an error; on error `out` is untouched.
    pub fn aggregate_device(
        &mut self,
        payloads: &[Payload],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if out.len() != self.n {
            self.check_count(payloads)?;
            return Err(Error::LengthMismatch {
                what: "aggregation output",
                expected: self.n,
                got: out.len(),
            });
        }
        self.cx.same_context(out.context(), "the output")?;
        let stream = self.cx.stream.clone();
        let (dst, _guard) = out.device_ptr_mut(&stream);
        self.enqueue(payloads, dst, 0)?;
        self.report(payloads, None)
    }

    /// Averages `K` sparse payloads that are already on the device, as an NCCL all-gather
    /// leaves them: worker `w`'s `sent` indices (u32) at `idx + 4 w sent` and values (f32)
    /// at `val + 4 w sent`, worker order. The same device checks and the same kernels, in
    /// the same order, as [`Aggregator::aggregate_device`], so the result has the CPU
    /// reference's bits; nothing of the payloads crosses to the host (only the per-worker
    /// verdicts of the checks). On a rejected payload `out` is untouched and the error names
    /// the first bad worker.
    ///
    /// # Safety
    /// `idx` and `val` must point to at least `K sent` elements each on this aggregator's
    /// device, written before (in stream order) the work this call enqueues.
    pub unsafe fn aggregate_gathered_device(
        &mut self,
        idx: u64,
        val: u64,
        sent: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let stride = 4 * sent as u64;
        // SAFETY: the caller's contract, with worker rows 4 sent bytes apart.
        unsafe { self.aggregate_strided(idx, val, stride, sent, out) }
    }

    /// As [`Aggregator::aggregate_gathered_device`] for the rows that
    /// [`crate::cuda::Compressor::pack_row`] writes and one all-gather concatenates: worker
    /// `w`'s row starts at `rows + w stride`, its `sent` indices first, then its `sent`
    /// values.
    ///
    /// # Safety
    /// `rows` must point to `K` rows of `stride >= 8 sent` bytes on this aggregator's
    /// device, written before (in stream order) the work this call enqueues.
    pub unsafe fn aggregate_rows_device(
        &mut self,
        rows: u64,
        stride: usize,
        sent: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if stride < 8 * sent || stride % 4 != 0 {
            return Err(Error::InvalidConfig(format!(
                "row stride {stride} cannot hold {sent} indices and values 4-byte aligned"
            )));
        }
        let val = rows + 4 * sent as u64;
        // SAFETY: the caller's contract; each row holds both arrays (checked above).
        unsafe { self.aggregate_strided(rows, val, stride as u64, sent, out) }
    }

    unsafe fn aggregate_strided(
        &mut self,
        idx: u64,
        val: u64,
        stride: u64,
        sent: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if out.len() != self.n {
            return Err(Error::LengthMismatch {
                what: "aggregation output",
                expected: self.n,
                got: out.len(),
            });
        }
        if sent > self.n {
            return Err(Error::InvalidConfig(format!(
                "{sent} values per worker exceed n = {}",
                self.n
            )));
        }
        self.cx.same_context(out.context(), "the output")?;
        let stream = self.cx.stream.clone();
        let (dst, _guard) = out.device_ptr_mut(&stream);
        self.cx.bind()?;
        let k = self.workers;
        let base = self.begin(dst)?;
        let at = |w: usize| AggArgs {
            idx: idx + w as u64 * stride,
            val: val + w as u64 * stride,
            len: sent as u32,
            worker: w as u32,
            ..base
        };
        let grid = self.cx.grid_for(sent as u64, 256);
        for w in 0..k {
            self.cx.launch(K::AggCheckSparse, grid, 256, &at(w))?;
        }
        let grid_n = self.cx.grid_for(self.n as u64, 256);
        self.cx.launch(K::AggZero, grid_n, 256, &base)?;
        for w in 0..k {
            self.cx.launch(K::AggScatter, grid, 256, &at(w))?;
        }
        self.cx.launch(K::AggFinalize, grid_n, 256, &base)?;
        self.err_idx.download(&self.cx, &mut self.host_err_idx)?;
        self.err_val.download(&self.cx, &mut self.host_err_val)?;
        for w in 0..k {
            if self.host_err_idx[w] != u32::MAX || self.host_err_val[w] != u32::MAX {
                return Err(Error::BadPayload {
                    worker: w,
                    reason: format!(
                        "rejected by the device checks (first bad index at position {}, first non-finite value at position {})",
                        self.host_err_idx[w], self.host_err_val[w]
                    ),
                });
            }
        }
        Ok(())
    }

    fn check_count(&self, payloads: &[Payload]) -> Result<()> {
        if payloads.len() != self.workers {
            return Err(Error::LengthMismatch {
                what: "payloads (one per worker)",
                expected: self.workers,
                got: payloads.len(),
            });
        }
        Ok(())
    }

    /// The host half of the checks: everything that costs O(1) or O(groups) per payload.
    fn host_check(&self, p: &Payload) -> bool {
        if p.n() as usize != self.n {
            return false;
        }
        match p {
            // The codes are checked on the device (agg_check_qsgd).
            Payload::Qsgd(q) => {
                crate::codec::qsgd::check_shape(q, self.n, self.groups.len()).is_ok()
            }
            Payload::Sparse(s) => s.indices.len() == s.values.len() && s.indices.len() <= self.n,
            Payload::Sign(s) => crate::codec::sign::check(s, self.n, self.groups.len()).is_ok(),
        }
    }

    fn ensure_staging(&mut self, w: usize, len: usize) -> Result<()> {
        while self.staging.len() <= w {
            self.staging.push(Staging {
                idx: DevBuf::zeroed(&self.cx, 0)?,
                val: DevBuf::zeroed(&self.cx, 0)?,
                cap: 0,
            });
        }
        if self.staging[w].cap < len {
            self.staging[w] = Staging {
                idx: DevBuf::zeroed(&self.cx, len * 4)?,
                val: DevBuf::zeroed(&self.cx, len * 4)?,
                cap: len,
            };
        }
        Ok(())
    }

    /// Worker `w`'s scales and, for a sign payload, its bits, or for QSGD its codes.
    fn ensure_dense(&mut self, w: usize, qsgd: bool) -> Result<()> {
        let cx = &self.cx;
        per_worker(cx, &mut self.scales, w, self.groups.len() * 4)?;
        if qsgd {
            per_worker(cx, &mut self.qsgd_codes, w, self.n)
        } else {
            per_worker(cx, &mut self.sign_words, w, self.n.div_ceil(64) * 8)
        }
    }

    /// Enqueues the uploads (through the pinned buffer), the checks and, when every payload
    /// passes the host checks, the aggregation into `dst`; `out_bytes` of room are kept in
    /// the pinned buffer for the host output. Waits for nothing.
    fn enqueue(&mut self, payloads: &[Payload], dst: u64, out_bytes: usize) -> Result<()> {
        self.check_count(payloads)?;
        self.cx.bind()?;
        // Workers up to the first that fails the host checks (`report` names it; the device
        // checks of the ones before it still run, so the first failure in worker order wins).
        let upto = payloads
            .iter()
            .position(|p| !self.host_check(p))
            .unwrap_or(payloads.len());
        let mut up_bytes = 0usize;
        for (w, p) in payloads[..upto].iter().enumerate() {
            self.ensure_worker(w, p)?;
            up_bytes += self
                .arrays(w, p)
                .iter()
                .map(|(b, _)| align(b.len()))
                .sum::<usize>();
        }
        self.err_at = up_bytes;
        let k = self.workers;
        self.pinned
            .reserve(&self.cx, up_bytes + align(k * 8) + out_bytes)?;
        let base = self.begin(dst)?;
        let mut at = 0usize;
        for (w, p) in payloads[..upto].iter().enumerate() {
            // Host copies into pinned memory (the previous call waited for its transfers),
            // each uploaded from there.
            for (bytes, dev) in self.arrays(w, p) {
                self.pinned.bytes_mut()[at..at + bytes.len()].copy_from_slice(bytes);
                self.pinned.upload(&self.cx, at, bytes.len(), dev)?;
                at += align(bytes.len());
            }
            let a = self.worker_args(w, p, base);
            match p {
                Payload::Sparse(_) => {
                    let grid = self.cx.grid_for(u64::from(a.len), 256);
                    self.cx.launch(K::AggCheckSparse, grid, 256, &a)?;
                }
                Payload::Qsgd(_) => {
                    let grid = self.cx.grid_for(self.n as u64, 256);
                    self.cx.launch(K::AggCheckQsgd, grid, 256, &a)?;
                }
                // Its scales were checked on the host, and every bit is a valid sign.
                Payload::Sign(_) => {}
            }
        }
        if upto < payloads.len() {
            // Nothing may be written; `report` names the first bad worker.
            return Ok(());
        }
        let grid_n = self.cx.grid_for(self.n as u64, 256);
        self.cx.launch(K::AggZero, grid_n, 256, &base)?;
        for (w, p) in payloads.iter().enumerate() {
            let a = self.worker_args(w, p, base);
            match p {
                Payload::Sparse(_) => {
                    let grid = self.cx.grid_for(u64::from(a.len), 256);
                    self.cx.launch(K::AggScatter, grid, 256, &a)?;
                }
                Payload::Sign(_) => self.cx.launch(K::AggSign, self.n_items, 256, &a)?,
                Payload::Qsgd(_) => self.cx.launch(K::AggQsgd, self.n_items, 256, &a)?,
            }
        }
        self.cx.launch(K::AggFinalize, grid_n, 256, &base)
    }

    /// Worker `w`'s device buffers for a payload like `p` (grown when too small).
    fn ensure_worker(&mut self, w: usize, p: &Payload) -> Result<()> {
        match p {
            Payload::Sparse(s) => self.ensure_staging(w, s.indices.len()),
            Payload::Sign(_) => self.ensure_dense(w, false),
            Payload::Qsgd(_) => self.ensure_dense(w, true),
        }
    }

    /// The two host arrays of `p` and the device buffers of worker `w` they go to: sparse
    /// (indices, values), sign (scales, bits), QSGD (scales, codes).
    fn arrays<'a>(&self, w: usize, p: &'a Payload) -> [(&'a [u8], u64); 2] {
        match p {
            Payload::Sparse(s) => [
                (bytemuck::cast_slice(&s.indices), self.staging[w].idx.ptr()),
                (bytemuck::cast_slice(&s.values), self.staging[w].val.ptr()),
            ],
            Payload::Sign(s) => [
                (bytemuck::cast_slice(&s.scales), self.scales[w].ptr()),
                (bytemuck::cast_slice(&s.negative), self.sign_words[w].ptr()),
            ],
            Payload::Qsgd(q) => [
                (bytemuck::cast_slice(&q.scales), self.scales[w].ptr()),
                (bytemuck::cast_slice(&q.codes), self.qsgd_codes[w].ptr()),
            ],
        }
    }

    /// The kernels' arguments for worker `w`'s payload `p` (kernels/aggregate.cu).
    fn worker_args(&self, w: usize, p: &Payload, base: AggArgs) -> AggArgs {
        let a = AggArgs {
            worker: w as u32,
            ..base
        };
        match p {
            Payload::Sparse(s) => AggArgs {
                idx: self.staging[w].idx.ptr(),
                val: self.staging[w].val.ptr(),
                len: s.indices.len() as u32,
                ..a
            },
            Payload::Sign(_) => AggArgs {
                scales: self.scales[w].ptr(),
                words: self.sign_words[w].ptr(),
                ..a
            },
            Payload::Qsgd(q) => AggArgs {
                scales: self.scales[w].ptr(),
                words: self.qsgd_codes[w].ptr(),
                len: u32::from(q.levels),
                ..a
            },
        }
    }

    /// Enqueues the check results (and, with `out`, the result) into the pinned buffer,
    /// waits once, and turns the first failure (in worker order) into the error the CPU
    /// reference gives; on success copies the result into `out`.
    fn report(&mut self, payloads: &[Payload], out: Option<&mut [f32]>) -> Result<()> {
        let k = self.workers;
        let e = self.err_at;
        let o = e + align(k * 8);
        self.pinned
            .download(&self.cx, e, k * 4, self.err_idx.ptr())?;
        self.pinned
            .download(&self.cx, e + k * 4, k * 4, self.err_val.ptr())?;
        if out.is_some() {
            self.pinned
                .download(&self.cx, o, self.n * 4, self.out.ptr())?;
        }
        self.cx.synchronize()?;
        let bytes = self.pinned.bytes();
        self.host_err_idx
            .copy_from_slice(bytemuck::cast_slice(&bytes[e..e + k * 4]));
        self.host_err_val
            .copy_from_slice(bytemuck::cast_slice(&bytes[e + k * 4..e + k * 8]));
        for (w, p) in payloads.iter().enumerate() {
            let device_bad = self.host_err_idx[w] != u32::MAX || self.host_err_val[w] != u32::MAX;
            if !self.host_check(p) || device_bad {
                // The failing payload is rare and already on the host: describe it exactly
                // as the reference does.
                let reason = check_payload(p, self.n, self.groups.len())
                    .err()
                    .unwrap_or_else(|| "rejected by the device checks".into());
                return Err(Error::BadPayload { worker: w, reason });
            }
        }
        if let Some(out) = out {
            out.copy_from_slice(bytemuck::cast_slice(&bytes[o..o + self.n * 4]));
        }
        Ok(())
    }
}

/// Grows `list` to hold worker `w`'s buffer of `bytes` bytes (every entry has the same size).
fn per_worker(cx: &Context, list: &mut Vec<DevBuf>, w: usize, bytes: usize) -> Result<()> {
    while list.len() <= w {
        list.push(DevBuf::zeroed(cx, bytes)?);
    }
    Ok(())
}

/// Offsets in the pinned buffer stay 16-byte aligned (it is page-aligned), so its regions
/// can be viewed as `u32`/`f32`/`u64` slices.
fn align(bytes: usize) -> usize {
    bytes.next_multiple_of(16)
}

impl Aggregator {
    /// Clears the per-call error flags (stream-ordered) and returns the launch arguments every
    /// aggregation kernel shares, writing to `dst`.
    fn begin(&self, dst: u64) -> Result<AggArgs> {
        let k = self.workers;
        self.err_idx.fill(&self.cx, 0xFF, k * 4)?;
        self.err_val.fill(&self.cx, 0xFF, k * 4)?;
        self.any.fill(&self.cx, 0, 4)?;
        Ok(AggArgs {
            out: dst,
            counts: self.counts.as_ref().map_or(0, |c| c.ptr()),
            err_idx: self.err_idx.ptr(),
            err_val: self.err_val.ptr(),
            any: self.any.ptr(),
            inv: self.inv.ptr(),
            items: self.items.ptr(),
            n: self.n as u32,
            workers: k as u32,
            ..Default::default()
        })
    }
}

impl Aggregate for Aggregator {
    type Output = CudaSlice<f32>;

    /// Waits for the stream (the result is host data).
    fn aggregate(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()> {
        Aggregator::aggregate(self, payloads, out)
    }

    fn aggregate_device(&mut self, payloads: &[Payload], out: &mut CudaSlice<f32>) -> Result<()> {
        Aggregator::aggregate_device(self, payloads, out)
    }

    fn rule(&self) -> Average {
        self.rule
    }
}
