//! The limit specification: `key=value,...` in QEMU's `throttling.*` vocabulary, parsed and
//! checked by QEMU's rules, and printed back in the same form.
//!
//! For each unit (`iops`, `bps`) and scope (`total`, `read`, `write`):
//! - `UNIT-SCOPE=N`: the sustained rate, per second;
//! - `UNIT-SCOPE-max=N`: the rate a burst may reach, per second;
//! - `UNIT-SCOPE-max-length=S`: how many seconds a burst at that rate may last (default 1), so
//!   the burst bucket holds `max × max-length`;
//! - and `iops-size=BYTES`: a request larger than this counts as `bytes / iops-size` operations.
//!
//! The rules are QEMU's: a total and a read or write limit of the same unit exclude each other;
//! a `-max` needs its base limit and may not be below it; a `-max-length` above 1 needs its
//! `-max`. On top of QEMU's, zero is refused (leave the key out, or use `none`, for no limit),
//! and so are values no disk reaches, which could only be typos.

use std::fmt;
use std::str::FromStr;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Operations per second.
    Iops,
    /// Bytes per second.
    Bps,
}

/// Which requests a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reads and writes together.
    Total,
    /// Reads only.
    Read,
    /// Writes only.
    Write,
}

impl Unit {
    const ALL: [Unit; 2] = [Unit::Iops, Unit::Bps];

    fn name(self) -> &'static str {
        match self {
            Unit::Iops => "iops",
            Unit::Bps => "bps",
        }
    }

    /// The largest rate accepted. Operations: the buckets count time in nanoseconds, and above
    /// 10^8 per second an operation would cost less than 10 ns, too coarse to be accurate (and
    /// beyond any disk). Bytes: QEMU's bound, 10^15 per second.
    pub const fn max_rate(self) -> u64 {
        match self {
            Unit::Iops => 100_000_000,
            Unit::Bps => 1_000_000_000_000_000,
        }
    }
}

impl Scope {
    const ALL: [Scope; 3] = [Scope::Total, Scope::Read, Scope::Write];

    fn name(self) -> &'static str {
        match self {
            Scope::Total => "total",
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }
}

/// The longest burst accepted, in seconds (a day: a longer burst is a different limit).
pub const MAX_BURST_LENGTH: u64 = 86_400;
/// The smallest `iops-size` accepted: one sector.
pub const MIN_IOPS_SIZE: u64 = 512;
/// The largest `iops-size` accepted: 1 GiB, more than any request carries.
pub const MAX_IOPS_SIZE: u64 = 1 << 30;

/// One limit: a sustained rate and an optional burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Sustained rate, units per second (at least 1).
    pub avg: u64,
    /// Rate a burst may reach, units per second (at least `avg`).
    pub max: Option<u64>,
    /// Seconds a burst at `max` may last (at least 1; above 1 only with `max`).
    pub max_length: u64,
}

impl Limit {
    /// Units the bucket holds when full: `max × max-length`, or a tenth of a second at `avg`
    /// without a burst (QEMU's choice, so that a guest's short bursts are not cut into single
    /// requests).
    pub fn bucket_units(&self) -> u128 {
        match self.max {
            Some(max) => u128::from(max) * u128::from(self.max_length),
            None => u128::from(self.avg) / 10,
        }
    }
}

/// A device's limits: up to one [`Limit`] per unit and scope, and `iops-size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spec {
    /// Indexed by `[unit][scope]` in declaration order.
    limits: [[Option<Limit>; 3]; 2],
    /// Bytes a request may carry and still count as one operation.
    iops_size: Option<u64>,
}

