//! How the CPU backend splits its passes across threads.
//!
//! Every pass runs on rayon's *current* pool: the global one (one thread per core, or
//! `RAYON_NUM_THREADS`), or the pool of the caller's [`rayon::ThreadPool::install`]. A pass
//! over fewer than [`PAR_MIN`] elements, or in a 1-thread pool, runs on the calling thread
//! without touching rayon at all. Chunks are contiguous index ranges; every result that is
//! assembled from several chunks is either an integer sum, a per-element value or a list
//! kept in index order, so the output is the same bits for any thread count.

/// The parallel cut-off, in elements: a pass over fewer elements (one layer's selection, one
/// step's accumulate, one aggregation) runs on the calling thread. 2^18 f32 elements (1 MiB)
/// take about 0.1 ms to read on one core, well above the few microseconds of a rayon
/// fork-join, so smaller inputs would mostly measure the overhead.
pub const PAR_MIN: usize = 1 << 18;
/// Smallest chunk a parallel pass hands to one task (elements).
const MIN_CHUNK: usize = 1 << 15;
/// Most chunks one pass uses: bounds the per-chunk scratch a plan allocates once.
pub(crate) const MAX_CHUNKS: usize = 128;

/// The chunk length (in elements) of a pass over `len` elements in the current pool: `len`
/// itself (a single chunk, run on the calling thread) below [`PAR_MIN`] or with one thread,
/// otherwise about four chunks per thread (for balance on a loaded machine), never more than
/// `MAX_CHUNKS` nor shorter than `MIN_CHUNK`. Never 0.
pub(crate) fn chunk_len(len: usize) -> usize {
    let threads = rayon::current_num_threads();
    if len < PAR_MIN || threads < 2 {
        return len.max(1);
    }
    let chunks = (4 * threads).min(MAX_CHUNKS).min(len / MIN_CHUNK).max(1);
    len.div_ceil(chunks)
}

/// Calls `f(c, a_c, b_c)` for the chunks `c` in `chunks`, in parallel, where `a_c` and `b_c`
/// are chunk `c`'s spans of `a` and `b`: chunk `c` owns `a[starts[c].0 - starts[lo].0 ..
/// starts[c + 1].0 - starts[lo].0]` (and likewise `b` with `.1`), `lo = chunks.start`, so
/// `starts` holds `chunks.end + 1` ascending prefix offsets. Splits by `rayon::join`, which
/// allocates nothing.
pub(crate) fn for_spans<F>(
    chunks: std::ops::Range<usize>,
    starts: &[(usize, usize)],
    a: &mut [u32],
    b: &mut [u32],
    f: &F,
) where
    F: Fn(usize, &mut [u32], &mut [u32]) + Sync,
{
    let (lo, hi) = (chunks.start, chunks.end);
    if hi - lo == 1 {
        return f(lo, a, b);
    }
    let mid = lo + (hi - lo) / 2;
    let (a0, a1) = a.split_at_mut(starts[mid].0 - starts[lo].0);
    let (b0, b1) = b.split_at_mut(starts[mid].1 - starts[lo].1);
    rayon::join(
        || for_spans(lo..mid, starts, a0, b0, f),
        || for_spans(mid..hi, starts, a1, b1, f),
    );
}
