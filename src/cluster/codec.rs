//! Messages as they travel between nodes: the storage record of the message (topic, payload,
//! QoS, retain, publisher, MQTT 5 properties) behind a small header.
//!
//! A message that went into the replication log after it was sent to the other nodes directly
//! carries the direct batch it went out in (see `direct`), in a format of its own.
//!
//! Expiry travels as the time left, not the instant: nodes' clocks differ, and the receiving node
//! counts the remaining interval from when the message reached it [MQTT-3.3.2-6].

use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes};

use crate::clock::{self, from_unix_ms, unix_ms};
use crate::message::Message;
use crate::publish::SentDirectly;
use crate::storage::{decode_message, encode_message_into, StorageError};

const VERSION: u8 = 1;
/// [`VERSION`] with the direct batch the message went out in, ahead of the rest.
const VERSION_SENT_DIRECTLY: u8 = 2;
const NO_EXPIRY: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message from another node is too short")]
    Truncated,
    #[error("message from another node has unknown format {0}")]
    Version(u8),
    #[error("message from another node: {0}")]
    Record(#[from] StorageError),
}

/// A message from another node, with when that node sent it (by its clock).
#[derive(Debug)]
pub struct Received {
    pub message: Message,
    pub sent_at: SystemTime,
    pub sent_directly: Option<SentDirectly>,
}

pub fn encode(message: &Message, now: SystemTime) -> Bytes {
    encode_sent(message, now, None)
}

/// [`encode`], saying which direct batch the message went out in before, if any.
pub fn encode_sent(
    message: &Message,
    now: SystemTime,
    sent_directly: Option<SentDirectly>,
) -> Bytes {
    let mut out = Vec::with_capacity(88 + message.topic.len() + message.payload.len());
    match sent_directly {
        None => out.put_u8(VERSION),
        Some(sent) => {
            out.put_u8(VERSION_SENT_DIRECTLY);
            out.put_u64(sent.run);
            out.put_u64(sent.epoch);
            out.put_u64(sent.batch);
        }
    }
    out.put_u64(unix_ms(now));
    let remaining = message.expires_at.map_or(NO_EXPIRY, |at| {
        // An already expired message is not sent; 1 ms keeps "expired" from reading as "none".
        at.duration_since(now)
            .map_or(1, |left| left.as_millis() as u64)
            .max(1)
    });
    out.put_u64(remaining);
    encode_message_into(&mut out, message);
    out.into()
}

pub fn decode(data: &[u8]) -> Result<Received, DecodeError> {
    let (&version, mut rest) = data.split_first().ok_or(DecodeError::Truncated)?;
    let sent_directly = match version {
        VERSION => None,
        VERSION_SENT_DIRECTLY => {
            let truncated = || DecodeError::Truncated;
            let (run, tail) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
            let (epoch, tail) = tail.split_first_chunk::<8>().ok_or_else(truncated)?;
            let (batch, tail) = tail.split_first_chunk::<8>().ok_or_else(truncated)?;
            rest = tail;
            Some(SentDirectly {
                run: u64::from_be_bytes(*run),
                epoch: u64::from_be_bytes(*epoch),
                batch: u64::from_be_bytes(*batch),
            })
        }
        _ => return Err(DecodeError::Version(version)),
    };
    let (sent_at, rest) = rest
        .split_first_chunk::<8>()
        .ok_or(DecodeError::Truncated)?;
    let sent_at = from_unix_ms(u64::from_be_bytes(*sent_at));
    let (remaining, record) = rest
        .split_first_chunk::<8>()
        .ok_or(DecodeError::Truncated)?;
    let remaining = u64::from_be_bytes(*remaining);
    let mut message = decode_message(record)?;
    message.expires_at =
        (remaining != NO_EXPIRY).then(|| clock::now() + Duration::from_millis(remaining));
    Ok(Received {
        message,
        sent_at,
        sent_directly,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MessageProperties, QoS};
    use std::sync::Arc;

    #[test]
    fn a_message_arrives_as_sent_with_the_expiry_left() {
        let properties = MessageProperties {
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            ..MessageProperties::default()
        };
        let mut message = Message::new(
            Arc::from("a/b"),
            Bytes::from_static(b"payload"),
            QoS::ExactlyOnce,
            true,
            properties,
            Some(Arc::from("publisher")),
        );
        let sent_at = clock::now();
        message.expires_at = Some(sent_at + Duration::from_secs(30));
        let decoded = decode(&encode(&message, sent_at)).expect("decodes");
        assert_eq!(unix_ms(decoded.sent_at), unix_ms(sent_at));
        let decoded = decoded.message;
        assert_eq!(decoded.topic, message.topic);
        assert_eq!(decoded.payload, message.payload);
        assert_eq!(decoded.qos, QoS::ExactlyOnce);
        assert!(decoded.retain);
        assert_eq!(decoded.publisher.as_deref(), Some("publisher"));
        assert_eq!(decoded.properties, message.properties);
        let left = decoded
            .expires_at
            .expect("expiry kept")
            .duration_since(sent_at);
        let left = left.expect("in the future");
        assert!(
            left >= Duration::from_secs(30) && left < Duration::from_secs(31),
            "{left:?}"
        );
    }

    #[test]
    fn the_direct_batch_a_message_went_out_in_travels_with_it() {
        let message = Message::new(
            Arc::from("t"),
            Bytes::from_static(b"p"),
            QoS::ExactlyOnce,
            false,
            MessageProperties::default(),
            None,
        );
        let sent = SentDirectly {
            run: u64::MAX,
            epoch: 2,
            batch: 1 << 40,
        };
        let wire = encode_sent(&message, clock::now(), Some(sent));
        let decoded = decode(&wire).expect("decodes");
        assert_eq!(decoded.sent_directly, Some(sent));
        assert_eq!(decoded.message.payload, message.payload);
        assert!(decode(&encode(&message, clock::now()))
            .expect("decodes")
            .sent_directly
            .is_none());
        assert!(matches!(decode(&wire[..20]), Err(DecodeError::Truncated)));
    }

    #[test]
    fn no_expiry_stays_none_and_garbage_is_refused() {
        let message = Message::new(
            Arc::from("t"),
            Bytes::new(),
            QoS::AtMostOnce,
            false,
            MessageProperties::default(),
            None,
        );
        let wire = encode(&message, clock::now());
        assert!(decode(&wire).expect("decodes").message.expires_at.is_none());
        assert!(matches!(decode(&wire[..12]), Err(DecodeError::Truncated)));
        assert!(matches!(decode(&[9; 20]), Err(DecodeError::Version(9))));
        assert!(matches!(
            decode(&wire[..wire.len() - 1]),
            Err(DecodeError::Record(_))
        ));
    }
}
