//! `ext4`: make a file system on the disk, mount it, write, sync, unmount.
//!
//! Parameters: `mkfs` (true; false mounts an existing file system),
//! `mib` (8: size of `/data.bin`), `seed` (4), `dontcache_mib` (4: size of
//! `/dontcache.bin`, written with `RWF_DONTCACHE`; 0 skips it).
//!
//! Files written, for the host to check with `debugfs -R 'cat /path'`:
//! `/hello.txt` (the text `protocol::EXT4_HELLO`), `/data.bin` (the pattern with `seed`
//! from offset 0) and `/dontcache.bin` (the pattern with `seed + 1`).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use guest_agent::protocol::EXT4_HELLO as HELLO;
use serde_json::{json, Value};

use super::dontcache::{write_job, WriteJob};
use super::DISK;
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys;

const MNT: &str = "/mnt";
const MIB: u64 = 1 << 20;

/// `ext4`.
pub fn run(p: &Params) -> Result<Value> {
    let seed: u64 = p.get("ext4", "seed", 4)?;
    let data_len = p.get("ext4", "mib", 8u64)? * MIB;
    let dc_len = p.get("ext4", "dontcache_mib", 4u64)? * MIB;
    let mut out = serde_json::Map::new();

    if p.get_bool("ext4", "mkfs", true) {
        let start = Instant::now();
        let o = Command::new("/sbin/mkfs.ext4")
            .args(["-F", "-q", "-E", "nodiscard", DISK])
            .output()
            .ctx(|| "run /sbin/mkfs.ext4".into())?;
        if !o.status.success() {
            return Err(Error::Check(format!(
                "mkfs.ext4 failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        out.insert("mkfs_ms".into(), json!(start.elapsed().as_millis() as u64));
    }
    std::fs::create_dir_all(MNT).ctx(|| format!("mkdir {MNT}"))?;
    sys::mount(DISK, MNT, "ext4").ctx(|| format!("mount {DISK} on {MNT}"))?;

    let result = (|| -> Result<()> {
        let hello = Path::new(MNT).join("hello.txt");
        let mut f = std::fs::File::create(&hello).ctx(|| format!("create {}", hello.display()))?;
        f.write_all(HELLO.as_bytes())
            .ctx(|| format!("write {}", hello.display()))?;
        f.sync_all().ctx(|| format!("fsync {}", hello.display()))?;

        let data = Path::new(MNT).join("data.bin");
        let v = write_job(&WriteJob {
            path: &data,
            offset: 0,
            len: data_len,
            bs: MIB,
            seed,
            flags: 0,
            fsync: true,
            verify: true,
            create: true,
        })?;
        out.insert("data".into(), v);

        if dc_len > 0 {
            let dc = Path::new(MNT).join("dontcache.bin");
            let v = write_job(&WriteJob {
                path: &dc,
                offset: 0,
                len: dc_len,
                bs: MIB,
                seed: seed + 1,
                flags: sys::RWF_DONTCACHE,
                fsync: true,
                verify: true,
                create: true,
            })?;
            if v["supported"] == json!(false) {
                return Err(Error::Check(format!(
                    "pwritev2(RWF_DONTCACHE) on ext4: {}",
                    v["error"].as_str().unwrap_or("not supported")
                )));
            }
            out.insert("dontcache".into(), v);
        }
        sys::sync();
        Ok(())
    })();
    let umount = sys::umount(MNT).ctx(|| format!("umount {MNT}"));
    result?;
    umount?;
    out.insert(
        "files".into(),
        json!({
            "/hello.txt": HELLO.len(),
            "/data.bin": data_len,
            "/dontcache.bin": dc_len,
        }),
    );
    out.insert("seed".into(), json!(seed));
    Ok(Value::Object(out))
}
