//! The Rust mirrors of the WGSL structs that the host writes into uniform buffers must have
//! the layout naga gives the WGSL ones, member by member: `build/wgsl.rs` records what naga
//! computed for every struct of `shaders/` (the CUDA structs have `static_assert`s instead).

/// A WGSL struct as naga laid it out.
pub(super) struct WgslStruct {
    pub file: &'static str,
    pub name: &'static str,
    pub size: u32,
    pub members: &'static [(&'static str, u32)],
}

pub(super) const WGSL_STRUCTS: &[WgslStruct] =
    &include!(concat!(env!("OUT_DIR"), "/wgsl_structs.rs"));

/// `(size_of, [(member, offset_of)])` of a Rust struct, listing its fields in order.
macro_rules! mirror {
    ($ty:ty { $($f:ident),* $(,)? }) => {
        (
            std::mem::size_of::<$ty>(),
            vec![$((stringify!($f), std::mem::offset_of!($ty, $f))),*],
        )
    };
}
pub(super) use mirror;

/// Panics unless `shaders/{file}` defines a struct named `name` with the mirror's size and
/// exactly its members, in order, at its offsets.
pub(super) fn check(file: &str, name: &str, (size, members): (usize, Vec<(&str, usize)>)) {
    let s = WGSL_STRUCTS
        .iter()
        .find(|s| s.file == file && s.name == name)
        .unwrap_or_else(|| panic!("shaders/{file} has no struct {name} (the Rust mirror's name)"));
    let want: Vec<(&str, usize)> = s.members.iter().map(|&(m, o)| (m, o as usize)).collect();
    assert_eq!(
        members, want,
        "{name}: members and offsets against shaders/{file}"
    );
    assert_eq!(size, s.size as usize, "{name}: size against shaders/{file}");
}

#[test]
fn the_table_holds_every_shader_struct() {
    for (file, name) in [
        ("compress.wgsl", "Cfg"),
        ("compress.wgsl", "PassParams"),
        ("aggregate.wgsl", "AggCfg"),
        ("aggregate.wgsl", "WorkerParams"),
        ("stats.wgsl", "StatsCfg"),
    ] {
        assert!(
            WGSL_STRUCTS
                .iter()
                .any(|s| s.file == file && s.name == name),
            "{file}: {name}"
        );
    }
}
