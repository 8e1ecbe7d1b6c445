//! Field encodings shared by every message body (spec/02-wire-format.md, "Field encodings").
//!
//! Every field type implements [`WireField`]: a length that is exact, an encoder that writes exactly
//! that many bytes into a [`BufMut`] already checked to be large enough, and a nom decoder that
//! never panics and rejects every non-canonical form, so that decode followed by encode reproduces
//! the input bytes.

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BufMut;
use nom::error::{ErrorKind, ParseError};
use nom::IResult;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{ApiMisuse, Malformed};

/// The error a field decoder returns: what was wrong, without the field's name (the message
/// decoder adds the name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldError(pub Malformed);

impl<I> ParseError<I> for FieldError {
    fn from_error_kind(_input: I, _kind: ErrorKind) -> Self {
        // With `complete` parsers the only way a primitive fails is by running out of input.
        FieldError(Malformed::Truncated)
    }
    fn append(_input: I, _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

/// Result of a field decoder: the rest of the input and the value.
pub type PResult<'a, T> = IResult<&'a [u8], T, FieldError>;

pub(crate) fn fail<T>(reason: Malformed) -> Result<T, nom::Err<FieldError>> {
    Err(nom::Err::Failure(FieldError(reason)))
}

pub(crate) fn take_bytes(input: &[u8], n: usize) -> PResult<'_, &[u8]> {
    nom::bytes::complete::take(n)(input)
}

/// A decoded field in a language-neutral form, for golden vectors and diagnostics: integers,
/// booleans, bytes (hex), text (names, addresses, enum variants), lists, absence and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    Int(u64),
    Bool(bool),
    Hex(Vec<u8>),
    Text(String),
    List(Vec<FieldValue>),
    Absent,
    Record(Vec<(&'static str, FieldValue)>),
}

/// A value with one exact wire encoding.
pub trait WireField: Sized {
    /// The exact number of bytes [`WireField::encode`] writes.
    fn encoded_len(&self) -> usize;
    /// Writes the encoding. The caller guarantees `buf.remaining_mut() >= self.encoded_len()`.
    fn encode<B: BufMut>(&self, buf: &mut B);
    /// Reads one value from the front of `input`.
    fn decode(input: &[u8]) -> PResult<'_, Self>;
    /// The value in language-neutral form (secret keys included: vectors need them).
    fn describe(&self) -> FieldValue;
}

macro_rules! int_field {
    ($t:ty, $put:ident, $get:path) => {
        impl WireField for $t {
            fn encoded_len(&self) -> usize {
                core::mem::size_of::<$t>()
            }
            fn encode<B: BufMut>(&self, buf: &mut B) {
                buf.$put(*self);
            }
            fn decode(input: &[u8]) -> PResult<'_, Self> {
                $get(input)
            }
            fn describe(&self) -> FieldValue {
                FieldValue::Int(u64::from(*self))
            }
        }
    };
}
int_field!(u8, put_u8, nom::number::complete::be_u8);
int_field!(u16, put_u16, nom::number::complete::be_u16);
int_field!(u32, put_u32, nom::number::complete::be_u32);
int_field!(u64, put_u64, nom::number::complete::be_u64);

impl WireField for bool {
    fn encoded_len(&self) -> usize {
        1
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u8(u8::from(*self));
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, b) = u8::decode(input)?;
        match b {
            0 => Ok((rest, false)),
            1 => Ok((rest, true)),
            _ => fail(Malformed::InvalidFlag),
        }
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Bool(*self)
    }
}

impl<const N: usize> WireField for [u8; N] {
    fn encoded_len(&self) -> usize {
        N
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_slice(self);
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, b) = take_bytes(input, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok((rest, out))
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Hex(self.to_vec())
    }
}

impl WireField for Ipv4Addr {
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_slice(&self.octets());
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, o) = <[u8; 4]>::decode(input)?;
        Ok((rest, Ipv4Addr::from(o)))
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Text(self.to_string())
    }
}

