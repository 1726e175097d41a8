//! Dirty-page logging for live migration: the bitmap type guest memory is mapped with, and the
//! switch that turns logging on and off.
//!
//! While QEMU migrates a VM it copies guest memory in passes, and must learn which pages changed
//! since it last copied them. The vCPUs' writes it tracks itself; the backend's writes (data of
//! reads, status bytes, GET_ID serials, the used ring) it learns from a log it shares with us:
//! `SET_LOG_BASE` hands over a memfd holding one bit per 4 KiB guest page
//! (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`), and `VHOST_F_LOG_ALL` in `SET_FEATURES` says logging is
//! on. Every page we write must be set in the log before the used entry that makes the write
//! visible to the guest, or the destination resumes with stale memory.
//!
//! `vhost-user-backend` maps the log and installs it on every region's bitmap
//! ([`BitmapReplace`]); `vm-memory` marks what it writes through its own accessors (status
//! bytes, serials, the used ring). [`DirtyBitmap`] is that bitmap, with two things the crate's
//! own `BitmapMmapRegion` lacks: an on/off switch, so that logging stops when `LOG_ALL` is turned
//! off again (a cancelled or failed migration) and costs one relaxed load when off; and slices
//! that borrow the region's bitmap rather than clone an `Arc` on every guest memory access.
//!
//! The data of reads lands in guest memory through raw iovecs (io_uring, the synchronous engine,
//! the bounce buffers of unaligned `O_DIRECT`), which `vm-memory` never sees: the queue thread
//! marks those ranges itself with [`mark_host_range`] when the read completes.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// Pages per byte of the log.
const PAGES_PER_WORD: usize = 8;

/// One region's view of the log the frontend shares: which bits of it are the region's pages.
#[derive(Debug)]
pub struct RegionLog {
    log: Arc<MmapLogReg>,
    /// Guest physical address of the region's first byte.
    start: usize,
    /// Absolute page number (guest address / 4 KiB) of the region's last byte.
    last_page: usize,
}

impl RegionLog {
    /// The log itself, to install on regions that a later memory-table change adds.
    pub fn log(&self) -> &Arc<MmapLogReg> {
        &self.log
    }

    /// Set the bits of the pages that `len` bytes at `offset` into the region touch; what lies
    /// past the region is ignored.
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let Some(first) = self.start.checked_add(offset) else {
            return;
        };
        let first_page = first / LOG_PAGE_SIZE as usize;
        let last_page =
            (first.saturating_add(len - 1) / LOG_PAGE_SIZE as usize).min(self.last_page);
        for page in first_page..=last_page {
            // In bounds: `new` checked that the log covers the region's last page, and
            // `first_page >= start / 4 KiB`.
            let word = &self.log[page / PAGES_PER_WORD];
            let bit = 1 << (page % PAGES_PER_WORD);
            // Most pages are marked again before QEMU clears them: look before writing, so
            // that queue threads marking pages of one byte do not bounce its cache line.
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    /// Whether the page holding byte `offset` of the region is set in the log.
    fn is_set(&self, offset: usize) -> bool {
        let Some(addr) = self.start.checked_add(offset) else {
            return false;
        };
        let page = addr / LOG_PAGE_SIZE as usize;
        page <= self.last_page
            && self.log[page / PAGES_PER_WORD].load(Ordering::Relaxed)
                & (1 << (page % PAGES_PER_WORD))
                != 0
    }
}

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        // `AtomicBitmapMmap::new` checks that the log covers the region's last page (and that
        // the region is not empty and does not wrap); we index the same log no further.
        AtomicBitmapMmap::new(region, Arc::clone(&logmem)).map_err(|e| {
            let pages = region.len().div_ceil(LOG_PAGE_SIZE);
            let needed = (region.start_addr().raw_value() / LOG_PAGE_SIZE + pages)
                .div_ceil(PAGES_PER_WORD as u64);
            let message = format!(
                "the dirty log does not cover guest memory region {:#x}+{:#x}: it needs at least \
                 {needed} bytes ({e})",
                region.start_addr().raw_value(),
                region.len()
            );
            log::error!("{message}");
            io::Error::new(io::ErrorKind::InvalidInput, message)
        })?;
        let start = usize::try_from(region.start_addr().raw_value())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let len = usize::try_from(region.len())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let end = start
            .checked_add(len.saturating_sub(1))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "region wraps"))?;
        Ok(Self {
            log: logmem,
            start,
            last_page: end / LOG_PAGE_SIZE as usize,
        })
    }
}

