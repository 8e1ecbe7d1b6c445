//! The NAT-pair matrix: every access type against every other (no NAT on dual-stack, IPv4-only
//! and IPv6-only networks, and IPv4 NATs of every RFC 4787 mapping × filtering), each pair run
//! in the simulator with the real AS, DC, RS and nodes: the requester resolves the target, both
//! exchange data, route optimization gets one probe round, and the final path is recorded as
//! direct (`D`), relayed (`R`) or failed (`-`). Each cell is checked against spec/06 §6.3-6.4
//! (when hole punching can succeed), and the whole matrix is printed:
//!
//! `cargo test -p ntm-state --test nat_matrix -- --nocapture`

mod common;

use core::time::Duration;

use common::world::{World, WorldSetup, NAT_LINK};
use common::{Drive, INTERNET_LINK};
use ntm_state::node::TunnelPath;
use ntm_state::sim::{Filtering, Mapping, SegmentId, Stack};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Global dual-stack, no NAT.
    Dual,
    /// Global IPv4 only.
    G4,
    /// Global IPv6 only.
    G6,
    /// IPv4 only behind a NAT.
    Nat(Mapping, Filtering),
}

const MAPPINGS: [Mapping; 3] = [
    Mapping::EndpointIndependent,
    Mapping::AddressDependent,
    Mapping::AddressAndPortDependent,
];
const FILTERINGS: [Filtering; 3] = [
    Filtering::EndpointIndependent,
    Filtering::AddressDependent,
    Filtering::AddressAndPortDependent,
];

fn all() -> Vec<Access> {
    let mut v = vec![Access::Dual, Access::G4, Access::G6];
    for m in MAPPINGS {
        for f in FILTERINGS {
            v.push(Access::Nat(m, f));
        }
    }
    v
}

fn short(a: Access) -> String {
    let m = |m: Mapping| match m {
        Mapping::EndpointIndependent => "EI",
        Mapping::AddressDependent => "AD",
        Mapping::AddressAndPortDependent => "APD",
    };
    let f = |f: Filtering| match f {
        Filtering::EndpointIndependent => "ei",
        Filtering::AddressDependent => "ad",
        Filtering::AddressAndPortDependent => "apd",
    };
    match a {
        Access::Dual => "D".into(),
        Access::G4 => "G4".into(),
        Access::G6 => "G6".into(),
        Access::Nat(mm, ff) => format!("{}/{}", m(mm), f(ff)),
    }
}

/// The final path spec/06 predicts: `D` direct, `R` relayed.
fn expected(r: Access, t: Access) -> char {
    let v4 = |a| !matches!(a, Access::G6);
    let v6 = |a| matches!(a, Access::Dual | Access::G6);
    let shared_v4 = v4(r) && v4(t);
    let shared_v6 = v6(r) && v6(t);
    if !shared_v4 && !shared_v6 {
        return 'R'; // FamilyMismatch: only a dual-stack relay connects them
    }
    // IPv6 when both are global there; then nobody is behind a NAT.
    if shared_v6 && (!shared_v4 || (v6(r) && v6(t))) {
        return 'D';
    }
    match (r, t) {
        (Access::Nat(mr, fr), Access::Nat(mt, ft)) => {
            let open = |f| {
                matches!(
                    f,
                    Filtering::EndpointIndependent | Filtering::AddressDependent
                )
            };
            let ei = |m| m == Mapping::EndpointIndependent;
            // §6.4: both map endpoint-independently, or one does and filters openly enough.
            if (ei(mr) && ei(mt)) || (ei(mr) && open(fr)) || (ei(mt) && open(ft)) {
                'D'
            } else {
                'R'
            }
        }
        // No NAT on one side (rule 2 or 3): direct.
        _ => 'D',
    }
}

fn place(w: &mut World, a: Access, name: &str) -> (SegmentId, std::time::Duration) {
    let internet = w.internet;
    match a {
        Access::Dual => (internet, INTERNET_LINK),
        Access::G4 => (w.segment(name, Stack::V4Only), INTERNET_LINK),
        Access::G6 => (w.segment(name, Stack::V6Only), INTERNET_LINK),
        Access::Nat(m, f) => (w.nat_with(name, internet, m, f), NAT_LINK),
    }
}

/// Runs one cell; returns the final path at both ends as one letter, or `-` if no tunnel.
fn run(seed: u64, r: Access, t: Access) -> char {
    let mut w = World::new(&WorldSetup::new(seed));
    let (sr, lr) = place(&mut w, r, "net-r");
    let (st, lt) = place(&mut w, t, "net-t");
    let a = w.add_node(sr, lr);
    let b = w.add_node(st, lt);
    for i in [a, b] {
        w.bring_up(i, Duration::from_secs(10));
    }
    w.run_for(Duration::from_millis(200));
    let peer = w.nodes[b].fqdn.clone();
    let now = w.now();
    let n = &mut w.nodes[a];
    n.node.resolve(now, &peer, &mut n.rng);
    w.run_for(Duration::from_secs(3));
    // Data both ways keeps the tunnel busy while the probe round runs.
    for _ in 0..15 {
        let _ = w.send_v4(a, b, b"ping");
        let _ = w.send_v4(b, a, b"pong");
        w.run_for(Duration::from_secs(1));
    }
    let got_a = w.nodes[a]
        .payloads()
        .iter()
        .filter(|p| p.as_slice() == b"pong")
        .count();
    let got_b = w.nodes[b]
        .payloads()
        .iter()
        .filter(|p| p.as_slice() == b"ping")
        .count();
    match (w.path(a, b), w.path(b, a)) {
        _ if got_a == 0 || got_b == 0 => '-',
        (Some(TunnelPath::Direct(_)), Some(TunnelPath::Direct(_))) => 'D',
        (Some(TunnelPath::Relay(_)), Some(TunnelPath::Relay(_))) => 'R',
        (Some(_), Some(_)) => '?', // the two ends disagree
        _ => '-',
    }
}

#[test]
fn every_access_pair_ends_on_the_path_spec_06_predicts() {
    let types = all();
    let mut table = String::from("requester \\ target");
    for t in &types {
        table.push_str(&format!(" {:>7}", short(*t)));
    }
    table.push('\n');
    let mut wrong = Vec::new();
    for (i, r) in types.iter().enumerate() {
        table.push_str(&format!("{:>18}", short(*r)));
        for (j, t) in types.iter().enumerate() {
            let got = run(1000 + (i * types.len() + j) as u64, *r, *t);
            let want = expected(*r, *t);
            table.push_str(&format!(" {:>7}", got));
            if got != want {
                wrong.push(format!(
                    "{} -> {}: got {got}, spec says {want}",
                    short(*r),
                    short(*t)
                ));
            }
        }
        table.push('\n');
    }
    println!("final path (D direct, R relayed, - failed):\n{table}");
    assert!(wrong.is_empty(), "{}\n{table}", wrong.join("\n"));
}
