//! A minimal, independent MQTT 3.1.1 client-side codec.
//!
//! Deliberately not shared with `telemq::protocol`: an independent implementation catches broker
//! bugs that a shared one would hide. Encoders append to a `BytesMut` so many packets can be
//! batched into one write; the decoder borrows from the read buffer and never copies payloads.

use bytes::{BufMut, BytesMut};

/// Largest packet the decoder accepts (fixed header included). Anything larger is treated as a
/// protocol error: the generator never subscribes to anything that big.
pub const MAX_PACKET: usize = 16 * 1024 * 1024;

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// A decoded server→client packet, borrowing from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Connack {
        session_present: bool,
        code: u8,
    },
    Publish {
        dup: bool,
        qos: u8,
        retain: bool,
        topic: &'a [u8],
        pkid: u16,
        payload: &'a [u8],
    },
    Puback(u16),
    Pubrec(u16),
    Pubrel(u16),
    Pubcomp(u16),
    Suback {
        pkid: u16,
        codes: &'a [u8],
    },
    Pingresp,
    /// Any other packet type (valid or not from a server); the caller decides what to do.
    Other {
        kind: u8,
        flags: u8,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed remaining length")]
    RemainingLength,
    #[error("packet of {0} bytes exceeds the decoder limit")]
    TooLarge(usize),
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    // Callers only pass short topics and client ids; MQTT strings are at most 65535 bytes.
    debug_assert!(s.len() <= u16::MAX as usize);
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// CONNECT (MQTT 3.1.1, protocol level 4) without will, user name or password.
pub fn encode_connect(buf: &mut BytesMut, client_id: &str, clean_session: bool, keep_alive: u16) {
    let remaining = 10 + 2 + client_id.len();
    buf.reserve(remaining + 5);
    buf.put_u8(CONNECT << 4);
    put_remaining_length(buf, remaining);
    put_str(buf, b"MQTT");
    buf.put_u8(4);
    buf.put_u8(if clean_session { 0x02 } else { 0x00 });
    buf.put_u16(keep_alive);
    put_str(buf, client_id.as_bytes());
}

/// SUBSCRIBE with one or more (filter, requested QoS) pairs.
pub fn encode_subscribe(buf: &mut BytesMut, pkid: u16, filters: &[(&str, u8)]) {
    let remaining = 2 + filters.iter().map(|(f, _)| 2 + f.len() + 1).sum::<usize>();
    buf.reserve(remaining + 5);
    buf.put_u8((SUBSCRIBE << 4) | 0x02);
    put_remaining_length(buf, remaining);
    buf.put_u16(pkid);
    for (filter, qos) in filters {
        put_str(buf, filter.as_bytes());
        buf.put_u8(*qos);
    }
}

/// PUBLISH. `pkid` is ignored (not written) for QoS 0.
pub fn encode_publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: u8,
    pkid: u16,
    dup: bool,
    retain: bool,
    payload: &[u8],
) {
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    buf.reserve(remaining + 5);
    let mut first = (PUBLISH << 4) | (qos << 1);
    if dup {
        first |= 0x08;
    }
    if retain {
        first |= 0x01;
    }
    buf.put_u8(first);
    put_remaining_length(buf, remaining);
    put_str(buf, topic);
    if qos > 0 {
        buf.put_u16(pkid);
    }
    buf.put_slice(payload);
}

fn encode_ack(buf: &mut BytesMut, kind: u8, flags: u8, pkid: u16) {
    buf.reserve(4);
    buf.put_u8((kind << 4) | flags);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

pub fn encode_puback(buf: &mut BytesMut, pkid: u16) {
    encode_ack(buf, PUBACK, 0, pkid);
}

pub fn encode_pubrec(buf: &mut BytesMut, pkid: u16) {
    encode_ack(buf, PUBREC, 0, pkid);
}

pub fn encode_pubrel(buf: &mut BytesMut, pkid: u16) {
    encode_ack(buf, PUBREL, 0x02, pkid);
}

pub fn encode_pubcomp(buf: &mut BytesMut, pkid: u16) {
    encode_ack(buf, PUBCOMP, 0, pkid);
}

pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[PINGREQ << 4, 0]);
}

pub fn encode_disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[DISCONNECT << 4, 0]);
}

fn read_u16(body: &[u8], at: usize, what: &'static str) -> Result<u16, DecodeError> {
    match body.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(DecodeError::Malformed(what)),
    }
}

