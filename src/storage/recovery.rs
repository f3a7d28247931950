//! Reading everything back at start-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rocksdb::{IteratorMode, DB};

use super::cipher::KeyRing;
use super::keys;
use super::records::{self, QueueEntry, SessionRecord};
use super::{report_unauthentic, Cf, StorageError};
use crate::message::Message;
use crate::router::SubscriptionOptions;

#[derive(Debug)]
pub struct RecoveredSession {
    pub client_id: String,
    pub record: SessionRecord,
    pub subscriptions: Vec<(String, SubscriptionOptions)>,
    pub inbound_qos2: Vec<u16>,
    /// Queue entries in sequence order.
    pub queue: Vec<(u64, QueueEntry)>,
}

/// Everything the storage held, decoded.
#[derive(Debug, Default)]
pub struct Recovered {
    pub retained: Vec<Message>,
    pub sessions: Vec<RecoveredSession>,
    /// Message records by id; queue entries refer to them.
    pub messages: HashMap<u64, Arc<Message>>,
    /// Delayed messages: (due, in milliseconds since the Unix epoch, id, message), in due order.
    pub delayed: Vec<(u64, u64, Message)>,
    pub next_message_id: u64,
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

pub fn load(db: &DB, keys: &KeyRing) -> Result<Recovered, StorageError> {
    let mut recovered = Recovered::default();

    scan(db, keys, Cf::Retained, |_, value| {
        recovered.retained.push(records::decode_message(value)?);
        Ok(())
    })?;

    let mut max_id = 0;
    scan(db, keys, Cf::Messages, |key, value| {
        let id = u64::from_be_bytes(
            key.try_into()
                .map_err(|_| StorageError::Corrupt("malformed message key".into()))?,
        );
        max_id = max_id.max(id);
        recovered
            .messages
            .insert(id, Arc::new(records::decode_message(value)?));
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
    scan(db, keys, Cf::Queue, |key, value| {
        let (client_id, rest) = client_key(key, Cf::Queue)?;
        let seq = u64::from_be_bytes(
            rest.try_into()
                .map_err(|_| StorageError::Corrupt("malformed queue key".into()))?,
        );
        if let Some(session) = sessions.get_mut(client_id) {
            session
                .queue
                .push((seq, records::decode_queue_entry(value)?));
        }
        Ok(())
    })?;
    recovered.sessions = sessions.into_values().collect();
    Ok(recovered)
}
