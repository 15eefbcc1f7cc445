//! The reductions of `gradsift::dist::reduce` (docs/SPEC.md §12) for the DDP hook: the same
//! Rust code that `gradsift train` runs on MPI and in process, here over a transport
//! written in Python (`torch.distributed` collectives of a process group), so that the hook
//! and the in-process simulation agree bit for bit by construction.

use super::{HostArray, Payload, err, layout, parse_average, write_out};
use gradsift::dist::reduce::{self, Reduce, SharedScratch, SparseAllReduce, Traffic};
use gradsift::dist::{InProcess, Transport};
use gradsift::{Payload as RsPayload, SparsePayload};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::ops::Range;
use std::sync::Mutex;

/// A [`Transport`] over a Python object with `rank`, `world_size`, and the collectives
/// `all_gather(bytes) -> list[bytes]`, `all_to_all(list[bytes]) -> list[bytes]` and
/// `all_reduce_sum(bytes) -> bytes` (one worker per process). A Python exception becomes `Error::Transport` and is kept, to be
/// raised as itself once the reduction returns.
struct PyTransport<'py> {
    obj: Bound<'py, PyAny>,
    rank: usize,
    workers: usize,
    raised: Option<PyErr>,
}

impl<'py> PyTransport<'py> {
    fn new(obj: Bound<'py, PyAny>) -> PyResult<Self> {
        let rank = obj.getattr("rank")?.extract()?;
        let workers: usize = obj.getattr("world_size")?.extract()?;
        if workers == 0 || rank >= workers {
            return Err(PyValueError::new_err(format!(
                "transport: rank {rank} of {workers} workers"
            )));
        }
        Ok(Self {
            obj,
            rank,
            workers,
            raised: None,
        })
    }

    /// Calls `method(arg)`, which must return `K` byte strings, into `out`.
    fn call(
        &mut self,
        method: &str,
        arg: Bound<'py, PyAny>,
        out: &mut Vec<Vec<u8>>,
    ) -> gradsift::Result<()> {
        let got = self
            .obj
            .call_method1(method, (arg,))
            .and_then(|r| r.extract::<Vec<Vec<u8>>>());
        match got {
            Ok(v) if v.len() == self.workers => {
                *out = v;
                Ok(())
            }
            Ok(v) => Err(gradsift::Error::Transport {
                transport: "python",
                reason: format!(
                    "{method} returned {} pieces for {} workers",
                    v.len(),
                    self.workers
                ),
            }),
            Err(e) => Err(self.raised(e, method)),
        }
    }

    /// Keeps a Python exception to raise as itself once the reduction returns.
    fn raised(&mut self, e: PyErr, method: &str) -> gradsift::Error {
        let reason = format!("{method}: {e}");
        self.raised = Some(e);
        gradsift::Error::Transport {
            transport: "python",
            reason,
        }
    }
}

