//! Validates every shader in `shaders/` with naga at build time, so a WGSL error fails
//! `cargo build` with the file and line instead of surfacing at pipeline creation.
//!
//! `shaders/common.wgsl` is prepended to every other module (the runtime does the same), so
//! an error's line in the combined source is mapped back to the file it came from.
//!
//! It also writes the layout naga computed for every named struct (size, members with
//! their byte offsets) to `OUT_DIR/wgsl_structs.rs`, against which `src/wgpu/layout.rs`
//! checks the Rust mirrors that the host writes into uniform buffers.

#[cfg(feature = "wgpu")]
pub fn run() {
    use std::path::Path;

    let dir = Path::new("shaders");
    println!("cargo::rerun-if-changed=shaders");
    let common = std::fs::read_to_string(dir.join("common.wgsl"))
        .unwrap_or_else(|e| panic!("cannot read shaders/common.wgsl: {e}"));
    let common_lines = common.lines().count();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list shaders/: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl") && !p.ends_with("common.wgsl"))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    let mut layouts =
        String::from("// Written by build/wgsl.rs: naga's layout of every WGSL struct.\n[\n");
    for path in &files {
        println!("cargo::rerun-if-changed={}", path.display());
        let body = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let src = format!("{common}\n{body}");
        let name = path.display().to_string();
        // Line numbers in `src` past the common prefix belong to the module file.
        let locate = |line: u32| -> String {
            let line = line as usize;
            if line <= common_lines {
                format!("shaders/common.wgsl:{line}")
            } else {
                format!("{name}:{}", line - common_lines - 1)
            }
        };
        let module = match naga::front::wgsl::parse_str(&src) {
            Ok(m) => m,
            Err(e) => {
                let at = e
                    .location(&src)
                    .map(|l| locate(l.line_number))
                    .unwrap_or_else(|| name.clone());
                failures.push(format!("{at}: {}", e.emit_to_string(&src)));
                continue;
            }
        };
        let file = path
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned());
        for (_, ty) in module.types.iter() {
            if let (Some(name), naga::TypeInner::Struct { members, span }) = (&ty.name, &ty.inner) {
                let m: Vec<String> = members
                    .iter()
                    .map(|m| format!("({:?}, {})", m.name.as_deref().unwrap_or(""), m.offset))
                    .collect();
                layouts.push_str(&format!(
                    "    WgslStruct {{ file: {file:?}, name: {name:?}, size: {span}, members: &[{}] }},\n",
                    m.join(", ")
                ));
            }
        }
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        if let Err(e) = validator.validate(&module) {
            let at = e
                .location(&src)
                .map(|l| locate(l.line_number))
                .unwrap_or_else(|| name.clone());
            failures.push(format!("{at}: {}", e.emit_to_string(&src)));
        }
    }
    layouts.push_str("]\n");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("wgsl_structs.rs"), layouts)
        .unwrap_or_else(|e| panic!("cannot write wgsl_structs.rs: {e}"));
    if !failures.is_empty() {
        for f in &failures {
            for line in f.lines() {
                println!("cargo::warning={line}");
            }
        }
        panic!("WGSL validation failed:\n{}", failures.join("\n"));
    }
}

#[cfg(not(feature = "wgpu"))]
pub fn run() {}
