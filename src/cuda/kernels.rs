//! The kernels, from the single table in `kernels/registry.rs`: the program NVRTC compiles
//! (written by build.rs from the table's files), every entry point to load from the
//! module, and the [`Kernel`] handles the launch code names kernels by.

use crate::{DType, Error, Result};

/// The table itself; parts of it serve only build.rs or the tests.
#[allow(dead_code)]
mod registry {
    /// Each row's handle with the argument struct the row names.
    macro_rules! kernel_args {
        ($($kernel:ident: $arg:ident,)*) => {
            /// The table's kernels as typed handles ([`Typed`]), named as the [`Kernel`]
            /// variants: a launch takes exactly the argument struct the row names.
            #[allow(non_upper_case_globals)]
            pub mod typed {
                use crate::cuda::kernels::{Kernel, Typed};
                $(
                    #[doc = concat!("[`Kernel::", stringify!($kernel), "`], taking `", stringify!($arg), "`.")]
                    pub const $kernel: Typed<crate::cuda::abi::$arg> = Typed::new(Kernel::$kernel);
                )*
            }
        };
    }
    include!("../../kernels/registry.rs");
}
#[cfg(test)]
use registry::{ENTRY_COUNT, HEADERS, UNITS};
pub use registry::{KERNEL_NAMES, Kernel, typed};

/// A kernel of the table together with the by-value argument struct `A` its row names, so
/// that the launch code cannot pass it another one (the table is checked against the
/// kernels' signatures in the tests).
pub struct Typed<A> {
    kernel: Kernel,
    args: std::marker::PhantomData<fn(&A)>,
}

impl<A> Clone for Typed<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Typed<A> {}

impl<A> std::fmt::Debug for Typed<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({})", self.kernel, self.kernel.args())
    }
}

impl<A> Typed<A> {
    pub(crate) const fn new(kernel: Kernel) -> Self {
        Self {
            kernel,
            args: std::marker::PhantomData,
        }
    }

    /// The untyped kernel.
    pub const fn kernel(self) -> Kernel {
        self.kernel
    }
}

/// The whole program NVRTC compiles: every header, then every unit of the table, as one
/// source (build.rs concatenates them from `kernels/`).
const PROGRAM: &str = include_str!(concat!(env!("OUT_DIR"), "/gradsift_nvrtc.cu"));

/// The whole program NVRTC compiles: every file of `kernels/`, headers first.
pub fn kernel_source() -> String {
    PROGRAM.to_string()
}

/// The suffix of a dtype's instantiation in the table.
const fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

impl Kernel {
    /// Index in [`KERNEL_NAMES`] (and in a context's loaded functions) of the entry point
    /// to launch: the kernel itself (`dtype` `None`), or its instantiation for `dtype`.
    /// Errors when the table has no such entry point.
    pub(crate) fn entry(self, dtype: Option<DType>) -> Result<usize> {
        let dtypes = self.dtypes();
        let pos = match dtype {
            None if dtypes.is_empty() => Some(0),
            None => None,
            Some(d) => dtypes.iter().position(|s| *s == dtype_suffix(d)),
        };
        pos.map(|p| self.first_entry() + p)
            .ok_or_else(|| Error::Device {
                backend: "cuda",
                reason: match dtype {
                    None => format!("kernel {:?} is per dtype: launch it with one", self),
                    Some(d) => format!(
                        "kernel {:?} has no {} instantiation in kernels/registry.rs",
                        self,
                        dtype_suffix(d)
                    ),
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_resolve_to_their_names() {
        assert_eq!(KERNEL_NAMES.len(), ENTRY_COUNT);
        for &k in Kernel::ALL {
            if k.dtypes().is_empty() {
                assert_eq!(KERNEL_NAMES[k.entry(None).unwrap()], k.entries()[0]);
                assert!(k.entry(Some(DType::F32)).is_err());
            } else {
                assert!(k.entry(None).is_err());
                for d in [DType::F32, DType::F16, DType::BF16] {
                    let name = KERNEL_NAMES[k.entry(Some(d)).unwrap()];
                    assert!(name.ends_with(&format!("_{}", dtype_suffix(d))), "{name}");
                    assert!(k.entries().contains(&name));
                }
            }
        }
        assert_eq!(
            KERNEL_NAMES[Kernel::StatsItems.entry(Some(DType::BF16)).unwrap()],
            "stats_items_bf16"
        );
        assert_eq!(
            KERNEL_NAMES[Kernel::SelPass.entry(None).unwrap()],
            "sel_pass"
        );
        // Names are unique.
        let mut names = KERNEL_NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ENTRY_COUNT);
    }

    /// The table and `kernels/` agree: every file is listed, every listed entry point is
    /// defined in its unit, and every `extern "C" __global__` is listed.
    #[test]
    fn table_matches_the_sources() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".cu") || f.ends_with(".cuh"))
            .collect();
        files.sort();
        let mut listed: Vec<String> = HEADERS.iter().chain(UNITS).map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(
            files, listed,
            "kernels/registry.rs must list every file of kernels/"
        );

        let mut defined = Vec::new();
        for unit in UNITS {
            let src = std::fs::read_to_string(dir.join(unit)).unwrap();
            for line in src.lines() {
                let Some(rest) = line.trim_start().strip_prefix("extern \"C\" __global__") else {
                    continue;
                };
                // `void __launch_bounds__(256) name(Args a) {`: the word before the
                // parameter list, once the launch bounds are gone.
                let rest = match rest.find("__launch_bounds__") {
                    Some(i) => {
                        let close = i + rest[i..].find(')').unwrap();
                        format!("{} {}", &rest[..i], &rest[close + 1..])
                    }
                    None => rest.to_string(),
                };
                let mut halves = rest.splitn(2, '(');
                let name = halves.next().unwrap().split_whitespace().last().unwrap();
                // `Args a) {`: the parameter's type
                let arg = halves.next().unwrap().split_whitespace().next().unwrap();
                defined.push((unit.to_string(), name.to_string(), arg.to_string()));
            }
        }
        let mut table: Vec<(String, String, String)> = Kernel::ALL
            .iter()
            .flat_map(|k| {
                k.entries()
                    .iter()
                    .map(|e| (k.unit().to_string(), e.to_string(), k.args().to_string()))
            })
            .collect();
        defined.sort();
        table.sort();
        assert_eq!(
            defined, table,
            "kernels/registry.rs (unit, entry point, argument struct) against the extern \"C\" kernels"
        );

        // The embedded program is every listed file, headers first.
        let program = kernel_source();
        let mut at = 0;
        for name in HEADERS.iter().chain(UNITS) {
            let pos = program[at..]
                .find(&format!("// ---- {name}\n"))
                .unwrap_or_else(|| panic!("{name} missing or out of order in the program"));
            at += pos;
        }
    }
}
