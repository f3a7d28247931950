//! The write operations the rest of the broker asks for, by what they mean: which column family,
//! key and record each comes to stays inside `storage` (`keys`, `records`).

use std::sync::Arc;
use std::time::SystemTime;

use super::records::{self, QueueEntry, SessionRecord, StoredWill, TargetRef};
use super::{keys, Cf, Op, Release};
use crate::message::{Delivery, Message, StoredMessage};

/// The retained store's change for a retained `message`: set, or cleared by an empty payload
/// [MQTT-3.3.1-10].
pub fn retained(message: &Message) -> Op {
    let key = keys::retained(&message.topic);
    if message.payload.is_empty() {
        Op::Delete(Cf::Retained, key)
    } else {
        Op::Put(Cf::Retained, key, records::encode_message(message))
    }
}

/// A retained message found expired at start-up.
pub fn retained_delete(topic: &str) -> Op {
    Op::Delete(Cf::Retained, keys::retained(topic))
}

/// One record for `message` listing the deliveries (session store id, delivery) that
/// persistent sessions take; `count` is their number.
pub fn message_put<'a>(
    stored: &StoredMessage,
    message: &Message,
    count: usize,
    deliveries: impl Iterator<Item = (u64, &'a Delivery)>,
) -> Op {
    let record = records::encode_stored_message(
        message,
        count,
        deliveries.map(|(store_id, delivery)| TargetRef {
            store_id,
            seq: delivery.seq,
            qos: delivery.qos,
            retain: delivery.retain,
            subscription_ids: &delivery.subscription_ids,
        }),
    );
    Op::Put(Cf::Messages, keys::message(stored.id), record)
}

/// A message record nothing references any more (found at start-up), with the records that
/// masked its deliveries.
pub fn message_delete(id: u64, masks: Vec<Vec<u8>>, ops: &mut Vec<Op>) {
    ops.push(Op::Delete(Cf::Messages, keys::message(id)));
    ops.extend(masks.into_iter().map(|key| Op::Delete(Cf::Queue, key)));
}

/// A `queue` record left by a session that no longer exists (found at start-up).
pub fn stale_queue_delete(key: Vec<u8>) -> Op {
    Op::Delete(Cf::Queue, key)
}

/// A `queue` entry of the delivery's own (see `records::QueueEntry`): past PUBREC, or handed
/// over from another member of a shared subscription.
pub fn queue_put(store_id: u64, delivery: &Delivery, awaiting_pubcomp: bool) -> Op {
    let message_id = delivery.stored.as_ref().map_or(0, |s| s.id);
    let entry = QueueEntry {
        message_id,
        qos: delivery.qos,
        retain: delivery.retain,
        awaiting_pubcomp,
        subscription_ids: delivery.subscription_ids.clone(),
    };
    Op::Put(
        Cf::Queue,
        keys::queue(store_id, delivery.seq),
        records::encode_queue_entry(&entry),
    )
}

/// The stored delivery of session `store_id` is finished, dropped, or (`drops_reference`
/// false) moved to another session. `None` when it was never stored.
pub fn release(store_id: u64, delivery: &Delivery, drops_reference: bool) -> Option<Op> {
    let stored = delivery.stored.as_ref()?;
    Some(Op::Release(Release {
        stored: stored.clone(),
        key: keys::queue(store_id, delivery.seq),
        drops_reference,
        mask: delivery.listed.then(|| records::encode_released(stored.id)),
        own_entry: delivery.own_entry,
    }))
}

/// Drops only the reference of an ended session's delivery: its entries go with the session's
/// whole range ([`forget_session`]), and listed deliveries name a store id no session has any
/// more, which start-up ignores.
pub fn release_reference(stored: &Arc<StoredMessage>, store_id: u64, seq: u64) -> Op {
    Op::Release(Release {
        stored: stored.clone(),
        key: keys::queue(store_id, seq),
        drops_reference: true,
        mask: None,
        own_entry: false,
    })
}

/// In a cluster: every entry of the replication log up to `seq` has reached this node's
/// sessions (written with the deliveries it covers, so a restart does not deliver them twice).
pub fn log_applied(seq: u64) -> Op {
    Op::Put(
        Cf::Meta,
        LOG_APPLIED_KEY.to_vec(),
        seq.to_be_bytes().to_vec(),
    )
}

/// The `meta` key of [`log_applied`].
pub const LOG_APPLIED_KEY: &[u8] = b"cluster_log_applied";

/// A QoS 2 packet id received and awaiting PUBREL [MQTT-4.3.3-9].
pub fn inbound_put(client_id: &str, packet_id: u16) -> Op {
    Op::Put(Cf::Inbound, keys::inbound(client_id, packet_id), Vec::new())
}

pub fn inbound_delete(client_id: &str, packet_id: u16) -> Op {
    Op::Delete(Cf::Inbound, keys::inbound(client_id, packet_id))
}

pub fn subscription_put(
    client_id: &str,
    filter: &str,
    options: &crate::protocol::SubscriptionOptions,
) -> Op {
    Op::Put(
        Cf::Subscriptions,
        keys::subscription(client_id, filter),
        records::encode_subscription(options),
    )
}

pub fn subscription_delete(client_id: &str, filter: &str) -> Op {
    Op::Delete(Cf::Subscriptions, keys::subscription(client_id, filter))
}

/// A persistent session's will as stored: the message, its delay, and when it is due once the
/// connection is gone (`None` while connected).
#[derive(Debug)]
pub struct WillRecord<'a> {
    pub message: &'a Message,
    pub delay_interval: u32,
    pub publish_at: Option<SystemTime>,
}

/// The record of a persistent session.
pub fn session_put(
    client_id: &str,
    store_id: u64,
    protocol_level: u8,
    expiry_interval: u32,
    disconnected_at: Option<SystemTime>,
    will: Option<WillRecord<'_>>,
) -> Op {
    let record = SessionRecord {
        store_id,
        protocol_level,
        expiry_interval,
        disconnected_at,
        will: will.map(|will| StoredWill {
            message: will.message.clone(),
            delay_interval: will.delay_interval,
            publish_at: will.publish_at,
        }),
    };
    Op::Put(
        Cf::Sessions,
        keys::session(client_id),
        records::encode_session(&record),
    )
}

/// Deletes a session's record, subscriptions, inbound QoS 2 state and `queue` records.
pub fn forget_session(client_id: &str, store_id: u64, ops: &mut Vec<Op>) {
    let prefix = keys::client_prefix(client_id);
    let end = keys::prefix_end(&prefix);
    ops.push(Op::Delete(Cf::Sessions, keys::session(client_id)));
    for cf in [Cf::Subscriptions, Cf::Inbound] {
        ops.push(Op::DeleteRange(cf, prefix.clone(), end.clone()));
    }
    let (from, to) = keys::queue_range(store_id);
    ops.push(Op::DeleteRange(Cf::Queue, from, to));
}

/// A `$delayed` message held until `due_millis` (Unix time in milliseconds) under `id`.
pub fn delayed_put(due_millis: u64, id: u64, message: &Message) -> Op {
    Op::Put(
        Cf::Delayed,
        keys::delayed(due_millis, id),
        records::encode_message(message),
    )
}

pub fn delayed_delete(due_millis: u64, id: u64) -> Op {
    Op::Delete(Cf::Delayed, keys::delayed(due_millis, id))
}
