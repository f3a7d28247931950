//! Framing and decoding of client-to-server packets.
//!
//! The fixed header is parsed here, so that what it gets wrong closes the connection before the
//! body is buffered: the first byte (packet type and reserved flag bits) is judged as soon as it
//! arrives, and the broker's Maximum Packet Size is enforced on the total packet size.
//! PUBLISH and DISCONNECT bodies are decoded by `mqttbytes-ng`; CONNECT, SUBSCRIBE, UNSUBSCRIBE and
//! the acknowledgements are decoded here because the codec cannot express what the spec requires of
//! them: MQTT 3.1 ("MQIsdp") clients, binary passwords, reserved-bit checks on CONNECT flags and
//! subscription options, and duplicate-property detection.

use bytes::{Buf, Bytes, BytesMut};
use mqttbytes_ng as codec;

use super::packet::{
    Connect, Disconnect, MessageProperties, Packet, ProtocolVersion, Publish, QoS, RetainHandling,
    Subscribe, SubscribeRequest, Unsubscribe, Will,
};
use super::reason::{ProtocolError, ReasonCode};
use super::validate::check_topic_name;
use super::wire::{
    check_no_nul, read_binary, read_string, read_u16, read_u32, read_u8, read_varint,
    string_from_bytes,
};

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

mod property {
    pub const PAYLOAD_FORMAT_INDICATOR: u32 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u32 = 0x02;
    pub const CONTENT_TYPE: u32 = 0x03;
    pub const RESPONSE_TOPIC: u32 = 0x08;
    pub const CORRELATION_DATA: u32 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u32 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u32 = 0x11;
    pub const AUTHENTICATION_METHOD: u32 = 0x15;
    pub const AUTHENTICATION_DATA: u32 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u32 = 0x17;
    pub const WILL_DELAY_INTERVAL: u32 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u32 = 0x19;
    pub const RECEIVE_MAXIMUM: u32 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u32 = 0x22;
    pub const TOPIC_ALIAS: u32 = 0x23;
    pub const REASON_STRING: u32 = 0x1F;
    pub const USER_PROPERTY: u32 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u32 = 0x27;
}

/// The fixed header of a packet at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FixedHeader {
    first_byte: u8,
    header_len: usize,
    remaining_len: usize,
}

impl FixedHeader {
    fn packet_type(self) -> u8 {
        self.first_byte >> 4
    }

    fn flags(self) -> u8 {
        self.first_byte & 0x0F
    }

    fn total_len(self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Parses the fixed header, or returns `None` while it is incomplete.
fn parse_fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, ProtocolError> {
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    let mut remaining_len = 0usize;
    for (i, &byte) in buf[1..].iter().take(4).enumerate() {
        remaining_len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some(FixedHeader {
                first_byte,
                header_len: 2 + i,
                remaining_len,
            }));
        }
    }
    if buf.len() >= 5 {
        return Err(ProtocolError::malformed(
            "[MQTT-1.5.5-1] remaining length longer than four bytes",
        ));
    }
    Ok(None)
}

/// The protocol level byte of a CONNECT at the start of `buf`, when enough of it has arrived and
/// it names MQTT ("MQTT", or 3.1's "MQIsdp"). Used to answer a CONNECT that fails to decode with
/// a CONNACK the client can read; a peer naming another protocol is not answered in MQTT's
/// [MQTT-3.1.2-1].
pub fn connect_protocol_level(buf: &[u8]) -> Option<u8> {
    let header = parse_fixed_header(buf).ok()??;
    if header.packet_type() != CONNECT {
        return None;
    }
    let body = buf.get(header.header_len..)?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let name = body.get(2..2 + name_len)?;
    if name != b"MQTT" && name != b"MQIsdp" {
        return None;
    }
    body.get(2 + name_len).copied()
}

