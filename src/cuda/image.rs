//! Which kernel image to load on a device: cubins first (machine code for the device's
//! architecture: no JIT, and no dependency on the driver's PTX ISA version), then PTX,
//! which only a driver at least as new as the toolkit that wrote it can JIT. The decision
//! is a pure function of (driver version, device, available images) so it is tested
//! without a GPU; [`super::context`] gathers the inputs and makes the attempts in order.

use crate::{Error, Result};

/// A CUDA version as the driver API encodes it: `1000 * major + 10 * minor` (12080 is 12.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion(pub i32);

impl CudaVersion {
    /// From major and minor (13, 0).
    pub const fn new(major: i32, minor: i32) -> Self {
        Self(1000 * major + 10 * minor)
    }
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0 / 1000, (self.0 % 1000) / 10)
    }
}

/// One way to get the kernels onto the device, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// A cubin for `sm_<n>` from `GRADSIFT_CUBIN_DIR` (built by `compile_cubin` elsewhere,
    /// e.g. by scripts/gpu-stage.sh).
    FileCubin(u32),
    /// A cubin NVRTC compiles here for the device's exact architecture.
    NvrtcCubin(u32),
    /// The PTX nvcc built with the crate (build.rs), when there was an nvcc.
    PrecompiledPtx,
    /// PTX NVRTC compiles here.
    NvrtcPtx,
}

/// The device's architecture number: compute capability 9.0 is 90.
pub(crate) fn sm_of(cc: (u32, u32)) -> u32 {
    cc.0 * 10 + cc.1
}

/// Whether a cubin for `sm` runs on a device of compute capability `cc`: machine code is
/// compatible within a major version with an equal or newer minor (sm_80 runs on 8.6).
pub(crate) fn cubin_runs_on(sm: u32, cc: (u32, u32)) -> bool {
    sm / 10 == cc.0 && sm % 10 <= cc.1
}

/// The attempts to make, best first, or the error that explains why none can work.
///
/// - `driver`: `cuDriverGetVersion`;
/// - `cc`: the device's compute capability;
/// - `file_cubins`: architectures of the cubins on disk;
/// - `nvrtc`: the NVRTC version when libnvrtc is loadable (its PTX needs a driver at least
///   that new; its cubins need only the architecture);
/// - `precompiled_ptx`: whether build.rs embedded nvcc's PTX (its version is unknown here;
///   it is tried, and a failure to load it falls through).
pub(crate) fn plan(
    driver: CudaVersion,
    cc: (u32, u32),
    file_cubins: &[u32],
    nvrtc: Option<CudaVersion>,
    precompiled_ptx: bool,
) -> Result<Vec<Attempt>> {
    let mut cubins: Vec<u32> = file_cubins
        .iter()
        .copied()
        .filter(|&sm| cubin_runs_on(sm, cc))
        .collect();
    cubins.sort_unstable_by(|a, b| b.cmp(a));
    cubins.dedup();
    let mut v: Vec<Attempt> = cubins.into_iter().map(Attempt::FileCubin).collect();
    if nvrtc.is_some() {
        v.push(Attempt::NvrtcCubin(sm_of(cc)));
    }
    if precompiled_ptx {
        v.push(Attempt::PrecompiledPtx);
    }
    match nvrtc {
        Some(nv) if driver >= nv => v.push(Attempt::NvrtcPtx),
        Some(nv) if v.is_empty() => return Err(too_old(driver, nv, cc, "no cubin".into())),
        _ => {}
    }
    if v.is_empty() {
        return Err(Error::BackendUnavailable {
            backend: "cuda",
            reason: format!(
                "no kernels for sm_{}: no NVRTC to compile them, no precompiled PTX, and no \
                 cubin for it in GRADSIFT_CUBIN_DIR",
                sm_of(cc)
            ),
        });
    }
    Ok(v)
}

