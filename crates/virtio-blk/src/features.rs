//! The virtio feature bits the device offers (virtio 1.2 §5.2.3, §6).
//!
//! The backend reports these from `VhostUserBackend::features()`, adding the vhost-user-only
//! `VHOST_USER_F_PROTOCOL_FEATURES` itself; the vhost-user protocol features (MQ, CONFIG,
//! REPLY_ACK, …) are the backend's business too.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// What the device offers depends on these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeatureOptions {
    /// The image is read-only: offer `RO`, withhold `DISCARD` and `WRITE_ZEROES`.
    pub read_only: bool,
    /// Number of request queues. `MQ` is offered whenever it is at least 1: the specification
    /// allows `MQ` with a single queue, and `num_queues` in the config space is then valid.
    pub num_queues: u16,
}

const fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// The device feature bits: `VERSION_1`, `SEG_MAX`, `SIZE_MAX`, `BLK_SIZE`, `TOPOLOGY`, `FLUSH`,
/// `CONFIG_WCE`, `MQ`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`; `DISCARD` and `WRITE_ZEROES` on a
/// writable device, `RO` on a read-only one.
pub fn device_features(opts: &FeatureOptions) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC);
    if opts.num_queues >= 1 {
        features |= bit(VIRTIO_BLK_F_MQ);
    }
    if opts.read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    } else {
        features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_device_offers_discard_and_write_zeroes_but_not_ro() {
        let f = device_features(&FeatureOptions {
            read_only: false,
            num_queues: 4,
        });
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & bit(b), 0, "feature bit {b} missing");
        }
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn read_only_device_offers_ro_and_no_discard_or_write_zeroes() {
        let f = device_features(&FeatureOptions {
            read_only: true,
            num_queues: 1,
        });
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn no_unimplemented_feature_is_offered() {
        // GEOMETRY (4), legacy BARRIER (0) and SCSI (7), LIFETIME (15), SECURE_ERASE (16),
        // ZONED (17), and nothing above VERSION_1.
        let f = device_features(&FeatureOptions {
            read_only: false,
            num_queues: 2,
        });
        for b in [0u32, 4, 7, 15, 16, 17] {
            assert_eq!(f & bit(b), 0, "feature bit {b} offered");
        }
        assert_eq!(f >> 33, 0);
    }
}