/// Takes one complete packet off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed; the buffer is then left untouched (space for the
/// rest of the packet is reserved). `version` is `None` until CONNECT has been accepted.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, ProtocolError> {
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first_byte, version)?;
    let Some(header) = parse_fixed_header(buf)? else {
        return Ok(None);
    };
    if header.total_len() > max_packet_size {
        return Err(ProtocolError::new(
            ReasonCode::PacketTooLarge,
            "[MQTT-3.2.2-15] packet exceeds the broker's maximum packet size",
        ));
    }
    if buf.len() < header.total_len() {
        buf.reserve(header.total_len() - buf.len());
        return Ok(None);
    }
    let frame = buf.split_to(header.total_len());

    let Some(version) = version else {
        let mut body = frame.freeze();
        body.advance(header.header_len);
        return decode_connect(body).map(|connect| Some(Packet::Connect(Box::new(connect))));
    };

    let packet_type = header.packet_type();
    if packet_type == PUBLISH {
        return decode_publish(frame, header, version).map(|p| Some(Packet::Publish(p)));
    }
    if packet_type == DISCONNECT {
        return decode_disconnect(frame, header, version).map(|d| Some(Packet::Disconnect(d)));
    }
    let mut body = frame.freeze();
    body.advance(header.header_len);
    let packet = match packet_type {
        PUBACK => {
            let (packet_id, reason) = decode_ack(body, version)?;
            Packet::PubAck { packet_id, reason }
        }
        PUBREC => {
            let (packet_id, reason) = decode_ack(body, version)?;
            Packet::PubRec { packet_id, reason }
        }
        PUBREL => {
            let (packet_id, reason) = decode_ack(body, version)?;
            Packet::PubRel { packet_id, reason }
        }
        PUBCOMP => {
            let (packet_id, reason) = decode_ack(body, version)?;
            Packet::PubComp { packet_id, reason }
        }
        SUBSCRIBE => Packet::Subscribe(decode_subscribe(body, version)?),
        UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(body, version)?),
        PINGREQ => {
            if header.remaining_len != 0 {
                return Err(ProtocolError::malformed(
                    "[MQTT-3.12.1] PINGREQ has a non-zero remaining length",
                ));
            }
            Packet::PingReq
        }
        // Every other type was refused by `check_first_byte`.
        _ => return Err(RESERVED_PACKET_TYPE),
    };
    Ok(Some(packet))
}

const RESERVED_PACKET_TYPE: ProtocolError =
    ProtocolError::malformed("[MQTT-2.1.2] reserved control packet type");

/// Decides on the first byte of a packet as soon as it arrives, before its remaining length or
/// body: what is wrong there is wrong whatever follows. So a connection that does not open with
/// a CONNECT fixed header (say an HTTP request sent to the MQTT port, whose "length" would ask
/// for dozens of bytes more) is closed at once, not after its body or the connect timeout.
fn check_first_byte(first_byte: u8, version: Option<ProtocolVersion>) -> Result<(), ProtocolError> {
    let Some(version) = version else {
        if first_byte == CONNECT << 4 {
            return Ok(());
        }
        if first_byte >> 4 == CONNECT {
            return Err(RESERVED_FLAGS);
        }
        return Err(ProtocolError::violation(
            "[MQTT-3.1.0-1] the first packet from a client must be CONNECT",
        ));
    };
    check_fixed_header_flags(first_byte)?;
    match first_byte >> 4 {
        CONNECT => Err(ProtocolError::violation(
            "[MQTT-3.1.0-2] a second CONNECT on one connection",
        )),
        AUTH if version.is_v5() => Err(ProtocolError::violation(
            "[MQTT-4.12.0-6] AUTH without an authentication method in CONNECT",
        )),
        2 | 9 | 11 | 13 => Err(ProtocolError::violation(
            "[MQTT-2.1.2] a server-to-client packet type sent by a client",
        )),
        // 0 is reserved in both versions, and 15 in 3.1.1.
        0 | AUTH => Err(RESERVED_PACKET_TYPE),
        _ => Ok(()),
    }
}

const RESERVED_FLAGS: ProtocolError =
    ProtocolError::malformed("[MQTT-2.2.2-2] reserved fixed-header flags are not zero");