/// The typed error for a driver older than the PTX it was offered.
pub(crate) fn too_old(
    driver: CudaVersion,
    needs: CudaVersion,
    cc: (u32, u32),
    detail: String,
) -> Error {
    Error::CudaDriverTooOld {
        driver: driver.0,
        needs: needs.0,
        sm: sm_of(cc),
        detail,
    }
}

/// Cubin file name for `sm_<n>` in `GRADSIFT_CUBIN_DIR` (what scripts/gpu-stage.sh writes).
pub(crate) fn cubin_file_name(sm: u32) -> String {
    format!("gradsift_sm_{sm}.cubin")
}

/// Architectures of the cubins in `dir` (files named by [`cubin_file_name`]).
pub(crate) fn cubins_in(dir: &std::path::Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let name = e.ok()?.file_name().into_string().ok()?;
        name.strip_prefix("gradsift_sm_")?
            .strip_suffix(".cubin")?
            .parse()
            .ok()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V12_8: CudaVersion = CudaVersion::new(12, 8);
    const V13_0: CudaVersion = CudaVersion::new(13, 0);

    #[test]
    fn versions_print_and_order() {
        assert_eq!(CudaVersion(12080).to_string(), "12.8");
        assert_eq!(V13_0.to_string(), "13.0");
        assert!(V12_8 < V13_0);
        assert_eq!(sm_of((9, 0)), 90);
        assert!(cubin_runs_on(80, (8, 6)) && cubin_runs_on(90, (9, 0)));
        assert!(!cubin_runs_on(86, (8, 0)) && !cubin_runs_on(80, (9, 0)));
    }

    #[test]
    fn new_driver_tries_cubins_then_ptx() {
        let p = plan(V13_0, (9, 0), &[80, 90, 100], Some(V13_0), false).unwrap();
        assert_eq!(
            p,
            [
                Attempt::FileCubin(90),
                Attempt::NvrtcCubin(90),
                Attempt::NvrtcPtx
            ]
        );
        // sm_86 device: the sm_80 cubin runs there.
        let p = plan(V13_0, (8, 6), &[80, 90], None, false).unwrap();
        assert_eq!(p, [Attempt::FileCubin(80)]);
    }

    #[test]
    fn old_driver_skips_new_ptx() {
        // CUDA 12.8 driver, NVRTC 13: cubins (from disk or NVRTC) only; no PTX attempt.
        let p = plan(V12_8, (9, 0), &[80, 90], Some(V13_0), false).unwrap();
        assert_eq!(p, [Attempt::FileCubin(90), Attempt::NvrtcCubin(90)]);
        let p = plan(V12_8, (9, 0), &[], Some(V13_0), true).unwrap();
        assert_eq!(p, [Attempt::NvrtcCubin(90), Attempt::PrecompiledPtx]);
    }

    #[test]
    fn nothing_usable_is_a_typed_error_naming_both_versions() {
        // No NVRTC, no cubin for sm_89 (only sm_90 on disk), no PTX.
        let e = plan(V12_8, (8, 9), &[90], None, false).unwrap_err();
        assert!(matches!(e, Error::BackendUnavailable { .. }), "{e:?}");
        let e = too_old(V12_8, V13_0, (9, 0), "cubin sm_90 did not load".into());
        let Error::CudaDriverTooOld {
            driver, needs, sm, ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!((*driver, *needs, *sm), (12080, 13000, 90));
        let msg = e.to_string();
        assert!(
            msg.contains("12.8") && msg.contains("13.0") && msg.contains("sm_90"),
            "{msg}"
        );
    }

    #[test]
    fn cubin_files_are_found_by_name() {
        let dir = std::env::temp_dir().join(format!("gradsift-cubins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for sm in [80, 90] {
            std::fs::write(dir.join(cubin_file_name(sm)), b"x").unwrap();
        }
        std::fs::write(dir.join("other.cubin"), b"x").unwrap();
        let mut found = cubins_in(&dir);
        found.sort_unstable();
        assert_eq!(found, [80, 90]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(cubins_in(&dir).is_empty());
    }
}
