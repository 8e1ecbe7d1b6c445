//! The data packet (spec/02-wire-format.md, "Data packet"): a 16-byte NTM header, the encrypted
//! virtual IP packet, and a 16-byte tag. 32 bytes of overhead in all.
//!
//! ```text
//!  0        1        2        4                8                       16
//! +--------+--------+--------+----------------+-----------------------+--------------- - -+--------+
//! | 0x01   | flags  | rsvd=0 | Path ID (BE)   | counter (BE)          | ciphertext        | tag 16 |
//! +--------+--------+--------+----------------+-----------------------+--------------- - -+--------+
//! ```
//!
//! Nothing here allocates: the caller owns the buffer, the inner packet is encrypted in place.

use core::ops::Range;

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::crypto::{AeadKey, NONCE_LEN, TAG_LEN};
use crate::error::{ApiMisuse, WireError};

/// The first byte of every data packet.
pub const DATA_TYPE: u8 = 0x01;
/// Bytes of the NTM data header.
pub const DATA_HEADER_LEN: usize = 16;
/// Bytes a data packet adds to the inner virtual IP packet.
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;
/// The key-phase flag: which of the tunnel's two current key generations sealed the packet.
pub const FLAG_KEY_PHASE: u8 = 0x01;
/// The MTU of the virtual interface for an outer path MTU of 1500 over IPv6:
/// 1500 - 40 (IPv6) - 8 (UDP) - 32 (NTM overhead).
pub const VIRTUAL_MTU: usize = 1500 - 40 - 8 - DATA_OVERHEAD;

/// The fixed data header, viewed in place.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
pub struct DataHeader {
    msg_type: u8,
    flags: u8,
    reserved: U16,
    path_id: U32,
    counter: U64,
}

impl DataHeader {
    pub fn path_id(&self) -> u32 {
        self.path_id.get()
    }
    pub fn counter(&self) -> u64 {
        self.counter.get()
    }
    pub fn key_phase(&self) -> bool {
        self.flags & FLAG_KEY_PHASE != 0
    }
}

/// A checked view of a data packet. Once [`DataPacket::parse`] succeeded no accessor can fail.
#[derive(Debug, Clone, Copy)]
pub struct DataPacket<'a> {
    header: &'a DataHeader,
    sealed_len: usize,
}

impl<'a> DataPacket<'a> {
    /// Checks the header: type, reserved bits, and room for a tag. Does not authenticate.
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < DATA_OVERHEAD {
            return Err(WireError::ShortHeader {
                len: buf.len(),
                needed: DATA_OVERHEAD,
            });
        }
        let (header, rest) =
            DataHeader::ref_from_prefix(buf).map_err(|_| WireError::ShortHeader {
                len: buf.len(),
                needed: DATA_HEADER_LEN,
            })?;
        if header.msg_type != DATA_TYPE {
            return Err(WireError::UnknownType(header.msg_type));
        }
        if header.flags & !FLAG_KEY_PHASE != 0 || header.reserved.get() != 0 {
            return Err(WireError::ReservedBits);
        }
        Ok(DataPacket {
            header,
            sealed_len: rest.len(),
        })
    }

    pub fn path_id(&self) -> u32 {
        self.header.path_id()
    }
    pub fn counter(&self) -> u64 {
        self.header.counter()
    }
    pub fn key_phase(&self) -> bool {
        self.header.key_phase()
    }
    /// Length of the inner packet once opened.
    pub fn inner_len(&self) -> usize {
        self.sealed_len - TAG_LEN
    }
}

