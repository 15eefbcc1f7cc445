//! The contract's state methods: reconfigure, revert, refund, rejection counts, payload slots,
//! device identity and loss.

use super::*;

pub(crate) fn reports_the_device<H: Harness>(h: &H) {
    let d = h.device();
    println!(
        "{}: {}; max storage binding {:?} bytes",
        h.backend(),
        d.description(),
        h.max_binding_bytes()
    );
    assert_eq!(d.backend(), h.backend());
    assert!(!d.description().is_empty());
    assert!(d.description().starts_with(h.backend().name()));
    // `Device::open` itself opens this backend too.
    let opened = Device::open(h.backend()).unwrap();
    assert_eq!(opened.backend(), h.backend());
    assert!(opened.skipped().is_empty());
}
/// Generic, but only wgpu can lose its device on demand (`wgpu::Device::destroy`); the CPU
/// has none and CUDA offers no safe way, so those print a note.
pub(crate) fn lost_device_is_a_typed_error<H: Harness>(h: &H) {
    let Some((device, lose)) = h.losable() else {
        println!(
            "NOTE: {}: cannot lose the device on demand; nothing to check",
            h.backend()
        );
        return;
    };
    let layout = Layout::single(5000).unwrap();
    let mut g = device.compressor(&layout, &Config::topk(0.01)).unwrap();
    let x = data(5000, 1);
    g.step(&x, 0).unwrap();
    lose();
    let r = g.step(&x, 1).map(|_| ());
    let name = h.backend().name();
    assert!(
        matches!(&r, Err(Error::Device { backend, .. }) if *backend == name),
        "{r:?}"
    );
    let r = device.compressor(&layout, &Config::topk(0.01));
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
}
// ---- the contract's methods that neither old suite covered ------------------------------------

