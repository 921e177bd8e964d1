//! [`OutageGate`]: one client's pace of connection checks while no node answers.
//!
//! A client checks the cluster from two places — the rebuild layer's connect (a TCP check of
//! the seeds and known nodes) and the topology refresh (a request to some of them) — and
//! both react to failing calls. Through a total outage each would keep dialling every node it
//! knows at its own backoff, and a fleet of clients multiplies that. The gate, shared by the
//! two through the client's address book, turns them into one paced check: once an attempt
//! reached no node, the next ones ask **one** node at a time, at most once per delay that
//! grows from 250 ms to 2 s (each drawn between half of it and all of it, so a fleet spreads
//! out), and fail at once in between. The first node that answers ends it — a check, or any
//! other connection of this crate's own to a node that answered its handshake. The inner client's own reconnects ask the gate too
//! (through its resolver, [`InnerDials`](super::address_book::InnerDials)): between checks they
//! fail at once, without dialling; so they are never held longer than the gate's delay, even
//! when nothing runs the next check.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;
use tower::util::rng::HasherRng;

/// The first delay between checks once no node answered.
const FIRST: Duration = Duration::from_millis(250);
/// The longest delay between checks.
const CAP: Duration = Duration::from_secs(2);

/// Who checks: each takes its own turns through its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checker {
    /// The rebuild layer's connect.
    Connect = 0,
    /// A topology refresh.
    Refresh = 1,
}

/// What an attempt to reach the cluster may do now. `epoch` goes back with its result: a
/// result of an attempt that began before another reached a node is not news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// The last attempt reached a node (or none failed yet): ask every candidate.
    Clear { epoch: u64 },
    /// No node answered since `since`; the next check is due at `next`: fail without dialling.
    Wait { since: Instant, next: Instant },
    /// A check is due: ask one candidate only, this turn's (`turn` counts this checker's
    /// checks).
    One { turn: usize, epoch: u64 },
}

pub(crate) struct OutageGate {
    state: Mutex<State>,
    /// Changes whenever an attempt reached a node while none had (the value is not read):
    /// what waits for the next check wakes up instead.
    answered: tokio::sync::watch::Sender<u64>,
}

struct State {
    /// Since when no attempt reached a node; `None` while they do.
    since: Option<Instant>,
    next: Instant,
    delay: Duration,
    turns: [usize; 2],
    /// Counts the attempts that reached a node.
    epoch: u64,
    /// Why the last attempt reached no node.
    cause: Option<crate::Error>,
    rng: HasherRng,
}

