//! The on-disk encoding of every value the broker stores.
//!
//! A small hand-written binary format: each record starts with a format byte so later versions
//! can read old data, strings are length-prefixed, and decoding never trusts a length it has not
//! checked. Unreadable records are reported as corruption, never panics.

use std::time::SystemTime;

use bytes::{BufMut, Bytes};

use crate::clock::{from_unix_ms, unix_ms};
use crate::message::Message;
use crate::protocol::{MessageProperties, QoS, RetainHandling, SubscriptionOptions};

use super::StorageError;

const FORMAT: u8 = 1;

/// Reads a record with bounds checks; every error names the record kind.
struct Reader<'a> {
    data: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], kind: &'static str) -> Result<Self, StorageError> {
        let mut reader = Self { data, kind };
        let format = reader.u8()?;
        if format != FORMAT {
            return Err(reader.corrupt("unknown record format"));
        }
        Ok(reader)
    }

    fn corrupt(&self, what: &str) -> StorageError {
        StorageError::Corrupt(format!("{} record: {what}", self.kind))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if self.data.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, StorageError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, StorageError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StorageError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    /// LEB128, at most ten bytes.
    fn varint(&mut self) -> Result<u64, StorageError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.corrupt("varint too long"))
    }

    fn bytes16(&mut self) -> Result<&'a [u8], StorageError> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    fn bytes32(&mut self) -> Result<&'a [u8], StorageError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, StorageError> {
        let raw = self.bytes16()?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.corrupt("string is not UTF-8"))
    }

    fn qos(&mut self) -> Result<QoS, StorageError> {
        let value = self.u8()?;
        QoS::from_u8(value).ok_or_else(|| self.corrupt("QoS out of range"))
    }

    fn finish(&self) -> Result<(), StorageError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt("trailing bytes"))
        }
    }
}

fn put_bytes16(out: &mut Vec<u8>, data: &[u8]) {
    // Topics, client ids, filters and property strings come from MQTT strings (at most 65,535
    // bytes), so the length always fits.
    out.put_u16(data.len() as u16);
    out.put_slice(data);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

fn put_bytes32(out: &mut Vec<u8>, data: &[u8]) {
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

pub fn encode_message(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + message.topic.len() + message.payload.len());
    encode_message_into(&mut out, message);
    out
}

/// [`encode_message`] appended to `out`, for a caller that puts its own header first.
pub fn encode_message_into(out: &mut Vec<u8>, message: &Message) {
    out.put_u8(FORMAT);
    put_message_body(out, message);
}

fn put_message_body(out: &mut Vec<u8>, message: &Message) {
    let props = &message.properties;
    let flags = (message.qos as u8)
        | (u8::from(message.retain) << 2)
        | (u8::from(message.expires_at.is_some()) << 3)
        | (u8::from(message.publisher.is_some()) << 4);
    out.put_u8(flags);
    if let Some(at) = message.expires_at {
        out.put_u64(unix_ms(at));
    }
    put_bytes16(out, message.topic.as_bytes());
    if let Some(publisher) = &message.publisher {
        put_bytes16(out, publisher.as_bytes());
    }
    let present = u8::from(props.payload_format_indicator.is_some())
        | (u8::from(props.message_expiry_interval.is_some()) << 1)
        | (u8::from(props.content_type.is_some()) << 2)
        | (u8::from(props.response_topic.is_some()) << 3)
        | (u8::from(props.correlation_data.is_some()) << 4);
    out.put_u8(present);
    if let Some(v) = props.payload_format_indicator {
        out.put_u8(v);
    }
    if let Some(v) = props.message_expiry_interval {
        out.put_u32(v);
    }
    if let Some(v) = &props.content_type {
        put_bytes16(out, v.as_bytes());
    }
    if let Some(v) = &props.response_topic {
        put_bytes16(out, v.as_bytes());
    }
    if let Some(v) = &props.correlation_data {
        put_bytes16(out, v);
    }
    out.put_u32(props.user_properties.len() as u32);
    for (key, value) in &props.user_properties {
        put_bytes16(out, key.as_bytes());
        put_bytes16(out, value.as_bytes());
    }
    put_bytes32(out, &message.payload);
}

pub fn decode_message(data: &[u8]) -> Result<Message, StorageError> {
    let mut r = Reader::new(data, "message")?;
    let message = read_message_body(&mut r)?;
    r.finish()?;
    Ok(message)
}

fn read_message_body(r: &mut Reader<'_>) -> Result<Message, StorageError> {
    let flags = r.u8()?;
    let qos = QoS::from_u8(flags & 0b11).ok_or_else(|| r.corrupt("QoS out of range"))?;
    let retain = flags & 0b100 != 0;
    let expires_at = if flags & 0b1000 != 0 {
        Some(from_unix_ms(r.u64()?))
    } else {
        None
    };
    let topic = r.string()?;
    let publisher = if flags & 0b1_0000 != 0 {
        Some(r.string()?.into())
    } else {
        None
    };
    let present = r.u8()?;
    let mut properties = MessageProperties::default();
    if present & 0b1 != 0 {
        properties.payload_format_indicator = Some(r.u8()?);
    }
    if present & 0b10 != 0 {
        properties.message_expiry_interval = Some(r.u32()?);
    }
    if present & 0b100 != 0 {
        properties.content_type = Some(r.string()?);
    }
    if present & 0b1000 != 0 {
        properties.response_topic = Some(r.string()?);
    }
    if present & 0b1_0000 != 0 {
        properties.correlation_data = Some(Bytes::copy_from_slice(r.bytes16()?));
    }
    let user_count = r.u32()?;
    for _ in 0..user_count {
        properties.user_properties.push((r.string()?, r.string()?));
    }
    let payload = Bytes::copy_from_slice(r.bytes32()?);
    Ok(Message {
        topic: topic.into(),
        payload,
        qos,
        retain,
        properties,
        publisher,
        expires_at,
    })
}

/// A delivery listed in a stored message record: which session's queue holds it, at which
/// position, and what the subscription decided about it. Listing the deliveries in the message
/// record makes a message for N offline sessions one write instead of N + 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTarget {
    /// The session's storage id (`SessionRecord::store_id`).
    pub store_id: u64,
    pub seq: u64,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

/// What [`encode_stored_message`] needs of one delivery, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct TargetRef<'a> {
    pub store_id: u64,
    pub seq: u64,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: &'a [u32],
}

