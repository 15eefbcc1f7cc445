//! Where a plan's work goes: the device ([`Live`], the context's stream), or a record of
//! what would be enqueued ([`Recorder`]), so that a step's launch sequence can be counted
//! and inspected without a GPU ([`super::launches_per_step`]). The step code is written once
//! against [`Enqueue`]; the record is therefore the real sequence, not an estimate.

use super::context::Context;
use super::kernels::{KERNEL_NAMES, Typed};
use crate::{DType, Result};

/// A sink for a plan's stream work.
pub(crate) trait Enqueue {
    /// Launches kernel `k` (its instantiation for `dtype` when per dtype) with one by-value
    /// struct argument; `grid == 0` launches nothing.
    fn launch<A: Copy>(
        &mut self,
        k: Typed<A>,
        dtype: Option<DType>,
        grid: u32,
        block: u32,
        args: &A,
    ) -> Result<()>;

    /// Stream-ordered `memset` of `bytes` bytes at device address `ptr`.
    fn memset(&mut self, ptr: u64, value: u8, bytes: usize) -> Result<()>;

    /// Streaming multiprocessors of the device (grid sizes derive from it).
    fn sms(&self) -> u32;

    /// Blocks for a grid-stride kernel over `n` items: enough to fill the device, no more.
    fn grid_for(&self, n: u64, block: u32) -> u32 {
        grid_for(self.sms(), n, block)
    }

    /// Blocks per group of a batched launch over `ngroups` groups whose largest needs
    /// `items` items at `per_block` each: [`Enqueue::per_group`].
    fn per_group(&self, ngroups: usize, items: u64, per_block: u64) -> u32 {
        per_group(self.sms(), ngroups, items, per_block)
    }
}

/// Blocks per group of a batched launch: enough for the largest group (`items` items,
/// `per_block` to a block, at least 1), but no more than the groups' share of a full device
/// (8 blocks per SM in all), so the launch has at most `8 * sms + ngroups` blocks; a
/// group's blocks stride over the rest.
pub(crate) fn per_group(sms: u32, ngroups: usize, items: u64, per_block: u64) -> u32 {
    let want = items.div_ceil(per_block.max(1)).max(1);
    let share = (u64::from(sms.max(1)) * 8)
        .div_ceil(ngroups.max(1) as u64)
        .max(1);
    want.min(share) as u32
}

/// [`Enqueue::grid_for`] for a device of `sms` multiprocessors (8 blocks per SM at most).
pub(crate) fn grid_for(sms: u32, n: u64, block: u32) -> u32 {
    let want = n.div_ceil(u64::from(block)).max(1);
    want.min(u64::from(sms.max(1)) * 8) as u32
}

/// The device: every call goes to the context's stream; launches and memsets are counted.
pub(crate) struct Live<'a> {
    pub(crate) cx: &'a Context,
    pub(crate) launches: u32,
    pub(crate) memsets: u32,
}

impl<'a> Live<'a> {
    pub(crate) fn new(cx: &'a Context) -> Self {
        Self {
            cx,
            launches: 0,
            memsets: 0,
        }
    }
}

impl Enqueue for Live<'_> {
    fn launch<A: Copy>(
        &mut self,
        k: Typed<A>,
        dtype: Option<DType>,
        grid: u32,
        block: u32,
        args: &A,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        self.cx
            .launch_entry(k.kernel().entry(dtype)?, grid, block, args)?;
        self.launches += 1;
        Ok(())
    }

    fn memset(&mut self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        super::context::memset_at(self.cx, ptr, value, bytes)?;
        self.memsets += 1;
        Ok(())
    }

    fn sms(&self) -> u32 {
        self.cx.k.sms
    }
}

/// One kernel launch of a recorded sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// The entry point (e.g. `"sel_pass"`, `"ef_accumulate_f32"`).
    pub kernel: &'static str,
    /// Blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
}

/// What one step enqueues, in order: kernel launches and stream memsets (graph nodes
/// too, but no kernel launch gaps of their own size).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepLaunches {
    /// Every launch, in stream order.
    pub launches: Vec<Launch>,
    /// Stream-ordered memsets.
    pub memsets: u32,
}

impl StepLaunches {
    /// Kernel launches per step.
    pub fn count(&self) -> usize {
        self.launches.len()
    }

    /// Launches of a single block (the serial points of the sequence).
    pub fn single_block(&self) -> usize {
        self.launches.iter().filter(|l| l.grid == 1).count()
    }

    /// Launches per entry point, in order of first appearance.
    pub fn by_kernel(&self) -> Vec<(&'static str, usize)> {
        let mut v: Vec<(&'static str, usize)> = Vec::new();
        for l in &self.launches {
            match v.iter_mut().find(|(k, _)| *k == l.kernel) {
                Some((_, c)) => *c += 1,
                None => v.push((l.kernel, 1)),
            }
        }
        v
    }
}

/// Records instead of launching, for a device of `sms` multiprocessors.
pub(crate) struct Recorder {
    pub(crate) sms: u32,
    pub(crate) log: StepLaunches,
}

impl Enqueue for Recorder {
    fn launch<A: Copy>(
        &mut self,
        k: Typed<A>,
        dtype: Option<DType>,
        grid: u32,
        block: u32,
        _args: &A,
    ) -> Result<()> {
        let idx = k.kernel().entry(dtype)?;
        if grid > 0 {
            self.log.launches.push(Launch {
                kernel: KERNEL_NAMES[idx],
                grid,
                block,
            });
        }
        Ok(())
    }

    fn memset(&mut self, _ptr: u64, _value: u8, bytes: usize) -> Result<()> {
        if bytes > 0 {
            self.log.memsets += 1;
        }
        Ok(())
    }

    fn sms(&self) -> u32 {
        self.sms
    }
}
