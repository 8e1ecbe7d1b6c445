//! The anti-replay window (spec/04-crypto.md, "Replay window"): a sliding bitmap over the last
//! [`ReplayWindow::SIZE`] counters, in the block-rotation style of RFC 6479, so that sliding
//! forward costs at most one block clear per 64 counters and never shifts the whole bitmap.
//!
//! Use it in two steps: [`ReplayWindow::check`] before opening a packet (cheap rejection of
//! duplicates without spending an AEAD open), then [`ReplayWindow::accept`] only after the packet
//! authenticated, so that forged counters can never move the window.

use crate::error::Replay;

const BLOCK_BITS: u64 = 64;
/// Blocks in the ring: the window plus one block of slack that is being recycled.
const BLOCKS: usize = (ReplayWindow::SIZE / BLOCK_BITS) as usize + 1;

/// Counters at or beyond this value (2^64 - 2^13) are refused: the key must be replaced before.
pub const REJECT_AFTER_COUNTER: u64 = u64::MAX - (1 << 13) + 1;

/// A per-key receive window of 8192 counters.
#[derive(Clone)]
pub struct ReplayWindow {
    /// One more than the highest accepted counter; 0 before any packet.
    next: u64,
    ring: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("next", &self.next)
            .finish()
    }
}

impl ReplayWindow {
    /// How far behind the newest accepted counter a packet may arrive and still be accepted.
    pub const SIZE: u64 = 8192;

    pub const fn new() -> Self {
        ReplayWindow {
            next: 0,
            ring: [0; BLOCKS],
        }
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.next.checked_sub(1)
    }

    fn slot(counter: u64) -> (usize, u64) {
        let block = ((counter / BLOCK_BITS) % BLOCKS as u64) as usize;
        (block, 1u64 << (counter % BLOCK_BITS))
    }

    /// Whether `counter` would be accepted. Does not change the window.
    pub fn check(&self, counter: u64) -> Result<(), Replay> {
        if counter >= REJECT_AFTER_COUNTER {
            return Err(Replay::Exhausted);
        }
        if counter >= self.next {
            return Ok(());
        }
        if self.next - counter > Self::SIZE {
            return Err(Replay::TooOld);
        }
        let (block, bit) = Self::slot(counter);
        if self.ring[block] & bit != 0 {
            Err(Replay::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Records `counter` as received. Call only after the packet authenticated.
    pub fn accept(&mut self, counter: u64) -> Result<(), Replay> {
        self.check(counter)?;
        if counter >= self.next {
            // Clear every block the window slides over (at most the whole ring).
            let old_top_block = if self.next == 0 {
                None
            } else {
                Some((self.next - 1) / BLOCK_BITS)
            };
            let new_top_block = counter / BLOCK_BITS;
            match old_top_block {
                Some(old) if new_top_block - old < BLOCKS as u64 => {
                    for b in (old + 1)..=new_top_block {
                        self.ring[(b % BLOCKS as u64) as usize] = 0;
                    }
                }
                Some(_) => self.ring = [0; BLOCKS],
                None => {}
            }
            self.next = counter + 1;
        }
        let (block, bit) = Self::slot(counter);
        self.ring[block] |= bit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_is_refused_and_a_fresh_counter_accepted() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0), Ok(()));
        assert_eq!(w.accept(0), Err(Replay::Duplicate));
        assert_eq!(w.accept(5), Ok(()));
        assert_eq!(w.accept(3), Ok(()));
        assert_eq!(w.accept(3), Err(Replay::Duplicate));
        assert_eq!(w.highest(), Some(5));
    }

    #[test]
    fn the_window_reaches_exactly_8192_counters_back() {
        let mut w = ReplayWindow::new();
        w.accept(10_000).unwrap();
        assert_eq!(w.check(10_000 - 8191), Ok(()));
        assert_eq!(w.check(10_001 - 8192), Ok(()));
        assert_eq!(w.check(10_000 - 8192), Err(Replay::TooOld));
        assert_eq!(w.accept(10_001 - 8192), Ok(()));
    }

    #[test]
    fn sliding_far_forward_forgets_old_bits() {
        let mut w = ReplayWindow::new();
        w.accept(100).unwrap();
        w.accept(100 + 64 * 200).unwrap();
        // A counter in the block that recycled the old bit's slot must not look like a duplicate.
        let recycled = 100 + 64 * (BLOCKS as u64);
        assert_eq!(w.check(recycled), Ok(()));
        w.accept(recycled).unwrap();
        assert_eq!(w.check(recycled), Err(Replay::Duplicate));
    }

    #[test]
    fn the_last_counters_of_a_key_are_refused() {
        let w = ReplayWindow::new();
        assert_eq!(REJECT_AFTER_COUNTER, 0u64.wrapping_sub(1 << 13));
        assert_eq!(w.check(REJECT_AFTER_COUNTER - 1), Ok(()));
        assert_eq!(w.check(REJECT_AFTER_COUNTER), Err(Replay::Exhausted));
        assert_eq!(w.check(u64::MAX), Err(Replay::Exhausted));
    }

    /// Every counter in a shuffled run inside the window is accepted once and only once.
    #[test]
    fn reordered_counters_inside_the_window_are_each_accepted_once() {
        let mut w = ReplayWindow::new();
        let mut order: Vec<u64> = (0..20_000).collect();
        // Deterministic Fisher-Yates inside disjoint chunks of 4096: no counter arrives more
        // than 4096 behind the newest, so all must be accepted.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for chunk in order.chunks_mut(4096) {
            for i in (1..chunk.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        for &c in &order {
            assert_eq!(w.accept(c), Ok(()), "counter {c}");
        }
        for &c in order.iter().rev().take(8000) {
            assert_ne!(w.check(c), Ok(()), "counter {c} accepted twice");
        }
    }
}
