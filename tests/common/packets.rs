//! Byte-level builders for client packets, written out by hand from the spec so the tests do not
//! share code (or mistakes) with the broker's codec.

pub fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return out;
        }
    }
}

pub fn frame(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

pub fn string(s: &str) -> Vec<u8> {
    binary(s.as_bytes())
}

pub fn binary(b: &[u8]) -> Vec<u8> {
    let mut out = (b.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(b);
    out
}

/// MQTT 3.1.1 CONNECT.
pub fn connect_v4(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(4);
    body.push(if clean { 0x02 } else { 0 });
    body.extend(keep_alive.to_be_bytes());
    body.extend(string(client_id));
    frame(0x10, &body)
}

/// MQTT 3.1.1 CONNECT with a will.
pub fn connect_v4_will(
    client_id: &str,
    keep_alive: u16,
    will_topic: &str,
    will_payload: &[u8],
    will_qos: u8,
) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(4);
    body.push(0x02 | 0x04 | (will_qos << 3));
    body.extend(keep_alive.to_be_bytes());
    body.extend(string(client_id));
    body.extend(string(will_topic));
    body.extend(binary(will_payload));
    frame(0x10, &body)
}

/// MQTT 5 CONNECT with raw property bytes (without the property length).
pub fn connect_v5(client_id: &str, clean: bool, keep_alive: u16, properties: &[u8]) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(5);
    body.push(if clean { 0x02 } else { 0 });
    body.extend(keep_alive.to_be_bytes());
    body.extend(remaining_length(properties.len()));
    body.extend_from_slice(properties);
    body.extend(string(client_id));
    frame(0x10, &body)
}

/// PUBLISH for either version; `properties` is `None` for 3.1.1.
pub fn publish(
    topic: &str,
    qos: u8,
    packet_id: u16,
    retain: bool,
    dup: bool,
    properties: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    let first = 0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain);
    let mut body = string(topic);
    if qos > 0 {
        body.extend(packet_id.to_be_bytes());
    }
    if let Some(props) = properties {
        body.extend(remaining_length(props.len()));
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    frame(first, &body)
}

/// SUBSCRIBE with one filter; `properties` is `None` for 3.1.1.
pub fn subscribe(packet_id: u16, filter: &str, options: u8, properties: Option<&[u8]>) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if let Some(props) = properties {
        body.extend(remaining_length(props.len()));
        body.extend_from_slice(props);
    }
    body.extend(string(filter));
    body.push(options);
    frame(0x82, &body)
}

pub fn ack(first_byte: u8, packet_id: u16) -> Vec<u8> {
    frame(first_byte, &packet_id.to_be_bytes())
}

pub fn puback(packet_id: u16) -> Vec<u8> {
    ack(0x40, packet_id)
}

pub fn pubrec(packet_id: u16) -> Vec<u8> {
    ack(0x50, packet_id)
}

pub fn pubrel(packet_id: u16) -> Vec<u8> {
    ack(0x62, packet_id)
}

pub fn pubcomp(packet_id: u16) -> Vec<u8> {
    ack(0x70, packet_id)
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// Decoded view of a PUBLISH the broker sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedPublish {
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub topic: String,
    pub packet_id: u16,
    /// Raw v5 property bytes (empty for 3.1.1).
    pub properties: Vec<u8>,
    pub payload: Vec<u8>,
}

pub fn parse_publish(packet: &super::RawPacket, v5: bool) -> ReceivedPublish {
    assert_eq!(packet.packet_type(), 3, "not a PUBLISH: {packet:?}");
    let qos = (packet.first_byte >> 1) & 3;
    let b = &packet.body;
    let topic_len = usize::from(u16::from_be_bytes([b[0], b[1]]));
    let topic = String::from_utf8(b[2..2 + topic_len].to_vec()).unwrap();
    let mut i = 2 + topic_len;
    let mut packet_id = 0;
    if qos > 0 {
        packet_id = u16::from_be_bytes([b[i], b[i + 1]]);
        i += 2;
    }
    let mut properties = Vec::new();
    if v5 {
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let byte = b[i];
            i += 1;
            len |= usize::from(byte & 0x7F) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        properties = b[i..i + len].to_vec();
        i += len;
    }
    ReceivedPublish {
        qos,
        retain: packet.first_byte & 1 != 0,
        dup: packet.first_byte & 0x08 != 0,
        topic,
        packet_id,
        properties,
        payload: b[i..].to_vec(),
    }
}

/// MQTT 5 CONNECT (clean start) with username and password.
pub fn connect_v5_login(client_id: &str, username: &str, password: &[u8]) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(5);
    body.push(0x02 | 0x80 | 0x40);
    body.extend(60u16.to_be_bytes());
    body.push(0);
    body.extend(string(client_id));
    body.extend(string(username));
    body.extend(binary(password));
    frame(0x10, &body)
}

/// MQTT 3.1.1 CONNECT (clean session) with username and password.
pub fn connect_v4_login(client_id: &str, username: &str, password: &[u8]) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(4);
    body.push(0x02 | 0x80 | 0x40);
    body.extend(60u16.to_be_bytes());
    body.extend(string(client_id));
    body.extend(string(username));
    body.extend(binary(password));
    frame(0x10, &body)
}
