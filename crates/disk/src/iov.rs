//! Helpers over the iovecs of [`crate::IoBuffers`].
//!
//! The arrays point into guest memory; these helpers compute lengths and alignment, find where a
//! partial transfer stopped, and zero-fill the tail of a read that met the end of a file. None of
//! them allocates.

use std::io;

/// Total length of `iov`; a request must fit the `u32` of a completion.
pub(crate) fn total_len(iov: &[libc::iovec]) -> io::Result<u32> {
    let mut total: u64 = 0;
    for v in iov {
        total = total.saturating_add(v.iov_len as u64);
    }
    u32::try_from(total).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The iovec index and the byte within it where a transfer that has moved `done` bytes goes on.
/// Returns `(iov.len(), 0)` when `done` covers everything.
pub(crate) fn locate(iov: &[libc::iovec], done: usize) -> (usize, usize) {
    let mut left = done;
    for (i, v) in iov.iter().enumerate() {
        if left < v.iov_len {
            return (i, left);
        }
        left -= v.iov_len;
    }
    (iov.len(), 0)
}

/// Whether the part of a transfer after `done` bytes meets direct-I/O alignment: every buffer
/// address aligned to `mem_align`, every length and the file position to `offset_align`.
pub(crate) fn dio_aligned(
    iov: &[libc::iovec],
    done: usize,
    offset: u64,
    mem_align: u32,
    offset_align: u32,
) -> bool {
    let mem = mem_align.max(1) as usize;
    let blk = offset_align.max(1) as usize;
    if offset.wrapping_add(done as u64) % blk as u64 != 0 {
        return false;
    }
    let (start, within) = locate(iov, done);
    iov.iter().enumerate().skip(start).all(|(i, v)| {
        let skip = if i == start { within } else { 0 };
        let base = v.iov_base as usize + skip;
        let len = v.iov_len - skip;
        base % mem == 0 && len % blk == 0
    })
}

/// Fill with zeroes every byte of `iov` after the first `done`.
///
/// # Safety
///
/// Every buffer of `iov` must be writable and not accessed by anyone else during the call.
pub(crate) unsafe fn zero_fill(iov: &[libc::iovec], done: usize) {
    let (start, within) = locate(iov, done);
    for (i, v) in iov.iter().enumerate().skip(start) {
        let skip = if i == start { within } else { 0 };
        // SAFETY: `skip < iov_len` for the first segment and 0 after, so the range lies inside
        // the buffer the caller guarantees writable.
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>().add(skip), 0, v.iov_len - skip) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    #[test]
    fn locate_walks_segments() {
        let v = [iov(0x1000, 512), iov(0x2000, 1024)];
        assert_eq!(locate(&v, 0), (0, 0));
        assert_eq!(locate(&v, 100), (0, 100));
        assert_eq!(locate(&v, 512), (1, 0));
        assert_eq!(locate(&v, 1500), (1, 988));
        assert_eq!(locate(&v, 1536), (2, 0));
    }

    #[test]
    fn alignment_checks_address_length_and_position() {
        let v = [iov(0x1000, 4096), iov(0x3000, 512)];
        assert!(dio_aligned(&v, 0, 0, 512, 512));
        assert!(!dio_aligned(&v, 0, 0, 512, 4096));
        assert!(!dio_aligned(&v, 0, 100, 512, 512));
        assert!(!dio_aligned(&[iov(0x1001, 512)], 0, 0, 512, 512));
        assert!(dio_aligned(&v, 4096, 0, 512, 512));
        assert!(!dio_aligned(&v, 100, 0, 512, 512));
    }

    #[test]
    fn total_len_rejects_more_than_u32() {
        assert_eq!(total_len(&[iov(0, 10), iov(0, 20)]).unwrap(), 30);
        assert!(total_len(&[iov(0, u32::MAX as usize), iov(0, 1)]).is_err());
    }

    #[test]
    fn zero_fill_clears_only_the_tail() {
        let mut a = [1u8; 8];
        let mut b = [1u8; 8];
        let v = [
            iov(a.as_mut_ptr() as usize, 8),
            iov(b.as_mut_ptr() as usize, 8),
        ];
        // SAFETY: both buffers are ours and live across the call.
        unsafe { zero_fill(&v, 5) };
        assert_eq!(a, [1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(b, [0; 8]);
    }
}
