//! The wgpu backend at n = 2^20 and 2^26 f32: the fused error-feedback rTop-k step (r = 1%,
//! k = 0.1%), top-k, scaled sign. Throughput is reported against 12 bytes per element, the
//! bandwidth floor of the step (read g, read e, write e), so criterion's GB/s divided by the
//! device's memory bandwidth is the fraction of the floor reached.
//!
//! Timings on lavapipe (CI's software driver) say nothing about GPUs; run on real hardware.
//! Sizes the device cannot bind are reported and skipped, not shrunk.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradsift::{Compress, Config, Layout, wgpu};

mod common;
use common::gaussian;

fn bench(c: &mut Criterion) {
    let ctx = match wgpu::Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("SKIPPED: no wgpu adapter ({e})");
            return;
        }
    };
    eprintln!("wgpu adapter: {}", ctx.description());
    let sizes: Vec<usize> = match std::env::var("GRADSIFT_BENCH_LOG2N") {
        Ok(v) => v
            .split(',')
            .filter_map(|s| s.trim().parse::<u32>().ok())
            .map(|l| 1usize << l)
            .collect(),
        Err(_) => vec![1 << 20, 1 << 26],
    };
    for n in sizes {
        let layout = Layout::single(n).unwrap();
        let x = gaussian(n, 1);
        let grad = match ctx.upload(&x) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIPPED n = {n}: {e}");
                continue;
            }
        };
        let mut g = c.benchmark_group(format!("wgpu_n{n}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(12 * n as u64));
        for (name, cfg) in [
            ("ef_rtopk_step_r1pct_k0.1pct", Config::rtopk(0.01, 0.001)),
            ("ef_topk_step_0.1pct", Config::topk(0.001)),
            ("ef_sign_step", Config::sign()),
        ] {
            let mut plan = match wgpu::Compressor::new(&ctx, &layout, &cfg) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("SKIPPED {name} n = {n}: {e}");
                    continue;
                }
            };
            let mut t = 0u64;
            g.bench_function(name, |b| {
                b.iter(|| {
                    t += 1;
                    plan.step_device::<f32>(&grad, t).unwrap();
                    // Wait for the device so the sample measures the work, not the recording.
                    ctx.wait().unwrap();
                })
            });
        }
        g.finish();
    }

    // Per-layer mode over 5,000 mixed layers (empty to 200k elements) against one global
    // selection over the same n: the cost per step should stay close.
    let mut s = 7u64;
    let sizes: Vec<usize> = (0..5000)
        .map(|l| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if l % 1000 == 0 {
                200_000
            } else {
                (s >> 33) as usize % 200
            }
        })
        .collect();
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let x = gaussian(n, 2);
    let Ok(grad) = ctx.upload(&x) else { return };
    let mut g = c.benchmark_group(format!("wgpu_5000_layers_n{n}"));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(12 * n as u64));
    for mode in [gradsift::Mode::Global, gradsift::Mode::PerLayer] {
        let mut cfg = Config::rtopk(0.01, 0.001);
        cfg.mode = mode;
        let mut plan = wgpu::Compressor::new(&ctx, &layout, &cfg).unwrap();
        let mut t = 0u64;
        g.bench_function(format!("ef_rtopk_{mode:?}"), |b| {
            b.iter(|| {
                t += 1;
                plan.step_device::<f32>(&grad, t).unwrap();
                ctx.wait().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