fn data_nonce(counter: u64) -> [u8; NONCE_LEN] {
    // Keys are per direction, so the counter alone makes the nonce unique under a key.
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// Seals a data packet in place. The caller has written the inner virtual IP packet at
/// `buf[DATA_HEADER_LEN..DATA_HEADER_LEN + inner_len]`; `buf` must hold `inner_len +
/// DATA_OVERHEAD` bytes. Writes the header and tag and returns the packet's length.
///
/// The counter must never repeat under one key; the caller keeps it (spec: a per-direction
/// counter starting at 0) and must stop before [`crate::replay::REJECT_AFTER_COUNTER`].
pub fn seal_data(
    key: &AeadKey,
    path_id: u32,
    counter: u64,
    key_phase: bool,
    buf: &mut [u8],
    inner_len: usize,
) -> Result<usize, ApiMisuse> {
    let total = inner_len
        .checked_add(DATA_OVERHEAD)
        .ok_or(ApiMisuse::Invalid {
            field: "inner_len",
            why: "overflows",
        })?;
    if buf.len() < total {
        return Err(ApiMisuse::BufferTooSmall {
            needed: total,
            available: buf.len(),
        });
    }
    let header = DataHeader {
        msg_type: DATA_TYPE,
        flags: if key_phase { FLAG_KEY_PHASE } else { 0 },
        reserved: U16::new(0),
        path_id: U32::new(path_id),
        counter: U64::new(counter),
    };
    let (head, rest) = buf.split_at_mut(DATA_HEADER_LEN);
    head.copy_from_slice(header.as_bytes());
    let (inner, tail) = rest.split_at_mut(inner_len);
    let tag = key.seal(&data_nonce(counter), head, inner);
    tail[..TAG_LEN].copy_from_slice(&tag);
    Ok(total)
}

/// Opens a data packet in place and returns the range of `buf` holding the inner packet.
/// `buf` is exactly the received datagram. The replay check is the caller's (it owns the
/// per-tunnel [`crate::replay::ReplayWindow`]): check before, accept after this succeeds.
pub fn open_data(key: &AeadKey, buf: &mut [u8]) -> Result<Range<usize>, WireError> {
    let counter = DataPacket::parse(buf)?.counter();
    let len = buf.len();
    let (head, rest) = buf.split_at_mut(DATA_HEADER_LEN);
    let (inner, tag) = rest.split_at_mut(len - DATA_OVERHEAD);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag);
    key.open(&data_nonce(counter), head, inner, &t)?;
    Ok(DATA_HEADER_LEN..len - TAG_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SecretKey;

    fn key() -> AeadKey {
        AeadKey::new(&SecretKey::from_bytes([0x42; 32]))
    }

    #[test]
    fn overhead_is_at_most_32_bytes_and_the_mtu_follows() {
        assert_eq!(DATA_OVERHEAD, 32);
        assert_eq!(VIRTUAL_MTU, 1420);
    }

    #[test]
    fn a_sealed_packet_opens_to_the_same_inner_bytes() {
        let inner = b"\x45\x00\x00\x14virtual ip packet";
        let mut buf = vec![0u8; inner.len() + DATA_OVERHEAD];
        buf[DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()].copy_from_slice(inner);
        let n = seal_data(&key(), 0xdead_beef, 7, true, &mut buf, inner.len()).unwrap();
        assert_eq!(n, buf.len());
        let p = DataPacket::parse(&buf).unwrap();
        assert_eq!(
            (p.path_id(), p.counter(), p.key_phase()),
            (0xdead_beef, 7, true)
        );
        let r = open_data(&key(), &mut buf).unwrap();
        assert_eq!(&buf[r], inner);
    }

    #[test]
    fn a_changed_header_byte_fails_authentication() {
        let mut buf = vec![0u8; 20 + DATA_OVERHEAD];
        seal_data(&key(), 1, 1, false, &mut buf, 20).unwrap();
        for i in 4..DATA_HEADER_LEN {
            let mut b = buf.clone();
            b[i] ^= 0x80;
            assert_eq!(
                open_data(&key(), &mut b),
                Err(WireError::AuthenticationFailed)
            );
        }
    }

    #[test]
    fn reserved_bits_and_short_packets_are_rejected_before_decryption() {
        let mut buf = vec![0u8; DATA_OVERHEAD];
        seal_data(&key(), 1, 1, false, &mut buf, 0).unwrap();
        let mut b = buf.clone();
        b[1] = 0x02;
        assert_eq!(DataPacket::parse(&b).unwrap_err(), WireError::ReservedBits);
        assert!(matches!(
            DataPacket::parse(&buf[..31]),
            Err(WireError::ShortHeader { .. })
        ));
        assert_eq!(
            seal_data(&key(), 1, 1, false, &mut buf, 1),
            Err(ApiMisuse::BufferTooSmall {
                needed: 33,
                available: 32
            })
        );
    }
}
