//! The WGSL entry points, one table per shader module: each pass is an enum variant, the
//! pipelines are built in table order and found by index, so recording a pass that has no
//! pipeline does not compile (a test checks every table against its shader's `@compute`
//! functions).

/// A shader module's table of passes.
pub(crate) trait Pass: Copy + 'static {
    /// Every pass, in the order the pipelines are built.
    const ALL: &'static [Self];
    /// The shader file in `shaders/`.
    const FILE: &'static str;
    /// The WGSL entry point.
    fn entry(self) -> &'static str;
    /// Position in [`Pass::ALL`].
    fn index(self) -> usize;
}

macro_rules! passes {
    ($(#[$m:meta])* $name:ident in $file:literal { $($v:ident = $e:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum $name {
            $(#[doc = concat!("`", $e, "`.")] $v),*
        }

        impl Pass for $name {
            const ALL: &'static [Self] = &[$($name::$v),*];
            const FILE: &'static str = $file;
            fn entry(self) -> &'static str {
                match self {
                    $($name::$v => $e),*
                }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

passes! {
    /// `shaders/compress.wgsl`: the error-feedback step and the refund.
    CompressPass in "compress.wgsl" {
        Accumulate = "accumulate",
        Prep = "prep",
        Pivot = "pivot",
        CompactTiles = "compact_tiles",
        CompactList = "compact_list",
        HistList = "hist_list",
        ScanBlocks = "scan_blocks",
        ScanTop = "scan_top",
        EmitPayload = "emit_payload",
        SignPartial = "sign_partial",
        SignScale = "sign_scale",
        SignApply = "sign_apply",
        QsgdPartial = "qsgd_partial",
        QsgdScale = "qsgd_scale",
        QsgdApply = "qsgd_apply",
        Flip = "flip",
        Refund = "refund",
    }
}

passes! {
    /// `shaders/aggregate.wgsl`: the server's decoder.
    AggregatePass in "aggregate.wgsl" {
        Clear = "clear",
        Scatter = "scatter",
        AddSign = "add_sign",
        DecodeQsgd = "decode_qsgd",
        AddDecoded = "add_decoded",
        Finish = "finish",
    }
}

passes! {
    /// `shaders/stats.wgsl`: per-layer statistics and the variance estimator.
    StatsPass in "stats.wgsl" {
        StatsPartial = "stats_partial",
        StatsReduce = "stats_reduce",
        M2Partial = "m2_partial",
        M2Reduce = "m2_reduce",
        VarPartial = "var_partial",
        VarReduce = "var_reduce",
        VarM2Partial = "var_m2_partial",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `@compute` functions of a shader, in file order.
    fn computes(file: &str) -> Vec<String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("shaders")
            .join(file);
        let src = std::fs::read_to_string(path).unwrap();
        let mut out = Vec::new();
        let mut compute = false;
        for line in src.lines() {
            let t = line.trim_start();
            if t.starts_with("@compute") {
                compute = true;
            }
            if compute && let Some(rest) = t.strip_prefix("fn ") {
                out.push(rest.split('(').next().unwrap().trim().to_string());
                compute = false;
            }
        }
        out
    }

    fn check<P: Pass>() {
        let mut listed: Vec<String> = P::ALL.iter().map(|p| p.entry().to_string()).collect();
        let mut found = computes(P::FILE);
        listed.sort();
        found.sort();
        assert_eq!(
            listed,
            found,
            "{}: the table against its @compute functions",
            P::FILE
        );
        for (i, p) in P::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
        }
    }

    #[test]
    fn tables_match_the_shaders() {
        check::<CompressPass>();
        check::<AggregatePass>();
        check::<StatsPass>();
    }
}
