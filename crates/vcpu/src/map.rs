//! The guest's queue → vCPU map and a static vCPU → host CPU map.
//!
//! Which vCPU submits to each virtqueue is the guest's choice, not ours: Linux's blk-mq derives it
//! from the managed affinity of the MSI-X vectors, and it is not queue i = vCPU i (Debian's 7.3
//! guest under QEMU 10: 2 vCPUs and 2 queues give q0 → cpu1, q1 → cpu0; 4 and 4 give q0 → cpu1,
//! q1 → cpu3, q2 → cpu2, q3 → cpu0). The backend cannot see it, so it is told: a [`QueueMap`]
//! from `--queue-map` or the control socket (the guest's `/sys/block/vda/mq/*/cpu_list`). The
//! map only steers locality and which queues an unplug drains first; a wrong or stale map must
//! never cost correctness.
//!
//! Where the VMM cannot report its vCPU threads, [`VcpuAffinity`] (`--cpu-affinity`) says which
//! host CPUs each vCPU runs on.

use std::collections::BTreeMap;
use std::fmt;

use crate::cpus::{format_cpu_list, parse_cpu_list, CpuList};
use crate::{Error, Result};

/// Which vCPU submits to each virtqueue: `--queue-map QUEUE=VCPU,...`, e.g. `"0=1,1=0"`.
///
/// A queue appears at most once; several queues may share a vCPU; queues left out have no known
/// vCPU. An empty map means "unknown": one thread per queue, unpinned, and an unplug drains every
/// queue. [`Display`](fmt::Display) writes the same syntax, queues in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueMap {
    /// Queue index → vCPU index.
    vcpu_of: BTreeMap<usize, usize>,
}

impl QueueMap {
    /// Parses `QUEUE=VCPU` pairs separated by commas (whitespace around them is allowed), for a
    /// device with `num_queues` queues. An empty or blank string is the empty map.
    ///
    /// Errors on a queue index `>= num_queues`, a queue listed twice, and anything that is not
    /// `NUMBER=NUMBER`. A vCPU index is not checked: the guest may have vCPUs we do not know of.
    pub fn parse(s: &str, num_queues: usize) -> Result<Self> {
        let error = |reason: String| Error::QueueMap {
            input: s.to_string(),
            reason,
        };
        let mut pairs = Vec::new();
        if !s.trim().is_empty() {
            for entry in s.split(',') {
                let entry = entry.trim();
                let (queue, vcpu) = entry
                    .split_once('=')
                    .ok_or_else(|| error(format!("{entry:?} is not QUEUE=VCPU")))?;
                let number = |what: &str, text: &str| {
                    text.trim()
                        .parse::<usize>()
                        .map_err(|_| error(format!("{what} {text:?} in {entry:?} is not a number")))
                };
                pairs.push((number("queue", queue)?, number("vCPU", vcpu)?));
            }
        }
        Self::from_pairs(pairs, num_queues).map_err(|e| match e {
            Error::QueueMap { reason, .. } => error(reason),
            other => other,
        })
    }

    /// Builds a map from `(queue, vcpu)` pairs, with the checks of [`parse`](Self::parse).
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (usize, usize)>,
        num_queues: usize,
    ) -> Result<Self> {
        let mut map = Self::default();
        for (queue, vcpu) in pairs {
            let error = |reason: String| Error::QueueMap {
                input: format!("{queue}={vcpu}"),
                reason,
            };
            if queue >= num_queues {
                return Err(error(format!(
                    "queue {queue} is beyond the device's {num_queues} queues"
                )));
            }
            if let Some(previous) = map.vcpu_of.insert(queue, vcpu) {
                return Err(error(format!(
                    "queue {queue} is listed twice (vCPU {previous} and vCPU {vcpu})"
                )));
            }
        }
        Ok(map)
    }

    /// Whether the map is empty (the queue → vCPU map is unknown).
    pub fn is_empty(&self) -> bool {
        self.vcpu_of.is_empty()
    }

    /// How many queues have a vCPU.
    pub fn len(&self) -> usize {
        self.vcpu_of.len()
    }

    /// The vCPU that submits to `queue`, if known.
    pub fn vcpu_of(&self, queue: usize) -> Option<usize> {
        self.vcpu_of.get(&queue).copied()
    }

    /// The queues `vcpu` submits to, in order; empty if none (or the map is empty).
    pub fn queues_of(&self, vcpu: usize) -> Vec<usize> {
        self.vcpu_of
            .iter()
            .filter(|&(_, &v)| v == vcpu)
            .map(|(&queue, _)| queue)
            .collect()
    }

    /// The vCPUs that submit to some queue, sorted, each once.
    pub fn vcpus(&self) -> Vec<usize> {
        let mut vcpus: Vec<usize> = self.vcpu_of.values().copied().collect();
        vcpus.sort_unstable();
        vcpus.dedup();
        vcpus
    }

    /// The `(queue, vcpu)` pairs, in queue order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.vcpu_of.iter().map(|(&queue, &vcpu)| (queue, vcpu))
    }
}

