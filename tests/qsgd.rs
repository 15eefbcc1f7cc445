//! QSGD (SPEC §13) on the CPU reference against a model written from the SPEC alone (the
//! Philox block from `philox4x32_10`, plain loops), with error feedback (§5), momentum,
//! revert, the server's aggregation (§7) and the wire format. The GPU backends are held to
//! the CPU bit for bit by the conformance suite (`tests/backends/`, `qsgd_*` and the
//! aggregation cases).

use gradsift::philox::philox4x32_10;
use gradsift::{
    Aggregate, Average, Compress, Config, Error, Layout, Mode, Payload, QsgdPayload, cpu, wire,
};

/// SPEC §13 for one buffer: per group `max |p|`, the Philox word-1 uniform, the level.
fn model(
    p: &[f32],
    groups: &[std::ops::Range<usize>],
    s: u8,
    w: u32,
    t: u64,
    seed: u64,
) -> QsgdPayload {
    let mut q = QsgdPayload {
        n: p.len() as u32,
        levels: s,
        scales: vec![],
        codes: vec![0; p.len()],
    };
    for g in groups {
        let m = p[g.clone()].iter().fold(0.0f32, |a, x| a.max(x.abs()));
        let inv = if m > 0.0 { s as f32 / m } else { 0.0 };
        for i in g.clone() {
            let word = philox4x32_10(
                [i as u32, w, t as u32, (t >> 32) as u32],
                [seed as u32, (seed >> 32) as u32],
            )[1];
            let u = (word >> 8) as f32 / 16_777_216.0;
            let a = p[i].abs() * inv;
            let mut l = a.floor() as i32;
            if u < a - a.floor() {
                l += 1;
            }
            let l = l.min(s as i32) as i8;
            q.codes[i] = if p[i] < 0.0 { -l } else { l };
        }
        q.scales.push(m);
    }
    q
}

fn decoded(q: &QsgdPayload, groups: &[std::ops::Range<usize>]) -> Vec<f32> {
    let mut out = vec![0.0; q.n as usize];
    for (g, &m) in groups.iter().zip(&q.scales) {
        let step = m / q.levels as f32;
        for i in g.clone() {
            out[i] = q.codes[i] as f32 * step;
        }
    }
    out
}

fn gradient(n: usize, step: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u64 * 2_654_435_761 + step * 97) % 1000;
            (x as f32 - 500.0) / 37.0
        })
        .collect()
}

#[test]
fn the_cpu_step_is_the_spec_bit_for_bit() {
    let sizes = [300usize, 0, 77, 1];
    let layout = Layout::new(&sizes).unwrap();
    for (mode, levels, momentum, feedback) in [
        (Mode::Global, 1u8, 0.0f32, true),
        (Mode::PerLayer, 7, 0.0, true),
        (Mode::PerLayer, 127, 0.9, true),
        (Mode::PerLayer, 5, 0.0, false),
    ] {
        let mut cfg = Config::new(gradsift::Method::Qsgd {
            levels,
            error_feedback: feedback,
        });
        cfg.mode = mode;
        cfg.momentum = momentum;
        cfg.seed = 0xDEAD_BEEF_0123;
        cfg.worker = 3;
        let groups = layout.groups(mode);
        let n = layout.n();
        let mut plan = cpu::Compressor::new(&layout, &cfg).unwrap();
        let (mut e, mut u) = (vec![0.0f32; n], vec![0.0f32; n]);
        for t in [0u64, 1, 2, 1 << 40] {
            let g = gradient(n, t);
            let p: Vec<f32> = if momentum > 0.0 {
                for i in 0..n {
                    u[i] = momentum * u[i] + g[i];
                }
                (0..n).map(|i| e[i] + u[i]).collect()
            } else {
                (0..n).map(|i| e[i] + g[i]).collect()
            };
            let want = model(&p, &groups, levels, 3, t, cfg.seed);
            let got = plan.step(&g, t).unwrap().clone();
            assert_eq!(
                got,
                Payload::Qsgd(want.clone()),
                "{mode:?} s={levels} t={t}"
            );
            let d = decoded(&want, &groups);
            for i in 0..n {
                // Without error feedback nothing is kept: each step sends g alone.
                e[i] = if feedback { p[i] - d[i] } else { 0.0 };
            }
            u.fill(0.0); // every element sent a code (SPEC §13)
            let mut res = Vec::new();
            plan.residual(&mut res).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&res), bits(&e), "residual {mode:?} s={levels} t={t}");
            // Every payload encodes to the exact length and decodes to itself.
            let mut bytes = Vec::new();
            wire::encode(&got, &mut bytes).unwrap();
            assert_eq!(bytes.len(), wire::qsgd_len(n as u32, groups.len(), levels));
            assert_eq!(wire::decode(&bytes).unwrap(), got);
        }
    }
}

