//! The CPU backend at n = 2^24 f32 (k = 0.1% of n), on 1 thread and on all threads (rayon's
//! global pool: one per core, or `RAYON_NUM_THREADS`): the read-once floor (one vectorised
//! pass over the 64 MiB, nothing written), the top-k selection alone (a reused
//! `cpu::Selector`), and full error-feedback steps (accumulate + select + values + commit;
//! for scaled sign and QSGD, accumulate + encode + commit).
//! After criterion's report it prints each median and the ratios the README cites: selection
//! over the floor at the same thread count, and the speed-up of all threads over one.
//! Compare with `python3 scripts/numpy_argpartition.py` run on the same machine.

use criterion::{Criterion, Throughput};
use gradsift::{Compress, Config, Layout, cpu};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;
use common::gaussian;

/// Per bench id: every sample's time per iteration.
static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// The read-once floor: the OR of every element's magnitude bits (vectorises; reads each
/// byte once, writes nothing), chunked across the current pool like the backend's passes.
fn read_once(x: &[f32]) -> u32 {
    let fold = |c: &[f32]| c.iter().fold(0u32, |a, v| a | (v.to_bits() & 0x7FFF_FFFF));
    let threads = rayon::current_num_threads();
    if threads == 1 {
        return fold(x);
    }
    x.par_chunks(x.len().div_ceil(4 * threads))
        .map(fold)
        .reduce(|| 0, |a, b| a | b)
}

fn bench(c: &mut Criterion) {
    let n = 1usize << 24;
    let k = n / 1000;
    let x = gaussian(n, 1);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let all = rayon::current_num_threads();
    let mut g = c.benchmark_group("cpu_n2^24");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes((n * 4) as u64));

    // Times `f` in the 1-thread pool or the global one, recording per-iteration times.
    let mut run = |name: &str, f: &mut (dyn FnMut() + Send)| {
        for (threads, label) in [(1, "1thread".to_string()), (all, format!("{all}threads"))] {
            let id = format!("{name}/{label}");
            g.bench_function(&id, |b| {
                b.iter_custom(|iters| {
                    let mut time = || {
                        let t = Instant::now();
                        for _ in 0..iters {
                            f();
                        }
                        t.elapsed()
                    };
                    let d = if threads == 1 {
                        one.install(time)
                    } else {
                        time()
                    };
                    let per = d.as_secs_f64() / iters as f64;
                    SAMPLES
                        .lock()
                        .unwrap()
                        .entry(id.clone())
                        .or_default()
                        .push(per);
                    d
                })
            });
        }
    };

    run("read_floor", &mut || {
        black_box(read_once(black_box(&x)));
    });
    let mut sel = cpu::Selector::with_capacity(n);
    let mut out = Vec::with_capacity(k);
    run("top_k_0.1pct", &mut || {
        out.clear();
        sel.select_top_magnitude(black_box(&x), 0..n, k, &mut out);
    });
    let layout = Layout::single(n).unwrap();
    for (name, config) in [
        ("ef_topk_step_k0.1pct", Config::topk(0.001)),
        ("ef_rtopk_step_r1pct_k0.1pct", Config::rtopk(0.01, 0.001)),
        // The dense codecs: a scale per group, then every element's sign or level.
        ("ef_sign_step", Config::sign()),
        ("ef_qsgd_s3_step", Config::qsgd(3)),
    ] {
        let mut plan = cpu::Compressor::new(&layout, &config).unwrap();
        let mut t = 0u64;
        run(name, &mut || {
            t += 1;
            black_box(plan.step(black_box(&x), t).unwrap().n());
        });
    }
    g.finish();
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report() {
    let samples = SAMPLES.lock().unwrap();
    let all = rayon::current_num_threads();
    let med = |name: &str, threads: usize| {
        let label = if threads == 1 {
            "1thread".to_string()
        } else {
            format!("{threads}threads")
        };
        samples
            .get(&format!("{name}/{label}"))
            .map(|v| median(v) * 1e3)
    };
    println!("\nmedians (ms per call) at n = 2^24, 1 thread and {all} threads:");
    let floor = [med("read_floor", 1), med("read_floor", all)];
    for name in [
        "read_floor",
        "top_k_0.1pct",
        "ef_topk_step_k0.1pct",
        "ef_rtopk_step_r1pct_k0.1pct",
        "ef_sign_step",
        "ef_qsgd_s3_step",
    ] {
        let (Some(a), Some(b)) = (med(name, 1), med(name, all)) else {
            continue;
        };
        let over = |t: f64, f: Option<f64>| f.map_or(String::new(), |f| format!("{:.2}x", t / f));
        println!(
            "{name:30} 1 thread {a:8.2} ({} floor)   {all} threads {b:8.2} ({} floor)   speed-up {:.2}x",
            over(a, floor[0]),
            over(b, floor[1]),
            a / b
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    report();
}
