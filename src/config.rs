//! What a compressor does: method, counts, scaling, momentum, value format, randomness.

use crate::{DType, Error, Layout, Mode, Result};
use std::ops::Range;

/// How many elements to keep, per group (the whole buffer, or one layer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    /// A fraction `rho` in `[0, 1]` of the group: `min(n_g, ceil(rho * n_g))`, computed in f64.
    Ratio(f64),
    /// An explicit count, clamped to the group size.
    Exact(u64),
}

impl Count {
    /// The count for a group of `n` elements (SPEC §2).
    pub fn resolve(self, n: usize) -> usize {
        match self {
            Count::Ratio(rho) => ((rho * n as f64).ceil() as usize).min(n),
            Count::Exact(c) => (c.min(n as u64)) as usize,
        }
    }

    fn validate(self, name: &str) -> Result<()> {
        match self {
            Count::Ratio(rho) if !(0.0..=1.0).contains(&rho) => Err(Error::InvalidConfig(format!(
                "{name} ratio must lie in [0, 1], got {rho}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The compressor `C` of the error-feedback step (SPEC §4, §6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// rTop-k (Alg. 1 of the rTop-k paper): the top `r` by magnitude, then `k` of those
    /// uniformly at random. Requires `k <= r`.
    RTopK {
        /// Candidates kept by magnitude.
        r: Count,
        /// Elements sent, drawn from the candidates.
        k: Count,
    },
    /// Top-k by magnitude (rTop-k with `r = k`).
    TopK {
        /// Elements sent.
        k: Count,
    },
    /// Uniform random-k (rTop-k with `r = n`).
    RandomK {
        /// Elements sent.
        k: Count,
    },
    /// Scaled sign: one bit per element plus one f32 scale `mean |p|` per group (SPEC §6).
    Sign,
    /// QSGD-style stochastic quantisation (SPEC §13): every element rounded to one of
    /// `levels` magnitude levels of its group's `max |p|`, up or down at random with the
    /// probability that makes it unbiased, keyed by Philox so that every backend rounds
    /// alike; `1 + ceil(log2(levels + 1))` bits per element plus one f32 per group.
    Qsgd {
        /// Quantisation levels `s`, `1..=127` (`s = 1` is ternary, 2 bits per element).
        levels: u8,
        /// Keep what the rounding lost in the residual (SPEC §5, the default of
        /// [`Config::qsgd`]); `false` is QSGD as published: the residual stays 0, so each
        /// step quantises the fresh gradient alone (no momentum correction then).
        error_feedback: bool,
    },
}

/// Most levels [`Method::Qsgd`] takes: a signed level fits an `i8`, 8 bits on the wire.
pub const QSGD_MAX_LEVELS: u8 = 127;

/// The compressors by name: the one spelling that [`Method`], the CLI, the Python package
/// and the reports share (a new codec adds its row here).
///
/// # Examples
/// ```
/// use gradsift::{Config, MethodKind};
/// let kind: MethodKind = "rtopk".parse()?;
/// assert_eq!(kind, Config::rtopk(0.1, 0.01).method.kind());
/// assert_eq!(kind.to_string(), "rtopk");
/// assert!("powersgd".parse::<MethodKind>().is_err());
/// # Ok::<(), gradsift::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodKind {
    /// [`Method::TopK`]: `"topk"`.
    TopK,
    /// [`Method::RandomK`]: `"randomk"`.
    RandomK,
    /// [`Method::RTopK`]: `"rtopk"`.
    RTopK,
    /// [`Method::Sign`]: `"sign"`.
    Sign,
    /// [`Method::Qsgd`]: `"qsgd"`.
    Qsgd,
}

impl MethodKind {
    /// Every method, in the order the documentation lists them.
    pub const ALL: [MethodKind; 5] = [
        MethodKind::TopK,
        MethodKind::RandomK,
        MethodKind::RTopK,
        MethodKind::Sign,
        MethodKind::Qsgd,
    ];

    /// Its name, as the CLI and the Python package spell it.
    pub const fn name(self) -> &'static str {
        match self {
            MethodKind::TopK => "topk",
            MethodKind::RandomK => "randomk",
            MethodKind::RTopK => "rtopk",
            MethodKind::Sign => "sign",
            MethodKind::Qsgd => "qsgd",
        }
    }
}

impl std::fmt::Display for MethodKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MethodKind {
    type Err = Error;

    /// # Errors
    /// [`Error::InvalidConfig`] naming every method, for a name that is none of them.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL.iter().map(|m| format!("'{m}'")).collect();
                Error::InvalidConfig(format!(
                    "method must be one of {}, got {s:?}",
                    names.join(", ")
                ))
            })
    }
}