/// Reserved flag bits must hold the values the spec lists [MQTT-2.2.2-2].
fn check_fixed_header_flags(first_byte: u8) -> Result<(), ProtocolError> {
    let flags = first_byte & 0x0F;
    match first_byte >> 4 {
        PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(ProtocolError::malformed(
                    "[MQTT-3.3.1-4] PUBLISH with both QoS bits set",
                ));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(ProtocolError::malformed(
                    "[MQTT-3.3.1-2] DUP flag set on a QoS 0 PUBLISH",
                ));
            }
            Ok(())
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if flags != 0b0010 => Err(ProtocolError::malformed(
            "[MQTT-2.2.2-2] reserved fixed-header flags of PUBREL/SUBSCRIBE/UNSUBSCRIBE are not 0010",
        )),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => Ok(()),
        _ if flags != 0 => Err(RESERVED_FLAGS),
        _ => Ok(()),
    }
}

/// Iterates the properties of a v5 packet, rejecting any that appears twice where the spec
/// allows one (all but User Property and, in PUBLISH, Subscription Identifier).
fn read_properties(
    buf: &mut Bytes,
    mut visit: impl FnMut(u32, &mut Bytes) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    let len = read_varint(buf)? as usize;
    if buf.len() < len {
        return Err(ProtocolError::malformed(
            "[MQTT-2.2.2] property length runs past the end of the packet",
        ));
    }
    let mut props = buf.split_to(len);
    let mut seen: u64 = 0;
    while props.has_remaining() {
        let id = read_varint(&mut props)?;
        if id != property::USER_PROPERTY && id < 64 {
            let bit = 1u64 << id;
            if seen & bit != 0 {
                return Err(ProtocolError::violation(
                    "[MQTT-2.2.2] a property that may appear once is included twice",
                ));
            }
            seen |= bit;
        }
        visit(id, &mut props)?;
    }
    Ok(())
}

const PROPERTY_NOT_ALLOWED: ProtocolError =
    ProtocolError::malformed("[MQTT-2.2.2] property not defined for this packet");

fn read_flag(buf: &mut Bytes) -> Result<bool, ProtocolError> {
    match read_u8(buf)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtocolError::violation(
            "[MQTT-3.1.2] boolean property is neither 0 nor 1",
        )),
    }
}

fn read_user_property(buf: &mut Bytes) -> Result<(String, String), ProtocolError> {
    Ok((read_string(buf)?, read_string(buf)?))
}

