//! `gradsift reproduce`'s comparison of the adaptive per-layer allocation
//! ([`TrainMethod::Adaptive`]) with uniform per-layer and global rTop-k and top-k at the same
//! wire budget.

use crate::error::Result;
use crate::train::{TrainConfig, TrainError, TrainMethod, TrainReport};
use std::fmt::Write as _;

/// One scheme of the comparison, over its seeds.
#[derive(Debug, Clone)]
pub struct AdaptiveRow {
    /// e.g. "adaptive rTop-k (P1)".
    pub label: String,
    /// Final test accuracy of each seed that finished.
    pub accuracies: Vec<f64>,
    /// Seeds whose training diverged.
    pub diverged: usize,
    /// Wire bits per worker per step, last epoch, mean over seeds.
    pub bits_per_worker_step: f64,
    /// Compression-added distortion `D_c` per coordinate (`||g_hat - ybar||^2 / n`), mean
    /// over every step of every seed.
    pub d_c: f64,
    /// `sum R_sum / sum bits` over every step of every seed.
    pub efficiency: f64,
}

/// The schemes: label, method, per-layer selection, `r/k` (`None`: the base's, K).
const SCHEMES: [(&str, TrainMethod, bool, Option<f64>); 6] = [
    ("global rTop-k", TrainMethod::Rtopk, false, None),
    ("global top-k", TrainMethod::Topk, false, None),
    (
        "per-layer rTop-k, uniform k_l",
        TrainMethod::Rtopk,
        true,
        None,
    ),
    (
        "per-layer top-k, uniform k_l",
        TrainMethod::Topk,
        true,
        None,
    ),
    (
        "adaptive rTop-k (P1 k_l)",
        TrainMethod::Adaptive,
        true,
        None,
    ),
    (
        "adaptive top-k (P1 k_l)",
        TrainMethod::Adaptive,
        true,
        Some(1.0),
    ),
];

/// Runs every scheme at `ratio` for `seeds` seeds through `run`; `log` gets one line per run.
pub(crate) fn compare(
    base: &TrainConfig,
    ratio: f64,
    seeds: usize,
    run: impl Fn(&TrainConfig) -> Result<TrainReport>,
    mut log: impl FnMut(&str),
) -> Result<Vec<AdaptiveRow>> {
    let mut rows = Vec::new();
    for (label, method, per_layer, r_over_k) in SCHEMES {
        let cfg = |seed| TrainConfig {
            method,
            ratio,
            per_layer,
            r_over_k: r_over_k.unwrap_or(base.r_over_k),
            seed,
            ..base.clone()
        };
        rows.push(seeds_row(label, seeds, cfg, &run, &mut log)?);
    }
    Ok(rows)
}

/// One configuration over `seeds` seeds (`cfg(seed)`) through `run`: accuracies, divergences,
/// bits, distortion and efficiency; `log` gets one line per run, labelled `label`.
pub(crate) fn seeds_row(
    label: &str,
    seeds: usize,
    cfg: impl Fn(u64) -> TrainConfig,
    run: &impl Fn(&TrainConfig) -> Result<TrainReport>,
    log: &mut impl FnMut(&str),
) -> Result<AdaptiveRow> {
    let mut row = AdaptiveRow {
        label: label.to_string(),
        accuracies: Vec::new(),
        diverged: 0,
        bits_per_worker_step: 0.0,
        d_c: 0.0,
        efficiency: 0.0,
    };
    let (mut d_c, mut steps, mut r_sum, mut bits) = (0.0, 0usize, 0.0, 0.0);
    for seed in 0..seeds as u64 {
        match run(&cfg(seed)) {
            Ok(r) => {
                let acc = r.epochs.last().map_or(0.0, |e| e.test_accuracy);
                log(&format!(
                    "{label}, seed {seed}: test accuracy {:.2}%",
                    100.0 * acc
                ));
                row.accuracies.push(acc);
                row.bits_per_worker_step +=
                    r.epochs.last().map_or(f64::NAN, |e| e.bits_per_worker_step);
                for m in &r.steps {
                    d_c += m.d_c;
                    r_sum += m.r_sum_bits;
                    bits += m.bits as f64;
                }
                steps += r.steps.len();
            }
            Err(TrainError::Gradsift(e)) => {
                log(&format!("{label}, seed {seed}: diverged ({e})"));
                row.diverged += 1;
            }
            Err(e) => return Err(e),
        }
    }
    row.bits_per_worker_step /= row.accuracies.len().max(1) as f64;
    row.d_c = d_c / steps.max(1) as f64;
    row.efficiency = r_sum / bits;
    Ok(row)
}

