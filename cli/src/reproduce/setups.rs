//! `gradsift reproduce`'s section on the rTop-k paper's ordering claim (rTop-k at least as
//! accurate as top-k at the same compression) under the paper's own training set-ups: a
//! learning rate chosen per method from a small grid, the paper's averaging rule with
//! Algorithm 1's r/k scaling and a 5-epoch warm-up, the federated setting (local steps), and
//! a small CNN; and the rate-distortion paper's Fig. 7 gap and Fig. 8 rho sweep in that
//! paper's own configuration (K = 10, batch 128, lr 0.01, momentum 0.5).

use super::adaptive::{AdaptiveRow, seeds_row};
use super::claims::{Threshold, threshold};
use super::{RhoPoint, TARGET_LOSS, mean_sd, rho_sweep, rho_table};
use crate::error::Result;
use crate::model::Arch;
use crate::train::{TrainConfig, TrainMethod, TrainReport};
use gradsift::Average;
use std::fmt::Write as _;

/// Learning rates of the grid (the default run uses 0.05).
pub const LR_GRID: [f64; 3] = [0.02, 0.05, 0.1];
/// Local steps per round of the federated set-up.
pub const LOCAL_STEPS: usize = 4;

/// One set-up: rTop-k and top-k at the same compression.
#[derive(Debug, Clone)]
pub struct SetupPair {
    /// What differs from section 1.
    pub setup: String,
    /// rTop-k's row.
    pub rtopk: AdaptiveRow,
    /// Top-k's row.
    pub topk: AdaptiveRow,
}

impl SetupPair {
    /// rTop-k's mean accuracy minus top-k's, in points; `None` where either diverged in
    /// every seed (there is no mean to subtract).
    pub fn gap(&self) -> Option<f64> {
        let (r, t) = (&self.rtopk.accuracies, &self.topk.accuracies);
        (!r.is_empty() && !t.is_empty()).then(|| 100.0 * (mean_sd(r).0 - mean_sd(t).0))
    }

    /// [`Self::gap`] for the report: signed points, or which side diverged in every seed.
    pub fn gap_text(&self) -> String {
        super::claims::gap_text(&self.rtopk.accuracies, &self.topk.accuracies)
    }

    /// The paper's ordering in this set-up: reproduced, not reproduced, or undecided.
    pub fn verdict(&self) -> &'static str {
        super::claims::ordering_verdict(&self.rtopk.accuracies, &self.topk.accuracies)
    }
}

/// The Fig. 7 gap of scaled sign in one configuration.
#[derive(Debug, Clone)]
pub struct SignGap {
    /// The configuration, in words.
    pub setup: String,
    /// Mean over steps of `R_in(D_sign)` and `R_sum(D_sign)` at the Gaussian model's
    /// distortion of scaled sign (the paper's curves), bits per coordinate (all workers).
    pub r_in: f64,
    /// See `r_in`.
    pub r_sum: f64,
    /// Mean wire bits per coordinate (all workers).
    pub sent: f64,
    /// `R_in - R_sum` over the first tenth of the steps (at least one), as a fraction of
    /// that tenth's `R_in`: where the paper's gap is largest.
    pub early_gap: f64,
    /// Final test accuracy.
    pub accuracy: f64,
}

impl SignGap {
    /// `R_in - R_sum` as a fraction of `R_in`, over all steps.
    pub fn relative_gap(&self) -> f64 {
        (self.r_in - self.r_sum) / self.r_in
    }
}

/// Everything the section reports.
#[derive(Debug, Clone)]
pub struct Setups {
    /// The learning-rate grid: one row per method and rate.
    pub grid: Vec<(f64, AdaptiveRow)>,
    /// The set-ups, each a pair.
    pub pairs: Vec<SetupPair>,
    /// Scaled sign's gap in the default and in the rate-distortion paper's configuration.
    pub sign: Vec<SignGap>,
    /// Fig. 8's points in the rate-distortion paper's configuration, by increasing rho.
    pub rho: Vec<RhoPoint>,
    /// That configuration.
    pub rho_base: TrainConfig,
    /// The step cap of its runs.
    pub rho_cap: usize,
}

/// The most accurate rate of `method`'s grid rows (`label` prefix).
fn best_lr(grid: &[(f64, AdaptiveRow)], label: &str) -> f64 {
    grid.iter()
        .filter(|(_, r)| r.label.starts_with(label))
        .max_by(|a, b| {
            mean_sd(&a.1.accuracies)
                .0
                .total_cmp(&mean_sd(&b.1.accuracies).0)
        })
        .map_or(0.05, |(lr, _)| *lr)
}

