//! Start-up: the retained store and persistent sessions (subscriptions, queues, QoS 2 state,
//! pending wills) rebuilt from what storage recovered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::info;

use crate::clock;
use crate::message::{Delivery, StoredMessage};
use crate::router::Router;
use crate::session::{PendingWill, SessionRegistry, SessionState, NEVER_EXPIRES};
use crate::storage::{ops, Op, Recovered};

/// Rebuilds retained messages and persistent sessions from what storage held (`$delayed`
/// messages are the caller's). Returns the operations that clean up what expired while the
/// broker was down and what nothing references.
pub fn restore(router: &Router, sessions: &SessionRegistry, recovered: Recovered) -> Vec<Op> {
    let now = clock::now();
    let mut cleanup = Vec::new();
    let retained = recovered.retained.len();
    for message in recovered.retained {
        if message.remaining_expiry(now).is_err() {
            cleanup.push(ops::retained_delete(&message.topic));
        } else {
            router.restore_retained(Arc::new(message));
        }
    }

    let is_expired = |expiry: u32, disconnected_at: SystemTime| {
        expiry != NEVER_EXPIRES && disconnected_at + Duration::from_secs(u64::from(expiry)) <= now
    };
    let mut refs: HashMap<u64, usize> = HashMap::new();
    for session in &recovered.sessions {
        let record = &session.record;
        if is_expired(
            record.expiry_interval,
            record.disconnected_at.unwrap_or(now),
        ) {
            continue;
        }
        for delivery in &session.queue {
            *refs.entry(delivery.message_id).or_default() += 1;
        }
    }
    cleanup.extend(
        recovered
            .stale_queue_keys
            .into_iter()
            .map(ops::stale_queue_delete),
    );
    let mut released = recovered.released;
    let stored: HashMap<u64, Arc<StoredMessage>> = refs
        .iter()
        .map(|(&id, &count)| {
            let masks = released.remove(&id).unwrap_or_default();
            (id, Arc::new(StoredMessage::recovered(id, count, masks)))
        })
        .collect();
    // What nothing references goes, with the records masking its deliveries.
    for id in recovered
        .messages
        .keys()
        .filter(|id| !refs.contains_key(id))
    {
        let masks = released.remove(id).unwrap_or_default();
        ops::message_delete(*id, masks, &mut cleanup);
    }
    sessions.continue_store_ids_from(recovered.next_store_id);

    let (mut restored, mut expired) = (0usize, 0usize);
    for session in recovered.sessions {
        let client_id: Arc<str> = session.client_id.as_str().into();
        let record = session.record;
        let disconnected_at = record.disconnected_at.unwrap_or(now);
        if is_expired(record.expiry_interval, disconnected_at) {
            expired += 1;
            ops::forget_session(&client_id, record.store_id, &mut cleanup);
            continue;
        }
        restored += 1;
        let handle = Arc::new(sessions.handle_with_store_id(
            client_id.clone(),
            record.store_id,
            session.next_seq,
        ));
        let mut session_state = SessionState::default();
        for (filter, options) in session.subscriptions {
            router.subscribe(&handle, &filter, options.clone());
            session_state.subscriptions.insert(filter, options);
        }
        for packet_id in session.inbound_qos2 {
            session_state.inbound_qos2.insert(packet_id, ());
        }
        let mut deliveries = Vec::with_capacity(session.queue.len());
        for queued in session.queue {
            let (Some(message), Some(stored)) = (
                recovered.messages.get(&queued.message_id),
                stored.get(&queued.message_id),
            ) else {
                continue;
            };
            let mut delivery = Delivery::new(
                message.clone(),
                queued.qos,
                queued.retain,
                queued.subscription_ids,
                queued.seq,
            );
            delivery.stored = Some(stored.clone());
            // It may have gone out before the restart [MQTT-3.3.1-1].
            delivery.dup = true;
            delivery.awaiting_pubcomp = queued.awaiting_pubcomp;
            delivery.listed = queued.listed;
            delivery.own_entry = queued.own_entry;
            // Its position in a cluster's replication log is not stored: unknown, so the
            // session's recorded position stays where it was until this is done.
            delivery.log_seq = Some(0);
            handle.log().add(0);
            deliveries.push(delivery);
        }
        handle.mailbox.restore(deliveries);
        {
            let mut inner = handle.inner();
            inner.state = Some(Box::new(session_state));
            inner.protocol_level = record.protocol_level;
            // A client connected at the crash lost its connection abnormally: its will is due
            // after its delay, counted from now [MQTT-3.1.2-8].
            inner.pending_will = record.will.map(|will| {
                Box::new(PendingWill {
                    publish_at: will
                        .publish_at
                        .unwrap_or(now + Duration::from_secs(u64::from(will.delay_interval))),
                    delay_interval: will.delay_interval,
                    message: Arc::new(will.message),
                })
            });
        }
        sessions.restore(handle, record.expiry_interval, disconnected_at);
    }
    info!(
        sessions = restored,
        expired, retained, "state restored from storage"
    );
    cleanup
}
