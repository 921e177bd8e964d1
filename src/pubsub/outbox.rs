//! The bounded queue between the connections and the consumer.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{
    driver::{Back, Key},
    Event, Kind, Message,
};
use crate::{connect::Endpoint, Error};

/// Messages and events waiting for the consumer. Messages are bounded: beyond `capacity`, a new
/// message is dropped and counted in an [`Event::Overflow`] at its place in the sequence.
/// Events about subscriptions are never dropped, and never pile up either: the events queued
/// after the last message are merged into one per kind of news (an overflow, what was lost,
/// what is back on each node), each subscription keeping its last word — so a consumer that
/// does not read while a node flaps holds at most a few events per subscription.
pub(super) struct Outbox {
    state: Mutex<State>,
    client: Arc<str>,
}

struct State {
    queue: VecDeque<Event>,
    /// Messages in `queue`.
    messages: usize,
    capacity: usize,
    waker: Option<Waker>,
    /// The task ended: once the queue is empty, the stream ends.
    closed: bool,
}

/// A subscription's last word in a run of events: lost (`None`), or back on a node.
type LastWord = Option<Endpoint>;

impl State {
    /// Merges the events after the last message, when there are more than a few: overflow
    /// counts add up (one `Overflow`, first); a subscription lost there is reported lost once
    /// (with the first cause of its kind), and back (with its longest gap there) only if back
    /// was its last word.
    fn compact_tail(&mut self) {
        let start = self
            .queue
            .iter()
            .rposition(|e| matches!(e, Event::Message(_)))
            .map_or(0, |i| i + 1);
        if self.queue.len() - start <= 3 {
            return;
        }
        let mut dropped = 0;
        let mut lost: BTreeMap<Kind, (BTreeSet<Vec<u8>>, Error)> = BTreeMap::new();
        // Each subscription's last word: lost (`None`), or back on a node after a gap.
        let mut last: BTreeMap<Key, LastWord> = BTreeMap::new();
        // The longest gap of each subscription in the run, whatever its last word.
        let mut longest: BTreeMap<Key, Duration> = BTreeMap::new();
        for event in self.queue.drain(start..) {
            match event {
                Event::Overflow { dropped: n } => dropped += n,
                Event::Lost { kind, names, cause } => {
                    let entry = lost.entry(kind).or_insert_with(|| (BTreeSet::new(), cause));
                    for name in names {
                        entry.0.insert(name.clone());
                        last.insert((kind, name), None);
                    }
                }
                Event::Resubscribed {
                    kind,
                    names,
                    node,
                    gap,
                } => {
                    for name in names {
                        let key = (kind, name);
                        let g = longest.entry(key.clone()).or_default();
                        *g = (*g).max(gap);
                        last.insert(key, Some(node.clone()));
                    }
                }
                Event::Message(_) => unreachable!("the tail starts after the last message"),
            }
        }
        if dropped > 0 {
            self.queue.push_back(Event::Overflow { dropped });
        }
        for (kind, (names, cause)) in lost {
            self.queue.push_back(Event::Lost {
                kind,
                names: names.into_iter().collect(),
                cause,
            });
        }
        let mut back: BTreeMap<(Kind, Endpoint), Back> = BTreeMap::new();
        for (key, word) in last {
            if let Some(node) = word {
                let gap = longest.get(&key).copied().unwrap_or_default();
                let entry = back.entry((key.0, node)).or_default();
                entry.0.push(key.1);
                entry.1 = entry.1.max(gap);
            }
        }
        for ((kind, node), (names, gap)) in back {
            self.queue.push_back(Event::Resubscribed {
                kind,
                names,
                node,
                gap,
            });
        }
    }
}