fn sign_gap(setup: &str, r: &TrainReport) -> SignGap {
    let f = super::fig7_series(r);
    let mean = |v: &[(f64, f64)]| v.iter().map(|p| p.1).sum::<f64>() / v.len().max(1) as f64;
    let tenth = |v: &[(f64, f64)]| mean(&v[..(v.len() / 10).max(1).min(v.len())]);
    let early_in = tenth(&f.r_in_model);
    SignGap {
        setup: setup.to_string(),
        r_in: mean(&f.r_in_model),
        r_sum: mean(&f.r_sum_model),
        sent: mean(&f.sent),
        early_gap: (early_in - tenth(&f.r_sum_model)) / early_in,
        accuracy: r.epochs.last().map_or(0.0, |e| e.test_accuracy),
    }
}

/// The configurations of `method` on `cfg`, one per seed.
fn with(method: TrainMethod, cfg: &TrainConfig) -> impl Fn(u64) -> TrainConfig + '_ {
    move |seed| TrainConfig {
        method,
        seed,
        ..cfg.clone()
    }
}

/// Runs the set-ups at compression `1 - ratio` (the CNN at `cnn_ratio`) for `seeds` seeds
/// through `run` (which caches configurations section 1 already ran), then Fig. 7 and
/// Fig. 8 (at `paper_rhos`, starting at 0) in the rate-distortion paper's configuration
/// for `paper_epochs` epochs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compare(
    base: &TrainConfig,
    ratio: f64,
    cnn_ratio: f64,
    seeds: usize,
    paper_epochs: usize,
    paper_rhos: &[f64],
    run: impl Fn(&TrainConfig) -> Result<TrainReport>,
    mut log: impl FnMut(&str),
) -> Result<Setups> {
    let at_ratio = TrainConfig {
        ratio,
        ..base.clone()
    };
    let grid = lr_grid(&at_ratio, seeds, &run, &mut log)?;
    let best = (best_lr(&grid, "rTop-k"), best_lr(&grid, "top-k"));
    let mut pairs = Vec::new();
    for (setup, r_cfg, t_cfg) in setup_configs(base, &at_ratio, cnn_ratio, best) {
        let rtopk = seeds_row(
            &format!("rTop-k, {setup}"),
            seeds,
            with(TrainMethod::Rtopk, &r_cfg),
            &run,
            &mut log,
        )?;
        let topk = seeds_row(
            &format!("top-k, {setup}"),
            seeds,
            with(TrainMethod::Topk, &t_cfg),
            &run,
            &mut log,
        )?;
        pairs.push(SetupPair { setup, rtopk, topk });
    }
    // Fig. 7 and Fig. 8 in the rate-distortion paper's configuration: K = 10, batch 128
    // per worker, lr 0.01, momentum 0.5, trained as long as that configuration needs.
    let paper = TrainConfig {
        method: TrainMethod::Sign,
        workers: 10,
        batch: 128,
        lr: 0.01,
        momentum: 0.5,
        epochs: paper_epochs,
        ..base.clone()
    };
    let sign = sign_gaps(base, &paper, &run, &mut log)?;
    let rho_base = TrainConfig {
        method: TrainMethod::None,
        ..paper
    };
    let (rho, rho_cap) = rho_sweep(&rho_base, paper_rhos, None, &run, &mut log)?;
    Ok(Setups {
        grid,
        pairs,
        sign,
        rho,
        rho_base,
        rho_cap,
    })
}

/// The learning-rate grid: rTop-k and top-k at every rate of [`LR_GRID`] on `at_ratio`.
fn lr_grid(
    at_ratio: &TrainConfig,
    seeds: usize,
    run: &impl Fn(&TrainConfig) -> Result<TrainReport>,
    log: &mut impl FnMut(&str),
) -> Result<Vec<(f64, AdaptiveRow)>> {
    let mut grid = Vec::new();
    for lr in LR_GRID {
        let cfg = TrainConfig {
            lr: lr as f32,
            ..at_ratio.clone()
        };
        for (name, method) in [("rTop-k", TrainMethod::Rtopk), ("top-k", TrainMethod::Topk)] {
            let label = format!("{name}, lr {lr}");
            grid.push((lr, seeds_row(&label, seeds, with(method, &cfg), run, log)?));
        }
    }
    Ok(grid)
}

