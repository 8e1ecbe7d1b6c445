//! The signaling envelope (spec/02-wire-format.md, "Common header"): a 24-byte header, an optional
//! 32-byte ephemeral public key, the body, and, when sealed, a 16-byte tag.
//!
//! ```text
//!  0        1        2                 4                 8                                16
//! +--------+--------+-----------------+-----------------+--------------------------------+
//! | type   | version| flags           | key ID          | sequence                       |
//! +--------+--------+-----------------+-----------------+--------------------------------+
//! | transaction ID  | body length     | reserved = 0    |  [ephemeral key 32] body [tag 16]
//! +-----------------+-----------------+-----------------+
//! 16                20                22                24
//! ```
//!
//! Sealing: AES-256-GCM, nonce = `role (1) || 0 0 0 || sequence (8, BE)`, associated data = the
//! header and the ephemeral key. The body length counts the body and the tag.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::codec::PublicKeyBytes;
use crate::crypto::{AeadKey, NONCE_LEN, TAG_LEN};
use crate::error::{ApiMisuse, WireError};
use crate::message::{EphemeralRule, Message, MessageType};

/// The protocol version this implementation speaks.
pub const VERSION: u8 = 1;
/// Bytes of the fixed signaling header.
pub const HEADER_LEN: usize = 24;
/// Bytes of an ephemeral public key carried after the header.
pub const EPHEMERAL_LEN: usize = 32;
/// The largest signaling datagram: fits the IPv6 minimum MTU (1280 - 40 - 8).
pub const MAX_SIGNALING_LEN: usize = 1232;

/// Flag: the body is sealed (followed by a tag).
pub const FLAG_SEALED: u16 = 0x0001;
/// Flag: a 32-byte ephemeral public key follows the header.
pub const FLAG_EPHEMERAL: u16 = 0x0002;
/// The two bits holding the sender's [`Role`].
pub const ROLE_MASK: u16 = 0x000c;
const ROLE_SHIFT: u16 = 2;
const DEFINED_FLAGS: u16 = FLAG_SEALED | FLAG_EPHEMERAL | ROLE_MASK;

/// Which holder of a key sent the message. Part of the nonce, so the holders of one key never
/// collide on nonces, and checked by receivers so a message cannot be reflected to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(u8)]
pub enum Role {
    /// The side that requested or created the key (node to AS/DC/NS/CS, DC to RS/NS/CS, the
    /// distributing DC between DCs, the tunnel initiator).
    A = 0,
    /// The other holder (the server; the receiving DC; the tunnel responder).
    B = 1,
    /// A third holder that relays between A and B (the RS, for RELAY_BIND replies).
    Relay = 2,
}

impl Role {
    fn from_bits(bits: u16) -> Option<Role> {
        match bits {
            0 => Some(Role::A),
            1 => Some(Role::B),
            2 => Some(Role::Relay),
            _ => None,
        }
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
struct RawHeader {
    msg_type: u8,
    version: u8,
    flags: U16,
    key_id: U32,
    seq: U64,
    txid: U32,
    body_len: U16,
    reserved: U16,
}

/// The envelope fields a sender chooses (everything in the header but the type and lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Envelope {
    /// The sender's role under the key.
    pub role: Role,
    /// Names the key (0 where the header's ephemeral key names it instead).
    pub key_id: u32,
    /// The sender's per-key sequence number: strictly increasing, never reused under one key.
    pub seq: u64,
    /// Chosen by the requester, echoed by the response, ACK or ERROR.
    pub txid: u32,
    /// The sender's X25519 ephemeral public key, for the types that carry one.
    pub ephemeral: Option<PublicKeyBytes>,
}

/// A checked signaling header. After [`SignalingPacket::parse`] no accessor can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub msg_type: MessageType,
    pub sealed: bool,
    pub envelope: Envelope,
}

/// A checked view of a signaling datagram: header fields and the (possibly sealed) body.
#[derive(Debug, Clone, Copy)]
pub struct SignalingPacket<'a> {
    header: Header,
    /// Header plus ephemeral key: the associated data when sealed.
    prefix: &'a [u8],
    /// The body, with the tag at its end when sealed.
    body: &'a [u8],
}

