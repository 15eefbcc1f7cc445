//! Selection and the fused error-feedback step on the CPU, at n = 2^24 f32, k = 0.1% of n.
//! Compare with `python3 scripts/numpy_argpartition.py` run on the same machine.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradsift::{Compress, Config, Layout, cpu};
use std::hint::black_box;

mod common;
use common::gaussian;

fn bench(c: &mut Criterion) {
    let n = 1usize << 24;
    let k = n / 1000;
    let x = gaussian(n, 1);
    let mut g = c.benchmark_group("cpu_n2^24");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function("top_k_0.1pct", |b| {
        b.iter(|| cpu::top_r(black_box(&x), k).unwrap())
    });

    let layout = Layout::single(n).unwrap();
    let mut plan = cpu::Compressor::new(&layout, &Config::rtopk(0.01, 0.001)).unwrap();
    let mut t = 0u64;
    g.bench_function("ef_rtopk_step_r1pct_k0.1pct", |b| {
        b.iter(|| {
            t += 1;
            plan.step(black_box(&x), t).unwrap().n()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
