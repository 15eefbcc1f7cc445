//! `gradsift reproduce --quick`: the report and every plot it links are written, and the
//! tables have one row per configuration.

use gradsift_cli::reproduce::{PLOTS, ReproduceArgs, reproduce};

#[test]
fn quick_reproduction_writes_report_and_plots() {
    let dir = std::env::temp_dir().join(format!("gradsift-reproduce-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = ReproduceArgs {
        out: dir.clone(),
        seeds: 3,
        epochs: 8,
        quick: true,
        backend: gradsift::Backend::Cpu,
    };
    let mut lines = 0;
    let summary = reproduce(&args, |_| lines += 1).unwrap();
    // 7 comparison runs (one seed when quick), the sign run, 3 values of rho, the theorems'
    // simulation, the 6 runs of the adaptive allocation's comparison, and section 7: the
    // learning-rate grid (3 rates x 2 methods), 4 set-ups x 2 methods, 2 sign runs and
    // Fig. 8 in the rate-distortion paper's configuration at 2 values of rho.
    assert_eq!(lines, 7 + 1 + 3 + 1 + 6 + 6 + 8 + 2 + 2);
    assert_eq!(summary.setups.grid.len(), 6);
    assert_eq!(
        summary.setups.rho.iter().map(|p| p.rho).collect::<Vec<_>>(),
        [0.0, 1000.0]
    );
    assert_eq!(
        (
            summary.setups.rho_base.workers,
            summary.setups.rho_base.batch
        ),
        (10, 128)
    );
    // The paper configuration's rho = 0 run gives its own baseline statistics.
    assert!(summary.setups.rho[0].mean_sum_rate_baseline.is_infinite());
    assert!(summary.setups.rho[1].mean_sum_rate_baseline.is_finite());
    assert!(summary.setups.rho_cap > 0);
    assert_eq!(summary.setups.pairs.len(), 4);
    assert_eq!(summary.setups.sign.len(), 2);
    assert_eq!(summary.adaptive.len(), 6);
    assert_eq!(summary.comparison.len(), 7);
    assert!(summary.comparison.iter().all(|r| r.accuracies.len() == 1));
    assert_eq!(
        summary.rho.iter().map(|p| p.rho).collect::<Vec<_>>(),
        [0.0, 10.0, 1000.0]
    );
    // Noise costs nothing at rho = 0 and R_sum is infinite there; it falls with rho.
    assert!(summary.rho[0].mean_sum_rate_baseline.is_infinite());
    assert!(summary.rho[1].mean_sum_rate_baseline > summary.rho[2].mean_sum_rate_baseline);

    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for plot in PLOTS {
        let bytes = std::fs::read(dir.join(plot)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{plot} is not a PNG");
        assert!(bytes.len() < 200_000, "{plot} is {} bytes", bytes.len());
        assert!(
            md.contains(&format!("]({plot})")),
            "report does not link {plot}"
        );
    }
    let rows = |header: &str| -> Vec<String> {
        let at = md
            .find(header)
            .unwrap_or_else(|| panic!("no table {header}"));
        md[at..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.split('|').nth(1).unwrap().trim().to_string())
            .collect()
    };
    assert_eq!(
        rows("| Method |"),
        [
            "Baseline",
            "rTop-k 99%",
            "rTop-k 99.9%",
            "Top-k 99%",
            "Top-k 99.9%",
            "Random-k 99%",
            "Random-k 99.9%"
        ]
    );
    assert_eq!(rows("| rho |"), ["0", "10", "1000"]);
    let paper_fig8 = md.find("Fig. 8 in the same configuration").unwrap();
    assert_eq!(
        md[paper_fig8..]
            .lines()
            .skip_while(|l| !l.starts_with("| rho |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .count(),
        2
    );
    assert_eq!(rows("| bits per coordinate (all workers) |").len(), 5);
    assert_eq!(rows("| | first 10% of steps |").len(), 2);
    assert_eq!(rows("| model | scheme |").len(), 7);
    assert_eq!(
        rows("| scheme | test accuracy"),
        [
            "global rTop-k",
            "global top-k",
            "per-layer rTop-k, uniform k_l",
            "per-layer top-k, uniform k_l",
            "adaptive rTop-k (P1 k_l)",
            "adaptive top-k (P1 k_l)"
        ]
    );
    assert_eq!(rows("| set-up | rTop-k").len(), 4);
    assert_eq!(rows("| configuration | sent |").len(), 2);
    assert!(
        md.contains("Made from commit "),
        "the report names its commit"
    );

    // Deterministic: a second run gives the same figures, plots and report, but for the
    // runtimes it prints.
    let dir2 = dir.with_extension("again");
    let _ = std::fs::remove_dir_all(&dir2);
    let again = reproduce(
        &ReproduceArgs {
            out: dir2.clone(),
            ..args
        },
        |_| {},
    )
    .unwrap();
    let figures = |s: &gradsift_cli::reproduce::Summary| {
        format!(
            "{:?}",
            gradsift_cli::reproduce::Summary {
                seconds: 0.0,
                part_seconds: [0.0; 4],
                ..s.clone()
            }
        )
    };
    assert_eq!(figures(&summary), figures(&again));
    for plot in PLOTS {
        assert!(
            std::fs::read(dir.join(plot)).unwrap() == std::fs::read(dir2.join(plot)).unwrap(),
            "{plot} differs between two runs"
        );
    }
    let timeless = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(d.join("report.md"))
            .unwrap()
            .replace(&dir2.display().to_string(), &dir.display().to_string())
            .lines()
            // Lines that print a runtime ("<digits> s") vary from run to run.
            .filter(|l| {
                let b = format!("{l} ").into_bytes();
                !b.windows(4).any(|w| {
                    w[0].is_ascii_digit() && &w[1..3] == b" s" && !w[3].is_ascii_alphanumeric()
                })
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(timeless(&dir), timeless(&dir2));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

/// --seeds and --epochs have documented ranges; outside them a usage error before anything
/// runs (0 seeds used to become 1 silently, a huge count to run for ever).
#[test]
fn out_of_range_options_are_usage_errors() {
    use gradsift_cli::error::CliError;
    let dir = std::env::temp_dir().join(format!("gradsift-reproduce-bad-{}", std::process::id()));
    for (seeds, epochs) in [
        (0, 8),
        (101, 8),
        (usize::MAX, 8),
        (3, 0),
        (3, 1001),
        (3, usize::MAX),
    ] {
        let args = ReproduceArgs {
            out: dir.clone(),
            seeds,
            epochs,
            quick: false,
            backend: gradsift::Backend::Cpu,
        };
        match reproduce(&args, |_| {}) {
            Err(CliError::Usage(m)) => assert!(m.contains("--"), "{m}"),
            Err(e) => panic!("seeds {seeds}, epochs {epochs}: {e}"),
            Ok(_) => panic!("seeds {seeds}, epochs {epochs} accepted"),
        }
        assert!(!dir.exists(), "nothing is written before the check");
    }
}

/// Theorems 1 and 2 of the rTop-k paper on a small seeded instance of their own model
/// (d = 256, s = 8), simulated with the crate's compressors: what the theorems decide.
#[test]
fn theorems_hold_on_the_sparse_bernoulli_model() {
    use gradsift_cli::theory::{Model, Scheme, TheoryConfig, simulate};
    let cfg = TheoryConfig::quick();
    let sweep = simulate(&cfg).unwrap();
    // Deterministic: the same sizes and seed give the same numbers, bit for bit (compared as
    // text, where NaN equals NaN).
    assert_eq!(
        format!("{sweep:?}"),
        format!("{:?}", simulate(&cfg).unwrap())
    );
    for model in [Model::Bernoulli, Model::Perturbed] {
        let rtopk = sweep.curve(model, Scheme::RTopK).unwrap();
        let topk = sweep.curve(model, Scheme::TopK).unwrap();
        // Theorem 1: rTop-k's error falls as 1/(n k).
        assert!(
            (-1.3..=-0.8).contains(&rtopk.fit_k.slope),
            "{model:?}: rTop-k slope in k {}",
            rtopk.fit_k.slope
        );
        assert!(
            (-1.15..=-0.85).contains(&rtopk.fit_n.slope),
            "{model:?}: rTop-k slope in n {}",
            rtopk.fit_n.slope
        );
        // Top-r alone stays biased: its error levels off at its squared bias, which more
        // nodes do not remove, and rTop-k ends below it.
        let last = topk.over_n.last().unwrap();
        assert!(
            topk.fit_n.slope > -0.3,
            "{model:?}: top-k slope in n {}",
            topk.fit_n.slope
        );
        assert!(last.bias2 > 0.8 * last.mse, "{model:?}: top-k {last:?}");
        assert!(rtopk.over_n.last().unwrap().mse < 0.5 * last.mse);
        // rTop-k is unbiased: its squared bias is within noise of 0.
        let r_last = rtopk.over_n.last().unwrap();
        assert!(
            r_last.bias2.abs() < 0.1 * r_last.mse,
            "{model:?}: rTop-k {r_last:?}"
        );
    }
    // No unbiased scheme beats the Cramer-Rao bound of the uncompressed samples, and none
    // falls faster than Theorem 2's 1/(n k) (slope -1, with slack for the -||theta||^2 term).
    for cv in sweep.curves.iter().filter(|c| c.scheme.unbiased()) {
        for p in cv.over_k.iter().chain(&cv.over_n) {
            assert!(p.mse + 3.0 * p.mse_se >= sweep.cramer_rao(p.n), "{cv:?}");
        }
        assert!(cv.fit_k.slope > -1.3 && cv.fit_n.slope > -1.15, "{cv:?}");
    }
    // Random-k pays d/r against rTop-k (here 16).
    let ratio = sweep
        .curve(Model::Bernoulli, Scheme::RandomK)
        .unwrap()
        .c_upper
        / sweep
            .curve(Model::Bernoulli, Scheme::RTopK)
            .unwrap()
            .c_upper;
    assert!(
        (8.0..32.0).contains(&ratio),
        "random-k / rTop-k constants {ratio}"
    );
}
