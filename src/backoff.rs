//! Exponential backoff with full jitter, on tower's [`Backoff`] traits.
//!
//! tower's own `ExponentialBackoff` adds jitter on top of the exponential base and stops adding
//! it at the cap, so a fleet of clients that all hit the cap retry in lock-step. After a cluster
//! outage that is exactly the thundering herd to avoid: here every delay is drawn uniformly
//! from `[floor, min(cap, floor · 2^attempt)]` ("full jitter"), at the cap included.

use std::{fmt, time::Duration};

use tower::retry::backoff::{Backoff, MakeBackoff};
use tower::util::rng::{HasherRng, Rng};

use crate::Error;

/// Makes a [`JitteredBackoff`] per sequence of attempts.
#[derive(Clone)]
pub struct JitteredBackoffMaker {
    floor: Duration,
    cap: Duration,
}

impl JitteredBackoffMaker {
    /// Delays start at `floor` and grow up to `cap`. Fails when `floor` is zero (the delays
    /// grow from the floor, so they would stay zero: a hot reconnect loop) or exceeds `cap`.
    pub fn new(floor: Duration, cap: Duration) -> Result<Self, Error> {
        if floor.is_zero() {
            return Err(Error::config(
                "backoff floor must be greater than zero (delays grow from it; zero would retry in a hot loop)",
            ));
        }
        if floor > cap {
            return Err(Error::config(format!(
                "backoff floor ({floor:?}) must not exceed its cap ({cap:?})"
            )));
        }
        Ok(JitteredBackoffMaker { floor, cap })
    }

    /// The smallest delay.
    pub fn floor(&self) -> Duration {
        self.floor
    }

    /// The largest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// A fresh sequence with its own random stream: two sequences from one maker (two callers
    /// retrying at once) do not draw the same delays.
    pub fn make(&self) -> JitteredBackoff {
        JitteredBackoff {
            floor: self.floor,
            cap: self.cap,
            attempt: 0,
            rng: HasherRng::default(),
        }
    }
}

impl fmt::Debug for JitteredBackoffMaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JitteredBackoffMaker")
            .field("floor", &self.floor)
            .field("cap", &self.cap)
            .finish()
    }
}

impl MakeBackoff for JitteredBackoffMaker {
    type Backoff = JitteredBackoff;

    fn make_backoff(&mut self) -> JitteredBackoff {
        self.make()
    }
}

/// One sequence of growing, randomised delays.
#[derive(Clone)]
pub struct JitteredBackoff {
    floor: Duration,
    cap: Duration,
    attempt: u32,
    rng: HasherRng,
}

impl JitteredBackoff {
    /// The next delay, advancing the sequence: uniform in `[floor, min(cap, floor · 2^(n+1))]`
    /// for the n-th delay (0-based), so even the first delays of many callers are spread.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .floor
            .checked_mul(2u32.saturating_pow(self.attempt.saturating_add(1)))
            .unwrap_or(self.cap)
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let span = ceiling.saturating_sub(self.floor);
        self.floor + span.mul_f64(self.rng.next_f64().clamp(0.0, 1.0))
    }

    /// How many delays were handed out.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

impl fmt::Debug for JitteredBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JitteredBackoff")
            .field("floor", &self.floor)
            .field("cap", &self.cap)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Backoff for JitteredBackoff {
    type Future = tokio::time::Sleep;

    fn next_backoff(&mut self) -> tokio::time::Sleep {
        tokio::time::sleep(self.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_floor_and_growing_ceiling() {
        let maker =
            JitteredBackoffMaker::new(Duration::from_millis(10), Duration::from_millis(500))
                .unwrap();
        for _ in 0..200 {
            let mut b = maker.make();
            for attempt in 0..12u32 {
                let d = b.next_delay();
                let ceiling = (Duration::from_millis(10) * 2u32.pow(attempt + 1))
                    .min(Duration::from_millis(500));
                assert!(d >= Duration::from_millis(10), "{d:?} below floor");
                assert!(d <= ceiling, "attempt {attempt}: {d:?} above {ceiling:?}");
            }
        }
    }

    #[test]
    fn delays_at_the_cap_are_still_spread() {
        let maker =
            JitteredBackoffMaker::new(Duration::from_millis(10), Duration::from_millis(100))
                .unwrap();
        let mut b = maker.make();
        for _ in 0..10 {
            b.next_delay();
        }
        let capped: Vec<_> = (0..50).map(|_| b.next_delay()).collect();
        let min = capped.iter().min().unwrap();
        let max = capped.iter().max().unwrap();
        assert!(
            *max - *min > Duration::from_millis(40),
            "capped delays not spread: {min:?}..{max:?}"
        );
    }

    #[test]
    fn sequences_from_one_maker_draw_different_delays() {
        let maker =
            JitteredBackoffMaker::new(Duration::from_millis(10), Duration::from_secs(1)).unwrap();
        let firsts: std::collections::HashSet<Duration> =
            (0..50).map(|_| maker.make().next_delay()).collect();
        assert!(
            firsts.len() > 40,
            "first delays of 50 sequences: {} distinct",
            firsts.len()
        );
    }

    #[test]
    fn invalid_bounds_are_config_errors() {
        let e =
            JitteredBackoffMaker::new(Duration::from_secs(2), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(JitteredBackoffMaker::new(Duration::ZERO, Duration::ZERO).is_err());
        // A zero floor used to be accepted and gave zero delays for ever.
        let e = JitteredBackoffMaker::new(Duration::ZERO, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.to_string().contains("floor"), "{e}");
    }
}