impl fmt::Display for QueueMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (queue, vcpu)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{queue}={vcpu}")?;
        }
        Ok(())
    }
}

/// Which host CPUs each vCPU runs on, when the VMM cannot say: `--cpu-affinity VCPU=CPUS;...`,
/// e.g. `"0=2-3;1=4"`.
///
/// Entries are separated by `;` (canonical, what [`Display`](fmt::Display) writes) or whitespace.
/// Since a CPU list holds commas itself, a comma followed by `VCPU=` also starts a new entry, so
/// `"0=2-3,5,1=4"` is `"0=2-3,5;1=4"`. A vCPU not listed is unpinned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuAffinity {
    cpus_of: BTreeMap<usize, CpuList>,
}

impl VcpuAffinity {
    /// Parses `VCPU=CPUS` entries; an empty or blank string is the empty map.
    ///
    /// Errors on a vCPU listed twice, an empty or invalid CPU list, and anything else that is not
    /// `NUMBER=CPU-LIST`.
    pub fn parse(s: &str) -> Result<Self> {
        let error = |reason: String| Error::VcpuAffinity {
            input: s.to_string(),
            reason,
        };
        // Entries: split on ';' and whitespace, then on ',' where the next piece holds a '='.
        let mut entries: Vec<String> = Vec::new();
        for chunk in s.split(|c: char| c == ';' || c.is_whitespace()) {
            if chunk.is_empty() {
                continue;
            }
            for (i, piece) in chunk.split(',').enumerate() {
                match entries.last_mut() {
                    Some(last) if i > 0 && !piece.contains('=') => {
                        last.push(',');
                        last.push_str(piece);
                    }
                    _ => entries.push(piece.to_string()),
                }
            }
        }
        let mut affinity = Self::default();
        for entry in &entries {
            let (vcpu, cpus) = entry
                .split_once('=')
                .ok_or_else(|| error(format!("{entry:?} is not VCPU=CPUS")))?;
            let vcpu = vcpu
                .parse::<usize>()
                .map_err(|_| error(format!("vCPU {vcpu:?} in {entry:?} is not a number")))?;
            let cpus = parse_cpu_list(cpus).map_err(|e| error(format!("vCPU {vcpu}: {e}")))?;
            if affinity.cpus_of.insert(vcpu, cpus).is_some() {
                return Err(error(format!("vCPU {vcpu} is listed twice")));
            }
        }
        Ok(affinity)
    }

    /// The host CPUs of `vcpu`, if known.
    pub fn get(&self, vcpu: usize) -> Option<&CpuList> {
        self.cpus_of.get(&vcpu)
    }

    /// Sets the host CPUs of `vcpu` (sorted and deduplicated here); an empty list removes the
    /// entry, since a thread cannot be pinned to no CPU.
    pub fn set(&mut self, vcpu: usize, mut cpus: CpuList) {
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            self.cpus_of.remove(&vcpu);
        } else {
            self.cpus_of.insert(vcpu, cpus);
        }
    }

    /// Forgets the host CPUs of `vcpu`; returns what they were.
    pub fn remove(&mut self, vcpu: usize) -> Option<CpuList> {
        self.cpus_of.remove(&vcpu)
    }

    /// The `(vcpu, cpus)` entries, in vCPU order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &CpuList)> + '_ {
        self.cpus_of.iter().map(|(&vcpu, cpus)| (vcpu, cpus))
    }

    /// Whether no vCPU has host CPUs.
    pub fn is_empty(&self) -> bool {
        self.cpus_of.is_empty()
    }

    /// How many vCPUs have host CPUs.
    pub fn len(&self) -> usize {
        self.cpus_of.len()
    }
}

