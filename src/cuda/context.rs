//! Loading: probing libcuda and libnvrtc without panicking, compiling the kernels once per
//! architecture, loading them once per CUDA context, and the small raw-memory and launch
//! helpers every plan uses.

use super::image::{self, Attempt, CudaVersion};
use super::kernels::{KERNEL_NAMES, Typed, kernel_source};
use crate::{DType, Error, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, result as drv};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, Weak};

mod precompiled {
    include!(concat!(env!("OUT_DIR"), "/cuda_ptx.rs"));
}

pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "cuda",
        reason: reason.into(),
    }
}

pub(crate) fn device_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device {
        backend: "cuda",
        reason: format!("{what}: {e:?}"),
    }
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from an old driver or NVRTC)
/// into an error: probing covers the missing-library case, this covers the rest.
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_panic(f).unwrap_or_else(|msg| Err(unavailable(format!("{what}: {msg}"))))
}

/// Runs `f`; a panic becomes `Err` with its message (cudarc's dynamic loader panics where a
/// library or symbol is missing: the CUDA and NCCL wrappers turn that into typed errors).
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Whether libnvrtc can be loaded, and why not.
pub fn probe_nvrtc() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate names; no symbol is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(unavailable(
            "NVRTC not found: libnvrtc.so (CUDA 13) could not be loaded; install it (e.g. \
             `pip install nvidia-cuda-nvrtc==13.0.88`) and add its lib directory to \
             LD_LIBRARY_PATH",
        ))
    }
}

/// Whether libcuda (the driver) can be loaded, and why not.
pub fn probe_driver() -> Result<()> {
    // SAFETY: as above, dlopen only.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(unavailable(
            "no CUDA driver: libcuda.so could not be loaded (is the NVIDIA driver installed?)",
        ))
    }
}

/// Compiles every kernel with NVRTC for `arch` (e.g. `"compute_90"`) and returns the PTX.
/// A compile error carries NVRTC's log. This is what the CI compile test runs.
pub fn compile_ptx(arch: &str) -> Result<String> {
    probe_nvrtc()?;
    no_panic("NVRTC", || {
        let arch: &'static str = static_arch(arch);
        let opts = cudarc::nvrtc::CompileOptions {
            // IEEE semantics: separate roundings where the CPU reference has them, no
            // flush-to-zero, correctly rounded division and square root.
            fmad: Some(false),
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            use_fast_math: None,
            arch: Some(arch),
            options: vec!["--std=c++17".into()],
            name: Some("gradsift.cu".into()),
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(kernel_source(), opts) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(cudarc::nvrtc::CompileError::CompileError { log, options, .. }) => {
                Err(unavailable(format!(
                    "kernel compilation failed for {arch} with {options:?}:\n{}",
                    log.to_string_lossy()
                )))
            }
            Err(e) => Err(unavailable(format!("NVRTC failed for {arch}: {e:?}"))),
        }
    })
}

