//! The server's aggregation (SPEC §7): bit-identical sums, bad payloads, device outputs.

use super::*;

pub(crate) fn aggregation_bit_identical<H: Harness>(h: &H) {
    let layout = mixed_layout(50, 11);
    let n = layout.n();
    for mode in [Mode::Global, Mode::PerLayer] {
        for rule in [Average::OverWorkers, Average::OverSenders] {
            for (name, mut cfg) in sparse_methods()
                .into_iter()
                .chain([("sign", Config::sign()), ("qsgd", Config::qsgd(7))])
            {
                cfg.mode = mode;
                let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
                let k = 5;
                let mut payloads = payloads_from(&mut c, k, n);
                if name == "topk" {
                    // Mixed kinds in one round.
                    let mut s = Config::sign();
                    s.mode = mode;
                    let mut cs = gradsift::cpu::Compressor::new(&layout, &s).unwrap();
                    payloads[2] = cs.step(&data(n, 1), 0).unwrap().clone();
                    let mut q = Config::qsgd(3);
                    q.mode = mode;
                    let mut cq = gradsift::cpu::Compressor::new(&layout, &q).unwrap();
                    payloads[4] = cq.step(&data(n, 2), 0).unwrap().clone();
                }
                compare_aggregation(
                    h,
                    &layout,
                    mode,
                    rule,
                    &payloads,
                    &format!("aggregate {name} {mode:?} {rule:?}"),
                );
                // Bad payloads are rejected before anything is written.
                let mut agg = h.device().aggregator(&layout, mode, rule, k).unwrap();
                let mut bad = payloads.clone();
                if let Payload::Sparse(p) = &mut bad[3] {
                    if p.indices.len() >= 2 {
                        p.indices[1] = p.indices[0];
                        let mut out = vec![7.0; n];
                        assert!(matches!(
                            agg.aggregate(&bad, &mut out),
                            Err(Error::BadPayload { worker: 3, .. })
                        ));
                        assert!(out.iter().all(|&v| v == 7.0));
                    }
                }
                if let Payload::Qsgd(p) = &mut bad[3] {
                    p.codes[n / 2] = 8; // beyond 7 levels
                    let mut out = vec![7.0; n];
                    let err = agg.aggregate(&bad, &mut out).unwrap_err();
                    assert!(
                        matches!(&err, Error::BadPayload { worker: 3, reason } if reason.contains("beyond")),
                        "{err}"
                    );
                    assert!(out.iter().all(|&v| v == 7.0));
                }
            }
        }
    }
    assert!(
        h.device()
            .aggregator(&layout, Mode::Global, Average::OverWorkers, 0)
            .is_err()
    );
    assert!(
        h.aggregator(&layout, Mode::Global, Average::OverWorkers, 0)
            .is_err()
    );
}
pub(crate) fn edge_sizes_for_aggregation_and_statistics<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 256, 257, BIG] {
        let layout = Layout::new(&[n / 2, 0, n - n / 2]).unwrap();
        // Aggregation: sparse and sign payloads, both rules, per-layer groups.
        for rule in [Average::OverWorkers, Average::OverSenders] {
            for cfg in [Config::rtopk(0.1, 0.05), Config::sign()] {
                let mut cfg = cfg;
                cfg.mode = Mode::PerLayer;
                cfg.values = DType::BF16;
                let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
                let payloads = payloads_from(&mut c, 3, n);
                compare_aggregation(
                    h,
                    &layout,
                    Mode::PerLayer,
                    rule,
                    &payloads,
                    &format!("aggregate n={n} {rule:?}"),
                );
            }
        }
        // Statistics on every dtype.
        let x: Vec<f32> = data(n, 2).iter().map(|v| v * 10.0 - 3.0).collect();
        stats_case(h, &layout, &x, &format!("n={n} f32"));
        stats_case::<H, f16>(h, &layout, &to(&x), &format!("n={n} f16"));
        // Variance estimator, K = 2, bf16.
        let y: Vec<bf16> = to(&data(n, 3));
        let z: Vec<bf16> = to(&data(n, 4));
        let refs: [&[bf16]; 2] = [&y, &z];
        let (mut va, mut vb) = (Vec::new(), Vec::new());
        gradsift::cpu::estimate_variance(&refs, &layout, &mut va).unwrap();
        let mut stats = h.device().stats(&layout, 2).unwrap();
        stats.estimate_variance(&refs, &mut vb).unwrap();
        for (a, b) in va.iter().zip(&vb) {
            let scale = a.sigma_x2 + a.sigma_n2;
            assert!(
                (a.sigma_n2 - b.sigma_n2).abs() <= 1e-4 * scale + 1e-12,
                "n={n}: {a:?} {b:?}"
            );
            assert!(
                (a.sigma_x2 - b.sigma_x2).abs() <= 1e-4 * scale + 1e-12,
                "n={n}: {a:?} {b:?}"
            );
        }
    }
}
pub(crate) fn aggregation_matches_cpu_bit_for_bit<H: Harness>(h: &H) {
    for n in [1usize, 257, 4097, BIG] {
        let configs = if n == BIG {
            configs_for(h, &[0, 7, 16], "aggregation 2^20+3")
        } else {
            configs()
        };
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            for (name, config) in &configs {
                let ks: &[usize] = if n == BIG && !h.full() {
                    &[3]
                } else {
                    &[1, 3, 8]
                };
                for &k in ks {
                    let ps = payloads_for(&layout, config, k, 1);
                    for rule in [Average::OverWorkers, Average::OverSenders] {
                        compare_aggregation(
                            h,
                            &layout,
                            config.mode,
                            rule,
                            &ps,
                            &format!("agg n={n} L={} {name} {rule:?} K={k}", layout.num_layers()),
                        );
                    }
                }
            }
        }
    }
}
pub(crate) fn bad_payloads_are_rejected_and_out_untouched<H: Harness>(h: &H) {
    let n = 5000;
    let layout = Layout::single(n).unwrap();
    let good = payloads_for(&layout, &Config::topk(0.01), 3, 1);
    let mut cases: Vec<(String, Vec<Payload>)> = Vec::new();
    let mutate = |f: &dyn Fn(&mut SparsePayload)| {
        let mut ps = good.clone();
        if let Payload::Sparse(p) = &mut ps[1] {
            f(p);
        }
        ps
    };
    cases.push((
        "out of range".into(),
        mutate(&|p| *p.indices.last_mut().unwrap() = n as u32),
    ));
    cases.push(("duplicate".into(), mutate(&|p| p.indices[1] = p.indices[0])));
    cases.push(("unsorted".into(), mutate(&|p| p.indices.swap(0, 1))));
    cases.push(("nan value".into(), mutate(&|p| p.values[2] = f32::NAN)));
    cases.push((
        "length".into(),
        mutate(&|p| {
            p.values.pop();
        }),
    ));
    cases.push(("wrong n".into(), mutate(&|p| p.n = 4999)));
    let mut both = mutate(&|p| p.values[0] = f32::INFINITY);
    if let Payload::Sparse(p) = &mut both[2] {
        p.indices[0] = u32::MAX;
    }
    cases.push(("first bad worker wins".into(), both));
    for rule in [Average::OverWorkers, Average::OverSenders] {
        let mut cpu_agg = gradsift::cpu::Aggregator::new(&layout, Mode::Global, rule, 3).unwrap();
        let mut host_agg = h
            .device()
            .aggregator(&layout, Mode::Global, rule, 3)
            .unwrap();
        let mut dev_agg = h.aggregator(&layout, Mode::Global, rule, 3).unwrap();
        for (name, ps) in &cases {
            let mut a = vec![7.0f32; n];
            let mut b = vec![7.0f32; n];
            let want = cpu_agg.aggregate(ps, &mut a);
            let got = host_agg.aggregate(ps, &mut b);
            assert!(want.is_err(), "{name}: the reference accepts it");
            assert_eq!(want, got, "{name}");
            assert!(b.iter().all(|&v| v == 7.0), "{name}: out was written");
            let mut d = vec![7.0f32; n];
            let got = h.aggregate_device(&mut dev_agg, ps, &mut d);
            assert_eq!(want, got, "{name} (device)");
            assert!(
                d.iter().all(|&v| v == 7.0),
                "{name}: device out was written"
            );
        }
        assert!(host_agg.aggregate(&good[..2], &mut vec![0.0; n]).is_err());
        assert!(host_agg.aggregate(&good, &mut vec![0.0; n - 1]).is_err());
    }
    assert!(
        h.aggregator(&layout, Mode::Global, Average::OverWorkers, 0)
            .is_err()
    );
}
/// The backend's own payloads feed its aggregator: the end-to-end path of a training step.
pub(crate) fn backend_payloads_round_trip<H: Harness>(h: &H) {
    let layout = Layout::new(&[1000, 70_000, 3]).unwrap();
    let n = layout.n();
    let mut config = Config::rtopk(0.1, 0.02);
    config.mode = Mode::PerLayer;
    config.scale = Scale::Unbiased;
    let mut ps = Vec::new();
    for w in 0..4u32 {
        let mut g = h
            .compressor(&layout, &config.clone().with_worker(w))
            .unwrap();
        h.step_device(&mut g, &gaussian::<f32>(n, 60 + u64::from(w), 1.0), 9)
            .unwrap();
        let mut p = Payload::default();
        g.read_payload(&mut p).unwrap();
        ps.push(p);
    }
    compare_aggregation(
        h,
        &layout,
        Mode::PerLayer,
        Average::OverWorkers,
        &ps,
        "round trip",
    );
}
/// `aggregate_device` into the backend's own buffer equals `aggregate` into a host slice,
/// and a wrong count of payloads leaves the device buffer as it was.
pub(crate) fn aggregate_device_matches_aggregate<H: Harness>(h: &H) {
    let layout = Layout::new(&[700, 0, 6000]).unwrap();
    let n = layout.n();
    for cfg in [Config::rtopk(0.1, 0.02), Config::sign()] {
        let ps = payloads_for(&layout, &cfg, 4, 3);
        for rule in [Average::OverWorkers, Average::OverSenders] {
            let mut agg = h.aggregator(&layout, Mode::Global, rule, 4).unwrap();
            let mut host = vec![0.0f32; n];
            agg.aggregate(&ps, &mut host).unwrap();
            let mut dev = vec![-1.0f32; n];
            h.aggregate_device(&mut agg, &ps, &mut dev).unwrap();
            compare_f32(&host, &dev, Tol::Bits, "aggregate_device vs aggregate");
            assert_eq!(agg.rule(), rule);
            let mut untouched = vec![3.0f32; n];
            assert!(matches!(
                h.aggregate_device(&mut agg, &ps[..3], &mut untouched),
                Err(Error::LengthMismatch { .. })
            ));
            assert!(untouched.iter().all(|&v| v == 3.0));
            let mut short = vec![0.0f32; n - 1];
            assert!(agg.aggregate(&ps, &mut short).is_err());
        }
    }
}
