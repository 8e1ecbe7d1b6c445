//! Link properties and the seeded draws that apply them.

use core::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use crate::time::duration_nanos;

/// What one link does to every datagram that crosses it, in one direction.
///
/// Every host interface has one (between the host and its segment), and every NAT has one
/// (between the NAT and its outside segment). A datagram from host A to host B on the same
/// segment crosses A's link and then B's; one that goes through a NAT also crosses the NAT's.
/// Build one with struct update syntax: `Link { loss: 0.2, ..Link::latency(ms(10)) }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// One-way delay.
    pub latency: Duration,
    /// The delay varies uniformly within `latency ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram arrives twice (the copy draws its own delay).
    pub duplicate: f64,
    /// Probability that a datagram is held back by an extra delay, uniform in
    /// `[0, reorder_delay]`, so that later ones overtake it.
    pub reorder: f64,
    /// The largest extra delay of a reordered datagram.
    pub reorder_delay: Duration,
}

impl Link {
    /// No delay, no loss, no duplication, no reordering.
    pub const IDEAL: Link = Link::latency(Duration::ZERO);

    /// A link with this one-way delay and nothing else.
    pub const fn latency(latency: Duration) -> Link {
        Link {
            latency,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
        }
    }
}

impl Default for Link {
    fn default() -> Link {
        Link::IDEAL
    }
}

/// True with probability `p`; draws nothing when `p` is 0 or 1, so an ideal link leaves the
/// random sequence untouched.
pub(super) fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    if p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        // 53 random bits give a uniform f64 in [0, 1).
        ((rng.next_u64() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }
}

/// Uniform in `[0, max]`.
pub(super) fn uniform(rng: &mut ChaCha8Rng, max: u64) -> u64 {
    // Multiply-shift maps 64 random bits onto the range; the result is below max + 1.
    ((u128::from(rng.next_u64()) * (u128::from(max) + 1)) >> 64) as u64
}

/// The delay of one crossing: latency, jitter, and maybe a reordering hold-back.
pub(super) fn sample_delay(rng: &mut ChaCha8Rng, link: &Link) -> Duration {
    let mut nanos = duration_nanos(link.latency);
    let jitter = duration_nanos(link.jitter);
    if jitter > 0 {
        let offset = uniform(rng, jitter.saturating_mul(2));
        nanos = nanos.saturating_add(offset).saturating_sub(jitter);
    }
    if chance(rng, link.reorder) {
        nanos = nanos.saturating_add(uniform(rng, duration_nanos(link.reorder_delay)));
    }
    Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn jitter_stays_within_its_band_and_never_goes_below_zero() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let link = Link {
            jitter: Duration::from_millis(5),
            ..Link::latency(Duration::from_millis(10))
        };
        let delays: Vec<Duration> = (0..2000).map(|_| sample_delay(&mut rng, &link)).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(5) && *d <= Duration::from_millis(15)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(7)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(13)));
        let wide = Link {
            jitter: Duration::from_millis(50),
            ..Link::latency(Duration::from_millis(1))
        };
        assert!((0..2000).any(|_| sample_delay(&mut rng, &wide) == Duration::ZERO));
    }

    #[test]
    fn an_ideal_link_draws_no_randomness() {
        let mut a = ChaCha8Rng::seed_from_u64(9);
        let mut b = ChaCha8Rng::seed_from_u64(9);
        assert_eq!(sample_delay(&mut a, &Link::IDEAL), Duration::ZERO);
        assert!(!chance(&mut a, 0.0));
        assert!(chance(&mut a, 1.0));
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn uniform_covers_both_ends_of_a_small_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let draws: Vec<u64> = (0..200).map(|_| uniform(&mut rng, 2)).collect();
        assert!(draws.iter().all(|d| *d <= 2));
        assert!(draws.contains(&0) && draws.contains(&2));
    }
}
