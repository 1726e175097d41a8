//! The virtio-blk protocol, as the device sees it (virtio 1.2 §5.2), with no I/O.
//!
//! This crate sits between the vhost-user plumbing in `backend/` and the disk engines in
//! `crates/disk`: the backend pops a descriptor chain, hands it to [`Request::parse`], submits the
//! typed [`Request`] (whose data segments point straight into guest memory) to a disk engine, and
//! finally writes the status byte with [`write_status`].
//!
//! - [`config`]: the 96-byte `virtio_blk_config` space and GET_CONFIG/SET_CONFIG.
//! - [`features`]: the device feature bits we offer.
//! - [`protocol`]: the wire vocabulary (sector size, status bytes, request types), a leaf that
//!   the other modules share.
//! - [`request`]: request parsing and validation, status and device-ID writing.
//! - [`walk`]: the status byte of a chain too long for virtio-queue to walk.
//!
//! Everything a guest controls is validated here, once, before it reaches an I/O engine: a
//! malformed chain costs only itself.

pub mod config;
pub mod error;
pub mod features;
pub mod protocol;
pub mod request;
pub mod walk;

pub use config::{BlkConfig, CONFIG_SPACE_SIZE, WRITEBACK_OFFSET};
pub use error::{Error, Result};
pub use features::{device_features, FeatureOptions};
pub use protocol::{
    RequestType, DEVICE_ID_LEN, SECTOR_SHIFT, SECTOR_SIZE, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
pub use request::{
    device_id, write_device_id, write_status, Chain, DataSegment, DiscardRange, Limits, ParseError,
    Request, RequestBuffers,
};
pub use walk::status_of_long_chain;
