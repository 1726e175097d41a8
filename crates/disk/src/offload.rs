//! The io_uring engine's own worker thread, for the operations that may take seconds and that
//! the ring cannot run asynchronously: block-device `BLKDISCARD`/`BLKZEROOUT` (up to 16 ranges
//! of 1 GiB a request), WRITE_ZEROES written out on a file system without
//! `FALLOC_FL_ZERO_RANGE`, and `O_DIRECT` requests whose buffers must go through the buffered
//! descriptor. Run on the queue thread, any of them would hold every other request of the
//! queue until it ends.
//!
//! Started on first use (most images never need it). A job carries its request's buffers (and
//! the guard that keeps them mapped), so nothing is copied: the worker runs the same
//! synchronous path the queue thread would have, then hands the completion back through a
//! queue the engine drains at reap, and makes the engine's completion eventfd readable.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::{Completion, Image, Op};

/// What the worker is asked to do.
pub(crate) enum Job {
    /// Run the operation to its end, as the synchronous engine does.
    Execute {
        /// The request's id.
        user_data: u64,
        /// The operation, with its buffers.
        op: Op,
    },
    /// Write zeroes over a range that the file system would not zero itself.
    ZeroesByWriting {
        /// The request's id.
        user_data: u64,
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Completions the worker has finished, for the engine's reap.
#[derive(Default)]
struct Finished {
    queue: Mutex<VecDeque<Completion>>,
    /// How many are queued, to look without taking the lock.
    count: AtomicUsize,
}

/// The worker and what it shares with the engine.
pub(crate) struct Offload {
    jobs: Option<Sender<Job>>,
    finished: Arc<Finished>,
}

impl Offload {
    /// No worker yet.
    pub(crate) fn new() -> Self {
        Self {
            jobs: None,
            finished: Arc::new(Finished::default()),
        }
    }

    /// Hand `job` to the worker, starting it if need be. When no worker can run it, the job
    /// comes back to be run by the caller.
    pub(crate) fn send(
        &mut self,
        image: &Arc<Image>,
        eventfd: &EventFd,
        job: Job,
    ) -> std::result::Result<(), Job> {
        if self.jobs.is_none() {
            match self.start(image, eventfd) {
                Ok(tx) => self.jobs = Some(tx),
                Err(e) => {
                    warn!("io_uring: starting the offload worker failed: {e}; running on the queue thread");
                    return Err(job);
                }
            }
        }
        let Some(tx) = &self.jobs else {
            return Err(job);
        };
        tx.send(job).map_err(|e| {
            // The worker is gone (it cannot panic in release: panic = abort).
            self.jobs = None;
            e.0
        })
    }

    fn start(&self, image: &Arc<Image>, eventfd: &EventFd) -> io::Result<Sender<Job>> {
        let (tx, rx) = channel::<Job>();
        let image = Arc::clone(image);
        let eventfd = eventfd.try_clone()?;
        let finished = Arc::clone(&self.finished);
        std::thread::Builder::new()
            .name("disk-offload".into())
            .spawn(move || {
                lower_priority();
                while let Ok(job) = rx.recv() {
                    let completion = run(&image, job);
                    finished
                        .queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(completion);
                    finished.count.fetch_add(1, Ordering::Release);
                    // A failing write only delays the report to the next reap.
                    let _ = eventfd.write(1);
                }
            })?;
        Ok(tx)
    }

    /// Whether finished completions wait for the reap (no lock taken).
    pub(crate) fn has_finished(&self) -> bool {
        self.finished.count.load(Ordering::Acquire) > 0
    }

    /// The next finished completion, if any.
    pub(crate) fn next_finished(&self) -> Option<Completion> {
        if !self.has_finished() {
            return None;
        }
        let c = self
            .finished
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        if c.is_some() {
            self.finished.count.fetch_sub(1, Ordering::AcqRel);
        }
        c
    }
}

/// Give the calling thread the lowest CPU priority (nice 19): its jobs take seconds anyway,
/// and the queue thread beside it must win the CPU whenever it has a request to serve.
fn lower_priority() {
    // SAFETY: setpriority with `who` 0 changes only the calling thread's nice value.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        warn!(
            "io_uring offload worker: lowering its priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// Run `job` on the calling thread.
pub(crate) fn run(image: &Image, job: Job) -> Completion {
    match job {
        Job::Execute { user_data, op } => {
            if matches!(op, Op::Read { .. }) {
                image.delay_offloaded_read();
            }
            let result = image.execute(&op);
            Completion {
                user_data,
                result,
                bufs: op.into_buffers(),
                fixed_buffers: false,
            }
        }
        Job::ZeroesByWriting {
            user_data,
            offset,
            len,
        } => Completion {
            user_data,
            result: image.write_zeroes_by_writing(offset, len).map(|()| 0),
            bufs: None,
            fixed_buffers: false,
        },
    }
}
