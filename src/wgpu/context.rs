//! Adapter, device, queue, and every pipeline and bind-group layout, built once per device.

use super::passes::{AggregatePass, CompressPass, Pass, StatsPass};
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const COMPRESS: &str = include_str!("../../shaders/compress.wgsl");
const AGGREGATE: &str = include_str!("../../shaders/aggregate.wgsl");
const STATS: &str = include_str!("../../shaders/stats.wgsl");

/// Storage bindings the largest module (compress.wgsl) declares in one stage.
const STORAGE_BINDINGS_NEEDED: u32 = 16;

pub(crate) fn dev_err(reason: impl Into<String>) -> Error {
    Error::Device {
        backend: "wgpu",
        reason: reason.into(),
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Bind {
    Uniform,
    Read,
    ReadWrite,
}

/// One shader module's bind group layouts and its pipelines, in the order of its pass table.
pub(crate) struct Module<P: Pass> {
    pub(crate) layouts: Vec<::wgpu::BindGroupLayout>,
    pipelines: Vec<::wgpu::ComputePipeline>,
    passes: std::marker::PhantomData<P>,
}

impl<P: Pass> Module<P> {
    pub(crate) fn pipeline(&self, pass: P) -> &::wgpu::ComputePipeline {
        &self.pipelines[pass.index()]
    }
}

pub(crate) struct Inner {
    pub(crate) device: ::wgpu::Device,
    pub(crate) queue: ::wgpu::Queue,
    pub(crate) limits: ::wgpu::Limits,
    pub(crate) compress: Module<CompressPass>,
    pub(crate) aggregate: Module<AggregatePass>,
    pub(crate) stats: Module<StatsPass>,
    lost: Arc<AtomicBool>,
    lost_reason: Arc<Mutex<String>>,
    uncaptured: Arc<Mutex<Option<String>>>,
    description: String,
}

/// A wgpu device with every gradsift pipeline compiled. Cheap to clone (shared handle);
/// plans keep a clone.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.inner.description)
            .finish()
    }
}

