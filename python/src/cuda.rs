//! CUDA tensors by device pointer, on PyTorch's current stream (feature `cuda`).

use crate::{Aggregator, Compressor, Config, Payload, err, layout};
use gradsift::cuda::Context;
use gradsift::{Average, DType, Device, Layout, Mode};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// A context on `device`'s primary context (the one PyTorch uses) running on `stream`.
pub(crate) fn context(device: usize, stream: usize) -> PyResult<Context> {
    // SAFETY: the caller passes `torch.cuda.current_stream(device).cuda_stream`, a live
    // stream of that device's primary context; the Python wrapper keeps the torch stream
    // object alive as long as the plan.
    unsafe { Context::from_raw_stream(device, stream as cudarc::driver::sys::CUstream) }
        .map_err(err)
}

pub(crate) fn compressor(
    sizes: Vec<usize>,
    config: &Config,
    device: usize,
    stream: usize,
) -> PyResult<Compressor> {
    let cx = context(device, stream)?;
    let c = Device::from(cx)
        .compressor(&layout(sizes)?, &config.inner)
        .map_err(err)?;
    Ok(Compressor::wrap(c))
}

pub(crate) fn step_ptr(
    c: &Compressor,
    py: Python<'_>,
    ptr: usize,
    len: usize,
    dtype: DType,
    step: u64,
) -> PyResult<()> {
    let mut g = c.lock();
    let gradsift::Compressor::Cuda(cu) = &mut *g else {
        return Err(PyTypeError::new_err(
            "step_ptr needs a CUDA compressor (Compressor.cuda)",
        ));
    };
    // SAFETY: `ptr` is `tensor.data_ptr()` of a contiguous CUDA tensor of `len` elements of
    // `dtype` on this plan's device (the Python wrapper checks device, dtype, length and
    // contiguity), which the caller keeps alive until the stream has run the step.
    py.detach(|| unsafe { cu.step_raw(ptr as u64, len, dtype, step) })
        .map_err(err)
}

pub(crate) fn aggregator(
    l: &Layout,
    workers: usize,
    device: usize,
    stream: usize,
    mode: Mode,
    rule: Average,
) -> PyResult<(gradsift::Aggregator, Context)> {
    let cx = context(device, stream)?;
    let a = Device::from(cx.clone())
        .aggregator(l, mode, rule, workers)
        .map_err(err)?;
    Ok((a, cx))
}

pub(crate) fn aggregate_ptr(
    a: &Aggregator,
    py: Python<'_>,
    payloads: Vec<Payload>,
    out_ptr: usize,
) -> PyResult<()> {
    let ps: Vec<gradsift::Payload> = payloads.into_iter().map(|p| p.inner).collect();
    let Some(cx) = a.cx.as_ref() else {
        return Err(PyTypeError::new_err(
            "aggregate_ptr needs a CUDA aggregator (Aggregator.cuda)",
        ));
    };
    let mut g = a.lock();
    let gradsift::Aggregator::Cuda(cu) = &mut *g else {
        return Err(PyTypeError::new_err(
            "aggregate_ptr needs a CUDA aggregator (Aggregator.cuda)",
        ));
    };
    let stream = cx.stream().clone();
    let n = a.n;
    py.detach(|| {
        // SAFETY: `out_ptr` addresses `n` f32 on this device (checked by the wrapper); the
        // slice is leaked below on every path, so the tensor's memory is never freed here.
        let mut out = unsafe { stream.upgrade_device_ptr::<f32>(out_ptr as u64, n) };
        let r = gradsift::Aggregate::aggregate_device(cu, &ps, &mut out);
        let _ = out.leak();
        r
    })
    .map_err(err)
}

pub(crate) fn pack_ptr(c: &Compressor, dst: usize, cap: usize) -> PyResult<usize> {
    let g = c.lock();
    let gradsift::Compressor::Cuda(cu) = &*g else {
        return Err(PyTypeError::new_err(
            "pack_ptr needs a CUDA compressor (Compressor.cuda)",
        ));
    };
    // SAFETY: `dst` is `tensor.data_ptr()` of a uint8 CUDA tensor of at least `cap` bytes on
    // this plan's device, which the hook keeps alive for the plan's lifetime.
    unsafe { cu.pack_row(dst as u64, cap) }.map_err(err)
}

pub(crate) fn aggregate_rows_ptr(
    a: &Aggregator,
    py: Python<'_>,
    rows: usize,
    stride: usize,
    sent: usize,
    out_ptr: usize,
) -> PyResult<()> {
    let Some(cx) = a.cx.as_ref() else {
        return Err(PyTypeError::new_err(
            "aggregate_rows_ptr needs a CUDA aggregator (Aggregator.cuda)",
        ));
    };
    let mut g = a.lock();
    let gradsift::Aggregator::Cuda(cu) = &mut *g else {
        return Err(PyTypeError::new_err(
            "aggregate_rows_ptr needs a CUDA aggregator (Aggregator.cuda)",
        ));
    };
    let stream = cx.stream().clone();
    let n = a.n;
    py.detach(|| {
        // SAFETY: `out_ptr` addresses `n` f32 and `rows` K rows of `stride` bytes on this
        // device (the hook's own buffers); the slice is leaked on every path, so the
        // tensor's memory is never freed here.
        let mut out = unsafe { stream.upgrade_device_ptr::<f32>(out_ptr as u64, n) };
        let r = unsafe { cu.aggregate_rows_device(rows as u64, stride, sent, &mut out) };
        let _ = out.leak();
        r
    })
    .map_err(err)
}
