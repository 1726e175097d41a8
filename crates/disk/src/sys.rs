//! Thin, safe wrappers over the Linux calls the image and the engines make.
//!
//! Each wrapper turns the C return convention into `io::Result` and keeps its `unsafe` block (and
//! the reason it holds) in one place. Vectored reads and writes stay `unsafe fn`: their buffers
//! belong to the guest, and the caller vouches for them.

use std::io;
use std::os::unix::io::RawFd;

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

// Block-device ioctls from <linux/fs.h>; `libc` does not carry them.
ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
ioctl_io_nr!(BLKSSZGET, 0x12, 104);
ioctl_io_nr!(BLKDISCARD, 0x12, 119);
ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        // The kernel never returns more than it was asked for, which fits in usize.
        Ok(ret.unsigned_abs())
    }
}

fn off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `preadv2(2)`.
///
/// # Safety
///
/// `iov[..cnt]` must be readable iovecs whose buffers are writable and not otherwise accessed for
/// the duration of the call.
pub(crate) unsafe fn preadv2(
    fd: RawFd,
    iov: *const libc::iovec,
    cnt: usize,
    offset: u64,
    flags: i32,
) -> io::Result<usize> {
    let cnt = libc::c_int::try_from(cnt).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees the iovecs and their buffers; the kernel validates the rest.
    cvt_size(unsafe { libc::preadv2(fd, iov, cnt, off(offset)?, flags) })
}

/// `pwritev2(2)`.
///
/// # Safety
///
/// `iov[..cnt]` must be readable iovecs whose buffers are readable for the duration of the call.
pub(crate) unsafe fn pwritev2(
    fd: RawFd,
    iov: *const libc::iovec,
    cnt: usize,
    offset: u64,
    flags: i32,
) -> io::Result<usize> {
    let cnt = libc::c_int::try_from(cnt).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees the iovecs and their buffers; the kernel validates the rest.
    cvt_size(unsafe { libc::pwritev2(fd, iov, cnt, off(offset)?, flags) })
}

/// `fallocate(2)`.
pub(crate) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate touches no memory of ours; a bad fd or range is an error return.
    cvt(unsafe { libc::fallocate(fd, mode, off(offset)?, off(len)?) })
}

/// `fdatasync(2)`.
pub(crate) fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: fdatasync touches no memory of ours.
    cvt(unsafe { libc::fdatasync(fd) })
}

/// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`: start writeback of the range and wait
/// for it. `len == 0` means up to the end of the file.
pub(crate) fn sync_file_range_wait(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range touches no memory of ours.
    cvt(unsafe { libc::sync_file_range(fd, off(offset)?, off(len)?, flags) })
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)`: drop the clean page-cache pages of the range.
pub(crate) fn fadvise_dontneed(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: posix_fadvise touches no memory of ours.
    let ret =
        unsafe { libc::posix_fadvise(fd, off(offset)?, off(len)?, libc::POSIX_FADV_DONTNEED) };
    // posix_fadvise returns the error number instead of setting errno.
    if ret != 0 {
        Err(io::Error::from_raw_os_error(ret))
    } else {
        Ok(())
    }
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub(crate) fn blk_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64(), &mut size as *mut u64) })?;
    Ok(size)
}

/// Logical block size of a block device (`BLKSSZGET`).
pub(crate) fn blk_logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `size`.
    cvt(unsafe { libc::ioctl(fd, BLKSSZGET(), &mut size as *mut libc::c_int) })?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn blk_range_ioctl(fd: RawFd, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (start, length) through the pointer, which
    // points at `range`; they write nothing back.
    cvt(unsafe { libc::ioctl(fd, req, range.as_ptr()) })
}

/// `BLKDISCARD` over a byte range of a block device.
pub(crate) fn blk_discard(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(fd, BLKDISCARD(), offset, len)
}

/// `BLKZEROOUT` over a byte range of a block device.
pub(crate) fn blk_zeroout(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(fd, BLKZEROOUT(), offset, len)
}

/// Direct-I/O alignment (memory, file offset) from `statx(STATX_DIOALIGN)`, when the file
/// system reports it.
pub(crate) fn dio_alignment(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx use
    // `fd`, and the kernel writes one statx into `stx`, which we own.
    let ret = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret < 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    if stx.stx_dio_mem_align == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// The page size of this host.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let ret = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(ret).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Count the pages of `fd` in `[offset, offset + len)` resident in the page cache, with `mincore`
/// over read-only shared mappings of at most `CHUNK` bytes. `offset` must be page aligned.
pub(crate) fn resident_pages(fd: RawFd, offset: u64, len: u64) -> io::Result<u64> {
    const CHUNK: u64 = 1 << 30;
    let page = page_size();
    let mut vec: Vec<u8> = Vec::new();
    let mut pos = offset;
    let end = offset.saturating_add(len);
    let mut resident = 0;
    while pos < end {
        let chunk = (end - pos).min(CHUNK);
        let chunk_len =
            usize::try_from(chunk).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let pages = chunk_len.div_ceil(page as usize);
        vec.clear();
        vec.resize(pages, 0);
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) cannot overlap anything of
        // ours; we never touch its memory, only pass it to mincore and munmap.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                chunk_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                off(pos)?,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `addr` maps `chunk_len` bytes; `vec` has one byte per page of it.
        let ret = unsafe { libc::mincore(addr, chunk_len, vec.as_mut_ptr()) };
        let err = io::Error::last_os_error();
        // SAFETY: `addr`/`chunk_len` is exactly the mapping created above, used by nothing else.
        unsafe { libc::munmap(addr, chunk_len) };
        if ret < 0 {
            return Err(err);
        }
        resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64;
        pos += chunk;
    }
    Ok(resident)
}

#[cfg(test)]
/// File-system magic of the file system holding `path` (`statfs(2)` `f_type`).
pub(crate) fn fs_magic(path: &std::path::Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL terminated and `st` is ours to write.
    cvt(unsafe { libc::statfs(c.as_ptr(), &mut st) })?;
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}
