//! The capture: one record per decision the network took about a datagram.

use core::fmt;
use std::collections::VecDeque;
use std::net::SocketAddr;

use super::{HostId, NatId, SegmentId};
use crate::time::Time;

/// Where a [`Hop`] was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Place {
    /// At a host or on its link (sent, lost or duplicated on it, delivered to it).
    Host(HostId),
    /// At a segment's routing step (no route, family mismatch).
    Segment(SegmentId),
    /// At a NAT or on its outside link.
    Nat(NatId),
}

/// What happened to a datagram at a [`Hop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A host handed it to its link.
    Sent,
    /// A link dropped it.
    Lost,
    /// A link let it through twice.
    Duplicated,
    /// A NAT rewrote it; these are its new source and destination.
    Translated { src: SocketAddr, dst: SocketAddr },
    /// It reached the destination host (a [`super::Delivery`] came out).
    Delivered,
    /// No host or NAT holds the destination address, and there is no way up (or the datagram
    /// was coming down from the segment's NAT, which never sends it back up).
    NoRoute,
    /// The segment does not carry the datagram's address family, its source and destination
    /// families differ, or the NAT has no outside address of that family.
    FamilyMismatch,
    /// Inbound to a NAT port that no mapping holds.
    NoMapping,
    /// Inbound to a mapped port, refused by the NAT's filtering behaviour.
    Filtered,
    /// Inbound to a mapping whose timeout has passed (the mapping is removed).
    MappingExpired,
    /// Sent to the NAT's own outside address from inside, and the NAT does not hairpin.
    HairpinOff,
    /// The NAT had no free external port for a new mapping.
    PortsExhausted,
    /// The destination interface went away (a move or a detach) while the datagram was on
    /// its link.
    InterfaceGone,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Sent => f.write_str("sent"),
            Outcome::Lost => f.write_str("lost"),
            Outcome::Duplicated => f.write_str("duplicated"),
            Outcome::Translated { src, dst } => write!(f, "translated to {src} -> {dst}"),
            Outcome::Delivered => f.write_str("delivered"),
            Outcome::NoRoute => f.write_str("dropped: no route"),
            Outcome::FamilyMismatch => f.write_str("dropped: address family not carried"),
            Outcome::NoMapping => f.write_str("dropped: no mapping"),
            Outcome::Filtered => f.write_str("dropped by filter"),
            Outcome::MappingExpired => f.write_str("dropped: mapping expired"),
            Outcome::HairpinOff => f.write_str("dropped: hairpinning off"),
            Outcome::PortsExhausted => f.write_str("dropped: no free external port"),
            Outcome::InterfaceGone => f.write_str("dropped: interface gone"),
        }
    }
}

/// One record of the capture.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    /// When the decision was taken.
    pub at: Time,
    /// Where.
    pub place: Place,
    /// The datagram's source as it was at that point.
    pub src: SocketAddr,
    /// The datagram's destination as it was at that point.
    pub dst: SocketAddr,
    /// Payload length in bytes.
    pub len: usize,
    /// What happened.
    pub outcome: Outcome,
}

/// The most recent hops, at most `limit` of them; older ones are dropped and counted.
#[derive(Clone, Debug)]
pub(super) struct Capture {
    pub(super) hops: VecDeque<Hop>,
    pub(super) limit: usize,
    pub(super) dropped: u64,
}

impl Capture {
    pub(super) fn new(limit: usize) -> Capture {
        Capture {
            hops: VecDeque::new(),
            limit,
            dropped: 0,
        }
    }

    pub(super) fn push(&mut self, hop: Hop) {
        self.hops.push_back(hop);
        while self.hops.len() > self.limit {
            self.hops.pop_front();
            self.dropped += 1;
        }
    }
}
