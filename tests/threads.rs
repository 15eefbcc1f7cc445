//! The threaded CPU backend (src/cpu/par.rs): every step, selection, aggregation and
//! statistic run inside rayon pools of 1, 2 and 7 threads gives the same bits. A 1-thread pool
//! is the unthreaded path (every pass stays on the calling thread there), so it is the
//! reference the others must match; the selections are also checked against the SPEC's naive
//! sort (tests/common) on tie-heavy data, where a chunk-boundary bug would reorder ties.

mod common;

use common::{ALL_DATA, Data, Rng, make_data, ref_random_k, ref_top_r, ref_top_r_range};
use gradsift::{
    Aggregate, Average, Compress, Config, DType, Element, Layout, Method, Mode, Payload, Scale,
    bf16, cpu, f16,
};
use rayon::{ThreadPool, ThreadPoolBuilder};

const THREADS: [usize; 3] = [1, 2, 7];

fn pools() -> Vec<(usize, ThreadPool)> {
    THREADS
        .iter()
        .map(|&t| (t, ThreadPoolBuilder::new().num_threads(t).build().unwrap()))
        .collect()
}

/// Runs `f` in every pool; asserts every result equals the 1-thread one and returns it.
fn same_in_every_pool<R, F>(what: &str, f: F) -> R
where
    R: PartialEq + std::fmt::Debug + Send,
    F: Fn() -> R + Sync,
{
    let mut first: Option<R> = None;
    for (t, pool) in pools() {
        let got = pool.install(&f);
        match &first {
            None => first = Some(got),
            Some(want) => assert!(got == *want, "{what}: {t} threads differ from 1 thread"),
        }
    }
    first.unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Payloads, residual and momentum (as bits) of `steps` steps of a fresh plan.
type Run = (Vec<Payload>, Vec<u32>, Vec<u32>);

fn run_steps<T: Element>(layout: &Layout, config: &Config, grads: &[Vec<T>]) -> Run {
    let mut plan = cpu::Compressor::new(layout, config).unwrap();
    let payloads = grads
        .iter()
        .enumerate()
        .map(|(t, g)| plan.step(g, t as u64).unwrap().clone())
        .collect();
    (
        payloads,
        bits(plan.residual_slice()),
        bits(plan.momentum_slice()),
    )
}

fn configs() -> Vec<(&'static str, Config)> {
    let mut out = vec![
        ("topk 1%", Config::topk(0.01)),
        ("topk 30% (radix path)", Config::topk(0.3)),
        ("rtopk 5%/1%", Config::rtopk(0.05, 0.01)),
        ("randomk 1%", Config::randomk(0.01)),
        ("sign", Config::sign()),
        ("qsgd s=7", Config::qsgd(7)),
        (
            "qsgd s=3 without error feedback",
            Config::new(Method::Qsgd {
                levels: 3,
                error_feedback: false,
            }),
        ),
    ];
    let mut c = Config::rtopk(0.04, 0.01);
    c.momentum = 0.9;
    c.scale = Scale::Unbiased;
    c.values = DType::BF16;
    c.seed = 7;
    out.push(("rtopk momentum unbiased bf16", c));
    let mut c = Config::topk(0.02);
    c.momentum = 0.5;
    c.values = DType::F16;
    out.push(("topk momentum f16 values", c));
    out
}

/// Gradients of `n` elements for three steps: Gaussian, then the tie-heavy kinds.
fn grads(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    [Data::Gauss, Data::FewLevels, Data::Plateau]
        .iter()
        .map(|&d| make_data(d, n, &mut rng))
        .collect()
}

fn steps_match_in_every_pool<T: Element>(layout: &Layout, grads: &[Vec<T>]) {
    for (name, config) in configs() {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut config = config.clone();
            config.mode = mode;
            same_in_every_pool(&format!("{name} {mode:?} {:?}", T::DTYPE), || {
                run_steps(layout, &config, grads)
            });
        }
    }
}

