//! Reading NumPy `.npy` and `.npz` files of gradients.
//!
//! The `.npy` header is a Python dict literal (`{'descr': '<f4', 'fortran_order': False,
//! 'shape': (64, 3), }`); this module parses exactly that subset rather than pulling in a
//! general Python-literal parser. `.npz` files are zip archives of `.npy` members, stored
//! (`np.savez`) or deflated (`np.savez_compressed`), read in archive order, which is the
//! order the arrays were passed to `np.savez`.

use half::f16;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One array of a gradient file: a layer, flattened to f32 in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedArray {
    /// The array's name: the `.npz` member name without `.npy` (`arr_0`, `fc.weight`, ...),
    /// or [`NPY_ARRAY_NAME`] (`arr_0`) for the one array of a `.npy` file, whatever the file
    /// is called: the workers' files of one step (`worker0.npy`, `worker1.npy`) then hold
    /// the same layer, matched by position, as `np.savez` would name it.
    pub name: String,
    /// The array's shape (`[]` for a 0-d array, which holds one element).
    pub shape: Vec<u64>,
    /// The elements, widened (f16) or rounded (f64) to f32, in C (row-major) order.
    pub data: Vec<f32>,
}

/// The name of a `.npy` file's one array: `np.savez`'s name for the first positional array,
/// so that a `.npy` gradient matches a one-array `.npz` one and the files of different
/// workers (named differently) match each other.
pub const NPY_ARRAY_NAME: &str = "arr_0";

/// What went wrong reading gradients, always naming the file and, where there is one, the
/// array.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file cannot be opened or read.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a valid `.npz` / `.npy` file, or its arrays do not fit the others.
    #[error("{}: {message}", file.display())]
    File {
        /// The file.
        file: PathBuf,
        /// What is wrong, in words.
        message: String,
    },
    /// One array is unusable (dtype, layout, shape, non-finite values, truncated data).
    #[error("{}, array '{array}': {message}", file.display())]
    Array {
        /// The file.
        file: PathBuf,
        /// The array's name.
        array: String,
        /// What is wrong, in words.
        message: String,
    },
}

impl LoadError {
    /// A [`LoadError::File`]: what is wrong with `file` as a whole (the callers that check
    /// the arrays across files, such as `gradsift analyze`, report with it too).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        LoadError::File {
            file: file.to_path_buf(),
            message: message.into(),
        }
    }

    /// A [`LoadError::Array`]: what is wrong with the array `array` of `file`.
    pub fn array(file: &Path, array: &str, message: impl Into<String>) -> Self {
        LoadError::Array {
            file: file.to_path_buf(),
            array: array.to_string(),
            message: message.into(),
        }
    }
}

/// Reads every array of a `.npz` (all members, in archive order) or `.npy` (one array)
/// file. Errors name the file and array: unsupported dtypes (anything but float16, float32,
/// float64), structured or object arrays, truncated data, malformed headers.
pub fn read_arrays(path: &Path) -> Result<Vec<NamedArray>, LoadError> {
    let io = |source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    read_arrays_from(std::io::BufReader::new(file), is_npy, path)
}

/// [`read_arrays`] on any seekable reader (a file, or bytes in a `std::io::Cursor`): a
/// `.npy` stream when `is_npy`, else a `.npz` archive. `file` only names the source in
/// errors. Hostile input gives a [`LoadError`], never a panic, and allocates at most about
/// what the input decompresses to (no allocation is sized by a header alone).
pub fn read_arrays_from<R: Read + std::io::Seek>(
    mut reader: R,
    is_npy: bool,
    file: &Path,
) -> Result<Vec<NamedArray>, LoadError> {
    let path = file;
    if is_npy {
        return Ok(vec![read_npy(&mut reader, path, NPY_ARRAY_NAME)?]);
    }
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        LoadError::file(
            path,
            format!("not a .npz (zip) archive: {e}; write it with np.savez"),
        )
    })?;
    let mut out = Vec::with_capacity(zip.len().min(1024));
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| LoadError::file(path, format!("member {i} unreadable: {e}")))?;
        if member.is_dir() {
            continue;
        }
        let full = member.name().to_string();
        let name = full.strip_suffix(".npy").unwrap_or(&full).to_string();
        out.push(read_npy(&mut member, path, &name)?);
    }
    if out.is_empty() {
        return Err(LoadError::file(path, "the archive holds no arrays"));
    }
    Ok(out)
}

