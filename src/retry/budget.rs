//! [`RetryBudget`]: a lock-free token bucket that bounds retries to a share of the traffic.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;
use tower::retry::budget::Budget;

use crate::Error;

/// Tokens are counted in thousandths, so that a call can earn a fraction of a retry.
const UNIT: u64 = 1000;

/// A retry budget: every call earns a fraction of a retry, every retry spends a whole one.
///
/// A token bucket shared by every clone of the retry layer (and by anything else handed the
/// same `Arc`):
/// * it starts full, holding `burst` retries, and never holds more;
/// * each call deposits `ratio` of a retry (0.2: at most one retry per five calls, sustained);
/// * it refills by itself at `min_per_sec` retries a second, so a quiet client can still retry
///   during a failover;
/// * a retry withdraws one token; with less than one left, the retry is refused and the caller
///   gets the original error.
///
/// A cluster-wide outage therefore adds at most `ratio` of the traffic (plus the refill) to
/// the load, after an initial burst.
///
/// It costs a successful call one relaxed load of a shared counter while the bucket is full —
/// the usual state — and one atomic add otherwise; tower's `TpsBudget` takes a mutex on every
/// deposit. Any [`Budget`] can be used instead ([`RetryConfig::budget`](super::RetryConfig::budget)).
///
/// ```
/// use tower::retry::budget::Budget;
/// use tower_redis_cluster::retry::RetryBudget;
///
/// # fn main() -> Result<(), tower_redis_cluster::Error> {
/// let budget = RetryBudget::new(0, 0.5, 2)?; // no refill, half a retry per call, burst of 2
/// assert!(budget.withdraw() && budget.withdraw());
/// assert!(!budget.withdraw()); // empty
/// budget.deposit();
/// budget.deposit(); // two calls earn one retry
/// assert!(budget.withdraw());
/// # Ok(()) }
/// ```
pub struct RetryBudget {
    /// Thousandths of a retry.
    balance: AtomicU64,
    cap: u64,
    per_call: u64,
    /// Thousandths of a retry per millisecond = retries per second.
    refill_per_ms: u64,
    origin: Instant,
    /// Milliseconds since `origin` up to which the refill has been added.
    refilled_ms: AtomicU64,
}

impl RetryBudget {
    /// A full bucket of `burst` retries, earning `ratio` of a retry per call and `min_per_sec`
    /// retries a second. Fails with a `Config` error unless `ratio` is a finite number between
    /// 0 and 1000 and `burst` is at least 1.
    pub fn new(min_per_sec: u32, ratio: f32, burst: u32) -> Result<Self, Error> {
        if !ratio.is_finite() || !(0.0..=1000.0).contains(&ratio) {
            return Err(Error::config(format!(
                "the retry budget's ratio must be between 0 and 1000, not {ratio}"
            )));
        }
        if burst == 0 {
            return Err(Error::config(
                "the retry budget's burst must be at least 1 retry",
            ));
        }
        let cap = u64::from(burst) * UNIT;
        Ok(RetryBudget {
            balance: AtomicU64::new(cap),
            cap,
            per_call: (f64::from(ratio) * UNIT as f64).round() as u64,
            refill_per_ms: u64::from(min_per_sec),
            origin: Instant::now(),
            refilled_ms: AtomicU64::new(0),
        })
    }

    /// The retries the bucket holds now (refill included).
    pub fn available(&self) -> f64 {
        self.refill();
        self.balance.load(Ordering::Relaxed).min(self.cap) as f64 / UNIT as f64
    }

    /// The time the refill alone takes to earn one retry (`None` without a refill).
    pub fn refill_interval(&self) -> Option<Duration> {
        (self.refill_per_ms > 0).then(|| Duration::from_millis(1000 / self.refill_per_ms))
    }

    /// Adds the time-based refill earned since the last one.
    fn refill(&self) {
        if self.refill_per_ms == 0 {
            return;
        }
        let now_ms = Instant::now()
            .saturating_duration_since(self.origin)
            .as_millis() as u64;
        let last = self.refilled_ms.load(Ordering::Relaxed);
        if now_ms <= last {
            return;
        }
        // Whoever moves the mark adds the refill for the interval; the others add nothing.
        if self
            .refilled_ms
            .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let earned = (now_ms - last).saturating_mul(self.refill_per_ms);
            self.add(earned);
        }
    }

    fn add(&self, amount: u64) {
        let mut current = self.balance.load(Ordering::Relaxed);
        while current < self.cap {
            let next = current.saturating_add(amount).min(self.cap);
            match self.balance.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

impl Default for RetryBudget {
    /// 10 retries a second, 20 % of the calls, a burst of 100 (tower's `TpsBudget` defaults,
    /// with its 10 s window as the burst).
    fn default() -> Self {
        RetryBudget::new(10, 0.2, 100).expect("the default budget is valid")
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        // While full (a healthy cluster), a load and no write: clones on other threads keep
        // their copy of the cache line.
        if self.per_call != 0 && self.balance.load(Ordering::Relaxed) < self.cap {
            self.add(self.per_call);
        }
    }

    fn withdraw(&self) -> bool {
        self.refill();
        let mut current = self.balance.load(Ordering::Relaxed);
        loop {
            if current < UNIT {
                return false;
            }
            match self.balance.compare_exchange_weak(
                current,
                current - UNIT,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("available", &self.available())
            .field("burst", &(self.cap / UNIT))
            .field("ratio", &(self.per_call as f64 / UNIT as f64))
            .field("min_per_sec", &self.refill_per_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_parameters_are_config_errors() {
        for (ratio, burst) in [(f32::NAN, 1), (-0.1, 1), (1000.5, 1), (0.2, 0)] {
            let error = RetryBudget::new(0, ratio, burst).unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::Config, "{ratio} {burst}");
        }
    }

    #[test]
    fn starts_full_and_never_exceeds_its_burst() {
        let budget = RetryBudget::new(0, 1.0, 3).unwrap();
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 3.0);
        assert!((0..3).all(|_| budget.withdraw()));
        assert!(!budget.withdraw());
    }

    #[test]
    fn calls_earn_fractions_of_a_retry() {
        let budget = RetryBudget::new(0, 0.2, 1).unwrap();
        assert!(budget.withdraw());
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(
            !budget.withdraw(),
            "four calls at 0.2 earn less than one retry"
        );
        budget.deposit();
        assert!(budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn refills_with_time() {
        let budget = RetryBudget::new(10, 0.0, 5).unwrap();
        assert!((0..5).all(|_| budget.withdraw()));
        assert!(!budget.withdraw());
        assert_eq!(budget.refill_interval(), Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw(), "250 ms at 10/s earn 2.5 retries");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(budget.available(), 5.0, "the refill stops at the burst");
    }
}