#[test]
fn compress_steps_are_bit_identical_at_1_2_and_7_threads() {
    // Global groups above the cut-off; per layer two big odd-sized layers and small ones.
    let layout = Layout::new(&[(1 << 19) + 7, 3, (1 << 18) + 1001, 4096, 77_777]).unwrap();
    assert!(layout.n() > 2 * cpu::PAR_MIN);
    let g = grads(layout.n(), 1);
    steps_match_in_every_pool(&layout, &g);
    let h: Vec<Vec<f16>> = g.iter().map(|g| common::to_f16(g)).collect();
    steps_match_in_every_pool(&layout, &h);
    let b: Vec<Vec<bf16>> = g.iter().map(|g| common::to_bf16(g)).collect();
    steps_match_in_every_pool(&layout, &b);
}

#[test]
fn selection_matches_the_spec_sort_on_ties_in_every_pool() {
    let n = (1 << 20) + 3;
    let mut rng = Rng::new(5);
    for kind in ALL_DATA {
        let x = make_data(kind, n, &mut rng);
        let mut sel = cpu::Selector::with_capacity(n);
        // Sampled path (m << n), radix path (m > n / 8), an odd sub-range.
        for (m, range) in [(n / 1000, 0..n), (n / 3, 0..n), (4099, 13..n - 17)] {
            let got = same_in_every_pool(&format!("{kind:?} m={m}"), || {
                let mut out = Vec::with_capacity(m);
                cpu::Selector::with_capacity(n).select_top_magnitude(
                    &x,
                    range.clone(),
                    m,
                    &mut out,
                );
                out
            });
            // A reused selector (the plan's case) agrees too.
            let mut again = Vec::new();
            sel.select_top_magnitude(&x, range.clone(), m, &mut again);
            assert_eq!(got, again);
            assert_eq!(got, ref_top_r_range(&x, range.clone(), m), "{kind:?} m={m}");
        }
    }
}

#[test]
fn equal_magnitudes_keep_the_lowest_indices_across_chunks() {
    // Every |x| equal: any chunk emitting its ties out of turn would show up here.
    let n = (1 << 20) + 5;
    let x: Vec<f32> = (0..n)
        .map(|i| if i % 3 == 0 { -2.5 } else { 2.5 })
        .collect();
    for m in [1, 1000, n / 7, n / 2, n - 1] {
        let got = same_in_every_pool(&format!("all equal, m={m}"), || {
            let mut out = Vec::new();
            cpu::Selector::default().select_top_magnitude(&x, 0..n, m, &mut out);
            out
        });
        assert!(got.iter().copied().eq(0..m as u32), "m={m}");
        // The generic path (random-k's) on equal keys too.
        let generic = same_in_every_pool(&format!("equal keys, m={m}"), || {
            let mut out = Vec::new();
            cpu::Selector::default().select(&(0..n as u32), m, |_| 42, &mut out);
            out
        });
        assert!(generic.iter().copied().eq(0..m as u32), "generic m={m}");
    }
    // top_r (the allocating free function) and random-k over a list, against the SPEC.
    let top = same_in_every_pool("top_r", || cpu::top_r(&x, 12_345).unwrap());
    assert_eq!(top, ref_top_r(&x, 12_345));
    let cands: Vec<u32> = (0..n as u32).filter(|i| i % 2 == 1).collect();
    let rk = same_in_every_pool("random_k", || {
        cpu::random_k(&cands, 9_999, 3, 11, 5).unwrap()
    });
    assert_eq!(rk, ref_random_k(&cands, 9_999, 3, 11, 5));
}