/// The set-ups in words with rTop-k's and top-k's configuration each; `(lr_r, lr_t)` are
/// the methods' best rates of the grid.
fn setup_configs(
    base: &TrainConfig,
    at_ratio: &TrainConfig,
    cnn_ratio: f64,
    (lr_r, lr_t): (f64, f64),
) -> [(String, TrainConfig, TrainConfig); 4] {
    [
        (
            format!("each at its best rate of the grid (rTop-k {lr_r}, top-k {lr_t})"),
            TrainConfig {
                lr: lr_r as f32,
                ..at_ratio.clone()
            },
            TrainConfig {
                lr: lr_t as f32,
                ..at_ratio.clone()
            },
        ),
        (
            format!(
                "the paper's rule: over-senders averaging, r/k scaling, {}-epoch warm-up",
                5.min(base.epochs)
            ),
            TrainConfig {
                average: Average::OverSenders,
                unbiased: true,
                warmup_epochs: 5.min(base.epochs),
                ..at_ratio.clone()
            },
            TrainConfig {
                average: Average::OverSenders,
                warmup_epochs: 5.min(base.epochs),
                ..at_ratio.clone()
            },
        ),
        (
            format!("federated: {LOCAL_STEPS} local steps per round"),
            TrainConfig {
                local_steps: LOCAL_STEPS,
                ..at_ratio.clone()
            },
            TrainConfig {
                local_steps: LOCAL_STEPS,
                ..at_ratio.clone()
            },
        ),
        (
            format!(
                "the small CNN, per layer, {:.0}% compression",
                100.0 * (1.0 - cnn_ratio)
            ),
            TrainConfig {
                model: Arch::Cnn,
                per_layer: true,
                ratio: cnn_ratio,
                ..base.clone()
            },
            TrainConfig {
                model: Arch::Cnn,
                per_layer: true,
                ratio: cnn_ratio,
                ..base.clone()
            },
        ),
    ]
}

/// Scaled sign's Fig. 7 gap in section 1's configuration `base` and in the paper's.
fn sign_gaps(
    base: &TrainConfig,
    paper: &TrainConfig,
    run: &impl Fn(&TrainConfig) -> Result<TrainReport>,
    log: &mut impl FnMut(&str),
) -> Result<Vec<SignGap>> {
    let mine = TrainConfig {
        method: TrainMethod::Sign,
        ..base.clone()
    };
    let paper_epochs = paper.epochs;
    let mut sign = Vec::new();
    for (setup, cfg) in [
        (
            format!(
                "section 1's: K = {}, batch {}, lr {}, momentum {}",
                mine.workers, mine.batch, mine.lr, mine.momentum
            ),
            mine,
        ),
        (
            format!("the paper's: K = 10, batch 128, lr 0.01, momentum 0.5, {paper_epochs} epochs"),
            paper.clone(),
        ),
    ] {
        let r = run(&cfg)?;
        log(&format!(
            "scaled sign, {setup}: test accuracy {:.2}%",
            100.0 * r.epochs.last().map_or(0.0, |e| e.test_accuracy)
        ));
        sign.push(sign_gap(&setup, &r));
    }
    Ok(sign)
}

/// The report's section; `plot` is the paper-configuration Fig. 8's file name, `section4`
/// section 4's points and `section1_gain` its lr / (1 - momentum).
pub(crate) fn report_section(
    s: &Setups,
    ratio: f64,
    seconds: f64,
    plot: &str,
    section4: &[RhoPoint],
    section1_gain: f64,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    write_grid(w, s, ratio);
    write_pairs(w, s);
    write_sign(w, s);
    write_fig8(w, s, plot, section4, section1_gain);
    let _ = writeln!(
        w,
        "Runtime of this section: {seconds:.0} s (configurations that earlier sections ran \
         are not run again).\n"
    );
    md
}

/// The section's opening and the learning-rate grid's table.
fn write_grid(w: &mut String, s: &Setups, ratio: f64) {
    let _ = writeln!(
        w,
        "## 7. The ordering claim under the paper's set-ups\n\n\
         The rTop-k paper's claim is that rTop-k is at least as accurate as top-k at the same \
         compression. Section 1 tests it in one set-up; here at {:.1}% compression (the CNN \
         at its own ratio) in each of the paper's, same seeds and epochs as section 1. \
         Learning rates first, since a fair comparison needs each method at its own best:\n",
        100.0 * (1.0 - ratio)
    );
    let _ = writeln!(
        w,
        "| method, learning rate | test accuracy, % (mean ± sd) | diverged |"
    );
    let _ = writeln!(w, "|---|---|---|");
    for (_, r) in &s.grid {
        let (m, sd) = mean_sd(&r.accuracies);
        let _ = writeln!(
            w,
            "| {} | {:.2} ± {:.2} | {} |",
            r.label,
            100.0 * m,
            100.0 * sd,
            r.diverged
        );
    }
}

