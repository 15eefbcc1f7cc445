// The one list of gradsift's CUDA kernels. Read with `include!` by build/cuda.rs (which
// files nvcc compiles and build.rs concatenates into the NVRTC program) and by
// src/cuda/kernels.rs (the embedded program, the entry points loaded from the module and
// the `Kernel` handles the launch code uses). Adding a kernel: define it in a unit below
// as `extern "C" __global__`, add a line here; nothing else is numbered by hand. A unit
// test checks this table against the `extern "C" __global__` definitions in `kernels/`.
//
// Syntax: `headers: [...]` lists the headers in the order the single NVRTC program pastes
// them (before every unit); then each unit in concatenation order with its kernels as
// `Handle = "entry_point" (Args)` or, for a kernel instantiated once per element type,
// `Handle = "base" [f32, f16, bf16] (Args)`, whose entry points are `base_f32`,
// `base_f16`, ...; `Args` is the struct it takes by value (a test checks it against the
// kernel's signature), and launches through the typed handle take exactly that type.

macro_rules! kernel_registry {
    (
        headers: [$($header:literal),* $(,)?],
        $($unit:literal: [$($kernel:ident = $base:literal $([$($dt:ident),+ $(,)?])? ($arg:ident)),* $(,)?]),* $(,)?
    ) => {
        /// Headers of `kernels/`, in the order the NVRTC program pastes them.
        pub const HEADERS: &[&str] = &[$($header),*];

        /// Translation units of `kernels/`, in the order nvcc and NVRTC concatenate them.
        pub const UNITS: &[&str] = &[$($unit),*];

        /// A kernel of `kernels/`: one entry point, or one per element type.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(clippy::enum_variant_names)]
        pub enum Kernel {
            $($(
                #[doc = concat!("`", $base, "` in `kernels/", $unit, "`.")]
                $kernel,
            )*)*
        }

        impl Kernel {
            /// Every kernel, in table order.
            pub const ALL: &'static [Kernel] = &[$($(Kernel::$kernel,)*)*];

            /// The unit defining it.
            pub const fn unit(self) -> &'static str {
                match self {
                    $($(Kernel::$kernel => $unit,)*)*
                }
            }

            /// Its entry point names: one, or `base_<dtype>` per instantiation.
            pub const fn entries(self) -> &'static [&'static str] {
                match self {
                    $($(Kernel::$kernel => kernel_registry!(@entries $base $([$($dt),+])?),)*)*
                }
            }

            /// The name of its one by-value argument struct (`src/cuda/abi.rs`, and the
            /// parameter type of its `.cu` signature).
            pub const fn args(self) -> &'static str {
                match self {
                    $($(Kernel::$kernel => stringify!($arg),)*)*
                }
            }

            /// The element types it is instantiated for (`"f32"`, ...), empty when it is
            /// not templated; `entries()[i]` is the instantiation for `dtypes()[i]`.
            pub const fn dtypes(self) -> &'static [&'static str] {
                match self {
                    $($(Kernel::$kernel => kernel_registry!(@dtypes $([$($dt),+])?),)*)*
                }
            }
        }

        // The includer decides what the rows' argument types become: typed launch handles in
        // src/cuda/kernels.rs, nothing in build/cuda.rs (which has no `abi`).
        kernel_args! { $($($kernel: $arg,)*)* }
    };
    (@entries $base:literal) => { &[$base] };
    (@entries $base:literal [$($dt:ident),+]) => { &[$(concat!($base, "_", stringify!($dt))),+] };
    (@dtypes) => { &[] };
    (@dtypes [$($dt:ident),+]) => { &[$(stringify!($dt)),+] };
}

kernel_registry! {
    headers: ["common.cuh", "select.cuh"],
    "accumulate.cu": [
        EfAccumulate = "ef_accumulate" [f32, f16, bf16] (AccArgs),
        EfBegin = "ef_begin" (StepBuffers),
        EfCommit = "ef_commit" (StepBuffers),
        EfRefund = "ef_refund" (RefundArgs),
    ],
    "select.cu": [
        SelReset = "sel_reset" (SelArgs),
        SelClearBits = "sel_clear_bits" (SelArgs),
        SelPass = "sel_pass" (SelArgs),
        SelFind = "sel_find" (SelArgs),
        CompactCount = "compact_count" (CompactArgs),
        CompactScan = "compact_scan" (CompactArgs),
        CompactEmit = "compact_emit" (CompactArgs),
        EmitRange = "emit_range" (CompactArgs),
        SelectSmall = "select_small" (SmallArgs),
    ],
    "sign.cu": [
        SignPartial = "sign_partial" (SignArgs),
        SignMerge = "sign_merge" (SignArgs),
        SignApply = "sign_apply" (SignArgs),
    ],
    "qsgd.cu": [
        QsgdPartial = "qsgd_partial" (QsgdArgs),
        QsgdMerge = "qsgd_merge" (QsgdArgs),
        QsgdApply = "qsgd_apply" (QsgdArgs),
    ],
    "stats.cu": [
        StatsItems = "stats_items" [f32, f16, bf16] (StatsArgs),
        StatsMerge = "stats_merge" (StatsArgs),
        VarItems = "var_items" [f32, f16, bf16] (VarArgs),
        VarMerge = "var_merge" (VarArgs),
    ],
    "aggregate.cu": [
        AggCheckSparse = "agg_check_sparse" (AggArgs),
        AggZero = "agg_zero" (AggArgs),
        AggScatter = "agg_scatter" (AggArgs),
        AggSign = "agg_sign" (AggArgs),
        AggCheckQsgd = "agg_check_qsgd" (AggArgs),
        AggQsgd = "agg_qsgd" (AggArgs),
        AggFinalize = "agg_finalize" (AggArgs),
    ],
}

/// How many entry points the table lists (templated kernels count once per dtype).
pub const ENTRY_COUNT: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < Kernel::ALL.len() {
        n += Kernel::ALL[i].entries().len();
        i += 1;
    }
    n
};

/// Every entry point, in table order: the order of the functions loaded from the module.
pub const KERNEL_NAMES: [&str; ENTRY_COUNT] = {
    let mut names = [""; ENTRY_COUNT];
    let mut n = 0;
    let mut i = 0;
    while i < Kernel::ALL.len() {
        let entries = Kernel::ALL[i].entries();
        let mut j = 0;
        while j < entries.len() {
            names[n] = entries[j];
            n += 1;
            j += 1;
        }
        i += 1;
    }
    names
};

impl Kernel {
    /// Index of its first entry point in [`KERNEL_NAMES`].
    pub const fn first_entry(self) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < self as usize {
            n += Kernel::ALL[i].entries().len();
            i += 1;
        }
        n
    }
}