impl fmt::Display for VcpuAffinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (vcpu, cpus)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{vcpu}={}", format_cpu_list(cpus))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_map_of_two_queues_on_two_vcpus_as_measured() {
        // Debian 7.3 guest, QEMU 10, -smp 2, num-queues=2: q0 -> cpu1, q1 -> cpu0.
        let map = QueueMap::parse("0=1,1=0", 2).unwrap();
        assert_eq!(map.vcpu_of(0), Some(1));
        assert_eq!(map.vcpu_of(1), Some(0));
        assert_eq!(map.vcpu_of(2), None);
        assert_eq!(map.queues_of(0), vec![1]);
        assert_eq!(map.queues_of(1), vec![0]);
        assert_eq!(map.queues_of(2), Vec::<usize>::new());
        assert_eq!(map.vcpus(), vec![0, 1]);
        assert_eq!(map.to_string(), "0=1,1=0");
    }

    #[test]
    fn queue_map_of_four_queues_on_four_vcpus_as_measured() {
        // q0 -> cpu1, q1 -> cpu3, q2 -> cpu2, q3 -> cpu0.
        let map = QueueMap::parse("0=1,1=3,2=2,3=0", 4).unwrap();
        assert_eq!(map.queues_of(0), vec![3]);
        assert_eq!(map.queues_of(1), vec![0]);
        assert_eq!(map.queues_of(2), vec![2]);
        assert_eq!(map.queues_of(3), vec![1]);
        assert_eq!(map.vcpus(), vec![0, 1, 2, 3]);
        assert_eq!(map.len(), 4);
        assert_eq!(
            QueueMap::parse(&map.to_string(), 4).unwrap(),
            map,
            "Display round-trips"
        );
    }

    #[test]
    fn queue_map_shared_vcpu_partial_and_spacing() {
        let map = QueueMap::parse(" 3=0 , 0=0,2=5 ", 4).unwrap();
        assert_eq!(map.queues_of(0), vec![0, 3]);
        assert_eq!(map.vcpu_of(1), None);
        assert_eq!(map.vcpus(), vec![0, 5]);
        assert_eq!(map.to_string(), "0=0,2=5,3=0");
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![(0, 0), (2, 5), (3, 0)]);
    }

    #[test]
    fn empty_queue_map_is_unknown() {
        for text in ["", "  "] {
            let map = QueueMap::parse(text, 2).unwrap();
            assert!(map.is_empty());
            assert_eq!(map, QueueMap::default());
            assert_eq!(map.vcpus(), Vec::<usize>::new());
            assert_eq!(map.to_string(), "");
        }
    }

    #[test]
    fn queue_map_rejects_queue_beyond_num_queues() {
        let err = QueueMap::parse("0=1,2=0", 2).unwrap_err();
        assert!(
            matches!(&err, Error::QueueMap { input, .. } if input == "0=1,2=0"),
            "{err}"
        );
        assert!(err.to_string().contains("beyond"), "{err}");
        assert!(QueueMap::from_pairs([(1, 0)], 1).is_err());
        assert!(QueueMap::parse("0=0", 0).is_err());
    }

    #[test]
    fn queue_map_rejects_duplicate_queue() {
        let err = QueueMap::parse("0=1,0=1", 2).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        assert!(QueueMap::from_pairs([(1, 0), (1, 1)], 2).is_err());
    }

    #[test]
    fn queue_map_rejects_garbage() {
        for bad in [
            "0", "0=", "=1", "0=1,", ",0=1", "0=1;1=0", "a=1", "0=b", "0=1=2", "0:1", "-1=0",
            "0=-1", "0=1 1=0",
        ] {
            let err = QueueMap::parse(bad, 4).expect_err(bad);
            assert!(matches!(err, Error::QueueMap { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn queue_map_from_pairs_matches_parse() {
        assert_eq!(
            QueueMap::from_pairs([(1, 3), (0, 1), (3, 0), (2, 2)], 4).unwrap(),
            QueueMap::parse("0=1,1=3,2=2,3=0", 4).unwrap()
        );
    }

    #[test]
    fn vcpu_affinity_parses_semicolons_whitespace_and_commas() {
        let expected = {
            let mut a = VcpuAffinity::default();
            a.set(0, vec![2, 3, 5]);
            a.set(1, vec![4]);
            a
        };
        for text in [
            "0=2-3,5;1=4",
            "0=2-3,5 1=4",
            "0=2-3,5,1=4",
            " 0=2-3,5 ;\n1=4; ",
            "1=4;0=5,2-3",
        ] {
            assert_eq!(VcpuAffinity::parse(text).unwrap(), expected, "{text:?}");
        }
        assert_eq!(expected.to_string(), "0=2-3,5;1=4");
        assert_eq!(expected.get(0), Some(&vec![2, 3, 5]));
        assert_eq!(expected.get(2), None);
        assert_eq!(
            expected.iter().collect::<Vec<_>>(),
            vec![(0, &vec![2, 3, 5]), (1, &vec![4])]
        );
    }

    #[test]
    fn vcpu_affinity_rejects_garbage() {
        for bad in [
            "0", "0=", "=2", "a=2", "0=2-1", "0=x", "0=1;0=2", "0=1,,2", "0 = 1", "0=1024",
        ] {
            let err = VcpuAffinity::parse(bad).expect_err(bad);
            assert!(matches!(err, Error::VcpuAffinity { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn vcpu_affinity_set_get_remove() {
        let mut a = VcpuAffinity::parse("").unwrap();
        assert!(a.is_empty());
        a.set(3, vec![7, 6, 6]);
        assert_eq!(a.get(3), Some(&vec![6, 7]));
        a.set(3, vec![1]);
        assert_eq!(a.get(3), Some(&vec![1]));
        assert_eq!(a.len(), 1);
        a.set(3, vec![]);
        assert_eq!(a.get(3), None);
        a.set(2, vec![0]);
        assert_eq!(a.remove(2), Some(vec![0]));
        assert_eq!(a.remove(2), None);
        assert!(a.is_empty());
    }
}