impl WireField for Ipv6Addr {
    fn encoded_len(&self) -> usize {
        16
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_slice(&self.octets());
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, o) = <[u8; 16]>::decode(input)?;
        Ok((rest, Ipv6Addr::from(o)))
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Text(self.to_string())
    }
}

/// `Option<T>`: a presence byte (0 absent, 1 present) then `T` when present.
impl<T: WireField> WireField for Option<T> {
    fn encoded_len(&self) -> usize {
        1 + self.as_ref().map_or(0, WireField::encoded_len)
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        match self {
            None => buf.put_u8(0),
            Some(v) => {
                buf.put_u8(1);
                v.encode(buf);
            }
        }
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, present) = bool::decode(input)?;
        if present {
            let (rest, v) = T::decode(rest)?;
            Ok((rest, Some(v)))
        } else {
            Ok((rest, None))
        }
    }
    fn describe(&self) -> FieldValue {
        self.as_ref()
            .map_or(FieldValue::Absent, WireField::describe)
    }
}

/// A transport address (real IP address and UDP or TCP port): family byte 4 or 6, port, address.
///
/// IPv6 flow labels and scope identifiers are not carried: they have no meaning to a remote host.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransportAddr(SocketAddr);

impl TransportAddr {
    /// The address with any IPv6 flow label and scope identifier dropped.
    pub fn new(addr: SocketAddr) -> Self {
        TransportAddr(SocketAddr::new(addr.ip(), addr.port()))
    }
    pub fn socket_addr(&self) -> SocketAddr {
        self.0
    }
    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }
    pub fn port(&self) -> u16 {
        self.0.port()
    }
    pub fn is_ipv4(&self) -> bool {
        self.0.is_ipv4()
    }
}

impl From<SocketAddr> for TransportAddr {
    fn from(a: SocketAddr) -> Self {
        TransportAddr::new(a)
    }
}

impl fmt::Debug for TransportAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for TransportAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl WireField for TransportAddr {
    fn encoded_len(&self) -> usize {
        if self.0.is_ipv4() {
            1 + 2 + 4
        } else {
            1 + 2 + 16
        }
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        match self.0.ip() {
            IpAddr::V4(a) => {
                buf.put_u8(4);
                buf.put_u16(self.0.port());
                a.encode(buf);
            }
            IpAddr::V6(a) => {
                buf.put_u8(6);
                buf.put_u16(self.0.port());
                a.encode(buf);
            }
        }
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, family) = u8::decode(input)?;
        let (rest, port) = u16::decode(rest)?;
        match family {
            4 => {
                let (rest, a) = Ipv4Addr::decode(rest)?;
                Ok((rest, TransportAddr(SocketAddr::new(a.into(), port))))
            }
            6 => {
                let (rest, a) = Ipv6Addr::decode(rest)?;
                Ok((rest, TransportAddr(SocketAddr::new(a.into(), port))))
            }
            _ => fail(Malformed::InvalidAddressFamily),
        }
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Text(self.0.to_string())
    }
}

/// A list of transport addresses: a count byte (at most [`AddrList::MAX`]) then each address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrList(Vec<TransportAddr>);

impl AddrList {
    /// The most addresses one list may carry.
    pub const MAX: usize = 8;

    pub fn new(addrs: Vec<TransportAddr>) -> Result<Self, ApiMisuse> {
        if addrs.len() > Self::MAX {
            return Err(ApiMisuse::TooLong {
                field: "address list",
                len: addrs.len(),
                max: Self::MAX,
            });
        }
        Ok(AddrList(addrs))
    }
    pub fn empty() -> Self {
        AddrList(Vec::new())
    }
    pub fn as_slice(&self) -> &[TransportAddr] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl WireField for AddrList {
    fn encoded_len(&self) -> usize {
        1 + self.0.iter().map(WireField::encoded_len).sum::<usize>()
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        // `new` bounds the length to MAX, which fits in a byte.
        buf.put_u8(self.0.len() as u8);
        for a in &self.0 {
            a.encode(buf);
        }
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (mut rest, n) = u8::decode(input)?;
        if usize::from(n) > Self::MAX {
            return fail(Malformed::TooLong);
        }
        let mut v = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let (r, a) = TransportAddr::decode(rest)?;
            v.push(a);
            rest = r;
        }
        Ok((rest, AddrList(v)))
    }
    fn describe(&self) -> FieldValue {
        FieldValue::List(self.0.iter().map(WireField::describe).collect())
    }
}

