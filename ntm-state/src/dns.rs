//! The DC's DNS (spec/05-procedures.md §5.12): the authoritative service of its own zone, the
//! client that finds another zone's DC, and a small parent-zone server for tests.
//!
//! The DNS wire format (RFC 1035, EDNS(0) of RFC 6891) comes from `hickory-proto`, built
//! without its default features: no runtime, no OS randomness, only the message codec.
//!
//! # The authoritative service
//!
//! [`ZoneAuthority`] answers queries for the DC's zone. It is a pure function of the query and
//! of the DC's registry, which it sees through a closure:
//!
//! ```text
//! runtime (UDP port 53)            ZoneAuthority::answer(query, lookup, out)
//!   query bytes  ───────────────▶  header checks, question, EDNS(0)
//!                                  lookup(&fqdn) ──▶ DC: the node's virtual pair, or None
//!   out[..len]   ◀───────────────  answer, truncated with TC to the requester's size
//! ```
//!
//! The closure returns a node's virtual pair **only when every caller may reach the node**; for
//! any other name (missing, or hidden by the DC's access policy) it returns `None`, and the
//! answer is then byte for byte the one for a missing name (spec/07 §7.4, concealment): the DNS
//! has no caller identity to decide more finely. [`ZoneAuthority::answer_from`] adds the
//! response rate limit per client prefix that spec/07 asks of DNS answers, which may be larger
//! than their queries.
//!
//! | query | answer |
//! |---|---|
//! | SOA at the apex | the SOA |
//! | NS at the apex | NS = the apex itself, with the apex addresses as additional data |
//! | A / AAAA at the apex | the DC's real addresses (no data when it has none of that family) |
//! | ANY at the apex | the SOA only (RFC 8482: one RRset, no amplification) |
//! | A / AAAA / ANY of a node | its virtual IPv4 / IPv6 address / both |
//! | another type at an existing name | NOERROR, no data, the SOA in the authority section |
//! | a missing or hidden name in the zone | NXDOMAIN, the SOA in the authority section |
//! | AXFR / IXFR in the zone | REFUSED: the zone is not transferred |
//! | a name outside the zone, a class other than IN | REFUSED, not authoritative |
//! | a DNS response (QR set), fewer than 12 bytes | dropped, never answered |
//! | an opcode other than QUERY | NOTIMP, header only |
//! | QDCOUNT ≠ 1, ANCOUNT or NSCOUNT ≠ 0, undecodable | FORMERR, header only |
//! | EDNS version above 0 | BADVERS with an OPT of version 0 |
//!
//! Answers set AA (except REFUSED and the header-only errors), echo the question as asked
//! (case included) and the requester's RD and CD bits, and carry an OPT record when the query
//! did (advertising [`ZoneConfig::max_udp_payload`], copying the DO bit, no options). The TTL of
//! the SOA in a negative answer is the smaller of the SOA's TTL and its MINIMUM (RFC 2308). An
//! answer larger than the requester's UDP payload size (512 without EDNS(0), at most
//! `max_udp_payload`, at most the caller's buffer) first loses its additional section, then, if
//! still too large, all records with TC set.
//!
//! # Discovery
//!
//! [`DcDiscovery`] finds the signaling addresses of another zone's DC (§5.12 items 1 to 5):
//!
//! ```text
//! DC                                 resolver
//!  | lookup(zone)                       |
//!  | NS? zone ─────────────────────────▶|
//!  |◀──────── NS target (+ glue A/AAAA) |   glue: done, 2 trips
//!  | A? target, AAAA? target ──────────▶|   no glue: 2 more trips, in parallel
//!  |◀──────────────────────── addresses |
//!  | DiscoveryEvent::Resolved { zone, addrs, source: FromDns }
//! ```
//!
//! The port of every address found by DNS is the port of the zone's first directory address,
//! or [`DC_SIGNALING_PORT`] (4281) when the directory entry lists none. NS answers are cached
//! for their TTL, at most [`DiscoveryConfig::max_ns_ttl`] (1 h), addresses for theirs (at most
//! [`DiscoveryConfig::max_address_ttl`]). Each query is sent up to
//! [`DiscoveryConfig::transmissions`] times (3), [`DiscoveryConfig::retry_interval`] (1 s)
//! apart, rotating through the configured resolvers, and fails
//! one interval after its last transmission; an answer must come from a resolver the query was
//! sent to, with the query's random ID and its question, or it is ignored. When DNS fails
//! (timeout, an RCODE other than NOERROR, no NS record, no usable address) the lookup falls back
//! to the directory's addresses for the zone, and keeps doing so without asking DNS for
//! [`DiscoveryConfig::failure_hold`] (30 s), so that a broken resolver costs one round of
//! timeouts, not one per request. A zone that is not in the directory is never looked up: it is
//! [`Lookup::NotFound`] whatever DNS would say, since its DC could not be authenticated.
//!
//! Drive it like every machine of this crate: [`DcDiscovery::lookup`] and
//! [`DcDiscovery::handle_datagram`] / [`DcDiscovery::handle_timeout`] for input, then drain
//! [`DcDiscovery::poll_event`] and [`DcDiscovery::poll_transmit`], and wait for
//! [`DcDiscovery::poll_timeout`]. A DC's own zone is its own business: it never asks discovery
//! for it (§5.12 item 1).
//!
//! # The parent zone of tests
//!
//! [`ParentZone`] is a tiny authoritative server for a parent zone (say `example`) that
//! delegates child zones (`dc1.example`, `dc2.example`) to their DCs, with glue when the name
//! server lies inside the child. It answers referrals as a real parent does (NOERROR, no AA, NS
//! in the authority section), which [`DcDiscovery`] accepts as well as a recursive resolver's
//! answer; the simulator's scenario tests use it as the DCs' resolver.

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ntm_wire::Fqdn;
use rand_core::{CryptoRng, RngCore};

use crate::signaling::{source_prefix, Outbox, PrefixLimiter, Transmit};
use crate::time::Time;

/// The DC's default DNS port (spec/01 §1.5).
pub const DNS_PORT: u16 = 53;
/// The DC's default signaling port (spec/01 §1.5), used for addresses found by DNS when the
/// directory gives no port.
pub const DC_SIGNALING_PORT: u16 = 4281;
/// The DNS header length.
pub const DNS_HEADER_LEN: usize = 12;
/// The UDP payload every DNS requester accepts (RFC 1035), and the floor of an EDNS(0) size.
pub const MIN_UDP_PAYLOAD: u16 = 512;
/// The UDP payload the DC advertises and sends at most by default: the IPv6 minimum MTU less
/// headers, as the DNS flag day 2020 recommends (and the largest signaling datagram).
pub const DEFAULT_UDP_PAYLOAD: u16 = 1232;
/// The largest TTL a record may carry (RFC 2181 §8).
const MAX_TTL: u32 = i32::MAX as u32;

/// Why a datagram got no answer from [`ZoneAuthority`] or [`ParentZone`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DnsDrop {
    /// Shorter than a DNS header: nothing to answer to.
    TooShort,
    /// A DNS response (QR set): answering it could start a loop between two servers.
    NotAQuery,
    /// The client's prefix is over its response rate ([`ZoneAuthority::answer_from`]).
    RateLimited,
    /// Even the truncated answer does not fit the caller's buffer (give it at least
    /// [`ZoneConfig::max_udp_payload`] bytes).
    BufferTooSmall,
    /// The codec refused to encode the answer (not expected to happen).
    Encode,
}

impl DnsDrop {
    /// A stable name for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            DnsDrop::TooShort => "dns_too_short",
            DnsDrop::NotAQuery => "dns_not_a_query",
            DnsDrop::RateLimited => "dns_rate_limited",
            DnsDrop::BufferTooSmall => "dns_buffer_too_small",
            DnsDrop::Encode => "dns_encode",
        }
    }
}

impl fmt::Display for DnsDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A DNS configuration refused at construction.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DnsConfigError {
    /// A TTL or SOA timer above 2^31 − 1 seconds (RFC 2181 §8).
    InvalidTtl(&'static str),
    /// `max_udp_payload` below 512.
    InvalidPayloadSize(u16),
    /// More apex addresses than [`ZoneConfig::MAX_APEX_ADDRS`] in one family.
    TooManyAddresses,
    /// A zone listed twice in the directory, or delegated twice.
    DuplicateZone(Fqdn),
    /// A name that must lie below the zone does not (a delegation outside the parent).
    OutsideZone(Fqdn),
    /// `transmissions` is 0, or a limit is 0.
    InvalidLimit(&'static str),
}

impl fmt::Display for DnsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsConfigError::InvalidTtl(what) => {
                write!(f, "{what}: a DNS TTL or timer must be at most 2^31 - 1 s")
            }
            DnsConfigError::InvalidPayloadSize(n) => {
                write!(f, "UDP payload size {n}: must be at least 512")
            }
            DnsConfigError::TooManyAddresses => write!(
                f,
                "at most {} apex addresses per family",
                ZoneConfig::MAX_APEX_ADDRS
            ),
            DnsConfigError::DuplicateZone(z) => write!(f, "zone {z} is listed twice"),
            DnsConfigError::OutsideZone(z) => write!(f, "{z} is not below the zone"),
            DnsConfigError::InvalidLimit(what) => write!(f, "{what} must be at least 1"),
        }
    }
}

impl std::error::Error for DnsConfigError {}

/// The SOA record's fields (RFC 1035 §3.3.13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoaConfig {
    /// The primary name server: the apex by default (the DC is its zone's only server).
    pub mname: Fqdn,
    /// The responsible mailbox as a domain name (`hostmaster.<apex>` by default).
    pub rname: Fqdn,
    pub serial: u32,
    /// Seconds; 3600 by default.
    pub refresh: u32,
    /// Seconds; 600 by default.
    pub retry: u32,
    /// Seconds; 604800 (7 days) by default.
    pub expire: u32,
    /// The TTL of negative answers (RFC 2308); 300 s by default, the node-address TTL, so a
    /// node that becomes visible is seen as soon as an address change would be.
    pub minimum: u32,
}

/// What the DC's DNS serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The zone apex: the DC's zone, whose names one label below are its nodes.
    pub apex: Fqdn,
    /// The DC's own real addresses, served as the apex's A and AAAA records.
    pub apex_v4: Vec<Ipv4Addr>,
    pub apex_v6: Vec<Ipv6Addr>,
    pub soa: SoaConfig,
    /// TTL of the SOA, the NS and the apex addresses: 3600 s.
    pub apex_ttl: u32,
    /// TTL of node addresses: 300 s.
    pub node_ttl: u32,
    /// The largest answer sent, and the size advertised in the OPT record: 1232.
    pub max_udp_payload: u16,
    /// Answers per client prefix (IPv4 /24, IPv6 /64) per second in
    /// [`ZoneAuthority::answer_from`]: 50.
    pub responses_per_second: u32,
    /// Client prefixes the rate limit tracks at once: 4096.
    pub max_tracked_prefixes: usize,
}

impl ZoneConfig {
    /// At most this many apex addresses per family: the A or AAAA answer then always fits 512
    /// bytes, whatever the length of the name asked.
    pub const MAX_APEX_ADDRS: usize = 8;

    /// The defaults of spec/05 §5.12 for everything but the apex and its addresses.
    pub fn new(apex: Fqdn, apex_v4: Vec<Ipv4Addr>, apex_v6: Vec<Ipv6Addr>) -> Self {
        let rname = Fqdn::new(&format!("hostmaster.{}", apex.as_str())).unwrap_or(apex.clone());
        ZoneConfig {
            soa: SoaConfig {
                mname: apex.clone(),
                rname,
                serial: 1,
                refresh: 3600,
                retry: 600,
                expire: 604_800,
                minimum: 300,
            },
            apex,
            apex_v4,
            apex_v6,
            apex_ttl: 3600,
            node_ttl: 300,
            max_udp_payload: DEFAULT_UDP_PAYLOAD,
            responses_per_second: 50,
            max_tracked_prefixes: 4096,
        }
    }
}

