//! `gradsift reproduce --quick`: the report and every plot it links are written, and the
//! tables have one row per configuration.

#![cfg(feature = "cli")]

use gradsift::cli::reproduce::{PLOTS, ReproduceArgs, reproduce};

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
    // 7 comparison runs (one seed when quick), the sign run, 3 values of rho.
    assert_eq!(lines, 7 + 1 + 3);
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
    assert_eq!(rows("| bits per coordinate (all workers) |").len(), 5);
    assert_eq!(rows("| | first 10% of steps |").len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// --seeds and --epochs have documented ranges; outside them a usage error before anything
/// runs (0 seeds used to become 1 silently, a huge count to run for ever).
#[test]
fn out_of_range_options_are_usage_errors() {
    use gradsift::cli::error::CliError;
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
