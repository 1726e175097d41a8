//! Parameters from the kernel command line.

use std::collections::HashMap;
use std::str::FromStr;

use guest_agent::protocol::{PARAM_PREFIX, RUN_KEY};

use crate::error::{Context, Error, Result};

/// The `agent.*` parameters of the kernel command line.
#[derive(Debug, Default, Clone)]
pub struct Params {
    map: HashMap<String, String>,
    instance: String,
}

impl Params {
    /// Reads `/proc/cmdline`.
    pub fn from_proc_cmdline() -> Result<Self> {
        let s = std::fs::read_to_string("/proc/cmdline").ctx(|| "read /proc/cmdline".into())?;
        Ok(Self::parse(&s))
    }

    /// Parses a command line: keeps the `agent.` words, without the prefix.
    pub fn parse(cmdline: &str) -> Self {
        let map = cmdline
            .split_whitespace()
            .filter_map(|w| w.strip_prefix(PARAM_PREFIX))
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (w.to_string(), "1".to_string()),
            })
            .collect();
        Params {
            map,
            instance: String::new(),
        }
    }

    /// The parameters as seen by one workload instance. A workload may run
    /// more than once under names `<workload>#<tag>`; the keys
    /// `<workload>#<tag>.<key>` then override `<workload>.<key>`.
    pub fn scoped(&self, instance: &str) -> Params {
        let mut p = self.clone();
        p.instance = instance.to_string();
        if let Some((base, _)) = instance.split_once('#') {
            let prefix = format!("{instance}.");
            for (k, v) in &self.map {
                if let Some(rest) = k.strip_prefix(&prefix) {
                    p.map.insert(format!("{base}.{rest}"), v.clone());
                }
            }
        }
        p
    }

    /// The workload instance these parameters were scoped for.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The workloads to run, in order (default: `info`).
    pub fn workloads(&self) -> Vec<String> {
        let key = RUN_KEY.strip_prefix(PARAM_PREFIX).unwrap_or(RUN_KEY);
        match self.map.get(key) {
            Some(v) => v
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            None => vec!["info".to_string()],
        }
    }

    /// The raw value of `agent.<workload>.<key>`, else `agent.<key>`.
    pub fn raw(&self, workload: &str, key: &str) -> Option<(String, &str)> {
        if !workload.is_empty() {
            let k = format!("{workload}.{key}");
            if let Some(v) = self.map.get(&k) {
                return Some((k, v.as_str()));
            }
        }
        self.map.get(key).map(|v| (key.to_string(), v.as_str()))
    }

    /// A typed parameter with a default.
    pub fn get<T: FromStr>(&self, workload: &str, key: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.raw(workload, key) {
            None => Ok(default),
            Some((k, v)) => v.parse().map_err(|e: T::Err| Error::Param {
                key: k,
                value: v.to_string(),
                why: e.to_string(),
            }),
        }
    }

    /// A string parameter with a default.
    pub fn get_str(&self, workload: &str, key: &str, default: &str) -> String {
        self.raw(workload, key)
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| default.to_string())
    }

    /// A boolean parameter (`1/0`, `true/false`, `yes/no`, `on/off`).
    pub fn get_bool(&self, workload: &str, key: &str, default: bool) -> bool {
        match self.raw(workload, key) {
            Some((_, v)) => matches!(v, "1" | "true" | "yes" | "on" | "y"),
            None => default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workloads_and_scoped_params() {
        let p = Params::parse(
            "console=ttyS0 agent.run=info,verify agent.verify.mib=8 agent.seed=3 agent.flag quiet",
        );
        assert_eq!(p.workloads(), vec!["info", "verify"]);
        assert_eq!(p.get::<u64>("verify", "mib", 1).ok(), Some(8));
        assert_eq!(p.get::<u64>("randio", "mib", 1).ok(), Some(1));
        assert_eq!(p.get::<u64>("verify", "seed", 0).ok(), Some(3));
        assert!(p.get_bool("x", "flag", false));
        assert!(p.get::<u64>("", "run", 0).is_err());
    }

    #[test]
    fn instances_override_their_workload() {
        let p = Params::parse("agent.run=w#a,w#b agent.w.n=1 agent.w#b.n=2");
        assert_eq!(p.scoped("w#a").get::<u32>("w", "n", 0).ok(), Some(1));
        assert_eq!(p.scoped("w#b").get::<u32>("w", "n", 0).ok(), Some(2));
        assert_eq!(p.scoped("w#b").instance(), "w#b");
    }
}