/// A `messages` record: the message, then the deliveries it was queued for. Numbers in the
/// list are varints: store ids and sequence numbers are small, and this list is most of what
/// a fan-out to offline sessions writes.
/// `count` is the number of `targets`.
pub fn encode_stored_message<'a>(
    message: &Message,
    count: usize,
    targets: impl Iterator<Item = TargetRef<'a>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + message.topic.len() + message.payload.len() + 8 * count);
    out.put_u8(FORMAT);
    put_message_body(&mut out, message);
    put_varint(&mut out, count as u64);
    let mut written = 0;
    for target in targets {
        written += 1;
        put_varint(&mut out, target.store_id);
        put_varint(&mut out, target.seq);
        out.put_u8(target.qos as u8 | (u8::from(target.retain) << 2));
        put_varint(&mut out, target.subscription_ids.len() as u64);
        for &id in target.subscription_ids {
            put_varint(&mut out, u64::from(id));
        }
    }
    debug_assert_eq!(written, count, "target count");
    out
}

/// Only the message of a `messages` record, for reading a spilled queue back: the delivery
/// list (as long as the fan-out) is neither decoded nor checked.
pub fn decode_stored_message_only(data: &[u8]) -> Result<Message, StorageError> {
    read_message_body(&mut Reader::new(data, "message")?)
}

pub fn decode_stored_message(data: &[u8]) -> Result<(Message, Vec<StoredTarget>), StorageError> {
    let mut r = Reader::new(data, "message")?;
    let message = read_message_body(&mut r)?;
    let count = r.varint()?;
    // Every target takes at least four bytes: a corrupt count cannot reserve more than the
    // record could hold.
    let mut targets = Vec::with_capacity((count as usize).min(r.data.len() / 4));
    for _ in 0..count {
        let store_id = r.varint()?;
        let seq = r.varint()?;
        let flags = r.u8()?;
        let qos = QoS::from_u8(flags & 0b11).ok_or_else(|| r.corrupt("QoS out of range"))?;
        let ids = r.varint()?;
        let mut subscription_ids = Vec::with_capacity((ids as usize).min(r.data.len()));
        for _ in 0..ids {
            let id = u32::try_from(r.varint()?)
                .map_err(|_| r.corrupt("subscription id out of range"))?;
            subscription_ids.push(id);
        }
        targets.push(StoredTarget {
            store_id,
            seq,
            qos,
            retain: flags & 0b100 != 0,
            subscription_ids,
        });
    }
    r.finish()?;
    Ok((message, targets))
}