fn decode_connect(mut body: Bytes) -> Result<Connect, ProtocolError> {
    let protocol_name = read_binary(&mut body)?;
    let level = read_u8(&mut body)?;
    let version = match (&protocol_name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        (b"MQTT" | b"MQIsdp", _) => {
            return Err(ProtocolError::new(
                ReasonCode::UnsupportedProtocolVersion,
                "[MQTT-3.1.2-2] unsupported protocol level",
            ))
        }
        _ => {
            return Err(ProtocolError::malformed(
                "[MQTT-3.1.2-1] protocol name is not MQTT",
            ))
        }
    };

    let flags = read_u8(&mut body)?;
    if flags & 0b1 != 0 {
        return Err(ProtocolError::malformed(
            "[MQTT-3.1.2-3] reserved CONNECT flag is set",
        ));
    }
    let clean_start = flags & 0b10 != 0;
    let will_flag = flags & 0b100 != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let will_retain = flags & 0b10_0000 != 0;
    let has_password = flags & 0b100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(ProtocolError::malformed(
            "[MQTT-3.1.2-11] will QoS or retain set without the will flag",
        ));
    }
    let will_qos = QoS::from_u8(will_qos_bits)
        .ok_or(ProtocolError::malformed("[MQTT-3.1.2-14] will QoS is 3"))?;
    if !version.is_v5() && has_password && !has_username {
        return Err(ProtocolError::malformed(
            "[MQTT-3.1.2-22] password flag set without the user name flag",
        ));
    }
    let keep_alive = read_u16(&mut body)?;

    let mut connect = Connect {
        version,
        client_id: String::new(),
        clean_start,
        keep_alive,
        username: None,
        password: None,
        will: None,
        session_expiry_interval: 0,
        receive_maximum: u16::MAX,
        maximum_packet_size: None,
        topic_alias_maximum: 0,
        request_response_information: false,
        request_problem_information: true,
        user_properties: Vec::new(),
        authentication_method: None,
    };
    if version.is_v5() {
        let mut has_auth_data = false;
        read_properties(&mut body, |id, buf| {
            match id {
                property::SESSION_EXPIRY_INTERVAL => {
                    connect.session_expiry_interval = read_u32(buf)?
                }
                property::RECEIVE_MAXIMUM => {
                    connect.receive_maximum = read_u16(buf)?;
                    if connect.receive_maximum == 0 {
                        return Err(ProtocolError::violation(
                            "[MQTT-3.1.2-?] Receive Maximum of 0 in CONNECT",
                        ));
                    }
                }
                property::MAXIMUM_PACKET_SIZE => {
                    let size = read_u32(buf)?;
                    if size == 0 {
                        return Err(ProtocolError::violation(
                            "[MQTT-3.1.2-?] Maximum Packet Size of 0 in CONNECT",
                        ));
                    }
                    connect.maximum_packet_size = Some(size);
                }
                property::TOPIC_ALIAS_MAXIMUM => connect.topic_alias_maximum = read_u16(buf)?,
                property::REQUEST_RESPONSE_INFORMATION => {
                    connect.request_response_information = read_flag(buf)?
                }
                property::REQUEST_PROBLEM_INFORMATION => {
                    connect.request_problem_information = read_flag(buf)?
                }
                property::USER_PROPERTY => connect.user_properties.push(read_user_property(buf)?),
                property::AUTHENTICATION_METHOD => {
                    connect.authentication_method = Some(read_string(buf)?)
                }
                property::AUTHENTICATION_DATA => {
                    read_binary(buf)?;
                    has_auth_data = true;
                }
                _ => return Err(PROPERTY_NOT_ALLOWED),
            }
            Ok(())
        })?;
        if has_auth_data && connect.authentication_method.is_none() {
            return Err(ProtocolError::violation(
                "[MQTT-3.1.2-?] Authentication Data without an Authentication Method",
            ));
        }
    }

    connect.client_id = read_string(&mut body)?;
    if will_flag {
        let mut properties = MessageProperties::default();
        let mut delay_interval = 0;
        if version.is_v5() {
            read_properties(&mut body, |id, buf| {
                read_message_property(id, buf, &mut properties, Some(&mut delay_interval))
            })?;
        }
        let topic = read_string(&mut body)?;
        check_topic_name(&topic)?;
        let payload = read_binary(&mut body)?;
        check_payload_format(&properties, &payload)?;
        connect.will = Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_interval,
            properties,
        });
    }
    if has_username {
        connect.username = Some(read_string(&mut body)?);
    }
    if has_password {
        connect.password = Some(read_binary(&mut body)?);
    }
    if body.has_remaining() {
        return Err(ProtocolError::malformed(
            "[MQTT-3.1.3] bytes after the last CONNECT payload field",
        ));
    }
    Ok(connect)
}

/// One property of an application message (PUBLISH or will); the will additionally accepts the
/// Will Delay Interval.
fn read_message_property(
    id: u32,
    buf: &mut Bytes,
    properties: &mut MessageProperties,
    will_delay: Option<&mut u32>,
) -> Result<(), ProtocolError> {
    match id {
        property::PAYLOAD_FORMAT_INDICATOR => {
            let indicator = read_u8(buf)?;
            if indicator > 1 {
                return Err(ProtocolError::violation(
                    "[MQTT-3.3.2-?] payload format indicator is neither 0 nor 1",
                ));
            }
            properties.payload_format_indicator = Some(indicator);
        }
        property::MESSAGE_EXPIRY_INTERVAL => {
            properties.message_expiry_interval = Some(read_u32(buf)?)
        }
        property::CONTENT_TYPE => properties.content_type = Some(read_string(buf)?),
        property::RESPONSE_TOPIC => {
            let topic = read_string(buf)?;
            check_topic_name(&topic).map_err(|_| {
                ProtocolError::violation("[MQTT-3.3.2-14] response topic is not a valid topic name")
            })?;
            properties.response_topic = Some(topic);
        }
        property::CORRELATION_DATA => properties.correlation_data = Some(read_binary(buf)?),
        property::USER_PROPERTY => properties.user_properties.push(read_user_property(buf)?),
        property::WILL_DELAY_INTERVAL => match will_delay {
            Some(delay) => *delay = read_u32(buf)?,
            None => return Err(PROPERTY_NOT_ALLOWED),
        },
        _ => return Err(PROPERTY_NOT_ALLOWED),
    }
    Ok(())
}

