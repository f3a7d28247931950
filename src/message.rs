//! Application messages as the broker routes them.
//!
//! A published message is wrapped in an `Arc` once and shared by every subscriber queue, retained
//! store entry and in-flight window that holds it; the payload is a `Bytes` and is never copied per
//! subscriber.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::clock;
use crate::protocol::{MessageProperties, QoS};
use crate::sync::lock;

/// Expiry is wall-clock time so that it survives a restart.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// QoS the publisher sent it with; each subscriber gets at most its granted QoS.
    pub qos: QoS,
    pub retain: bool,
    pub properties: MessageProperties,
    /// Client that published it, for the No Local subscription option [MQTT-3.8.3-3].
    pub publisher: Option<Arc<str>>,
    /// When the Message Expiry Interval runs out.
    pub expires_at: Option<SystemTime>,
}

impl Message {
    pub fn new(
        topic: Arc<str>,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: MessageProperties,
        publisher: Option<Arc<str>>,
    ) -> Self {
        let expires_at = properties
            .message_expiry_interval
            .map(|secs| clock::now() + Duration::from_secs(u64::from(secs)));
        Self {
            topic,
            payload,
            qos,
            retain,
            properties,
            publisher,
            expires_at,
        }
    }

    /// Seconds of the expiry interval left (at least 1): `None` when there is no expiry, and
    /// `Err(Expired)` when the message has expired and must not be delivered [MQTT-3.3.2-5].
    pub fn remaining_expiry(&self, now: SystemTime) -> Result<Option<u32>, Expired> {
        match self.expires_at {
            None => Ok(None),
            Some(at) if at <= now => Err(Expired),
            Some(at) => {
                let left = at
                    .duration_since(now)
                    .unwrap_or_default()
                    .as_secs_f64()
                    .ceil() as u32;
                Ok(Some(left.max(1)))
            }
        }
    }

    /// Bytes the message holds in memory: the struct, topic, payload and properties.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.topic.len()
            + self.payload.len()
            + self.properties.heap_size()
    }
}

/// The message's expiry interval has run out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired;

/// A stored message record, referenced by the deliveries it lists and by `queue` entries;
/// the record is deleted when the last reference is released. Storage keys are opaque here:
/// `storage` decides what they are.
///
/// Only the storage writer thread releases references (`storage::Op::Release`), in the order requests reach
/// it: so a `Released` record is never written after the delete that was meant to clean it
/// up, whichever connection tasks raced to release the message's deliveries.
#[derive(Debug)]
pub struct StoredMessage {
    pub id: u64,
    refs: AtomicUsize,
    /// Keys of the `Released` records written for this message; they go with the record.
    released: Mutex<Vec<Vec<u8>>>,
}

impl StoredMessage {
    pub fn new(id: u64, refs: usize) -> Self {
        Self::recovered(id, refs, Vec::new())
    }

    /// A record read back at start-up, with the `Released` records found for it.
    pub fn recovered(id: u64, refs: usize, released: Vec<Vec<u8>>) -> Self {
        Self {
            id,
            refs: AtomicUsize::new(refs),
            released: Mutex::new(released),
        }
    }

    /// Drops one reference; returns true when it was the last (the record must go).
    pub fn release_reference(&self) -> bool {
        self.refs.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Remembers the key of a `Released` record written for this message.
    pub fn add_mask(&self, key: Vec<u8>) {
        lock(&self.released).push(key);
    }

    /// The keys of the `Released` records, which go with the record.
    pub fn take_masks(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *lock(&self.released))
    }
}

/// A message on its way to one subscriber, with what that subscription decided about it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// min(message QoS, granted QoS) [MQTT-3.8.4-8].
    pub qos: QoS,
    /// The RETAIN flag to send: set for retained messages sent on subscribe [MQTT-3.3.1-8],
    /// otherwise the publisher's flag only under Retain As Published [MQTT-3.3.1-12/13].
    pub retain: bool,
    /// Identifiers of every matching subscription that carried one (v5) [MQTT-3.3.4-3].
    pub subscription_ids: Vec<u32>,
    /// Position in the session's queue. The outbound packet id is derived from it, so a
    /// delivery recovered after a restart goes out with the packet id it may have had before.
    pub seq: u64,
    /// The stored message record, when this delivery is persisted for a persistent session.
    pub stored: Option<Arc<StoredMessage>>,
    /// Recovered after a restart, so it may have been sent already: sent with DUP.
    pub dup: bool,
    /// Recovered past PUBREC: only PUBREL is re-sent.
    pub awaiting_pubcomp: bool,
    /// Listed in its stored message record (see `records::StoredTarget`).
    pub listed: bool,
    /// Has a `queue` record of its own (handed over from another shared-subscription member,
    /// or past PUBREC).
    pub own_entry: bool,
    /// The shared subscription (`$share/<group>/<filter>`) it came through, so that another
    /// member can take it when this session's client goes away.
    pub share: Option<Arc<str>>,
    /// In a cluster: the message's position in the replication log, for a delivery the log
    /// brought (see `session::LogPosition`); `Some(0)` for one recovered after a
    /// restart, whose position is not known.
    pub log_seq: Option<u64>,
}

impl Delivery {
    /// Bytes one queued delivery accounts for: its own bookkeeping plus the whole message.
    /// The message is shared by every queue holding it, but each queue is bounded as if it held
    /// its own copy, so one queue's bound does not depend on what other sessions do.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.subscription_ids.len() * std::mem::size_of::<u32>()
            + self.message.footprint()
    }

    pub fn new(
        message: Arc<Message>,
        qos: QoS,
        retain: bool,
        subscription_ids: Vec<u32>,
        seq: u64,
    ) -> Self {
        Self {
            message,
            qos,
            retain,
            subscription_ids,
            seq,
            stored: None,
            dup: false,
            awaiting_pubcomp: false,
            listed: false,
            own_entry: false,
            share: None,
            log_seq: None,
        }
    }
}
