//! One representative instance of every signaling message, with the envelope and key it is
//! sealed under. The golden vectors are made from these (once), the benchmarks measure them, and
//! the fuzz seeds start from them.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ntm_wire::message::*;
use ntm_wire::{
    Account, AddrList, Blob, Envelope, Extension, Extensions, Fqdn, Role, SecretKey, TransportAddr,
};

/// A sample: file stem, message, envelope, and the key sealing it (`None`: sent unsealed).
pub struct Sample {
    pub name: &'static str,
    pub message: Message,
    pub envelope: Envelope,
    pub key: Option<[u8; 32]>,
}

fn fqdn(s: &str) -> Fqdn {
    Fqdn::new(s).expect("sample names are canonical")
}

fn addr(s: &str) -> TransportAddr {
    TransportAddr::new(s.parse::<SocketAddr>().expect("sample addresses parse"))
}

fn addrs(v: &[&str]) -> AddrList {
    AddrList::new(v.iter().map(|s| addr(s)).collect()).expect("at most 8")
}

fn key(b: u8) -> SecretKey {
    let mut k = [0u8; 32];
    for (i, x) in k.iter_mut().enumerate() {
        *x = b.wrapping_add(i as u8);
    }
    SecretKey::from_bytes(k)
}

fn pubkey(b: u8) -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, x) in k.iter_mut().enumerate() {
        *x = b ^ (i as u8).wrapping_mul(7);
    }
    k
}

fn env(role: Role, key_id: u32, seq: u64, txid: u32) -> Envelope {
    Envelope {
        role,
        key_id,
        seq,
        txid,
        ephemeral: None,
    }
}

fn no_ext() -> Extensions {
    Extensions::none()
}

fn mn_info() -> NodeInfo {
    NodeInfo {
        fqdn: fqdn("mn.dc1.example"),
        virtual_v4: Ipv4Addr::new(100, 64, 1, 10),
        virtual_v6: "fd00:1::a".parse::<Ipv6Addr>().expect("parses"),
        observed_addr: Some(addr("198.51.100.7:4285")),
        local_addrs: addrs(&["198.51.100.7:4285", "[2001:db8:1::7]:4285"]),
        nat: NatBehaviour::NoNat,
        public_key: pubkey(0x61),
        notification: false,
    }
}

fn cn_info() -> NodeInfo {
    NodeInfo {
        fqdn: fqdn("cn.dc2.example"),
        virtual_v4: Ipv4Addr::new(100, 64, 2, 20),
        virtual_v6: "fd00:2::14".parse::<Ipv6Addr>().expect("parses"),
        observed_addr: Some(addr("203.0.113.9:40001")),
        local_addrs: addrs(&["192.168.0.10:4285"]),
        nat: NatBehaviour::EndpointIndependent,
        public_key: pubkey(0x62),
        notification: true,
    }
}

/// The node↔DC key of the samples (`mn.dc1.example`, session key ID 0x0000_1001).
pub const NODE_DC_KEY: u8 = 0x10;
/// The tunnel credential of the samples (Path ID 0x1234_5678).
pub const TUNNEL_CREDENTIAL: u8 = 0x40;

