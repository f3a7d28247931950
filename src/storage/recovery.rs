//! Reading everything back at start-up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rocksdb::{IteratorMode, DB};

use super::cipher::KeyRing;
use super::keys;
use super::records::{self, QueueValue, SessionRecord, StoredTarget};
use super::{report_unauthentic, Cf, StorageError};
use crate::message::Message;
use crate::protocol::SubscriptionOptions;

#[derive(Debug)]
pub struct RecoveredSession {
    pub client_id: String,
    pub record: SessionRecord,
    pub subscriptions: Vec<(String, SubscriptionOptions)>,
    pub inbound_qos2: Vec<u16>,
    /// Deliveries in sequence order.
    pub queue: Vec<RecoveredDelivery>,
    /// Above every sequence number storage holds for the session, released ones included.
    pub next_seq: u64,
}

/// A queued delivery as storage holds it: listed in its message record, with a `queue`
/// entry of its own, or both (the entry then says what changed since).
#[derive(Debug, PartialEq, Eq)]
pub struct RecoveredDelivery {
    pub seq: u64,
    pub message_id: u64,
    pub qos: crate::protocol::QoS,
    pub retain: bool,
    pub awaiting_pubcomp: bool,
    pub subscription_ids: Vec<u32>,
    pub listed: bool,
    pub own_entry: bool,
}

/// Everything the storage held, decoded.
#[derive(Debug, Default)]
pub struct Recovered {
    pub retained: Vec<Message>,
    pub sessions: Vec<RecoveredSession>,
    /// Message records by id; deliveries refer to them.
    pub messages: HashMap<u64, Arc<Message>>,
    /// Keys of the `Released` records of each message.
    pub released: HashMap<u64, Vec<Vec<u8>>>,
    /// `queue` records nothing explains: of a session that is gone, or masking or referencing
    /// a message that is gone. Deleted at start-up.
    pub stale_queue_keys: Vec<Vec<u8>>,
    /// Delayed messages: (due, in milliseconds since the Unix epoch, id, message), in due order.
    pub delayed: Vec<(u64, u64, Message)>,
    pub next_message_id: u64,
    /// In a cluster: the replication log position this node had delivered up to.
    pub log_applied: u64,
    /// Above every session store id storage mentions.
    pub next_store_id: u64,
}

impl Recovered {
    pub fn queued_messages(&self) -> usize {
        self.sessions.iter().map(|s| s.queue.len()).sum()
    }
}