/// Decodes one packet from the start of `buf`. `Ok(None)`: more bytes are needed. On success,
/// returns the packet and the number of bytes it occupies.
pub fn decode(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let first = buf[0];
    let kind = first >> 4;
    let flags = first & 0x0f;
    let mut remaining: usize = 0;
    let mut shift = 0;
    let mut pos = 1;
    loop {
        let Some(&byte) = buf.get(pos) else {
            return Ok(None);
        };
        pos += 1;
        remaining |= ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(DecodeError::RemainingLength);
        }
    }
    let total = pos + remaining;
    if total > MAX_PACKET {
        return Err(DecodeError::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[pos..total];
    let packet = match kind {
        CONNACK => {
            if body.len() != 2 {
                return Err(DecodeError::Malformed("CONNACK"));
            }
            Packet::Connack {
                session_present: body[0] & 0x01 != 0,
                code: body[1],
            }
        }
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(DecodeError::Malformed("PUBLISH"));
            }
            let topic_len = read_u16(body, 0, "PUBLISH")? as usize;
            let topic = body
                .get(2..2 + topic_len)
                .ok_or(DecodeError::Malformed("PUBLISH"))?;
            let mut at = 2 + topic_len;
            let pkid = if qos > 0 {
                let id = read_u16(body, at, "PUBLISH")?;
                at += 2;
                id
            } else {
                0
            };
            Packet::Publish {
                dup: flags & 0x08 != 0,
                qos,
                retain: flags & 0x01 != 0,
                topic,
                pkid,
                payload: &body[at..],
            }
        }
        PUBACK | PUBREC | PUBREL | PUBCOMP => {
            // MQTT 3.1.1 acks have exactly a packet id; tolerate (ignore) v5-style extra bytes.
            let pkid = read_u16(body, 0, "acknowledgement")?;
            match kind {
                PUBACK => Packet::Puback(pkid),
                PUBREC => Packet::Pubrec(pkid),
                PUBREL => Packet::Pubrel(pkid),
                _ => Packet::Pubcomp(pkid),
            }
        }
        SUBACK => Packet::Suback {
            pkid: read_u16(body, 0, "SUBACK")?,
            codes: &body[2..],
        },
        PINGRESP => Packet::Pingresp,
        _ => Packet::Other { kind, flags },
    };
    Ok(Some((packet, total)))
}

/// The benchmark payload: who sent it, its sequence number and when it was sent.
///
/// Layout (big endian): publisher id u32, run tag u32, sequence u64, send time u64 (UNIX
/// nanoseconds), then zero padding up to the configured payload size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub run_tag: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

pub const STAMP_LEN: usize = 24;

