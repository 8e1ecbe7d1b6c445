//! The signaling messages (spec/03-messages.md). One macro invocation below is the catalogue: each
//! entry gives the type code, the name the spec uses, whether the header carries an ephemeral
//! public key, and the body's fields in wire order. Every body ends with the extension area.

use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::BufMut;

use crate::codec::{
    fail, Account, AddrList, Blob, ExtError, Extensions, FieldError, FieldValue, Fqdn, PResult,
    PublicKeyBytes, SecretKey, TransportAddr, WireField,
};
use crate::error::{ApiMisuse, Malformed, WireError};

/// Whether a message type's header carries an X25519 ephemeral public key after the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EphemeralRule {
    /// Never.
    Forbidden,
    /// Always (the key derivation needs it before the body can be opened).
    Required,
    /// Only in one use of the type (KEY_DISTRIBUTION between DCs that share no key yet).
    Optional,
}

fn field_err(message: &'static str, field: &'static str, e: nom::Err<FieldError>) -> WireError {
    let reason = match e {
        nom::Err::Error(FieldError(r)) | nom::Err::Failure(FieldError(r)) => r,
        nom::Err::Incomplete(_) => Malformed::Truncated,
    };
    WireError::Malformed {
        message,
        field,
        reason,
    }
}

fn ext_err(message: &'static str, e: ExtError) -> WireError {
    match e {
        ExtError::Malformed(reason) => WireError::Malformed {
            message,
            field: "extensions",
            reason,
        },
        ExtError::UnknownCritical(t) => WireError::UnknownCriticalExtension(t),
    }
}

