//! Virtual time: the only clock the state machines see.
//!
//! A [`Time`] is a point in time, counted in nanoseconds from an arbitrary epoch. The state
//! machines never read a clock; every input carries `now: Time` from their driver:
//!
//! * the simulator ([`crate::sim`]) starts at [`Time::ZERO`] and moves time forward itself;
//! * a real runtime keeps the `std::time::Instant` it started at, `start`, and for every
//!   instant `i` it reads from the OS clock passes `Time::ZERO + (i - start)`; a deadline comes
//!   back as `start + (deadline - Time::ZERO)`.
//!
//! Arithmetic saturates instead of panicking: `Time + Duration` stops at the largest
//! representable time (about 584 years after the epoch) and `Time - Time` is zero when the right
//! side is later, like `Instant::saturating_duration_since`.

use core::fmt;
use core::ops::{Add, AddAssign, Sub};
use core::time::Duration;

/// A point in virtual time: nanoseconds since an arbitrary epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(u64);

impl Time {
    /// The epoch.
    pub const ZERO: Time = Time(0);

    /// The latest representable time.
    pub const MAX: Time = Time(u64::MAX);

    /// `nanos` nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Time {
        Time(nanos)
    }

    /// `millis` milliseconds after the epoch (saturating).
    pub const fn from_millis(millis: u64) -> Time {
        Time(millis.saturating_mul(1_000_000))
    }

    /// `secs` seconds after the epoch (saturating).
    pub const fn from_secs(secs: u64) -> Time {
        Time(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// This time moved back by `d`, or `None` if that would be before the epoch.
    pub fn checked_sub(self, d: Duration) -> Option<Time> {
        self.0
            .checked_sub(u64::try_from(d.as_nanos()).ok()?)
            .map(Time)
    }

    /// The time elapsed from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn checked_duration_since(self, earlier: Time) -> Option<Duration> {
        self.0.checked_sub(earlier.0).map(Duration::from_nanos)
    }
}

/// Nanoseconds in `d`, saturating at `u64::MAX`.
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(duration_nanos(d)))
    }
}

impl AddAssign<Duration> for Time {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub<Time> for Time {
    type Output = Duration;
    /// Saturating: zero when `earlier` is later than `self`.
    fn sub(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Seconds with nine decimals, e.g. `1.020000000s`: exact, and sorts as text when aligned.
impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}s",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_a_duration_moves_time_forward_and_saturates_at_the_end() {
        let t = Time::from_millis(1500) + Duration::from_micros(250);
        assert_eq!(t.as_nanos(), 1_500_250_000);
        assert_eq!(
            Time::from_nanos(u64::MAX - 1) + Duration::from_secs(1),
            Time::from_nanos(u64::MAX)
        );
        let mut u = Time::ZERO;
        u += Duration::from_secs(2);
        assert_eq!(u, Time::from_secs(2));
    }

    #[test]
    fn subtracting_times_gives_the_elapsed_duration_or_zero() {
        let a = Time::from_millis(10);
        let b = Time::from_millis(35);
        assert_eq!(b - a, Duration::from_millis(25));
        assert_eq!(a - b, Duration::ZERO);
        assert_eq!(b.checked_duration_since(a), Some(Duration::from_millis(25)));
        assert_eq!(a.checked_duration_since(b), None);
    }

    #[test]
    fn checked_sub_refuses_to_go_before_the_epoch() {
        let t = Time::from_millis(10);
        assert_eq!(
            t.checked_sub(Duration::from_millis(4)),
            Some(Time::from_millis(6))
        );
        assert_eq!(t.checked_sub(Duration::from_millis(11)), None);
        assert_eq!(t.checked_sub(Duration::MAX), None);
    }

    #[test]
    fn time_displays_as_exact_seconds() {
        assert_eq!(Time::from_nanos(1_020_000_001).to_string(), "1.020000001s");
        assert_eq!(Time::ZERO.to_string(), "0.000000000s");
    }
}
