//! The one place the CLI opens a backend: `--backend cpu|cuda|wgpu|auto` for every command.

use gradsift::{Backend, Device};

/// Opens `backend` and returns it with what the user should be told: each backend that
/// `auto` passed over and why, and where the gradients come from (the embedded models run
/// on candle's CPU device, so a GPU backend receives each worker's gradient as one upload
/// per step).
///
/// # Errors
/// [`gradsift::Error::BackendUnavailable`] when an explicitly named backend cannot run here.
pub fn open(backend: Backend) -> gradsift::Result<(Device, Vec<String>)> {
    let device = Device::open(backend)?;
    let mut notes: Vec<String> = device
        .skipped()
        .iter()
        .map(|s| format!("backend auto: skipped {}: {}", s.backend, s.reason))
        .collect();
    if device.backend() != Backend::Cpu {
        notes.push(format!(
            "compression on {}; the model computes its gradients on the CPU, so each worker's gradient is uploaded once per step",
            device.description()
        ));
    }
    Ok((device, notes))
}
