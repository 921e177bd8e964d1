//! [`RetryBudget`]: retries bounded to a share of the recent calls, at the cost of one
//! uncontended atomic add per call.

use std::{
    cell::Cell,
    collections::VecDeque,
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use tokio::time::Instant;
use tower::retry::budget::Budget;

use crate::Error;

/// Call counters, spread over cache lines so that threads do not write to the same one.
const SHARDS: usize = 16;

#[repr(align(64))]
#[derive(Default)]
struct Shard(AtomicU64);

/// Retries spent within this long of each other are counted together, and readings of the
/// call count are at least this far apart.
const SPENT_SLOT: Duration = Duration::from_millis(100);

/// A thread's counter takes a reading every this many calls (when nobody holds the window), so
/// the count is known at fine intervals even when nothing withdraws.
const READ_EVERY: u64 = 64;

/// A retry budget: over any window of `ttl`, retries may add `ratio` of the calls made in that
/// window, plus `min_per_sec` retries a second — the rule of tower's `TpsBudget`, with a cheaper
/// call path.
///
/// Each call deposits by adding one to a call counter of its thread's own (16 counters on
/// separate cache lines), so calls on different threads do not contend; tower's `TpsBudget`
/// takes a mutex on every deposit. Every 64th call of a counter records a reading of the total
/// (time, calls) if the window is free; the window's arithmetic — the calls since a window ago,
/// interpolated between two readings, minus the retries already spent — happens when a retry
/// asks to withdraw, which is rare while the cluster is healthy. Between readings calls are
/// assumed to come at a steady rate, so the count is exact to within about 64 calls per
/// counter.
///
/// A cluster-wide outage therefore adds at most `ratio` of the traffic (plus the floor) to the
/// load, while a failover of a busy client finds the budget its traffic has earned.
///
/// ```
/// use std::time::Duration;
/// use tower::retry::budget::Budget;
/// use tower_redis_cluster::retry::RetryBudget;
///
/// # fn main() -> Result<(), tower_redis_cluster::Error> {
/// // No floor, half a retry per call over the last 10 s.
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5)?;
/// assert!(!budget.withdraw()); // no calls yet
/// budget.deposit();
/// budget.deposit(); // two calls earn one retry
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw());
/// # Ok(()) }
/// ```
pub struct RetryBudget {
    calls: [Shard; SHARDS],
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
    window: Mutex<Window>,
}

struct Window {
    /// (when, calls so far) read at earlier withdrawals, oldest first; the first is the
    /// budget's creation or the last reading from before the window.
    readings: VecDeque<(Instant, u64)>,
    /// Retries spent: (start of a `SPENT_SLOT`, how many), oldest first.
    spent: VecDeque<(Instant, u64)>,
}

impl RetryBudget {
    /// Retries may add `ratio` (0 to 1000) of the calls of the last `ttl` (1 s to 60 s), plus
    /// `min_per_sec` retries a second. Anything else is a `Config` error.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Result<Self, Error> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(Error::config(format!(
                "the retry budget's window must be between 1 s and 60 s, not {ttl:?}"
            )));
        }
        if !ratio.is_finite() || !(0.0..=1000.0).contains(&ratio) {
            return Err(Error::config(format!(
                "the retry budget's ratio must be between 0 and 1000, not {ratio}"
            )));
        }
        let mut readings = VecDeque::new();
        readings.push_back((Instant::now(), 0));
        Ok(RetryBudget {
            calls: Default::default(),
            ttl,
            min_per_sec,
            ratio: f64::from(ratio),
            window: Mutex::new(Window {
                readings,
                spent: VecDeque::new(),
            }),
        })
    }

    /// The retries a withdrawal could take now.
    pub fn available(&self) -> f64 {
        let now = Instant::now();
        let calls = self.calls_so_far();
        let mut window = self.lock();
        self.balance(&mut window, now, calls)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window holds counts only: a panic elsewhere cannot leave it inconsistent.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn calls_so_far(&self) -> u64 {
        self.calls.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }

    /// Records (now, calls so far) unless the last reading is more recent than a slot.
    fn record(window: &mut Window, now: Instant, calls: u64) {
        if window
            .readings
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= SPENT_SLOT)
        {
            window.readings.push_back((now, calls));
        }
    }

    /// The allowance of the window ending `now`, less what it spent; prunes what fell out.
    fn balance(&self, window: &mut Window, now: Instant, calls: u64) -> f64 {
        let start = now.checked_sub(self.ttl).unwrap_or(now);
        // Keep one reading from before the window to interpolate from.
        while window.readings.len() >= 2 && window.readings[1].0 <= start {
            window.readings.pop_front();
        }
        while window.spent.front().is_some_and(|(at, _)| *at <= start) {
            window.spent.pop_front();
        }
        let (t0, c0) = window.readings[0];
        let (t1, c1) = window.readings.get(1).copied().unwrap_or((now, calls));
        // Calls up to the window's start, assuming a steady rate between two readings.
        let before = if t0 >= start || t1 <= t0 {
            c0 as f64
        } else {
            let share = (start - t0).as_secs_f64() / (t1 - t0).as_secs_f64();
            c0 as f64 + (c1.saturating_sub(c0)) as f64 * share.min(1.0)
        };
        let calls_in_window = (calls as f64 - before).max(0.0);
        let spent: u64 = window.spent.iter().map(|(_, n)| n).sum();
        f64::from(self.min_per_sec) * self.ttl.as_secs_f64() + self.ratio * calls_in_window
            - spent as f64
    }
}