impl Method {
    /// Which compressor this is, without its counts.
    pub const fn kind(&self) -> MethodKind {
        match self {
            Method::RTopK { .. } => MethodKind::RTopK,
            Method::TopK { .. } => MethodKind::TopK,
            Method::RandomK { .. } => MethodKind::RandomK,
            Method::Sign => MethodKind::Sign,
            Method::Qsgd { .. } => MethodKind::Qsgd,
        }
    }
}

/// Whether sent values are rescaled (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scale {
    /// Values travel as they are.
    #[default]
    None,
    /// Each value is multiplied by `f32(r) / f32(k)` of its group, so that the server's
    /// estimate is unbiased for the top-r vector.
    Unbiased,
}

/// Configuration of a compression plan. Build with [`Config::rtopk`] and friends, then adjust
/// fields; plans validate it at construction.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The compressor.
    pub method: Method,
    /// Global or per-layer selection.
    pub mode: Mode,
    /// Value rescaling.
    pub scale: Scale,
    /// DGC momentum-correction factor `m` in `[0, 1)`; `0` is plain error feedback.
    pub momentum: f32,
    /// Format values travel in; the rounding error stays in the residual.
    pub values: DType,
    /// Seed of the random keys (SPEC §3).
    pub seed: u64,
    /// This worker's id `w`. Give every worker the same id to make plain random-k pick the
    /// same indices everywhere (so payloads can be all-reduced).
    pub worker: u32,
    /// Explicit counts `(r_g, k_g)` of each group, in group order, for [`Method::RTopK`]:
    /// they replace the method's `r` and `k` group by group (e.g. an adaptive per-layer
    /// allocation of `k` under a bit budget). Empty (the default): the method's counts
    /// apply. Each count is clamped to its group's size like [`Count::Exact`]; then
    /// `k_g > r_g`, a length other than the number of groups, or another method is an
    /// error at plan construction (top-k is `r_g = k_g`, random-k is `r_g = n_g`: write
    /// them as such).
    pub group_counts: Vec<(u64, u64)>,
}

