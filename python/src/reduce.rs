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
/// `all_gather(bytes) -> list[bytes]` and `all_to_all(list[bytes]) -> list[bytes]` (one
/// worker per process). A Python exception becomes `Error::Transport` and is kept, to be
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
            Err(e) => {
                let reason = format!("{method}: {e}");
                self.raised = Some(e);
                Err(gradsift::Error::Transport {
                    transport: "python",
                    reason,
                })
            }
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
        let views = payloads
            .iter()
            .map(|p| match &p.inner {
                RsPayload::Sparse(s) => Ok(s),
                RsPayload::Sign(_) => Err(PyTypeError::new_err(
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
        write_out(&o, &s.update)?;
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
        Ok((refunds, sent, s.traffic.total()))
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
