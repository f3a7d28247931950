//! Turns broker state changes into storage operations, and publishes messages durably on
//! behalf of the broker itself (wills).
//!
//! The rule everything here serves: a change the broker acknowledges to a client is written
//! before the acknowledgement leaves. Connection tasks submit these operations and hold the
//! acknowledgement until the write completes; releases of acknowledged state are written
//! behind, since losing one only means a redelivery after a crash.

use std::sync::Arc;
use std::time::SystemTime;

use crate::broker::BrokerState;
use crate::message::{Delivery, Message};
use crate::metrics;
use crate::protocol::{ProtocolVersion, QoS};
use crate::router::{SubscriptionOptions, Target};
use crate::session::{EndedSession, SessionHandle};
use crate::storage::records::{self, QueueEntry, SessionRecord, StoredWill, TargetRef};
use crate::storage::{keys, Cf, Op, Release, Storage, StorageError, StoredMessage};

/// Operations that make a routed message durable: the retained store change and, when
/// persistent sessions take it at QoS 1 or 2, one message record listing those deliveries.
/// Marks those deliveries as stored.
pub fn publish_ops(storage: &Storage, message: &Arc<Message>, targets: &mut [Target]) -> Vec<Op> {
    let mut ops = Vec::new();
    if message.retain {
        let key = keys::retained(&message.topic);
        if message.payload.is_empty() {
            ops.push(Op::Delete(Cf::Retained, key));
        } else {
            ops.push(Op::Put(Cf::Retained, key, records::encode_message(message)));
        }
    }
    let is_durable = |t: &Target| t.delivery.qos != QoS::AtMostOnce && t.session.is_persistent();
    let durable = targets.iter().filter(|t| is_durable(t)).count();
    if durable == 0 {
        return ops;
    }
    let stored = Arc::new(StoredMessage::new(storage.next_message_id(), durable));
    let record = records::encode_stored_message(
        message,
        durable,
        targets.iter().filter(|t| is_durable(t)).map(|t| TargetRef {
            store_id: t.session.store_id,
            seq: t.delivery.seq,
            qos: t.delivery.qos,
            retain: t.delivery.retain,
            subscription_ids: &t.delivery.subscription_ids,
        }),
    );
    ops.push(Op::Put(Cf::Messages, keys::message(stored.id), record));
    for target in targets.iter_mut().filter(|t| is_durable(t)) {
        target.delivery.stored = Some(stored.clone());
        target.delivery.listed = true;
    }
    ops
}