/// Visits every record of `cf` with its opened value. A record that fails authentication is
/// reported and skipped, as if it were not there: the broker starts without it rather than
/// not at all, and never acts on a value an attacker could have chosen.
fn scan(
    db: &DB,
    keys: &KeyRing,
    cf: Cf,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let handle = db
        .cf_handle(cf.name())
        .ok_or_else(|| StorageError::Corrupt(format!("column family {} missing", cf.name())))?;
    for item in db.iterator_cf(handle, IteratorMode::Start) {
        let (key, value) = item?;
        match keys.open(cf, &key, &value) {
            Ok(plain) => visit(&key, &plain)?,
            Err(error @ StorageError::Unauthentic(_)) => report_unauthentic(cf, &key, &error),
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn client_key(key: &[u8], cf: Cf) -> Result<(&str, &[u8]), StorageError> {
    keys::split_client_key(key)
        .ok_or_else(|| StorageError::Corrupt(format!("malformed key in {}", cf.name())))
}

/// See [`super::ops::log_applied`]; 0 when absent or unreadable (a node that delivered
/// nothing yet, or a value sealed with a key no longer configured), which only means that the
/// cluster may deliver some entries again.
fn load_log_applied(db: &DB, keys: &KeyRing) -> u64 {
    let Some(handle) = db.cf_handle(Cf::Meta.name()) else {
        return 0;
    };
    let Ok(Some(value)) = db.get_cf(handle, super::ops::LOG_APPLIED_KEY) else {
        return 0;
    };
    keys.open(Cf::Meta, super::ops::LOG_APPLIED_KEY, &value)
        .ok()
        .and_then(|plain| plain.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0)
}

pub fn load(db: &DB, keys: &KeyRing) -> Result<Recovered, StorageError> {
    let mut recovered = Recovered::default();

    scan(db, keys, Cf::Retained, |_, value| {
        recovered.retained.push(records::decode_message(value)?);
        Ok(())
    })?;

    let mut max_id = 0;
    let mut targets: Vec<(u64, Vec<StoredTarget>)> = Vec::new();
    scan(db, keys, Cf::Messages, |key, value| {
        let id = u64::from_be_bytes(
            key.try_into()
                .map_err(|_| StorageError::Corrupt("malformed message key".into()))?,
        );
        max_id = max_id.max(id);
        let (message, listed) = records::decode_stored_message(value)?;
        recovered.messages.insert(id, Arc::new(message));
        targets.push((id, listed));
        Ok(())
    })?;
    scan(db, keys, Cf::Delayed, |key, value| {
        let (due, id) = keys::split_delayed(key)
            .ok_or_else(|| StorageError::Corrupt("malformed delayed key".into()))?;
        max_id = max_id.max(id);
        recovered
            .delayed
            .push((due, id, records::decode_message(value)?));
        Ok(())
    })?;
    // Delayed messages draw their ids from the same sequence.
    recovered.next_message_id = max_id + 1;
    recovered.log_applied = load_log_applied(db, keys);

    let mut sessions: BTreeMap<String, RecoveredSession> = BTreeMap::new();
    scan(db, keys, Cf::Sessions, |key, value| {
        let client_id = std::str::from_utf8(key)
            .map_err(|_| StorageError::Corrupt("session key is not UTF-8".into()))?;
        sessions.insert(
            client_id.to_owned(),
            RecoveredSession {
                client_id: client_id.to_owned(),
                record: records::decode_session(value)?,
                subscriptions: Vec::new(),
                inbound_qos2: Vec::new(),
                queue: Vec::new(),
                next_seq: 0,
            },
        );
        Ok(())
    })?;

    // Rows of sessions that no longer exist are ignored here; they are deleted with the
    // session, and a crash between the two writes leaves nothing a client can observe.
    scan(db, keys, Cf::Subscriptions, |key, value| {
        let (client_id, filter) = client_key(key, Cf::Subscriptions)?;
        if let Some(session) = sessions.get_mut(client_id) {
            let filter = std::str::from_utf8(filter)
                .map_err(|_| StorageError::Corrupt("filter is not UTF-8".into()))?;
            session
                .subscriptions
                .push((filter.to_owned(), records::decode_subscription(value)?));
        }
        Ok(())
    })?;
    scan(db, keys, Cf::Inbound, |key, _| {
        let (client_id, rest) = client_key(key, Cf::Inbound)?;
        if let (Some(session), [hi, lo]) = (sessions.get_mut(client_id), rest) {
            session.inbound_qos2.push(u16::from_be_bytes([*hi, *lo]));
        }
        Ok(())
    })?;
    let mut queue: HashMap<(u64, u64), QueueValue> = HashMap::new();
    scan(db, keys, Cf::Queue, |key, value| {
        let position = keys::split_queue(key)
            .ok_or_else(|| StorageError::Corrupt("malformed queue key".into()))?;
        queue.insert(position, records::decode_queue_value(value)?);
        Ok(())
    })?;

    let mut sessions: Vec<RecoveredSession> = sessions.into_values().collect();
    let by_store: HashMap<u64, usize> = sessions
        .iter()
        .enumerate()
        .map(|(index, session)| (session.record.store_id, index))
        .collect();
    let mut max_store = sessions.iter().map(|s| s.record.store_id).max();
    let mut note_position = |sessions: &mut Vec<RecoveredSession>, (store_id, seq): (u64, u64)| {
        max_store = max_store.max(Some(store_id));
        if let Some(&index) = by_store.get(&store_id) {
            let session = &mut sessions[index];
            session.next_seq = session.next_seq.max(seq.saturating_add(1));
        }
    };

    // Listed deliveries, unless a `queue` record masks them or says more about them.
    let mut listed_with_entry = HashSet::new();
    for (message_id, listed) in targets {
        for target in listed {
            let position = (target.store_id, target.seq);
            note_position(&mut sessions, position);
            match queue.get(&position) {
                Some(QueueValue::Released { message_id: of }) if *of == message_id => {
                    queue.remove(&position);
                    recovered
                        .released
                        .entry(message_id)
                        .or_default()
                        .push(keys::queue(position.0, position.1));
                    continue;
                }
                Some(QueueValue::Entry(entry)) if entry.message_id == message_id => {
                    listed_with_entry.insert(position);
                    continue;
                }
                _ => {}
            }
            if let Some(&index) = by_store.get(&target.store_id) {
                sessions[index].queue.push(RecoveredDelivery {
                    seq: target.seq,
                    message_id,
                    qos: target.qos,
                    retain: target.retain,
                    awaiting_pubcomp: false,
                    subscription_ids: target.subscription_ids,
                    listed: true,
                    own_entry: false,
                });
            }
        }
    }
    // Deliveries with an entry of their own.
    for (position, value) in queue {
        note_position(&mut sessions, position);
        let session = by_store.get(&position.0).copied();
        match (value, session) {
            (QueueValue::Entry(entry), Some(index))
                if recovered.messages.contains_key(&entry.message_id) =>
            {
                sessions[index].queue.push(RecoveredDelivery {
                    seq: position.1,
                    message_id: entry.message_id,
                    qos: entry.qos,
                    retain: entry.retain,
                    awaiting_pubcomp: entry.awaiting_pubcomp,
                    subscription_ids: entry.subscription_ids,
                    listed: listed_with_entry.contains(&position),
                    own_entry: true,
                });
            }
            _ => recovered
                .stale_queue_keys
                .push(keys::queue(position.0, position.1)),
        }
    }
    for session in &mut sessions {
        session.queue.sort_unstable_by_key(|delivery| delivery.seq);
    }
    recovered.sessions = sessions;
    recovered.next_store_id = max_store.map_or(1, |id| id + 1);
    Ok(recovered)
}