impl Stamp {
    /// Writes the stamp into the first `STAMP_LEN` bytes of `payload`.
    pub fn write(&self, payload: &mut [u8]) {
        payload[0..4].copy_from_slice(&self.publisher.to_be_bytes());
        payload[4..8].copy_from_slice(&self.run_tag.to_be_bytes());
        payload[8..16].copy_from_slice(&self.seq.to_be_bytes());
        payload[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    pub fn read(payload: &[u8]) -> Option<Self> {
        let p = payload.get(..STAMP_LEN)?;
        let u32_at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Some(Self {
            publisher: u32_at(0),
            run_tag: u32_at(4),
            seq: u64_at(8),
            sent_ns: u64_at(16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_bytes() {
        let mut buf = BytesMut::new();
        encode_connect(&mut buf, "ab", true, 60);
        assert_eq!(
            &buf[..],
            &[
                0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x02,
                b'a', b'b'
            ]
        );
        buf.clear();
        encode_connect(&mut buf, "", false, 600);
        assert_eq!(
            &buf[..],
            &[0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x00, 0x02, 0x58, 0x00, 0x00]
        );
    }

    #[test]
    fn subscribe_bytes() {
        let mut buf = BytesMut::new();
        encode_subscribe(&mut buf, 1, &[("a/b", 1)]);
        assert_eq!(
            &buf[..],
            &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01]
        );
        buf.clear();
        encode_subscribe(&mut buf, 0x1234, &[("x", 0), ("#", 2)]);
        assert_eq!(
            &buf[..],
            &[0x82, 0x0A, 0x12, 0x34, 0x00, 0x01, b'x', 0x00, 0x00, 0x01, b'#', 0x02]
        );
    }

    #[test]
    fn publish_bytes() {
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, b"t", 0, 99, false, false, b"hi");
        assert_eq!(&buf[..], &[0x30, 0x05, 0x00, 0x01, b't', b'h', b'i']);
        buf.clear();
        encode_publish(&mut buf, b"t", 1, 10, true, true, b"hi");
        assert_eq!(
            &buf[..],
            &[0x3B, 0x07, 0x00, 0x01, b't', 0x00, 0x0A, b'h', b'i']
        );
        buf.clear();
        encode_publish(&mut buf, b"t", 2, 0x0102, false, false, b"");
        assert_eq!(&buf[..], &[0x34, 0x05, 0x00, 0x01, b't', 0x01, 0x02]);
    }

    #[test]
    fn publish_with_two_byte_remaining_length() {
        let payload = vec![7u8; 200];
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, b"ab", 0, 0, false, false, &payload);
        // remaining = 2 + 2 + 200 = 204 = 0xCC → 0xCC 0x01
        assert_eq!(&buf[..5], &[0x30, 0xCC, 0x01, 0x00, 0x02]);
        assert_eq!(buf.len(), 3 + 204);
        let (packet, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        match packet {
            Packet::Publish {
                topic, payload: p, ..
            } => {
                assert_eq!(topic, b"ab");
                assert_eq!(p, &payload[..]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn ack_and_control_bytes() {
        let mut buf = BytesMut::new();
        encode_puback(&mut buf, 5);
        encode_pubrec(&mut buf, 6);
        encode_pubrel(&mut buf, 7);
        encode_pubcomp(&mut buf, 8);
        encode_pingreq(&mut buf);
        encode_disconnect(&mut buf);
        assert_eq!(
            &buf[..],
            &[0x40, 2, 0, 5, 0x50, 2, 0, 6, 0x62, 2, 0, 7, 0x70, 2, 0, 8, 0xC0, 0, 0xE0, 0]
        );
    }

    /// A stream of server packets as a broker would send them.
    fn server_stream() -> (Vec<u8>, usize) {
        let mut buf = BytesMut::new();
        buf.put_slice(&[0x20, 0x02, 0x01, 0x00]); // CONNACK, session present
        buf.put_slice(&[0x90, 0x04, 0x00, 0x01, 0x01, 0x80]); // SUBACK 1: [1, 0x80]
        let big = vec![1u8; 300];
        encode_publish(&mut buf, b"bench/x", 1, 42, false, false, &big);
        encode_publish(&mut buf, b"bench/y", 0, 0, false, true, b"small");
        buf.put_slice(&[0x40, 0x02, 0x00, 0x07]); // PUBACK 7
        buf.put_slice(&[0x62, 0x02, 0x00, 0x08]); // PUBREL 8
        buf.put_slice(&[0xD0, 0x00]); // PINGRESP
        (buf.to_vec(), 7)
    }

    fn decode_all(stream: &[u8], chunk: usize) -> Vec<String> {
        let mut acc: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            acc.extend_from_slice(piece);
            let mut pos = 0;
            while let Some((packet, used)) = decode(&acc[pos..]).unwrap() {
                out.push(format!("{packet:?}"));
                pos += used;
            }
            acc.drain(..pos);
        }
        assert!(acc.is_empty(), "leftover bytes {acc:?}");
        out
    }

    #[test]
    fn decoder_handles_split_buffers() {
        let (stream, count) = server_stream();
        let whole = decode_all(&stream, stream.len());
        assert_eq!(whole.len(), count);
        assert!(whole[0].contains("Connack { session_present: true, code: 0 }"));
        assert!(whole[1].contains("Suback { pkid: 1, codes: [1, 128] }"));
        assert!(whole[2].starts_with("Publish { dup: false, qos: 1, retain: false"));
        assert!(whole[2].contains("pkid: 42"));
        assert!(whole[3].contains("retain: true"));
        assert_eq!(whole[4], "Puback(7)");
        assert_eq!(whole[5], "Pubrel(8)");
        assert_eq!(whole[6], "Pingresp");
        for chunk in [1, 2, 3, 5, 7, 64, 301] {
            assert_eq!(decode_all(&stream, chunk), whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn decoder_needs_more_on_partial_header() {
        assert_eq!(decode(&[]), Ok(None));
        assert_eq!(decode(&[0x30]), Ok(None));
        assert_eq!(decode(&[0x30, 0xCC]), Ok(None)); // continuation bit, second byte missing
        assert_eq!(decode(&[0x30, 0x05, 0x00]), Ok(None));
    }

    #[test]
    fn decoder_rejects_malformed() {
        assert_eq!(
            decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(DecodeError::RemainingLength)
        );
        assert!(matches!(
            decode(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]),
            Err(DecodeError::TooLarge(_))
        ));
        // CONNACK with a wrong length.
        assert!(decode(&[0x20, 0x01, 0x00]).is_err());
        // PUBLISH whose topic length runs past the packet.
        assert!(decode(&[0x30, 0x03, 0x00, 0x05, b'a']).is_err());
        // QoS 3.
        assert!(decode(&[0x36, 0x03, 0x00, 0x01, b'a']).is_err());
    }

    #[test]
    fn stamp_round_trip() {
        let stamp = Stamp {
            publisher: 3,
            run_tag: 0xdead_beef,
            seq: 1 << 40,
            sent_ns: 1_700_000_000_000_000_000,
        };
        let mut payload = vec![0u8; 64];
        stamp.write(&mut payload);
        assert_eq!(Stamp::read(&payload), Some(stamp));
        assert_eq!(Stamp::read(&payload[..10]), None);
    }
}