/// Compiles every kernel with NVRTC all the way to machine code for `sm` (e.g. `"sm_90"`):
/// PTX generation plus ptxas, which catches what PTX alone does not (register or shared
/// memory limits, unsupported instructions). Returns the cubin and ptxas' resource report.
pub fn compile_cubin(sm: &str) -> Result<(Vec<u8>, String)> {
    use cudarc::nvrtc::{result as nv, sys};
    use std::ffi::{CStr, CString};
    probe_nvrtc()?;
    no_panic("NVRTC", || {
        let err =
            |what: &str, e: nv::NvrtcError| unavailable(format!("NVRTC {what} for {sm}: {e:?}"));
        let src = CString::new(kernel_source()).map_err(|e| unavailable(e.to_string()))?;
        let name = CString::new("gradsift.cu").map_err(|e| unavailable(e.to_string()))?;
        let prog = nv::create_program(&src, Some(&name)).map_err(|e| err("create", e))?;
        let opts = [
            format!("--gpu-architecture={sm}"),
            "--fmad=false".into(),
            "--ftz=false".into(),
            "--prec-div=true".into(),
            "--prec-sqrt=true".into(),
            "--std=c++17".into(),
            "--ptxas-options=-v".into(),
        ];
        // SAFETY: `prog` is a live program; it is destroyed on every path below.
        let compiled = unsafe { nv::compile_program(prog, &opts) };
        let log = unsafe { nv::get_program_log(prog) }
            .map(|l| {
                unsafe { CStr::from_ptr(l.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        let result = match compiled {
            Err(e) => Err(unavailable(format!(
                "kernel compilation failed for {sm} ({e:?}):\n{log}"
            ))),
            Ok(()) => {
                let mut size = 0usize;
                // SAFETY: standard two-call NVRTC size-then-copy protocol on a compiled program.
                unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                    .result()
                    .map_err(|e| err("cubin size", e))
                    .and_then(|()| {
                        let mut bin = vec![0u8; size];
                        unsafe { sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast()) }
                            .result()
                            .map_err(|e| err("cubin", e))
                            .map(|()| (bin, log))
                    })
            }
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { nv::destroy_program(prog) };
        result
    })
}

/// cudarc wants a `&'static str`; architectures are few, so each is leaked once.
fn static_arch(arch: &str) -> &'static str {
    static ARCHS: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let mut v = ARCHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(a) = v.iter().find(|a| **a == arch) {
        return a;
    }
    let a: &'static str = Box::leak(arch.to_string().into_boxed_str());
    v.push(a);
    a
}

/// PTX per architecture, compiled at most once per process.
fn ptx_for(arch: &str) -> Result<(String, &'static str)> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(arch) {
        return Ok((p.clone(), "NVRTC"));
    }
    let ptx = compile_ptx(arch)?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(arch.to_string(), ptx.clone());
    Ok((ptx, "NVRTC"))
}

/// The module loaded into one CUDA context and its functions: the compiled-module cache of
/// the [`Context`]s on that CUDA context. Every such `Context` (clones, [`Context::with_stream`],
/// and a `Context` built later for another stream of the same CUDA context while one is
/// alive) holds it through an `Arc`; the last one to go frees the module and, with it, its
/// reference to the CUDA context.
pub(crate) struct Loaded {
    _module: Arc<CudaModule>,
    /// One per entry point, in [`KERNEL_NAMES`] order ([`Kernel::entry`] indexes it).
    funcs: Vec<CudaFunction>,
    pub(crate) sms: u32,
    pub(crate) source: &'static str,
    pub(crate) arch: String,
}

/// Values shared by key while someone holds them: entries are weak, so the index keeps
/// nothing alive, and a dead entry is replaced (or pruned) on the next insert.
struct WeakIndex<K, V> {
    entries: Mutex<Vec<(K, Weak<V>)>>,
}

impl<K: PartialEq, V> WeakIndex<K, V> {
    const fn new() -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
        }
    }

    fn get(&self, key: &K) -> Option<Arc<V>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.upgrade())
    }

    /// Stores `value` under `key` unless a live value got there first (two threads loading
    /// at once); returns the one to use.
    fn insert(&self, key: K, value: Arc<V>) -> Arc<V> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|(_, v)| v.strong_count() > 0);
        if let Some(live) = entries
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.upgrade())
        {
            return live;
        }
        entries.push((key, Arc::downgrade(&value)));
        value
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The loaded kernels of the CUDA context `ctx`: those of a live [`Context`] on it, or
/// loaded now. Keyed by the `CUcontext`, which cannot be reused while a [`Loaded`] holds
/// its `CudaContext`.
fn load(ctx: &Arc<CudaContext>) -> Result<Arc<Loaded>> {
    static LOADED: WeakIndex<usize, Loaded> = WeakIndex::new();
    let key = ctx.cu_ctx() as usize;
    if let Some(l) = LOADED.get(&key) {
        return Ok(l);
    }
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| device_err("compute capability", e))?;
    if major < 8 {
        return Err(unavailable(format!(
            "device {} has compute capability {major}.{minor}; gradsift's kernels need 8.0 or newer",
            ctx.ordinal()
        )));
    }
    let arch = format!("compute_{major}{minor}");
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| device_err("SM count", e))? as u32;
    // An explicit PTX file wins, and failing to use it is an error, not a fallback: it is
    // how a machine without NVRTC runs kernels built elsewhere (scripts/gpu-stage.sh).
    let mut module = None;
    if let Some(path) = std::env::var_os("GRADSIFT_PTX") {
        let ptx = std::fs::read_to_string(&path)
            .map_err(|e| unavailable(format!("GRADSIFT_PTX={}: {e}", path.to_string_lossy())))?;
        let m = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| {
                unavailable(format!(
                    "GRADSIFT_PTX={} did not load: {e:?}",
                    path.to_string_lossy()
                ))
            })?;
        module = Some((m, "PTX file from GRADSIFT_PTX"));
    }
    if module.is_none() {
        module = Some(load_best(ctx, (major as u32, minor as u32), &arch)?);
    }
    let (module, source) = module.expect("loaded above");
    let mut funcs = Vec::with_capacity(KERNEL_NAMES.len());
    for name in KERNEL_NAMES {
        funcs.push(
            module
                .load_function(name)
                .map_err(|e| device_err(&format!("loading kernel {name}"), e))?,
        );
    }
    let loaded = Arc::new(Loaded {
        _module: module,
        funcs,
        sms,
        source,
        arch,
    });
    Ok(LOADED.insert(key, loaded))
}