/// Why a limit specification was refused. Each message names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The specification is empty.
    #[error("empty limit specification (use 'none' for no limit)")]
    Empty,
    /// An item is not `key=value`.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key this backend does not know.
    #[error("unknown key '{0}' (keys: iops-total, iops-read, iops-write, bps-total, bps-read, bps-write, each also with -max and -max-length, and iops-size)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("'{0}' is given twice")]
    Duplicate(String),
    /// A negative value.
    #[error("{key}={value}: a limit cannot be negative")]
    Negative {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
    },
    /// Not a whole number.
    #[error("{key}={value}: not a whole number")]
    NotANumber {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
    },
    /// Zero, which would stop every request.
    #[error("{0}=0: a limit must be at least 1 (leave the key out, or use 'none', for no limit)")]
    Zero(String),
    /// Beyond what any disk does: a typo.
    #[error("{key}={value}: above the largest accepted, {max}")]
    TooLarge {
        /// The key.
        key: String,
        /// The value.
        value: u64,
        /// The bound.
        max: u64,
    },
    /// Below the smallest accepted.
    #[error("{key}={value}: below the smallest accepted, {min}")]
    TooSmall {
        /// The key.
        key: String,
        /// The value.
        value: u64,
        /// The bound.
        min: u64,
    },
    /// A total limit beside a read or write limit of the same unit.
    #[error("{total} and {other} cannot be set together: a total limit and a read or write limit of the same unit exclude each other")]
    TotalWithReadWrite {
        /// The total key.
        total: String,
        /// The read or write key.
        other: String,
    },
    /// A `-max` or `-max-length` without its base limit.
    #[error("{key} needs {base}")]
    MissingBase {
        /// The key given.
        key: String,
        /// The key it needs.
        base: String,
    },
    /// A burst rate below the sustained rate.
    #[error("{key}={max} is below {base}={avg}: a burst cannot be slower than the sustained rate")]
    MaxBelowAvg {
        /// The `-max` key.
        key: String,
        /// Its value.
        max: u64,
        /// The base key.
        base: String,
        /// Its value.
        avg: u64,
    },
    /// `iops-size` without any iops limit: it would have no effect.
    #[error("iops-size needs an iops limit (iops-total, iops-read or iops-write)")]
    IopsSizeAlone,
}

/// What a key names.
#[derive(Debug, Clone, Copy)]
enum Key {
    Avg(Unit, Scope),
    Max(Unit, Scope),
    MaxLength(Unit, Scope),
    IopsSize,
}

fn base_name(unit: Unit, scope: Scope) -> String {
    format!("{}-{}", unit.name(), scope.name())
}

fn parse_key(key: &str) -> Option<Key> {
    if key == "iops-size" {
        return Some(Key::IopsSize);
    }
    for unit in Unit::ALL {
        for scope in Scope::ALL {
            let base = base_name(unit, scope);
            let Some(rest) = key.strip_prefix(base.as_str()) else {
                continue;
            };
            return match rest {
                "" => Some(Key::Avg(unit, scope)),
                "-max" => Some(Key::Max(unit, scope)),
                "-max-length" => Some(Key::MaxLength(unit, scope)),
                _ => None,
            };
        }
    }
    None
}