/// A payload declared as UTF-8 must be UTF-8 [MQTT-3.3.2-4] (the server may check; we do, so that
/// subscribers can trust the indicator).
fn check_payload_format(
    properties: &MessageProperties,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    if properties.payload_format_indicator == Some(1) && std::str::from_utf8(payload).is_err() {
        return Err(ProtocolError::new(
            ReasonCode::PayloadFormatInvalid,
            "[MQTT-3.3.2-4] payload marked as UTF-8 is not valid UTF-8",
        ));
    }
    Ok(())
}

fn map_codec_error(error: codec::Error) -> ProtocolError {
    match error {
        codec::Error::PacketIdZero => {
            ProtocolError::malformed("[MQTT-2.3.1-1] packet identifier is zero")
        }
        codec::Error::TopicNotUtf8 => {
            ProtocolError::malformed("[MQTT-1.5.4-1] string is not well-formed UTF-8")
        }
        codec::Error::InvalidPropertyType(_) => PROPERTY_NOT_ALLOWED,
        codec::Error::InvalidQoS(_) => ProtocolError::malformed("[MQTT-3.3.1-4] QoS 3"),
        _ => ProtocolError::malformed("[MQTT-2.1] packet body does not match its type"),
    }
}

fn decode_publish(
    mut frame: BytesMut,
    header: FixedHeader,
    version: ProtocolVersion,
) -> Result<Publish, ProtocolError> {
    if !version.is_v5() {
        let publish = codec::v4::Packet::read(&mut frame, usize::MAX).map_err(map_codec_error)?;
        let codec::v4::Packet::Publish(p) = publish else {
            return Err(ProtocolError::malformed(
                "[MQTT-2.1] PUBLISH did not decode",
            ));
        };
        check_no_nul(&p.topic)?;
        check_topic_name(&p.topic)?;
        return Ok(Publish {
            dup: p.dup,
            qos: QoS::from_u8(p.qos as u8).unwrap_or(QoS::AtMostOnce),
            retain: p.retain,
            topic: p.topic,
            packet_id: p.pkid,
            payload: p.payload,
            topic_alias: None,
            properties: MessageProperties::default(),
        });
    }

    // The codec silently keeps the last of a duplicated property; check the property section
    // for duplicates and for properties a client may not send before handing the frame over.
    scan_publish_properties(&frame, header)?;
    let publish = codec::v5::Packet::read(&mut frame, None).map_err(map_codec_error)?;
    let codec::v5::Packet::Publish(p) = publish else {
        return Err(ProtocolError::malformed(
            "[MQTT-2.1] PUBLISH did not decode",
        ));
    };
    let topic = string_from_bytes(&p.topic)?;
    if !topic.is_empty() {
        check_topic_name(&topic)?;
    }
    let mut properties = MessageProperties::default();
    let mut topic_alias = None;
    if let Some(props) = p.properties {
        if props.topic_alias == Some(0) {
            return Err(ProtocolError::new(
                ReasonCode::TopicAliasInvalid,
                "[MQTT-3.3.2-8] topic alias 0",
            ));
        }
        topic_alias = props.topic_alias;
        for text in [&props.content_type, &props.response_topic]
            .into_iter()
            .flatten()
        {
            check_no_nul(text)?;
        }
        for (key, value) in &props.user_properties {
            check_no_nul(key)?;
            check_no_nul(value)?;
        }
        if let Some(response_topic) = &props.response_topic {
            check_topic_name(response_topic).map_err(|_| {
                ProtocolError::violation("[MQTT-3.3.2-14] response topic is not a valid topic name")
            })?;
        }
        properties = MessageProperties {
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            content_type: props.content_type,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            user_properties: props.user_properties,
        };
    }
    if topic.is_empty() && topic_alias.is_none() {
        return Err(ProtocolError::violation(
            "[MQTT-3.3.2-?] empty topic name without a topic alias",
        ));
    }
    check_payload_format(&properties, &p.payload)?;
    Ok(Publish {
        dup: p.dup,
        qos: QoS::from_u8(p.qos as u8).unwrap_or(QoS::AtMostOnce),
        retain: p.retain,
        topic,
        packet_id: p.pkid,
        payload: p.payload,
        topic_alias,
        properties,
    })
}