impl Context {
    /// Picks the default adapter (high-performance preference, any backend wgpu was built
    /// with, `WGPU_BACKEND` and friends honoured) and requests a device with the adapter's
    /// real limits, so large buffers can be bound where the hardware allows.
    ///
    /// Errors with [`Error::BackendUnavailable`] when there is no adapter, the device cannot be
    /// created, or the adapter allows fewer than 16 storage buffers per shader stage.
    pub fn new() -> Result<Self> {
        // One instance for the process: every Context's resources live in the same registry,
        // so a buffer of another Context's device is a validation error (device mismatch)
        // that the error scopes turn into Error::Device, not a lookup that panics.
        static INSTANCE: std::sync::OnceLock<::wgpu::Instance> = std::sync::OnceLock::new();
        let instance = INSTANCE.get_or_init(|| {
            ::wgpu::Instance::new(::wgpu::InstanceDescriptor::new_without_display_handle_from_env())
        });
        let adapter =
            pollster::block_on(instance.request_adapter(&::wgpu::RequestAdapterOptions {
                power_preference: ::wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                ..Default::default()
            }))
            .map_err(|e| Error::BackendUnavailable {
                backend: "wgpu",
                reason: format!("no adapter: {e}"),
            })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) =
            pollster::block_on(adapter.request_device(&::wgpu::DeviceDescriptor {
                label: Some("gradsift"),
                required_features: ::wgpu::Features::empty(),
                required_limits: limits.clone(),
                ..Default::default()
            }))
            .map_err(|e| Error::BackendUnavailable {
                backend: "wgpu",
                reason: format!("adapter {} refused a device: {e}", info.name),
            })?;
        let ctx = Self::build(
            device,
            queue,
            format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type),
        )?;
        // wgpu's default handler panics on errors outside an error scope (e.g. a queue write
        // to a lost device). This device is ours, so record them instead and report them as
        // Error::Device from the next call; a caller's device keeps the caller's handler.
        let slot = ctx.inner.uncaptured.clone();
        ctx.inner
            .device
            .on_uncaptured_error(Arc::new(move |e: ::wgpu::Error| {
                if let Ok(mut s) = slot.lock() {
                    s.get_or_insert_with(|| e.to_string());
                }
            }));
        Ok(ctx)
    }

    /// Uses a caller's device and queue (for sharing buffers with a training framework). The
    /// device's limits apply: it needs `max_storage_buffers_per_shader_stage >= 16` (WebGPU's
    /// default is 8, so request the adapter's limits, as [`Context::new`] does), and
    /// `max_storage_buffer_binding_size` bounds the largest plan (4 bytes per element).
    /// Errors with [`Error::BackendUnavailable`] when the device has too few storage slots.
    /// The caller's uncaptured-error handler is left in place.
    pub fn from_device(device: ::wgpu::Device, queue: ::wgpu::Queue) -> Result<Self> {
        Self::build(device, queue, "caller's device".into())
    }

    fn build(device: ::wgpu::Device, queue: ::wgpu::Queue, description: String) -> Result<Self> {
        let limits = device.limits();
        if limits.max_storage_buffers_per_shader_stage < STORAGE_BINDINGS_NEEDED {
            return Err(Error::BackendUnavailable {
                backend: "wgpu",
                reason: format!(
                    "the device allows {} storage buffers per shader stage, gradsift needs {}",
                    limits.max_storage_buffers_per_shader_stage, STORAGE_BINDINGS_NEEDED
                ),
            });
        }
        let lost = Arc::new(AtomicBool::new(false));
        let lost_reason = Arc::new(Mutex::new(String::new()));
        {
            let lost = lost.clone();
            let lost_reason = lost_reason.clone();
            device.set_device_lost_callback(move |reason, msg| {
                if let Ok(mut r) = lost_reason.lock() {
                    *r = format!("device lost ({reason:?}): {msg}");
                }
                lost.store(true, Ordering::SeqCst);
            });
        }
        let scope = device.push_error_scope(::wgpu::ErrorFilter::Validation);
        use Bind::*;
        let compress = make_module(
            &device,
            COMPRESS,
            &[
                &[
                    Uniform, Uniform, Read, ReadWrite, ReadWrite, ReadWrite, ReadWrite, ReadWrite,
                    ReadWrite, Read, ReadWrite, ReadWrite, ReadWrite, ReadWrite, ReadWrite,
                    ReadWrite, ReadWrite,
                ],
                &[Read],
            ],
        );
        let aggregate = make_module(
            &device,
            AGGREGATE,
            &[&[
                Uniform, Uniform, Read, Read, Read, ReadWrite, ReadWrite, Read, Read, ReadWrite,
            ]],
        );
        let stats = make_module(
            &device,
            STATS,
            &[&[
                Uniform, Uniform, Read, Read, ReadWrite, ReadWrite, ReadWrite,
            ]],
        );
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::BackendUnavailable {
                backend: "wgpu",
                reason: format!("pipeline creation failed: {e}"),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                device,
                queue,
                limits,
                compress,
                aggregate,
                stats,
                lost,
                lost_reason,
                uncaptured: Arc::new(Mutex::new(None)),
                description,
            }),
        })
    }

    /// The wgpu device (to create gradient buffers that plans can read).
    pub fn device(&self) -> &::wgpu::Device {
        &self.inner.device
    }

    /// The queue every plan of this context submits to.
    pub fn queue(&self) -> &::wgpu::Queue {
        &self.inner.queue
    }

    /// Adapter name, backend and type, for logs.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// Blocks until every submission of this device has finished (for timing; plans never
    /// need it, host reads wait for their own data).
    pub fn wait(&self) -> Result<()> {
        self.inner
            .device
            .poll(::wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| dev_err(format!("waiting for the device: {e}")))?;
        self.inner.check_alive()
    }

    /// Bytes one storage binding may span on this device (buffers above it are rejected).
    pub fn max_binding_bytes(&self) -> u64 {
        self.inner.limits.max_storage_buffer_binding_size
    }

    /// A storage buffer holding `data` (f32, f16 or bf16; 16-bit data is padded to whole
    /// 32-bit words with a zero), usable as a gradient by [`crate::Compress::step_device`].
    pub fn upload<T: crate::Element>(&self, data: &[T]) -> Result<::wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let size = (bytes.len() as u64).div_ceil(4).max(1) * 4;
        let buf = self
            .inner
            .storage_buffer("upload", size, ::wgpu::BufferUsages::empty())?;
        self.inner.write_padded(&buf, 0, bytes);
        Ok(buf)
    }
}