/// The driver's CUDA version (`cuDriverGetVersion`).
pub fn driver_version() -> Result<CudaVersion> {
    probe_driver()?;
    no_panic("CUDA driver", || {
        let mut v = 0;
        // SAFETY: writes one int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| unavailable(format!("cuDriverGetVersion failed: {e:?}")))?;
        Ok(CudaVersion(v))
    })
}

/// The CUDA version of the loadable libnvrtc (the PTX it writes needs a driver this new).
pub fn nvrtc_version() -> Result<CudaVersion> {
    probe_nvrtc()?;
    no_panic("NVRTC", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| unavailable(format!("nvrtcVersion failed: {e:?}")))?;
        Ok(CudaVersion::new(major, minor))
    })
}

/// Cubins per architecture, compiled by NVRTC at most once per process.
fn cubin_for(sm: u32) -> Result<Vec<u8>> {
    static CACHE: OnceLock<Mutex<HashMap<u32, Vec<u8>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&sm) {
        return Ok(c.clone());
    }
    let (bin, _) = compile_cubin(&format!("sm_{sm}"))?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(sm, bin.clone());
    Ok(bin)
}

/// Loads the first image of [`image::plan`] that the driver accepts. When none does and
/// the PTX on offer was newer than the driver, the error is the typed
/// [`Error::CudaDriverTooOld`] naming both versions.
fn load_best(
    ctx: &Arc<CudaContext>,
    cc: (u32, u32),
    arch: &str,
) -> Result<(Arc<CudaModule>, &'static str)> {
    let driver = driver_version()?;
    let nvrtc = nvrtc_version().ok();
    let dir = std::env::var_os("GRADSIFT_CUBIN_DIR").map(std::path::PathBuf::from);
    let file_cubins = dir.as_deref().map(image::cubins_in).unwrap_or_default();
    let attempts = image::plan(
        driver,
        cc,
        &file_cubins,
        nvrtc,
        precompiled::PRECOMPILED_PTX.is_some(),
    )?;
    let mut errors = Vec::new();
    for a in attempts {
        let r: Result<(Arc<CudaModule>, &'static str)> = match a {
            Attempt::FileCubin(sm) => {
                let path = dir
                    .as_deref()
                    .expect("file cubins come from the directory")
                    .join(image::cubin_file_name(sm));
                std::fs::read(&path)
                    .map_err(|e| unavailable(format!("{}: {e}", path.display())))
                    .and_then(|bin| load_cubin(ctx, &bin))
                    .map(|m| (m, "cubin from GRADSIFT_CUBIN_DIR"))
            }
            Attempt::NvrtcCubin(sm) => cubin_for(sm)
                .and_then(|bin| load_cubin(ctx, &bin))
                .map(|m| (m, "NVRTC cubin")),
            Attempt::PrecompiledPtx => ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(
                    precompiled::PRECOMPILED_PTX.expect("planned only when present"),
                ))
                .map_err(|e| unavailable(format!("{e:?}")))
                .map(|m| (m, "precompiled PTX (nvcc, compute_80)")),
            Attempt::NvrtcPtx => ptx_for(arch).and_then(|(ptx, _)| {
                ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(|e| unavailable(format!("{e:?}")))
                    .map(|m| (m, "NVRTC PTX"))
            }),
        };
        match r {
            Ok(m) => return Ok(m),
            Err(e) => errors.push(format!("{a:?}: {e}")),
        }
    }
    let detail = errors.join("; ");
    match nvrtc {
        Some(nv) if driver < nv => Err(image::too_old(driver, nv, cc, detail)),
        _ => Err(unavailable(format!(
            "no usable kernels (driver CUDA {driver}): {detail}"
        ))),
    }
}