/// A delivery with a `queue` record of its own: one that is not listed in its message record
/// (handed to another member of a shared subscription), or a listed one whose state changed
/// since (past PUBREC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    pub message_id: u64,
    pub qos: QoS,
    pub retain: bool,
    /// PUBREC was received and PUBREL sent: on resume the broker re-sends PUBREL, never the
    /// message [MQTT-4.3.3-?].
    pub awaiting_pubcomp: bool,
    pub subscription_ids: Vec<u32>,
}

/// A `queue` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueValue {
    Entry(QueueEntry),
    /// The delivery of `message_id` listed at this key is finished: the message record still
    /// lists it because other sessions hold the message. Deleted with the message record.
    Released {
        message_id: u64,
    },
}

const QUEUE_ENTRY: u8 = 0;
const QUEUE_RELEASED: u8 = 1;

pub fn encode_queue_entry(entry: &QueueEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + 4 * entry.subscription_ids.len());
    out.put_u8(FORMAT);
    out.put_u8(QUEUE_ENTRY);
    out.put_u64(entry.message_id);
    out.put_u8(entry.qos as u8);
    out.put_u8(u8::from(entry.retain) | (u8::from(entry.awaiting_pubcomp) << 1));
    out.put_u16(entry.subscription_ids.len() as u16);
    for &id in &entry.subscription_ids {
        out.put_u32(id);
    }
    out
}

pub fn encode_released(message_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    out.put_u8(FORMAT);
    out.put_u8(QUEUE_RELEASED);
    out.put_u64(message_id);
    out
}

pub fn decode_queue_value(data: &[u8]) -> Result<QueueValue, StorageError> {
    let mut r = Reader::new(data, "queue")?;
    let kind = r.u8()?;
    let message_id = r.u64()?;
    let value = match kind {
        QUEUE_ENTRY => {
            let qos = r.qos()?;
            let flags = r.u8()?;
            let count = r.u16()?;
            let mut subscription_ids = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                subscription_ids.push(r.u32()?);
            }
            QueueValue::Entry(QueueEntry {
                message_id,
                qos,
                retain: flags & 1 != 0,
                awaiting_pubcomp: flags & 2 != 0,
                subscription_ids,
            })
        }
        QUEUE_RELEASED => QueueValue::Released { message_id },
        _ => return Err(r.corrupt("unknown queue record kind")),
    };
    r.finish()?;
    Ok(value)
}

/// A persistent session as stored: enough to rebuild it after a restart.
#[derive(Debug)]
pub struct SessionRecord {
    /// Names the session in `queue` keys and message records. A new session for the same
    /// client id gets a new one, so nothing left of an ended session is ever taken for the
    /// new one's.
    pub store_id: u64,
    /// 3, 4 or 5.
    pub protocol_level: u8,
    pub expiry_interval: u32,
    /// `None` while a client was connected.
    pub disconnected_at: Option<SystemTime>,
    pub will: Option<StoredWill>,
}

#[derive(Debug)]
pub struct StoredWill {
    pub message: Message,
    pub delay_interval: u32,
    /// When it is due, once the connection has gone; `None` while connected.
    pub publish_at: Option<SystemTime>,
}

pub fn encode_session(record: &SessionRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.put_u8(FORMAT);
    out.put_u64(record.store_id);
    out.put_u8(record.protocol_level);
    out.put_u32(record.expiry_interval);
    out.put_u64(record.disconnected_at.map_or(0, unix_ms));
    match &record.will {
        None => out.put_u8(0),
        Some(will) => {
            out.put_u8(1);
            out.put_u32(will.delay_interval);
            out.put_u64(will.publish_at.map_or(0, unix_ms));
            put_bytes32(&mut out, &encode_message(&will.message));
        }
    }
    out
}