impl Outbox {
    pub(super) fn new(capacity: usize, client: &str) -> Self {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                messages: 0,
                capacity,
                waker: None,
                closed: false,
            }),
            client: Arc::from(client),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds a valid queue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most messages that wait for the consumer.
    pub(super) fn capacity(&self) -> usize {
        self.lock().capacity
    }

    /// Queues a message, or counts it dropped when the consumer is `capacity` behind.
    pub(super) fn message(&self, message: Message) {
        let mut state = self.lock();
        if state.messages >= state.capacity {
            Self::drop_newest(&self.client, &mut state, 1);
            return;
        }
        state.messages += 1;
        state.queue.push_back(Event::Message(message));
        if let Some(w) = state.waker.take() {
            drop(state);
            w.wake();
        }
    }

    /// Counts `n` messages dropped here, as a full buffer does.
    pub(super) fn dropped(&self, n: u64) {
        if n > 0 {
            Self::drop_newest(&self.client, &mut self.lock(), n);
        }
    }

    fn drop_newest(client: &str, state: &mut State, n: u64) {
        if let Some(Event::Overflow { dropped }) = state.queue.back_mut() {
            *dropped += n;
        } else {
            state.queue.push_back(Event::Overflow { dropped: n });
            tracing::warn!(
                capacity = state.capacity,
                "subscriber buffer full: dropping messages until the consumer catches up"
            );
        }
        // Counted before the consumer can see the overflow: the two always agree.
        crate::metrics::pubsub_dropped(client, n);
    }

    /// Queues an event about subscriptions.
    pub(super) fn event(&self, event: Event) {
        let mut state = self.lock();
        state.queue.push_back(event);
        state.compact_tail();
        if let Some(w) = state.waker.take() {
            drop(state);
            w.wake();
        }
    }

    pub(super) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut state = self.lock();
        match state.queue.pop_front() {
            Some(event) => {
                if matches!(event, Event::Message(_)) {
                    state.messages -= 1;
                }
                Poll::Ready(Some(event))
            }
            None if state.closed => Poll::Ready(None),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        if let Some(w) = state.waker.take() {
            drop(state);
            w.wake();
        }
    }

    pub(super) fn len(&self) -> usize {
        self.lock().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::Kind;
    use futures_util::task::noop_waker_ref;

    fn message(n: u32) -> Message {
        Message {
            kind: Kind::Channel,
            channel: b"c".to_vec(),
            pattern: None,
            payload: n.to_string().into_bytes(),
        }
    }

    fn drain(outbox: &Outbox) -> Vec<String> {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = Vec::new();
        while let Poll::Ready(Some(e)) = outbox.poll_next(&mut cx) {
            out.push(match e {
                Event::Message(m) => m.payload_str().unwrap().to_string(),
                Event::Overflow { dropped } => format!("overflow {dropped}"),
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[test]
    fn a_full_buffer_drops_the_newest_messages_and_says_how_many_where() {
        let outbox = Outbox::new(2, "t");
        for n in 1..=5 {
            outbox.message(message(n));
        }
        assert_eq!(drain(&outbox), ["1", "2", "overflow 3"]);
        // Room again: messages flow, and a later overflow is reported on its own.
        for n in 6..=9 {
            outbox.message(message(n));
        }
        assert_eq!(drain(&outbox), ["6", "7", "overflow 2"]);
    }

    #[test]
    fn a_flapping_node_does_not_pile_events_up_for_a_consumer_that_does_not_read() {
        let outbox = Outbox::new(4, "t");
        let node = |n: u16| Endpoint::from(std::net::SocketAddr::from(([127, 0, 0, 1], n)));
        outbox.message(message(1));
        for round in 0..1000u64 {
            outbox.event(Event::Lost {
                kind: Kind::Channel,
                names: vec![b"a".to_vec(), b"b".to_vec()],
                cause: crate::Error::closed("test"),
            });
            // `b` stays lost after the last round; `a` comes back each time.
            if round < 999 {
                outbox.event(Event::Resubscribed {
                    kind: Kind::Channel,
                    names: vec![b"a".to_vec(), b"b".to_vec()],
                    node: node(7000),
                    gap: Duration::from_millis(round % 500),
                });
            } else {
                outbox.event(Event::Resubscribed {
                    kind: Kind::Channel,
                    names: vec![b"a".to_vec()],
                    node: node(7001),
                    gap: Duration::from_millis(5),
                });
            }
        }
        assert!(outbox.len() <= 4, "{} queued", outbox.len());
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut got = Vec::new();
        while let Poll::Ready(Some(e)) = outbox.poll_next(&mut cx) {
            got.push(e);
        }
        assert!(matches!(&got[0], Event::Message(_)));
        match &got[1] {
            Event::Lost { names, .. } => assert_eq!(names, &[b"a".to_vec(), b"b".to_vec()]),
            other => panic!("{other:?}"),
        }
        // Only `a` is back, on the node of its last word; `b`'s last word was `Lost`.
        match &got[2] {
            Event::Resubscribed {
                names,
                node: n,
                gap,
                ..
            } => {
                assert_eq!(names, &[b"a".to_vec()]);
                assert_eq!(*n, node(7001));
                // The longest gap of the run, not the last one.
                assert_eq!(*gap, Duration::from_millis(499));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn subscription_events_are_never_dropped_and_keep_their_place() {
        let outbox = Outbox::new(1, "t");
        outbox.message(message(1));
        outbox.message(message(2));
        outbox.event(Event::Lost {
            kind: Kind::Channel,
            names: vec![b"c".to_vec()],
            cause: crate::Error::closed("test"),
        });
        outbox.message(message(3));
        outbox.close();
        let got = drain(&outbox);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[..2], ["1", "overflow 1"]);
        assert!(got[2].starts_with("Lost"), "{got:?}");
        assert_eq!(got[3], "overflow 1");
        // Closed and drained: the stream ends.
        let mut cx = Context::from_waker(noop_waker_ref());
        assert_eq!(
            outbox.poll_next(&mut cx).map(|e| e.is_none()),
            Poll::Ready(true)
        );
    }
}