/// Loads a cubin (machine code: no JIT).
fn load_cubin(ctx: &Arc<CudaContext>, bin: &[u8]) -> Result<Arc<CudaModule>> {
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec()))
        .map_err(|e| unavailable(format!("cubin did not load: {e:?}")))
}

/// A CUDA device, a stream to run on, and the loaded kernels.
///
/// Cheap to clone. Every plan built from a context enqueues on its stream and never
/// synchronises unless a method returns host data. The kernels are compiled (or the
/// precompiled PTX is loaded) once per CUDA context and shared by every `Context` on it,
/// so wrapping each framework stream in its own `Context` costs nothing while another
/// `Context` on that CUDA context is alive. The loaded module belongs to those `Context`s
/// (and the plans holding them): dropping the last one frees it.
#[derive(Clone)]
pub struct Context {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) k: Arc<Loaded>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.k.arch)
            .field("kernels", &self.k.source)
            .finish()
    }
}

impl Context {
    /// Device `ordinal` with a new non-blocking stream. Errors (never panics) when there is
    /// no driver, no device, no NVRTC (and no precompiled PTX), or the kernels fail to build.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = open(ordinal)?;
        let stream = no_panic("CUDA stream", || {
            ctx.new_stream()
                .map_err(|e| device_err("creating a stream", e))
        })?;
        Self::from_stream(stream)
    }

    /// Runs everything on `stream` (for instance one made with
    /// [`CudaContext::wrap_borrowed_stream`] around PyTorch's current stream).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        probe_driver()?;
        let ctx = stream.context().clone();
        let k = no_panic("loading kernels", || {
            ctx.bind_to_thread()
                .map_err(|e| device_err("binding the context", e))?;
            load(&ctx)
        })?;
        Ok(Self { ctx, stream, k })
    }

    /// Runs on a raw `CUstream` of device `ordinal`'s primary context, the one PyTorch and
    /// the runtime API use (`torch.cuda.current_stream().cuda_stream`).
    ///
    /// # Safety
    /// `stream` must be a valid stream of that context and outlive every use of the
    /// returned context and of plans built from it.
    pub unsafe fn from_raw_stream(ordinal: usize, stream: CUstream) -> Result<Self> {
        let ctx = open(ordinal)?;
        // SAFETY: forwarded to the caller.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Self::from_stream(stream)
    }

    /// The same device and kernels on another stream.
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        if !Arc::ptr_eq(stream.context(), &self.ctx) {
            return Err(Error::InvalidConfig(
                "the stream belongs to another CUDA context".into(),
            ));
        }
        Ok(Self {
            ctx: self.ctx.clone(),
            stream,
            k: self.k.clone(),
        })
    }

    /// The cudarc context.
    pub fn cuda_context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every plan of this context runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Where the kernels came from: precompiled PTX or NVRTC.
    pub fn kernel_origin(&self) -> &'static str {
        self.k.source
    }

    /// Blocks until the stream's work is done.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_err("synchronize", e))
    }

    /// Errors unless `other` is this context's CUDA context (a buffer from another device
    /// or context cannot be read by these kernels).
    pub(crate) fn same_context(&self, other: &Arc<CudaContext>, what: &str) -> Result<()> {
        if other.cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::Device {
                backend: "cuda",
                reason: format!(
                    "{what} lives on another CUDA context than the plan; build the plan's Context from that buffer's stream (Context::from_stream)"
                ),
            })
        }
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| device_err("binding the context", e))
    }

    pub(crate) fn cu_stream(&self) -> CUstream {
        self.stream.cu_stream()
    }

    /// Blocks for a grid-stride kernel over `n` items: enough to fill the device, no more.
    pub(crate) fn grid_for(&self, n: u64, block: u32) -> u32 {
        super::launch::grid_for(self.k.sms, n, block)
    }

    /// Launches kernel `k` (one that is not per dtype) with one by-value struct argument.
    pub(crate) fn launch<A: Copy>(
        &self,
        k: Typed<A>,
        grid: u32,
        block: u32,
        args: &A,
    ) -> Result<()> {
        self.launch_entry(k.kernel().entry(None)?, grid, block, args)
    }

    /// As [`Context::launch`], for a per-dtype kernel: its instantiation for `dtype`.
    pub(crate) fn launch_for<A: Copy>(
        &self,
        k: Typed<A>,
        dtype: DType,
        grid: u32,
        block: u32,
        args: &A,
    ) -> Result<()> {
        self.launch_entry(k.kernel().entry(Some(dtype))?, grid, block, args)
    }

    pub(crate) fn launch_entry<A: Copy>(
        &self,
        idx: usize,
        grid: u32,
        block: u32,
        args: &A,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        let f = self
            .k
            .funcs
            .get(idx)
            .ok_or_else(|| device_err("launch", format!("no loaded entry point {idx}")))?;
        let mut params = [args as *const A as *mut c_void];
        // SAFETY: every kernel takes exactly one struct whose layout `abi` mirrors; the
        // addresses inside it are live device allocations owned by the calling plan.
        unsafe {
            drv::launch_kernel(
                f.cu_function(),
                (grid, 1, 1),
                (block, 1, 1),
                0,
                self.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| device_err(KERNEL_NAMES[idx], e))
    }
}