pub fn decode_session(data: &[u8]) -> Result<SessionRecord, StorageError> {
    let mut r = Reader::new(data, "session")?;
    let store_id = r.u64()?;
    let protocol_level = r.u8()?;
    let expiry_interval = r.u32()?;
    let disconnected_at = match r.u64()? {
        0 => None,
        ms => Some(from_unix_ms(ms)),
    };
    let will = match r.u8()? {
        0 => None,
        _ => {
            let delay_interval = r.u32()?;
            let publish_at = match r.u64()? {
                0 => None,
                ms => Some(from_unix_ms(ms)),
            };
            let message = decode_message(r.bytes32()?)?;
            Some(StoredWill {
                message,
                delay_interval,
                publish_at,
            })
        }
    };
    r.finish()?;
    Ok(SessionRecord {
        store_id,
        protocol_level,
        expiry_interval,
        disconnected_at,
        will,
    })
}

pub fn encode_subscription(options: &SubscriptionOptions) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.put_u8(FORMAT);
    out.put_u8(options.qos as u8);
    out.put_u8(u8::from(options.no_local) | (u8::from(options.retain_as_published) << 1));
    out.put_u8(options.retain_handling as u8);
    match options.subscription_id {
        None => out.put_u8(0),
        Some(id) => {
            out.put_u8(1);
            out.put_u32(id);
        }
    }
    out
}

