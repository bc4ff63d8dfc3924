//! CPA's in-process pub/sub channels (`internal/redisqueue/queue.go`, v7.2.140), behind RESP
//! `SUBSCRIBE usage` and `SUBSCRIBE errors`: every subscriber has a buffer of
//! [`SUBSCRIBER_BUFFER`] messages; a publish that finds a subscriber's buffer full drops that
//! subscriber at once (its channel is closed: its connection writes out what was buffered, then
//! closes) and the message is lost for it. Publishing never waits.

use std::borrow::Cow;

use tokio::sync::mpsc;

/// CPA's `usageSubscriberBuffer` and `errorSubscriberBuffer`.
pub(crate) const SUBSCRIBER_BUFFER: usize = 256;
/// The first message of every usage subscription (CPA's `usageSupportRefreshPayload`).
pub(crate) const SUPPORT_REFRESH: &str = r#"{"support_refresh":true}"#;
/// Published on `usage` when credentials change (CPA's `usageRefreshPayload`).
pub(crate) const REFRESH: &str = r#"{"refresh":true}"#;

/// One published payload, as it goes on the wire.
#[derive(Debug)]
pub(crate) struct Message {
    pub bytes: Vec<u8>,
    /// A usage record or error event (not a control payload): what the stats count.
    pub counted: bool,
}

/// What one publish did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Published {
    /// Subscribers there were when it was published.
    pub subscribers: usize,
    /// Copies accepted into a subscriber's buffer.
    pub delivered: usize,
    /// Subscribers dropped because their buffer was full.
    pub dropped: usize,
}

/// One channel's subscribers.
#[derive(Debug, Default)]
pub(crate) struct Channel {
    subscribers: Vec<(u64, mpsc::Sender<Message>)>,
    next_id: u64,
}

impl Channel {
    /// A new subscriber, with `initial` already in its buffer (as CPA puts it before registering).
    pub fn subscribe(&mut self, initial: Option<&str>) -> (u64, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        if let Some(payload) = initial {
            // A fresh channel has room: this cannot fail.
            let _ = tx.try_send(Message {
                bytes: payload.as_bytes().to_vec(),
                counted: false,
            });
        }
        self.next_id += 1;
        self.subscribers.push((self.next_id, tx));
        (self.next_id, rx)
    }

    /// Removes a subscriber (no-op when it was already dropped).
    pub fn unsubscribe(&mut self, id: u64) {
        self.subscribers.retain(|(sid, _)| *sid != id);
    }

    /// Offers `payload` to every subscriber; full ones are dropped.
    pub fn publish(&mut self, payload: &[u8], counted: bool) -> Published {
        let mut out = Published {
            subscribers: self.subscribers.len(),
            ..Published::default()
        };
        self.subscribers.retain(|(_, tx)| {
            let msg = Message {
                bytes: payload.to_vec(),
                counted,
            };
            match tx.try_send(msg) {
                Ok(()) => {
                    out.delivered += 1;
                    true
                }
                // Full: CPA deletes and closes it. Closed: its connection is gone already.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    out.dropped += 1;
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        out
    }

    /// Closes every subscription (CPA's `clear`, when management is switched off).
    pub fn close_all(&mut self) {
        self.subscribers.clear();
    }

    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }
}

/// The bytes CPA publishes for a queue element. The queue holds each element as the JSON text of
/// the HTTP array, where CPA wraps a payload that is not JSON in a JSON string; over RESP (pops
/// and pub/sub alike) the payload goes out as published.
pub(crate) fn raw_payload(element_json: &str) -> Cow<'_, str> {
    match serde_json::from_str::<String>(element_json) {
        Ok(inner) if serde_json::from_str::<serde::de::IgnoredAny>(&inner).is_err() => {
            Cow::Owned(inner)
        }
        _ => Cow::Borrowed(element_json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_subscriber_is_dropped_and_misses_the_message() {
        let mut ch = Channel::default();
        let (_, mut slow) = ch.subscribe(Some(SUPPORT_REFRESH));
        let (_, mut fast) = ch.subscribe(None);
        for _ in 1..SUBSCRIBER_BUFFER {
            assert_eq!(ch.publish(b"r", true).dropped, 0);
            assert!(fast.try_recv().is_ok());
        }
        let full = ch.publish(b"last", true);
        assert_eq!(
            full,
            Published {
                subscribers: 2,
                delivered: 1,
                dropped: 1
            }
        );
        assert_eq!(ch.len(), 1);
        assert_eq!(
            fast.try_recv().map(|m| m.bytes).ok(),
            Some(b"last".to_vec())
        );
        let mut buffered = 0;
        while let Ok(msg) = slow.try_recv() {
            assert_ne!(msg.bytes, b"last");
            buffered += 1;
        }
        assert_eq!(buffered, SUBSCRIBER_BUFFER, "the control payload counts");
        assert!(slow.is_closed(), "its channel is closed once drained");
    }

    #[test]
    fn raw_payloads_unwrap_strings_that_are_not_json() {
        assert_eq!(raw_payload(r#""not json""#), "not json");
        assert_eq!(raw_payload(r#""{\"n\":2}""#), r#""{\"n\":2}""#);
        assert_eq!(raw_payload(r#"{"n":1}"#), r#"{"n":1}"#);
    }
}