fn open(ordinal: usize) -> Result<Arc<CudaContext>> {
    probe_driver()?;
    no_panic("CUDA driver", || {
        drv::init().map_err(|e| unavailable(format!("cuInit failed: {e:?}")))?;
        let count = CudaContext::device_count()
            .map_err(|e| unavailable(format!("cannot count devices: {e:?}")))?;
        if count <= 0 {
            return Err(unavailable("no CUDA device found"));
        }
        if ordinal >= count as usize {
            return Err(unavailable(format!(
                "device {ordinal} requested, only {count} present"
            )));
        }
        CudaContext::new(ordinal).map_err(|e| unavailable(format!("cannot open device: {e:?}")))
    })
}

/// A raw device allocation owned by a plan: allocated once at construction, freed on drop.
/// Initialisation is ordered on the plan's stream (a synchronous `cuMemset` would run on
/// the legacy default stream, which a non-blocking stream does not wait for), and a drop
/// waits for that stream before freeing, so no kernel in flight loses its memory.
pub(crate) struct DevBuf {
    ptr: CUdeviceptr,
    bytes: usize,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DevBuf {
    /// `bytes` of zeroed device memory (at least 4 bytes, so every address is valid).
    pub(crate) fn zeroed(cx: &Context, bytes: usize) -> Result<Self> {
        let bytes = bytes.max(4).next_multiple_of(4);
        cx.bind()?;
        // SAFETY: plain allocation; the buffer is owned (and freed) by the returned value.
        let ptr = unsafe { drv::malloc_sync(bytes) }
            .map_err(|e| device_err(&format!("allocating {bytes} bytes"), e))?;
        let buf = Self {
            ptr,
            bytes,
            stream: cx.stream.clone(),
        };
        buf.fill(cx, 0, bytes)?;
        Ok(buf)
    }

    /// A buffer holding `data`; waits for the copy (plan construction only).
    pub(crate) fn from_slice<T: bytemuck::Pod>(cx: &Context, data: &[T]) -> Result<Self> {
        let buf = Self::zeroed(cx, std::mem::size_of_val(data))?;
        buf.upload(cx, data)?;
        cx.synchronize()?;
        Ok(buf)
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Stream-ordered fill of the first `bytes` bytes with `value`.
    pub(crate) fn fill(&self, cx: &Context, value: u8, bytes: usize) -> Result<()> {
        debug_assert!(bytes <= self.bytes);
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: within the allocation, on the plan's stream.
        unsafe { drv::memset_d8_async(self.ptr, value, bytes, cx.cu_stream()) }
            .map_err(|e| device_err("memset", e))
    }

    /// Stream-ordered upload of `data` at byte offset 0. Pageable host memory is staged by
    /// the driver before this returns, so `data` may be dropped afterwards.
    pub(crate) fn upload<T: bytemuck::Pod>(&self, cx: &Context, data: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.is_empty() {
            return Ok(());
        }
        if bytes.len() > self.bytes {
            return Err(device_err("upload", "data larger than the buffer"));
        }
        // SAFETY: within the allocation, on the plan's stream.
        unsafe { drv::memcpy_htod_async(self.ptr, bytes, cx.cu_stream()) }
            .map_err(|e| device_err("upload", e))
    }

    /// Copies the first `out.len()` elements into `out`, then waits for the stream.
    pub(crate) fn download<T: bytemuck::Pod>(&self, cx: &Context, out: &mut [T]) -> Result<()> {
        download_at(cx, self.ptr, out)
    }
}

/// Stream-ordered fill of `bytes` bytes at device address `ptr` with `value`.
pub(crate) fn memset_at(cx: &Context, ptr: u64, value: u8, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: the caller passes an address with at least `bytes` bytes behind it, owned by
    // a plan on this context's stream.
    unsafe { drv::memset_d8_async(ptr, value, bytes, cx.cu_stream()) }
        .map_err(|e| device_err("memset", e))
}

/// Copies `out.len()` elements from device address `src` into `out` and waits for the stream.
pub(crate) fn download_at<T: bytemuck::Pod>(cx: &Context, src: u64, out: &mut [T]) -> Result<()> {
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
    if !bytes.is_empty() {
        // SAFETY: the caller passes an address with at least `out`'s bytes behind it.
        unsafe { drv::memcpy_dtoh_async(bytes, src, cx.cu_stream()) }
            .map_err(|e| device_err("download", e))?;
    }
    cx.synchronize()
}

/// A reusable page-locked host buffer for a plan's transfers. Copies from pageable memory
/// make the driver stage them synchronously (it waits on the stream before each one);
/// from here they are truly asynchronous, so a call enqueues all its copies and kernels
/// and waits once. Grows on demand (waiting for the stream first, since copies in flight
/// may use it) and is otherwise reused.
pub(crate) struct Pinned {
    ptr: *mut u8,
    cap: usize,
    stream: Arc<CudaStream>,
}

// SAFETY: the allocation is owned by this value and only reached through `&mut self`
// (writes) or `&self` (reads); the raw pointer is what makes it !Send by default.
unsafe impl Send for Pinned {}
// SAFETY: as above; `&self` methods only read the host bytes or enqueue reads of them.
unsafe impl Sync for Pinned {}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pinned({} bytes)", self.cap)
    }
}