pub fn decode_subscription(data: &[u8]) -> Result<SubscriptionOptions, StorageError> {
    let mut r = Reader::new(data, "subscription")?;
    let qos = r.qos()?;
    let flags = r.u8()?;
    let retain_handling = match r.u8()? {
        0 => RetainHandling::SendOnSubscribe,
        1 => RetainHandling::SendIfNewSubscription,
        2 => RetainHandling::DoNotSend,
        _ => return Err(r.corrupt("retain handling out of range")),
    };
    let subscription_id = match r.u8()? {
        0 => None,
        _ => Some(r.u32()?),
    };
    r.finish()?;
    Ok(SubscriptionOptions {
        qos,
        no_local: flags & 1 != 0,
        retain_as_published: flags & 2 != 0,
        retain_handling,
        subscription_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_message() -> Message {
        Message {
            topic: "sensors/a/temp".into(),
            payload: Bytes::from_static(b"\x00\x01payload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: Some("reply/here".into()),
                correlation_data: Some(Bytes::from_static(b"corr")),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            },
            publisher: Some("client-1".into()),
            expires_at: Some(from_unix_ms(1_800_000_000_123)),
        }
    }

    fn assert_same(a: &Message, b: &Message) {
        assert_eq!(a.topic, b.topic);
        assert_eq!(a.payload, b.payload);
        assert_eq!(a.qos, b.qos);
        assert_eq!(a.retain, b.retain);
        assert_eq!(a.properties, b.properties);
        assert_eq!(a.publisher, b.publisher);
        assert_eq!(a.expires_at, b.expires_at);
    }

    #[test]
    fn message_round_trips_with_and_without_optional_fields() {
        let full = sample_message();
        assert_same(&decode_message(&encode_message(&full)).unwrap(), &full);
        let bare = Message {
            properties: MessageProperties::default(),
            publisher: None,
            expires_at: None,
            ..sample_message()
        };
        assert_same(&decode_message(&encode_message(&bare)).unwrap(), &bare);
    }

    #[test]
    fn every_truncation_of_a_record_is_reported_not_panicked() {
        let encoded = encode_message(&sample_message());
        for cut in 0..encoded.len() {
            assert!(decode_message(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = encoded.clone();
        trailing.push(0);
        assert!(decode_message(&trailing).is_err());
    }

    #[test]
    fn queue_entries_sessions_and_subscriptions_round_trip() {
        let entry = QueueEntry {
            message_id: 42,
            qos: QoS::AtLeastOnce,
            retain: true,
            awaiting_pubcomp: true,
            subscription_ids: vec![1, 70_000],
        };
        assert_eq!(
            decode_queue_value(&encode_queue_entry(&entry)).unwrap(),
            QueueValue::Entry(entry)
        );
        assert_eq!(
            decode_queue_value(&encode_released(u64::MAX)).unwrap(),
            QueueValue::Released {
                message_id: u64::MAX
            }
        );

        let record = SessionRecord {
            store_id: 1 << 40,
            protocol_level: 5,
            expiry_interval: 3600,
            disconnected_at: Some(from_unix_ms(1_700_000_000_000)),
            will: Some(StoredWill {
                message: sample_message(),
                delay_interval: 30,
                publish_at: Some(from_unix_ms(1_700_000_030_000)),
            }),
        };
        let decoded = decode_session(&encode_session(&record)).unwrap();
        assert_eq!(decoded.store_id, 1 << 40);
        assert_eq!(decoded.protocol_level, 5);
        assert_eq!(decoded.expiry_interval, 3600);
        assert_eq!(decoded.disconnected_at, record.disconnected_at);
        let will = decoded.will.unwrap();
        assert_eq!(will.delay_interval, 30);
        assert_eq!(will.publish_at, Some(from_unix_ms(1_700_000_030_000)));
        assert_same(&will.message, &sample_message());

        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: false,
            retain_handling: RetainHandling::SendIfNewSubscription,
            subscription_id: Some(9),
        };
        assert_eq!(
            decode_subscription(&encode_subscription(&options)).unwrap(),
            options
        );
    }

    fn sample_targets() -> Vec<StoredTarget> {
        vec![
            StoredTarget {
                store_id: 0,
                seq: 0,
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: Vec::new(),
            },
            StoredTarget {
                store_id: u64::MAX,
                seq: 1 << 35,
                qos: QoS::ExactlyOnce,
                retain: true,
                subscription_ids: vec![1, 268_435_455],
            },
        ]
    }

    fn target_refs(targets: &[StoredTarget]) -> impl Iterator<Item = TargetRef<'_>> {
        targets.iter().map(|t| TargetRef {
            store_id: t.store_id,
            seq: t.seq,
            qos: t.qos,
            retain: t.retain,
            subscription_ids: &t.subscription_ids,
        })
    }

    #[test]
    fn stored_messages_round_trip_with_their_targets() {
        let targets = sample_targets();
        let encoded =
            encode_stored_message(&sample_message(), targets.len(), target_refs(&targets));
        let (message, decoded) = decode_stored_message(&encoded).unwrap();
        assert_same(&message, &sample_message());
        assert_eq!(decoded, targets);
        assert_same(
            &decode_stored_message_only(&encoded).unwrap(),
            &sample_message(),
        );
        let (_, none) = decode_stored_message(&encode_stored_message(
            &sample_message(),
            0,
            target_refs(&[]),
        ))
        .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn every_truncation_of_a_stored_message_or_queue_record_is_reported() {
        let targets = sample_targets();
        let encoded =
            encode_stored_message(&sample_message(), targets.len(), target_refs(&targets));
        for cut in 0..encoded.len() {
            assert!(
                decode_stored_message(&encoded[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let entry = encode_queue_entry(&QueueEntry {
            message_id: 7,
            qos: QoS::AtLeastOnce,
            retain: false,
            awaiting_pubcomp: false,
            subscription_ids: vec![3],
        });
        for record in [entry, encode_released(7)] {
            for cut in 0..record.len() {
                assert!(decode_queue_value(&record[..cut]).is_err(), "cut at {cut}");
            }
            let mut trailing = record.clone();
            trailing.push(0);
            assert!(decode_queue_value(&trailing).is_err());
        }
        // A count no record could hold is refused without reserving room for it.
        let mut huge = encode_message(&sample_message());
        put_varint(&mut huge, u64::MAX);
        assert!(decode_stored_message(&huge).is_err());
    }

    #[test]
    fn varints_round_trip_at_their_boundaries() {
        for value in [0, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = vec![FORMAT];
            put_varint(&mut out, value);
            let mut r = Reader::new(&out, "test").unwrap();
            assert_eq!(r.varint().unwrap(), value);
            r.finish().unwrap();
        }
        let overlong = [
            FORMAT, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
        ];
        assert!(Reader::new(&overlong, "test").unwrap().varint().is_err());
    }

    #[test]
    fn unknown_format_byte_is_corruption() {
        let mut encoded = encode_subscription(&SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendOnSubscribe,
            subscription_id: None,
        });
        encoded[0] = 99;
        assert!(matches!(
            decode_subscription(&encoded),
            Err(StorageError::Corrupt(_))
        ));
    }
}