fn parse_value(key: &str, value: &str) -> Result<u64, SpecError> {
    let value = value.trim();
    if value.starts_with('-') {
        return Err(SpecError::Negative {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    let n: u64 = value.parse().map_err(|_| SpecError::NotANumber {
        key: key.to_owned(),
        value: value.to_owned(),
    })?;
    if n == 0 {
        return Err(SpecError::Zero(key.to_owned()));
    }
    Ok(n)
}

fn at_most(key: &str, value: u64, max: u64) -> Result<u64, SpecError> {
    if value > max {
        return Err(SpecError::TooLarge {
            key: key.to_owned(),
            value,
            max,
        });
    }
    Ok(value)
}

impl Spec {
    /// No limit at all.
    pub const fn none() -> Self {
        Self {
            limits: [[None; 3]; 2],
            iops_size: None,
        }
    }

    /// Whether no limit is set.
    pub fn is_none(&self) -> bool {
        self.limits.iter().flatten().all(Option::is_none)
    }

    /// The limit of `unit` and `scope`, if set.
    pub fn get(&self, unit: Unit, scope: Scope) -> Option<Limit> {
        self.limits[unit as usize][scope as usize]
    }

    /// `iops-size`, if set.
    pub fn iops_size(&self) -> Option<u64> {
        self.iops_size
    }

    /// Parse `key=value,...` (or `none`), checking every rule.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(SpecError::Empty);
        }
        if s == "none" {
            return Ok(Self::none());
        }
        let mut avg = [[None::<u64>; 3]; 2];
        let mut max = [[None::<u64>; 3]; 2];
        let mut length = [[None::<u64>; 3]; 2];
        let mut iops_size = None;
        for item in s.split(',') {
            let item = item.trim();
            let Some((key, value)) = item.split_once('=') else {
                return Err(SpecError::NotKeyValue(item.to_owned()));
            };
            let key = key.trim();
            let Some(parsed) = parse_key(key) else {
                return Err(SpecError::UnknownKey(key.to_owned()));
            };
            let n = parse_value(key, value)?;
            let slot = match parsed {
                Key::Avg(u, sc) => {
                    let n = at_most(key, n, u.max_rate())?;
                    (&mut avg[u as usize][sc as usize], n)
                }
                Key::Max(u, sc) => {
                    let n = at_most(key, n, u.max_rate())?;
                    (&mut max[u as usize][sc as usize], n)
                }
                Key::MaxLength(u, sc) => {
                    let n = at_most(key, n, MAX_BURST_LENGTH)?;
                    (&mut length[u as usize][sc as usize], n)
                }
                Key::IopsSize => {
                    let n = at_most(key, n, MAX_IOPS_SIZE)?;
                    if n < MIN_IOPS_SIZE {
                        return Err(SpecError::TooSmall {
                            key: key.to_owned(),
                            value: n,
                            min: MIN_IOPS_SIZE,
                        });
                    }
                    (&mut iops_size, n)
                }
            };
            if slot.0.replace(slot.1).is_some() {
                return Err(SpecError::Duplicate(key.to_owned()));
            }
        }

        let mut spec = Self::none();
        for unit in Unit::ALL {
            let u = unit as usize;
            let total = Scope::Total as usize;
            for other in [Scope::Read, Scope::Write] {
                let o = other as usize;
                let set = |a: &[[Option<u64>; 3]; 2], i: usize| a[u][i].is_some();
                let total_set = set(&avg, total) || set(&max, total) || set(&length, total);
                let other_set = set(&avg, o) || set(&max, o) || set(&length, o);
                if total_set && other_set {
                    return Err(SpecError::TotalWithReadWrite {
                        total: base_name(unit, Scope::Total),
                        other: base_name(unit, other),
                    });
                }
            }
            for scope in Scope::ALL {
                let s = scope as usize;
                let base = base_name(unit, scope);
                let max_key = format!("{base}-max");
                if let (Some(l), None) = (length[u][s], max[u][s]) {
                    // A length of 1 is the default and harmless; QEMU refuses only longer ones.
                    if l > 1 {
                        return Err(SpecError::MissingBase {
                            key: format!("{base}-max-length"),
                            base: max_key,
                        });
                    }
                }
                let Some(a) = avg[u][s] else {
                    if max[u][s].is_some() {
                        return Err(SpecError::MissingBase { key: max_key, base });
                    }
                    if length[u][s].is_some() {
                        return Err(SpecError::MissingBase {
                            key: format!("{base}-max-length"),
                            base,
                        });
                    }
                    continue;
                };
                if let Some(m) = max[u][s] {
                    if m < a {
                        return Err(SpecError::MaxBelowAvg {
                            key: max_key,
                            max: m,
                            base,
                            avg: a,
                        });
                    }
                }
                let limit = Limit {
                    avg: a,
                    max: max[u][s],
                    max_length: length[u][s].unwrap_or(1),
                };
                spec.limits[u][s] = Some(limit);
            }
        }
        if iops_size.is_some()
            && Scope::ALL
                .iter()
                .all(|&s| spec.get(Unit::Iops, s).is_none())
        {
            return Err(SpecError::IopsSizeAlone);
        }
        spec.iops_size = iops_size;
        Ok(spec)
    }
}

impl FromStr for Spec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Spec {
    /// The canonical `key=value,...` form (`none` without limits), which parses back to the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            return f.write_str("none");
        }
        let mut sep = "";
        for unit in Unit::ALL {
            for scope in Scope::ALL {
                let Some(l) = self.get(unit, scope) else {
                    continue;
                };
                let base = base_name(unit, scope);
                write!(f, "{sep}{base}={}", l.avg)?;
                sep = ",";
                if let Some(m) = l.max {
                    write!(f, ",{base}-max={m}")?;
                    if l.max_length != 1 {
                        write!(f, ",{base}-max-length={}", l.max_length)?;
                    }
                }
            }
        }
        if let Some(size) = self.iops_size {
            write!(f, ",iops-size={size}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> SpecError {
        match Spec::parse(s) {
            Ok(spec) => panic!("'{s}' parsed as {spec}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_every_key_and_prints_it_back() {
        let text = "iops-read=100,iops-read-max=400,iops-read-max-length=3,iops-write=50,\
                    bps-total=1048576,bps-total-max=2097152,iops-size=8192";
        let spec = Spec::parse(text).expect("valid");
        assert_eq!(
            spec.get(Unit::Iops, Scope::Read),
            Some(Limit {
                avg: 100,
                max: Some(400),
                max_length: 3
            })
        );
        assert_eq!(spec.get(Unit::Iops, Scope::Write).map(|l| l.avg), Some(50));
        assert_eq!(spec.get(Unit::Iops, Scope::Total), None);
        assert_eq!(
            spec.get(Unit::Bps, Scope::Total).and_then(|l| l.max),
            Some(2_097_152)
        );
        assert_eq!(spec.iops_size(), Some(8192));
        assert_eq!(spec.to_string(), text.replace(' ', ""));
        assert_eq!(Spec::parse(&spec.to_string()), Ok(spec));
    }

    #[test]
    fn none_is_no_limit() {
        let spec = Spec::parse(" none ").expect("valid");
        assert!(spec.is_none());
        assert_eq!(spec.to_string(), "none");
        assert!(!Spec::parse("iops-total=1").expect("valid").is_none());
    }

    #[test]
    fn bucket_holds_max_times_length_or_a_tenth_of_a_second() {
        let spec = Spec::parse(
            "iops-total=1000,iops-total-max=3000,iops-total-max-length=2,bps-read=5000",
        )
        .expect("valid");
        let iops = spec.get(Unit::Iops, Scope::Total).expect("set");
        assert_eq!(iops.bucket_units(), 6000);
        let bps = spec.get(Unit::Bps, Scope::Read).expect("set");
        assert_eq!(bps.bucket_units(), 500);
    }

    #[test]
    fn bad_values_name_the_key() {
        assert_eq!(
            err("iops-total=-5"),
            SpecError::Negative {
                key: "iops-total".into(),
                value: "-5".into()
            }
        );
        assert_eq!(err("iops-total=0"), SpecError::Zero("iops-total".into()));
        assert!(matches!(err("bps-read=fast"), SpecError::NotANumber { .. }));
        assert!(matches!(err("bps-read=1.5"), SpecError::NotANumber { .. }));
        assert!(matches!(
            err("iops-total=1000000000"),
            SpecError::TooLarge {
                max: 100_000_000,
                ..
            }
        ));
        assert!(matches!(
            err("bps-total=99999999999999999999"),
            SpecError::NotANumber { .. }
        ));
        assert!(matches!(
            err("bps-total=2000000000000000"),
            SpecError::TooLarge { .. }
        ));
        assert!(matches!(
            err("iops-total=5,iops-size=100"),
            SpecError::TooSmall { min: 512, .. }
        ));
        assert!(matches!(
            err("iops-total=5,iops-total-max=10,iops-total-max-length=100000"),
            SpecError::TooLarge { .. }
        ));
        let msg = err("iops-total=0").to_string();
        assert!(
            msg.contains("iops-total=0") && msg.contains("none"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_keys_and_malformed_items_are_refused() {
        assert_eq!(err("iops=5"), SpecError::UnknownKey("iops".into()));
        assert_eq!(
            err("iops-total-burst=5"),
            SpecError::UnknownKey("iops-total-burst".into())
        );
        assert_eq!(
            err("iops-total"),
            SpecError::NotKeyValue("iops-total".into())
        );
        assert_eq!(err(""), SpecError::Empty);
        assert_eq!(
            err("iops-total=5,iops-total=6"),
            SpecError::Duplicate("iops-total".into())
        );
        assert!(err("iops=5").to_string().contains("bps-write"));
    }

    #[test]
    fn qemus_rules_hold() {
        assert!(matches!(
            err("iops-total=5,iops-read=3"),
            SpecError::TotalWithReadWrite { .. }
        ));
        assert!(matches!(
            err("bps-write-max=5,bps-total=3"),
            SpecError::TotalWithReadWrite { .. }
        ));
        // Different units do not conflict.
        assert!(Spec::parse("iops-total=5,bps-read=3").is_ok());
        assert_eq!(
            err("iops-read-max=50"),
            SpecError::MissingBase {
                key: "iops-read-max".into(),
                base: "iops-read".into()
            }
        );
        assert_eq!(
            err("iops-read=5,iops-read-max-length=3"),
            SpecError::MissingBase {
                key: "iops-read-max-length".into(),
                base: "iops-read-max".into()
            }
        );
        assert!(matches!(
            err("iops-read=50,iops-read-max=10"),
            SpecError::MaxBelowAvg { .. }
        ));
        assert_eq!(err("iops-size=4096"), SpecError::IopsSizeAlone);
        assert_eq!(
            err("bps-total=4096,iops-size=4096"),
            SpecError::IopsSizeAlone
        );
        assert!(Spec::parse("iops-read=5,iops-read-max-length=1").is_ok());
    }
}
