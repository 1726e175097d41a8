//! I/O limits for a block device: the limit specification operators know from QEMU's
//! `throttling.*` options ([`Spec`]), and the token buckets that enforce it ([`Buckets`], shared
//! by every queue thread of a device, and one [`Queue`] handle per queue thread).
//!
//! The crate does no I/O and knows nothing of virtio: a queue thread asks [`Queue::take`]
//! whether a request of some direction and size may go now; the answer is yes (its tokens are
//! taken) or the instant, on the `CLOCK_MONOTONIC` time line, at which to ask again, for a
//! timerfd.
//!
//! ```
//! use std::sync::Arc;
//! use throttle::{Buckets, Dir, Io, Queue, Spec};
//!
//! let spec: Spec = "iops-total=1000".parse()?;
//! let buckets = Arc::new(Buckets::new(spec));
//! let mut queue = Queue::new(buckets.clone());
//! let now = throttle::now();
//! // A full bucket: a tenth of a second's worth goes at once.
//! for _ in 0..100 {
//!     assert!(queue.take(Io { dir: Dir::Read, bytes: 4096 }, now).is_ok());
//! }
//! let due = queue.take(Io { dir: Dir::Read, bytes: 4096 }, now).expect_err("the bucket is empty");
//! assert!(due > now && due <= now + 2_000_000);
//! # Ok::<(), throttle::SpecError>(())
//! ```

mod bucket;
mod spec;

pub use bucket::{
    next_wake, now, Buckets, Dir, GroupError, Io, Queue, SharedState, MAX_SLEEP_NS, MIN_SLEEP_NS,
};
pub use spec::{Limit, Scope, Spec, SpecError, Unit};