/// The report's section on the comparison.
pub(crate) fn report_section(
    rows: &[AdaptiveRow],
    base: &TrainConfig,
    ratio: f64,
    seconds: f64,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(
        w,
        "## 6. Adaptive per-layer k (problem P1) against uniform and global sparsifiers\n\n\
         Every scheme sends {:.1}% of the gradient per worker per step: global schemes \
         ceil(ratio n) elements, per-layer ones ceil(ratio n_l) per layer, and the adaptive \
         ones the same total sum_l ceil(ratio n_l), re-split every {} steps (and at each \
         epoch's start): problem P1 of the rate-distortion paper (Corollary 1, \
         `rd::allocate_distortion`) on the per-layer sigma_X^2, sigma_N^2 (EMA, factor {}) at \
         the squared error the previous step reached, each layer's share of elements \
         proportional to its optimal bits n_l R_sum,l(D_l), at least one per layer \
         (`rd::allocate_counts`; the counts reach the compressors as `Config::group_counts` \
         through `reconfigure`, residuals kept). rTop-k uses r_l = {} k_l; top-k r_l = k_l. \
         Equal element counts mean equal wire bits up to the Rice code of the index gaps (the bits \
         column). \
         D_c is the compression-added distortion per coordinate, ||g_hat - ybar||^2 / n, mean \
         over steps; R_sum/bits the efficiency of Section 1's runs, over all steps. Same \
         seeds, model and warm-up as Section 1.\n",
        100.0 * ratio,
        base.adapt_every,
        crate::train::ADAPT_EMA,
        base.r_over_k
    );
    let _ = writeln!(
        w,
        "| scheme | test accuracy, % (mean ± sd) | diverged | bits / worker / step | D_c | R_sum/bits |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for r in rows {
        let (m, sd) = super::mean_sd(&r.accuracies);
        let _ = writeln!(
            w,
            "| {} | {:.2} ± {:.2} | {} | {:.0} | {:.3e} | {:.4} |",
            r.label,
            100.0 * m,
            100.0 * sd,
            r.diverged,
            r.bits_per_worker_step,
            r.d_c,
            r.efficiency
        );
    }
    let find = |label: &str| rows.iter().find(|r| r.label.starts_with(label));
    let mut lines = Vec::new();
    for base in ["rTop-k", "top-k"] {
        let Some(a) = find(&format!("adaptive {base}")) else {
            continue;
        };
        for other in [format!("per-layer {base}"), format!("global {base}")] {
            let Some(o) = find(&other) else { continue };
            let (ma, sa) = super::mean_sd(&a.accuracies);
            let (mo, so) = super::mean_sd(&o.accuracies);
            lines.push(format!(
                "adaptive {base} against {}: {:+.2} accuracy points ({}), D_c x{:.2}, R_sum/bits x{:.2}",
                o.label,
                100.0 * (ma - mo),
                if a.accuracies.len() < 2 || o.accuracies.len() < 2 {
                    "one seed: undecided"
                } else if (ma - mo).abs() > sa.max(so) {
                    "more than the larger sd"
                } else {
                    "within the seeds' sd: undecided"
                },
                a.d_c / o.d_c,
                a.efficiency / o.efficiency
            ));
        }
    }
    let _ = writeln!(
        w,
        "\n**Verdict.** {}. D_c and R_sum/bits ratios below/above 1 mean the adaptive split \
         spends the same elements with less distortion / more efficiently. Runtime of this \
         section: {seconds:.0} s (a configuration that section 1 already ran is not run \
         again).\n",
        lines.join("; ")
    );
    md
}