/// The DC's authoritative DNS service for its zone (see the module documentation).
#[derive(Clone, Debug)]
pub struct ZoneAuthority {
    config: ZoneConfig,
    apex: Name,
    apex_labels: usize,
    soa: SOA,
    limiter: PrefixLimiter,
}

impl ZoneAuthority {
    pub fn new(config: ZoneConfig) -> Result<Self, DnsConfigError> {
        let s = &config.soa;
        for (what, v) in [
            ("apex_ttl", config.apex_ttl),
            ("node_ttl", config.node_ttl),
            ("soa.refresh", s.refresh),
            ("soa.retry", s.retry),
            ("soa.expire", s.expire),
            ("soa.minimum", s.minimum),
        ] {
            if v > MAX_TTL {
                return Err(DnsConfigError::InvalidTtl(what));
            }
        }
        if config.max_udp_payload < MIN_UDP_PAYLOAD {
            return Err(DnsConfigError::InvalidPayloadSize(config.max_udp_payload));
        }
        if config.apex_v4.len() > ZoneConfig::MAX_APEX_ADDRS
            || config.apex_v6.len() > ZoneConfig::MAX_APEX_ADDRS
        {
            return Err(DnsConfigError::TooManyAddresses);
        }
        if config.max_tracked_prefixes == 0 {
            return Err(DnsConfigError::InvalidLimit("max_tracked_prefixes"));
        }
        let apex = dns_name(&config.apex);
        let soa = SOA::new(
            dns_name(&s.mname),
            dns_name(&s.rname),
            s.serial,
            timer(s.refresh),
            timer(s.retry),
            timer(s.expire),
            s.minimum,
        );
        let limiter = PrefixLimiter::new(
            config.responses_per_second,
            Duration::from_secs(1),
            config.max_tracked_prefixes,
        );
        Ok(ZoneAuthority {
            apex_labels: apex.iter().count(),
            apex,
            soa,
            limiter,
            config,
        })
    }

    pub fn config(&self) -> &ZoneConfig {
        &self.config
    }

    /// Answers `query` into `out`, returning the answer's length. `lookup` gives a node's
    /// virtual pair, and must return `None` for a node that some caller may not reach
    /// (concealment); it is called once for every question about a name one label below the
    /// apex, whatever its type. Give `out` at least [`ZoneConfig::max_udp_payload`] bytes: the
    /// answer is truncated to fit it too.
    pub fn answer<F>(&self, query: &[u8], lookup: F, out: &mut [u8]) -> Result<usize, DnsDrop>
    where
        F: Fn(&Fqdn) -> Option<(Ipv4Addr, Ipv6Addr)>,
    {
        let req = match intake(query)? {
            Intake::HeaderOnly(h, rcode) => return header_only_answer(&h, rcode, out),
            Intake::Query(req) => req,
        };
        let limit = answer_limit(&req, self.config.max_udp_payload, out.len());
        let resp = self.respond(&req, &lookup);
        emit(resp, limit, out)
    }

    /// [`ZoneAuthority::answer`] behind the response rate limit of spec/07 §7.4: at most
    /// [`ZoneConfig::responses_per_second`] answers per client prefix (IPv4 /24, IPv6 /64);
    /// over it the query is dropped unanswered. Every datagram counts, garbage included.
    pub fn answer_from<F>(
        &mut self,
        now: Time,
        client: IpAddr,
        query: &[u8],
        lookup: F,
        out: &mut [u8],
    ) -> Result<usize, DnsDrop>
    where
        F: Fn(&Fqdn) -> Option<(Ipv4Addr, Ipv6Addr)>,
    {
        if !self.limiter.allow(now, source_prefix(client, 24, 64)) {
            return Err(DnsDrop::RateLimited);
        }
        self.answer(query, lookup, out)
    }

    fn respond<F>(&self, req: &Message, lookup: &F) -> Message
    where
        F: Fn(&Fqdn) -> Option<(Ipv4Addr, Ipv6Addr)>,
    {
        let mut resp = response_skeleton(req, self.config.max_udp_payload);
        if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
            resp.metadata.response_code = ResponseCode::BADVERS;
            return resp;
        }
        let Some(q) = req.queries.first() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp;
        };
        let qname = q.name();
        if q.query_class() != DNSClass::IN || !self.apex.zone_of(qname) {
            resp.metadata.response_code = ResponseCode::Refused;
            return resp;
        }
        if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) {
            resp.metadata.response_code = ResponseCode::Refused;
            return resp;
        }
        resp.metadata.authoritative = true;
        // The apex as the requester spelled it, so that every owner name compresses to a
        // pointer into the question.
        let apex = qname.trim_to(self.apex_labels);
        let qtype = q.query_type();
        let cfg = &self.config;
        match qname.iter().count().checked_sub(self.apex_labels) {
            Some(0) => match qtype {
                RecordType::SOA | RecordType::ANY => {
                    resp.answers.push(self.soa_record(&apex, cfg.apex_ttl));
                }
                RecordType::NS => {
                    resp.answers.push(Record::from_rdata(
                        apex.clone(),
                        cfg.apex_ttl,
                        RData::NS(NS(apex.clone())),
                    ));
                    resp.additionals
                        .extend(self.apex_addrs(&apex, RecordType::A));
                    resp.additionals
                        .extend(self.apex_addrs(&apex, RecordType::AAAA));
                }
                RecordType::A | RecordType::AAAA => {
                    resp.answers.extend(self.apex_addrs(&apex, qtype));
                }
                _ => {}
            },
            Some(1) => match node_fqdn(qname, &cfg.apex).and_then(|f| lookup(&f)) {
                Some((v4, v6)) => {
                    let owner = qname.clone();
                    let ttl = cfg.node_ttl;
                    if matches!(qtype, RecordType::A | RecordType::ANY) {
                        resp.answers
                            .push(Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))));
                    }
                    if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
                        resp.answers
                            .push(Record::from_rdata(owner, ttl, RData::AAAA(AAAA(v6))));
                    }
                }
                None => resp.metadata.response_code = ResponseCode::NXDomain,
            },
            _ => resp.metadata.response_code = ResponseCode::NXDomain,
        }
        if resp.answers.is_empty() {
            // NODATA or NXDOMAIN: the SOA lets resolvers cache the negative answer (RFC 2308).
            let ttl = cfg.apex_ttl.min(cfg.soa.minimum);
            resp.authorities.push(self.soa_record(&apex, ttl));
        }
        resp
    }

    fn soa_record(&self, apex: &Name, ttl: u32) -> Record {
        Record::from_rdata(apex.clone(), ttl, RData::SOA(self.soa.clone()))
    }

    fn apex_addrs(&self, apex: &Name, family: RecordType) -> Vec<Record> {
        let ttl = self.config.apex_ttl;
        match family {
            RecordType::A => self
                .config
                .apex_v4
                .iter()
                .map(|&a| Record::from_rdata(apex.clone(), ttl, RData::A(A(a))))
                .collect(),
            _ => self
                .config
                .apex_v6
                .iter()
                .map(|&a| Record::from_rdata(apex.clone(), ttl, RData::AAAA(AAAA(a))))
                .collect(),
        }
    }
}

/// The DNS name of a canonical FQDN (always fully qualified).
fn dns_name(f: &Fqdn) -> Name {
    let mut name = Name::from_ascii(f.as_str()).unwrap_or_else(|_| Name::root());
    name.set_fqdn(true);
    name
}

/// A canonical FQDN from a DNS name, lowercased; `None` when a label is not LDH (such a name
/// cannot be a node's or a zone's).
fn fqdn_of(name: &Name) -> Option<Fqdn> {
    let mut s = String::with_capacity(name.len());
    for label in name.iter() {
        if !label
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return None;
        }
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    Fqdn::new(&s).ok()
}

/// The node FQDN `qname` names, if it is a valid name one label below `apex`.
fn node_fqdn(qname: &Name, apex: &Fqdn) -> Option<Fqdn> {
    let first = qname.iter().next()?;
    if !first
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return None;
    }
    let label = String::from_utf8_lossy(first).to_ascii_lowercase();
    Fqdn::new(&format!("{label}.{}", apex.as_str())).ok()
}

/// An SOA timer as the codec's signed field; checked at construction to fit.
fn timer(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// The fixed header fields read without the codec, so that a query the codec refuses can still
/// get its FORMERR.
#[derive(Clone, Copy, Debug)]
struct RawHeader {
    id: u16,
    flags: u16,
}

const QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const RD: u16 = 0x0100;
const RCODE_FORMERR: u16 = 1;
const RCODE_NOTIMP: u16 = 4;

enum Intake {
    /// Answer with the header alone and this RCODE.
    HeaderOnly(RawHeader, u16),
    /// A well-formed query with one question.
    Query(Message),
}

fn intake(query: &[u8]) -> Result<Intake, DnsDrop> {
    let Some(&[i0, i1, f0, f1, qd0, qd1, an0, an1, ns0, ns1, _, _]) = query.first_chunk() else {
        return Err(DnsDrop::TooShort);
    };
    let h = RawHeader {
        id: u16::from_be_bytes([i0, i1]),
        flags: u16::from_be_bytes([f0, f1]),
    };
    if h.flags & QR != 0 {
        return Err(DnsDrop::NotAQuery);
    }
    if h.flags & OPCODE_MASK != 0 {
        return Ok(Intake::HeaderOnly(h, RCODE_NOTIMP));
    }
    // Checked before decoding: the codec reserves memory for QDCOUNT questions.
    let counts = [[qd0, qd1], [an0, an1], [ns0, ns1]].map(u16::from_be_bytes);
    if counts != [1, 0, 0] {
        return Ok(Intake::HeaderOnly(h, RCODE_FORMERR));
    }
    match Message::from_vec(query) {
        Ok(m) if m.queries.len() == 1 => Ok(Intake::Query(m)),
        _ => Ok(Intake::HeaderOnly(h, RCODE_FORMERR)),
    }
}

/// A 12-byte answer: never larger than the query, so it amplifies nothing.
fn header_only_answer(h: &RawHeader, rcode: u16, out: &mut [u8]) -> Result<usize, DnsDrop> {
    let flags = QR | (h.flags & (OPCODE_MASK | RD)) | rcode;
    let [i0, i1] = h.id.to_be_bytes();
    let [f0, f1] = flags.to_be_bytes();
    let bytes = [i0, i1, f0, f1, 0, 0, 0, 0, 0, 0, 0, 0];
    let dst = out.get_mut(..bytes.len()).ok_or(DnsDrop::BufferTooSmall)?;
    dst.copy_from_slice(&bytes);
    Ok(bytes.len())
}

/// The largest answer to `req`: its EDNS(0) size (at least 512) or 512, at most ours and the
/// caller's buffer.
fn answer_limit(req: &Message, ours: u16, buf: usize) -> usize {
    let theirs = req
        .edns
        .as_ref()
        .map_or(MIN_UDP_PAYLOAD, |e| e.max_payload().max(MIN_UDP_PAYLOAD));
    usize::from(theirs.min(ours)).min(buf)
}

/// A response echoing the question, ID, RD and CD of `req`, with an OPT record if it had one.
fn response_skeleton(req: &Message, max_udp_payload: u16) -> Message {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.checking_disabled = req.metadata.checking_disabled;
    resp.queries.clone_from(&req.queries);
    if let Some(theirs) = &req.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(max_udp_payload);
        ours.set_dnssec_ok(theirs.flags().dnssec_ok);
        resp.edns = Some(ours);
    }
    resp
}