/// Walks the property section of a v5 PUBLISH frame for duplicates and client-forbidden ids.
/// Only the property section is copied, never the payload.
fn scan_publish_properties(frame: &[u8], header: FixedHeader) -> Result<(), ProtocolError> {
    const TRUNCATED: ProtocolError =
        ProtocolError::malformed("[MQTT-3.3.2] PUBLISH variable header runs past the packet");
    let body = &frame[header.header_len..];
    let topic_len = match body {
        [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
        _ => return Err(TRUNCATED),
    };
    let mut offset = 2 + topic_len;
    if (header.flags() >> 1) & 0b11 != 0 {
        offset += 2;
    }
    let rest = body.get(offset..).ok_or(TRUNCATED)?;
    let mut props_len = 0usize;
    let mut len_bytes = 0usize;
    for (i, &byte) in rest.iter().take(4).enumerate() {
        props_len |= usize::from(byte & 0x7F) << (7 * i);
        len_bytes = i + 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let section = rest.get(..len_bytes + props_len).ok_or(TRUNCATED)?;
    let mut section = Bytes::copy_from_slice(section);
    read_properties(&mut section, |id, buf| {
        if id == property::SUBSCRIPTION_IDENTIFIER {
            return Err(ProtocolError::violation(
                "[MQTT-3.3.4-6] PUBLISH from a client carries a subscription identifier",
            ));
        }
        if id == property::TOPIC_ALIAS {
            read_u16(buf)?;
            return Ok(());
        }
        let mut scratch = MessageProperties::default();
        read_message_property(id, buf, &mut scratch, None)
    })
}

fn decode_ack(mut body: Bytes, version: ProtocolVersion) -> Result<(u16, u8), ProtocolError> {
    let packet_id = read_u16(&mut body)?;
    if packet_id == 0 {
        return Err(ProtocolError::malformed(
            "[MQTT-2.3.1-1] packet identifier is zero",
        ));
    }
    if !version.is_v5() {
        if body.has_remaining() {
            return Err(ProtocolError::malformed(
                "[MQTT-3.4.2] acknowledgement longer than two bytes",
            ));
        }
        return Ok((packet_id, 0));
    }
    let reason = if body.has_remaining() {
        read_u8(&mut body)?
    } else {
        0
    };
    if body.has_remaining() {
        read_properties(&mut body, |id, buf| match id {
            property::REASON_STRING => read_string(buf).map(drop),
            property::USER_PROPERTY => read_user_property(buf).map(drop),
            _ => Err(PROPERTY_NOT_ALLOWED),
        })?;
    }
    Ok((packet_id, reason))
}

fn decode_subscribe(mut body: Bytes, version: ProtocolVersion) -> Result<Subscribe, ProtocolError> {
    let packet_id = read_u16(&mut body)?;
    if packet_id == 0 {
        return Err(ProtocolError::malformed(
            "[MQTT-2.3.1-1] packet identifier is zero",
        ));
    }
    let mut subscription_id = None;
    if version.is_v5() {
        read_properties(&mut body, |id, buf| {
            match id {
                property::SUBSCRIPTION_IDENTIFIER => {
                    let value = read_varint(buf)?;
                    if value == 0 {
                        return Err(ProtocolError::violation(
                            "[MQTT-3.8.2-?] subscription identifier 0",
                        ));
                    }
                    subscription_id = Some(value);
                }
                property::USER_PROPERTY => {
                    read_user_property(buf)?;
                }
                _ => return Err(PROPERTY_NOT_ALLOWED),
            }
            Ok(())
        })?;
    }
    let mut filters = Vec::new();
    while body.has_remaining() {
        let filter = read_string(&mut body)?;
        let options = read_u8(&mut body)?;
        let reserved_mask = if version.is_v5() {
            0b1100_0000
        } else {
            0b1111_1100
        };
        if options & reserved_mask != 0 {
            return Err(ProtocolError::malformed(
                "[MQTT-3.8.3-5] reserved bits of the subscription options are set",
            ));
        }
        let qos = QoS::from_u8(options & 0b11).ok_or(ProtocolError::malformed(
            "[MQTT-3.8.3-4] requested QoS is 3",
        ))?;
        let retain_handling = match (options >> 4) & 0b11 {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNewSubscription,
            2 => RetainHandling::DoNotSend,
            _ => {
                return Err(ProtocolError::violation(
                    "[MQTT-3.8.3-?] retain handling is 3",
                ))
            }
        };
        filters.push(SubscribeRequest {
            filter,
            qos,
            no_local: options & 0b100 != 0,
            retain_as_published: options & 0b1000 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(ProtocolError::violation(
            "[MQTT-3.8.3-3] SUBSCRIBE without a topic filter",
        ));
    }
    Ok(Subscribe {
        packet_id,
        subscription_id,
        filters,
    })
}

fn decode_unsubscribe(
    mut body: Bytes,
    version: ProtocolVersion,
) -> Result<Unsubscribe, ProtocolError> {
    let packet_id = read_u16(&mut body)?;
    if packet_id == 0 {
        return Err(ProtocolError::malformed(
            "[MQTT-2.3.1-1] packet identifier is zero",
        ));
    }
    if version.is_v5() {
        read_properties(&mut body, |id, buf| match id {
            property::USER_PROPERTY => read_user_property(buf).map(drop),
            _ => Err(PROPERTY_NOT_ALLOWED),
        })?;
    }
    let mut filters = Vec::new();
    while body.has_remaining() {
        filters.push(read_string(&mut body)?);
    }
    if filters.is_empty() {
        return Err(ProtocolError::violation(
            "[MQTT-3.10.3-2] UNSUBSCRIBE without a topic filter",
        ));
    }
    Ok(Unsubscribe { packet_id, filters })
}

fn decode_disconnect(
    mut frame: BytesMut,
    header: FixedHeader,
    version: ProtocolVersion,
) -> Result<Disconnect, ProtocolError> {
    if !version.is_v5() {
        if header.remaining_len != 0 {
            return Err(ProtocolError::malformed(
                "[MQTT-3.14.1] DISCONNECT has a non-zero remaining length",
            ));
        }
        return Ok(Disconnect {
            reason: 0,
            session_expiry_interval: None,
        });
    }
    if header.remaining_len == 1 {
        // A reason code without a property length: "If the Remaining Length is less than 2, a
        // value of 0 is used" [MQTT-3.14.2.2.1], which the codec does not accept. Mosquitto's
        // clients send exactly this (`e0 01 04`, disconnect with will) when they time out.
        // Rewritten with the property length, so the codec still validates the reason code.
        let reason = frame[header.header_len];
        frame = BytesMut::from(&[header.first_byte, 2, reason, 0][..]);
    }
    let packet = codec::v5::Packet::read(&mut frame, None).map_err(map_codec_error)?;
    let codec::v5::Packet::Disconnect(d) = packet else {
        return Err(ProtocolError::malformed(
            "[MQTT-2.1] DISCONNECT did not decode",
        ));
    };
    Ok(Disconnect {
        reason: d.reason_code as u8,
        session_expiry_interval: d.properties.and_then(|p| p.session_expiry_interval),
    })
}
