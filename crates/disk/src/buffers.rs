//! The buffers of one read or write, owned by whoever is using them: the submitter until
//! [`crate::Engine::submit`], the engine until the request completes, the submitter again once
//! [`crate::Completion`] hands them back.
//!
//! An [`IoBuffers`] is the request's iovecs plus a guard: a reference-counted object (for the
//! backend, its snapshot of guest memory) that keeps the memory the iovecs point into mapped for
//! as long as the guard lives. The one promise a caller makes, that the iovecs do point into
//! memory the guard keeps mapped, is made once, at [`IoBuffers::new`]; everything after is
//! ownership. The engine keeps the guard for as long as the kernel may touch the buffers, so
//! neither the submitter's field order nor its drop order matters.
//!
//! Nothing here allocates once a submitter owns an [`IoBuffers`] of the capacity it needs: the
//! iovec `Vec` moves into the engine and back, and the guard is an `Arc` moved along with it
//! (an `Arc<T>` becomes an `Arc<dyn Any + Send + Sync>` without allocating).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// What keeps the memory of an [`IoBuffers`] mapped: any shared object. Being `Any`, the
/// submitter can turn the guard it gets back at completion into its own type again
/// (`Arc::downcast`), for instance to mark the guest pages a read wrote as dirty.
pub type MemoryGuard = Arc<dyn Any + Send + Sync>;

/// The iovecs of one read or write and the guard that keeps their memory mapped; see the module
/// documentation.
#[derive(Default)]
pub struct IoBuffers {
    iovecs: Vec<libc::iovec>,
    guard: Option<MemoryGuard>,
}

// SAFETY: the iovecs are addresses into memory that the guard (itself `Send + Sync`) keeps
// mapped, or that outlives every user when there is no guard (the promise of `new`). An
// `IoBuffers` gives no access to that memory, only the address values: the memory is read or
// written only by the engine that owns the `IoBuffers` (or the kernel on its behalf), whichever
// thread it runs on.
unsafe impl Send for IoBuffers {}

impl IoBuffers {
    /// The buffers `iovecs` describe, kept mapped by `guard`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays valid for reads and writes of `iov_len`
    /// bytes for as long as `guard` lives (with no guard: for as long as these buffers, or any
    /// engine they are submitted to, live). Nothing else of the process may rely on the
    /// contents of that memory while an engine owns the buffers: a read writes it.
    pub unsafe fn new(iovecs: Vec<libc::iovec>, guard: Option<MemoryGuard>) -> Self {
        IoBuffers { iovecs, guard }
    }

    /// No buffers, with room for `capacity` iovecs: what a submitter keeps between requests so
    /// that filling it does not allocate.
    pub fn with_capacity(capacity: usize) -> Self {
        IoBuffers {
            iovecs: Vec::with_capacity(capacity),
            guard: None,
        }
    }

    /// The iovecs.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// The guard that keeps the buffers mapped.
    pub fn guard(&self) -> Option<&MemoryGuard> {
        self.guard.as_ref()
    }

    /// Forget the buffers and drop the guard, keeping the iovec storage (and its capacity) for
    /// the next request.
    pub fn clear(&mut self) {
        self.iovecs.clear();
        self.guard = None;
    }

    /// Take the iovec storage and the guard apart: the iovecs are plain addresses again.
    pub fn into_parts(self) -> (Vec<libc::iovec>, Option<MemoryGuard>) {
        (self.iovecs, self.guard)
    }
}

impl fmt::Debug for IoBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes: u64 = self.iovecs.iter().map(|v| v.iov_len as u64).sum();
        f.debug_struct("IoBuffers")
            .field("iovecs", &self.iovecs.len())
            .field("bytes", &bytes)
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_back_as_they_went_in_without_copying() {
        let mut data = vec![3u8; 64];
        let iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut storage = Vec::with_capacity(8);
        storage.push(iov);
        let storage_ptr = storage.as_ptr();
        let guard: MemoryGuard = Arc::new(data);
        // SAFETY: the iovec covers the Vec the guard owns; moving a Vec does not move its bytes.
        let bufs = unsafe { IoBuffers::new(storage, Some(Arc::clone(&guard))) };
        assert_eq!(bufs.iovecs().len(), 1);
        assert!(format!("{bufs:?}").contains("bytes: 64"));
        let (back, g) = bufs.into_parts();
        assert_eq!(back.as_ptr(), storage_ptr, "the same storage, not a copy");
        assert_eq!(back.capacity(), 8);
        let g = g.unwrap();
        assert!(Arc::ptr_eq(&g, &guard));
        let data = Arc::clone(&g).downcast::<Vec<u8>>().unwrap();
        assert_eq!(data[0], 3);
    }

    #[test]
    fn clear_keeps_the_capacity_and_drops_the_guard() {
        let guard: MemoryGuard = Arc::new(0u32);
        // SAFETY: no iovecs, so nothing to keep mapped.
        let mut bufs = unsafe { IoBuffers::new(Vec::with_capacity(4), Some(Arc::clone(&guard))) };
        assert_eq!(Arc::strong_count(&guard), 2);
        bufs.clear();
        assert_eq!(Arc::strong_count(&guard), 1, "the guard is released");
        assert!(bufs.guard().is_none());
        assert_eq!(bufs.into_parts().0.capacity(), 4);
    }
}
