//! Delayed delivery: a PUBLISH to `$delayed/<seconds>/<topic>` is held, in storage so that it
//! survives a restart, and published to `<topic>` when its delay has passed.
//!
//! The index lives in memory in due order, bounded by `delayed.max_messages`; one task sleeps
//! until the earliest message is due and publishes it the way a will is published (durably for
//! persistent subscribers), then deletes the stored record. A crash between the two publishes
//! it again after the restart: at least once, like any QoS 1 message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::{self, from_unix_ms, unix_ms};
use crate::config::DelayedConfig;
use crate::message::Message;
use crate::publish::Pipeline;
use crate::storage::{ops, Op};
use crate::sync::lock;

/// Topic prefix of delayed publishes.
pub const PREFIX: &str = "$delayed/";

/// Why a delayed publish was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayRefused {
    /// Not `$delayed/<seconds>/<topic>` with a valid topic, or a delay past the maximum.
    Malformed,
    /// `delayed.max_messages` are held already.
    Full,
}

/// Splits `$delayed/<seconds>/<topic>`; `None` when the topic is not a delayed publish.
pub fn parse(topic: &str, max_delay: u32) -> Option<Result<(u32, &str), DelayRefused>> {
    let rest = topic.strip_prefix(PREFIX)?;
    let parsed = rest.split_once('/').and_then(|(seconds, inner)| {
        let seconds: u32 = seconds.parse().ok()?;
        // The inner topic is published like any other: no wildcards, not empty, and not
        // itself delayed [MQTT-4.7.3-1], [MQTT-3.3.2-2].
        let valid = !inner.is_empty()
            && !inner.contains(['+', '#'])
            && !inner.starts_with(PREFIX)
            && seconds <= max_delay;
        valid.then_some((seconds, inner))
    });
    Some(parsed.ok_or(DelayRefused::Malformed))
}

/// Key of a held message: due time in milliseconds and a unique id.
type DueKey = (u64, u64);

#[derive(Debug)]
pub struct DelayedMessages {
    held: Mutex<BTreeMap<DueKey, Arc<Message>>>,
    /// Woken when a message due earlier than the one the task sleeps for arrives.
    changed: Notify,
    max_messages: usize,
    next_id: AtomicU64,
}

impl DelayedMessages {
    pub fn new(config: &DelayedConfig, first_id: u64) -> Self {
        Self {
            held: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            max_messages: config.max_messages,
            next_id: AtomicU64::new(first_id),
        }
    }

    /// Holds `message` until `due`; returns the storage operation that makes it durable.
    pub fn hold(&self, message: Arc<Message>, due: SystemTime) -> Result<Op, DelayRefused> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (unix_ms(due), id);
        let op = ops::delayed_put(key.0, key.1, &message);
        {
            let mut held = lock(&self.held);
            if held.len() >= self.max_messages {
                return Err(DelayRefused::Full);
            }
            held.insert(key, message);
        }
        self.changed.notify_one();
        Ok(op)
    }

    /// Puts back a message recovered from storage (accepted before the restart, so never
    /// refused).
    pub fn restore(&self, due_millis: u64, id: u64, message: Message) {
        lock(&self.held).insert((due_millis, id), Arc::new(message));
    }

    pub fn len(&self) -> usize {
        lock(&self.held).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every message due at `now`, and says when the next one is due.
    fn take_due(&self, now: SystemTime) -> (Vec<(DueKey, Arc<Message>)>, Option<SystemTime>) {
        let mut held = lock(&self.held);
        let now_ms = unix_ms(now);
        let later = held.split_off(&(now_ms + 1, 0));
        let due = std::mem::replace(&mut *held, later);
        let next = held.keys().next().map(|(ms, _)| from_unix_ms(*ms));
        (due.into_iter().collect(), next)
    }
}

/// Publishes delayed messages as they fall due, until shutdown.
pub async fn run(delayed: &DelayedMessages, pipeline: &Pipeline, shutdown: CancellationToken) {
    loop {
        let (due, next) = delayed.take_due(clock::now());
        for ((due_ms, id), message) in due {
            pipeline.publish(message).await;
            pipeline
                .write_behind(vec![ops::delayed_delete(due_ms, id)])
                .await;
        }
        let wait = next.map(|at| {
            // Rounded up to the next millisecond, so a message is never published early.
            at.duration_since(clock::now())
                .unwrap_or_default()
                .saturating_add(Duration::from_millis(1))
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = delayed.changed.notified() => {}
            _ = sleep_or_forever(wait) => {}
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delayed_topics_are_parsed_and_checked() {
        assert_eq!(parse("a/b", 100), None);
        assert_eq!(parse("$delayed/10/a/b", 100), Some(Ok((10, "a/b"))));
        for bad in [
            "$delayed/x/a",
            "$delayed/10",
            "$delayed/10/",
            "$delayed/101/a",
            "$delayed/-1/a",
            "$delayed/1/a/+",
            "$delayed/1/$delayed/1/a",
        ] {
            assert_eq!(parse(bad, 100), Some(Err(DelayRefused::Malformed)), "{bad}");
        }
    }

    #[test]
    fn messages_come_out_in_due_order_and_the_limit_holds() {
        let delayed = DelayedMessages::new(
            &DelayedConfig {
                max_messages: 2,
                max_delay: 100,
            },
            1,
        );
        let message = |topic: &str| {
            Arc::new(Message::new(
                topic.into(),
                Default::default(),
                crate::protocol::QoS::AtLeastOnce,
                false,
                Default::default(),
                None,
            ))
        };
        let now = SystemTime::now();
        delayed
            .hold(message("late"), now + Duration::from_secs(20))
            .unwrap();
        delayed
            .hold(message("early"), now + Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            delayed.hold(message("x"), now).unwrap_err(),
            DelayRefused::Full
        );
        let (due, next) = delayed.take_due(now + Duration::from_secs(5));
        assert!(due.is_empty());
        assert_eq!(
            next.map(unix_ms),
            Some(unix_ms(now + Duration::from_secs(10)))
        );
        let (due, _) = delayed.take_due(now + Duration::from_secs(30));
        let topics: Vec<&str> = due.iter().map(|(_, m)| &*m.topic).collect();
        assert_eq!(topics, ["early", "late"]);
        assert!(delayed.is_empty());
    }
}
