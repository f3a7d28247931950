//! Encoding of server-to-client packets.
//!
//! Encoding is done here rather than through the codec crate's structs: those own their strings,
//! so every delivery to every subscriber would clone topic and properties, and the codec writes
//! short v5 acknowledgements (`E0 01 rc`) that some clients cannot read. Every v5 packet with a
//! non-success reason code here carries the property-length byte.

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::{MessageProperties, ProtocolVersion, QoS};
use super::reason::ReasonCode;
use super::wire::{varint_len, write_binary, write_varint};

/// Accumulates v5 properties so their length prefix can be written before them.
#[derive(Default)]
struct Properties {
    buf: BytesMut,
}

impl Properties {
    fn u8(&mut self, id: u8, value: u8) -> &mut Self {
        self.buf.put_u8(id);
        self.buf.put_u8(value);
        self
    }
    fn u16(&mut self, id: u8, value: u16) -> &mut Self {
        self.buf.put_u8(id);
        self.buf.put_u16(value);
        self
    }
    fn u32(&mut self, id: u8, value: u32) -> &mut Self {
        self.buf.put_u8(id);
        self.buf.put_u32(value);
        self
    }
    fn string(&mut self, id: u8, value: &str) -> &mut Self {
        self.buf.put_u8(id);
        write_binary(&mut self.buf, value.as_bytes());
        self
    }
    fn write_into(&self, out: &mut BytesMut) {
        write_varint(out, self.buf.len());
        out.put_slice(&self.buf);
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.buf.len()) + self.buf.len()
    }
}

fn write_fixed_header(out: &mut BytesMut, first_byte: u8, remaining_len: usize) {
    out.put_u8(first_byte);
    write_varint(out, remaining_len);
}

/// What the broker tells a client in CONNACK. Fields after `reason` are only sent to v5 clients.
#[derive(Clone, Debug, Default)]
pub struct ConnAck<'a> {
    pub session_present: bool,
    pub reason: Option<ReasonCode>,
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<&'a str>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<&'a str>,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
}

pub fn connack(version: ProtocolVersion, ack: &ConnAck<'_>, out: &mut BytesMut) {
    let reason = ack.reason.unwrap_or(ReasonCode::Success);
    let flags = u8::from(ack.session_present && reason == ReasonCode::Success);
    if !version.is_v5() {
        write_fixed_header(out, 0x20, 2);
        out.put_u8(flags);
        out.put_u8(reason.v3_connack_code());
        return;
    }
    let mut props = Properties::default();
    if let Some(v) = ack.session_expiry_interval {
        props.u32(0x11, v);
    }
    if let Some(v) = ack.receive_maximum {
        props.u16(0x21, v);
    }
    if let Some(v) = ack.maximum_qos {
        props.u8(0x24, v);
    }
    if let Some(v) = ack.retain_available {
        props.u8(0x25, u8::from(v));
    }
    if let Some(v) = ack.maximum_packet_size {
        props.u32(0x27, v);
    }
    if let Some(v) = ack.assigned_client_identifier {
        props.string(0x12, v);
    }
    if let Some(v) = ack.topic_alias_maximum {
        props.u16(0x22, v);
    }
    if let Some(v) = ack.reason_string {
        props.string(0x1F, v);
    }
    if let Some(v) = ack.wildcard_subscription_available {
        props.u8(0x28, u8::from(v));
    }
    if let Some(v) = ack.subscription_identifiers_available {
        props.u8(0x29, u8::from(v));
    }
    if let Some(v) = ack.shared_subscription_available {
        props.u8(0x2A, u8::from(v));
    }
    if let Some(v) = ack.server_keep_alive {
        props.u16(0x13, v);
    }
    write_fixed_header(out, 0x20, 2 + props.encoded_len());
    out.put_u8(flags);
    out.put_u8(reason as u8);
    props.write_into(out);
}

/// The four acknowledgements of the publish flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl AckKind {
    fn first_byte(self) -> u8 {
        match self {
            Self::PubAck => 0x40,
            Self::PubRec => 0x50,
            // [MQTT-3.6.1-1] PUBREL carries flags 0010
            Self::PubRel => 0x62,
            Self::PubComp => 0x70,
        }
    }
}

pub fn ack(
    version: ProtocolVersion,
    kind: AckKind,
    packet_id: u16,
    reason: u8,
    out: &mut BytesMut,
) {
    if !version.is_v5() || reason == 0 {
        // v5 allows omitting a success reason code and empty properties (§3.4.2.1).
        write_fixed_header(out, kind.first_byte(), 2);
        out.put_u16(packet_id);
        return;
    }
    write_fixed_header(out, kind.first_byte(), 4);
    out.put_u16(packet_id);
    out.put_u8(reason);
    out.put_u8(0);
}

/// A v5 PUBACK / PUBREC / PUBREL / PUBCOMP with a failure `reason` and a reason string
/// [MQTT-3.4.2.2.2]; for 3.1.1 only the packet id.
pub fn ack_with_reason_string(
    version: ProtocolVersion,
    kind: AckKind,
    packet_id: u16,
    reason: u8,
    reason_string: &str,
    out: &mut BytesMut,
) {
    if !version.is_v5() {
        return ack(version, kind, packet_id, reason, out);
    }
    let mut props = Properties::default();
    props.string(0x1F, reason_string);
    write_fixed_header(out, kind.first_byte(), 2 + 1 + props.encoded_len());
    out.put_u16(packet_id);
    out.put_u8(reason);
    props.write_into(out);
}