/// Encodes `resp` into `out`, at most `limit` bytes: without the additional section if that is
/// what it takes (RFC 2181 §9: no TC for additional data), otherwise with no record and TC.
fn emit(mut resp: Message, limit: usize, out: &mut [u8]) -> Result<usize, DnsDrop> {
    let mut wire = resp.to_vec().map_err(|_| DnsDrop::Encode)?;
    if wire.len() > limit && !resp.additionals.is_empty() {
        resp.additionals.clear();
        wire = resp.to_vec().map_err(|_| DnsDrop::Encode)?;
    }
    if wire.len() > limit {
        resp.answers.clear();
        resp.authorities.clear();
        resp.metadata.truncation = true;
        wire = resp.to_vec().map_err(|_| DnsDrop::Encode)?;
    }
    if wire.len() > limit {
        return Err(DnsDrop::BufferTooSmall);
    }
    let dst = out.get_mut(..wire.len()).ok_or(DnsDrop::BufferTooSmall)?;
    dst.copy_from_slice(&wire);
    Ok(wire.len())
}

// ---------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------

/// One zone of the DC directory (spec/01 §1.6), as discovery needs it. The directory is also
/// the list of zones that exist: a zone not in it is never looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryZone {
    pub zone: Fqdn,
    /// The DC's signaling addresses, used when DNS fails. The first one's port is also the
    /// port of the addresses DNS finds; with none, that port is [`DC_SIGNALING_PORT`].
    pub addrs: Vec<SocketAddr>,
}

/// Discovery's configuration and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The resolvers asked, in turn (a retransmission goes to the next one). None: the
    /// directory alone answers.
    pub resolvers: Vec<SocketAddr>,
    pub directory: Vec<DirectoryZone>,
    /// The port of addresses found by DNS when the directory entry has no address: 4281.
    pub default_port: u16,
    /// Transmissions of each query: 3.
    pub transmissions: u32,
    /// Between transmissions, and from the last one to giving up: 1 s.
    pub retry_interval: Duration,
    /// NS answers are cached for their TTL, at most this: 1 h (spec/07 §7.2).
    pub max_ns_ttl: Duration,
    /// Addresses are cached for their TTL, at most this: 1 day (only a bound on nonsense).
    pub max_address_ttl: Duration,
    /// After DNS failed for a zone, the directory answers without asking DNS this long: 30 s.
    pub failure_hold: Duration,
    /// UDP payload size advertised in queries: 1232.
    pub udp_payload: u16,
    /// Zones whose answers are cached: 1024 (the entry expiring first is forgotten).
    pub max_cached_zones: usize,
    /// Lookups under way at once: 64 (beyond, [`Lookup::Busy`]).
    pub max_pending: usize,
    /// Addresses kept per zone: 8.
    pub max_addrs_per_zone: usize,
    pub max_queued_transmits: usize,
    pub max_queued_events: usize,
}

impl DiscoveryConfig {
    /// The defaults of spec/05 §5.12 and spec/07 §7.2.
    pub fn new(resolvers: Vec<SocketAddr>, directory: Vec<DirectoryZone>) -> Self {
        DiscoveryConfig {
            resolvers,
            directory,
            default_port: DC_SIGNALING_PORT,
            transmissions: 3,
            retry_interval: Duration::from_secs(1),
            max_ns_ttl: Duration::from_secs(3600),
            max_address_ttl: Duration::from_secs(86_400),
            failure_hold: Duration::from_secs(30),
            udp_payload: DEFAULT_UDP_PAYLOAD,
            max_cached_zones: 1024,
            max_pending: 64,
            max_addrs_per_zone: 8,
            max_queued_transmits: 256,
            max_queued_events: 256,
        }
    }
}

/// Where a lookup's addresses came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSource {
    /// An answer that just arrived.
    FromDns,
    /// An earlier DNS answer, still within its TTL.
    FromCache,
    /// The directory, because DNS failed (now or within the failure hold) or no resolver is
    /// configured.
    FromDirectory,
}

/// The immediate result of [`DcDiscovery::lookup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Usable now; no event follows.
    Ready {
        addrs: Vec<SocketAddr>,
        source: AddrSource,
    },
    /// Queries are under way (started now or by an earlier lookup): one
    /// [`DiscoveryEvent`] for the zone follows.
    Pending,
    /// The zone is not in the directory: answer ERROR NotFound (§5.12 item 5).
    NotFound,
    /// DNS failed within the failure hold and the directory lists no address for the zone.
    Failed,
    /// Too many lookups under way; try again later (answer ERROR Unavailable).
    Busy,
}

/// The end of a lookup that returned [`Lookup::Pending`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoveryEvent {
    Resolved {
        zone: Fqdn,
        addrs: Vec<SocketAddr>,
        source: AddrSource,
    },
    /// DNS failed and the directory lists no address for the zone.
    Failed { zone: Fqdn },
}

/// One DNS query under way.
#[derive(Clone, Debug)]
struct DnsQuery {
    id: u16,
    qname: Name,
    qtype: RecordType,
    wire: Vec<u8>,
    sent_to: Vec<SocketAddr>,
    transmissions: u32,
    /// When to retransmit, or, after the last transmission, to give up.
    next: Time,
    done: bool,
}

impl DnsQuery {
    /// Whether `msg` answers this query: its ID and its question.
    fn answered_by(&self, msg: &Message) -> bool {
        msg.metadata.id == self.id
            && msg.queries.len() == 1
            && msg.queries.first().is_some_and(|q| {
                q.query_type() == self.qtype
                    && q.query_class() == DNSClass::IN
                    && q.name() == &self.qname
            })
    }
}

/// A lookup under way: the NS query, then (without glue) the A and AAAA queries.
#[derive(Clone, Debug)]
struct Pending {
    /// The NS target and the expiry of its NS record, once known.
    ns: Option<(Name, Time)>,
    queries: Vec<DnsQuery>,
    /// Addresses found so far, with their TTLs.
    found: Vec<(IpAddr, u32)>,
}

#[derive(Clone, Debug)]
enum Cached {
    Dns {
        target: Name,
        ns_expires: Time,
        addrs: Vec<IpAddr>,
        addrs_expires: Time,
    },
    /// DNS failed: the directory answers until then.
    Failed { until: Time },
}

impl Cached {
    /// When nothing in the entry is of use any more.
    fn expiry(&self) -> Time {
        match self {
            Cached::Dns {
                ns_expires,
                addrs_expires,
                ..
            } => (*ns_expires).max(*addrs_expires),
            Cached::Failed { until } => *until,
        }
    }
}

/// The client side of DC discovery (see the module documentation).
#[derive(Debug)]
pub struct DcDiscovery {
    config: DiscoveryConfig,
    directory: BTreeMap<Fqdn, Vec<SocketAddr>>,
    cache: BTreeMap<Fqdn, Cached>,
    pending: BTreeMap<Fqdn, Pending>,
    outbox: Outbox,
    events: VecDeque<DiscoveryEvent>,
    events_lost: u64,
    ignored: u64,
}

