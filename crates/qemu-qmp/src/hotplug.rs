//! Which QMP events are a vCPU unplug, and which of them to act on.
//!
//! With QEMU 10 and a Linux guest, `device_del` of a CPU produces, in order:
//!
//! 1. `ACPI_DEVICE_OST {"info": {"source": 3, "status": 132, "slot": "1", "slot-type": "CPU"}}`
//!    about 8 ms later: the guest's `_OST` for the eject request (source 3) saying "ejection in
//!    progress" (0x84), *before* it takes the CPU offline;
//! 2. the guest offlines the CPU, which waits for every request in flight on the hardware queues
//!    that CPU alone served;
//! 3. `DEVICE_DELETED {"path": "<cpu-qom-path>/lapic"}` (no `device` field), once it is gone.
//!
//! 4. `ACPI_DEVICE_OST` with source 3, status 0 (the eject succeeded), a few ms after (3).
//!
//! (QEMU 10.0.2 under TCG with Debian's 7.3 cloud kernel, `device_del` of boot vCPU 1: the OST
//! 24 ms after `device_del`, `DEVICE_DELETED` 77 ms after the OST, the success OST 8 ms later.
//! Re-adding it with `device_add` gives an OST with source 1 (insert), status 0 and the new
//! `device` id, and the vCPU comes back as `/machine/peripheral/<id>` on a new thread.)
//!
//! So the drain starts on (1), [`HotplugEvent::UnplugRequested`]: a backend that waited for (3),
//! [`HotplugEvent::Removed`], would hold the guest's CPU offline until its batch timer fired. If
//! the guest refuses the eject instead, its `_OST` says so ([`HotplugEvent::UnplugRefused`]) and
//! the vCPU stays.

use serde_json::Value;

use crate::qmp::QmpEvent;

/// ACPI `_OST` source event: eject request (ACPI 6.5, 6.3.5).
const OST_EJECT_REQUEST: u64 = 0x03;
/// `_OST` status for an eject request: ejection in progress (pending).
const OST_EJECT_IN_PROGRESS: u64 = 0x84;

/// A vCPU hotplug event, from a QMP event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HotplugEvent {
    /// QEMU's `ACPI_DEVICE_OST` with `info.source == 3` (eject request), `info.status == 132`
    /// (0x84, ejection in progress) and `info["slot-type"] == "CPU"`: the guest is about to take
    /// vCPU `vcpu` offline. The drain must start here, before the guest offlines the CPU. The
    /// event's `slot` is a string holding the vCPU index.
    UnplugRequested {
        /// The vCPU index (`cpu-index` in `query-cpus-fast`).
        vcpu: usize,
    },
    /// `DEVICE_DELETED` whose path ends in `/lapic` (no `device` field): confirmation, the CPU is
    /// gone.
    Removed {
        /// The CPU's QOM path (the event's path without `/lapic`), as `query-cpus-fast` gave it.
        qom_path: String,
    },
    /// `ACPI_DEVICE_OST` of a CPU eject request that the guest failed or refused (status 1, 2 or
    /// 0x80..=0x83: failure, unrecognized, not supported, in use, busy, dependency busy): vCPU
    /// `vcpu` stays online, after an [`UnplugRequested`](Self::UnplugRequested) or not.
    UnplugRefused {
        /// The vCPU index.
        vcpu: usize,
        /// The `_OST` status code.
        status: u64,
    },
}

/// What `event` means for vCPU hotplug, if anything. Events of other devices (a DIMM's OST, a
/// disk's `DEVICE_DELETED`) and other OST statuses (an insert, a successful eject) are `None`.
pub fn classify(event: &QmpEvent) -> Option<HotplugEvent> {
    match event.name.as_str() {
        "ACPI_DEVICE_OST" => {
            let info = event.data.get("info")?;
            if info.get("slot-type")?.as_str()? != "CPU"
                || info.get("source")?.as_u64()? != OST_EJECT_REQUEST
            {
                return None;
            }
            let vcpu = slot(info)?;
            match info.get("status")?.as_u64()? {
                OST_EJECT_IN_PROGRESS => Some(HotplugEvent::UnplugRequested { vcpu }),
                status @ (0x01 | 0x02 | 0x80..=0x83) => {
                    Some(HotplugEvent::UnplugRefused { vcpu, status })
                }
                // 0: the eject succeeded (DEVICE_DELETED says so too); the rest are reserved.
                _ => None,
            }
        }
        "DEVICE_DELETED" => {
            if event.data.get("device").is_some_and(|d| !d.is_null()) {
                return None;
            }
            let path = event.data.get("path")?.as_str()?;
            let qom_path = path.strip_suffix("/lapic")?;
            Some(HotplugEvent::Removed {
                qom_path: qom_path.to_string(),
            })
        }
        _ => None,
    }
}

