//! Guest memory for the test frontend: one memfd, cut into regions at chosen guest addresses,
//! mapped into this process with `vm-memory` and shared with the backend by file descriptor
//! (SET_MEM_TABLE or ADD_MEM_REG). Region `i` lives at file offset `sum(size[..i])`, so every
//! region after the first exercises the backend's handling of a non-zero `mmap_offset`.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

/// One region of guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes; a multiple of the page size.
    pub size: u64,
}

impl RegionSpec {
    /// A region of `size` bytes at `guest_addr`.
    pub const fn new(guest_addr: u64, size: u64) -> Self {
        Self { guest_addr, size }
    }

    /// One past the last guest address of the region.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// memfd-backed guest memory, mapped shared in this process.
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    specs: Vec<RegionSpec>,
}

impl GuestMemory {
    /// Creates one memfd large enough for all `regions` (sorted, non-overlapping) and maps each.
    pub fn new(regions: &[RegionSpec]) -> Self {
        assert!(
            !regions.is_empty(),
            "guest memory needs at least one region"
        );
        let total: u64 = regions.iter().map(|r| r.size).sum();
        let memfd = create_memfd("vhost-user-blk-e2e-guest");
        memfd.set_len(total).expect("sizing the guest memory memfd");

        let mut mapped = Vec::with_capacity(regions.len());
        let mut file_offset = 0u64;
        for spec in regions {
            let file = memfd
                .try_clone()
                .expect("duplicating the memfd for a region");
            let mapping = MmapRegion::<()>::from_file(
                FileOffset::new(file, file_offset),
                usize::try_from(spec.size).expect("region size fits usize"),
            )
            .expect("mapping a guest memory region");
            let region = GuestRegionMmap::new(mapping, GuestAddress(spec.guest_addr))
                .expect("region does not wrap the guest address space");
            mapped.push(region);
            file_offset += spec.size;
        }
        let mem = GuestMemoryMmap::from_regions(mapped).expect("regions sorted and disjoint");
        Self {
            mem,
            specs: regions.to_vec(),
        }
    }

    /// The regions, in guest address order.
    pub fn regions(&self) -> &[RegionSpec] {
        &self.specs
    }

    /// What the frontend sends the backend for each region: guest address, size, this process's
    /// virtual address of the mapping (the vring addresses are in that space), memfd and offset.
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("memfd-backed region"))
            .collect()
    }

    /// This process's address of guest address `gpa` (what SET_VRING_ADDR carries).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("guest address {gpa:#x} is not mapped: {e}")) as u64
    }

    /// Whether `[gpa, gpa + len)` lies inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.specs
            .iter()
            .any(|r| gpa >= r.guest_addr && gpa.checked_add(len).is_some_and(|e| e <= r.end()))
    }

    /// Writes `bytes` at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("writing {} bytes at {gpa:#x}: {e}", bytes.len()));
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("reading {len} bytes at {gpa:#x}: {e}"));
        buf
    }

    /// Fills `[gpa, gpa + len)` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }

    /// Reads a little-endian `u32` at `gpa`.
    pub fn read_u32(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Atomically loads a `u16` (ring indices) with `order`.
    pub fn load_u16(&self, gpa: u64, order: Ordering) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(gpa), order)
                .unwrap_or_else(|e| panic!("loading u16 at {gpa:#x}: {e}")),
        )
    }

    /// Atomically stores a `u16` (ring indices) with `order`.
    pub fn store_u16(&self, gpa: u64, val: u16, order: Ordering) {
        self.mem
            .store(val.to_le(), GuestAddress(gpa), order)
            .unwrap_or_else(|e| panic!("storing u16 at {gpa:#x}: {e}"));
    }
}

/// `memfd_create(name, MFD_CLOEXEC)` as an owned `File`.
/// An anonymous memory file (close-on-exec) named `name`.
pub fn create_memfd(name: &str) -> File {
    let name = std::ffi::CString::new(name).expect("memfd name has no NUL");
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}