impl DcDiscovery {
    pub fn new(config: DiscoveryConfig) -> Result<Self, DnsConfigError> {
        for (what, v) in [
            ("transmissions", config.transmissions as usize),
            ("max_pending", config.max_pending),
            ("max_cached_zones", config.max_cached_zones),
            ("max_addrs_per_zone", config.max_addrs_per_zone),
            ("max_queued_transmits", config.max_queued_transmits),
            ("max_queued_events", config.max_queued_events),
        ] {
            if v == 0 {
                return Err(DnsConfigError::InvalidLimit(what));
            }
        }
        if config.udp_payload < MIN_UDP_PAYLOAD {
            return Err(DnsConfigError::InvalidPayloadSize(config.udp_payload));
        }
        let mut directory = BTreeMap::new();
        for entry in &config.directory {
            if directory
                .insert(entry.zone.clone(), entry.addrs.clone())
                .is_some()
            {
                return Err(DnsConfigError::DuplicateZone(entry.zone.clone()));
            }
        }
        Ok(DcDiscovery {
            outbox: Outbox::new(config.max_queued_transmits),
            directory,
            cache: BTreeMap::new(),
            pending: BTreeMap::new(),
            events: VecDeque::new(),
            events_lost: 0,
            ignored: 0,
            config,
        })
    }

    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }

    /// Datagrams ignored: not a DNS response, or not an answer to a query under way (wrong
    /// source, ID or question, or a late duplicate).
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// Events dropped because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// Lookups under way.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Zones with a cache entry (expired ones included until they are replaced or evicted).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The signaling addresses of `zone`'s DC: from the cache or the directory at once, or
    /// queries started and a [`DiscoveryEvent`] to come.
    pub fn lookup<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        zone: &Fqdn,
        rng: &mut R,
    ) -> Lookup {
        if !self.directory.contains_key(zone) {
            return Lookup::NotFound;
        }
        let mut ns_known = None;
        match self.cache.get(zone) {
            Some(Cached::Dns {
                target,
                ns_expires,
                addrs,
                addrs_expires,
            }) if *ns_expires > now => {
                if *addrs_expires > now && !addrs.is_empty() {
                    return Lookup::Ready {
                        addrs: self.with_port(zone, addrs),
                        source: AddrSource::FromCache,
                    };
                }
                ns_known = Some((target.clone(), *ns_expires));
            }
            Some(Cached::Failed { until }) if *until > now => return self.directory_answer(zone),
            _ => {}
        }
        if self.pending.contains_key(zone) {
            return Lookup::Pending;
        }
        if self.config.resolvers.is_empty() {
            return self.directory_answer(zone);
        }
        if self.pending.len() >= self.config.max_pending {
            return Lookup::Busy;
        }
        let mut p = Pending {
            ns: None,
            queries: Vec::new(),
            found: Vec::new(),
        };
        match ns_known {
            Some((target, expires)) => {
                self.start_address_queries(now, &mut p, target, expires, rng)
            }
            None => {
                let q = self.new_query(now, dns_name(zone), RecordType::NS, rng);
                p.queries.push(q);
            }
        }
        self.pending.insert(zone.clone(), p);
        Lookup::Pending
    }

    /// A datagram from `remote` arrived at `local`. Only answers to queries under way are
    /// used; anything else is counted in [`DcDiscovery::ignored`].
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        _local: SocketAddr,
        remote: SocketAddr,
        buf: &[u8],
        rng: &mut R,
    ) {
        if self.take_answer(now, remote, buf, rng).is_none() {
            self.ignored = self.ignored.saturating_add(1);
        }
    }

    /// Retransmits the queries whose interval has passed and gives up on those that are out of
    /// transmissions.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, _rng: &mut R) {
        let zones: Vec<Fqdn> = self.pending.keys().cloned().collect();
        for zone in zones {
            let Some(p) = self.pending.get_mut(&zone) else {
                continue;
            };
            for q in p.queries.iter_mut().filter(|q| !q.done && q.next <= now) {
                if q.transmissions < self.config.transmissions {
                    send(
                        &mut self.outbox,
                        &self.config.resolvers,
                        self.config.retry_interval,
                        q,
                        now,
                    );
                } else {
                    q.done = true;
                }
            }
            self.settle(now, &zone);
        }
    }

    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.outbox.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<DiscoveryEvent> {
        self.events.pop_front()
    }

    /// The earliest retransmission or give-up, and which it is.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        self.pending
            .values()
            .flat_map(|p| p.queries.iter())
            .filter(|q| !q.done)
            .min_by_key(|q| q.next)
            .map(|q| {
                let label = if q.transmissions < self.config.transmissions {
                    "dns query retransmission"
                } else {
                    "dns query give-up"
                };
                (q.next, label)
            })
    }

    fn take_answer<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        remote: SocketAddr,
        buf: &[u8],
        rng: &mut R,
    ) -> Option<()> {
        let msg = Message::from_vec(buf).ok()?;
        if msg.metadata.message_type != MessageType::Response {
            return None;
        }
        let (zone, idx) = self.pending.iter().find_map(|(zone, p)| {
            p.queries
                .iter()
                .position(|q| !q.done && q.sent_to.contains(&remote) && q.answered_by(&msg))
                .map(|i| (zone.clone(), i))
        })?;
        let max_ns_ttl = self.config.max_ns_ttl;
        let p = self.pending.get_mut(&zone)?;
        let q = p.queries.get_mut(idx)?;
        q.done = true;
        let qtype = q.qtype;
        let qname = q.qname.clone();
        let ok = msg.metadata.response_code == ResponseCode::NoError;
        if qtype == RecordType::NS {
            let Some(delegation) = ok.then(|| delegation(&msg, &qname)).flatten() else {
                self.settle(now, &zone);
                return Some(());
            };
            let ns_expires = now + ttl_capped(delegation.ttl, max_ns_ttl);
            if delegation.glue.is_empty() {
                let mut p = self.pending.remove(&zone)?;
                p.queries.clear();
                self.start_address_queries(now, &mut p, delegation.target, ns_expires, rng);
                self.pending.insert(zone, p);
            } else {
                p.ns = Some((delegation.target, ns_expires));
                p.found = delegation.glue;
                self.finish(now, &zone);
            }
        } else {
            if ok {
                p.found.extend(addresses(&msg.answers, &qname, qtype));
            }
            self.settle(now, &zone);
        }
        Some(())
    }

    /// Ends the lookup of `zone` if all its queries are done.
    fn settle(&mut self, now: Time, zone: &Fqdn) {
        if self
            .pending
            .get(zone)
            .is_some_and(|p| p.queries.iter().all(|q| q.done))
        {
            self.finish(now, zone);
        }
    }

    /// Ends the lookup of `zone`: with the addresses found, or the directory's.
    fn finish(&mut self, now: Time, zone: &Fqdn) {
        let Some(p) = self.pending.remove(zone) else {
            return;
        };
        let mut addrs: Vec<IpAddr> = Vec::new();
        let mut ttl = u32::MAX;
        for (ip, t) in p.found {
            if !addrs.contains(&ip) && addrs.len() < self.config.max_addrs_per_zone {
                addrs.push(ip);
                ttl = ttl.min(t);
            }
        }
        let event = match p.ns {
            Some((target, ns_expires)) if !addrs.is_empty() => {
                let event = DiscoveryEvent::Resolved {
                    zone: zone.clone(),
                    addrs: self.with_port(zone, &addrs),
                    source: AddrSource::FromDns,
                };
                let addrs_expires = now + ttl_capped(ttl, self.config.max_address_ttl);
                self.remember(
                    now,
                    zone,
                    Cached::Dns {
                        target,
                        ns_expires,
                        addrs,
                        addrs_expires,
                    },
                );
                event
            }
            _ => {
                let until = now + self.config.failure_hold;
                self.remember(now, zone, Cached::Failed { until });
                match self.directory_answer(zone) {
                    Lookup::Ready { addrs, source } => DiscoveryEvent::Resolved {
                        zone: zone.clone(),
                        addrs,
                        source,
                    },
                    _ => DiscoveryEvent::Failed { zone: zone.clone() },
                }
            }
        };
        if self.events.len() >= self.config.max_queued_events {
            self.events_lost = self.events_lost.saturating_add(1);
        } else {
            self.events.push_back(event);
        }
    }

    /// Caches `entry` for `zone`, making room by forgetting expired entries, then the one
    /// expiring first.
    fn remember(&mut self, now: Time, zone: &Fqdn, entry: Cached) {
        if !self.cache.contains_key(zone) && self.cache.len() >= self.config.max_cached_zones {
            self.cache.retain(|_, c| c.expiry() > now);
            if self.cache.len() >= self.config.max_cached_zones {
                let first = self
                    .cache
                    .iter()
                    .min_by_key(|(_, c)| c.expiry())
                    .map(|(z, _)| z.clone());
                if let Some(z) = first {
                    self.cache.remove(&z);
                }
            }
        }
        self.cache.insert(zone.clone(), entry);
    }

    fn directory_answer(&self, zone: &Fqdn) -> Lookup {
        match self.directory.get(zone) {
            None => Lookup::NotFound,
            Some(addrs) if addrs.is_empty() => Lookup::Failed,
            Some(addrs) => Lookup::Ready {
                addrs: addrs.clone(),
                source: AddrSource::FromDirectory,
            },
        }
    }

    /// DNS addresses as signaling addresses: the directory entry's port, or the default.
    fn with_port(&self, zone: &Fqdn, ips: &[IpAddr]) -> Vec<SocketAddr> {
        let port = self
            .directory
            .get(zone)
            .and_then(|a| a.first())
            .map_or(self.config.default_port, SocketAddr::port);
        ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect()
    }

    fn start_address_queries<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        p: &mut Pending,
        target: Name,
        ns_expires: Time,
        rng: &mut R,
    ) {
        let a = self.new_query(now, target.clone(), RecordType::A, rng);
        p.queries.push(a);
        let aaaa = self.new_query(now, target.clone(), RecordType::AAAA, rng);
        p.queries.push(aaaa);
        p.ns = Some((target, ns_expires));
    }

    /// A query with a fresh random ID, sent once.
    fn new_query<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        qname: Name,
        qtype: RecordType,
        rng: &mut R,
    ) -> DnsQuery {
        let id = self.fresh_id(rng);
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.queries.push(Query::query(qname.clone(), qtype));
        let mut edns = Edns::new();
        edns.set_max_payload(self.config.udp_payload);
        msg.edns = Some(edns);
        let mut q = DnsQuery {
            id,
            qname,
            qtype,
            // An encoding failure leaves an empty datagram, which the resolver ignores and
            // the query times out into the directory: no state depends on it.
            wire: msg.to_vec().unwrap_or_default(),
            sent_to: Vec::new(),
            transmissions: 0,
            next: now,
            done: false,
        };
        send(
            &mut self.outbox,
            &self.config.resolvers,
            self.config.retry_interval,
            &mut q,
            now,
        );
        q
    }

    /// A random ID that no query under way uses, so that an answer matches one query only
    /// (a few draws; a clash after them only costs the loser a timeout).
    fn fresh_id<R: RngCore + CryptoRng>(&self, rng: &mut R) -> u16 {
        let mut id = 0;
        for _ in 0..8 {
            let [a, b, _, _] = rng.next_u32().to_be_bytes();
            id = u16::from_be_bytes([a, b]);
            let in_use = self
                .pending
                .values()
                .flat_map(|p| p.queries.iter())
                .any(|q| q.id == id);
            if !in_use {
                break;
            }
        }
        id
    }
}

/// Sends `q` once more, to the next resolver in turn.
fn send(
    outbox: &mut Outbox,
    resolvers: &[SocketAddr],
    interval: Duration,
    q: &mut DnsQuery,
    now: Time,
) {
    let n = resolvers.len().max(1);
    let idx = usize::try_from(q.transmissions).unwrap_or(0) % n;
    if let Some(&dst) = resolvers.get(idx) {
        outbox.push(None, dst, q.wire.clone());
        if !q.sent_to.contains(&dst) {
            q.sent_to.push(dst);
        }
    }
    q.transmissions = q.transmissions.saturating_add(1);
    q.next = now + interval;
}

fn ttl_capped(ttl: u32, cap: Duration) -> Duration {
    Duration::from_secs(u64::from(ttl)).min(cap)
}

/// What an NS answer (or a parent's referral) says about a zone.
struct Delegation {
    target: Name,
    ttl: u32,
    glue: Vec<(IpAddr, u32)>,
}

/// The zone's NS records, from the answer section (a resolver's answer) or else the authority
/// section (a parent's referral), and the addresses of their targets in the additional section.
fn delegation(msg: &Message, zone: &Name) -> Option<Delegation> {
    let ns_of = |records: &[Record]| -> Vec<(Name, u32)> {
        records
            .iter()
            .filter(|r| &r.name == zone && r.dns_class == DNSClass::IN)
            .filter_map(|r| match &r.data {
                RData::NS(NS(target)) if !target.is_root() => Some((target.clone(), r.ttl)),
                _ => None,
            })
            .collect()
    };
    let mut ns = ns_of(&msg.answers);
    if ns.is_empty() {
        ns = ns_of(&msg.authorities);
    }
    let ttl = ns.iter().map(|(_, t)| *t).min()?;
    // Glue for any of the targets; the first target with glue is the one remembered.
    for (target, _) in &ns {
        let mut glue = addresses(&msg.additionals, target, RecordType::A);
        glue.extend(addresses(&msg.additionals, target, RecordType::AAAA));
        if !glue.is_empty() {
            return Some(Delegation {
                target: target.to_lowercase(),
                ttl,
                glue,
            });
        }
    }
    let (target, _) = ns.first()?;
    Some(Delegation {
        target: target.to_lowercase(),
        ttl,
        glue: Vec::new(),
    })
}