/// A fully qualified domain name in canonical form: lowercase LDH labels of 1 to 63 bytes joined
/// by dots, no trailing dot, at most 253 bytes. On the wire: a length byte then the bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fqdn(String);

impl Fqdn {
    pub const MAX_LEN: usize = 253;

    /// Validates and stores `name`. Uppercase is rejected, not folded: callers that accept user
    /// input lowercase it first, so that one name has one encoding.
    pub fn new(name: &str) -> Result<Self, ApiMisuse> {
        if is_canonical_fqdn(name.as_bytes()) {
            Ok(Fqdn(name.to_owned()))
        } else {
            Err(ApiMisuse::Invalid {
                field: "fqdn",
                why: "not lowercase LDH labels of 1-63 bytes, total 1-253 bytes",
            })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether `self` equals `zone` or lies below it.
    pub fn is_within(&self, zone: &Fqdn) -> bool {
        self.0 == zone.0
            || (self.0.len() > zone.0.len()
                && self.0.ends_with(zone.0.as_str())
                && self.0.as_bytes()[self.0.len() - zone.0.len() - 1] == b'.')
    }
}

fn is_canonical_fqdn(b: &[u8]) -> bool {
    if b.is_empty() || b.len() > Fqdn::MAX_LEN {
        return false;
    }
    b.split(|&c| c == b'.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
            && label
                .iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    })
}

impl fmt::Debug for Fqdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Fqdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl WireField for Fqdn {
    fn encoded_len(&self) -> usize {
        1 + self.0.len()
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        // `new` bounds the length to 253.
        buf.put_u8(self.0.len() as u8);
        buf.put_slice(self.0.as_bytes());
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, n) = u8::decode(input)?;
        let (rest, b) = take_bytes(rest, usize::from(n))?;
        if !is_canonical_fqdn(b) {
            return fail(Malformed::InvalidName);
        }
        // Canonical names are ASCII, hence UTF-8.
        match core::str::from_utf8(b) {
            Ok(s) => Ok((rest, Fqdn(s.to_owned()))),
            Err(_) => fail(Malformed::InvalidName),
        }
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Text(self.0.clone())
    }
}

/// An account name at the AS: 1 to 64 printable ASCII bytes (0x21 to 0x7e).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Account(String);

impl Account {
    pub const MAX_LEN: usize = 64;

