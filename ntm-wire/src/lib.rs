//! The NTMobile wire format: every signaling message, the data packet, and the cryptographic
//! envelopes that protect them, as specified in `spec/`.
//!
//! This crate does no I/O, reads no clock and draws no randomness: bytes come in, bytes go out,
//! and every secret or nonce source is an argument. Its contract (after smoltcp's `wire` module):
//!
//! * A checked view ([`SignalingPacket`], [`DataPacket`]) validates a datagram once; after that
//!   no accessor can panic.
//! * Decoding never panics on any input, and rejects every non-canonical form, so decoding then
//!   encoding reproduces the input bytes.
//! * Encoding into a buffer of the stated length ([`Message::datagram_len`]) cannot fail for a
//!   message built from validated fields; a short buffer is an [`ApiMisuse`], not a panic.
//! * Errors separate what the peer got wrong ([`WireError`]) from what the caller got wrong
//!   ([`ApiMisuse`]).
//! * The data path ([`seal_data`], [`open_data`]) works in place on the caller's buffer and never
//!   allocates.
//!
//! # Receiving a datagram
//!
//! ```
//! use ntm_wire::{classify, Datagram};
//! # fn handle(buf: &mut [u8]) -> Result<(), ntm_wire::WireError> {
//! match classify(buf)? {
//!     Datagram::Data(p) => {
//!         // Look up the tunnel by p.path_id(), check its replay window for p.counter(),
//!         // then ntm_wire::open_data(&key, buf) and accept the counter.
//!     }
//!     Datagram::Signaling(p) => {
//!         // Pick the key by (p.header().msg_type, p.header().envelope.key_id), then
//!         // ntm_wire::open_signaling(buf, &key).
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod codec;
pub mod crypto;
pub mod data;
pub mod error;
pub mod message;
pub mod replay;
pub mod signaling;

pub use codec::{
    Account, AddrList, Blob, Extension, Extensions, FieldValue, Fqdn, PublicKeyBytes, SecretKey,
    TransportAddr, WireField,
};
pub use crypto::{AeadKey, TunnelKeys};
pub use data::{open_data, seal_data, DataPacket, DATA_HEADER_LEN, DATA_OVERHEAD, DATA_TYPE};
pub use error::{ApiMisuse, Error, Malformed, Replay, WireError};
pub use message::*;
pub use replay::ReplayWindow;
pub use signaling::{
    open_signaling, Envelope, Header, Role, SignalingPacket, HEADER_LEN, MAX_SIGNALING_LEN, VERSION,
};

/// A received UDP datagram, sorted by its first byte.
#[derive(Debug, Clone, Copy)]
pub enum Datagram<'a> {
    /// A tunnel data packet (first byte 0x01).
    Data(DataPacket<'a>),
    /// A signaling message (first byte one of [`MessageType::ALL`]).
    Signaling(SignalingPacket<'a>),
}

/// Checks a received datagram's header and says which kind it is. Authenticates nothing.
pub fn classify(buf: &[u8]) -> Result<Datagram<'_>, WireError> {
    match buf.first() {
        None => Err(WireError::ShortHeader {
            len: 0,
            needed: HEADER_LEN,
        }),
        Some(&DATA_TYPE) => DataPacket::parse(buf).map(Datagram::Data),
        Some(_) => SignalingPacket::parse(buf).map(Datagram::Signaling),
    }
}
