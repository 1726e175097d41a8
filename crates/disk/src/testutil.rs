//! Test helpers: a self-removing temporary directory, page-aligned buffers for `O_DIRECT`, and a
//! data pattern that tells one write from another.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed with its contents on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// A new directory under the system's temporary directory.
    pub(crate) fn new() -> Self {
        Self::new_in(&std::env::temp_dir())
    }

    /// A new directory under `base`.
    pub(crate) fn new_in(base: &Path) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("disk-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A zeroed, 4 KiB-aligned heap buffer.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    /// `len` zero bytes (len > 0).
    pub(crate) fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: `layout` has a non-zero size (callers pass len > 0).
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }
}

// SAFETY: an `AlignedBuf` owns its allocation as a `Box<[u8]>` would, and gives access to it
// only through `&self`/`&mut self`; it can move to, and be shared with, another thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: `&AlignedBuf` only reads.
unsafe impl Sync for AlignedBuf {}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` holds `size` initialised bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// Fill `buf` with a pattern that depends on `seed` and on the position.
pub(crate) fn fill_pattern(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed;
    }
}