impl Transport for PyTransport<'_> {
    fn name(&self) -> &'static str {
        "python"
    }
    fn workers(&self) -> usize {
        self.workers
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn local(&self) -> Range<usize> {
        self.rank..self.rank + 1
    }
    fn all_gather(&mut self, local: &[&[u8]], out: &mut Vec<Vec<u8>>) -> gradsift::Result<()> {
        let [mine] = local else {
            return Err(gradsift::Error::LengthMismatch {
                what: "all-gather buffers (one per local worker)",
                expected: 1,
                got: local.len(),
            });
        };
        let arg = PyBytes::new(self.obj.py(), mine).into_any();
        self.call("all_gather", arg, out)
    }
    fn all_to_all(&mut self, send: &[&[u8]], out: &mut Vec<Vec<u8>>) -> gradsift::Result<()> {
        if send.len() != self.workers {
            return Err(gradsift::Error::LengthMismatch {
                what: "all-to-all pieces (K per local worker)",
                expected: self.workers,
                got: send.len(),
            });
        }
        let py = self.obj.py();
        let pieces: Vec<Bound<'_, PyBytes>> = send.iter().map(|s| PyBytes::new(py, s)).collect();
        let arg = match pieces.into_pyobject(py) {
            Ok(list) => list.into_any(),
            Err(e) => {
                return Err(gradsift::Error::Transport {
                    transport: "python",
                    reason: e.to_string(),
                });
            }
        };
        self.call("all_to_all", arg, out)
    }
    /// `all_reduce_sum(bytes) -> bytes`: little-endian u32 words in and out.
    fn all_reduce_sum(&mut self, local: &[&[u32]], out: &mut [u32]) -> gradsift::Result<()> {
        let mine = match local {
            [mine] if mine.len() == out.len() => *mine,
            _ => {
                return Err(gradsift::Error::LengthMismatch {
                    what: "all-reduce inputs (one of the output's length)",
                    expected: out.len(),
                    got: local.first().map_or(0, |l| l.len()),
                });
            }
        };
        let bytes: Vec<u8> = mine.iter().flat_map(|w| w.to_le_bytes()).collect();
        let arg = PyBytes::new(self.obj.py(), &bytes).into_any();
        let got = self
            .obj
            .call_method1("all_reduce_sum", (arg,))
            .and_then(|r| r.extract::<Vec<u8>>());
        match got {
            Ok(v) if v.len() == bytes.len() => {
                for (o, c) in out.iter_mut().zip(v.chunks_exact(4)) {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                Ok(())
            }
            Ok(v) => Err(gradsift::Error::Transport {
                transport: "python",
                reason: format!(
                    "all_reduce_sum returned {} bytes for {}",
                    v.len(),
                    bytes.len()
                ),
            }),
            Err(e) => Err(self.raised(e, "all_reduce_sum")),
        }
    }
    fn broadcast(&mut self, _buf: &mut Vec<u8>) -> gradsift::Result<()> {
        Err(unused("broadcast"))
    }
    fn barrier(&mut self) -> gradsift::Result<()> {
        Err(unused("barrier"))
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

fn unused(what: &str) -> gradsift::Error {
    gradsift::Error::Transport {
        transport: "python",
        reason: format!("{what} is not part of the hook's reductions"),
    }
}

/// A writable C-contiguous host array of 4-byte integers (int32 or uint32), read in place.
struct IndexArray {
    buf: pyo3::buffer::PyUntypedBuffer,
    len: usize,
}

impl IndexArray {
    fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let buf = pyo3::buffer::PyUntypedBuffer::get(obj).map_err(|e| {
            PyTypeError::new_err(format!(
                "indices: expected an array with the buffer protocol: {e}"
            ))
        })?;
        let fmt = buf.format().to_bytes();
        let code = match fmt {
            [b'@' | b'=' | b'<', c] | [c] => *c,
            _ => 0,
        };
        if !matches!(code, b'i' | b'I' | b'l' | b'L') || buf.item_size() != 4 {
            return Err(PyTypeError::new_err(format!(
                "indices: expected an int32 array, got format {:?} ({} bytes)",
                String::from_utf8_lossy(fmt),
                buf.item_size()
            )));
        }
        if !buf.is_c_contiguous() || buf.readonly() || (buf.buf_ptr() as usize) % 4 != 0 {
            return Err(PyValueError::new_err(
                "indices: the array must be writable, C-contiguous and aligned",
            ));
        }
        let len = buf.item_count();
        Ok(Self { buf, len })
    }

    fn addr(&self) -> usize {
        self.buf.buf_ptr() as usize
    }
}

/// What `Reducer` keeps between steps.
struct State {
    kind: Reduce,
    sparse: Option<SparseAllReduce>,
    shared: SharedScratch,
    traffic: Traffic,
    update: Vec<f32>,
    refunds: Vec<SparsePayload>,
}

/// A reduction of docs/SPEC.md §12 planned for one bucket layout and configuration:
/// `kind` 'sparse' (the sparse all-reduce of top-k / rTop-k / random-k payloads, the global
/// top-k of the aggregate, error feedback by refunds) or 'shared-randomk' (random-k drawn
/// with one key by every worker, its k values summed by an all-reduce in worker order).
/// `threshold_every`: the sparse all-reduce recomputes its threshold exactly every this
/// many steps (1: every step) and reuses it in between. Build a new one when the
/// configuration changes (DGC's warm-up changes k).
#[pyclass(module = "gradsift._gradsift")]
pub struct Reducer {
    state: Mutex<State>,
    n: usize,
    workers: usize,
    max_entries: usize,
}

/// What one reduction hands its caller: the state (holding the dense update), the local
/// payloads, the refunds and the bytes sent and received.
type Reduced<'a, 'p> = (
    std::sync::MutexGuard<'a, State>,
    Vec<&'p SparsePayload>,
    Vec<Payload>,
    u64,
    u64,
);

impl Reducer {
    /// The reduction both outputs share; on error nothing the caller sees has changed.
    fn run<'a, 'p>(
        &'a self,
        payloads: &'p [Payload],
        step: u64,
        transport: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Reduced<'a, 'p>> {
        let views = payloads
            .iter()
            .map(|p| match &p.inner {
                RsPayload::Sparse(s) => Ok(s),
                RsPayload::Sign(_) | RsPayload::Qsgd(_) => Err(PyTypeError::new_err(
                    "a Reducer takes sparse payloads (top-k, random-k, rTop-k)",
                )),
            })
            .collect::<PyResult<Vec<&SparsePayload>>>()?;
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *g;
        s.traffic.clear();
        let mut py_t = transport.map(PyTransport::new).transpose()?;
        if let Some(p) = &py_t
            && p.workers != self.workers
        {
            return Err(PyValueError::new_err(format!(
                "the transport has {} workers, the Reducer {}",
                p.workers, self.workers
            )));
        }
        let mut in_process = InProcess::new(self.workers);
        let t: &mut dyn Transport = match py_t.as_mut() {
            Some(p) => p,
            None => &mut in_process,
        };
        let r = match s.kind {
            Reduce::SharedRandomK => {
                s.refunds.clear();
                reduce::shared_randomk(t, &views, &mut s.update, &mut s.traffic, &mut s.shared)
            }
            _ => s.sparse.as_mut().expect("planned in new").reduce(
                t,
                &views,
                step,
                &mut s.update,
                &mut s.refunds,
                &mut s.traffic,
            ),
        };
        if let Err(e) = r {
            // the Python exception a collective raised, as itself
            let raised = py_t.as_mut().and_then(|p| p.raised.take());
            return Err(raised.unwrap_or_else(|| err(e)));
        }
        let sent: u64 = match (&s.kind, &s.sparse) {
            (Reduce::Sparse, Some(plan)) => plan.scattered().iter().sum(),
            // the k values (f32) in K pieces, each with its 8-byte index hash (SPEC §12)
            _ => views
                .iter()
                .map(|p| 4 * p.values.len() as u64 + 8 * self.workers as u64)
                .sum(),
        };
        let refunds = s
            .refunds
            .iter()
            .map(|p| Payload {
                inner: RsPayload::Sparse(p.clone()),
            })
            .collect();
        let received = s.traffic.total();
        Ok((g, views, refunds, sent, received))
    }
}

#[pymethods]
impl Reducer {
    #[new]
    #[pyo3(signature = (sizes, config, workers, kind, average="workers", threshold_every=1))]
    fn new(
        sizes: Vec<usize>,
        config: &super::Config,
        workers: usize,
        kind: &str,
        average: &str,
        threshold_every: u64,
    ) -> PyResult<Self> {
        let l = layout(sizes)?;
        let kind: Reduce = kind.parse().map_err(err)?;
        let cfg = &config.inner;
        if workers == 0 {
            return Err(PyValueError::new_err("a reduction needs workers >= 1"));
        }
        let sparse = match kind {
            Reduce::Sparse => Some(
                SparseAllReduce::new(&l, cfg, parse_average(average)?, workers, threshold_every)
                    .map_err(err)?,
            ),
            Reduce::SharedRandomK if !matches!(cfg.method, gradsift::Method::RandomK { .. }) => {
                return Err(PyValueError::new_err(format!(
                    "shared-randomk needs method 'randomk', got '{}'",
                    config.method()
                )));
            }
            Reduce::SharedRandomK => None,
            Reduce::AllGather => {
                return Err(PyValueError::new_err(
                    "kind 'allgather' is the Aggregator's: a Reducer is 'sparse' or 'shared-randomk'",
                ));
            }
        };
        let per_worker: usize = cfg.plan_groups(&l).map_err(err)?.iter().map(|g| g.k).sum();
        Ok(Self {
            state: Mutex::new(State {
                kind,
                sparse,
                shared: SharedScratch::default(),
                traffic: Traffic::default(),
                update: vec![0.0; l.n()],
                refunds: Vec::new(),
            }),
            n: l.n(),
            workers,
            max_entries: per_worker.saturating_mul(workers).min(l.n()),
        })
    }

    /// One step's reduction of `payloads` into the writable host array `out` (length n;
    /// float32, float16, or bfloat16 as an int16 view with `dtype='bfloat16'`; 16-bit
    /// outputs are the f32 update rounded to nearest even). With `transport` (an object
    /// with `rank`, `world_size`, `all_gather(bytes)` and `all_to_all(list[bytes])`),
    /// `payloads` is this process's one worker's; without it, all `workers` payloads in
    /// worker order (the in-process simulation). Returns `(refunds, sent, received)`: one
    /// sparse payload per local worker to give back to its compressor (`Compressor.refund`;
    /// empty for shared-randomk), the bytes the local workers sent (their pieces with
    /// headers, their own region's included) and the bytes they received from others.
    /// `step` only names the step in error messages. On error `out` is untouched.
    #[pyo3(signature = (payloads, step, out, dtype=None, transport=None))]
    fn reduce(
        &self,
        payloads: Vec<Payload>,
        step: u64,
        out: &Bound<'_, PyAny>,
        dtype: Option<&str>,
        transport: Option<Bound<'_, PyAny>>,
    ) -> PyResult<(Vec<Payload>, u64, u64)> {
        let o = HostArray::get(out, dtype, true)?;
        if o.len != self.n {
            return Err(PyValueError::new_err(format!(
                "output: expected {} elements, got {}",
                self.n, o.len
            )));
        }
        let (s, _, refunds, sent, received) = self.run(&payloads, step, transport)?;
        write_out(&o, &s.update)?;
        Ok((refunds, sent, received))
    }

    /// As `reduce`, with the update written as entries instead of n values: its indices,
    /// ascending, into the writable int32 array `indices` and its f32 values into the
    /// float32 array `values` (the update is these and 0 elsewhere: the global selection
    /// for 'sparse', the shared indices for 'shared-randomk'). What the hook's CUDA buckets
    /// upload and scatter, so that only about k entries cross to the device. Both arrays
    /// need `max_entries` elements. Returns `(count, refunds, sent, received)`. On error
    /// nothing is written.
    #[pyo3(signature = (payloads, step, indices, values, transport=None))]
    fn reduce_entries(
        &self,
        payloads: Vec<Payload>,
        step: u64,
        indices: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        transport: Option<Bound<'_, PyAny>>,
    ) -> PyResult<(usize, Vec<Payload>, u64, u64)> {
        let idx = IndexArray::get(indices)?;
        let val = HostArray::get(values, None, true)?;
        if val.dtype != gradsift::DType::F32 {
            return Err(PyTypeError::new_err("values: expected a float32 array"));
        }
        if idx.len < self.max_entries || val.len < self.max_entries {
            return Err(PyValueError::new_err(format!(
                "indices and values need max_entries = {} elements, got {} and {}",
                self.max_entries, idx.len, val.len
            )));
        }
        let (s, views, refunds, sent, received) = self.run(&payloads, step, transport)?;
        // SAFETY: writable, C-contiguous, aligned arrays of at least `max_entries` 4-byte
        // elements (checked above), acquired for the call.
        let (oi, ov) = unsafe {
            (
                std::slice::from_raw_parts_mut(idx.addr() as *mut u32, idx.len),
                std::slice::from_raw_parts_mut(val.addr() as *mut f32, val.len),
            )
        };
        let mut count = 0;
        let mut put = |(i, v): (u32, f32)| {
            oi[count] = i;
            ov[count] = v;
            count += 1;
        };
        match (&s.kind, &s.sparse) {
            (Reduce::Sparse, Some(plan)) => plan.selection().for_each(&mut put),
            // every worker sent the same indices (checked by the reduction's hashes)
            _ => views[0]
                .indices
                .iter()
                .for_each(|&i| put((i, s.update[i as usize]))),
        }
        Ok((count, refunds, sent, received))
    }

    /// The most entries `reduce_entries` writes: `min(n, workers * k)` (the union of the
    /// workers' payloads bounds the sparse selection, also under a reused threshold).
    #[getter]
    fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Elements of the layout.
    #[getter]
    fn n(&self) -> usize {
        self.n
    }

    /// `K`.
    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }

    /// 'sparse' or 'shared-randomk'.
    #[getter]
    fn kind(&self) -> &'static str {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .kind
            .name()
    }
}