/// Every sample, at least one per message type, in type-code order.
pub fn all() -> Vec<Sample> {
    let session = 0x0000_1001;
    let path_id = 0x1234_5678;
    let k = |b: u8| Some(*key(b).expose());
    let mut v = vec![
        Sample {
            name: "config_request",
            message: ConfigRequest {
                account: Account::new("alice@dc1.example").expect("valid"),
                extensions: Extensions::new(vec![Extension {
                    ext_type: Extension::PADDING,
                    // 128 bytes in all: hides the length of account names up to 51 bytes.
                    value: vec![0; 34],
                }])
                .expect("valid"),
            }
            .into(),
            envelope: Envelope {
                ephemeral: Some(pubkey(0x01)),
                ..env(Role::A, 0, 0, 0xa1a1_0001)
            },
            key: k(0x01),
        },
        Sample {
            name: "config_response",
            message: ConfigResponse {
                login_id: 0x5eed_0001,
                challenge: [0xc4; 16],
                salt: [0x5a; 16],
                iterations: 100_000,
                extensions: no_ext(),
            }
            .into(),
            envelope: Envelope {
                ephemeral: Some(pubkey(0x02)),
                ..env(Role::B, 0, 0, 0xa1a1_0001)
            },
            key: k(0x01),
        },
        Sample {
            name: "login_request",
            message: LoginRequest {
                proof: [0x9f; 32],
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, 0x5eed_0001, 0, 0xa1a1_0002),
            key: k(0x02),
        },
        Sample {
            name: "login_response",
            message: LoginResponse {
                node_fqdn: fqdn("mn.dc1.example"),
                session_key_id: session,
                node_dc_key: key(NODE_DC_KEY),
                session_lifetime_s: 86_400,
                dc_fqdn: fqdn("dc1.example"),
                dc_addrs: addrs(&["192.0.2.1:4281", "[2001:db8::1]:4281"]),
                ns_addrs: addrs(&["192.0.2.3:4283"]),
                cs_addrs: addrs(&["192.0.2.5:4284"]),
                keepalive_interval_s: 25,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, 0x5eed_0001, 0, 0xa1a1_0002),
            key: k(0x02),
        },
        Sample {
            name: "key_distribution",
            message: KeyDistribution {
                key_role: KeyRole::NodeDc,
                new_key_id: session,
                key: key(NODE_DC_KEY),
                lifetime_s: 86_400,
                subject: fqdn("mn.dc1.example"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, 0x0000_0a01, 17, 0xa5a5_0001),
            key: k(0x03),
        },
        Sample {
            name: "key_distribution_dc_bootstrap",
            message: KeyDistribution {
                key_role: KeyRole::DcDc,
                new_key_id: 0x00dc_0102,
                key: key(0x20),
                lifetime_s: 3_600,
                subject: fqdn("dc1.example"),
                extensions: no_ext(),
            }
            .into(),
            envelope: Envelope {
                ephemeral: Some(pubkey(0x03)),
                ..env(Role::A, 1, 0, 0xd0d0_0001)
            },
            key: k(0x04),
        },
        Sample {
            name: "registration_request",
            message: RegistrationRequest {
                node_fqdn: fqdn("cn.dc2.example"),
                local_addrs: addrs(&["192.168.0.10:4285"]),
                nat_mapping: NatBehaviour::EndpointIndependent,
                node_public_key: pubkey(0x62),
                wants_notification: true,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, session, 1, 0xb0b0_0001),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "registration_response",
            message: RegistrationResponse {
                virtual_v4: Ipv4Addr::new(100, 64, 2, 20),
                virtual_v6: "fd00:2::14".parse::<Ipv6Addr>().expect("parses"),
                observed_addr: addr("203.0.113.9:40001"),
                lifetime_s: 600,
                keepalive_interval_s: 25,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, session, 1, 0xb0b0_0001),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "keepalive",
            message: Keepalive {
                reply_requested: true,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, session, 2, 0xb0b0_0002),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "keepalive_reply",
            message: KeepaliveReply {
                observed_addr: addr("203.0.113.9:40001"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, session, 2, 0xb0b0_0002),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "direction_request",
            message: DirectionRequest {
                peer_fqdn: fqdn("cn.dc2.example"),
                rebuild_path_id: 0,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, session, 3, 0xd1d1_0001),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "route_direction",
            message: RouteDirection {
                path_id,
                route: RouteKind::Direct,
                role: TunnelRole::Responder,
                reason: RouteReason::Reachable,
                peer_fqdn: fqdn("cn.dc2.example"),
                peer_virtual_v4: Ipv4Addr::new(100, 64, 2, 20),
                peer_virtual_v6: "fd00:2::14".parse::<Ipv6Addr>().expect("parses"),
                peer_public_key: pubkey(0x62),
                peer_addrs: addrs(&["203.0.113.9:40001", "192.168.0.10:4285"]),
                relay_addrs: AddrList::empty(),
                tunnel_credential: key(TUNNEL_CREDENTIAL),
                relay_key: None,
                probe_direct: false,
                lifetime_s: 86_400,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, session, 3, 0xd1d1_0001),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "route_direction_relay",
            message: RouteDirection {
                path_id: 0x0bad_cafe,
                route: RouteKind::Relay,
                role: TunnelRole::Initiator,
                reason: RouteReason::BothBehindNat,
                peer_fqdn: fqdn("cn.dc2.example"),
                peer_virtual_v4: Ipv4Addr::new(100, 64, 2, 20),
                peer_virtual_v6: "fd00:2::14".parse::<Ipv6Addr>().expect("parses"),
                peer_public_key: pubkey(0x62),
                peer_addrs: addrs(&["203.0.113.9:40001", "192.168.0.10:4285"]),
                relay_addrs: addrs(&["192.0.2.2:4282", "[2001:db8::2]:4282"]),
                tunnel_credential: key(0x41),
                relay_key: Some(key(0x50)),
                probe_direct: true,
                lifetime_s: 86_400,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, 0x00dc_0102, 4, 0xd1d1_0002),
            key: k(0x20),
        },
        Sample {
            name: "route_direction_offline",
            message: RouteDirection {
                path_id: 0,
                route: RouteKind::Offline,
                role: TunnelRole::Initiator,
                reason: RouteReason::Reachable,
                peer_fqdn: fqdn("cn.dc2.example"),
                peer_virtual_v4: Ipv4Addr::new(100, 64, 2, 20),
                peer_virtual_v6: "fd00:2::14".parse::<Ipv6Addr>().expect("parses"),
                peer_public_key: pubkey(0x62),
                peer_addrs: AddrList::empty(),
                relay_addrs: AddrList::empty(),
                tunnel_credential: key(0x43),
                relay_key: None,
                probe_direct: false,
                lifetime_s: 0,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, session, 9, 0xd1d1_0005),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "ntm_info_request",
            message: NtmInfoRequest {
                target_fqdn: fqdn("cn.dc2.example"),
                requester: mn_info(),
                decide_route: true,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, 0x00dc_0102, 1, 0xd1d1_0001),
            key: k(0x20),
        },
        Sample {
            name: "ntm_info_response",
            message: NtmInfoResponse {
                target: cn_info(),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, 0x00dc_0102, 1, 0xd1d1_0003),
            key: k(0x20),
        },
        Sample {
            name: "relay_request",
            message: RelayRequest {
                path_id: 0x0bad_cafe,
                relay_key: key(0x50),
                lifetime_s: 86_400,
                rate_limit_kbps: 0,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, 0x0000_0b01, 9, 0xe0e0_0001),
            key: k(0x05),
        },
        Sample {
            name: "relay_response",
            message: RelayResponse {
                path_id: 0x0bad_cafe,
                relay_addrs: addrs(&["192.0.2.2:4282", "[2001:db8::2]:4282"]),
                load_permille: 125,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, 0x0000_0b01, 9, 0xe0e0_0001),
            key: k(0x05),
        },
        Sample {
            name: "notification_registration",
            message: NotificationRegistration {
                node_fqdn: fqdn("cn.dc2.example"),
                node_key_id: session,
                node_ns_key: key(0x11),
                lifetime_s: 600,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, 0x0000_0c01, 5, 0xf0f0_0001),
            key: k(0x06),
        },
        Sample {
            name: "notification_subscribe",
            message: NotificationSubscribe {
                node_fqdn: fqdn("cn.dc2.example"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, session, 0, 0xf0f0_0002),
            key: k(0x11),
        },
        Sample {
            name: "notification",
            message: Notification {
                node_key_id: session,
                reason: NotifyReason::IncomingTunnel,
                payload: Blob::new(vec![0x35, 0x01, 0x00, 0x05, 0xde, 0xad]).expect("short"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, session, 0, 0xf0f0_0003),
            key: k(0x11),
        },
        Sample {
            name: "tunnel_request",
            message: TunnelRequest {
                ephemeral: pubkey(0x71),
                sender_fqdn: fqdn("cn.dc2.example"),
                sender_virtual_v4: Ipv4Addr::new(100, 64, 2, 20),
                sender_virtual_v6: "fd00:2::14".parse::<Ipv6Addr>().expect("parses"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, path_id, 0, 0x7070_0001),
            key: k(TUNNEL_CREDENTIAL),
        },
        Sample {
            name: "tunnel_response",
            message: TunnelResponse {
                ephemeral: pubkey(0x72),
                observed_addr: addr("203.0.113.9:40001"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, path_id, 0, 0x7070_0001),
            key: k(TUNNEL_CREDENTIAL),
        },
        Sample {
            name: "path_update",
            message: PathUpdate {
                reason: PathUpdateReason::Handover,
                local_addrs: addrs(&["10.1.0.5:4285", "[2001:db8:5::5]:4285"]),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, path_id, 12, 0x7070_0002),
            key: k(0x42),
        },
        Sample {
            name: "tunnel_close",
            message: TunnelClose {
                reason: CloseReason::Idle,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, path_id, 40, 0x7070_0003),
            key: k(0x42),
        },
        Sample {
            name: "relay_bind",
            message: RelayBind {
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, 0x0bad_cafe, 0, 0x7171_0001),
            key: k(0x50),
        },
        Sample {
            name: "cache_store",
            message: CacheStore {
                recipient_fqdn: fqdn("cn.dc2.example"),
                ttl_s: 86_400,
                blob: Blob::new(vec![0xb1; 48]).expect("short"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, session, 6, 0xcccc_0001),
            key: k(0x12),
        },
        Sample {
            name: "cache_fetch",
            message: CacheFetch {
                max_items: 8,
                acknowledged_through: 0,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, session, 7, 0xcccc_0002),
            key: k(0x12),
        },
        Sample {
            name: "cache_data",
            message: CacheData {
                item_id: 1,
                sender_fqdn: fqdn("mn.dc1.example"),
                age_s: 3_600,
                remaining: 0,
                blob: Blob::new(vec![0xb1; 48]).expect("short"),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, session, 7, 0xcccc_0002),
            key: k(0x12),
        },
        Sample {
            name: "ack",
            message: Ack {
                acked_type: MessageType::RouteDirection.to_u8(),
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::A, session, 4, 0xd1d1_0001),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "error",
            message: Error {
                code: ErrorCode::NotFound,
                failed_type: MessageType::DirectionRequest.to_u8(),
                retry_after_ms: 0,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, session, 5, 0xd1d1_0004),
            key: k(NODE_DC_KEY),
        },
        Sample {
            name: "error_plain",
            message: Error {
                code: ErrorCode::UnknownKey,
                failed_type: MessageType::RegistrationRequest.to_u8(),
                retry_after_ms: 0,
                extensions: no_ext(),
            }
            .into(),
            envelope: env(Role::B, 0x0000_dead, 0, 0xb0b0_0009),
            key: None,
        },
        Sample {
            name: "keepalive_with_unknown_extension",
            message: Keepalive {
                reply_requested: false,
                extensions: Extensions::new(vec![Extension {
                    ext_type: 0x0042,
                    value: b"future".to_vec(),
                }])
                .expect("valid"),
            }
            .into(),
            envelope: env(Role::A, session, 8, 0xb0b0_0003),
            key: k(NODE_DC_KEY),
        },
    ];
    v.sort_by_key(|s| s.message.msg_type());
    v
}