/// The parsed `.npy` header.
#[derive(Debug)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<u64>,
}

/// Element formats gradsift reads.
#[derive(Debug, Clone, Copy)]
enum Elem {
    F16,
    F32,
    F64,
}

/// Reads one `.npy` stream (header and data).
pub fn read_npy(r: &mut impl Read, file: &Path, name: &str) -> Result<NamedArray, LoadError> {
    let bad = |m: String| LoadError::array(file, name, m);
    let text = read_header_text(r).map_err(bad)?;
    let h = parse_header(&text).map_err(|m| bad(format!("bad .npy header ({m}): {text:?}")))?;
    let elem = element(&h.descr).map_err(bad)?;
    let count = h
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&c| c <= crate::MAX_ELEMENTS)
        .ok_or_else(|| bad(format!("shape {:?} has too many elements", h.shape)))?
        as usize;
    let size = match elem.0 {
        Elem::F16 => 2,
        Elem::F32 => 4,
        Elem::F64 => 8,
    };
    let mut bytes = Vec::new();
    r.take((count * size) as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("data unreadable: {e}")))?;
    if bytes.len() != count * size {
        return Err(bad(format!(
            "truncated data: shape {:?} needs {} bytes, {} present",
            h.shape,
            count * size,
            bytes.len()
        )));
    }
    let data = decode(&bytes, elem);
    let data = if h.fortran_order && h.shape.len() > 1 {
        fortran_to_c(&data, &h.shape)
    } else {
        data
    };
    Ok(NamedArray {
        name: name.to_string(),
        shape: h.shape,
        data,
    })
}

/// The preamble and the header's text, checked: magic, version, a plausible length, UTF-8.
fn read_header_text(r: &mut impl Read) -> Result<String, String> {
    let bad = |m: &str| m.to_string();
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre)
        .map_err(|_| bad("not a .npy array: shorter than the 8-byte preamble"))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy array: bad magic"));
    }
    let header_len = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)
                .map_err(|_| bad("truncated .npy header"))?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)
                .map_err(|_| bad("truncated .npy header"))?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    // Real headers are a few hundred bytes; refuse to allocate for a corrupt length.
    if header_len > 1 << 20 {
        return Err(format!(".npy header of {header_len} bytes is implausible"));
    }
    let mut text = vec![0u8; header_len];
    r.read_exact(&mut text)
        .map_err(|_| bad("truncated .npy header"))?;
    String::from_utf8(text).map_err(|_| bad(".npy header is not text"))
}

/// The element type and byte order of a `descr` (`<f4`, `>f2`, ...).
fn element(descr: &str) -> Result<(Elem, bool), String> {
    Ok(match descr {
        "<f2" | "=f2" => (Elem::F16, false),
        ">f2" => (Elem::F16, true),
        "<f4" | "=f4" => (Elem::F32, false),
        ">f4" => (Elem::F32, true),
        "<f8" | "=f8" => (Elem::F64, false),
        ">f8" => (Elem::F64, true),
        other => {
            return Err(format!(
                "dtype '{other}' is not supported: gradsift reads float16, float32 or float64 \
                 arrays (convert with .float() in PyTorch or .astype(np.float32) in NumPy)"
            ));
        }
    })
}

/// The elements of `bytes` (whole elements of `elem`, big-endian when `elem.1`) as f32.
fn decode(bytes: &[u8], (elem, big): (Elem, bool)) -> Vec<f32> {
    match elem {
        Elem::F16 => bytes
            .chunks_exact(2)
            .map(|c| {
                let b = [c[0], c[1]];
                f16::from_bits(if big {
                    u16::from_be_bytes(b)
                } else {
                    u16::from_le_bytes(b)
                })
                .to_f32()
            })
            .collect(),
        Elem::F32 => bytes
            .chunks_exact(4)
            .map(|c| {
                let b = [c[0], c[1], c[2], c[3]];
                if big {
                    f32::from_be_bytes(b)
                } else {
                    f32::from_le_bytes(b)
                }
            })
            .collect(),
        Elem::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let b: [u8; 8] = c.try_into().expect("chunks of 8");
                (if big {
                    f64::from_be_bytes(b)
                } else {
                    f64::from_le_bytes(b)
                }) as f32
            })
            .collect(),
    }
}