impl Inner {
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            let r = self
                .lost_reason
                .lock()
                .map(|r| r.clone())
                .unwrap_or_else(|_| "device lost".into());
            return Err(dev_err(r));
        }
        if let Some(e) = self.uncaptured.lock().ok().and_then(|mut s| s.take()) {
            return Err(dev_err(e));
        }
        Ok(())
    }

    /// A buffer of `size` bytes (at least 4), rejected with the limit when it exceeds what one
    /// binding may span.
    pub(crate) fn storage_buffer(
        &self,
        what: &str,
        size: u64,
        extra: ::wgpu::BufferUsages,
    ) -> Result<::wgpu::Buffer> {
        let size = size.max(4).div_ceil(4) * 4;
        let max = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        if size > max {
            return Err(dev_err(format!(
                "{what} needs {size} bytes, above this device's limit of {max} bytes per storage binding; split the gradient into smaller buckets"
            )));
        }
        self.buffer(
            what,
            size,
            ::wgpu::BufferUsages::STORAGE
                | ::wgpu::BufferUsages::COPY_DST
                | ::wgpu::BufferUsages::COPY_SRC
                | extra,
        )
    }

    pub(crate) fn buffer(
        &self,
        what: &str,
        size: u64,
        usage: ::wgpu::BufferUsages,
    ) -> Result<::wgpu::Buffer> {
        self.check_alive()?;
        let scope = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let b = self.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some(what),
            size: size.max(4).div_ceil(4) * 4,
            usage,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(dev_err(format!("allocating {what} ({size} bytes): {e}")));
        }
        Ok(b)
    }

    pub(crate) fn storage_init(&self, what: &str, words: &[u32]) -> Result<::wgpu::Buffer> {
        let b = self.storage_buffer(what, words.len() as u64 * 4, ::wgpu::BufferUsages::empty())?;
        if !words.is_empty() {
            self.queue.write_buffer(&b, 0, bytemuck::cast_slice(words));
        }
        Ok(b)
    }

    /// `write_buffer` needs whole 4-byte words; a trailing partial word is padded with zeros.
    pub(crate) fn write_padded(&self, buf: &::wgpu::Buffer, offset: u64, bytes: &[u8]) {
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(buf, offset, &bytes[..whole]);
        }
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.queue.write_buffer(buf, offset + whole as u64, &tail);
        }
    }

    /// Submits `encoder` under a validation and out-of-memory error scope, so a failure is an
    /// [`Error::Device`] instead of a panic in the uncaptured-error handler.
    pub(crate) fn submit(&self, encoder: ::wgpu::CommandEncoder) -> Result<()> {
        self.check_alive()?;
        let oom = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let val = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        self.queue.submit(Some(encoder.finish()));
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            return Err(dev_err(e.to_string()));
        }
        self.check_alive()
    }

    /// Copies `(buffer, offset, bytes)` regions back to the host in one submission and hands
    /// their concatenation (each region padded to 4 bytes) to `f`.
    pub(crate) fn read_back<R>(
        &self,
        staging: &::wgpu::Buffer,
        regions: &[(&::wgpu::Buffer, u64, u64)],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        let mut encoder = self
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor { label: None });
        let mut at = 0u64;
        for &(b, off, len) in regions {
            let len4 = len.div_ceil(4) * 4;
            if len4 > 0 {
                encoder.copy_buffer_to_buffer(b, off, staging, at, len4);
            }
            at += len4;
        }
        if at > staging.size() {
            return Err(dev_err(format!(
                "readback of {at} bytes exceeds the staging buffer ({} bytes)",
                staging.size()
            )));
        }
        self.submit(encoder)?;
        if at == 0 {
            return Ok(f(&[]));
        }
        let slice = staging.slice(0..at);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(::wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(::wgpu::PollType::wait_indefinitely())
            .map_err(|e| dev_err(format!("waiting for the device: {e}")))?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(dev_err(format!("mapping the readback buffer: {e}"))),
            Err(_) => return Err(dev_err("the readback never completed")),
        }
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| dev_err(format!("reading the readback buffer: {e:?}")))?;
            f(&view)
        };
        staging.unmap();
        self.check_alive()?;
        Ok(out)
    }

    pub(crate) fn staging(&self, bytes: u64) -> Result<::wgpu::Buffer> {
        self.buffer(
            "readback",
            bytes,
            ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
        )
    }

    pub(crate) fn uniform_align(&self) -> u64 {
        u64::from(self.limits.min_uniform_buffer_offset_alignment).max(16)
    }

    /// A bind group whose binding `i` is `resources[i]`: every module numbers its bindings
    /// from 0 in declaration order, so compress, stats and aggregate all bind this way.
    pub(crate) fn bind_group<'a>(
        &self,
        label: &str,
        layout: &::wgpu::BindGroupLayout,
        resources: impl IntoIterator<Item = ::wgpu::BindingResource<'a>>,
    ) -> ::wgpu::BindGroup {
        let entries: Vec<_> = resources
            .into_iter()
            .enumerate()
            .map(|(i, resource)| ::wgpu::BindGroupEntry {
                binding: i as u32,
                resource,
            })
            .collect();
        self.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some(label),
            layout,
            entries: &entries,
        })
    }
}