impl OutageGate {
    pub(crate) fn new() -> Self {
        OutageGate {
            state: Mutex::new(State {
                since: None,
                next: Instant::now(),
                delay: FIRST,
                turns: [0; 2],
                epoch: 0,
                cause: None,
                rng: HasherRng::default(),
            }),
            answered: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes when a node answers after none did: for whoever waits for the next check.
    pub(crate) fn answered(&self) -> tokio::sync::watch::Receiver<u64> {
        self.answered.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain assignments only: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What an attempt of `who` starting now may do. A check that is due is handed to one
    /// attempt only: the next is due a delay later.
    pub(crate) fn check(&self, who: Checker) -> Check {
        let now = Instant::now();
        let mut state = self.lock();
        let epoch = state.epoch;
        let Some(since) = state.since else {
            return Check::Clear { epoch };
        };
        if now < state.next {
            return Check::Wait {
                since,
                next: state.next,
            };
        }
        let turn = state.turns[who as usize];
        state.turns[who as usize] = turn.wrapping_add(1);
        let delay = state.delay;
        state.next = now + state.jittered(delay);
        state.delay = (delay * 2).min(CAP);
        Check::One { turn, epoch }
    }

    /// An attempt reached a node: attempts ask every candidate again.
    pub(crate) fn reached(&self) {
        let mut state = self.lock();
        let was_down = state.since.take();
        state.delay = FIRST;
        state.cause = None;
        state.epoch = state.epoch.wrapping_add(1);
        let epoch = state.epoch;
        drop(state);
        if let Some(since) = was_down {
            tracing::info!(
                down_ms = since.elapsed().as_millis() as u64,
                "a node answers again: connection checks back to normal"
            );
            self.answered.send_replace(epoch);
        }
    }

    /// While no node answered and the next check is not due yet: since when, and when it is
    /// due. Once it is due, dials go (whoever dials first).
    pub(crate) fn holding(&self) -> Option<(Instant, Instant)> {
        let now = Instant::now();
        let state = self.lock();
        match state.since {
            Some(since) if now < state.next => Some((since, state.next)),
            _ => None,
        }
    }

    /// When the next check is due, while no node answers.
    pub(crate) fn next_check(&self) -> Option<Instant> {
        let state = self.lock();
        state.since.map(|_| state.next)
    }

    /// Why the last attempt reached no node, while none does.
    pub(crate) fn cause(&self) -> Option<crate::Error> {
        let state = self.lock();
        state.since.and(state.cause.clone())
    }

    /// An attempt begun at `epoch` reached no node, for `cause`. Not news when another
    /// attempt reached one since it began.
    pub(crate) fn unreached(&self, epoch: u64, cause: Option<crate::Error>) {
        let now = Instant::now();
        let mut state = self.lock();
        if epoch != state.epoch {
            return;
        }
        if cause.is_some() {
            state.cause = cause;
        }
        if state.since.is_none() {
            tracing::warn!(
                "no node answered: checking one node at a time, at most every {CAP:?}, until one does"
            );
            state.since = Some(now);
            state.delay = FIRST;
            state.next = now + state.jittered(FIRST);
            state.delay = (FIRST * 2).min(CAP);
        }
    }
}

/// The error of an attempt the gate holds back: no node answered since `since`, the next
/// check is due at `next`; with the last attempt's failure as its cause.
fn waiting(since: Instant, next: Instant, cause: Option<crate::Error>) -> crate::Error {
    let now = Instant::now();
    let mut error = crate::Error::unreachable(format!(
        "no node has answered for {:?}; the next check is in {:?}",
        now.saturating_duration_since(since),
        next.saturating_duration_since(now)
    ));
    if let Some(cause) = cause {
        error = error.with_source(cause);
    }
    error.with_retry_at(Some(next))
}

impl OutageGate {
    /// The error of an attempt this gate holds back (`Check::Wait { since, next }`): unsent,
    /// with the last check's failure as its cause, told when to try again.
    pub(crate) fn held_back(&self, since: Instant, next: Instant) -> crate::Error {
        self.retry_when_due(waiting(since, next, self.cause()).with_sent(crate::Sent::No))
    }

    /// `error`, told when this gate's next check is due — and to wake
    /// earlier if a node answers meanwhile.
    pub(crate) fn retry_when_due(&self, error: crate::Error) -> crate::Error {
        // Subscribed first: a node answering from here on wakes the waiter.
        let wake = self.answered();
        let error = match error.retry_at() {
            Some(_) => error,
            None => error.with_retry_at(self.next_check()),
        };
        error.with_retry_wake(wake)
    }
}

impl State {
    /// Between half of `delay` and all of it: the refresher's jitter, ±⅓ around ¾ of it.
    fn jittered(&mut self, delay: Duration) -> Duration {
        crate::topology::refresher::jittered(delay.mul_f64(0.75), 1.0 / 3.0, &mut self.rng)
    }
}

impl std::fmt::Debug for OutageGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("OutageGate")
            .field("since", &state.since)
            .field("next", &state.next)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn what_waits_for_the_next_check_goes_at_once_when_a_node_answers_meanwhile() {
        let gate = OutageGate::new();
        let Check::Clear { epoch } = gate.check(Checker::Connect) else {
            panic!("not clear at first");
        };
        gate.unreached(epoch, None);
        let Check::Wait { since, next } = gate.check(Checker::Connect) else {
            panic!("no wait right after a check that reached no node");
        };
        let error = gate.held_back(since, next);
        assert_eq!(error.retry_at(), Some(next));
        // Nothing answers: the wait lasts until the check is due.
        let started = Instant::now();
        error.until_retry().await;
        assert!(
            Instant::now() >= next,
            "woke {:?} early",
            next - Instant::now()
        );
        assert!(Instant::now() < next.max(started) + Duration::from_millis(5));

        // A node answers another check meanwhile: the wait ends then.
        let Check::One { epoch, .. } = gate.check(Checker::Refresh) else {
            panic!("no check due");
        };
        gate.unreached(epoch, None);
        let error = gate.retry_when_due(crate::Error::unreachable("no node answered"));
        let due = error.retry_at().expect("told when the next check is due");
        assert!(due > Instant::now());
        let waiting = tokio::spawn(async move { error.until_retry().await });
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(!waiting.is_finished());
        gate.reached();
        waiting.await.unwrap();
        assert!(
            Instant::now() < due,
            "waited for the due time although a node answered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_attempt_that_reached_no_node_checks_go_one_at_a_time_at_a_growing_pace() {
        let gate = OutageGate::new();
        let Check::Clear { epoch } = gate.check(Checker::Connect) else {
            panic!("not clear at first");
        };
        gate.unreached(epoch, None);
        // Until the first check is due, attempts fail without dialling.
        assert!(matches!(gate.check(Checker::Refresh), Check::Wait { .. }));
        let mut dues = Vec::new();
        let started = Instant::now();
        let mut turns = [0usize; 2];
        while started.elapsed() < Duration::from_secs(10) {
            // The two checkers ask in turn; each goes through its own candidates.
            let who = if dues.len() % 2 == 0 {
                Checker::Connect
            } else {
                Checker::Refresh
            };
            match gate.check(who) {
                Check::One { turn, epoch } => {
                    assert_eq!(turn, turns[who as usize], "one attempt per due check");
                    turns[who as usize] += 1;
                    dues.push(started.elapsed());
                    // A second attempt at the same moment waits.
                    assert!(matches!(gate.check(Checker::Connect), Check::Wait { .. }));
                    gate.unreached(epoch, None);
                }
                Check::Wait { next, .. } => assert!(next > Instant::now()),
                Check::Clear { .. } => panic!("cleared without a node answering"),
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // 125–250 ms, then growing to 1–2 s apart: 6 to 13 checks in 10 s, not one per
        // attempt.
        assert!((6..=13).contains(&dues.len()), "{dues:?}");
        assert!(dues[0] >= Duration::from_millis(120), "{dues:?}");
        for pair in dues.windows(2).skip(3) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(990) && gap <= Duration::from_millis(2_010),
                "{dues:?}"
            );
        }
        // An attempt begun before a node answered, that reached none, is not news.
        let Check::Wait { .. } = gate.check(Checker::Connect) else {
            panic!("a check was due twice");
        };
        tokio::time::advance(Duration::from_secs(2)).await;
        let Check::One { epoch: stale, .. } = gate.check(Checker::Refresh) else {
            panic!("no check due after 2 s");
        };
        gate.reached();
        gate.unreached(stale, None);
        let Check::Clear { epoch } = gate.check(Checker::Connect) else {
            panic!("a stale failure closed the gate again");
        };
        // A current one is.
        gate.unreached(epoch, None);
        assert!(matches!(gate.check(Checker::Connect), Check::Wait { .. }));
    }
}