    pub fn new(name: &str) -> Result<Self, ApiMisuse> {
        if is_account(name.as_bytes()) {
            Ok(Account(name.to_owned()))
        } else {
            Err(ApiMisuse::Invalid {
                field: "account",
                why: "not 1-64 printable ASCII bytes",
            })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_account(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= Account::MAX_LEN && b.iter().all(|&c| (0x21..=0x7e).contains(&c))
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl WireField for Account {
    fn encoded_len(&self) -> usize {
        1 + self.0.len()
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u8(self.0.len() as u8);
        buf.put_slice(self.0.as_bytes());
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, n) = u8::decode(input)?;
        let (rest, b) = take_bytes(rest, usize::from(n))?;
        if !is_account(b) {
            return fail(Malformed::InvalidName);
        }
        match core::str::from_utf8(b) {
            Ok(s) => Ok((rest, Account(s.to_owned()))),
            Err(_) => fail(Malformed::InvalidName),
        }
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Text(self.0.clone())
    }
}

/// Opaque bytes with a 16-bit length prefix, at most [`Blob::MAX_LEN`] bytes: small enough that
/// the largest message carrying one (CACHE_DATA with a 253-byte name) stays within the 1232-byte
/// signaling limit.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Blob(Vec<u8>);

impl Blob {
    pub const MAX_LEN: usize = 900;

    pub fn new(bytes: Vec<u8>) -> Result<Self, ApiMisuse> {
        if bytes.len() > Self::MAX_LEN {
            return Err(ApiMisuse::TooLong {
                field: "blob",
                len: bytes.len(),
                max: Self::MAX_LEN,
            });
        }
        Ok(Blob(bytes))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl WireField for Blob {
    fn encoded_len(&self) -> usize {
        2 + self.0.len()
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u16(self.0.len() as u16);
        buf.put_slice(&self.0);
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, n) = u16::decode(input)?;
        if usize::from(n) > Self::MAX_LEN {
            return fail(Malformed::TooLong);
        }
        let (rest, b) = take_bytes(rest, usize::from(n))?;
        Ok((rest, Blob(b.to_vec())))
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Hex(self.0.clone())
    }
}

/// A 256-bit secret key. Zeroized on drop, compared in constant time, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub const LEN: usize = 32;

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }
    /// The key bytes. Callers must not copy them anywhere that is not zeroized.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for SecretKey {}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl WireField for SecretKey {
    fn encoded_len(&self) -> usize {
        32
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_slice(&self.0);
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, b) = take_bytes(input, 32)?;
        let mut k = [0u8; 32];
        k.copy_from_slice(b);
        Ok((rest, SecretKey(k)))
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Hex(self.0.to_vec())
    }
}

/// An X25519 public key as carried on the wire (validated when used, not when parsed).
pub type PublicKeyBytes = [u8; 32];

/// One extension: a 16-bit type and opaque value. Types with the high bit set are critical.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Extension {
    pub ext_type: u16,
    pub value: Vec<u8>,
}

impl Extension {
    /// The bit that marks an extension a receiver must understand.
    pub const CRITICAL: u16 = 0x8000;
    /// PADDING (non-critical, value ignored): makes a request at least as long as its answer, so
    /// an unauthenticated request can never be amplified (CONFIG_REQUEST).
    pub const PADDING: u16 = 0x0001;
}

/// The extension area that ends every message body: zero or more `(type u16, length u16, value)`
/// entries in strictly ascending type order, up to the end of the body. Version 1 defines only
/// [`Extension::PADDING`]: a receiver keeps unknown non-critical ones (so re-encoding reproduces
/// the bytes) and rejects unknown critical ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Extensions(Vec<Extension>);

/// What decoding an extension area can report beyond a malformed field.
#[derive(Debug)]
pub(crate) enum ExtError {
    Malformed(Malformed),
    UnknownCritical(u16),
}

impl Extensions {
    pub const MAX_COUNT: usize = 16;

    pub fn none() -> Self {
        Extensions(Vec::new())
    }

    /// Builds an extension area; types must be non-critical, ascending and unique.
    pub fn new(mut exts: Vec<Extension>) -> Result<Self, ApiMisuse> {
        exts.sort_by_key(|e| e.ext_type);
        if exts.len() > Self::MAX_COUNT {
            return Err(ApiMisuse::TooLong {
                field: "extensions",
                len: exts.len(),
                max: Self::MAX_COUNT,
            });
        }
        for w in exts.windows(2) {
            if w[0].ext_type == w[1].ext_type {
                return Err(ApiMisuse::Invalid {
                    field: "extensions",
                    why: "duplicate extension type",
                });
            }
        }
        for e in &exts {
            if e.ext_type & Extension::CRITICAL != 0 {
                return Err(ApiMisuse::Invalid {
                    field: "extensions",
                    why: "version 1 defines no critical extension",
                });
            }
            if e.value.len() > Blob::MAX_LEN {
                return Err(ApiMisuse::TooLong {
                    field: "extension value",
                    len: e.value.len(),
                    max: Blob::MAX_LEN,
                });
            }
        }
        Ok(Extensions(exts))
    }