/// Reorders column-major data to row-major, so that every worker's layer lines up element
/// for element whatever order each file was written in.
fn fortran_to_c(data: &[f32], shape: &[u64]) -> Vec<f32> {
    // An empty array may have huge other dimensions (shape (0, 2^40, 2^40)): their strides
    // would overflow, and there is nothing to reorder.
    if data.is_empty() {
        return Vec::new();
    }
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let mut strides = vec![1usize; dims.len()];
    for i in 1..dims.len() {
        strides[i] = strides[i - 1] * dims[i - 1];
    }
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..data.len() {
        out.push(data[idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Parses the dict literal of a `.npy` header: string keys, and values that are strings,
/// `True`/`False`, or tuples of integers.
fn parse_header(text: &str) -> Result<Header, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    p.expect(b'{')?;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.expect(b':')?;
        p.skip_ws();
        match key.as_str() {
            "descr" => {
                if p.peek() == Some(b'[') {
                    return Err("structured dtypes are not supported".into());
                }
                descr = Some(p.string()?)
            }
            "fortran_order" => fortran = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            other => return Err(format!("unknown key '{other}'")),
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    Ok(Header {
        descr: descr.ok_or("no 'descr'")?,
        fortran_order: fortran.ok_or("no 'fortran_order'")?,
        shape: shape.ok_or("no 'shape'")?,
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.skip_ws();
        let q = self.peek().filter(|&c| c == b'\'' || c == b'"');
        let q = q.ok_or_else(|| format!("expected a string at byte {}", self.i))?;
        self.i += 1;
        let start = self.i;
        while self.peek().is_some_and(|c| c != q) {
            self.i += 1;
        }
        let s = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        self.expect(q)?;
        Ok(s.to_string())
    }
    fn boolean(&mut self) -> Result<bool, String> {
        self.skip_ws();
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        Err(format!("expected True or False at byte {}", self.i))
    }
    fn tuple(&mut self) -> Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut out = Vec::new();
        loop {
            if self.eat(b')') {
                return Ok(out);
            }
            self.skip_ws();
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
            // numpy writes Python ints; some writers append an L (Python 2 longs).
            if self.peek() == Some(b'L') {
                self.i += 1;
            }
            out.push(
                digits
                    .parse()
                    .map_err(|_| format!("expected a dimension at byte {start}"))?,
            );
            if !self.eat(b',') {
                self.expect(b')')?;
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_of_every_shape_numpy_writes() {
        let h =
            parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (64, 3), }").unwrap();
        assert_eq!((h.descr.as_str(), h.fortran_order), ("<f4", false));
        assert_eq!(h.shape, vec![64, 3]);
        assert_eq!(
            parse_header("{'descr': '<f8', 'fortran_order': True, 'shape': (5,), }")
                .unwrap()
                .shape,
            vec![5]
        );
        assert!(
            parse_header("{'descr': '<f2', 'fortran_order': False, 'shape': (), }")
                .unwrap()
                .shape
                .is_empty()
        );
        assert!(
            parse_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}")
                .is_err()
        );
        assert!(parse_header("{'descr': '<f4', 'shape': (2,)}").is_err());
    }

    #[test]
    fn empty_fortran_array_with_huge_dimensions_is_empty() {
        // Found by reasoning about the npy fuzz target: the strides overflowed (a panic with
        // overflow checks) although there is nothing to reorder.
        let t = 1u64 << 40;
        assert!(fortran_to_c(&[], &[0, t, t, t]).is_empty());
        let header =
            format!("{{'descr': '<f4', 'fortran_order': True, 'shape': (0, {t}, {t}, {t}), }}\n");
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        let a = read_npy(&mut bytes.as_slice(), Path::new("x.npy"), "arr_0").unwrap();
        assert!(a.data.is_empty());
    }

    #[test]
    fn fortran_order_becomes_c_order() {
        // [[1, 2, 3], [4, 5, 6]] stored column-major is 1 4 2 5 3 6.
        let f = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        assert_eq!(
            fortran_to_c(&f, &[2, 3]),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
    }
}
