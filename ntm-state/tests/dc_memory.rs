//! What one registered node costs the DC: every byte its tables hold for the node (records,
//! names, addresses, keys, indexes, and the tables' own overhead), measured with a counting
//! allocator as the growth of live heap while nodes log in and register, divided by their number.
//!
//! This file holds a single test: the allocator counts for the whole test binary, and another
//! test running in parallel would be counted too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};

use ntm_state::dc::{DcConfig, DirectionCoordinator, VirtualPools};
use ntm_state::signaling::SignalingKey;
use ntm_state::time::Time;
use ntm_wire::{
    AddrList, Extensions, Fqdn, KeyDistribution, KeyRole, Message, NatBehaviour,
    RegistrationRequest, Role, SecretKey, TransportAddr, MAX_SIGNALING_LEN,
};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const AS_KEY_ID: u32 = 17;

fn dc_addr() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 10], 4281))
}

/// Logs in and registers nodes `from..to` (key distribution from the AS, then a registration
/// with a private IPv4 and a global IPv6 address, from behind a NAT).
fn register_nodes(
    dc: &mut DirectionCoordinator,
    as_key: &mut SignalingKey,
    rng: &mut ChaCha8Rng,
    from: u32,
    to: u32,
) {
    let as_addr = SocketAddr::from(([203, 0, 113, 2], 4280));
    let mut buf = [0u8; MAX_SIGNALING_LEN];
    for i in from..to {
        let key_id = 0x1000 + i;
        let name = Fqdn::new(&format!("node{i:04}.dc1.example")).expect("name");
        let secret = SecretKey::from_bytes([i as u8; 32]);
        let kd: Message = KeyDistribution {
            key_role: KeyRole::NodeDc,
            new_key_id: key_id,
            key: secret.clone(),
            lifetime_s: 86_400,
            subject: name.clone(),
            extensions: Extensions::none(),
        }
        .into();
        let mut d = as_key.seal_to_vec(&kd, i, None).expect("seal");
        dc.handle_datagram(Time::ZERO, dc_addr(), as_addr, &mut d, rng);
        let mut node = SignalingKey::new(&secret, key_id, Role::A);
        let private = SocketAddr::from(([192, 168, 1, 2], 5000));
        let global = SocketAddr::new(format!("2001:db8:1::{i:x}").parse().expect("v6"), 5000);
        let req: Message = RegistrationRequest {
            node_fqdn: name,
            local_addrs: AddrList::new(vec![
                TransportAddr::new(private),
                TransportAddr::new(global),
            ])
            .expect("two addresses"),
            nat_mapping: NatBehaviour::EndpointIndependent,
            node_public_key: [i as u8; 32],
            wants_notification: false,
            extensions: Extensions::none(),
        }
        .into();
        let mut d = node.seal_to_vec(&req, 1, None).expect("seal");
        let observed = SocketAddr::from((Ipv4Addr::from(0xc633_6400 + i), 40_000));
        dc.handle_datagram(Time::ZERO, dc_addr(), observed, &mut d, rng);
        while dc.poll_transmit(Time::ZERO, &mut buf).is_some() {}
        while dc.poll_event().is_some() {}
    }
}

#[test]
fn a_registered_node_costs_the_dc_at_most_512_bytes() {
    let mut config = DcConfig::new(
        Fqdn::new("dc1.example").expect("zone"),
        vec![dc_addr()],
        SecretKey::from_bytes([4; 32]),
        AS_KEY_ID,
        VirtualPools {
            v4: Ipv4Addr::new(100, 64, 0, 0),
            v4_prefix_len: 16,
            v6: "fd4e:544d:0:1::".parse().expect("v6"),
        },
    );
    config.limits.max_nodes = 100_000;
    let mut dc = DirectionCoordinator::new(config).expect("config");
    let mut as_key = SignalingKey::new(&SecretKey::from_bytes([4; 32]), AS_KEY_ID, Role::A);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Warm up the tables that do not grow per node (the outbox, the event queue).
    register_nodes(&mut dc, &mut as_key, &mut rng, 0, 16);
    let mut figures = Vec::new();
    let mut done = 16;
    for n in [1000u32, 3000, 5000] {
        let before = LIVE.load(Ordering::Relaxed);
        register_nodes(&mut dc, &mut as_key, &mut rng, done, done + n);
        let after = LIVE.load(Ordering::Relaxed);
        done += n;
        figures.push((n, (after - before) as f64 / f64::from(n)));
    }
    assert_eq!(dc.nodes_registered(), done as usize, "{dc:?}");
    eprintln!("bytes per registered node (nodes added, bytes each): {figures:?}");
    for (n, per_node) in figures {
        assert!(
            per_node <= 512.0,
            "{per_node:.0} bytes per node over {n} nodes"
        );
    }
}
