//! The end-to-end test driver: a real vhost-user frontend over a unix socket with memfd guest
//! memory and its own split-ring writer, driving the `vhost-user-blk` binary as QEMU would, minus
//! the VM. Shared by the integration tests (`e2e.rs` and the adversarial suite).
//!
//! - [`process`]: start the backend on a scratch image and socket, kill it on drop.
//! - [`frontend`]: attach (features, protocol features, config, memory, queues) and virtio-blk
//!   requests.
//! - [`ring`]: the split virtqueue, well-formed transfers and raw hostile chains, guard checks.
//! - [`memory`]: memfd-backed guest memory shared with the backend.
//! - [`blk`]: virtio-blk constants, header, segments and config space.

// Each integration test binary uses its own part of the driver.
#![allow(dead_code)]

pub mod blk;
pub mod frontend;
pub mod memory;
pub mod process;
pub mod ring;

// The re-exports are the same convenience: not every binary needs every one.
#[allow(unused_imports)]
pub use blk::{BlkConfig, Segment, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP};
#[allow(unused_imports)]
pub use frontend::{Device, MemoryMessages, Options};
#[allow(unused_imports)]
pub use memory::RegionSpec;
#[allow(unused_imports)]
pub use process::{socket_path, Backend, BackendOpts, TempDir};
#[allow(unused_imports)]
pub use ring::{Completion, Desc, Layout, Queue, Transfer, Used, WaitError};

/// Deterministic bytes that differ per `seed` and per position (xorshift64): what the tests
/// write, to recognise it when they read it back or look at the image.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
