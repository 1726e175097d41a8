//! Workloads: direction, pattern, block size, iodepth per queue and queue
//! count, named like `randread-4k-qd32-q2`.

use serde::Serialize;

use super::error::{bail, Result};

/// What the requests do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Reads.
    Read,
    /// Writes.
    Write,
}

/// Where the requests go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random, block-aligned offsets over the whole image.
    Random,
    /// Sequential, each queue in its own slice of the image, wrapping.
    Sequential,
}

/// One workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Reads or writes.
    pub op: Op,
    /// Random or sequential.
    pub pattern: Pattern,
    /// Bytes per request.
    pub block_size: u64,
    /// Requests in flight per queue.
    pub iodepth: u32,
    /// Queues, each driven by its own client thread.
    pub queues: u32,
}

impl Workload {
    /// A 4 KiB random workload.
    pub fn rand4k(op: Op, iodepth: u32, queues: u32) -> Self {
        Workload {
            op,
            pattern: Pattern::Random,
            block_size: 4096,
            iodepth,
            queues,
        }
    }

    /// A 1 MiB sequential workload at iodepth 8 on one queue.
    pub fn seq1m(op: Op) -> Self {
        Workload::seq1m_at(op, 8, 1)
    }

    /// A 1 MiB sequential workload at `iodepth` on `queues` queues (each
    /// queue in its own slice of the image).
    pub fn seq1m_at(op: Op, iodepth: u32, queues: u32) -> Self {
        Workload {
            op,
            pattern: Pattern::Sequential,
            block_size: 1 << 20,
            iodepth,
            queues,
        }
    }

    /// The workload's name, e.g. `randread-4k-qd32-q2`, `read-1m-qd8-q1`.
    pub fn name(&self) -> String {
        let pat = match self.pattern {
            Pattern::Random => "rand",
            Pattern::Sequential => "",
        };
        let op = match self.op {
            Op::Read => "read",
            Op::Write => "write",
        };
        let bs = if self.block_size % (1 << 20) == 0 {
            format!("{}m", self.block_size >> 20)
        } else {
            format!("{}k", self.block_size >> 10)
        };
        format!("{pat}{op}-{bs}-qd{}-q{}", self.iodepth, self.queues)
    }

    /// Whether MiB/s rather than IOPS is the headline figure.
    pub fn is_bandwidth(&self) -> bool {
        self.block_size >= 64 << 10
    }

    /// Parses a name made by [`Workload::name`].
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('-').collect();
        let [rw, bs, qd, q] = parts.as_slice() else {
            bail!("workload {s:?}: expected (rand)read|write-<bs>k|m-qd<N>-q<N>");
        };
        let (pattern, op) = match *rw {
            "randread" => (Pattern::Random, Op::Read),
            "randwrite" => (Pattern::Random, Op::Write),
            "read" => (Pattern::Sequential, Op::Read),
            "write" => (Pattern::Sequential, Op::Write),
            _ => bail!("workload {s:?}: unknown direction {rw:?}"),
        };
        let block_size = match (bs.strip_suffix('k'), bs.strip_suffix('m')) {
            (Some(k), _) => k.parse::<u64>().ok().map(|k| k << 10),
            (_, Some(m)) => m.parse::<u64>().ok().map(|m| m << 20),
            _ => None,
        };
        let Some(block_size) = block_size.filter(|b| *b >= 512 && b % 512 == 0) else {
            bail!("workload {s:?}: bad block size {bs:?} (a multiple of 512: 4k, 1m)");
        };
        let iodepth = qd.strip_prefix("qd").and_then(|n| n.parse().ok());
        let queues = q.strip_prefix('q').and_then(|n| n.parse().ok());
        match (iodepth, queues) {
            (Some(iodepth @ 1..=1024), Some(queues @ 1..=16)) => Ok(Workload {
                op,
                pattern,
                block_size,
                iodepth,
                queues,
            }),
            _ => bail!("workload {s:?}: bad iodepth or queue count"),
        }
    }

    /// The default matrix: the workloads the targets are set on (4 KiB
    /// random read and write at iodepth 32 on 2 queues and at iodepth 1 on 1
    /// queue) and 1 MiB sequential read and write.
    pub fn defaults() -> Vec<Workload> {
        vec![
            Workload::rand4k(Op::Read, 32, 2),
            Workload::rand4k(Op::Write, 32, 2),
            Workload::rand4k(Op::Read, 1, 1),
            Workload::rand4k(Op::Write, 1, 1),
            Workload::seq1m(Op::Read),
            Workload::seq1m(Op::Write),
        ]
    }

    /// Every known workload: 4 KiB random read and write at iodepth 1 and
    /// 32 on 1 and 2 queues, 1 MiB sequential, and the sequential case of the
    /// deferred-batching targets, 1 MiB writes at iodepth 32 on 2 queues
    /// (`write-1m-qd32-q2`).
    pub fn all() -> Vec<Workload> {
        let mut v = Vec::new();
        for op in [Op::Read, Op::Write] {
            for (qd, q) in [(32, 2), (32, 1), (1, 1), (1, 2)] {
                v.push(Workload::rand4k(op, qd, q));
            }
        }
        v.push(Workload::seq1m(Op::Read));
        v.push(Workload::seq1m(Op::Write));
        v.push(Workload::seq1m_at(Op::Write, 32, 2));
        v
    }

    /// Whether this is a sequential write workload (the deferred-batching
    /// targets cover those beside `randwrite-4k-qd32-q2`).
    pub fn is_sequential_write(&self) -> bool {
        self.op == Op::Write && self.pattern == Pattern::Sequential
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for w in Workload::all() {
            assert_eq!(Workload::parse(&w.name()).ok(), Some(w));
        }
        assert!(Workload::parse("randread-4k-qd0-q1").is_err());
        assert!(Workload::parse("trim-4k-qd1-q1").is_err());
    }

    #[test]
    fn batching_sequential_write_is_in_all_only() {
        let w = Workload::seq1m_at(Op::Write, 32, 2);
        assert_eq!(w.name(), "write-1m-qd32-q2");
        assert!(Workload::all().contains(&w));
        assert!(!Workload::defaults().contains(&w));
        assert!(w.is_sequential_write() && w.is_bandwidth());
        assert!(!Workload::rand4k(Op::Write, 32, 2).is_sequential_write());
        assert!(!Workload::seq1m(Op::Read).is_sequential_write());
    }
}
