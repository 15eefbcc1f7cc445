//! Validates every shader in `shaders/` with naga (filled in by the wgpu backend).

pub fn run() {}