/// A `queue` entry of the delivery's own (see `records::QueueEntry`).
fn queue_put(store_id: u64, delivery: &Delivery, awaiting_pubcomp: bool) -> Op {
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

/// The delivery reached PUBREC: on a restart only PUBREL may be re-sent, never the message
/// (the client may already have passed it on and forgotten its packet id after PUBREL).
/// The delivery now has an entry of its own.
pub fn pubrec_ops(store_id: u64, delivery: &mut Delivery) -> Vec<Op> {
    if delivery.stored.is_none() {
        return Vec::new();
    }
    delivery.own_entry = true;
    vec![queue_put(store_id, delivery, true)]
}

/// The delivery is complete (or dropped): the writer masks or deletes its record, and deletes
/// the message record with its last reference.
pub fn release_ops(store_id: u64, delivery: &Delivery, ops: &mut Vec<Op>) {
    if let Some(release) = release(store_id, delivery, true) {
        ops.push(Op::Release(release));
    }
}

fn release(store_id: u64, delivery: &Delivery, drops_reference: bool) -> Option<Release> {
    let stored = delivery.stored.as_ref()?;
    Some(Release {
        stored: stored.clone(),
        key: keys::queue(store_id, delivery.seq),
        drops_reference,
        mask: delivery.listed.then(|| records::encode_released(stored.id)),
        own_entry: delivery.own_entry,
    })
}

pub fn inbound_put(client_id: &str, packet_id: u16) -> Op {
    Op::Put(Cf::Inbound, keys::inbound(client_id, packet_id), Vec::new())
}

pub fn inbound_delete(client_id: &str, packet_id: u16) -> Op {
    Op::Delete(Cf::Inbound, keys::inbound(client_id, packet_id))
}

pub fn subscription_put(client_id: &str, filter: &str, options: &SubscriptionOptions) -> Op {
    Op::Put(
        Cf::Subscriptions,
        keys::subscription(client_id, filter),
        records::encode_subscription(options),
    )
}

pub fn subscription_delete(client_id: &str, filter: &str) -> Op {
    Op::Delete(Cf::Subscriptions, keys::subscription(client_id, filter))
}

pub fn protocol_level(version: ProtocolVersion) -> u8 {
    match version {
        ProtocolVersion::V3_1 => 3,
        ProtocolVersion::V3_1_1 => 4,
        ProtocolVersion::V5 => 5,
    }
}

/// The record of an offline session whose delayed will was just published: without the will,
/// so a restart does not publish it again.
pub fn session_without_will(session: &SessionHandle) -> Option<Op> {
    if !session.is_persistent() || session.is_ended() {
        return None;
    }
    let inner = session.inner();
    let record = SessionRecord {
        store_id: session.store_id,
        protocol_level: inner.protocol_level,
        expiry_interval: inner.expiry_interval,
        disconnected_at: inner.disconnected_at,
        will: None,
    };
    Some(Op::Put(
        Cf::Sessions,
        keys::session(&session.client_id),
        records::encode_session(&record),
    ))
}

/// The session record of a persistent session. `will` is (message, delay, when due once the
/// connection is gone).
pub fn session_put(
    client_id: &str,
    store_id: u64,
    version: ProtocolVersion,
    expiry_interval: u32,
    disconnected_at: Option<SystemTime>,
    will: Option<(&Message, u32, Option<SystemTime>)>,
) -> Op {
    let record = SessionRecord {
        store_id,
        protocol_level: protocol_level(version),
        expiry_interval,
        disconnected_at,
        will: will.map(|(message, delay_interval, publish_at)| StoredWill {
            message: message.clone(),
            delay_interval,
            publish_at,
        }),
    };
    Op::Put(
        Cf::Sessions,
        keys::session(client_id),
        records::encode_session(&record),
    )
}

/// Everything of an ended session goes: its record, subscriptions, queue and QoS 2 state, and
/// the message records only it still referenced. Its deliveries listed in records other
/// sessions still hold are not masked one by one: they name a store id no session has any
/// more, which start-up ignores.
pub fn end_session_ops(ended: &EndedSession) -> Vec<Op> {
    let mut ops = Vec::new();
    for delivery in &ended.deliveries {
        if let Some(stored) = &delivery.stored {
            // Only the reference goes: its own entry goes with the range below.
            ops.push(Op::Release(Release {
                stored: stored.clone(),
                key: keys::queue(ended.store_id, delivery.seq),
                drops_reference: true,
                mask: None,
                own_entry: false,
            }));
        }
    }
    if ended.was_persistent {
        forget_session_ops(&ended.client_id, ended.store_id, &mut ops);
    }
    ops
}

/// Deletes a session's record, subscriptions, inbound QoS 2 state and `queue` records.
pub fn forget_session_ops(client_id: &str, store_id: u64, ops: &mut Vec<Op>) {
    let prefix = keys::client_prefix(client_id);
    let end = keys::prefix_end(&prefix);
    ops.push(Op::Delete(Cf::Sessions, keys::session(client_id)));
    for cf in [Cf::Subscriptions, Cf::Inbound] {
        ops.push(Op::DeleteRange(cf, prefix.clone(), end.clone()));
    }
    let (from, to) = keys::queue_range(store_id);
    ops.push(Op::DeleteRange(Cf::Queue, from, to));
}

/// Writes `ops` and waits until they are durable. Without storage there is nothing to wait for.
pub async fn write(state: &BrokerState, ops: Vec<Op>) -> Result<(), StorageError> {
    match &state.storage {
        Some(storage) if !ops.is_empty() => storage
            .write(ops)
            .await
            .await
            .unwrap_or(Err(StorageError::Closed)),
        _ => Ok(()),
    }
}

/// Writes `ops` without waiting.
pub async fn write_behind(state: &BrokerState, ops: Vec<Op>) {
    if let Some(storage) = &state.storage {
        storage.write_behind(ops).await;
    }
}

/// Releases the storage of deliveries that were routed but could not be queued.
pub async fn release_dropped(state: &BrokerState, dropped: Vec<Target>) {
    let mut ops = Vec::new();
    for target in &dropped {
        release_ops(target.session.store_id, &target.delivery, &mut ops);
    }
    write_behind(state, ops).await;
}

/// Hands deliveries that came through shared subscriptions of `from` (whose client went away)
/// to other members of their groups. Returns the deliveries no other member could take.
///
/// A stored delivery's reference moves with it: the new member's own `queue` entry is written
/// and the old delivery masked (or its entry deleted) in one batch, before the new member can
/// see it.
pub async fn hand_over_shared(
    state: &BrokerState,
    from: &SessionHandle,
    deliveries: Vec<Delivery>,
) -> Vec<Delivery> {
    let mut left = Vec::new();
    let mut moves = Vec::new();
    let from_store = from.store_id;
    let mut ops = Vec::new();
    for old in deliveries {
        let rerouted = old
            .share
            .as_deref()
            .and_then(|share| state.router.reroute_shared(share, &old.message, from));
        let Some((session, options)) = rerouted else {
            left.push(old);
            continue;
        };
        let mut delivery = Delivery::new(
            old.message.clone(),
            old.message.qos.min(options.qos),
            old.retain,
            options.subscription_id.into_iter().collect(),
            session.next_seq(),
        );
        delivery.share = old.share.clone();
        match &old.stored {
            Some(stored) if session.is_persistent() && delivery.qos != QoS::AtMostOnce => {
                delivery.stored = Some(stored.clone());
                delivery.own_entry = true;
                ops.push(queue_put(session.store_id, &delivery, false));
                ops.extend(release(from_store, &old, false).map(Op::Release));
            }
            _ => release_ops(from_store, &old, &mut ops),
        }
        moves.push((session, delivery, old));
    }
    // One batch for every move: a member leaving with a long queue costs one storage round trip.
    if let Err(error) = write(state, ops).await {
        tracing::error!(%error, "shared deliveries not handed over: storage failed");
        left.extend(moves.into_iter().map(|(_, _, old)| old));
        return left;
    }
    if !moves.is_empty() {
        metrics::shared_redelivered(moves.len());
    }
    let mut dropped = Vec::new();
    for (session, delivery, _) in moves {
        let policy = state.router.policy_for(&delivery.message.topic);
        for delivery in state.router.enqueue(&session, delivery, policy) {
            dropped.push(Target {
                session: session.clone(),
                delivery,
            });
        }
    }
    release_dropped(state, dropped).await;
    left
}

/// Reads back the messages of `session`'s spilled deliveries (its client is back). Deliveries
/// whose record is gone are released.
pub async fn unspill(state: &BrokerState, session: &SessionHandle) -> Result<(), StorageError> {
    let mut ids = session.mailbox.unspill();
    let Some(storage) = &state.storage else {
        return Ok(());
    };
    if ids.is_empty() {
        return Ok(());
    }
    ids.sort_unstable();
    ids.dedup();
    let storage = storage.clone();
    let read = tokio::task::spawn_blocking(move || storage.read_messages(&ids))
        .await
        .map_err(|error| StorageError::Rocks(error.to_string().into()))??;
    let messages = read
        .into_iter()
        .map(|(id, message)| (id, Arc::new(message)))
        .collect();
    let lost = session.mailbox.refill(&messages);
    if !lost.is_empty() {
        tracing::warn!(count = lost.len(), "queued messages missing from storage");
        let mut ops = Vec::new();
        for delivery in &lost {
            release_ops(session.store_id, delivery, &mut ops);
        }
        write_behind(state, ops).await;
    }
    Ok(())
}

/// Publishes a message on the broker's own behalf (a will): durably for persistent
/// subscribers, then into the mailboxes.
pub async fn publish(state: &BrokerState, message: Arc<Message>) {
    let mut targets = state.router.plan(&message);
    if let Some(storage) = &state.storage {
        let ops = publish_ops(storage, &message, &mut targets);
        if let Err(error) = write(state, ops).await {
            metrics::message_dropped(metrics::DROP_STORAGE_FAILED);
            tracing::error!(%error, topic = %message.topic, "will not published: storage failed");
            return;
        }
    }
    let dropped = state.router.apply(&message, targets);
    release_dropped(state, dropped).await;
}

/// Persists the end of sessions and publishes their wills.
pub async fn finish_ended_sessions(state: &BrokerState, ended: Vec<EndedSession>) {
    for session in ended {
        write_behind(state, end_session_ops(&session)).await;
        if let Some(will) = session.will {
            publish(state, will).await;
        }
    }
}