/// `reconfigure` keeps residual and momentum (device to device on GPUs), exactly as the
/// CPU's `reconfigure`, and later steps run the new configuration on that state.
pub(crate) fn reconfigure_keeps_residual_and_momentum<H: Harness>(h: &H) {
    let layout = Layout::new(&[3000, 0, 1234]).unwrap();
    let n = layout.n();
    let mut first = Config::rtopk(0.2, 0.05);
    first.momentum = 0.5;
    first.mode = Mode::PerLayer;
    let mut c = gradsift::cpu::Compressor::new(&layout, &first).unwrap();
    let mut g = h.device().compressor(&layout, &first).unwrap();
    let grads: Vec<Vec<f32>> = (0..6).map(|s| dyadic(n, 300 + s)).collect();
    let mut bad = grads[1].clone();
    bad[17] = f32::NAN;
    for (t, x) in [&grads[0], &bad, &grads[1]].into_iter().enumerate() {
        let want = c.step(x, t as u64).cloned();
        let got = g.step(x, t as u64).cloned();
        assert_eq!(want, got, "before reconfigure, step {t}");
    }
    let (mut e, mut u) = (Vec::new(), Vec::new());
    // Out of domain: an error, and nothing changes.
    assert!(matches!(
        g.reconfigure(&Config::rtopk(0.1, 0.2)),
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(g.config(), &first);
    g.residual(&mut e).unwrap();
    compare_f32(
        c.residual_slice(),
        &e,
        Tol::Bits,
        "after a failed reconfigure",
    );
    // Warm-up: a denser ratio, same momentum; then one without momentum; then sign.
    let mut warm = Config::topk(0.01);
    warm.momentum = 0.5;
    let mut plain = Config::rtopk(0.3, 0.1);
    plain.values = DType::BF16;
    let mut sign = Config::sign();
    sign.momentum = 0.5;
    for (i, next) in [warm, plain, sign].into_iter().enumerate() {
        c.reconfigure(&next).unwrap();
        g.reconfigure(&next).unwrap();
        assert_eq!(g.config(), &next);
        assert_eq!(g.groups(), c.groups(), "groups after reconfigure {i}");
        assert_eq!(g.layout(), &layout);
        g.residual(&mut e).unwrap();
        compare_f32(
            c.residual_slice(),
            &e,
            Tol::Bits,
            &format!("residual kept by reconfigure {i}"),
        );
        g.momentum(&mut u).unwrap();
        compare_f32(
            c.momentum_slice(),
            &u,
            Tol::Bits,
            &format!("momentum kept by reconfigure {i}"),
        );
        assert_eq!(
            g.rejected_steps().unwrap(),
            1,
            "rejections survive reconfigure"
        );
        let t = 10 + i as u64;
        let want = c.step(&grads[2 + i], t).unwrap().clone();
        let got = g.step(&grads[2 + i], t).unwrap().clone();
        compare_payload(
            &want,
            &got,
            Tol::of(&next),
            &format!("step after reconfigure {i}"),
            i < 2,
        );
        g.residual(&mut e).unwrap();
        compare_f32(
            c.residual_slice(),
            &e,
            Tol::of(&next),
            &format!("residual after reconfigure {i}"),
        );
    }
}
/// `rejected_steps` counts every rejection since the plan was built, with several steps (on
/// device buffers, unread) between reads.
pub(crate) fn rejected_steps_counts_every_rejection_since_the_plan_was_built<H: Harness>(h: &H) {
    let n = 4000;
    let layout = Layout::single(n).unwrap();
    let cfg = Config::rtopk(0.1, 0.02);
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    assert_eq!(g.rejected_steps().unwrap(), 0, "a new plan");
    let good = |s: u64| data(n, s);
    let bad = |s: u64| {
        let mut x = data(n, s);
        x[(s as usize * 131) % n] = f32::INFINITY;
        x
    };
    // good, bad, bad, good, bad: three rejections, none read.
    let seq = [good(1), bad(2), bad(3), good(4), bad(5)];
    for (t, x) in seq.iter().enumerate() {
        let _ = c.step(x, t as u64);
        let _ = h.step_device(&mut g, x, t as u64);
    }
    assert_eq!(c.rejected_steps().unwrap(), 3);
    assert_eq!(g.rejected_steps().unwrap(), 3, "three unread rejections");
    assert_eq!(g.rejected_steps().unwrap(), 3, "reading does not reset it");
    // The last step was rejected: payload and check say so.
    assert_eq!(g.check(), c.check());
    assert!(matches!(g.check(), Err(Error::NonFinite { count: 1, .. })));
    // Two more good steps, one more bad, through the host entry point this time.
    for (t, x) in [good(6), bad(7), good(8)].iter().enumerate() {
        let t = 10 + t as u64;
        assert_eq!(c.step(x, t).cloned(), g.step(x, t).cloned(), "step {t}");
    }
    assert_eq!(g.rejected_steps().unwrap(), 4);
    assert_eq!(g.check(), Ok(()));
    let mut e = Vec::new();
    g.residual(&mut e).unwrap();
    compare_f32(
        c.residual_slice(),
        &e,
        Tol::Bits,
        "residual after rejections",
    );
    // reset() zeroes the state, not the count.
    g.reset().unwrap();
    assert_eq!(g.rejected_steps().unwrap(), 4);
}
/// `payload()` and `check()` before the first step and after a rejected one, on the
/// dispatched plan and the backend's own (device entry point).
pub(crate) fn payload_and_check_before_the_first_step_and_after_a_rejection<H: Harness>(h: &H) {
    let n = 3000;
    let layout = Layout::new(&[1000, 2000]).unwrap();
    for cfg in [Config::topk(0.01), Config::sign()] {
        let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
        let mut g = h.device().compressor(&layout, &cfg).unwrap();
        let mut own = h.compressor(&layout, &cfg).unwrap();
        // Before the first step: no payload (InvalidConfig), but check() is Ok.
        assert!(matches!(c.payload(), Err(Error::InvalidConfig(_))));
        assert!(matches!(g.payload(), Err(Error::InvalidConfig(_))));
        assert!(matches!(own.payload(), Err(Error::InvalidConfig(_))));
        let mut slot = Payload::default();
        assert!(matches!(
            own.read_payload(&mut slot),
            Err(Error::InvalidConfig(_))
        ));
        assert_eq!(g.check(), Ok(()));
        assert_eq!(own.check(), Ok(()));
        let x = data(n, 1);
        let want = c.step(&x, 0).unwrap().clone();
        let tol = Tol::of(&cfg);
        compare_payload(&want, g.step(&x, 0).unwrap(), tol, "first step", true);
        h.step_device(&mut own, &x, 0).unwrap();
        assert_eq!(own.check(), Ok(()));
        compare_payload(
            &want,
            own.payload().unwrap(),
            tol,
            "first step (device)",
            true,
        );
        // payload() repeats the last step's.
        compare_payload(&want, g.payload().unwrap(), tol, "payload() again", true);
        // A rejected step: payload() and check() give the step's error, every time.
        let mut bad = data(n, 2);
        bad[1500] = f32::NAN;
        bad[2999] = f32::NEG_INFINITY;
        let err = c.step(&bad, 1).unwrap_err();
        assert_eq!(
            err,
            Error::NonFinite {
                count: 2,
                first_index: 1500
            }
        );
        assert_eq!(g.step(&bad, 1).map(|_| ()), Err(err.clone()));
        let _ = h.step_device(&mut own, &bad, 1);
        for _ in 0..2 {
            assert_eq!(g.check(), Err(err.clone()));
            assert_eq!(g.payload().map(|_| ()), Err(err.clone()));
            assert_eq!(own.check(), Err(err.clone()));
            assert_eq!(own.payload().map(|_| ()), Err(err.clone()));
            assert_eq!(own.read_payload(&mut slot), Err(err.clone()));
        }
        // The next good step clears it.
        let x = data(n, 3);
        let want = c.step(&x, 2).unwrap().clone();
        compare_payload(&want, g.step(&x, 2).unwrap(), tol, "after", false);
        h.step_device(&mut own, &x, 2).unwrap();
        assert_eq!(own.check(), Ok(()));
        compare_payload(&want, own.payload().unwrap(), tol, "after (device)", false);
    }
}
/// `read_payload` into one reused `Payload`: sparse into a slot that held a sign payload
/// and back, larger and smaller payloads, no stale elements left behind.
pub(crate) fn read_payload_reuses_the_slot<H: Harness>(h: &H) {
    let layout = Layout::single(5000).unwrap();
    let mut slot = Payload::default();
    let plans = [
        Config::topk(0.1),
        Config::sign(),
        Config::topk(0.001),
        Config::rtopk(0.2, 0.05),
        Config::sign(),
    ];
    for (i, cfg) in plans.iter().enumerate() {
        let mut c = gradsift::cpu::Compressor::new(&layout, cfg).unwrap();
        let mut g = h.device().compressor(&layout, cfg).unwrap();
        let mut own = h.compressor(&layout, cfg).unwrap();
        for t in 0..2u64 {
            let x = data(5000, i as u64 * 10 + t);
            let want = c.step(&x, t).unwrap().clone();
            g.step(&x, t).unwrap();
            g.read_payload(&mut slot).unwrap();
            compare_payload(
                &want,
                &slot,
                Tol::of(cfg),
                &format!("plan {i} step {t}"),
                t == 0,
            );
            h.step_device(&mut own, &x, t).unwrap();
            own.read_payload(&mut slot).unwrap();
            compare_payload(
                &want,
                &slot,
                Tol::of(cfg),
                &format!("plan {i} step {t} (device)"),
                t == 0,
            );
        }
    }
}
/// A gradient buffer of another device: `Error::Device`, and the plan still works. Only
/// wgpu can make one here (a second adapter context); CUDA needs a second GPU; host slices
/// belong to no device.
pub(crate) fn buffer_of_another_device_is_rejected<H: Harness>(h: &H) {
    let layout = Layout::single(1000).unwrap();
    let cfg = Config::topk(0.01);
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let x = data(1000, 4);
    let Some(r) = h.step_foreign(&mut g, &x) else {
        println!("NOTE: {}: no buffer of another device to try", h.backend());
        return;
    };
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    let want = c.step(&x, 1).unwrap().clone();
    h.step_device(&mut g, &x, 1).unwrap();
    assert_eq!(g.payload().unwrap(), &want);
}
// ---- not per backend ----------------------------------------------------------------------

/// `Backend::Auto` takes the first backend of `Backend::PREFERENCE` that opens and lists
/// every one before it with its reason; it computes what the CPU computes.
#[test]
pub(crate) fn auto_reports_skipped_backends() {
    let d = Device::open(Backend::Auto).unwrap();
    let pos = Backend::PREFERENCE
        .iter()
        .position(|b| *b == d.backend())
        .expect("auto opens a concrete backend");
    let skipped: Vec<Backend> = d.skipped().iter().map(|s| s.backend).collect();
    assert_eq!(skipped, Backend::PREFERENCE[..pos], "{d:?}");
    for s in d.skipped() {
        println!("auto skipped {}: {}", s.backend, s.reason);
        assert!(!s.reason.is_empty());
        let e = Device::open(s.backend).unwrap_err();
        assert!(matches!(e, Error::BackendUnavailable { .. }), "{e:?}");
        if s.backend == Backend::Cuda && !cfg!(feature = "cuda") {
            assert!(s.reason.contains("--features cuda"), "{}", s.reason);
        }
        if s.backend == Backend::Wgpu && !cfg!(feature = "wgpu") {
            assert!(s.reason.contains("--features wgpu"), "{}", s.reason);
        }
    }
    println!("auto opened {}", d.description());
    if required("GRADSIFT_REQUIRE_CUDA") {
        assert_eq!(d.backend(), Backend::Cuda);
    } else if required("GRADSIFT_REQUIRE_WGPU") && skipped.contains(&Backend::Cuda) {
        assert_eq!(d.backend(), Backend::Wgpu);
    }
    // The same training step on Auto and on the CPU: the same bits (SPEC §11).
    let layout = Layout::new(&[1000, 24]).unwrap();
    let mut update = Vec::new();
    for device in [Device::cpu(), d] {
        let mut plan = device
            .compressor(&layout, &Config::rtopk(0.05, 0.01))
            .unwrap();
        let mut server = device
            .aggregator(&layout, Mode::Global, Average::OverWorkers, 1)
            .unwrap();
        let mut out = vec![0f32; layout.n()];
        let p = plan.step(&data(layout.n(), 1), 0).unwrap().clone();
        server.aggregate(&[p], &mut out).unwrap();
        update.push(out);
    }
    assert_eq!(update[0], update[1]);
}
/// `Compress::revert` (SPEC §5): after an accepted step the residual and momentum return,
/// bit for bit, to the plan's state from before it, for every method (sparse with
/// momentum, plain top-k, sign with momentum) and whether the step came from the host or the
/// device buffer; a second revert, a revert after a rejected step and one after `reset`
/// change nothing; the plan then steps on exactly as a twin plan that never took the undone
/// steps.
pub(crate) fn revert_restores_the_state_before_the_last_step<H: Harness>(h: &H) {
    let layout = Layout::new(&[700, 0, 333]).unwrap();
    let n = layout.n();
    let mut rtopk = Config::rtopk(0.2, 0.05);
    rtopk.momentum = 0.5;
    rtopk.mode = Mode::PerLayer;
    let mut sign = Config::sign();
    sign.momentum = 0.25;
    let state = |g: &mut H::Comp| {
        let (mut e, mut u) = (Vec::new(), Vec::new());
        g.residual(&mut e).unwrap();
        g.momentum(&mut u).unwrap();
        (common::bits(&e), common::bits(&u))
    };
    for (ci, cfg) in [rtopk, Config::topk(0.01), sign].into_iter().enumerate() {
        let mut g = h.compressor(&layout, &cfg).unwrap();
        let mut twin = h.compressor(&layout, &cfg).unwrap();
        let grads: Vec<Vec<f32>> = (0..4)
            .map(|s| dyadic(n, 900 + 10 * ci as u64 + s))
            .collect();
        g.step(&grads[0], 0).unwrap();
        twin.step(&grads[0], 0).unwrap();
        let before = state(&mut g);
        assert!(
            before.0.iter().any(|&b| b != 0),
            "config {ci}: a residual to keep"
        );
        g.step(&grads[1], 1).unwrap();
        assert_ne!(
            state(&mut g),
            before,
            "config {ci}: the step changed the state"
        );
        g.revert().unwrap();
        assert_eq!(state(&mut g), before, "config {ci}: state after revert");
        assert!(
            g.payload().is_err(),
            "config {ci}: an undone step has no payload"
        );
        h.step_device(&mut g, &grads[1], 1).unwrap();
        g.revert().unwrap();
        g.revert().unwrap(); // nothing more to undo
        assert_eq!(
            state(&mut g),
            before,
            "config {ci}: after a device step and two reverts"
        );
        let mut bad = grads[2].clone();
        bad[5] = f32::INFINITY;
        let _ = g.step(&bad, 1);
        assert!(
            g.check().is_err(),
            "config {ci}: the infinite gradient is rejected"
        );
        g.revert().unwrap(); // must not undo step 0
        assert_eq!(
            state(&mut g),
            before,
            "config {ci}: revert after a rejection"
        );
        for t in 1..4u64 {
            let want = twin.step(&grads[t as usize], t).cloned().unwrap();
            let got = g.step(&grads[t as usize], t).cloned().unwrap();
            assert_eq!(want, got, "config {ci}: step {t} after the reverts");
        }
        assert_eq!(
            state(&mut g),
            state(&mut twin),
            "config {ci}: state at the end"
        );
        g.reset().unwrap();
        g.revert().unwrap();
        let (e, _) = state(&mut g);
        assert!(
            e.iter().all(|&b| b == 0),
            "config {ci}: revert after reset brought a state back"
        );
    }
}
/// `Compress::refund` (SPEC §12): after a step (host or device buffer) the entries given back
/// are added to the residual with the CPU reference's bits, for top-k, rTop-k per layer with
/// momentum and f16 values, and random-k; refunds accumulate until the next step, which then
/// matches a CPU twin that got the same refunds. Bad refunds (another n, unsorted, more
/// entries than a payload, lengths that disagree) are `BadPayload`; before a step, after a
/// revert and on a sign plan `InvalidConfig`; after a rejected step its `NonFinite`; none of
/// them changes the state. A revert undoes the step and its refunds together.
pub(crate) fn refund_returns_entries_to_the_residual_bit_for_bit<H: Harness>(h: &H) {
    let layout = Layout::new(&[700, 0, 333, 5]).unwrap();
    let n = layout.n();
    let mut rtopk = Config::rtopk(0.2, 0.05);
    rtopk.momentum = 0.5;
    rtopk.mode = Mode::PerLayer;
    rtopk.values = DType::F16;
    let configs = [Config::topk(0.02), rtopk, Config::randomk(0.05)];
    for (ci, cfg) in configs.into_iter().enumerate() {
        let mut g = h.compressor(&layout, &cfg).unwrap();
        let mut cpu = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
        let some = SparsePayload {
            n: n as u32,
            values_dtype: DType::F32,
            indices: vec![3],
            values: vec![1.0],
        };
        assert!(
            matches!(g.refund(&some), Err(Error::InvalidConfig(_))),
            "config {ci}: refund before the first step"
        );
        for t in 0..4u64 {
            let grad = dyadic(n, 1300 + 10 * ci as u64 + t);
            let want = cpu.step(&grad, t).cloned().unwrap();
            if t % 2 == 0 {
                g.step(&grad, t).unwrap();
            } else {
                h.step_device(&mut g, &grad, t).unwrap();
            }
            let sent = want.as_sparse().expect("a sparse payload").clone();
            assert!(sent.indices.len() > 4, "config {ci}: a payload to refund");
            // Every other entry, then the rest in a second call (refunds add up).
            let pick = |par: usize| SparsePayload {
                indices: sent.indices.iter().copied().skip(par).step_by(2).collect(),
                values: sent.values.iter().copied().skip(par).step_by(2).collect(),
                ..sent.clone()
            };
            let before = ef_bits(&mut g);
            let mut unsorted = pick(0);
            unsorted.indices.swap(0, 1);
            let mut too_many = sent.clone();
            too_many.indices.push(u32::MAX);
            too_many.values.push(0.0);
            let mut uneven = pick(0);
            uneven.values.pop();
            let other_n = SparsePayload {
                n: n as u32 + 1,
                ..pick(0)
            };
            for (what, bad) in [
                ("unsorted", &unsorted),
                ("too many", &too_many),
                ("uneven", &uneven),
                ("another n", &other_n),
            ] {
                assert!(
                    matches!(g.refund(bad), Err(Error::BadPayload { .. })),
                    "config {ci} step {t}: {what}"
                );
                assert!(
                    matches!(cpu.refund(bad), Err(Error::BadPayload { .. })),
                    "config {ci} step {t}: {what} on the CPU"
                );
            }
            assert_eq!(ef_bits(&mut g), before, "config {ci} step {t}: bad refunds");
            for par in [0, 1] {
                let back = pick(par);
                g.refund(&back).unwrap();
                cpu.refund(&back).unwrap();
                assert_eq!(
                    ef_bits(&mut g),
                    ef_bits(&mut cpu),
                    "config {ci} step {t}: after refund {par}"
                );
            }
            let empty = SparsePayload {
                indices: vec![],
                values: vec![],
                ..sent.clone()
            };
            g.refund(&empty).unwrap();
            assert_eq!(
                ef_bits(&mut g),
                ef_bits(&mut cpu),
                "config {ci}: empty refund"
            );
        }
        // A revert undoes the step together with its refunds.
        let before = ef_bits(&mut g);
        let grad = dyadic(n, 1399 + ci as u64);
        let sent = g.step(&grad, 4).unwrap().as_sparse().unwrap().clone();
        g.refund(&sent).unwrap();
        g.revert().unwrap();
        assert_eq!(
            ef_bits(&mut g),
            before,
            "config {ci}: revert after a refund"
        );
        assert!(
            matches!(g.refund(&sent), Err(Error::InvalidConfig(_))),
            "config {ci}: refund after a revert"
        );
        let mut bad = grad.clone();
        bad[7] = f32::NAN;
        let _ = g.step(&bad, 4);
        assert!(
            matches!(g.refund(&sent), Err(Error::NonFinite { .. })),
            "config {ci}: refund after a rejected step"
        );
        assert_eq!(ef_bits(&mut g), before, "config {ci}: after the rejection");
    }
    let mut sign = h.compressor(&layout, &Config::sign()).unwrap();
    sign.step(&dyadic(n, 1390), 0).unwrap();
    let back = SparsePayload {
        n: n as u32,
        values_dtype: DType::F32,
        indices: vec![1],
        values: vec![1.0],
    };
    assert!(
        matches!(sign.refund(&back), Err(Error::InvalidConfig(_))),
        "a sign plan has nothing to refund"
    );
}
/// Residual and momentum bits of a plan.
pub(crate) fn ef_bits<C: Compress>(c: &mut C) -> (Vec<u32>, Vec<u32>) {
    let (mut e, mut u) = (Vec::new(), Vec::new());
    c.residual(&mut e).unwrap();
    c.momentum(&mut u).unwrap();
    (common::bits(&e), common::bits(&u))
}