/// The `family` addresses of `owner` among `records`, with their TTLs.
fn addresses(records: &[Record], owner: &Name, family: RecordType) -> Vec<(IpAddr, u32)> {
    records
        .iter()
        .filter(|r| &r.name == owner && r.dns_class == DNSClass::IN)
        .filter_map(|r| match (&r.data, family) {
            (RData::A(A(ip)), RecordType::A) => Some((IpAddr::V4(*ip), r.ttl)),
            (RData::AAAA(AAAA(ip)), RecordType::AAAA) => Some((IpAddr::V6(*ip), r.ttl)),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Parent zone (for tests and the simulator)
// ---------------------------------------------------------------------------------------------

/// A tiny authoritative server for a parent zone that delegates child zones to their DCs: the
/// simulated parent zone of scenario tests, which DCs can use as their resolver.
///
/// * A question at or below a delegated child gets a referral: NOERROR without AA, the child's
///   NS record in the authority section, and glue (the name server's addresses) in the
///   additional section when the name server lies inside the child.
/// * A question about a host of the parent zone itself ([`ParentZone::host`], or a delegation's
///   name server outside its child) gets its A / AAAA records, authoritatively.
/// * The apex answers SOA and NS (the apex itself); other names are NXDOMAIN, names outside
///   the zone REFUSED, as [`ZoneAuthority`] does.
#[derive(Clone, Debug)]
pub struct ParentZone {
    apex: Fqdn,
    apex_name: Name,
    soa: SOA,
    ttl: u32,
    delegations: BTreeMap<Fqdn, Fqdn>,
    hosts: BTreeMap<Fqdn, (Vec<Ipv4Addr>, Vec<Ipv6Addr>)>,
}

impl ParentZone {
    /// An empty parent zone; every record gets `ttl` seconds.
    pub fn new(apex: Fqdn, ttl: u32) -> Self {
        let apex_name = dns_name(&apex);
        let rname = Fqdn::new(&format!("hostmaster.{}", apex.as_str())).unwrap_or(apex.clone());
        let soa = SOA::new(
            apex_name.clone(),
            dns_name(&rname),
            1,
            3600,
            600,
            604_800,
            ttl,
        );
        ParentZone {
            apex,
            apex_name,
            soa,
            ttl: ttl.min(MAX_TTL),
            delegations: BTreeMap::new(),
            hosts: BTreeMap::new(),
        }
    }

    /// Delegates `child` to the name server `ns`, whose addresses are `v4` and `v6` (the glue,
    /// when `ns` lies inside `child`; otherwise `ns` becomes a host of this zone, or of no zone
    /// this server answers for if it lies outside it too).
    pub fn delegate(
        &mut self,
        child: Fqdn,
        ns: Fqdn,
        v4: Vec<Ipv4Addr>,
        v6: Vec<Ipv6Addr>,
    ) -> Result<(), DnsConfigError> {
        if child == self.apex || !child.is_within(&self.apex) {
            return Err(DnsConfigError::OutsideZone(child));
        }
        if self.delegations.contains_key(&child) {
            return Err(DnsConfigError::DuplicateZone(child));
        }
        self.delegations.insert(child, ns.clone());
        self.hosts.insert(ns, (v4, v6));
        Ok(())
    }

    /// Adds (or replaces) a host of the zone with its addresses.
    pub fn host(&mut self, name: Fqdn, v4: Vec<Ipv4Addr>, v6: Vec<Ipv6Addr>) {
        self.hosts.insert(name, (v4, v6));
    }

    /// Answers `query` into `out` (truncating as [`ZoneAuthority::answer`] does).
    pub fn answer(&self, query: &[u8], out: &mut [u8]) -> Result<usize, DnsDrop> {
        let req = match intake(query)? {
            Intake::HeaderOnly(h, rcode) => return header_only_answer(&h, rcode, out),
            Intake::Query(req) => req,
        };
        let limit = answer_limit(&req, DEFAULT_UDP_PAYLOAD, out.len());
        emit(self.respond(&req), limit, out)
    }

    fn respond(&self, req: &Message) -> Message {
        let mut resp = response_skeleton(req, DEFAULT_UDP_PAYLOAD);
        let Some(q) = req.queries.first() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp;
        };
        let qname = q.name();
        if q.query_class() != DNSClass::IN || !self.apex_name.zone_of(qname) {
            resp.metadata.response_code = ResponseCode::Refused;
            return resp;
        }
        let fqdn = fqdn_of(qname);
        let child = fqdn.as_ref().and_then(|f| {
            self.delegations
                .iter()
                .find(|(child, _)| f.is_within(child))
        });
        if let Some((child, ns)) = child {
            let child_name = dns_name(child);
            let ns_name = dns_name(ns);
            resp.authorities.push(Record::from_rdata(
                child_name,
                self.ttl,
                RData::NS(NS(ns_name.clone())),
            ));
            if ns.is_within(child) {
                resp.additionals
                    .extend(self.host_records(ns, &ns_name, None));
            }
            return resp;
        }
        resp.metadata.authoritative = true;
        let qtype = q.query_type();
        let apex_asked = qname.trim_to(self.apex_name.iter().count());
        if fqdn.as_ref() == Some(&self.apex) {
            match qtype {
                RecordType::SOA => resp.answers.push(Record::from_rdata(
                    apex_asked,
                    self.ttl,
                    RData::SOA(self.soa.clone()),
                )),
                RecordType::NS => resp.answers.push(Record::from_rdata(
                    apex_asked.clone(),
                    self.ttl,
                    RData::NS(NS(apex_asked)),
                )),
                _ => {}
            }
        } else if let Some(host) = fqdn.as_ref().filter(|f| self.hosts.contains_key(*f)) {
            resp.answers
                .extend(self.host_records(host, qname, Some(qtype)));
        } else {
            resp.metadata.response_code = ResponseCode::NXDomain;
        }
        if resp.answers.is_empty() {
            let apex = qname.trim_to(self.apex_name.iter().count());
            resp.authorities.push(Record::from_rdata(
                apex,
                self.ttl,
                RData::SOA(self.soa.clone()),
            ));
        }
        resp
    }

    /// The A and AAAA records of `host` under `owner`, of one type if `only` says so.
    fn host_records(&self, host: &Fqdn, owner: &Name, only: Option<RecordType>) -> Vec<Record> {
        let Some((v4, v6)) = self.hosts.get(host) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        if only.is_none_or(|t| t == RecordType::A) {
            records.extend(
                v4.iter()
                    .map(|&a| Record::from_rdata(owner.clone(), self.ttl, RData::A(A(a)))),
            );
        }
        if only.is_none_or(|t| t == RecordType::AAAA) {
            records.extend(
                v6.iter()
                    .map(|&a| Record::from_rdata(owner.clone(), self.ttl, RData::AAAA(AAAA(a)))),
            );
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    fn fqdn(s: &str) -> Fqdn {
        Fqdn::new(s).unwrap()
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    const DC_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const DC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const MN_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 2);
    const MN_V6: Ipv6Addr = Ipv6Addr::new(0xfd4e, 0x544d, 0, 1, 0, 0, 0, 2);

    fn authority() -> ZoneAuthority {
        ZoneAuthority::new(ZoneConfig::new(
            fqdn("dc1.example"),
            vec![DC_V4],
            vec![DC_V6],
        ))
        .unwrap()
    }

    /// The DC's registry as the DNS sees it: `mn` is visible to everyone.
    fn registry(f: &Fqdn) -> Option<(Ipv4Addr, Ipv6Addr)> {
        (f.as_str() == "mn.dc1.example").then_some((MN_V4, MN_V6))
    }

    /// A query for `qname` (as spelled) and `qtype`, with an OPT record of that size if any.
    fn query(id: u16, qname: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.queries.push(Query::query(name(qname), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.edns = Some(e);
        }
        m.to_vec().unwrap()
    }

    fn ask(auth: &ZoneAuthority, q: &[u8]) -> (Vec<u8>, Message) {
        let mut out = [0u8; 1500];
        let n = auth.answer(q, registry, &mut out).unwrap();
        let wire = out[..n].to_vec();
        let msg = Message::from_vec(&wire).unwrap();
        (wire, msg)
    }

    fn ask_type(qname: &str, qtype: RecordType) -> Message {
        ask(&authority(), &query(7, qname, qtype, None)).1
    }

    fn rdata(records: &[Record]) -> Vec<RData> {
        records.iter().map(|r| r.data.clone()).collect()
    }

    /// NOERROR or NXDOMAIN with no answer and the zone's SOA (TTL 300) in the authority section.
    fn assert_negative(m: &Message, rcode: ResponseCode) {
        assert_eq!(m.metadata.response_code, rcode);
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        let soa = &m.authorities[0];
        assert_eq!(soa.name, name("dc1.example."));
        assert_eq!(soa.ttl, 300, "negative TTL = min(SOA TTL, MINIMUM)");
        assert!(matches!(soa.data, RData::SOA(_)));
    }

    #[test]
    fn soa_at_the_apex_is_the_configured_soa() {
        let m = ask_type("dc1.example.", RecordType::SOA);
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert!(m.metadata.recursion_desired, "RD is copied");
        assert!(!m.metadata.recursion_available, "not a recursive resolver");
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, 3600);
        let RData::SOA(soa) = &m.answers[0].data else {
            panic!("not an SOA: {:?}", m.answers[0]);
        };
        assert_eq!(soa.mname, name("dc1.example."));
        assert_eq!(soa.rname, name("hostmaster.dc1.example."));
        assert_eq!(
            (soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum),
            (1, 3600, 600, 604_800, 300)
        );
        assert!(m.authorities.is_empty() && m.additionals.is_empty());
    }

    #[test]
    fn ns_at_the_apex_is_the_apex_itself_with_its_addresses() {
        let m = ask_type("dc1.example.", RecordType::NS);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(rdata(&m.answers), vec![RData::NS(NS(name("dc1.example.")))]);
        assert_eq!(m.answers[0].ttl, 3600);
        assert_eq!(
            rdata(&m.additionals),
            vec![RData::A(A(DC_V4)), RData::AAAA(AAAA(DC_V6))]
        );
    }

    #[test]
    fn apex_addresses_are_the_dcs_real_addresses() {
        let m = ask_type("dc1.example.", RecordType::A);
        assert_eq!(rdata(&m.answers), vec![RData::A(A(DC_V4))]);
        assert_eq!(m.answers[0].ttl, 3600);
        let m = ask_type("dc1.example.", RecordType::AAAA);
        assert_eq!(rdata(&m.answers), vec![RData::AAAA(AAAA(DC_V6))]);
        assert!(m.metadata.authoritative);
        // An IPv4-only DC has no AAAA: no data, not an error.
        let v4_only =
            ZoneAuthority::new(ZoneConfig::new(fqdn("dc1.example"), vec![DC_V4], vec![])).unwrap();
        let (_, m) = ask(&v4_only, &query(1, "dc1.example.", RecordType::AAAA, None));
        assert_negative(&m, ResponseCode::NoError);
    }

    #[test]
    fn a_node_name_answers_its_virtual_addresses() {
        let m = ask_type("mn.dc1.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(rdata(&m.answers), vec![RData::A(A(MN_V4))]);
        assert_eq!(m.answers[0].ttl, 300);
        assert_eq!(m.answers[0].name, name("mn.dc1.example."));
        assert!(m.authorities.is_empty() && m.additionals.is_empty());
        let m = ask_type("mn.dc1.example.", RecordType::AAAA);
        assert_eq!(rdata(&m.answers), vec![RData::AAAA(AAAA(MN_V6))]);
        let m = ask_type("mn.dc1.example.", RecordType::ANY);
        assert_eq!(
            rdata(&m.answers),
            vec![RData::A(A(MN_V4)), RData::AAAA(AAAA(MN_V6))]
        );
    }

    #[test]
    fn another_type_at_an_existing_name_is_noerror_without_data() {
        for (qname, qtype) in [
            ("mn.dc1.example.", RecordType::MX),
            ("mn.dc1.example.", RecordType::TXT),
            ("mn.dc1.example.", RecordType::NS),
            ("dc1.example.", RecordType::TXT),
            ("dc1.example.", RecordType::CNAME),
        ] {
            let m = ask_type(qname, qtype);
            assert_negative(&m, ResponseCode::NoError);
        }
    }

    #[test]
    fn a_missing_name_in_the_zone_is_nxdomain_with_the_soa() {
        for qname in [
            "absent.dc1.example.",
            "x.mn.dc1.example.",
            "rs1.sub.dc1.example.",
        ] {
            for qtype in [RecordType::A, RecordType::AAAA, RecordType::MX] {
                let m = ask_type(qname, qtype);
                assert_negative(&m, ResponseCode::NXDomain);
            }
        }
        // A label that is not LDH can name no node: missing, and the registry is not asked.
        let asked = RefCell::new(0);
        let mut m = Message::new(3, MessageType::Query, OpCode::Query);
        let odd = Name::from_labels(vec![&b"a_b"[..], b"dc1", b"example"]).unwrap();
        m.queries.push(Query::query(odd, RecordType::A));
        let mut out = [0u8; 512];
        let n = authority()
            .answer(
                &m.to_vec().unwrap(),
                |f| {
                    *asked.borrow_mut() += 1;
                    registry(f)
                },
                &mut out,
            )
            .unwrap();
        assert_negative(
            &Message::from_vec(&out[..n]).unwrap(),
            ResponseCode::NXDomain,
        );
        assert_eq!(*asked.borrow(), 0);
    }

    #[test]
    fn a_name_outside_the_zone_is_refused() {
        for qname in [
            "example.",
            "dc2.example.",
            "mn.dc2.example.",
            "xdc1.example.",
            "dc1.example.com.",
            ".",
        ] {
            let m = ask_type(qname, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{qname}");
            assert!(!m.metadata.authoritative);
            assert!(m.answers.is_empty() && m.authorities.is_empty());
            assert!(m.additionals.is_empty());
            assert_eq!(m.queries.len(), 1);
        }
        // Not the IN class, and zone transfers, are refused too.
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        let mut q = Query::query(name("mn.dc1.example."), RecordType::A);
        q.set_query_class(DNSClass::CH);
        m.queries.push(q);
        let (_, r) = ask(&authority(), &m.to_vec().unwrap());
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        let m = ask_type("dc1.example.", RecordType::AXFR);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    /// The registry knows `hidden`; the closure hides it when `visible` is false.
    fn with_hidden(visible: bool) -> impl Fn(&Fqdn) -> Option<(Ipv4Addr, Ipv6Addr)> {
        move |f: &Fqdn| match f.as_str() {
            "hidden.dc1.example" if visible => Some((MN_V4, MN_V6)),
            _ => registry(f),
        }
    }

    #[test]
    fn a_hidden_node_gets_exactly_the_answer_of_a_missing_name() {
        let auth = authority();
        let empty = |_: &Fqdn| None;
        for qtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::ANY,
            RecordType::MX,
        ] {
            for edns in [None, Some(1232)] {
                let mut hidden = [0u8; 1232];
                let mut missing = [0u8; 1232];
                let mut shown = [0u8; 1232];
                let q1 = query(0x1111, "Hidden.dc1.example.", qtype, edns);
                let q2 = query(0x2222, "Hidden.dc1.example.", qtype, edns);
                let h = auth.answer(&q1, with_hidden(false), &mut hidden).unwrap();
                let m = auth.answer(&q2, empty, &mut missing).unwrap();
                let s = auth.answer(&q1, with_hidden(true), &mut shown).unwrap();
                assert_eq!(hidden[..2], [0x11, 0x11]);
                assert_eq!(missing[..2], [0x22, 0x22]);
                assert_eq!(hidden[2..h], missing[2..m], "{qtype} {edns:?}");
                // ...and the test can tell: the visible node's answer differs.
                assert_ne!(hidden[2..h], shown[2..s]);
            }
        }
    }

    #[test]
    fn names_match_whatever_their_case_and_the_question_is_echoed_as_asked() {
        let seen = RefCell::new(Vec::new());
        let mut out = [0u8; 512];
        let q = query(5, "mN.Dc1.EXAMPLE.", RecordType::A, None);
        let n = authority()
            .answer(
                &q,
                |f| {
                    seen.borrow_mut().push(f.clone());
                    registry(f)
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(*seen.borrow(), vec![fqdn("mn.dc1.example")]);
        let m = Message::from_vec(&out[..n]).unwrap();
        assert_eq!(rdata(&m.answers), vec![RData::A(A(MN_V4))]);
        assert_eq!(m.queries[0].name().to_ascii(), "mN.Dc1.EXAMPLE.");
        // The question's bytes come back untouched.
        assert_eq!(out[12..12 + q.len() - 12], q[12..]);
        let m = ask_type("DC1.Example.", RecordType::SOA);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].name.to_ascii(), "DC1.Example.");
    }

    #[test]
    fn edns_is_answered_with_our_size_and_the_requesters_size_is_honoured() {
        // A long apex and eight addresses per family: the NS answer with its additional data
        // is larger than 512 bytes and smaller than 1232.
        let apex = fqdn(&format!("{}.{}.example", "a".repeat(60), "b".repeat(60)));
        let mut cfg = ZoneConfig::new(
            apex.clone(),
            (1..=8).map(|i| Ipv4Addr::new(192, 0, 2, i)).collect(),
            (1..=8)
                .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i))
                .collect(),
        );
        cfg.max_udp_payload = 1232;
        let auth = ZoneAuthority::new(cfg).unwrap();
        let qname = format!("{}.", apex.as_str());
        let full = {
            let (w, m) = ask(&auth, &query(1, &qname, RecordType::NS, Some(4096)));
            assert_eq!(m.additionals.len(), 16);
            assert!(!m.metadata.truncation);
            let opt = m.edns.as_ref().unwrap();
            assert_eq!(opt.max_payload(), 1232, "we advertise our own size");
            assert_eq!(opt.version(), 0);
            w.len()
        };
        assert!(full > 512 && full <= 1232, "{full}");
        // Without EDNS, 512: the additional section goes, without TC (RFC 2181 §9).
        let (w, m) = ask(&auth, &query(1, &qname, RecordType::NS, None));
        assert!(w.len() <= 512);
        assert!(m.edns.is_none(), "no OPT in answer to a query without one");
        assert_eq!(m.answers.len(), 1);
        assert!(m.additionals.is_empty());
        assert!(!m.metadata.truncation);
        // With EDNS at exactly the full size it all fits; one byte less and it does not.
        let (w, m) = ask(&auth, &query(1, &qname, RecordType::NS, Some(full as u16)));
        assert_eq!((w.len(), m.additionals.len()), (full, 16));
        let (w, m) = ask(
            &auth,
            &query(1, &qname, RecordType::NS, Some(full as u16 - 1)),
        );
        assert!(w.len() < full && m.additionals.is_empty());
        // A size below 512 counts as 512 (RFC 6891).
        let (w, _) = ask(&auth, &query(1, &qname, RecordType::NS, Some(100)));
        assert!(w.len() > 100 && w.len() <= 512);
    }

    #[test]
    fn an_answer_too_large_is_truncated_with_tc() {
        // An SOA with two long names is larger than 512 bytes.
        let mut cfg = ZoneConfig::new(fqdn("dc1.example"), vec![DC_V4], vec![]);
        let long = |c: &str| {
            fqdn(&format!(
                "{}.{}.{}.{}",
                c.repeat(63),
                c.repeat(63),
                c.repeat(63),
                c.repeat(50)
            ))
        };
        cfg.soa.mname = long("m");
        cfg.soa.rname = long("r");
        let auth = ZoneAuthority::new(cfg).unwrap();
        let (w, m) = ask(
            &auth,
            &query(4, "dc1.example.", RecordType::SOA, Some(1232)),
        );
        assert!(w.len() > 512 && !m.metadata.truncation && m.answers.len() == 1);
        for q in [
            query(4, "dc1.example.", RecordType::SOA, None),
            query(4, "dc1.example.", RecordType::SOA, Some(512)),
        ] {
            let (w, m) = ask(&auth, &q);
            assert!(w.len() <= 512);
            assert!(m.metadata.truncation);
            assert!(m.answers.is_empty() && m.authorities.is_empty());
            assert_eq!(m.queries.len(), 1, "the question stays");
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        }
        // The caller's buffer bounds the answer too.
        let mut small = [0u8; 40];
        let q = query(4, "mn.dc1.example.", RecordType::AAAA, None);
        let n = authority().answer(&q, registry, &mut small).unwrap();
        let m = Message::from_vec(&small[..n]).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty());
        assert_eq!(
            authority().answer(&q, registry, &mut [0u8; 20]),
            Err(DnsDrop::BufferTooSmall)
        );
    }

    #[test]
    fn an_edns_version_above_zero_is_badvers() {
        let mut m = Message::new(2, MessageType::Query, OpCode::Query);
        m.queries
            .push(Query::query(name("mn.dc1.example."), RecordType::A));
        let mut e = Edns::new();
        e.set_version(1);
        m.edns = Some(e);
        let (_, r) = ask(&authority(), &m.to_vec().unwrap());
        // 16 is BADVERS with an OPT record (the codec names it after BADSIG, which shares it).
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert_eq!(r.edns.as_ref().unwrap().version(), 0);
        assert!(r.answers.is_empty());
    }

    fn header_only(out: &[u8]) -> (u16, u16) {
        assert_eq!(out.len(), DNS_HEADER_LEN);
        assert_eq!(out[4..], [0u8; 8], "no section");
        (
            u16::from_be_bytes([out[0], out[1]]),
            u16::from_be_bytes([out[2], out[3]]),
        )
    }

    #[test]
    fn malformed_queries_get_formerr_or_are_dropped() {
        let auth = authority();
        let good = query(0xabcd, "mn.dc1.example.", RecordType::A, None);
        let mut out = [0u8; 512];
        let mut formerr = |q: &[u8]| {
            let n = auth.answer(q, registry, &mut out).unwrap();
            let (id, flags) = header_only(&out[..n]);
            assert_eq!(id, 0xabcd);
            assert_eq!(flags & QR, QR);
            assert_eq!(flags & RD, RD, "RD copied");
            flags & 0x000f
        };
        // QDCOUNT 0 and 2, ANCOUNT 1, NSCOUNT 1, a question cut short, a label past the end.
        for (at, v) in [(5, 0u8), (5, 2), (7, 1), (9, 1)] {
            let mut q = good.clone();
            q[at] = v;
            assert_eq!(formerr(&q), RCODE_FORMERR, "byte {at} = {v}");
        }
        assert_eq!(formerr(&good[..good.len() - 3]), RCODE_FORMERR);
        let mut q = good.clone();
        q[12] = 60;
        assert_eq!(formerr(&q), RCODE_FORMERR);
        assert_eq!(formerr(&good[..DNS_HEADER_LEN]), RCODE_FORMERR);
        // Two OPT records (RFC 6891 §6.1.1).
        let mut q = query(0xabcd, "mn.dc1.example.", RecordType::A, Some(1232));
        let opt = q[q.len() - 11..].to_vec();
        q.extend_from_slice(&opt);
        q[11] = 2;
        assert_eq!(formerr(&q), RCODE_FORMERR);
        // Another opcode (NOTIFY): NOTIMP, opcode echoed.
        let mut q = good.clone();
        q[2] |= 4 << 3;
        let n = auth.answer(&q, registry, &mut out).unwrap();
        let (_, flags) = header_only(&out[..n]);
        assert_eq!(flags & 0x000f, RCODE_NOTIMP);
        assert_eq!(flags & OPCODE_MASK, 4 << 11);
        // Fewer than 12 bytes, or a response: no answer at all.
        assert_eq!(
            auth.answer(&good[..11], registry, &mut out),
            Err(DnsDrop::TooShort)
        );
        assert_eq!(auth.answer(&[], registry, &mut out), Err(DnsDrop::TooShort));
        let mut r = good.clone();
        r[2] |= 0x80;
        assert_eq!(auth.answer(&r, registry, &mut out), Err(DnsDrop::NotAQuery));
    }

    #[test]
    fn random_and_mutated_datagrams_never_panic_nor_outgrow_the_buffer() {
        let auth = authority();
        let mut rng = ChaCha8Rng::seed_from_u64(53);
        let seeds = [
            query(1, "mn.dc1.example.", RecordType::A, None),
            query(1, "dc1.example.", RecordType::NS, Some(1232)),
            query(1, "x.dc1.example.", RecordType::SOA, Some(4096)),
        ];
        let mut out = [0u8; 1232];
        let mut answered = 0;
        for i in 0..30_000u32 {
            let mut buf = if i % 3 == 0 {
                let len = (rng.next_u32() % 300) as usize;
                let mut b = vec![0u8; len];
                rng.fill_bytes(&mut b);
                // Mostly queries, so that the codec gets to read them.
                if let Some(f) = b.get_mut(2) {
                    *f &= 0x7f;
                }
                b
            } else {
                seeds[(i % 3) as usize].clone()
            };
            let flips = 1 + rng.next_u32() % 4;
            for _ in 0..flips {
                if buf.is_empty() {
                    break;
                }
                let at = rng.next_u32() as usize % buf.len();
                buf[at] = rng.next_u32() as u8;
            }
            if let Ok(n) = auth.answer(&buf, registry, &mut out) {
                assert!(n <= out.len());
                answered += 1;
            }
        }
        assert!(
            answered > 10_000,
            "the mutations mostly reach the answer path"
        );
    }

    #[test]
    fn answers_are_rate_limited_per_client_prefix() {
        let mut cfg = ZoneConfig::new(fqdn("dc1.example"), vec![DC_V4], vec![]);
        cfg.responses_per_second = 3;
        let mut auth = ZoneAuthority::new(cfg).unwrap();
        let q = query(1, "mn.dc1.example.", RecordType::A, None);
        let mut out = [0u8; 512];
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let same_24: IpAddr = "198.51.100.200".parse().unwrap();
        let other: IpAddr = "203.0.113.7".parse().unwrap();
        let t = Time::from_secs(10);
        for _ in 0..3 {
            assert!(auth.answer_from(t, a, &q, registry, &mut out).is_ok());
        }
        assert_eq!(
            auth.answer_from(t, same_24, &q, registry, &mut out),
            Err(DnsDrop::RateLimited)
        );
        assert!(auth.answer_from(t, other, &q, registry, &mut out).is_ok());
        let later = t + Duration::from_secs(1);
        assert!(auth.answer_from(later, a, &q, registry, &mut out).is_ok());
    }

    #[test]
    fn configurations_out_of_range_are_refused() {
        let base = ZoneConfig::new(fqdn("dc1.example"), vec![DC_V4], vec![]);
        let mut c = base.clone();
        c.node_ttl = 1 << 31;
        assert_eq!(
            ZoneAuthority::new(c).err(),
            Some(DnsConfigError::InvalidTtl("node_ttl"))
        );
        let mut c = base.clone();
        c.max_udp_payload = 511;
        assert_eq!(
            ZoneAuthority::new(c).err(),
            Some(DnsConfigError::InvalidPayloadSize(511))
        );
        let mut c = base;
        c.apex_v4 = vec![DC_V4; 9];
        assert_eq!(
            ZoneAuthority::new(c).err(),
            Some(DnsConfigError::TooManyAddresses)
        );
    }

    // --- the parent zone ----------------------------------------------------------------------

    const RESOLVER: SocketAddr =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 53)), DNS_PORT);
    const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 40000);
    const DC2_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    const DC2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
    const DC3_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
    const DC3_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 3);

    /// `example` delegating `dc2.example` to itself (glue) and `dc3.example` to `ns3.example`,
    /// a host of the parent (no glue).
    fn parent() -> ParentZone {
        let mut p = ParentZone::new(fqdn("example"), 600);
        p.delegate(
            fqdn("dc2.example"),
            fqdn("dc2.example"),
            vec![DC2_V4],
            vec![DC2_V6],
        )
        .unwrap();
        p.delegate(
            fqdn("dc3.example"),
            fqdn("ns3.example"),
            vec![DC3_V4],
            vec![DC3_V6],
        )
        .unwrap();
        p.delegate(
            fqdn("stray.example"),
            fqdn("stray.example"),
            vec![DC2_V4],
            vec![],
        )
        .unwrap();
        p
    }

    #[test]
    fn the_parent_refers_child_zones_with_glue_and_answers_its_own_hosts() {
        let p = parent();
        let mut out = [0u8; 1232];
        let mut ask_parent = |qname: &str, qtype| {
            let n = p.answer(&query(8, qname, qtype, None), &mut out).unwrap();
            Message::from_vec(&out[..n]).unwrap()
        };
        let m = ask_parent("DC2.example.", RecordType::NS);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(!m.metadata.authoritative, "a referral is not authoritative");
        assert!(m.answers.is_empty());
        assert_eq!(
            rdata(&m.authorities),
            vec![RData::NS(NS(name("dc2.example.")))]
        );
        assert_eq!(
            rdata(&m.additionals),
            vec![RData::A(A(DC2_V4)), RData::AAAA(AAAA(DC2_V6))]
        );
        // Below the child: the same referral.
        let m = ask_parent("mn.dc2.example.", RecordType::A);
        assert_eq!(m.authorities.len(), 1);
        // Out-of-child name server: no glue, but the parent answers for it.
        let m = ask_parent("dc3.example.", RecordType::NS);
        assert_eq!(
            rdata(&m.authorities),
            vec![RData::NS(NS(name("ns3.example.")))]
        );
        assert!(m.additionals.is_empty());
        let m = ask_parent("ns3.example.", RecordType::AAAA);
        assert!(m.metadata.authoritative);
        assert_eq!(rdata(&m.answers), vec![RData::AAAA(AAAA(DC3_V6))]);
        let m = ask_parent("nowhere.example.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities.len(), 1);
        let m = ask_parent("example.", RecordType::SOA);
        assert_eq!(m.answers.len(), 1);
        let m = ask_parent("example.org.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        let mut p2 = parent();
        assert_eq!(
            p2.delegate(fqdn("dc2.example"), fqdn("x.example"), vec![], vec![]),
            Err(DnsConfigError::DuplicateZone(fqdn("dc2.example")))
        );
        assert_eq!(
            p2.delegate(fqdn("dc9.other"), fqdn("x.other"), vec![], vec![]),
            Err(DnsConfigError::OutsideZone(fqdn("dc9.other")))
        );
    }

    // --- discovery ----------------------------------------------------------------------------

    fn directory() -> Vec<DirectoryZone> {
        vec![
            DirectoryZone {
                zone: fqdn("dc2.example"),
                addrs: vec![SocketAddr::new(IpAddr::V4(DC2_V4), 4281)],
            },
            DirectoryZone {
                zone: fqdn("dc3.example"),
                addrs: vec![SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)),
                    5000,
                )],
            },
            DirectoryZone {
                zone: fqdn("dc4.example"),
                addrs: vec![],
            },
        ]
    }

    fn discovery(resolvers: Vec<SocketAddr>) -> DcDiscovery {
        DcDiscovery::new(DiscoveryConfig::new(resolvers, directory())).unwrap()
    }

    /// Everything discovery wants to send: (destination, datagram).
    fn drain(d: &mut DcDiscovery, now: Time) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut buf = [0u8; 1500];
        let mut sent = Vec::new();
        while let Some(t) = d.poll_transmit(now, &mut buf) {
            assert_eq!(t.src, None);
            sent.push((t.dst, buf[..t.len].to_vec()));
        }
        sent
    }

    fn events(d: &mut DcDiscovery) -> Vec<DiscoveryEvent> {
        std::iter::from_fn(|| d.poll_event()).collect()
    }

    /// Runs the exchange with `p` as the resolver until nothing is sent; returns the queries
    /// sent, as (type, name).
    fn run(
        d: &mut DcDiscovery,
        p: &ParentZone,
        now: Time,
        rng: &mut ChaCha8Rng,
    ) -> Vec<(RecordType, String)> {
        let mut asked = Vec::new();
        loop {
            let sent = drain(d, now);
            if sent.is_empty() {
                return asked;
            }
            for (dst, q) in sent {
                assert_eq!(dst, RESOLVER);
                let m = Message::from_vec(&q).unwrap();
                assert!(m.metadata.recursion_desired);
                assert_eq!(m.edns.as_ref().unwrap().max_payload(), 1232);
                asked.push((m.queries[0].query_type(), m.queries[0].name().to_ascii()));
                let mut out = [0u8; 1232];
                let n = p.answer(&q, &mut out).unwrap();
                d.handle_datagram(now, LOCAL, RESOLVER, &out[..n], rng);
            }
        }
    }

    fn resolved(zone: &str, addrs: Vec<SocketAddr>, source: AddrSource) -> DiscoveryEvent {
        DiscoveryEvent::Resolved {
            zone: fqdn(zone),
            addrs,
            source,
        }
    }

    fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
        SocketAddr::new(ip.into(), port)
    }

    #[test]
    fn glue_in_the_additional_section_resolves_in_two_trips() {
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let t = Time::from_secs(5);
        assert_eq!(d.lookup(t, &fqdn("dc2.example"), &mut rng), Lookup::Pending);
        assert_eq!(d.poll_timeout().unwrap().0, t + Duration::from_secs(1));
        let asked = run(&mut d, &parent(), t, &mut rng);
        assert_eq!(asked, vec![(RecordType::NS, "dc2.example.".to_string())]);
        assert_eq!(
            events(&mut d),
            vec![resolved(
                "dc2.example",
                vec![sa(DC2_V4, 4281), sa(DC2_V6, 4281)],
                AddrSource::FromDns
            )]
        );
        assert_eq!(d.pending(), 0);
        assert_eq!(d.poll_timeout(), None);
        assert_eq!(d.ignored(), 0);
    }

    #[test]
    fn without_glue_the_ns_target_is_resolved_by_a_and_aaaa_in_parallel() {
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let t = Time::from_secs(5);
        assert_eq!(d.lookup(t, &fqdn("dc3.example"), &mut rng), Lookup::Pending);
        // First round: the NS query alone.
        let sent = drain(&mut d, t);
        assert_eq!(sent.len(), 1);
        let mut out = [0u8; 1232];
        let n = parent().answer(&sent[0].1, &mut out).unwrap();
        d.handle_datagram(t, LOCAL, RESOLVER, &out[..n], &mut rng);
        assert!(events(&mut d).is_empty());
        // Second round: A and AAAA together, for the NS target.
        let sent = drain(&mut d, t);
        let asked: BTreeSet<(u16, String)> = sent
            .iter()
            .map(|(_, q)| {
                let m = Message::from_vec(q).unwrap();
                (
                    u16::from(m.queries[0].query_type()),
                    m.queries[0].name().to_ascii(),
                )
            })
            .collect();
        assert_eq!(
            asked,
            BTreeSet::from([
                (u16::from(RecordType::A), "ns3.example.".to_string()),
                (u16::from(RecordType::AAAA), "ns3.example.".to_string()),
            ])
        );
        for (_, q) in &sent {
            let n = parent().answer(q, &mut out).unwrap();
            d.handle_datagram(t, LOCAL, RESOLVER, &out[..n], &mut rng);
        }
        // The directory entry's port (5000) applies to the DNS addresses.
        let ev = events(&mut d);
        let [DiscoveryEvent::Resolved {
            zone,
            addrs,
            source,
        }] = &ev[..]
        else {
            panic!("{ev:?}");
        };
        assert_eq!((zone, *source), (&fqdn("dc3.example"), AddrSource::FromDns));
        assert_eq!(
            addrs.iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([&sa(DC3_V4, 5000), &sa(DC3_V6, 5000)])
        );
        assert!(drain(&mut d, t).is_empty());
    }

    #[test]
    fn a_cached_answer_is_used_without_sending_and_refreshed_after_its_ttl() {
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let p = parent(); // every record 600 s
        let t0 = Time::from_secs(1);
        d.lookup(t0, &fqdn("dc2.example"), &mut rng);
        run(&mut d, &p, t0, &mut rng);
        events(&mut d);
        let t1 = t0 + Duration::from_secs(599);
        assert_eq!(
            d.lookup(t1, &fqdn("dc2.example"), &mut rng),
            Lookup::Ready {
                addrs: vec![sa(DC2_V4, 4281), sa(DC2_V6, 4281)],
                source: AddrSource::FromCache
            }
        );
        assert!(drain(&mut d, t1).is_empty());
        assert!(events(&mut d).is_empty());
        // Expired: asked again, from the NS query on.
        let t2 = t0 + Duration::from_secs(600);
        assert_eq!(
            d.lookup(t2, &fqdn("dc2.example"), &mut rng),
            Lookup::Pending
        );
        // A second lookup while it is under way joins it.
        assert_eq!(
            d.lookup(t2, &fqdn("dc2.example"), &mut rng),
            Lookup::Pending
        );
        let asked = run(&mut d, &p, t2, &mut rng);
        assert_eq!(asked, vec![(RecordType::NS, "dc2.example.".to_string())]);
        assert_eq!(events(&mut d).len(), 1);
    }

    /// Answers `query` with `fill` applied to an empty response.
    fn respond(query: &[u8], fill: impl FnOnce(&mut Message)) -> Vec<u8> {
        let q = Message::from_vec(query).unwrap();
        let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
        r.queries = q.queries.clone();
        fill(&mut r);
        r.to_vec().unwrap()
    }

    fn glue_answer(query: &[u8], ns_ttl: u32, glue_ttl: u32) -> Vec<u8> {
        respond(query, |r| {
            r.answers.push(Record::from_rdata(
                name("dc2.example."),
                ns_ttl,
                RData::NS(NS(name("dc2.example."))),
            ));
            r.additionals.push(Record::from_rdata(
                name("dc2.example."),
                glue_ttl,
                RData::A(A(DC2_V4)),
            ));
        })
    }

    #[test]
    fn ns_ttl_is_capped_at_an_hour_and_addresses_expire_on_their_own() {
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let zone = fqdn("dc2.example");
        let t0 = Time::from_secs(1);
        d.lookup(t0, &zone, &mut rng);
        let sent = drain(&mut d, t0);
        // NS for a day, glue for a minute.
        let answer = glue_answer(&sent[0].1, 86_400, 60);
        d.handle_datagram(t0, LOCAL, RESOLVER, &answer, &mut rng);
        assert_eq!(
            events(&mut d),
            vec![resolved(
                "dc2.example",
                vec![sa(DC2_V4, 4281)],
                AddrSource::FromDns
            )]
        );
        // After a minute the NS is still known: only the addresses are asked for.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(d.lookup(t1, &zone, &mut rng), Lookup::Pending);
        let sent = drain(&mut d, t1);
        let types: Vec<RecordType> = sent
            .iter()
            .map(|(_, q)| Message::from_vec(q).unwrap().queries[0].query_type())
            .collect();
        assert_eq!(types, vec![RecordType::A, RecordType::AAAA]);
        // This time the address lives a day.
        for (_, q) in &sent {
            let qtype = Message::from_vec(q).unwrap().queries[0].query_type();
            let answer = respond(q, |r| {
                let data = match qtype {
                    RecordType::A => RData::A(A(DC2_V4)),
                    _ => RData::AAAA(AAAA(DC2_V6)),
                };
                r.answers
                    .push(Record::from_rdata(name("dc2.example."), 86_400, data));
            });
            d.handle_datagram(t1, LOCAL, RESOLVER, &answer, &mut rng);
        }
        let both = vec![sa(DC2_V4, 4281), sa(DC2_V6, 4281)];
        assert_eq!(
            events(&mut d),
            vec![resolved("dc2.example", both.clone(), AddrSource::FromDns)]
        );
        let t = t0 + Duration::from_secs(3599);
        assert_eq!(
            d.lookup(t, &zone, &mut rng),
            Lookup::Ready {
                addrs: both,
                source: AddrSource::FromCache
            }
        );
        // After an hour the NS record is asked for again, not after a day.
        let t2 = t0 + Duration::from_secs(3600);
        assert_eq!(d.lookup(t2, &zone, &mut rng), Lookup::Pending);
        let sent = drain(&mut d, t2);
        assert_eq!(
            Message::from_vec(&sent[0].1).unwrap().queries[0].query_type(),
            RecordType::NS
        );
    }

    #[test]
    fn silence_is_retransmitted_then_falls_back_to_the_directory() {
        let r2 = sa(Ipv4Addr::new(198, 51, 100, 54), 53);
        let mut d = discovery(vec![RESOLVER, r2]);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let zone = fqdn("dc3.example");
        let t0 = Time::from_secs(100);
        assert_eq!(d.lookup(t0, &zone, &mut rng), Lookup::Pending);
        let mut dsts = vec![drain(&mut d, t0)];
        for i in 1..=2 {
            let t = t0 + Duration::from_secs(i);
            assert_eq!(d.poll_timeout(), Some((t, "dns query retransmission")));
            d.handle_timeout(t, &mut rng);
            dsts.push(drain(&mut d, t));
        }
        // Three transmissions, 1 s apart, rotating resolvers, one ID and one question.
        let dsts: Vec<SocketAddr> = dsts.iter().flatten().map(|(a, _)| *a).collect();
        assert_eq!(dsts, vec![RESOLVER, r2, RESOLVER]);
        assert!(events(&mut d).is_empty());
        let give_up = t0 + Duration::from_secs(3);
        assert_eq!(d.poll_timeout(), Some((give_up, "dns query give-up")));
        d.handle_timeout(
            give_up.checked_sub(Duration::from_millis(1)).unwrap(),
            &mut rng,
        );
        assert!(events(&mut d).is_empty());
        d.handle_timeout(give_up, &mut rng);
        assert!(drain(&mut d, give_up).is_empty());
        let directory_addr = sa(Ipv4Addr::new(198, 18, 0, 3), 5000);
        assert_eq!(
            events(&mut d),
            vec![resolved(
                "dc3.example",
                vec![directory_addr],
                AddrSource::FromDirectory
            )]
        );
        assert_eq!(d.poll_timeout(), None);
        // Within the failure hold, the directory answers at once; after it, DNS is asked again.
        let t = give_up + Duration::from_secs(29);
        assert_eq!(
            d.lookup(t, &zone, &mut rng),
            Lookup::Ready {
                addrs: vec![directory_addr],
                source: AddrSource::FromDirectory
            }
        );
        assert!(drain(&mut d, t).is_empty());
        let t = give_up + Duration::from_secs(30);
        assert_eq!(d.lookup(t, &zone, &mut rng), Lookup::Pending);
        assert_eq!(drain(&mut d, t).len(), 1);
    }

    #[test]
    fn an_answer_from_elsewhere_or_with_the_wrong_id_or_question_is_ignored() {
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let t = Time::from_secs(1);
        d.lookup(t, &fqdn("dc2.example"), &mut rng);
        let sent = drain(&mut d, t);
        let good = glue_answer(&sent[0].1, 600, 600);
        let stranger = sa(Ipv4Addr::new(198, 51, 100, 99), 53);
        d.handle_datagram(t, LOCAL, stranger, &good, &mut rng);
        let mut wrong_id = good.clone();
        wrong_id[0] ^= 0x5a;
        d.handle_datagram(t, LOCAL, RESOLVER, &wrong_id, &mut rng);
        let mut other_question = Message::from_vec(&good).unwrap();
        other_question.queries[0].set_name(name("dc9.example."));
        d.handle_datagram(
            t,
            LOCAL,
            RESOLVER,
            &other_question.to_vec().unwrap(),
            &mut rng,
        );
        let mut other_type = Message::from_vec(&good).unwrap();
        other_type.queries[0].set_query_type(RecordType::A);
        d.handle_datagram(t, LOCAL, RESOLVER, &other_type.to_vec().unwrap(), &mut rng);
        // The query itself, reflected back: not a response.
        d.handle_datagram(t, LOCAL, RESOLVER, &sent[0].1, &mut rng);
        d.handle_datagram(t, LOCAL, RESOLVER, b"\x00\x01garbage", &mut rng);
        assert_eq!(d.ignored(), 6);
        assert!(events(&mut d).is_empty());
        assert_eq!(d.pending(), 1);
        // The real answer still counts, in any case.
        let mut upper = Message::from_vec(&good).unwrap();
        upper.queries[0].set_name(name("DC2.Example."));
        d.handle_datagram(t, LOCAL, RESOLVER, &upper.to_vec().unwrap(), &mut rng);
        assert_eq!(
            events(&mut d),
            vec![resolved(
                "dc2.example",
                vec![sa(DC2_V4, 4281)],
                AddrSource::FromDns
            )]
        );
        // A duplicate after the end is ignored too.
        d.handle_datagram(t, LOCAL, RESOLVER, &good, &mut rng);
        assert_eq!(d.ignored(), 7);
    }

    #[test]
    fn servfail_nxdomain_and_empty_answers_fall_back_to_the_directory() {
        let fallback = resolved(
            "dc2.example",
            vec![sa(DC2_V4, 4281)],
            AddrSource::FromDirectory,
        );
        for rcode in [
            ResponseCode::ServFail,
            ResponseCode::NXDomain,
            ResponseCode::Refused,
            ResponseCode::NoError,
        ] {
            let mut d = discovery(vec![RESOLVER]);
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let t = Time::from_secs(1);
            d.lookup(t, &fqdn("dc2.example"), &mut rng);
            let sent = drain(&mut d, t);
            let answer = respond(&sent[0].1, |r| r.metadata.response_code = rcode);
            d.handle_datagram(t, LOCAL, RESOLVER, &answer, &mut rng);
            assert_eq!(events(&mut d), vec![fallback.clone()], "{rcode:?}");
            assert_eq!(d.poll_timeout(), None);
        }
        // NS found, but neither A nor AAAA exists: no usable address.
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let t = Time::from_secs(1);
        d.lookup(t, &fqdn("dc2.example"), &mut rng);
        let sent = drain(&mut d, t);
        let ns_only = glue_answer(&sent[0].1, 600, 600);
        let mut ns_only = Message::from_vec(&ns_only).unwrap();
        ns_only.additionals.clear();
        d.handle_datagram(t, LOCAL, RESOLVER, &ns_only.to_vec().unwrap(), &mut rng);
        let sent = drain(&mut d, t);
        assert_eq!(sent.len(), 2);
        let nx = respond(&sent[0].1, |r| {
            r.metadata.response_code = ResponseCode::NXDomain
        });
        d.handle_datagram(t, LOCAL, RESOLVER, &nx, &mut rng);
        assert!(events(&mut d).is_empty(), "the other family is still asked");
        let empty = respond(&sent[1].1, |_| {});
        d.handle_datagram(t, LOCAL, RESOLVER, &empty, &mut rng);
        assert_eq!(events(&mut d), vec![fallback]);
    }

    #[test]
    fn a_zone_not_in_the_directory_is_not_found_whatever_dns_says() {
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // `stray.example` is delegated in DNS but not in the directory.
        assert_eq!(
            d.lookup(Time::ZERO, &fqdn("stray.example"), &mut rng),
            Lookup::NotFound
        );
        assert!(drain(&mut d, Time::ZERO).is_empty());
        assert_eq!(d.pending(), 0);
        // In the directory without an address, and DNS fails: Failed.
        d.lookup(Time::ZERO, &fqdn("dc4.example"), &mut rng);
        let sent = drain(&mut d, Time::ZERO);
        let answer = respond(&sent[0].1, |r| {
            r.metadata.response_code = ResponseCode::ServFail
        });
        d.handle_datagram(Time::ZERO, LOCAL, RESOLVER, &answer, &mut rng);
        assert_eq!(
            events(&mut d),
            vec![DiscoveryEvent::Failed {
                zone: fqdn("dc4.example")
            }]
        );
        assert_eq!(
            d.lookup(Time::from_secs(1), &fqdn("dc4.example"), &mut rng),
            Lookup::Failed
        );
        // Without resolvers the directory answers at once.
        let mut d = discovery(vec![]);
        assert_eq!(
            d.lookup(Time::ZERO, &fqdn("dc2.example"), &mut rng),
            Lookup::Ready {
                addrs: vec![sa(DC2_V4, 4281)],
                source: AddrSource::FromDirectory
            }
        );
    }

    #[test]
    fn pending_lookups_and_the_cache_are_bounded() {
        let mut cfg = DiscoveryConfig::new(vec![RESOLVER], directory());
        cfg.max_pending = 1;
        cfg.max_cached_zones = 1;
        let mut d = DcDiscovery::new(cfg).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let p = parent();
        let t = Time::from_secs(1);
        assert_eq!(d.lookup(t, &fqdn("dc2.example"), &mut rng), Lookup::Pending);
        assert_eq!(d.lookup(t, &fqdn("dc3.example"), &mut rng), Lookup::Busy);
        run(&mut d, &p, t, &mut rng);
        assert_eq!(d.lookup(t, &fqdn("dc3.example"), &mut rng), Lookup::Pending);
        run(&mut d, &p, t, &mut rng);
        assert_eq!(d.cached(), 1);
        // dc2's entry made room for dc3's.
        assert_eq!(d.lookup(t, &fqdn("dc2.example"), &mut rng), Lookup::Pending);
        let mut cfg = DiscoveryConfig::new(vec![RESOLVER], directory());
        cfg.directory.push(cfg.directory[0].clone());
        assert_eq!(
            DcDiscovery::new(cfg).err(),
            Some(DnsConfigError::DuplicateZone(fqdn("dc2.example")))
        );
    }

    #[test]
    fn two_lookups_under_way_use_different_ids() {
        let mut d = discovery(vec![RESOLVER]);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        d.lookup(Time::ZERO, &fqdn("dc2.example"), &mut rng);
        d.lookup(Time::ZERO, &fqdn("dc3.example"), &mut rng);
        let sent = drain(&mut d, Time::ZERO);
        let ids: BTreeSet<u16> = sent
            .iter()
            .map(|(_, q)| Message::from_vec(q).unwrap().metadata.id)
            .collect();
        assert_eq!(ids.len(), 2);
        // The answer for dc3 ends dc3's lookup only.
        let mut out = [0u8; 1232];
        let n = parent().answer(&sent[1].1, &mut out).unwrap();
        d.handle_datagram(Time::ZERO, LOCAL, RESOLVER, &out[..n], &mut rng);
        assert_eq!(d.pending(), 2, "dc3 now asks for its NS target's addresses");
        let asked: Vec<String> = drain(&mut d, Time::ZERO)
            .iter()
            .map(|(_, q)| Message::from_vec(q).unwrap().queries[0].name().to_ascii())
            .collect();
        assert_eq!(asked, vec!["ns3.example.", "ns3.example."]);
        assert_eq!(d.ignored(), 0);
    }
}
