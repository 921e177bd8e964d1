//! The bounded queue between the connections and the consumer.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use super::{Event, Message};

/// Messages and events waiting for the consumer. Messages are bounded: beyond `capacity`, a new
/// message is dropped and counted in an [`Event::Overflow`] at its place in the sequence.
/// Events about subscriptions are never dropped (there are as many as subscription changes,
/// a handful per failover).
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

    /// Queues a message, or counts it dropped when the consumer is `capacity` behind.
    pub(super) fn message(&self, message: Message) {
        let mut state = self.lock();
        if state.messages >= state.capacity {
            if let Some(Event::Overflow { dropped }) = state.queue.back_mut() {
                *dropped += 1;
            } else {
                state.queue.push_back(Event::Overflow { dropped: 1 });
                tracing::warn!(
                    capacity = state.capacity,
                    "subscriber buffer full: dropping messages until the consumer catches up"
                );
            }
            drop(state);
            crate::metrics::pubsub_dropped(&self.client);
            return;
        }
        state.messages += 1;
        state.queue.push_back(Event::Message(message));
        if let Some(w) = state.waker.take() {
            drop(state);
            w.wake();
        }
    }

    /// Queues an event about subscriptions.
    pub(super) fn event(&self, event: Event) {
        let mut state = self.lock();
        state.queue.push_back(event);
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