#[test]
fn revert_and_rejection_leave_the_state_as_it_was() {
    let layout = Layout::new(&[50]).unwrap();
    let mut cfg = Config::qsgd(3);
    cfg.momentum = 0.5;
    let mut plan = cpu::Compressor::new(&layout, &cfg).unwrap();
    plan.step(&gradient(50, 0), 0).unwrap();
    let (mut e0, mut u0) = (Vec::new(), Vec::new());
    plan.residual(&mut e0).unwrap();
    plan.momentum(&mut u0).unwrap();
    plan.step(&gradient(50, 1), 1).unwrap();
    plan.revert().unwrap();
    let (mut e1, mut u1) = (Vec::new(), Vec::new());
    plan.residual(&mut e1).unwrap();
    plan.momentum(&mut u1).unwrap();
    assert_eq!((&e0, &u0), (&e1, &u1));
    let mut bad = gradient(50, 2);
    bad[7] = f32::NAN;
    assert!(matches!(
        plan.step(&bad, 2),
        Err(Error::NonFinite {
            count: 1,
            first_index: 7
        })
    ));
    plan.residual(&mut e1).unwrap();
    plan.momentum(&mut u1).unwrap();
    assert_eq!((&e0, &u0), (&e1, &u1));
}

#[test]
fn the_server_averages_the_decoded_levels_in_worker_order() {
    let sizes = [40usize, 25];
    let layout = Layout::new(&sizes).unwrap();
    let groups = layout.groups(Mode::PerLayer);
    let mut cfg = Config::qsgd(5);
    cfg.mode = Mode::PerLayer;
    let k = 3;
    let payloads: Vec<Payload> = (0..k)
        .map(|w| {
            let mut plan = cpu::Compressor::new(&layout, &cfg.clone().with_worker(w)).unwrap();
            plan.step(&gradient(65, u64::from(w) + 10), 4)
                .unwrap()
                .clone()
        })
        .collect();
    let mut agg =
        cpu::Aggregator::new(&layout, Mode::PerLayer, Average::OverWorkers, k as usize).unwrap();
    let mut out = vec![0.0f32; 65];
    agg.aggregate(&payloads, &mut out).unwrap();
    let mut want = vec![0.0f32; 65];
    for p in &payloads {
        let d = decoded(p.as_qsgd().unwrap(), &groups);
        for i in 0..65 {
            want[i] += d[i];
        }
    }
    let inv = (1.0f64 / k as f64) as f32;
    for (i, w) in want.iter_mut().enumerate() {
        *w *= inv;
        assert_eq!(out[i].to_bits(), w.to_bits(), "element {i}");
    }
    // A payload with a code beyond its levels is a typed error naming the worker.
    let mut broken = payloads.clone();
    if let Payload::Qsgd(q) = &mut broken[1] {
        q.codes[3] = 6;
    }
    assert!(matches!(
        agg.aggregate(&broken, &mut out),
        Err(Error::BadPayload { worker: 1, .. })
    ));
}

#[test]
fn levels_out_of_range_are_invalid_configs() {
    let layout = Layout::new(&[8]).unwrap();
    // Without error feedback there is no residual for momentum correction.
    let mut cfg = Config::new(gradsift::Method::Qsgd {
        levels: 3,
        error_feedback: false,
    });
    cfg.momentum = 0.5;
    assert!(matches!(
        cpu::Compressor::new(&layout, &cfg),
        Err(Error::InvalidConfig(m)) if m.contains("momentum")
    ));
    for levels in [0u8, 128, 255] {
        assert!(matches!(
            cpu::Compressor::new(&layout, &Config::qsgd(levels)),
            Err(Error::InvalidConfig(_))
        ));
    }
    // A QSGD plan has nothing to refund.
    let mut plan = cpu::Compressor::new(&layout, &Config::qsgd(2)).unwrap();
    plan.step(&[1.0; 8], 0).unwrap();
    let back = gradsift::SparsePayload {
        n: 8,
        ..Default::default()
    };
    assert!(matches!(plan.refund(&back), Err(Error::InvalidConfig(_))));
}
