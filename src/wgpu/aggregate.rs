//! The parameter server's decoder on the GPU (SPEC §7); shaders in `shaders/aggregate.wgsl`.

use super::context::{Context, Inner, dev_err, floats, grid, prefix};
use super::passes::AggregatePass as A;
use crate::codec::qsgd;
use crate::contract::check_payload;
use crate::{Aggregate, Average, Error, Layout, Mode, Payload, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
struct WorkerParams {
    offset: u32,
    len: u32,
    scale_off: u32,
    bits_off: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AggCfg {
    n: u32,
    num_groups: u32,
    over_senders: u32,
    workers: u32,
}

/// Server-side plan on the GPU: built once for a layout, a selection mode (the groups of sign
/// payloads), an averaging rule and `K` workers. Payloads arrive as host data (decoded from
/// the wire); they are checked on the host before anything is uploaded, so on error the
/// output is untouched. Each worker is one dispatch, in worker order, so every coordinate gets
/// the same f32 adds in the same order as on the CPU: results are bit-identical.
pub struct Aggregator {
    ctx: Context,
    n: usize,
    num_groups: usize,
    rule: Average,
    workers: usize,
    cfg: ::wgpu::Buffer,
    params: ::wgpu::Buffer,
    out: ::wgpu::Buffer,
    counts: ::wgpu::Buffer,
    inv: ::wgpu::Buffer,
    starts: ::wgpu::Buffer,
    staging: ::wgpu::Buffer,
    /// Upload buffers; grown (and the bind groups rebuilt) only when a call needs more room.
    idx: Option<::wgpu::Buffer>,
    val: Option<::wgpu::Buffer>,
    signs: Option<::wgpu::Buffer>,
    /// QSGD's decoded values (`n` f32 once a QSGD payload arrived, 4 bytes before).
    decoded: Option<::wgpu::Buffer>,
    binds: Vec<::wgpu::BindGroup>,
    host_idx: Vec<u32>,
    host_val: Vec<f32>,
    host_signs: Vec<u32>,
    /// Per-worker offsets of the last call, kept for its capacity.
    host_params: Vec<WorkerParams>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("wgpu::Aggregator")
            .field("n", &self.n)
            .field("workers", &self.workers)
            .finish()
    }
}

impl Aggregator {
    /// Errors when `workers == 0` or a buffer exceeds the device's binding limit.
    pub fn new(
        ctx: &Context,
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
        let inner = &ctx.inner;
        let n = layout.n();
        let groups = layout.groups(mode);
        let inv: Vec<u32> = crate::contract::reciprocals(workers)
            .into_iter()
            .map(f32::to_bits)
            .collect();
        let starts: Vec<u32> = groups.iter().map(|g| g.start as u32).collect();
        let cfg = AggCfg {
            n: n as u32,
            num_groups: groups.len() as u32,
            over_senders: u32::from(rule == Average::OverSenders),
            workers: workers as u32,
        };
        let cfg_buf = inner.buffer(
            "aggregation config",
            16,
            ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
        )?;
        inner
            .queue
            .write_buffer(&cfg_buf, 0, bytemuck::bytes_of(&cfg));
        let align = inner.uniform_align();
        let params = inner.buffer(
            "worker parameters",
            align * workers as u64,
            ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
        )?;
        let none = ::wgpu::BufferUsages::empty();
        Ok(Self {
            ctx: ctx.clone(),
            n,
            num_groups: groups.len(),
            rule,
            workers,
            cfg: cfg_buf,
            params,
            out: inner.storage_buffer("aggregate", n as u64 * 4, none)?,
            counts: inner.storage_buffer("sender counts", n as u64 * 4, none)?,
            inv: inner.storage_init("reciprocals", &inv)?,
            starts: inner.storage_init("group starts", &starts)?,
            staging: inner.staging(n as u64 * 4)?,
            idx: None,
            val: None,
            signs: None,
            decoded: None,
            binds: Vec::new(),
            host_idx: Vec::new(),
            host_val: Vec::new(),
            host_signs: Vec::new(),
            host_params: Vec::with_capacity(workers),
        })
    }

    /// Like [`Aggregate::aggregate`] but leaves the result in the plan's own device buffer,
    /// which holds `n` f32 and stays valid until the next call: no copy into a caller's
    /// buffer, unlike [`Aggregate::aggregate_device`].
    pub fn aggregate_in_place(&mut self, payloads: &[Payload]) -> Result<&::wgpu::Buffer> {
        self.aggregate_on_device(payloads)
    }
}

impl Aggregate for Aggregator {
    type Output = ::wgpu::Buffer;

    /// Waits for the device (the result is host data).
    fn aggregate(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()> {
        if out.len() != self.n {
            return Err(Error::LengthMismatch {
                what: "aggregation output",
                expected: self.n,
                got: out.len(),
            });
        }
        self.aggregate_on_device(payloads)?;
        let n = self.n;
        self.ctx
            .inner
            .read_back(&self.staging, &[(&self.out, 0, n as u64 * 4)], |b| {
                for (o, v) in out.iter_mut().zip(floats(&b[..n * 4])) {
                    *o = v;
                }
            })
    }

    /// `out` needs `n * 4` bytes and `COPY_DST` usage; the result is copied into it on the
    /// device.
    fn aggregate_device(&mut self, payloads: &[Payload], out: &mut ::wgpu::Buffer) -> Result<()> {
        let bytes = self.n as u64 * 4;
        if out.size() < bytes {
            return Err(Error::LengthMismatch {
                what: "aggregation output (bytes)",
                expected: bytes as usize,
                got: out.size() as usize,
            });
        }
        if !out.usage().contains(::wgpu::BufferUsages::COPY_DST) {
            return Err(Error::InvalidConfig(
                "the aggregation output buffer needs COPY_DST usage".into(),
            ));
        }
        self.aggregate_on_device(payloads)?;
        let inner = self.ctx.inner.clone();
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                label: Some("aggregate output"),
            });
        enc.copy_buffer_to_buffer(&self.out, 0, out, 0, bytes);
        inner.submit(enc)
    }

    fn rule(&self) -> Average {
        self.rule
    }
}

