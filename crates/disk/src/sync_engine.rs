//! The synchronous engine (`--io-engine sync`), for hosts without io_uring.
//!
//! [`Engine::submit`] runs the request to the end on the queue thread (`preadv2`/`pwritev2` with
//! `RWF_DONTCACHE` under `dontcache`, `fdatasync`, `fallocate`, block-device ioctls) and keeps its
//! completion, buffers included, until the queue thread reaps it right after its pass of
//! submissions. The completion eventfd is never signalled (nothing completes later): it is there
//! for the queue thread's epoll loop, which registers every engine's.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Completion, Engine, EngineKind, Error, Image, Op, Result, SubmitError};

/// Runs each request at submission; see the module documentation.
pub struct SyncEngine {
    image: Arc<Image>,
    done: VecDeque<Completion>,
    eventfd: EventFd,
}

impl SyncEngine {
    /// An engine over `image` with room for `queue_depth` unreaped completions.
    pub fn new(image: Arc<Image>, queue_depth: u32) -> Result<Self> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd { source })?;
        Ok(SyncEngine {
            image,
            done: VecDeque::with_capacity(queue_depth.max(1) as usize),
            eventfd,
        })
    }
}

impl Engine for SyncEngine {
    fn submit(&mut self, op: Op, user_data: u64) -> std::result::Result<(), SubmitError> {
        let result = self.image.execute(&op);
        self.done.push_back(Completion {
            user_data,
            result,
            bufs: op.into_buffers(),
            fixed_buffers: false,
        });
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        Ok(())
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> Result<()> {
        // The eventfd is never signalled: nothing to clear.
        while let Some(c) = self.done.pop_front() {
            f(c);
        }
        Ok(())
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }
}
