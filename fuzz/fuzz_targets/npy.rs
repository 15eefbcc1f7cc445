//! Reads arbitrary bytes as a `.npy` stream or a `.npz` archive (the first byte chooses). A
//! panic, an abort, or an allocation far beyond the input (libFuzzer's -rss_limit_mb) is a
//! crash. On success every array holds exactly as many elements as its shape says, all of
//! them f32 as read, and a `.npy` array is named `arr_0`.

#![no_main]

use gradsift::npy::{NPY_ARRAY_NAME, read_arrays_from};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let is_npy = first & 1 == 1;
    let path = Path::new(if is_npy { "fuzz.npy" } else { "fuzz.npz" });
    match read_arrays_from(Cursor::new(rest), is_npy, path) {
        Ok(arrays) => {
            assert!(!arrays.is_empty(), "Ok with no arrays");
            if is_npy {
                assert_eq!(arrays.len(), 1);
                assert_eq!(arrays[0].name, NPY_ARRAY_NAME);
            }
            for a in &arrays {
                let count = a
                    .shape
                    .iter()
                    .try_fold(1u64, |c, &d| c.checked_mul(d))
                    .expect("an accepted shape has a countable size");
                assert!(count <= gradsift::MAX_ELEMENTS);
                assert_eq!(a.data.len() as u64, count, "shape and data disagree");
            }
        }
        Err(e) => {
            // Every error names its source.
            assert!(e.to_string().contains("fuzz.np"), "{e}");
        }
    }
});
