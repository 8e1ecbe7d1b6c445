//! Typed errors. Two families that never mix:
//!
//! * [`WireError`]: the bytes that came in are not a valid NTMobile datagram (the peer sent garbage,
//!   a stale or forged packet, or a version we do not speak). Drop the datagram, count the reason.
//! * [`ApiMisuse`]: the caller asked for something impossible (a buffer too small, an over-long
//!   field). This is a bug in the caller, never something a peer can cause.

use core::fmt;

/// Why a field or datagram failed to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Malformed {
    /// The input ended before the field did.
    Truncated,
    /// Bytes remained after the last field and there is no extension area to hold them.
    TrailingBytes,
    /// A length prefix or count exceeds what the specification allows.
    TooLong,
    /// A length prefix is zero where the specification requires at least one byte.
    Empty,
    /// A name is not in canonical form (lowercase LDH labels of 1 to 63 bytes, total at most 253).
    InvalidName,
    /// An address family byte other than 4 or 6.
    InvalidAddressFamily,
    /// An enumerated field holds a value the specification does not define.
    InvalidEnum,
    /// A boolean or option tag is neither 0 nor 1.
    InvalidFlag,
    /// A reserved field or bit is not zero.
    ReservedNotZero,
    /// An extension's length runs past the end of the body.
    ExtensionOverrun,
    /// Extensions are not in strictly ascending order of type (duplicates included).
    ExtensionOrder,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Malformed::Truncated => "truncated",
            Malformed::TrailingBytes => "trailing bytes",
            Malformed::TooLong => "length exceeds the limit",
            Malformed::Empty => "empty where a value is required",
            Malformed::InvalidName => "not a canonical name",
            Malformed::InvalidAddressFamily => "invalid address family",
            Malformed::InvalidEnum => "undefined enumerated value",
            Malformed::InvalidFlag => "flag byte is neither 0 nor 1",
            Malformed::ReservedNotZero => "reserved field is not zero",
            Malformed::ExtensionOverrun => "extension runs past the body",
            Malformed::ExtensionOrder => "extensions out of order or duplicated",
        };
        f.write_str(s)
    }
}

/// A replay-window rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Replay {
    /// The counter is further behind the newest accepted one than the window reaches.
    TooOld,
    /// The counter was already accepted.
    Duplicate,
    /// The counter is at or beyond the hard limit after which a key must not be used.
    Exhausted,
}

/// Input that is not a valid NTMobile datagram. Every decoder returns this; none panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The datagram is shorter than its fixed header.
    #[error("datagram truncated: {len} bytes, header needs {needed}")]
    ShortHeader { len: usize, needed: usize },
    /// The first byte names no datagram or message type.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// The header's version is not one this implementation speaks.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// A reserved header bit or field is set.
    #[error("reserved header bits set")]
    ReservedBits,
    /// The header's length field disagrees with the datagram's size.
    #[error("length field says {declared} bytes, datagram carries {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    /// The datagram is longer than any valid signaling datagram.
    #[error("datagram of {len} bytes exceeds the {max}-byte limit")]
    Oversized { len: usize, max: usize },
    /// The flags do not fit the message type (a message that must be sealed arrived in the clear).
    #[error("message 0x{msg_type:02x} arrived with the wrong protection")]
    WrongProtection { msg_type: u8 },
    /// A field failed to decode.
    #[error("malformed {message}.{field}: {reason}")]
    Malformed {
        message: &'static str,
        field: &'static str,
        reason: Malformed,
    },
    /// A critical extension this implementation does not understand.
    #[error("unknown critical extension 0x{0:04x}")]
    UnknownCriticalExtension(u16),
    /// The AEAD tag did not verify: wrong key, forged or corrupted.
    #[error("authentication failed")]
    AuthenticationFailed,
    /// The counter was rejected by the replay window.
    #[error("replayed or stale counter: {0:?}")]
    Replay(Replay),
    /// A Diffie-Hellman result was all zeros (the peer sent a low-order public key).
    #[error("non-contributory key exchange")]
    NonContributoryKey,
}

/// A request the caller should not have made. Never caused by network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum ApiMisuse {
    /// The output buffer cannot hold the encoding.
    #[error("buffer too small: need {needed} bytes, have {available}")]
    BufferTooSmall { needed: usize, available: usize },
    /// A value exceeds its field's limit.
    #[error("{field} is too long: {len} > {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A value is outside its field's domain.
    #[error("invalid {field}: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
    /// The message type demands a key (or forbids one) and the call did not match.
    #[error("message 0x{msg_type:02x} must be {expected}")]
    WrongProtection {
        msg_type: u8,
        expected: &'static str,
    },
}

/// Either family, for helpers that both parse peer input and take caller arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Api(#[from] ApiMisuse),
}