/// What a region's bitmap and all its clones share.
#[derive(Debug, Default)]
struct RegionState {
    /// The frontend asked for logging (`VHOST_F_LOG_ALL`), with or without a log yet.
    wanted: AtomicBool,
    /// Marks go to the log: wanted, and a log installed. Read on every guest memory write.
    on: AtomicBool,
    /// The region's part of the log, once `SET_LOG_BASE` (or a memory-table change while
    /// logging) installed one. Swapped without a lock: marking only loads it.
    log: ArcSwapOption<RegionLog>,
}

/// The dirty bitmap of one guest memory region (`GuestMemoryMmap<DirtyBitmap>`): a no-op until
/// a log is installed, then one bit per page in the frontend's log while switched on.
#[derive(Clone, Debug, Default)]
pub struct DirtyBitmap {
    state: Arc<RegionState>,
}

impl DirtyBitmap {
    /// Ask for marking (`VHOST_F_LOG_ALL` acked) or stop it. It starts once a log is installed
    /// too: the frontend may send the log before or after the feature.
    pub fn set_wanted(&self, wanted: bool) {
        self.state.wanted.store(wanted, Ordering::Relaxed);
        self.state
            .on
            .store(wanted && self.has_log(), Ordering::Relaxed);
    }

    /// Whether marks go to the log.
    pub fn is_on(&self) -> bool {
        self.state.on.load(Ordering::Relaxed)
    }

    /// Whether a log is installed.
    pub fn has_log(&self) -> bool {
        self.state.log.load().is_some()
    }

    /// The installed log, to share with regions added later.
    pub fn log(&self) -> Option<Arc<MmapLogReg>> {
        self.state.log.load().as_ref().map(|l| Arc::clone(l.log()))
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        // Logging off: this load and branch are all a guest memory write pays.
        if !self.state.on.load(Ordering::Relaxed) {
            return;
        }
        if let Some(log) = self.state.log.load().as_ref() {
            log.mark(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.state
            .log
            .load()
            .as_ref()
            .is_some_and(|log| log.is_set(offset))
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyBitmap {
    type InnerBitmap = RegionLog;

    /// `SET_LOG_BASE`: the frontend hands a (new, perhaps larger) log; marks go to it from now
    /// on if logging is wanted.
    fn replace(&self, log: RegionLog) {
        self.state.log.store(Some(Arc::new(log)));
        self.state
            .on
            .store(self.state.wanted.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Guest memory as the backend maps it: every region with a [`DirtyBitmap`].
pub type LoggedMemory = GuestMemoryMmap<DirtyBitmap>;

/// Mark the pages of the host range `[ptr, ptr + len)` dirty in the log of the region of `mem`
/// that holds it: how the data of a read, written into guest memory through raw iovecs, gets
/// logged. A range outside every region marks nothing.
pub fn mark_host_range(mem: &LoggedMemory, ptr: *const u8, len: usize) {
    let addr = ptr as usize;
    for region in mem.iter() {
        let base = region.as_ptr() as usize;
        let size = region.len() as usize;
        if addr >= base && addr < base + size {
            bitmap_of(region).mark_dirty(addr - base, len.min(base + size - addr));
            return;
        }
    }
}

/// Install the log that `previous` (the regions' bitmaps before a memory-table change) carried
/// on every region of `mem` that has none yet, and set whether each region is to be logged
/// (`wanted`): a region that `SET_MEM_TABLE` or `ADD_MEM_REG` brings in while logging must be
/// logged too, and the frontend does not send the log again unless it had to grow it.
pub fn carry_over(previous: &[DirtyBitmap], mem: &LoggedMemory, wanted: bool) -> io::Result<()> {
    let log = previous.iter().find_map(DirtyBitmap::log);
    for region in mem.iter() {
        let bitmap = bitmap_of(region);
        if let (Some(log), false) = (&log, bitmap.has_log()) {
            bitmap.replace(RegionLog::new(region, Arc::clone(log))?);
        }
        bitmap.set_wanted(wanted);
    }
    Ok(())
}

/// The bitmaps of every region of `mem`, to carry the log over the next memory-table change.
pub fn bitmaps(mem: &LoggedMemory) -> Vec<DirtyBitmap> {
    mem.iter().map(|r| bitmap_of(r).clone()).collect()
}

/// Switch logging on or off on every region of `mem`.
pub fn switch(mem: &LoggedMemory, wanted: bool) {
    for region in mem.iter() {
        bitmap_of(region).set_wanted(wanted);
    }
}

/// The whole bitmap of a region (its `GuestMemoryRegion::bitmap` is a slice of it).
fn bitmap_of(region: &GuestRegionMmap<DirtyBitmap>) -> &DirtyBitmap {
    MmapRegion::bitmap(region)
}
