//! A reproducible data pattern with a seed per block.
//!
//! Every [`BLOCK`]-sized block at byte offset `o` holds a header (the block
//! index and the seed, little endian) and a pseudo-random stream derived from
//! `(seed, o / BLOCK)`. A block therefore names its own position: a block
//! written to the wrong offset, a stale block, or a torn one all fail
//! [`check`], and the host can regenerate any range without state.

/// Granularity of the pattern, in bytes.
pub const BLOCK: usize = 4096;

/// The SplitMix64 finaliser: a good 64-bit mixer.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of block number `block` in a stream seeded with `seed`.
pub fn block_seed(seed: u64, block: u64) -> u64 {
    splitmix64(seed ^ splitmix64(block))
}

/// Fills one block (or a prefix of one: `buf.len() <= BLOCK`, a multiple
/// of 8) with the pattern of block number `block`.
fn fill_one(seed: u64, block: u64, buf: &mut [u8]) {
    let mut state = block_seed(seed, block) | 1;
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => block,
            1 => seed,
            _ => {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                state.wrapping_mul(0x2545_F491_4F6C_DD1D)
            }
        };
        word.copy_from_slice(&v.to_le_bytes());
    }
}

/// Fills `buf` with the pattern for the byte range starting at `offset`.
///
/// `offset` must be a multiple of [`BLOCK`] and `buf.len()` a multiple of 8;
/// a trailing partial block gets that block's pattern prefix.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let first = offset / BLOCK as u64;
    for (i, chunk) in buf.chunks_mut(BLOCK).enumerate() {
        fill_one(seed, first + i as u64, chunk);
    }
}

/// Returns the index (in blocks from `offset`) of the first block of `buf`
/// that does not hold the pattern, or `None` when all of it matches.
pub fn check(seed: u64, offset: u64, buf: &[u8]) -> Option<u64> {
    let first = offset / BLOCK as u64;
    let mut expect = vec![0u8; BLOCK.min(buf.len())];
    for (i, chunk) in buf.chunks(BLOCK).enumerate() {
        let want = &mut expect[..chunk.len()];
        fill_one(seed, first + i as u64, want);
        if chunk != &want[..] {
            return Some(i as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_differ_and_check_round_trips() {
        let mut a = vec![0u8; 3 * BLOCK];
        fill(7, 8 * BLOCK as u64, &mut a);
        assert_eq!(check(7, 8 * BLOCK as u64, &a), None);
        assert_ne!(a[16..BLOCK], a[BLOCK + 16..2 * BLOCK]);
        // Same data checked at another offset or seed fails on block 0.
        assert_eq!(check(7, 9 * BLOCK as u64, &a), Some(0));
        assert_eq!(check(8, 8 * BLOCK as u64, &a), Some(0));
        a[2 * BLOCK + 100] ^= 1;
        assert_eq!(check(7, 8 * BLOCK as u64, &a), Some(2));
    }

    #[test]
    fn partial_block_is_a_prefix() {
        let mut full = vec![0u8; BLOCK];
        let mut part = vec![0u8; 512];
        fill(1, 0, &mut full);
        fill(1, 0, &mut part);
        assert_eq!(&full[..512], &part[..]);
    }
}