impl Pinned {
    pub(crate) fn new(cx: &Context) -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            cap: 0,
            stream: cx.stream.clone(),
        }
    }

    /// Makes room for `bytes` bytes. Contents are not kept.
    pub(crate) fn reserve(&mut self, cx: &Context, bytes: usize) -> Result<()> {
        if bytes <= self.cap {
            return Ok(());
        }
        self.release();
        let cap = bytes.next_power_of_two().max(4096);
        cx.bind()?;
        // SAFETY: plain page-locked allocation, owned and freed by `self`.
        let p = unsafe { drv::malloc_host(cap, 0) }
            .map_err(|e| device_err(&format!("allocating {cap} bytes of pinned memory"), e))?;
        self.ptr = p.cast();
        self.cap = cap;
        Ok(())
    }

    /// The whole buffer. The stream must not be using it (callers wait once per call).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        if self.cap == 0 {
            return &mut [];
        }
        // SAFETY: `cap` bytes allocated at `ptr`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.cap) }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        if self.cap == 0 {
            return &[];
        }
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.cap) }
    }

    /// Enqueues the copy of `len` bytes at `offset` to device address `dst` (no wait).
    pub(crate) fn upload(&self, cx: &Context, offset: usize, len: usize, dst: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let src = &self.bytes()[offset..offset + len];
        // SAFETY: pinned source inside the allocation, which outlives the copy (it is freed
        // only after the stream is synchronised); `dst` holds `len` bytes.
        unsafe { drv::memcpy_htod_async(dst, src, cx.cu_stream()) }
            .map_err(|e| device_err("upload", e))
    }

    /// Enqueues the copy of `len` bytes from device address `src` to `offset` (no wait).
    pub(crate) fn download(
        &mut self,
        cx: &Context,
        offset: usize,
        len: usize,
        src: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let dst = &mut self.bytes_mut()[offset..offset + len];
        // SAFETY: pinned destination inside the allocation; `src` holds `len` bytes.
        unsafe { drv::memcpy_dtoh_async(dst, src, cx.cu_stream()) }
            .map_err(|e| device_err("download", e))
    }

    fn release(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        let _ = self.stream.context().bind_to_thread();
        if self.stream.synchronize().is_err() {
            // A copy may still use it: leaking is the safe side.
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
            return;
        }
        // SAFETY: allocated by `malloc_host`, no copy in flight, freed once.
        let _ = unsafe { drv::free_host(self.ptr.cast()) };
        self.ptr = std::ptr::null_mut();
        self.cap = 0;
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.release();
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; a failed free leaks, which is the safe side.
        let _ = self.stream.context().bind_to_thread();
        if self.stream.synchronize().is_err() {
            return;
        }
        // SAFETY: allocated by `malloc_sync` in this context, no longer used by the
        // stream, and freed once.
        let _ = unsafe { drv::free_sync(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_in_the_program() {
        let src = kernel_source();
        for name in KERNEL_NAMES {
            assert!(
                src.contains(&format!(") {name}(")),
                "{name} not in kernels/"
            );
        }
    }

    #[test]
    fn the_weak_index_keeps_nothing_alive() {
        let index: WeakIndex<usize, String> = WeakIndex::new();
        let a = index.insert(1, Arc::new("a".into()));
        assert_eq!(index.get(&1).as_deref().map(String::as_str), Some("a"));
        // A live value wins over a second load.
        let again = index.insert(1, Arc::new("a2".into()));
        assert!(Arc::ptr_eq(&a, &again));
        let weak = Arc::downgrade(&a);
        drop((a, again));
        assert!(weak.upgrade().is_none(), "the index kept the value alive");
        assert!(index.get(&1).is_none());
        // The dead entry is replaced, and pruned on inserts.
        let b = index.insert(1, Arc::new("b".into()));
        let c = index.insert(2, Arc::new("c".into()));
        assert_eq!(index.len(), 2);
        drop(b);
        let _d = index.insert(3, Arc::new("d".into()));
        assert_eq!(index.len(), 2);
        assert_eq!(index.get(&2).as_deref(), Some(&*c));
    }

    #[test]
    fn missing_libraries_are_errors() {
        // Whatever this machine has, probing never panics.
        let _ = probe_driver();
        let _ = probe_nvrtc();
    }
}

#[cfg(test)]
mod nvrtc_tests {
    /// The kernels compile with NVRTC to PTX (compute_80) and to cubins (sm_80, sm_90, and
    /// sm_100 when this NVRTC knows it), and with GRADSIFT_DUMP_CUBIN=DIR writes the cubins
    /// there. Slow (ptxas), hence ignored by default; run with
    /// `./scripts/test.sh --lib cuda::context::nvrtc_tests -- --ignored`.
    #[test]
    #[ignore]
    fn kernels_compile_with_nvrtc() {
        if super::probe_nvrtc().is_err() {
            eprintln!("SKIPPED: no NVRTC");
            return;
        }
        eprintln!("NVRTC {}", super::nvrtc_version().unwrap());
        let ptx = super::compile_ptx("compute_80").unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(".entry compact_emit"));
        for sm in ["sm_80", "sm_90", "sm_100"] {
            match super::compile_cubin(sm) {
                Ok((bin, log)) => {
                    assert!(bin.starts_with(b"\x7fELF"), "{sm}: not an ELF cubin");
                    let spills: Vec<&str> = log
                        .lines()
                        .filter(|l| l.contains("spill") && !l.contains(" 0 bytes spill stores"))
                        .collect();
                    eprintln!("{sm}: {} bytes; spills: {spills:?}", bin.len());
                    // scripts/gpu-stage.sh ships these (GRADSIFT_CUBIN_DIR on the device).
                    if let Some(dir) = std::env::var_os("GRADSIFT_DUMP_CUBIN") {
                        let sm_n: u32 = sm.trim_start_matches("sm_").parse().unwrap();
                        let path = std::path::Path::new(&dir)
                            .join(super::super::image::cubin_file_name(sm_n));
                        std::fs::write(&path, &bin).unwrap();
                    }
                }
                Err(e) if sm == "sm_100" => eprintln!("sm_100 not available: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
    }
}