/// The set-ups' table and the verdict on the ordering.
fn write_pairs(w: &mut String, s: &Setups) {
    let _ = writeln!(
        w,
        "\n| set-up | rTop-k, % | top-k, % | rTop-k - top-k, points | verdict |\n|---|---|---|---|---|"
    );
    for p in &s.pairs {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            p.setup,
            accuracy_cell(&p.rtopk),
            accuracy_cell(&p.topk),
            p.gap_text(),
            p.verdict()
        );
    }
    let reproduced = s
        .pairs
        .iter()
        .filter(|p| p.verdict().starts_with("reproduced"))
        .count();
    let _ = writeln!(
        w,
        "\n**Verdict.** The ordering is reproduced in {reproduced} of {} set-ups on this \
         model and data. The likely reasons, not tested here: the paper's evidence is \
         ResNet-18 on CIFAR-10, whose gradients are less concentrated than a small network's \
         on 8,000 digits, and here top-k with error feedback already sits near the \
         uncompressed baseline, which leaves rTop-k's exploration little to win. At the \
         paper's scale the claim is not decidable on two CPU cores.\n",
        s.pairs.len()
    );
}

/// Fig. 7's gap in both configurations.
fn write_sign(w: &mut String, s: &Setups) {
    let _ = writeln!(
        w,
        "Fig. 7 of the rate-distortion paper in its own configuration: scaled sign's mean \
         bits per coordinate (all workers) against `R_in(D_sign)` and `R_sum(D_sign)` at \
         the Gaussian model's distortion of scaled sign (section 3), mean over steps, so \
         that the size of the gap is compared like with like:\n\n\
         | configuration | sent | R_in(D_sign) | R_sum(D_sign) | R_in - R_sum | R_in - R_sum, first tenth of the steps | test accuracy, % |\n\
         |---|---|---|---|---|---|---|"
    );
    for g in &s.sign {
        let _ = writeln!(
            w,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} ({:.1}%) | {:.1}% | {:.2} |",
            g.setup,
            g.sent,
            g.r_in,
            g.r_sum,
            g.r_in - g.r_sum,
            100.0 * g.relative_gap(),
            100.0 * g.early_gap,
            100.0 * g.accuracy
        );
    }
}

/// Fig. 8 in the paper's configuration and its threshold against section 4's.
fn write_fig8(w: &mut String, s: &Setups, plot: &str, section4: &[RhoPoint], section1_gain: f64) {
    let b = &s.rho_base;
    let cap = s.rho_cap;
    let _ = writeln!(
        w,
        "\nFig. 8 in the same configuration (section 4 has it in section 1's), so that the \
         divergence threshold in rho is compared like with like: the uncompressed baseline \
         with noise injected at D(t) = sigma_N^2(t)/K (1 + rho), until the smoothed training \
         loss reaches {TARGET_LOSS} or for at most {cap} steps ({} epochs); the \
         baseline's statistics are this configuration's own rho = 0 run, up to the target.\n\n\
         ![iterations and sum rate against rho, the paper's configuration]({plot})\n\n{}",
        b.epochs,
        rho_table(&s.rho)
    );
    let (paper, mine) = (threshold(&s.rho), threshold(section4));
    let _ = writeln!(
        w,
        "The paper: iterations grow slowly below rho = 100 and sharply beyond, with no \
         convergence beyond 10^3. First rho that does not reach the target here: {} in the \
         paper's configuration, {} in section 1's. The noise reaches the weights amplified by \
         lr / (1 - momentum): {:.2} in the paper's configuration against {:.2} in section \
         1's. {}\n",
        paper,
        mine,
        f64::from(b.lr) / (1.0 - f64::from(b.momentum)),
        section1_gain,
        match (paper, mine) {
            (Threshold::At(p) | Threshold::Beyond(p), Threshold::At(m)) if p > m =>
                "The threshold moves up with the smaller gain, as that amplification predicts: \
                 section 4's early failures come from its configuration, not from a \
                 disagreement with the paper.",
            (Threshold::At(_) | Threshold::Beyond(_), Threshold::At(_)) =>
                "**The threshold does not move up with the smaller gain**: the amplification \
                 does not explain section 4's early failures.",
            _ => "The two thresholds cannot be compared here.",
        }
    );
}

/// Mean ± sd over the seeds that did not diverge, and how many did.
fn accuracy_cell(r: &AdaptiveRow) -> String {
    if r.accuracies.is_empty() {
        return format!("diverged in all {} seeds", r.diverged);
    }
    let (m, sd) = mean_sd(&r.accuracies);
    let note = if r.diverged > 0 {
        format!(" ({} diverged)", r.diverged)
    } else {
        String::new()
    };
    format!("{:.2} ± {:.2}{note}", 100.0 * m, 100.0 * sd)
}
