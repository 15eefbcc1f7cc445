//! CUDA benchmarks (timed with CUDA events on the plan's stream, so launch gaps count but
//! host synchronisation does not):
//! - `copy`: device-to-device copy of 2^26 f32, the bandwidth reference (8 bytes/element).
//! - `ef_rtopk_step`: the fused error-feedback rTop-k step at n = 2^26 f32, r = 1%,
//!   k = 0.1%; its floor is 12 bytes/element (read g and e, write e), the throughput shown.
//! - `top_k`: top-k alone at n = 2^26, k = 0.1%; compare with `python3 scripts/torch_topk.py`.
//! - `layer_stats`: per-layer statistics (4 bytes/element read), one layer and 1000 layers.
//!
//! - Issue 17, one choice each (compare the pairs):
//!   - `ef_topk_step_fused_hist` / `ef_topk_step_unfused_hist`: the first radix histogram
//!     (warp-aggregated) fused into `ef_accumulate`, or a separate `sel_pass`;
//!   - `top_r_1pct` / `top_r_30pct`: `compact_emit` (lane per bit) at small and large r;
//!   - `ef_topk_per_layer_200_block_max_2^12..2^20`: the one-block cut-off on a 200-layer
//!     mix (the launch count of each is printed: `launches per step`);
//!   - `aggregate_8_workers_1pct`: pinned staging, one wait per call.
//!
//! Without a CUDA device it prints why and measures nothing.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradsift::{Compress, Config, Layout, Mode, Statistics, cuda};
use std::time::Duration;

mod common;
use common::gaussian;

/// GPU time of `iters` runs of `f`, between two events on the context's stream.
fn gpu_time(cx: &cuda::Context, iters: u64, mut f: impl FnMut()) -> Duration {
    let stream = cx.stream();
    let start = cx.cuda_context().new_event(None).unwrap();
    let end = cx.cuda_context().new_event(None).unwrap();
    start.record(stream).unwrap();
    for _ in 0..iters {
        f();
    }
    end.record(stream).unwrap();
    end.synchronize().unwrap();
    Duration::from_secs_f64(f64::from(start.elapsed_ms(&end).unwrap()) / 1e3)
}

