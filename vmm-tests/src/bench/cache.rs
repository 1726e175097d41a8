//! The benchmark image and the page-cache reset done before every run.
//!
//! The image is a regular file on the host's file system, preallocated and
//! filled once with non-zero data (so O_DIRECT reads hit real blocks, not
//! unwritten extents that read as zeroes for free).
//!
//! The reset, the same before every run of every peer: `fdatasync` the
//! image (so a previous run's dirty pages are written back outside the
//! measurement), drop its pages with `POSIX_FADV_DONTNEED`, then, for a
//! peer that runs buffered, read the whole image once so the run starts
//! with it hot. Direct and dontcache peers start with it cold.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::error::{bail, Context, Result};

/// Creates `path` as a preallocated image of `size` bytes filled with
/// pseudo-random data, unless it already is one (a marker file beside it
/// records a completed fill).
pub fn prepare_image(path: &Path, size: u64) -> Result<()> {
    let marker = path.with_extension("filled");
    let same_size = std::fs::metadata(path).is_ok_and(|m| m.len() == size);
    let filled = std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == size.to_string());
    if same_size && filled {
        return Ok(());
    }
    let _ = std::fs::remove_file(&marker);
    eprintln!(
        "bench: filling {} ({} MiB) once",
        path.display(),
        size >> 20
    );
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .ctx(|| format!("create {}", path.display()))?;
    let len = libc::off_t::try_from(size).ctx(|| "image size")?;
    // SAFETY: fallocate takes no pointers; the fd is open for writing.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        bail!(
            "fallocate {} {size}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut done = 0;
    while done < size {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = (size - done).min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .ctx(|| format!("fill {}", path.display()))?;
        done += n as u64;
    }
    f.sync_all()
        .ctx(|| format!("fsync {}", path.display()))?;
    std::fs::write(&marker, size.to_string()).ctx(|| format!("write {}", marker.display()))?;
    Ok(())
}

/// Resets the image's page cache: write back, drop, and re-read it all when
/// `warm`. Returns the share of its pages resident afterwards (0..=1).
pub fn reset(path: &Path, warm: bool) -> Result<f64> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    f.sync_data()
        .ctx(|| format!("fdatasync {}", path.display()))?;
    fadvise(&f, libc::POSIX_FADV_DONTNEED).ctx(|| format!("drop {}'s pages", path.display()))?;
    if warm {
        fadvise(&f, libc::POSIX_FADV_SEQUENTIAL).ctx(|| "fadvise sequential")?;
        let mut r = &f;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r
                .read(&mut buf)
                .ctx(|| format!("warm {}", path.display()))?;
            if n == 0 {
                break;
            }
        }
    }
    resident(&f).ctx(|| format!("mincore {}", path.display()))
}

fn fadvise(f: &File, advice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: posix_fadvise takes no pointers; the fd is open.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// The share of `f`'s pages in the page cache (`mincore` on a mapping).
pub fn resident(f: &File) -> std::io::Result<f64> {
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0.0);
    }
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    // SAFETY: a fresh shared read-only mapping of an open file; nothing
    // else refers to the address range, and it is unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `addr` is a live mapping of `len` bytes and `vec` has one
    // byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above, which no reference
    // outlives.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(err);
    }
    let hot = vec.iter().filter(|b| *b & 1 != 0).count();
    Ok(hot as f64 / vec.len() as f64)
}