macro_rules! wire_enum {
    (
        $(#[doc = $doc:literal])*
        $name:ident : $repr:ty {
            $( $(#[doc = $vdoc:literal])* $variant:ident = $value:literal ),* $(,)?
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[repr($repr)]
        pub enum $name {
            $( $(#[doc = $vdoc])* $variant = $value, )*
        }

        impl $name {
            /// Every defined value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn from_wire(v: $repr) -> Option<Self> {
                match v {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// The value as it is written on the wire.
            pub fn to_wire(self) -> $repr {
                self as $repr
            }
        }

        impl WireField for $name {
            fn encoded_len(&self) -> usize {
                core::mem::size_of::<$repr>()
            }
            fn encode<B: BufMut>(&self, buf: &mut B) {
                (*self as $repr).encode(buf);
            }
            fn decode(input: &[u8]) -> PResult<'_, Self> {
                let (rest, v) = <$repr>::decode(input)?;
                match $name::from_wire(v) {
                    Some(e) => Ok((rest, e)),
                    None => fail(Malformed::InvalidEnum),
                }
            }
            fn describe(&self) -> FieldValue {
                FieldValue::Text(format!("{:?}", self))
            }
        }
    };
}

wire_enum! {
    /// What a distributed key is for (KEY_DISTRIBUTION).
    KeyRole: u8 {
        /// Between a node and its DC (AS → DC at login).
        NodeDc = 1,
        /// Between two DCs (DC → DC).
        DcDc = 2,
        /// Between a DC and one of its relay servers.
        DcRs = 3,
        /// Between a DC and its notification server.
        DcNs = 4,
        /// Between a DC and its cache server.
        DcCs = 5,
        /// Between a node and its cache server (DC → CS).
        NodeCs = 6,
    }
}

wire_enum! {
    /// A NAT's mapping behaviour as RFC 4787 names it, as far as the node or DC could tell.
    NatBehaviour: u8 {
        /// Not determined.
        Unknown = 0,
        /// No NAT: the observed address is one of the node's own.
        NoNat = 1,
        /// Endpoint-independent mapping.
        EndpointIndependent = 2,
        /// Address-dependent mapping.
        AddressDependent = 3,
        /// Address-and-port-dependent mapping ("symmetric").
        AddressAndPortDependent = 4,
    }
}

wire_enum! {
    /// The kind of path a route direction sets up.
    RouteKind: u8 {
        /// Node to node, over real (public or private) addresses.
        Direct = 1,
        /// Through a relay server.
        Relay = 2,
        /// The peer is registered but unreachable now: no tunnel; the node may seal data to
        /// `peer_public_key` and leave it at its cache server. Path ID 0, no addresses.
        Offline = 3,
    }
}

wire_enum! {
    /// Who sends the first TUNNEL_REQUEST.
    TunnelRole: u8 {
        /// This node sends the first TUNNEL_REQUEST.
        Initiator = 1,
        /// This node waits for the peer's TUNNEL_REQUEST.
        Responder = 2,
    }
}

wire_enum! {
    /// Why the DC chose the route it chose (shown to users by `ntm status`).
    RouteReason: u8 {
        /// A direct path exists: at least one side is reachable from the other.
        Reachable = 0,
        /// Both nodes behind the same NAT: private addresses are used.
        SameNat = 1,
        /// One node has only IPv4, the other only IPv6.
        FamilyMismatch = 2,
        /// Both nodes behind NATs; direct is probed after the relay is up.
        BothBehindNat = 3,
        /// Both NATs map address-and-port-dependently: no direct path is possible.
        BothSymmetric = 4,
        /// A direct attempt already failed for this pair.
        DirectFailed = 5,
    }
}

wire_enum! {
    /// Why a notification was pushed.
    NotifyReason: u8 {
        /// A DC directs the node to build a tunnel (payload: the ROUTE_DIRECTION datagram).
        IncomingTunnel = 1,
        /// Cached data waits at the CS.
        CachedData = 2,
        /// Any other sealed signaling datagram for the node.
        Signaling = 3,
    }
}

wire_enum! {
    /// Why a node sends a PATH_UPDATE.
    PathUpdateReason: u8 {
        /// Its real address changed.
        Handover = 1,
        /// A direct path was found while on the relay (route optimization).
        RouteOptimization = 2,
    }
}

wire_enum! {
    /// Why a tunnel is closed.
    CloseReason: u8 {
        /// The application closed it.
        Normal = 0,
        /// No traffic for the idle timeout.
        Idle = 1,
        /// The node logs out or shuts down.
        Shutdown = 2,
        /// Keys are exhausted or a protocol error occurred.
        Error = 3,
    }
}

wire_enum! {
    /// Error codes (spec/07-timers-and-errors.md, "Error codes").
    ErrorCode: u16 {
        /// The request could not be decoded.
        Malformed = 1,
        /// The header's version is not supported; the ERROR's header carries ours.
        VersionNotSupported = 2,
        /// The key ID names no key the receiver holds.
        UnknownKey = 3,
        /// Login failed: unknown account or wrong password (indistinguishable by design).
        AuthFailed = 4,
        /// The name does not exist, or the caller may not learn whether it exists.
        NotFound = 5,
        /// Too many requests; retry after `retry_after_ms`.
        RateLimited = 6,
        /// No route can be built between the two nodes.
        NoRoute = 7,
        /// No relay server is available.
        RelayUnavailable = 8,
        /// The proposed Path ID collides with a tunnel the node already has.
        PathIdInUse = 9,
        /// The relay has not yet seen the peer's RELAY_BIND.
        PeerNotBound = 10,
        /// A cache quota is full.
        QuotaExceeded = 11,
        /// The key, session or path has expired.
        Expired = 12,
        /// The server is temporarily unable to serve.
        Unavailable = 13,
        /// A critical extension is not understood.
        UnknownCriticalExtension = 14,
        /// The message is valid but not expected in the receiver's current state.
        WrongState = 15,
    }
}

/// What one DC tells another about a registered node (NTM_INFO_REQUEST / RESPONSE).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NodeInfo {
    pub fqdn: Fqdn,
    pub virtual_v4: Ipv4Addr,
    pub virtual_v6: Ipv6Addr,
    /// The node's address as its DC sees it (the NAT's outside address and port), if registered.
    pub observed_addr: Option<TransportAddr>,
    /// The addresses the node reported as its own.
    pub local_addrs: AddrList,
    pub nat: NatBehaviour,
    /// The node's static X25519 public key (for sealed cache blobs).
    pub public_key: PublicKeyBytes,
    /// Whether the node keeps a notification channel open (reachable without UDP keep-alives).
    pub notification: bool,
}

impl WireField for NodeInfo {
    fn encoded_len(&self) -> usize {
        self.fqdn.encoded_len()
            + 4
            + 16
            + self.observed_addr.encoded_len()
            + self.local_addrs.encoded_len()
            + 1
            + 32
            + 1
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.fqdn.encode(buf);
        self.virtual_v4.encode(buf);
        self.virtual_v6.encode(buf);
        self.observed_addr.encode(buf);
        self.local_addrs.encode(buf);
        self.nat.encode(buf);
        self.public_key.encode(buf);
        self.notification.encode(buf);
    }
    fn decode(input: &[u8]) -> PResult<'_, Self> {
        let (rest, fqdn) = Fqdn::decode(input)?;
        let (rest, virtual_v4) = Ipv4Addr::decode(rest)?;
        let (rest, virtual_v6) = Ipv6Addr::decode(rest)?;
        let (rest, observed_addr) = Option::<TransportAddr>::decode(rest)?;
        let (rest, local_addrs) = AddrList::decode(rest)?;
        let (rest, nat) = NatBehaviour::decode(rest)?;
        let (rest, public_key) = <[u8; 32]>::decode(rest)?;
        let (rest, notification) = bool::decode(rest)?;
        Ok((
            rest,
            NodeInfo {
                fqdn,
                virtual_v4,
                virtual_v6,
                observed_addr,
                local_addrs,
                nat,
                public_key,
                notification,
            },
        ))
    }
    fn describe(&self) -> FieldValue {
        FieldValue::Record(vec![
            ("fqdn", self.fqdn.describe()),
            ("virtual_v4", self.virtual_v4.describe()),
            ("virtual_v6", self.virtual_v6.describe()),
            ("observed_addr", self.observed_addr.describe()),
            ("local_addrs", self.local_addrs.describe()),
            ("nat", self.nat.describe()),
            ("public_key", self.public_key.describe()),
            ("notification", self.notification.describe()),
        ])
    }
}

macro_rules! catalogue {
    ($(
        $(#[doc = $doc:literal])*
        $code:literal => $name:ident ($wire_name:literal, $eph:ident) {
            $( $(#[doc = $fdoc:literal])* $field:ident : $ty:ty ),* $(,)?
        }
    )*) => {
        /// A signaling message type code (the header's first byte).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[repr(u8)]
        pub enum MessageType {
            $( $name = $code, )*
        }

        impl MessageType {
            /// Every signaling message type, in code order.
            pub const ALL: &'static [MessageType] = &[$(MessageType::$name,)*];

            pub fn from_u8(b: u8) -> Option<Self> {
                match b {
                    $($code => Some(MessageType::$name),)*
                    _ => None,
                }
            }

            pub fn to_u8(self) -> u8 {
                self as u8
            }

            /// The name the specification uses.
            pub fn name(self) -> &'static str {
                match self {
                    $(MessageType::$name => $wire_name,)*
                }
            }

            /// Whether the header carries an ephemeral public key.
            pub fn ephemeral(self) -> EphemeralRule {
                match self {
                    $(MessageType::$name => EphemeralRule::$eph,)*
                }
            }

            /// Only ERROR may travel unsealed: a receiver that cannot find the sender's key, or
            /// does not speak its version, still has to say so.
            pub fn may_be_plaintext(self) -> bool {
                matches!(self, MessageType::Error)
            }
        }

        $(
            $(#[doc = $doc])*
            #[derive(Debug, Clone, PartialEq, Eq)]
            #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
            pub struct $name {
                $( $(#[doc = $fdoc])* pub $field: $ty, )*
                /// The extension area (version 1 defines only PADDING; unknown non-critical
                /// extensions are kept).
                pub extensions: Extensions,
            }

            impl $name {
                pub const TYPE: MessageType = MessageType::$name;

                fn body_len(&self) -> usize {
                    0 $(+ WireField::encoded_len(&self.$field))* + self.extensions.encoded_len()
                }

                fn encode_body<B: BufMut>(&self, buf: &mut B) {
                    $( WireField::encode(&self.$field, buf); )*
                    self.extensions.encode(buf);
                }

                /// The fields in wire order, in language-neutral form, extensions last.
                pub fn fields(&self) -> Vec<(&'static str, FieldValue)> {
                    vec![
                        $( (stringify!($field), WireField::describe(&self.$field)), )*
                        ("extensions", self.extensions.describe()),
                    ]
                }

                fn decode_body(input: &[u8]) -> Result<Self, WireError> {
                    let rest = input;
                    $(
                        let (rest, $field) = <$ty as WireField>::decode(rest)
                            .map_err(|e| field_err($wire_name, stringify!($field), e))?;
                    )*
                    let extensions = Extensions::decode_all(rest)
                        .map_err(|e| ext_err($wire_name, e))?;
                    Ok($name { $($field,)* extensions })
                }
            }

            impl From<$name> for Message {
                fn from(m: $name) -> Message {
                    Message::$name(m)
                }
            }
        )*

        /// Any signaling message.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        pub enum Message {
            $( $name($name), )*
        }

        impl Message {
            pub fn msg_type(&self) -> MessageType {
                match self {
                    $(Message::$name(_) => MessageType::$name,)*
                }
            }

            /// Exact length of the body (fields and extensions, without header or tag).
            pub fn body_len(&self) -> usize {
                match self {
                    $(Message::$name(m) => m.body_len(),)*
                }
            }

            /// Writes the body. The caller guarantees `buf.remaining_mut() >= self.body_len()`.
            pub(crate) fn write_body<B: BufMut>(&self, buf: &mut B) {
                match self {
                    $(Message::$name(m) => m.encode_body(buf),)*
                }
            }

            /// Writes the plaintext body (fields and extensions, no header, no tag).
            pub fn encode_body<B: BufMut>(&self, buf: &mut B) -> Result<(), ApiMisuse> {
                let needed = self.body_len();
                if buf.remaining_mut() < needed {
                    return Err(ApiMisuse::BufferTooSmall {
                        needed,
                        available: buf.remaining_mut(),
                    });
                }
                self.write_body(buf);
                Ok(())
            }

            /// Decodes a plaintext body of the given type.
            pub fn decode_body(msg_type: MessageType, body: &[u8]) -> Result<Self, WireError> {
                match msg_type {
                    $(MessageType::$name => $name::decode_body(body).map(Message::$name),)*
                }
            }

            pub fn extensions(&self) -> &Extensions {
                match self {
                    $(Message::$name(m) => &m.extensions,)*
                }
            }

            /// The fields in wire order, in language-neutral form (see [`FieldValue`]).
            pub fn fields(&self) -> Vec<(&'static str, FieldValue)> {
                match self {
                    $(Message::$name(m) => m.fields(),)*
                }
            }

            /// Generates a message of the given type from fuzzer or property-test input.
            #[cfg(feature = "arbitrary")]
            pub fn arbitrary_of_type(
                msg_type: MessageType,
                u: &mut arbitrary::Unstructured<'_>,
            ) -> arbitrary::Result<Message> {
                use arbitrary::Arbitrary;
                match msg_type {
                    $(MessageType::$name => $name::arbitrary(u).map(Message::$name),)*
                }
            }
        }
    };
}

catalogue! {
    /// Node → AS. Opens a login: names the account, under the ephemeral-static configuration key.
    0x10 => ConfigRequest("CONFIG_REQUEST", Required) {
        account: Account,
    }
    /// AS → node. The parameters the node needs to prove its password. For an unknown account
    /// the AS answers with a deterministic fake salt, so existence is not revealed.
    0x11 => ConfigResponse("CONFIG_RESPONSE", Required) {
        /// Names the pending login; the LOGIN_REQUEST's key ID.
        login_id: u32,
        challenge: [u8; 16],
        salt: [u8; 16],
        /// PBKDF2 iterations; a node refuses fewer than the spec's minimum.
        iterations: u32,
    }
    /// Node → AS. The password proof, under the login key. The account is not repeated: the AS
    /// knows it from the pending login the key ID names, and a fixed size reveals nothing.
    0x12 => LoginRequest("LOGIN_REQUEST", Forbidden) {
        proof: [u8; 32],
    }
    /// AS → node. The session: the node↔DC key and the node's configuration.
    0x13 => LoginResponse("LOGIN_RESPONSE", Forbidden) {
        node_fqdn: Fqdn,
        /// The key ID the node uses with its DC (and, derived, with its NS and CS).
        session_key_id: u32,
        node_dc_key: SecretKey,
        session_lifetime_s: u32,
        dc_fqdn: Fqdn,
        dc_addrs: AddrList,
        ns_addrs: AddrList,
        cs_addrs: AddrList,
        keepalive_interval_s: u16,
    }
    /// AS → DC (node↔DC key at login), DC → DC (DC↔DC key), DC → NS/RS/CS (server keys).
    0x20 => KeyDistribution("KEY_DISTRIBUTION", Optional) {
        key_role: KeyRole,
        new_key_id: u32,
        key: SecretKey,
        lifetime_s: u32,
        /// The node FQDN (NodeDc, NodeCs) or the sending DC's zone (DcDc) or server name.
        subject: Fqdn,
    }
    /// Node → DC. Registers the node's current real addresses; renews the registration.
    0x30 => RegistrationRequest("REGISTRATION_REQUEST", Forbidden) {
        node_fqdn: Fqdn,
        local_addrs: AddrList,
        nat_mapping: NatBehaviour,
        node_public_key: PublicKeyBytes,
        wants_notification: bool,
    }
    /// DC → node. The virtual addresses (stable per FQDN) and the address the DC observed.
    0x31 => RegistrationResponse("REGISTRATION_RESPONSE", Forbidden) {
        virtual_v4: Ipv4Addr,
        virtual_v6: Ipv6Addr,
        observed_addr: TransportAddr,
        lifetime_s: u32,
        keepalive_interval_s: u16,
    }
    /// Node → DC, RS or peer. Keeps NAT mappings open; optionally asks for a reply.
    0x32 => Keepalive("KEEPALIVE", Forbidden) {
        reply_requested: bool,
    }
    /// Reply to a KEEPALIVE: the address the receiver observed (NAT detection, rebinding).
    0x33 => KeepaliveReply("KEEPALIVE_REPLY", Forbidden) {
        observed_addr: TransportAddr,
    }
    /// Node → DC. Asks for a tunnel to the peer named by FQDN.
    0x34 => DirectionRequest("DIRECTION_REQUEST", Forbidden) {
        peer_fqdn: Fqdn,
        /// 0 for a new tunnel; the Path ID of the tunnel being rebuilt after a handover.
        rebuild_path_id: u32,
    }
    /// DC → node, and DC → DC (the peer's DC answering an NTM_INFO_REQUEST that asked it to
    /// decide): the route, the peer, and the credentials to build the tunnel.
    0x35 => RouteDirection("ROUTE_DIRECTION", Forbidden) {
        path_id: u32,
        route: RouteKind,
        role: TunnelRole,
        reason: RouteReason,
        peer_fqdn: Fqdn,
        peer_virtual_v4: Ipv4Addr,
        peer_virtual_v6: Ipv6Addr,
        /// The peer's static X25519 key (for sealed cache blobs; see RouteKind::Offline).
        peer_public_key: PublicKeyBytes,
        /// Where to send tunnel requests to the peer directly (observed first, then local).
        peer_addrs: AddrList,
        /// The relay's addresses (empty for a direct route).
        relay_addrs: AddrList,
        /// The tunnel credential K_tun: authenticates TUNNEL_REQUEST and TUNNEL_RESPONSE.
        tunnel_credential: SecretKey,
        /// The relay key K_rel (relayed routes only): authenticates RELAY_BIND.
        relay_key: Option<SecretKey>,
        /// Probe the direct path while on the relay (route optimization).
        probe_direct: bool,
        lifetime_s: u32,
    }
    /// DC → DC. Asks the target's DC about it; with `decide_route`, asks it to choose the route
    /// and direct both sides (its answer is a ROUTE_DIRECTION for the requester's node).
    0x36 => NtmInfoRequest("NTM_INFO_REQUEST", Forbidden) {
        target_fqdn: Fqdn,
        requester: NodeInfo,
        decide_route: bool,
    }
    /// DC → DC. The target's registry entry.
    0x37 => NtmInfoResponse("NTM_INFO_RESPONSE", Forbidden) {
        target: NodeInfo,
    }
    /// DC → RS. Authorizes relaying for one Path ID.
    0x38 => RelayRequest("RELAY_REQUEST", Forbidden) {
        path_id: u32,
        relay_key: SecretKey,
        lifetime_s: u32,
        /// Per-path rate limit in kilobits per second (0: the RS's default).
        rate_limit_kbps: u32,
    }
    /// RS → DC. The relay is ready; its addresses and current load.
    0x39 => RelayResponse("RELAY_RESPONSE", Forbidden) {
        path_id: u32,
        relay_addrs: AddrList,
        load_permille: u16,
    }
    /// DC → NS. Prepares a push channel for a node: its key ID and the node↔NS key.
    0x3a => NotificationRegistration("NOTIFICATION_REGISTRATION", Forbidden) {
        node_fqdn: Fqdn,
        node_key_id: u32,
        node_ns_key: SecretKey,
        lifetime_s: u32,
    }
    /// Node → NS, over the TCP push channel. Binds the channel to the node.
    0x3b => NotificationSubscribe("NOTIFICATION_SUBSCRIBE", Forbidden) {
        node_fqdn: Fqdn,
    }
    /// DC → NS → node. Wakes the node; carries a sealed datagram for it (usually ROUTE_DIRECTION).
    0x3c => Notification("NOTIFICATION", Forbidden) {
        node_key_id: u32,
        reason: NotifyReason,
        payload: Blob,
    }
    /// Node → node (directly or through the RS). Opens the tunnel: the initiator's ephemeral key.
    0x40 => TunnelRequest("TUNNEL_REQUEST", Forbidden) {
        ephemeral: PublicKeyBytes,
        sender_fqdn: Fqdn,
        sender_virtual_v4: Ipv4Addr,
        sender_virtual_v6: Ipv6Addr,
    }
    /// Node → node. Completes the tunnel: the responder's ephemeral key.
    0x41 => TunnelResponse("TUNNEL_RESPONSE", Forbidden) {
        ephemeral: PublicKeyBytes,
        /// Where the request came from, as the responder saw it.
        observed_addr: TransportAddr,
    }
    /// Node → node (or through the RS). The sender's address changed or a better path was found.
    0x42 => PathUpdate("PATH_UPDATE", Forbidden) {
        reason: PathUpdateReason,
        local_addrs: AddrList,
    }
    /// Node → node. Tears a tunnel down.
    0x43 => TunnelClose("TUNNEL_CLOSE", Forbidden) {
        reason: CloseReason,
    }
    /// Node → RS. Binds the sender's current address to its side of a relayed path.
    0x44 => RelayBind("RELAY_BIND", Forbidden) {
    }
    /// Node → CS. Stores a blob, sealed end to end to the recipient, while it is offline.
    0x50 => CacheStore("CACHE_STORE", Forbidden) {
        recipient_fqdn: Fqdn,
        ttl_s: u32,
        blob: Blob,
    }
    /// Node → CS. Asks for blobs held for the sender, and releases those it has received.
    0x51 => CacheFetch("CACHE_FETCH", Forbidden) {
        max_items: u8,
        /// The CS deletes every blob for this node with `item_id` up to this one (0: none), so
        /// delivery is at least once and never silently lost.
        acknowledged_through: u64,
    }
    /// CS → node. One held blob.
    0x52 => CacheData("CACHE_DATA", Forbidden) {
        /// Increasing per recipient; acknowledged by the next CACHE_FETCH.
        item_id: u64,
        sender_fqdn: Fqdn,
        age_s: u32,
        /// Blobs still held after this one.
        remaining: u16,
        blob: Blob,
    }
    /// Any → any. Acknowledges the request with the same transaction ID.
    0x60 => Ack("ACK", Forbidden) {
        acked_type: u8,
    }
    /// Any → any. Refuses the request with the same transaction ID.
    0x61 => Error("ERROR", Forbidden) {
        code: ErrorCode,
        failed_type: u8,
        retry_after_ms: u32,
    }
}
