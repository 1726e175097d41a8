//! The wire vocabulary of virtio-blk (virtio 1.2 §5.2.6): sector size, status bytes, device-ID
//! length and request types.
//!
//! A leaf module: it depends on nothing else in the crate, so the error type can name status
//! bytes and request types, and the parser can name errors, without either depending on the
//! other.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// log2 of the protocol's sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// The protocol's sector size: always 512 bytes, whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Length of the GET_ID device ID string.
pub const DEVICE_ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Status byte: success.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: device or driver error.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: request not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The type of a request, from the header's `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read sectors into the device-writable data.
    In,
    /// `VIRTIO_BLK_T_OUT`: write the device-readable data to sectors.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes stable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: write the device ID string into the data.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: deallocate the ranges in the data.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: zero the ranges in the data.
    WriteZeroes,
    /// Any other type; answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

impl RequestType {
    /// Whether the request changes the disk (refused on a read-only device).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_type_maps_the_spec_values() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(11), RequestType::Discard);
        assert_eq!(RequestType::from(13), RequestType::WriteZeroes);
        assert_eq!(RequestType::from(5), RequestType::Unsupported(5));
    }

    #[test]
    fn only_out_discard_and_write_zeroes_write() {
        let writes: Vec<RequestType> = [0, 1, 4, 8, 11, 13, 5]
            .into_iter()
            .map(RequestType::from)
            .filter(|t| t.is_write())
            .collect();
        assert_eq!(
            writes,
            [
                RequestType::Out,
                RequestType::Discard,
                RequestType::WriteZeroes
            ]
        );
    }
}
