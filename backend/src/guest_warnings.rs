//! Rate limiting of the warnings a guest can trigger (a malformed chain, a reused head): a
//! guest that sends bad chains in a loop must not be able to flood the host's log.
//!
//! One [`GuestWarnings`] per queue, owned by its queue thread: a token bucket of
//! [`BURST`] warnings refilled at one per [`INTERVAL`]. A warning without a token is left out
//! and counted; the next one let through first says how many were left out, so that what the
//! log shows and what it left out add up to what the guest did. It reads the clock only when a
//! warning is due, never on a well-formed request.

use std::fmt;
use std::time::{Duration, Instant};

use log::warn;

/// Warnings a queue may log back to back.
pub const BURST: u32 = 10;
/// One more warning may be logged per interval once the burst is spent.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// The warning budget of one queue.
#[derive(Debug)]
pub struct GuestWarnings {
    tokens: u32,
    /// When the last token was added (or the bucket found full).
    refilled: Option<Instant>,
    /// Warnings left out since the last one logged.
    left_out: u64,
}

impl Default for GuestWarnings {
    fn default() -> Self {
        Self {
            tokens: BURST,
            refilled: None,
            left_out: 0,
        }
    }
}

impl GuestWarnings {
    /// Log `message` for queue `queue` if the budget allows, else count it as left out.
    pub fn warn(&mut self, queue: usize, message: fmt::Arguments<'_>) {
        if !self.take(Instant::now()) {
            self.left_out += 1;
            return;
        }
        let left_out = std::mem::take(&mut self.left_out);
        if left_out > 0 {
            warn!("queue {queue}: left out {left_out} guest-triggered warning(s) to keep the log readable");
        }
        warn!("queue {queue}: {message}");
    }

    /// Warnings left out and not reported yet.
    pub fn left_out(&self) -> u64 {
        self.left_out
    }

    fn take(&mut self, now: Instant) -> bool {
        let since = self.refilled.get_or_insert(now);
        let elapsed = now.saturating_duration_since(*since);
        let earned = (elapsed.as_nanos() / INTERVAL.as_nanos()) as u64;
        if earned > 0 {
            self.tokens = BURST.min(
                self.tokens
                    .saturating_add(earned.min(u64::from(BURST)) as u32),
            );
            // Keep the fraction of an interval already earned.
            *since += INTERVAL * (earned.min(u64::from(u32::MAX)) as u32);
            if self.tokens == BURST {
                *since = now;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        let mut w = GuestWarnings::default();
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| w.take(t0)).count();
        assert_eq!(allowed, BURST as usize);
        assert!(!w.take(t0 + INTERVAL / 2));
        assert!(w.take(t0 + INTERVAL));
        assert!(!w.take(t0 + INTERVAL));
        // A long quiet spell refills the burst, no more.
        let later = t0 + INTERVAL * 1000;
        let allowed = (0..100).filter(|_| w.take(later)).count();
        assert_eq!(allowed, BURST as usize);
    }
}