#[test]
fn aggregation_is_bit_identical_in_every_pool() {
    let layout = Layout::new(&[(1 << 19) + 3, 1000, (1 << 19) - 11]).unwrap();
    let g = grads(layout.n(), 9);
    for config in [Config::rtopk(0.1, 0.02), Config::sign()] {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut config = config.clone();
            config.mode = mode;
            // Three workers with different gradients; overlapping but not equal supports.
            let payloads: Vec<Payload> = (0..3)
                .map(|w| {
                    let mut plan =
                        cpu::Compressor::new(&layout, &config.clone().with_worker(w)).unwrap();
                    plan.step(&g[w as usize], 0).unwrap().clone()
                })
                .collect();
            for rule in [Average::OverWorkers, Average::OverSenders] {
                let out = same_in_every_pool(&format!("{mode:?} {rule:?}"), || {
                    let mut server = cpu::Aggregator::new(&layout, mode, rule, 3).unwrap();
                    let mut out = vec![f32::NAN; layout.n()];
                    server.aggregate(&payloads, &mut out).unwrap();
                    bits(&out)
                });
                // Against the sequential definition (SPEC §7), written out here.
                let mut sum = vec![0f32; layout.n()];
                let mut senders = vec![0u32; layout.n()];
                for p in &payloads {
                    match p {
                        Payload::Sparse(p) => {
                            for (&i, &v) in p.indices.iter().zip(&p.values) {
                                sum[i as usize] += v;
                                senders[i as usize] += 1;
                            }
                        }
                        Payload::Sign(p) => {
                            for (g, &s) in layout.groups(mode).iter().zip(&p.scales) {
                                for i in g.clone() {
                                    sum[i] += if p.is_negative(i) { -s } else { s };
                                    senders[i] += 1;
                                }
                            }
                        }
                        Payload::Qsgd(_) => unreachable!("no QSGD plan in this test"),
                    }
                }
                let want: Vec<u32> = sum
                    .iter()
                    .zip(&senders)
                    .map(|(&s, &c)| {
                        let inv = match (rule, c) {
                            (Average::OverWorkers, _) => (1.0 / 3.0f64) as f32,
                            (Average::OverSenders, 0) => 0.0,
                            (Average::OverSenders, c) => (1.0 / c as f64) as f32,
                        };
                        (s * inv).to_bits()
                    })
                    .collect();
                assert!(out == want, "{mode:?} {rule:?} against SPEC §7");
            }
        }
    }
}

#[test]
fn statistics_are_bit_identical_in_every_pool() {
    let layout = Layout::new(&[(1 << 18) + 9, 5, 0, (1 << 18) + 1, 100_003]).unwrap();
    let g = grads(layout.n(), 13);
    let key = |v: &[gradsift::LayerStats]| -> Vec<[u64; 7]> {
        v.iter()
            .map(|s| {
                [
                    s.count,
                    s.mean.to_bits(),
                    s.var.to_bits(),
                    s.min.to_bits().into(),
                    s.max.to_bits().into(),
                    s.max_abs.to_bits().into(),
                    s.non_finite,
                ]
            })
            .collect()
    };
    let got = same_in_every_pool("layer_stats", || {
        let mut out = Vec::new();
        cpu::layer_stats(&g[1], &layout, &mut out).unwrap();
        key(&out)
    });
    // Per layer, the same as the layer alone (one layer: always the calling thread).
    for l in 0..layout.num_layers() {
        let alone = Layout::single(layout.layer(l).len()).unwrap();
        let mut one = Vec::new();
        cpu::layer_stats(&g[1][layout.layer(l)], &alone, &mut one).unwrap();
        assert_eq!(got[l], key(&one)[0], "layer {l}");
    }
    let workers: Vec<&[f32]> = g.iter().map(|v| &v[..]).collect();
    let var = same_in_every_pool("estimate_variance", || {
        let mut out = Vec::new();
        cpu::estimate_variance(&workers, &layout, &mut out).unwrap();
        out.iter()
            .map(|e| (e.sigma_x2.to_bits(), e.sigma_n2.to_bits()))
            .collect::<Vec<_>>()
    });
    assert_eq!(var.len(), layout.num_layers());
}