/// Whether `event` is an `ACPI_DEVICE_OST` of a CPU slot, whatever it says (an insert, an eject,
/// its outcome): a hint that the set of vCPUs may be changing.
pub fn is_cpu_ost(event: &QmpEvent) -> bool {
    event.name == "ACPI_DEVICE_OST"
        && event
            .data
            .get("info")
            .and_then(|info| info.get("slot-type"))
            .and_then(Value::as_str)
            == Some("CPU")
}

/// The vCPU index in an OST `info`'s `slot`: a string holding a number (QEMU's), or a number.
fn slot(info: &Value) -> Option<usize> {
    match info.get("slot")? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> QmpEvent {
        let value: Value = serde_json::from_str(json).unwrap();
        QmpEvent::new(
            value["event"].as_str().unwrap(),
            value.get("data").cloned().unwrap_or(Value::Null),
        )
    }

    #[test]
    fn eject_request_in_progress_for_a_cpu_is_unplug_requested() {
        // As QEMU 10 sends it, ~8 ms after device_del of vCPU 1.
        let ost = event(
            r#"{"timestamp": {"seconds": 1764363000, "microseconds": 123456}, "event": "ACPI_DEVICE_OST", "data": {"info": {"device": "", "source": 3, "status": 132, "slot": "1", "slot-type": "CPU"}}}"#,
        );
        assert_eq!(
            classify(&ost),
            Some(HotplugEvent::UnplugRequested { vcpu: 1 })
        );
        assert!(is_cpu_ost(&ost));
    }

    #[test]
    fn other_ost_statuses_sources_and_slot_types_are_not_unplug_requests() {
        for json in [
            // Eject succeeded: DEVICE_DELETED is the confirmation.
            r#"{"event": "ACPI_DEVICE_OST", "data": {"info": {"source": 3, "status": 0, "slot": "1", "slot-type": "CPU"}}}"#,
            // Insertion (source 1).
            r#"{"event": "ACPI_DEVICE_OST", "data": {"info": {"source": 1, "status": 0, "slot": "2", "slot-type": "CPU"}}}"#,
            // A memory module's eject.
            r#"{"event": "ACPI_DEVICE_OST", "data": {"info": {"source": 3, "status": 132, "slot": "1", "slot-type": "DIMM"}}}"#,
            // Reserved status.
            r#"{"event": "ACPI_DEVICE_OST", "data": {"info": {"source": 3, "status": 133, "slot": "1", "slot-type": "CPU"}}}"#,
            // A slot that is not a vCPU index.
            r#"{"event": "ACPI_DEVICE_OST", "data": {"info": {"source": 3, "status": 132, "slot": "x", "slot-type": "CPU"}}}"#,
            r#"{"event": "ACPI_DEVICE_OST", "data": {}}"#,
            r#"{"event": "ACPI_DEVICE_OST"}"#,
        ] {
            assert_eq!(classify(&event(json)), None, "{json}");
        }
    }

    #[test]
    fn refused_eject_of_a_cpu_is_unplug_refused() {
        let busy = event(
            r#"{"event": "ACPI_DEVICE_OST", "data": {"info": {"source": 3, "status": 130, "slot": "2", "slot-type": "CPU"}}}"#,
        );
        assert_eq!(
            classify(&busy),
            Some(HotplugEvent::UnplugRefused {
                vcpu: 2,
                status: 0x82
            })
        );
    }

    #[test]
    fn lapic_device_deleted_is_removed_with_the_cpu_path() {
        let deleted = event(
            r#"{"timestamp": {"seconds": 1764363001, "microseconds": 5}, "event": "DEVICE_DELETED", "data": {"path": "/machine/unattached/device[2]/lapic"}}"#,
        );
        assert_eq!(
            classify(&deleted),
            Some(HotplugEvent::Removed {
                qom_path: "/machine/unattached/device[2]".into()
            })
        );
        assert!(!is_cpu_ost(&deleted));
    }

    #[test]
    fn other_device_deleted_events_are_not_removals() {
        for json in [
            r#"{"event": "DEVICE_DELETED", "data": {"device": "cpu1", "path": "/machine/peripheral/cpu1"}}"#,
            r#"{"event": "DEVICE_DELETED", "data": {"device": "disk1", "path": "/machine/peripheral/disk1/lapic"}}"#,
            r#"{"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/virtio-disk/virtio-backend"}}"#,
            r#"{"event": "DEVICE_DELETED", "data": {}}"#,
            r#"{"event": "STOP"}"#,
        ] {
            assert_eq!(classify(&event(json)), None, "{json}");
        }
    }
}