impl<'a> SignalingPacket<'a> {
    /// Checks the header against the datagram: known type and version, defined flags only,
    /// protection that fits the type, and a body length that matches the datagram exactly.
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        let (raw, _) = RawHeader::ref_from_prefix(buf).map_err(|_| WireError::ShortHeader {
            len: buf.len(),
            needed: HEADER_LEN,
        })?;
        // Version before type: a datagram of a later version may use types this one does not
        // know, and must still be answered with VersionNotSupported.
        if raw.version != VERSION {
            return Err(WireError::UnsupportedVersion(raw.version));
        }
        let msg_type =
            MessageType::from_u8(raw.msg_type).ok_or(WireError::UnknownType(raw.msg_type))?;
        let flags = raw.flags.get();
        if flags & !DEFINED_FLAGS != 0 || raw.reserved.get() != 0 {
            return Err(WireError::ReservedBits);
        }
        let role =
            Role::from_bits((flags & ROLE_MASK) >> ROLE_SHIFT).ok_or(WireError::ReservedBits)?;
        let sealed = flags & FLAG_SEALED != 0;
        let has_eph = flags & FLAG_EPHEMERAL != 0;
        let protection_ok = (sealed || msg_type.may_be_plaintext())
            && match msg_type.ephemeral() {
                EphemeralRule::Forbidden => !has_eph,
                EphemeralRule::Required => has_eph,
                EphemeralRule::Optional => true,
            };
        if !protection_ok {
            return Err(WireError::WrongProtection {
                msg_type: raw.msg_type,
            });
        }
        if buf.len() > MAX_SIGNALING_LEN {
            return Err(WireError::Oversized {
                len: buf.len(),
                max: MAX_SIGNALING_LEN,
            });
        }
        let prefix_len = HEADER_LEN + if has_eph { EPHEMERAL_LEN } else { 0 };
        let body_len = usize::from(raw.body_len.get());
        let declared = prefix_len + body_len;
        if declared != buf.len() {
            return Err(WireError::LengthMismatch {
                declared,
                actual: buf.len(),
            });
        }
        if sealed && body_len < TAG_LEN {
            return Err(WireError::LengthMismatch {
                declared,
                actual: buf.len(),
            });
        }
        let ephemeral = if has_eph {
            let mut k = [0u8; EPHEMERAL_LEN];
            k.copy_from_slice(&buf[HEADER_LEN..prefix_len]);
            Some(k)
        } else {
            None
        };
        Ok(SignalingPacket {
            header: Header {
                msg_type,
                sealed,
                envelope: Envelope {
                    role,
                    key_id: raw.key_id.get(),
                    seq: raw.seq.get(),
                    txid: raw.txid.get(),
                    ephemeral,
                },
            },
            prefix: &buf[..prefix_len],
            body: &buf[prefix_len..],
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Decodes the body of an unsealed message (only ERROR may be unsealed).
    pub fn decode_plain(&self) -> Result<Message, WireError> {
        if self.header.sealed {
            return Err(WireError::WrongProtection {
                msg_type: self.header.msg_type.to_u8(),
            });
        }
        Message::decode_body(self.header.msg_type, self.body)
    }
}

fn nonce(role: Role, seq: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[0] = role as u8;
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

fn check_ephemeral(msg_type: MessageType, env: &Envelope) -> Result<(), ApiMisuse> {
    let ok = match msg_type.ephemeral() {
        EphemeralRule::Forbidden => env.ephemeral.is_none(),
        EphemeralRule::Required => env.ephemeral.is_some(),
        EphemeralRule::Optional => true,
    };
    if ok {
        Ok(())
    } else {
        Err(ApiMisuse::WrongProtection {
            msg_type: msg_type.to_u8(),
            expected: match msg_type.ephemeral() {
                EphemeralRule::Required => "sent with an ephemeral key",
                _ => "sent without an ephemeral key",
            },
        })
    }
}

/// Writes header, ephemeral key and body; returns (prefix length, total length without tag).
fn write_unsealed(
    msg: &Message,
    env: &Envelope,
    sealed: bool,
    out: &mut [u8],
) -> Result<(usize, usize), ApiMisuse> {
    let msg_type = msg.msg_type();
    check_ephemeral(msg_type, env)?;
    let prefix_len = HEADER_LEN + env.ephemeral.map_or(0, |_| EPHEMERAL_LEN);
    let body_len = msg.body_len() + if sealed { TAG_LEN } else { 0 };
    let total = prefix_len + body_len;
    if total > MAX_SIGNALING_LEN {
        return Err(ApiMisuse::TooLong {
            field: "signaling datagram",
            len: total,
            max: MAX_SIGNALING_LEN,
        });
    }
    if out.len() < total {
        return Err(ApiMisuse::BufferTooSmall {
            needed: total,
            available: out.len(),
        });
    }
    let mut flags = (env.role as u16) << ROLE_SHIFT;
    if sealed {
        flags |= FLAG_SEALED;
    }
    if env.ephemeral.is_some() {
        flags |= FLAG_EPHEMERAL;
    }
    let raw = RawHeader {
        msg_type: msg_type.to_u8(),
        version: VERSION,
        flags: U16::new(flags),
        key_id: U32::new(env.key_id),
        seq: U64::new(env.seq),
        txid: U32::new(env.txid),
        // Bounded by MAX_SIGNALING_LEN above.
        body_len: U16::new(body_len as u16),
        reserved: U16::new(0),
    };
    out[..HEADER_LEN].copy_from_slice(raw.as_bytes());
    if let Some(k) = &env.ephemeral {
        out[HEADER_LEN..prefix_len].copy_from_slice(k);
    }
    let mut body = &mut out[prefix_len..prefix_len + msg.body_len()];
    msg.write_body(&mut body);
    Ok((prefix_len, prefix_len + msg.body_len()))
}

impl Message {
    /// Length of the whole datagram this message makes with `env`, sealed or not.
    pub fn datagram_len(&self, env: &Envelope, sealed: bool) -> usize {
        HEADER_LEN
            + env.ephemeral.map_or(0, |_| EPHEMERAL_LEN)
            + self.body_len()
            + if sealed { TAG_LEN } else { 0 }
    }

    /// Encodes and seals the message into `out`; returns the datagram's length.
    pub fn seal_into(
        &self,
        env: &Envelope,
        key: &AeadKey,
        out: &mut [u8],
    ) -> Result<usize, ApiMisuse> {
        let (prefix_len, end) = write_unsealed(self, env, true, out)?;
        let (aad, rest) = out.split_at_mut(prefix_len);
        let (body, tail) = rest.split_at_mut(end - prefix_len);
        let tag = key.seal(&nonce(env.role, env.seq), aad, body);
        tail[..TAG_LEN].copy_from_slice(&tag);
        Ok(end + TAG_LEN)
    }

    /// Encodes the message unsealed. Only ERROR may be sent this way.
    pub fn encode_plain_into(&self, env: &Envelope, out: &mut [u8]) -> Result<usize, ApiMisuse> {
        if !self.msg_type().may_be_plaintext() {
            return Err(ApiMisuse::WrongProtection {
                msg_type: self.msg_type().to_u8(),
                expected: "sealed",
            });
        }
        write_unsealed(self, env, false, out).map(|(_, end)| end)
    }

    /// Convenience: seals into a new vector.
    pub fn seal_to_vec(&self, env: &Envelope, key: &AeadKey) -> Result<Vec<u8>, ApiMisuse> {
        let mut v = vec![0u8; self.datagram_len(env, true)];
        let n = self.seal_into(env, key, &mut v)?;
        v.truncate(n);
        Ok(v)
    }
}

/// Opens a sealed signaling datagram in place and decodes it. The caller chose `key` from the
/// header (see [`SignalingPacket::parse`]) and checks the sequence number against its replay
/// window after this succeeds.
pub fn open_signaling(buf: &mut [u8], key: &AeadKey) -> Result<(Header, Message), WireError> {
    let (header, prefix_len) = {
        let p = SignalingPacket::parse(buf)?;
        (*p.header(), p.prefix.len())
    };
    if !header.sealed {
        return Err(WireError::WrongProtection {
            msg_type: header.msg_type.to_u8(),
        });
    }
    let len = buf.len();
    let (aad, rest) = buf.split_at_mut(prefix_len);
    let (body, tag) = rest.split_at_mut(len - prefix_len - TAG_LEN);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag);
    key.open(
        &nonce(header.envelope.role, header.envelope.seq),
        aad,
        body,
        &t,
    )?;
    let msg = Message::decode_body(header.msg_type, body)?;
    Ok((header, msg))
}

/// Framing for the NS push channel over TCP: each signaling datagram is preceded by its length as
/// a 16-bit big-endian integer.
pub mod stream {
    use super::MAX_SIGNALING_LEN;
    use crate::error::{ApiMisuse, WireError};

    /// Bytes of the length prefix.
    pub const FRAME_PREFIX_LEN: usize = 2;

    /// The prefix for a datagram of `len` bytes.
    pub fn frame_prefix(len: usize) -> Result<[u8; FRAME_PREFIX_LEN], ApiMisuse> {
        if len == 0 || len > MAX_SIGNALING_LEN {
            return Err(ApiMisuse::TooLong {
                field: "frame",
                len,
                max: MAX_SIGNALING_LEN,
            });
        }
        Ok((len as u16).to_be_bytes())
    }

    /// Finds the first complete frame in `buf`: `Ok(Some((start, end)))` locates its datagram,
    /// `Ok(None)` asks for more bytes, and an error means the stream is corrupt and must close.
    pub fn next_frame(buf: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
        if buf.len() < FRAME_PREFIX_LEN {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
        if len == 0 || len > MAX_SIGNALING_LEN {
            return Err(WireError::LengthMismatch {
                declared: len,
                actual: buf.len() - FRAME_PREFIX_LEN,
            });
        }
        if buf.len() < FRAME_PREFIX_LEN + len {
            return Ok(None);
        }
        Ok(Some((FRAME_PREFIX_LEN, FRAME_PREFIX_LEN + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SecretKey;
    use crate::message::{Ack, Error as ErrorMsg, ErrorCode};
    use crate::Extensions;

    fn key() -> AeadKey {
        AeadKey::new(&SecretKey::from_bytes([7; 32]))
    }

    fn env() -> Envelope {
        Envelope {
            role: Role::B,
            key_id: 9,
            seq: 3,
            txid: 4,
            ephemeral: None,
        }
    }

    fn ack() -> Message {
        Ack {
            acked_type: 0x30,
            extensions: Extensions::none(),
        }
        .into()
    }

    #[test]
    fn each_header_defect_has_its_own_error() {
        let good = ack().seal_to_vec(&env(), &key()).unwrap();
        assert!(SignalingPacket::parse(&good).is_ok());
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            SignalingPacket::parse(&b).unwrap_err()
        };
        assert_eq!(with(0, 0x7f), WireError::UnknownType(0x7f));
        assert_eq!(with(1, 2), WireError::UnsupportedVersion(2));
        let mut future = good.clone();
        future[0] = 0x7f;
        future[1] = 2;
        assert_eq!(
            SignalingPacket::parse(&future).unwrap_err(),
            WireError::UnsupportedVersion(2),
            "an unknown type of an unknown version is reported as the version"
        );
        assert_eq!(with(2, 0x80), WireError::ReservedBits);
        assert_eq!(with(3, 0x0d), WireError::ReservedBits); // role 3
        assert_eq!(with(23, 1), WireError::ReservedBits);
        assert_eq!(with(3, 0x04), WireError::WrongProtection { msg_type: 0x60 }); // unsealed ACK
        assert_eq!(with(3, 0x03), WireError::WrongProtection { msg_type: 0x60 }); // ephemeral
        assert!(matches!(with(21, 0x20), WireError::LengthMismatch { .. }));
        let mut long = good.clone();
        long.resize(MAX_SIGNALING_LEN + 1, 0);
        assert!(matches!(
            SignalingPacket::parse(&long),
            Err(WireError::Oversized { .. })
        ));
    }

    #[test]
    fn only_error_may_travel_unsealed() {
        let mut out = [0u8; 64];
        assert!(matches!(
            ack().encode_plain_into(&env(), &mut out),
            Err(ApiMisuse::WrongProtection { .. })
        ));
        let err: Message = ErrorMsg {
            code: ErrorCode::UnknownKey,
            failed_type: 0x30,
            retry_after_ms: 0,
            extensions: Extensions::none(),
        }
        .into();
        let n = err.encode_plain_into(&env(), &mut out).unwrap();
        assert_eq!(
            n, 31,
            "an unsealed ERROR is 31 bytes (spec/07 anti-amplification)"
        );
        let p = SignalingPacket::parse(&out[..n]).unwrap();
        assert_eq!(p.decode_plain().unwrap(), err);
    }

    #[test]
    fn a_message_opened_with_another_role_in_the_nonce_fails() {
        // The role is both in the header (authenticated) and the nonce: changing it breaks the tag.
        let mut b = ack().seal_to_vec(&env(), &key()).unwrap();
        b[3] = (b[3] & !0x0c) | ((Role::A as u8) << 2);
        assert_eq!(
            open_signaling(&mut b, &key()).unwrap_err(),
            WireError::AuthenticationFailed
        );
    }

    #[test]
    fn a_short_buffer_is_api_misuse_not_a_panic() {
        let mut out = [0u8; 10];
        assert_eq!(
            ack().seal_into(&env(), &key(), &mut out),
            Err(ApiMisuse::BufferTooSmall {
                needed: 41,
                available: 10
            })
        );
    }

    #[test]
    fn frames_are_found_whole_or_asked_for() {
        assert_eq!(stream::next_frame(&[0]), Ok(None));
        assert_eq!(stream::next_frame(&[0, 3, 1, 2]), Ok(None));
        assert_eq!(stream::next_frame(&[0, 3, 1, 2, 3, 9]), Ok(Some((2, 5))));
        assert!(stream::next_frame(&[0, 0]).is_err());
        assert!(stream::next_frame(&[0xff, 0xff]).is_err());
        assert!(stream::frame_prefix(0).is_err());
        assert_eq!(stream::frame_prefix(300), Ok([1, 44]));
    }
}