impl Aggregator {
    fn aggregate_on_device(&mut self, payloads: &[Payload]) -> Result<&::wgpu::Buffer> {
        self.check_inputs(payloads)?;
        let inner = self.ctx.inner.clone();
        let params = self.stage(payloads);
        let qsgd = payloads.iter().any(|p| matches!(p, Payload::Qsgd(_)));
        self.ensure_buffers(&inner, qsgd)?;
        self.upload(&inner, params);
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                label: Some("aggregate"),
            });
        self.record(&inner, &mut enc, payloads);
        inner.submit(enc).map_err(|e| match e {
            Error::Device { reason, .. } => dev_err(format!("aggregation: {reason}")),
            e => e,
        })?;
        Ok(&self.out)
    }

    /// One payload per worker, each checked (SPEC §7, §10) before anything is staged.
    fn check_inputs(&self, payloads: &[Payload]) -> Result<()> {
        if payloads.len() != self.workers {
            return Err(Error::LengthMismatch {
                what: "payloads (one per worker)",
                expected: self.workers,
                got: payloads.len(),
            });
        }
        for (k, p) in payloads.iter().enumerate() {
            check_payload(p, self.n, self.num_groups)
                .map_err(|reason| Error::BadPayload { worker: k, reason })?;
        }
        Ok(())
    }

    /// Concatenates all workers' data into the host scratch (which keeps its capacity
    /// across calls) and returns each worker's offsets into it.
    fn stage(&mut self, payloads: &[Payload]) -> Vec<WorkerParams> {
        self.host_idx.clear();
        self.host_val.clear();
        self.host_signs.clear();
        let mut params = std::mem::take(&mut self.host_params);
        params.clear();
        for p in payloads {
            let mut w = WorkerParams::default();
            match p {
                Payload::Qsgd(p) => {
                    w.scale_off = self.host_val.len() as u32;
                    w.bits_off = self.host_signs.len() as u32;
                    // One correctly rounded division per group (SPEC §13), on the host.
                    self.host_val
                        .extend(p.scales.iter().map(|&s| qsgd::step(s, p.levels)));
                    self.host_signs.extend(p.codes.chunks(4).map(|c| {
                        let mut b = [0u8; 4];
                        for (d, &x) in b.iter_mut().zip(c) {
                            *d = x as u8;
                        }
                        u32::from_le_bytes(b)
                    }));
                    self.host_idx.resize(self.host_val.len(), 0);
                }
                Payload::Sparse(p) => {
                    w.offset = self.host_val.len() as u32;
                    w.len = p.indices.len() as u32;
                    self.host_idx.extend_from_slice(&p.indices);
                    self.host_val.extend_from_slice(&p.values);
                }
                Payload::Sign(p) => {
                    w.scale_off = self.host_val.len() as u32;
                    w.bits_off = self.host_signs.len() as u32;
                    self.host_val.extend_from_slice(&p.scales);
                    self.host_signs.extend(
                        p.negative
                            .iter()
                            .flat_map(|&x| [x as u32, (x >> 32) as u32]),
                    );
                    // Keep the sparse index stream aligned with the values it indexes.
                    self.host_idx.resize(self.host_val.len(), 0);
                }
            }
            params.push(w);
        }
        params
    }

    /// Grows the payload buffers to the staged data (powers of two, so growth is rare) and
    /// rebuilds the per-worker bind groups when a buffer changed.
    fn ensure_buffers(&mut self, inner: &Inner, qsgd: bool) -> Result<()> {
        let grow = |cur: &Option<::wgpu::Buffer>,
                    need: usize,
                    what: &str|
         -> Result<Option<::wgpu::Buffer>> {
            let bytes = (need.max(1) as u64) * 4;
            match cur {
                Some(b) if b.size() >= bytes => Ok(None),
                _ => inner
                    .storage_buffer(
                        what,
                        bytes.next_power_of_two(),
                        ::wgpu::BufferUsages::empty(),
                    )
                    .map(Some),
            }
        };
        let new_idx = grow(&self.idx, self.host_idx.len(), "payload indices")?;
        let new_val = grow(&self.val, self.host_val.len(), "payload values")?;
        let new_signs = grow(&self.signs, self.host_signs.len(), "payload signs")?;
        let dec_len = if qsgd { self.n } else { 1 };
        let new_dec = grow(&self.decoded, dec_len, "decoded QSGD values")?;
        let rebuild = new_idx.is_some()
            || new_val.is_some()
            || new_signs.is_some()
            || new_dec.is_some()
            || self.binds.is_empty();
        if let Some(b) = new_idx {
            self.idx = Some(b);
        }
        if let Some(b) = new_val {
            self.val = Some(b);
        }
        if let Some(b) = new_signs {
            self.signs = Some(b);
        }
        if let Some(b) = new_dec {
            self.decoded = Some(b);
        }
        if !rebuild {
            return Ok(());
        }
        let (idx, val, signs, decoded) = (
            self.idx.as_ref().expect("grown above"),
            self.val.as_ref().expect("grown above"),
            self.signs.as_ref().expect("grown above"),
            self.decoded.as_ref().expect("grown above"),
        );
        let align = inner.uniform_align();
        let layout = &inner.aggregate.layouts[0];
        self.binds = (0..self.workers)
            .map(|k| {
                let res = [
                    prefix(&self.params, align * k as u64, 16),
                    self.cfg.as_entire_binding(),
                    idx.as_entire_binding(),
                    val.as_entire_binding(),
                    signs.as_entire_binding(),
                    self.out.as_entire_binding(),
                    self.counts.as_entire_binding(),
                    self.inv.as_entire_binding(),
                    self.starts.as_entire_binding(),
                    decoded.as_entire_binding(),
                ];
                inner.bind_group("aggregate", layout, res)
            })
            .collect();
        Ok(())
    }

    /// Writes the staged data and each worker's parameter slot.
    fn upload(&mut self, inner: &Inner, params: Vec<WorkerParams>) {
        let q = &inner.queue;
        let (idx, val, signs) = (
            self.idx.as_ref().expect("grown by ensure_buffers"),
            self.val.as_ref().expect("grown by ensure_buffers"),
            self.signs.as_ref().expect("grown by ensure_buffers"),
        );
        for (b, data) in [
            (idx, bytemuck::cast_slice::<u32, u8>(&self.host_idx)),
            (val, bytemuck::cast_slice(&self.host_val)),
            (signs, bytemuck::cast_slice(&self.host_signs)),
        ] {
            if !data.is_empty() {
                q.write_buffer(b, 0, data);
            }
        }
        let align = inner.uniform_align();
        for (k, w) in params.iter().enumerate() {
            q.write_buffer(&self.params, align * k as u64, bytemuck::bytes_of(w));
        }
        self.host_params = params;
    }

    /// Clear, one dispatch per worker in worker order (SPEC §7's summation order), finish.
    fn record(&self, inner: &Inner, enc: &mut ::wgpu::CommandEncoder, payloads: &[Payload]) {
        let m = &inner.aggregate;
        let mut cp = enc.begin_compute_pass(&::wgpu::ComputePassDescriptor {
            label: Some("aggregate"),
            timestamp_writes: None,
        });
        let all = grid((self.n as u64).div_ceil(256));
        cp.set_bind_group(0, &self.binds[0], &[]);
        cp.set_pipeline(m.pipeline(A::Clear));
        if all.0 > 0 {
            cp.dispatch_workgroups(all.0, all.1, 1);
        }
        for (k, p) in payloads.iter().enumerate() {
            cp.set_bind_group(0, &self.binds[k], &[]);
            match p {
                Payload::Qsgd(_) => {
                    if all.0 > 0 {
                        cp.set_pipeline(m.pipeline(A::DecodeQsgd));
                        cp.dispatch_workgroups(all.0, all.1, 1);
                        cp.set_pipeline(m.pipeline(A::AddDecoded));
                        cp.dispatch_workgroups(all.0, all.1, 1);
                    }
                }
                Payload::Sparse(p) => {
                    let g = grid((p.indices.len() as u64).div_ceil(256));
                    if g.0 > 0 {
                        cp.set_pipeline(m.pipeline(A::Scatter));
                        cp.dispatch_workgroups(g.0, g.1, 1);
                    }
                }
                Payload::Sign(_) => {
                    if all.0 > 0 {
                        cp.set_pipeline(m.pipeline(A::AddSign));
                        cp.dispatch_workgroups(all.0, all.1, 1);
                    }
                }
            }
        }
        cp.set_bind_group(0, &self.binds[0], &[]);
        cp.set_pipeline(m.pipeline(A::Finish));
        if all.0 > 0 {
            cp.dispatch_workgroups(all.0, all.1, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{check, mirror};
    use super::{AggCfg, WorkerParams};

    #[test]
    fn uniforms_have_the_wgsl_layout() {
        check(
            "aggregate.wgsl",
            "WorkerParams",
            mirror!(WorkerParams {
                offset,
                len,
                scale_off,
                bits_off
            }),
        );
        check(
            "aggregate.wgsl",
            "AggCfg",
            mirror!(AggCfg {
                n,
                num_groups,
                over_senders,
                workers
            }),
        );
    }
}