impl Default for RetryBudget {
    /// tower's `TpsBudget` defaults: a 10 s window, 10 retries a second, 20 % of the calls.
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 10, 0.2).expect("the default budget is valid")
    }
}

/// This thread's call counter.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD
        .try_with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            s.get()
        })
        .unwrap_or(0)
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        let before = self.calls[shard()].0.fetch_add(1, Ordering::Relaxed);
        if before % READ_EVERY == READ_EVERY - 1 {
            // Never waits: a busy window (a withdrawal, another reading) skips this one.
            if let Ok(mut window) = self.window.try_lock() {
                let now = Instant::now();
                let calls = self.calls_so_far();
                let start = now.checked_sub(self.ttl).unwrap_or(now);
                while window.readings.len() >= 2 && window.readings[1].0 <= start {
                    window.readings.pop_front();
                }
                Self::record(&mut window, now, calls);
            }
        }
    }

    fn withdraw(&self) -> bool {
        let now = Instant::now();
        let calls = self.calls_so_far();
        let mut window = self.lock();
        if self.balance(&mut window, now, calls) < 1.0 {
            return false;
        }
        Self::record(&mut window, now, calls);
        match window.spent.back_mut() {
            Some((at, n)) if now.saturating_duration_since(*at) < SPENT_SLOT => *n += 1,
            _ => window.spent.push_back((now, 1)),
        }
        true
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.ttl)
            .field("min_per_sec", &self.min_per_sec)
            .field("ratio", &self.ratio)
            .field("available", &self.available())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(min_per_sec: u32, ratio: f32) -> RetryBudget {
        RetryBudget::new(Duration::from_secs(10), min_per_sec, ratio).unwrap()
    }

    #[test]
    fn bad_parameters_are_config_errors() {
        for (ttl, ratio) in [
            (Duration::from_secs(10), f32::NAN),
            (Duration::from_secs(10), -0.1),
            (Duration::from_secs(10), 1000.5),
            (Duration::from_millis(10), 0.2),
            (Duration::from_secs(600), 0.2),
        ] {
            let error = RetryBudget::new(ttl, 1, ratio).unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::Config, "{ttl:?} {ratio}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_min_per_sec_over_the_window() {
        let budget = budget(2, 0.0);
        assert!((0..20).all(|_| budget.withdraw()), "2/s over 10 s");
        assert!(!budget.withdraw());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(budget.withdraw(), "spent retries leave the window");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_earn_their_share_and_it_grows_with_traffic() {
        let budget = budget(0, 0.2);
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(
            !budget.withdraw(),
            "four calls at 0.2 earn less than one retry"
        );
        budget.deposit();
        assert!(budget.withdraw());
        // A busy client: 10 000 calls earn 2 000 retries, all usable at once.
        for _ in 0..10_000 {
            budget.deposit();
        }
        assert!((0..2_000).all(|_| budget.withdraw()));
        assert!(!budget.withdraw());
    }

    /// `per_second` calls a second for `seconds`, in 10 steps a second.
    async fn traffic(budget: &RetryBudget, per_second: u64, seconds: u64) {
        for _ in 0..seconds * 10 {
            for _ in 0..per_second / 10 {
                budget.deposit();
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
    }

    fn assert_near(actual: f64, expected: f64, within: f64) {
        assert!(
            (actual - expected).abs() <= within,
            "{actual} is not within {within} of {expected}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_follows_the_traffic() {
        let budget = budget(0, 1.0);
        // 1 000 calls a second for 20 s: the last 10 s hold 10 000.
        traffic(&budget, 1000, 20).await;
        assert_near(budget.available(), 10_000.0, 100.0);
        // Quieter: 100 a second for 10 s.
        traffic(&budget, 100, 10).await;
        assert_near(budget.available(), 1_000.0, 100.0);
        // Silence: nothing is left after a window (within one reading interval).
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_near(budget.available(), 0.0, (READ_EVERY * 2) as f64);
    }

    #[tokio::test(start_paused = true)]
    async fn spent_retries_count_until_they_leave_the_window() {
        let budget = budget(0, 0.5);
        traffic(&budget, 100, 10).await;
        let available = budget.available();
        assert_near(available, 500.0, 50.0);
        let spent = (0..).take_while(|_| budget.withdraw()).count() as f64;
        assert_near(spent, available.floor(), 1.0);
        assert!(!budget.withdraw());
        // The retries were spent at once; the calls go on, the spending leaves the window.
        traffic(&budget, 100, 11).await;
        assert_near(budget.available(), 500.0, 50.0);
    }

    #[test]
    fn deposits_from_many_threads_are_all_counted() {
        let budget = std::sync::Arc::new(budget(0, 1.0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| budget.deposit()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(budget.calls_so_far(), 8000);
    }
}