/// SUBACK with one return code per filter; v3 clients only know 0, 1, 2 and 0x80.
pub fn suback(version: ProtocolVersion, packet_id: u16, codes: &[u8], out: &mut BytesMut) {
    let props_len = usize::from(version.is_v5());
    write_fixed_header(out, 0x90, 2 + props_len + codes.len());
    out.put_u16(packet_id);
    if version.is_v5() {
        out.put_u8(0);
        out.put_slice(codes);
    } else {
        for &code in codes {
            out.put_u8(if code < 0x80 { code } else { 0x80 });
        }
    }
}

/// UNSUBACK; reason codes exist only in v5 [MQTT-3.11.3-?].
pub fn unsuback(version: ProtocolVersion, packet_id: u16, codes: &[u8], out: &mut BytesMut) {
    if !version.is_v5() {
        write_fixed_header(out, 0xB0, 2);
        out.put_u16(packet_id);
        return;
    }
    write_fixed_header(out, 0xB0, 3 + codes.len());
    out.put_u16(packet_id);
    out.put_u8(0);
    out.put_slice(codes);
}

pub fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xD0, 0x00]);
}

/// A server-initiated v5 DISCONNECT. v3 clients get no packet: the connection is just closed.
pub fn disconnect(reason: ReasonCode, reason_string: Option<&str>, out: &mut BytesMut) {
    let mut props = Properties::default();
    if let Some(text) = reason_string {
        props.string(0x1F, text);
    }
    write_fixed_header(out, 0xE0, 1 + props.encoded_len());
    out.put_u8(reason as u8);
    props.write_into(out);
}

/// One PUBLISH as it goes to one subscriber.
#[derive(Clone, Debug)]
pub struct OutgoingPublish<'a> {
    /// Empty when the subscriber already knows the topic by `topic_alias`.
    pub topic: &'a str,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: u16,
    pub payload: &'a Bytes,
    pub properties: &'a MessageProperties,
    /// What is left of the Message Expiry Interval [MQTT-3.3.2-6].
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub subscription_ids: &'a [u32],
}

fn publish_properties_len(p: &OutgoingPublish<'_>) -> usize {
    let props = p.properties;
    let mut len = 0;
    if props.payload_format_indicator.is_some() {
        len += 2;
    }
    if p.message_expiry_interval.is_some() {
        len += 5;
    }
    if p.topic_alias.is_some() {
        len += 3;
    }
    if let Some(v) = &props.response_topic {
        len += 3 + v.len();
    }
    if let Some(v) = &props.correlation_data {
        len += 3 + v.len();
    }
    for (k, v) in &props.user_properties {
        len += 5 + k.len() + v.len();
    }
    for &id in p.subscription_ids {
        len += 1 + varint_len(id as usize);
    }
    if let Some(v) = &props.content_type {
        len += 3 + v.len();
    }
    len
}

fn publish_remaining_len(version: ProtocolVersion, p: &OutgoingPublish<'_>) -> (usize, usize) {
    let mut len = 2 + p.topic.len() + p.payload.len();
    if p.qos != QoS::AtMostOnce {
        len += 2;
    }
    let props_len = if version.is_v5() {
        let props_len = publish_properties_len(p);
        len += varint_len(props_len) + props_len;
        props_len
    } else {
        0
    };
    (len, props_len)
}

/// Bytes the PUBLISH takes on the wire, to compare with the client's Maximum Packet Size.
pub fn publish_size(version: ProtocolVersion, p: &OutgoingPublish<'_>) -> usize {
    let (remaining, _) = publish_remaining_len(version, p);
    1 + varint_len(remaining) + remaining
}

pub fn publish(version: ProtocolVersion, p: &OutgoingPublish<'_>, out: &mut BytesMut) {
    let (remaining, props_len) = publish_remaining_len(version, p);
    out.reserve(5 + remaining);
    let first = 0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain);
    write_fixed_header(out, first, remaining);
    write_binary(out, p.topic.as_bytes());
    if p.qos != QoS::AtMostOnce {
        out.put_u16(p.packet_id);
    }
    if version.is_v5() {
        write_varint(out, props_len);
        let props = p.properties;
        if let Some(v) = props.payload_format_indicator {
            out.put_u8(0x01);
            out.put_u8(v);
        }
        if let Some(v) = p.message_expiry_interval {
            out.put_u8(0x02);
            out.put_u32(v);
        }
        if let Some(v) = p.topic_alias {
            out.put_u8(0x23);
            out.put_u16(v);
        }
        if let Some(v) = &props.response_topic {
            out.put_u8(0x08);
            write_binary(out, v.as_bytes());
        }
        if let Some(v) = &props.correlation_data {
            out.put_u8(0x09);
            write_binary(out, v);
        }
        for (k, v) in &props.user_properties {
            out.put_u8(0x26);
            write_binary(out, k.as_bytes());
            write_binary(out, v.as_bytes());
        }
        for &id in p.subscription_ids {
            out.put_u8(0x0B);
            write_varint(out, id as usize);
        }
        if let Some(v) = &props.content_type {
            out.put_u8(0x03);
            write_binary(out, v.as_bytes());
        }
    }
    out.put_slice(p.payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_its_reason_string_in_v5_only() {
        let mut out = BytesMut::new();
        ack_with_reason_string(
            ProtocolVersion::V5,
            AckKind::PubAck,
            7,
            0x80,
            "why",
            &mut out,
        );
        // Type, remaining length, packet id, reason, property length, 0x1F, string.
        assert_eq!(
            out.as_ref(),
            &[0x40, 10, 0, 7, 0x80, 6, 0x1F, 0, 3, b'w', b'h', b'y']
        );
        let mut v3 = BytesMut::new();
        ack_with_reason_string(
            ProtocolVersion::V3_1_1,
            AckKind::PubAck,
            7,
            0x80,
            "why",
            &mut v3,
        );
        assert_eq!(v3.as_ref(), &[0x40, 2, 0, 7]);
    }
}