    pub fn as_slice(&self) -> &[Extension] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn encoded_len(&self) -> usize {
        self.0.iter().map(|e| 4 + e.value.len()).sum()
    }

    /// The extensions in language-neutral form: a list of `[type, value]` records.
    pub fn describe(&self) -> FieldValue {
        FieldValue::List(
            self.0
                .iter()
                .map(|e| {
                    FieldValue::Record(vec![
                        ("type", FieldValue::Int(u64::from(e.ext_type))),
                        ("value", FieldValue::Hex(e.value.clone())),
                    ])
                })
                .collect(),
        )
    }

    pub(crate) fn encode<B: BufMut>(&self, buf: &mut B) {
        for e in &self.0 {
            buf.put_u16(e.ext_type);
            buf.put_u16(e.value.len() as u16);
            buf.put_slice(&e.value);
        }
    }

    /// Decodes the whole remainder of a body as the extension area. The area is checked as a
    /// whole first, so a malformed area is reported as such even if it holds a critical entry.
    pub(crate) fn decode_all(mut input: &[u8]) -> Result<Self, ExtError> {
        let mut v: Vec<Extension> = Vec::new();
        let mut critical = None;
        while !input.is_empty() {
            if input.len() < 4 {
                return Err(ExtError::Malformed(Malformed::Truncated));
            }
            let t = u16::from_be_bytes([input[0], input[1]]);
            let n = usize::from(u16::from_be_bytes([input[2], input[3]]));
            let rest = &input[4..];
            if rest.len() < n {
                return Err(ExtError::Malformed(Malformed::ExtensionOverrun));
            }
            if n > Blob::MAX_LEN {
                return Err(ExtError::Malformed(Malformed::TooLong));
            }
            if v.last().is_some_and(|last| last.ext_type >= t) {
                return Err(ExtError::Malformed(Malformed::ExtensionOrder));
            }
            if v.len() == Self::MAX_COUNT {
                return Err(ExtError::Malformed(Malformed::TooLong));
            }
            if t & Extension::CRITICAL != 0 && critical.is_none() {
                critical = Some(t);
            }
            v.push(Extension {
                ext_type: t,
                value: rest[..n].to_vec(),
            });
            input = &rest[n..];
        }
        match critical {
            Some(t) => Err(ExtError::UnknownCritical(t)),
            None => Ok(Extensions(v)),
        }
    }
}

#[cfg(feature = "arbitrary")]
mod arb {
    use super::*;
    use arbitrary::{Arbitrary, Result, Unstructured};

    fn label(u: &mut Unstructured<'_>) -> Result<String> {
        const CH: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let n = u.int_in_range(1..=12)?;
        let mut s = String::with_capacity(n);
        for i in 0..n {
            let c = *u.choose(CH)?;
            // A hyphen only inside a label.
            if i > 0 && i + 1 < n && u.ratio(1, 8)? {
                s.push('-');
            } else {
                s.push(char::from(c));
            }
        }
        Ok(s)
    }

