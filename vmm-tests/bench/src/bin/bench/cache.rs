//! The benchmark image and the page-cache reset done before every run.
//!
//! The image is a regular file on the host's file system, preallocated and
//! filled once with non-zero data (so O_DIRECT reads hit real blocks, not
//! unwritten extents that read as zeroes for free).
//!
//! There are two images, identical in size, allocation and contents, side
//! by side on the same file system: the *cold* one, for the peers that run
//! O_DIRECT or dontcache, and the *hot* one, for the peers that run
//! buffered. Every peer of a mode runs on the same image.
//!
//! The reset, the same before every run of every peer: `fdatasync` the
//! image (so a previous run's dirty pages are written back outside the
//! measurement), then either drop all its pages (`POSIX_FADV_DONTNEED`,
//! cold image) or read in every page that is not resident (hot image), so
//! that every cold run starts with nothing cached and every hot run with
//! the whole image cached, clean. Keeping the two apart is what makes the
//! hot top-up cheap: an O_DIRECT write invalidates the cached pages it
//! overwrites, so sharing one image would mean re-reading most of it
//! before every buffered run.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
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
    f.sync_all().ctx(|| format!("fsync {}", path.display()))?;
    std::fs::write(&marker, size.to_string()).ctx(|| format!("write {}", marker.display()))?;
    Ok(())
}

/// Resets an image's page cache before a run: write it back, then drop
/// all its pages (`hot == false`), or read every page that is not resident
/// with 4 KiB reads (`hot == true`). Returns the share of its pages resident
/// afterwards (0..=1).
///
/// The hot image is topped up with 4 KiB reads under `POSIX_FADV_RANDOM`
/// (no readahead) on purpose: a sequential warm-up would fill it with large
/// folios (2 MiB on this kernel's ext4), and a 4 KiB buffered write into a
/// large folio walks all its buffer heads (`ext4_block_write_begin`),
/// costing about 90 µs: every buffered peer would then measure that.
pub fn reset(path: &Path, hot: bool) -> Result<f64> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    f.sync_data()
        .ctx(|| format!("fdatasync {}", path.display()))?;
    if !hot {
        fadvise(&f, libc::POSIX_FADV_DONTNEED)
            .ctx(|| format!("drop {}'s pages", path.display()))?;
    } else {
        fadvise(&f, libc::POSIX_FADV_RANDOM).ctx(|| "fadvise random")?;
        let missing = missing_pages(&f).ctx(|| format!("mincore {}", path.display()))?;
        if !missing.is_empty() {
            read_pages(&f, &missing).ctx(|| format!("warm {}", path.display()))?;
        }
    }
    let total = pages(&f).ctx(|| format!("stat {}", path.display()))?;
    let missing = missing_pages(&f).ctx(|| format!("mincore {}", path.display()))?;
    Ok(if total == 0 {
        0.0
    } else {
        1.0 - missing.len() as f64 / total as f64
    })
}

const PAGE: u64 = 4096;

fn pages(f: &File) -> std::io::Result<u64> {
    Ok(f.metadata()?.len().div_ceil(PAGE))
}

/// Reads the given 4 KiB pages, eight threads at a time.
fn read_pages(f: &File, pages: &[u64]) -> std::io::Result<()> {
    const THREADS: usize = 8;
    let per = pages.len().div_ceil(THREADS);
    std::thread::scope(|s| {
        let handles: Vec<_> = pages
            .chunks(per.max(1))
            .map(|chunk| {
                s.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; PAGE as usize];
                    for p in chunk {
                        f.read_at(&mut buf, p * PAGE)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| std::io::Error::other("warm-up thread panicked"))??;
        }
        Ok(())
    })
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

/// The indices of `f`'s 4 KiB pages that are not in the page cache
/// (`mincore` on a mapping).
fn missing_pages(f: &File) -> std::io::Result<Vec<u64>> {
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(Vec::new());
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
    let per = (page as u64 / PAGE).max(1);
    let mut missing = Vec::new();
    for (i, b) in vec.iter().enumerate() {
        if *b & 1 == 0 {
            let first = i as u64 * per;
            missing.extend(first..first + per);
        }
    }
    Ok(missing)
}