impl Config {
    /// A configuration for `method` with defaults: global mode, unscaled f32 values, no
    /// momentum, seed 0, worker 0.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            mode: Mode::Global,
            scale: Scale::None,
            momentum: 0.0,
            values: DType::F32,
            seed: 0,
            worker: 0,
            group_counts: Vec::new(),
        }
    }

    /// rTop-k with ratios `rho_r >= rho_k`.
    pub fn rtopk(rho_r: f64, rho_k: f64) -> Self {
        Self::new(Method::RTopK {
            r: Count::Ratio(rho_r),
            k: Count::Ratio(rho_k),
        })
    }

    /// Top-k with ratio `rho_k`.
    pub fn topk(rho_k: f64) -> Self {
        Self::new(Method::TopK {
            k: Count::Ratio(rho_k),
        })
    }

    /// Random-k with ratio `rho_k`.
    pub fn randomk(rho_k: f64) -> Self {
        Self::new(Method::RandomK {
            k: Count::Ratio(rho_k),
        })
    }

    /// Scaled sign.
    pub fn sign() -> Self {
        Self::new(Method::Sign)
    }

    /// QSGD with `levels` quantisation levels and error feedback (SPEC §13; checked by
    /// [`Config::validate`]). Set the method's `error_feedback` to `false` for QSGD as
    /// published.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Config, Method};
    /// let c = Config::qsgd(7);
    /// assert_eq!(c.method, Method::Qsgd { levels: 7, error_feedback: true });
    /// assert!(Config::qsgd(0).validate().is_err());
    /// let plain = Config::new(Method::Qsgd { levels: 7, error_feedback: false });
    /// assert!(plain.validate().is_ok());
    /// ```
    pub fn qsgd(levels: u8) -> Self {
        Self::new(Method::Qsgd {
            levels,
            error_feedback: true,
        })
    }

    /// The same configuration for worker `worker` (which keys its random-k draws, SPEC §3).
    ///
    /// # Examples
    /// ```
    /// let c = gradsift::Config::randomk(0.01).with_worker(2);
    /// assert_eq!(c.worker, 2);
    /// ```
    pub fn with_worker(mut self, worker: u32) -> Self {
        self.worker = worker;
        self
    }

    /// Checks every field's domain.
    pub fn validate(&self) -> Result<()> {
        if !self.momentum.is_finite() || !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::InvalidConfig(format!(
                "momentum must lie in [0, 1), got {}",
                self.momentum
            )));
        }
        match self.method {
            Method::RTopK { r, k } => {
                r.validate("r")?;
                k.validate("k")?;
                let bad = match (r, k) {
                    (Count::Ratio(a), Count::Ratio(b)) => b > a,
                    (Count::Exact(a), Count::Exact(b)) => b > a,
                    _ => false,
                };
                if bad {
                    return Err(Error::InvalidConfig(format!(
                        "rTop-k needs k <= r, got r = {r:?}, k = {k:?}"
                    )));
                }
            }
            Method::TopK { k } | Method::RandomK { k } => k.validate("k")?,
            Method::Sign => {}
            Method::Qsgd {
                levels,
                error_feedback,
            } => {
                if !(1..=QSGD_MAX_LEVELS).contains(&levels) {
                    return Err(Error::InvalidConfig(format!(
                        "qsgd needs 1 <= levels <= {QSGD_MAX_LEVELS}, got {levels}"
                    )));
                }
                if !error_feedback && self.momentum != 0.0 {
                    return Err(Error::InvalidConfig(format!(
                        "qsgd without error feedback has no residual for momentum correction to act on (momentum {})",
                        self.momentum
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether the method sends a sparse set of (index, value) pairs.
    pub fn is_sparse(&self) -> bool {
        !matches!(self.method, Method::Sign | Method::Qsgd { .. })
    }

    /// The groups of `layout` under this config's mode, with their resolved counts and scale
    /// (SPEC §2). An explicit `k` that exceeds a group's resolved `r` is an error naming the
    /// group, whatever kind of count `r` is: `k` is never silently clamped to `r`.
    ///
    /// With [`Config::group_counts`] the counts are those, clamped to each group's size.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a configuration out of its domain ([`Config::validate`]),
    /// an explicit `k` above `r` in some group, or `group_counts` of the wrong length, with a
    /// method other than rTop-k, or with `k_g > r_g`.
    ///
    /// # Examples
    ///
    /// ```
    /// use gradsift::{Config, Layout, Mode};
    /// let layout = Layout::new(&[100, 10])?;
    /// let mut c = Config::rtopk(0.1, 0.02);
    /// c.mode = Mode::PerLayer;
    /// c.group_counts = vec![(20, 4), (50, 1)];
    /// let g = c.plan_groups(&layout)?;
    /// assert_eq!([(g[0].r, g[0].k), (g[1].r, g[1].k)], [(20, 4), (10, 1)]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn plan_groups(&self, layout: &Layout) -> Result<Vec<Group>> {
        self.validate()?;
        let ranges = layout.groups(self.mode);
        if !self.group_counts.is_empty()
            && (!matches!(self.method, Method::RTopK { .. })
                || self.group_counts.len() != ranges.len())
        {
            return Err(Error::InvalidConfig(format!(
                "group_counts needs rTop-k and one (r, k) per group: {} given for {} group(s) with {:?}",
                self.group_counts.len(),
                ranges.len(),
                self.method
            )));
        }
        ranges
            .into_iter()
            .enumerate()
            .map(|(gi, range)| {
                let n = range.len();
                let explicit = self.group_counts.get(gi).map(|&(r, k)| {
                    (
                        Count::Exact(r).resolve(n),
                        Count::Exact(k).resolve(n),
                    )
                });
                let (r, k) = match self.method {
                    Method::RTopK { .. } if explicit.is_some() => {
                        let (r, k) = explicit.expect("checked");
                        if k > r {
                            return Err(Error::InvalidConfig(format!(
                                "rTop-k needs k <= r: group {gi} of {n} elements has k = {k} > r = {r} (group_counts)"
                            )));
                        }
                        (r, k)
                    }
                    Method::RTopK { r: rc, k: kc } => {
                        let r = rc.resolve(n);
                        let k = kc.resolve(n);
                        if matches!(kc, Count::Exact(_)) && k > r {
                            let group = match self.mode {
                                Mode::Global => "the buffer (global mode)".to_string(),
                                Mode::PerLayer => format!("layer {gi}"),
                            };
                            return Err(Error::InvalidConfig(format!(
                                "rTop-k needs k <= r: in {group} of {n} elements the explicit k = {k} exceeds r = {r} (from {rc:?})"
                            )));
                        }
                        // A ratio k is at most r for validated ratios; min() is SPEC §2's form.
                        (r, k.min(r))
                    }
                    Method::TopK { k } => {
                        let k = k.resolve(n);
                        (k, k)
                    }
                    Method::RandomK { k } => (n, k.resolve(n)),
                    Method::Sign | Method::Qsgd { .. } => (n, n),
                };
                // Computed once on the host so every backend multiplies by the same f32.
                let scale = match self.scale {
                    Scale::Unbiased if k > 0 => r as f32 / k as f32,
                    _ => 1.0,
                };
                Ok(Group { range, r, k, scale })
            })
            .collect()
    }
}

/// One selection group of a plan: its element range and resolved counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Elements of the buffer this group covers.
    pub range: Range<usize>,
    /// Candidates by magnitude, `r_g <= n_g`.
    pub r: usize,
    /// Elements sent, `k_g <= r_g`.
    pub k: usize,
    /// Value multiplier, `f32(r_g) / f32(k_g)` with [`Scale::Unbiased`], else 1.
    pub scale: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_spec_ceil_and_clamp() {
        assert_eq!(Count::Ratio(0.001).resolve(1000), 1);
        assert_eq!(Count::Ratio(0.0011).resolve(1000), 2);
        assert_eq!(Count::Ratio(1.0).resolve(7), 7);
        assert_eq!(Count::Ratio(0.5).resolve(0), 0);
        assert_eq!(Count::Exact(10).resolve(3), 3);
    }

    #[test]
    fn invalid_configs_are_errors() {
        assert!(Config::rtopk(0.01, 0.02).validate().is_err());
        assert!(Config::rtopk(1.5, 0.1).validate().is_err());
        assert!(Config::topk(f64::NAN).validate().is_err());
        let mut c = Config::topk(0.1);
        c.momentum = 1.0;
        assert!(c.validate().is_err());
        c.momentum = f32::NAN;
        assert!(c.validate().is_err());
        let c = Config::new(Method::RTopK {
            r: Count::Exact(3),
            k: Count::Exact(4),
        });
        assert!(c.validate().is_err());
    }

    #[test]
    fn explicit_k_above_a_ratio_r_is_an_error() {
        // SPEC §2: an explicit k above the resolved r fails, also when r is a ratio.
        let layout = Layout::new(&[1000, 10, 0]).unwrap();
        let mut c = Config::new(Method::RTopK {
            r: Count::Ratio(0.1),
            k: Count::Exact(5),
        });
        c.mode = Mode::PerLayer;
        // Layer 0: r = 100, k = 5; layer 1: r = 1 < k = 5; the empty layer: r = k = 0.
        let err = c.plan_groups(&layout).unwrap_err();
        let Error::InvalidConfig(msg) = &err else {
            panic!("{err:?}")
        };
        assert!(
            msg.contains("layer 1") && msg.contains("k = 5") && msg.contains("r = 1"),
            "{msg}"
        );
        c.mode = Mode::Global;
        let g = c.plan_groups(&layout).unwrap();
        assert_eq!((g[0].r, g[0].k), (101, 5));
        let err = c.plan_groups(&Layout::single(20).unwrap()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(m) if m.contains("global")),
            "{err:?}"
        );
        // An explicit k is clamped to the group size first: small layers do not fail.
        let c = Config::new(Method::RTopK {
            r: Count::Exact(5),
            k: Count::Exact(5),
        });
        assert_eq!(c.plan_groups(&Layout::single(3).unwrap()).unwrap()[0].k, 3);
        // A ratio k is never an error at plan time.
        let mut c = Config::new(Method::RTopK {
            r: Count::Exact(2),
            k: Count::Ratio(0.5),
        });
        c.mode = Mode::PerLayer;
        let g = c.plan_groups(&layout).unwrap();
        assert_eq!((g[0].r, g[0].k), (2, 2));
    }

    #[test]
    fn group_counts_replace_the_counts_and_are_checked() {
        let layout = Layout::new(&[100, 0, 10]).unwrap();
        let mut c = Config::rtopk(0.1, 0.01);
        c.mode = Mode::PerLayer;
        c.scale = Scale::Unbiased;
        c.group_counts = vec![(30, 3), (5, 5), (20, 10)];
        let g = c.plan_groups(&layout).unwrap();
        assert_eq!((g[0].r, g[0].k, g[0].scale), (30, 3, 10.0));
        assert_eq!((g[1].r, g[1].k), (0, 0));
        assert_eq!((g[2].r, g[2].k, g[2].scale), (10, 10, 1.0));
        c.group_counts = vec![(30, 3), (5, 5), (2, 3)];
        assert!(c.plan_groups(&layout).is_err());
        c.group_counts = vec![(30, 3)];
        assert!(c.plan_groups(&layout).is_err());
        let mut t = Config::topk(0.1);
        t.group_counts = vec![(3, 3)];
        assert!(t.plan_groups(&Layout::single(10).unwrap()).is_err());
    }

    #[test]
    fn per_layer_groups_resolve_counts_per_layer() {
        let layout = Layout::new(&[1000, 0, 10]).unwrap();
        let mut c = Config::rtopk(0.01, 0.002);
        c.mode = Mode::PerLayer;
        c.scale = Scale::Unbiased;
        let g = c.plan_groups(&layout).unwrap();
        assert_eq!((g[0].r, g[0].k, g[0].scale), (10, 2, 5.0));
        assert_eq!((g[1].r, g[1].k, g[1].scale), (0, 0, 1.0));
        assert_eq!((g[2].r, g[2].k), (1, 1));
    }
}