    impl<'a> Arbitrary<'a> for Fqdn {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
            let labels = u.int_in_range(1..=5)?;
            let mut s = label(u)?;
            for _ in 1..labels {
                s.push('.');
                s.push_str(&label(u)?);
            }
            Ok(Fqdn(s))
        }
    }

    impl<'a> Arbitrary<'a> for Account {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
            let n = u.int_in_range(1..=Account::MAX_LEN)?;
            let mut s = String::with_capacity(n);
            for _ in 0..n {
                s.push(char::from(u.int_in_range(0x21u8..=0x7e)?));
            }
            Ok(Account(s))
        }
    }

    impl<'a> Arbitrary<'a> for TransportAddr {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
            let port = u16::arbitrary(u)?;
            let ip: IpAddr = if bool::arbitrary(u)? {
                Ipv4Addr::from(<[u8; 4]>::arbitrary(u)?).into()
            } else {
                Ipv6Addr::from(<[u8; 16]>::arbitrary(u)?).into()
            };
            Ok(TransportAddr(SocketAddr::new(ip, port)))
        }
    }

    impl<'a> Arbitrary<'a> for AddrList {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
            let n = u.int_in_range(0..=AddrList::MAX)?;
            (0..n)
                .map(|_| TransportAddr::arbitrary(u))
                .collect::<Result<Vec<_>>>()
                .map(AddrList)
        }
    }

    impl<'a> Arbitrary<'a> for Blob {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
            let n = u.int_in_range(0..=64)?;
            Ok(Blob(u.bytes(n)?.to_vec()))
        }
    }

    impl<'a> Arbitrary<'a> for SecretKey {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
            Ok(SecretKey(<[u8; 32]>::arbitrary(u)?))
        }
    }

    impl<'a> Arbitrary<'a> for Extensions {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
            let n = u.int_in_range(0..=3)?;
            let mut v = Vec::new();
            let mut t: u16 = 0;
            for _ in 0..n {
                t = t.saturating_add(u.int_in_range(1..=0x100)?);
                if t & Extension::CRITICAL != 0 {
                    break;
                }
                let len = u.int_in_range(0..=16)?;
                v.push(Extension {
                    ext_type: t,
                    value: u.bytes(len)?.to_vec(),
                });
            }
            Ok(Extensions(v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_are_accepted_and_others_rejected() {
        for ok in ["a", "mn.dc1.example", "x-1.y", "0.a"] {
            assert!(Fqdn::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A.b",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(Fqdn::new(bad).is_err(), "{bad}");
        }
        let long = ["abcdefghi"; 26].join("."); // 26*9 + 25 = 259 bytes
        assert!(Fqdn::new(&long).is_err());
    }

    #[test]
    fn a_name_is_within_its_zone_but_not_a_lookalike() {
        let zone = Fqdn::new("dc1.example").unwrap();
        assert!(Fqdn::new("mn.dc1.example").unwrap().is_within(&zone));
        assert!(Fqdn::new("dc1.example").unwrap().is_within(&zone));
        assert!(!Fqdn::new("xdc1.example").unwrap().is_within(&zone));
        assert!(!Fqdn::new("example").unwrap().is_within(&zone));
    }

    #[test]
    fn extensions_out_of_order_or_critical_are_rejected() {
        assert!(matches!(
            Extensions::decode_all(&[0, 2, 0, 0, 0, 1, 0, 0]),
            Err(ExtError::Malformed(Malformed::ExtensionOrder))
        ));
        assert!(matches!(
            Extensions::decode_all(&[0x80, 1, 0, 0]),
            Err(ExtError::UnknownCritical(0x8001))
        ));
        assert!(matches!(
            Extensions::decode_all(&[0, 1, 0, 5, 1]),
            Err(ExtError::Malformed(Malformed::ExtensionOverrun))
        ));
        // A critical entry followed by an overrun is malformed, not "unknown critical".
        assert!(matches!(
            Extensions::decode_all(&[0x80, 1, 0, 0, 0x80, 2, 0, 9]),
            Err(ExtError::Malformed(Malformed::ExtensionOverrun))
        ));
        let e = Extensions::decode_all(&[0, 1, 0, 1, 9, 0, 7, 0, 0]).unwrap();
        assert_eq!(e.as_slice().len(), 2);
        let mut out = Vec::new();
        e.encode(&mut out);
        assert_eq!(out, [0, 1, 0, 1, 9, 0, 7, 0, 0]);
    }

    #[test]
    fn a_transport_address_with_an_unknown_family_is_rejected() {
        assert_eq!(
            TransportAddr::decode(&[5, 0, 80, 1, 2, 3, 4]).unwrap_err(),
            nom::Err::Failure(FieldError(Malformed::InvalidAddressFamily))
        );
        assert_eq!(
            TransportAddr::decode(&[4, 0, 80, 1, 2, 3]).unwrap_err(),
            nom::Err::Error(FieldError(Malformed::Truncated))
        );
    }
}