/// `size` bytes of `buffer` from `offset` (a uniform slot, or a gradient shorter than its
/// buffer), as a binding.
pub(crate) fn prefix(
    buffer: &::wgpu::Buffer,
    offset: u64,
    size: u64,
) -> ::wgpu::BindingResource<'_> {
    ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
        buffer,
        offset,
        size: std::num::NonZeroU64::new(size),
    })
}

fn make_module<P: Pass>(device: &::wgpu::Device, body: &str, groups: &[&[Bind]]) -> Module<P> {
    let name = P::FILE;
    let source = format!("{COMMON}\n{body}");
    let module = device.create_shader_module(::wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: ::wgpu::ShaderSource::Wgsl(source.into()),
    });
    let layouts: Vec<_> = groups
        .iter()
        .map(|binds| {
            let entries: Vec<_> = binds
                .iter()
                .enumerate()
                .map(|(i, b)| ::wgpu::BindGroupLayoutEntry {
                    binding: i as u32,
                    visibility: ::wgpu::ShaderStages::COMPUTE,
                    ty: ::wgpu::BindingType::Buffer {
                        ty: match b {
                            Bind::Uniform => ::wgpu::BufferBindingType::Uniform,
                            Bind::Read => ::wgpu::BufferBindingType::Storage { read_only: true },
                            Bind::ReadWrite => {
                                ::wgpu::BufferBindingType::Storage { read_only: false }
                            }
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            device.create_bind_group_layout(&::wgpu::BindGroupLayoutDescriptor {
                label: Some(name),
                entries: &entries,
            })
        })
        .collect();
    let refs: Vec<_> = layouts.iter().map(Some).collect();
    let pl = device.create_pipeline_layout(&::wgpu::PipelineLayoutDescriptor {
        label: Some(name),
        bind_group_layouts: &refs,
        immediate_size: 0,
    });
    let pipelines = P::ALL
        .iter()
        .map(|p| {
            device.create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
                label: Some(p.entry()),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(p.entry()),
                compilation_options: Default::default(),
                cache: None,
            })
        })
        .collect();
    Module {
        layouts,
        pipelines,
        passes: std::marker::PhantomData,
    }
}

/// `(x, y)` workgroup counts covering `count` workgroups within 65535 per dimension; shaders
/// flatten them back with `flat_id` and ignore the excess.
pub(crate) fn grid(count: u64) -> (u32, u32) {
    let x = count.min(65535) as u32;
    let y = if x == 0 {
        1
    } else {
        count.div_ceil(u64::from(x)) as u32
    };
    (x, y)
}

/// Little-endian u32 words of a readback (mapped memory carries no alignment guarantee for
/// the host pointer, so no cast).
pub(crate) fn words(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// f32 values of a readback.
pub(crate) fn floats(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    words(b).map(f32::from_bits)
}