fn bench(c: &mut Criterion) {
    let cx = match cuda::Context::new(0) {
        Ok(cx) => cx,
        Err(e) => {
            println!("SKIPPED: no CUDA device ({e})");
            return;
        }
    };
    println!("CUDA context: {cx:?}");
    let n = 1usize << 26;
    let host = gaussian(n, 1);
    let x = cx.stream().clone_htod(&host).unwrap();
    let mut g = c.benchmark_group("cuda_n2^26");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(5));

    let mut y = cx.stream().alloc_zeros::<f32>(n).unwrap();
    g.throughput(Throughput::Bytes((n * 8) as u64));
    g.bench_function("copy_f32", |b| {
        b.iter_custom(|iters| gpu_time(&cx, iters, || cx.stream().memcpy_dtod(&x, &mut y).unwrap()))
    });

    let layout = Layout::single(n).unwrap();
    let mut plan = cuda::Compressor::new(&cx, &layout, &Config::rtopk(0.01, 0.001)).unwrap();
    let mut t = 0u64;
    g.throughput(Throughput::Bytes((n * 12) as u64));
    g.bench_function("ef_rtopk_step_r1pct_k0.1pct", |b| {
        b.iter_custom(|iters| {
            gpu_time(&cx, iters, || {
                t += 1;
                plan.step_device(&x, t).unwrap();
            })
        })
    });
    plan.check().unwrap();

    let mut topk = cuda::Compressor::new(&cx, &layout, &Config::topk(0.001)).unwrap();
    g.bench_function("ef_topk_step_k0.1pct", |b| {
        b.iter_custom(|iters| {
            gpu_time(&cx, iters, || {
                t += 1;
                topk.step_device(&x, t).unwrap();
            })
        })
    });

    let mut sel = cuda::TopR::new(&cx, n, n / 1000).unwrap();
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function("top_k_0.1pct", |b| {
        b.iter_custom(|iters| gpu_time(&cx, iters, || sel.select(&x).unwrap()))
    });

    let mut out = Vec::new();
    let mut stats = cuda::Stats::new(&cx, &layout, 0).unwrap();
    g.bench_function("layer_stats_1_layer", |b| {
        b.iter_custom(|iters| {
            gpu_time(&cx, iters, || {
                stats.layer_stats_device(&x, &mut out).unwrap()
            })
        })
    });
    // 1000 layers: a few large, many small (sizes sum to n).
    let mut sizes: Vec<usize> = (0..996).map(|i| 1000 + (i * 37) % 9000).collect();
    let rest = n - sizes.iter().sum::<usize>();
    sizes.extend([rest / 4, rest / 4, rest / 4, rest - 3 * (rest / 4)]);
    let layers = Layout::new(&sizes).unwrap();
    let mut stats_l = cuda::Stats::new(&cx, &layers, 0).unwrap();
    g.bench_function("layer_stats_1000_layers", |b| {
        b.iter_custom(|iters| {
            gpu_time(&cx, iters, || {
                stats_l.layer_stats_device(&x, &mut out).unwrap()
            })
        })
    });

    let mut config = Config::rtopk(0.01, 0.001);
    config.mode = Mode::PerLayer;
    let mut per_layer = cuda::Compressor::new(&cx, &layers, &config).unwrap();
    g.throughput(Throughput::Bytes((n * 12) as u64));
    g.bench_function("ef_rtopk_step_per_layer_1000", |b| {
        b.iter_custom(|iters| {
            gpu_time(&cx, iters, || {
                t += 1;
                per_layer.step_device(&x, t).unwrap();
            })
        })
    });

    // ---- Issue 17: each choice isolated ------------------------------------------------
    g.throughput(Throughput::Bytes((n * 12) as u64));
    for fuse in [true, false] {
        let tuning = cuda::Tuning {
            fuse_histogram: fuse,
            ..Default::default()
        };
        let mut plan =
            cuda::Compressor::with_tuning(&cx, &layout, &Config::topk(0.01), &tuning).unwrap();
        let name = if fuse {
            "ef_topk_step_fused_hist"
        } else {
            "ef_topk_step_unfused_hist"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                gpu_time(&cx, iters, || {
                    t += 1;
                    plan.step_device(&x, t).unwrap();
                })
            })
        });
        println!("{name}: {} launches per step", plan.launches_last_step());
    }

    g.throughput(Throughput::Bytes((n * 4) as u64));
    for (name, r) in [("top_r_1pct", n / 100), ("top_r_30pct", n / 10 * 3)] {
        let mut sel = cuda::TopR::new(&cx, n, r).unwrap();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| gpu_time(&cx, iters, || sel.select(&x).unwrap()))
        });
    }

    // 200 layers from 4K to 1M elements (a transformer-like mix, 61M elements in all),
    // top-k 1% per layer.
    let mix: Vec<usize> = (0..200)
        .map(|i| {
            [
                1 << 12,
                (1 << 16) + 1,
                1 << 17,
                (1 << 18) + 4096,
                (1 << 20) + 5,
            ][i % 5]
        })
        .collect();
    let mix_n: usize = mix.iter().sum();
    let mix_layout = Layout::new(&mix).unwrap();
    let xm = cx.stream().clone_htod(&host[..mix_n]).unwrap();
    let mut config = Config::topk(0.01);
    config.mode = Mode::PerLayer;
    g.throughput(Throughput::Bytes((mix_n * 12) as u64));
    for bits in [12u32, 14, 16, 18, 20] {
        let tuning = cuda::Tuning {
            block_max_per_layer: 1 << bits,
            ..Default::default()
        };
        let mut plan = cuda::Compressor::with_tuning(&cx, &mix_layout, &config, &tuning).unwrap();
        let name = format!("ef_topk_per_layer_200_block_max_2^{bits}");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                gpu_time(&cx, iters, || {
                    t += 1;
                    plan.step_device(&xm, t).unwrap();
                })
            })
        });
        println!("{name}: {} launches per step", plan.launches_last_step());
    }

    // Aggregation of 8 workers' 1% payloads from host memory: wall time (it waits by design).
    let workers = 8;
    let mut payloads = Vec::new();
    for w in 0..workers {
        let mut c =
            cuda::Compressor::new(&cx, &layout, &Config::topk(0.01).with_worker(w)).unwrap();
        c.step_device(&x, 1).unwrap();
        payloads.push(c.payload().unwrap().clone());
    }
    let mut agg = cuda::Aggregator::new(
        &cx,
        &layout,
        Mode::Global,
        gradsift::cpu::Average::OverWorkers,
        workers as usize,
    )
    .unwrap();
    let mut out_host = vec![0.0f32; n];
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("aggregate_8_workers_1pct", |b| {
        b.iter(|| agg.aggregate(&payloads, &mut out_host).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
