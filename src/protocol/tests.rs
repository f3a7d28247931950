//! Byte-vector tests of the codec layer: what the broker decodes from known client bytes, and
//! that what it encodes is read back correctly by an independent decoder (the codec crate's
//! client side).

use bytes::{Bytes, BytesMut};
use mqttbytes_ng as codec;
use proptest::prelude::*;

use super::encode::{self, AckKind, ConnAck, OutgoingPublish};
use super::{
    connect_protocol_level, decode, MessageProperties, Packet, ProtocolVersion, QoS, ReasonCode,
    RetainHandling,
};

fn decode_one(
    bytes: &[u8],
    version: Option<ProtocolVersion>,
) -> Result<Packet, super::ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, version, 1 << 20)?.expect("complete packet");
    assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    Ok(packet)
}

#[test]
fn decodes_a_3_1_1_connect_with_will_and_login() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x23,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
        0b1110_1110, // user, password, will retain, will QoS 1, will, clean
        0x00, 0x3C,
        0x00, 0x03, b'c', b'i', b'd',
        0x00, 0x03, b'w', b'/', b't',
        0x00, 0x02, b'b', b'y',
        0x00, 0x04, b'u', b's', b'e', b'r',
        0x00, 0x03, 0xFF, 0x00, 0x01,
    ];
    let Packet::Connect(connect) = decode_one(&bytes, None).unwrap() else {
        panic!("not a CONNECT")
    };
    assert_eq!(connect.version, ProtocolVersion::V3_1_1);
    assert_eq!(connect.client_id, "cid");
    assert!(connect.clean_start);
    assert_eq!(connect.keep_alive, 60);
    let will = connect.will.unwrap();
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("w/t", &b"by"[..])
    );
    assert_eq!(will.qos, QoS::AtLeastOnce);
    assert!(will.retain);
    assert_eq!(connect.username.as_deref(), Some("user"));
    assert_eq!(connect.password.as_deref(), Some(&[0xFF, 0x00, 0x01][..]));
}

#[test]
fn decodes_v5_connect_properties() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x1B,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x00, 0x00, 0x0A,
        0x0D, // properties
        0x11, 0x00, 0x00, 0x00, 0x3C, // session expiry 60
        0x21, 0x00, 0x05,             // receive maximum 5
        0x22, 0x00, 0x08,             // topic alias maximum 8
        0x17, 0x00,                   // request problem information 0
        0x00, 0x01, b'x',
    ];
    let Packet::Connect(connect) = decode_one(&bytes, None).unwrap() else {
        panic!("not a CONNECT")
    };
    assert_eq!(connect.version, ProtocolVersion::V5);
    assert_eq!(connect.session_expiry_interval, 60);
    assert_eq!(connect.receive_maximum, 5);
    assert_eq!(connect.topic_alias_maximum, 8);
    assert!(!connect.request_problem_information);
    assert!(!connect.clean_start);
}

#[test]
fn duplicate_connect_property_is_a_protocol_error() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x14,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x0A,
        0x06, 0x21, 0x00, 0x05, 0x21, 0x00, 0x06,
        0x00, 0x01, b'x',
    ];
    let error = decode_one(&bytes, None).unwrap_err();
    assert_eq!(error.reason, ReasonCode::ProtocolError);
}

#[test]
fn will_qos_without_will_flag_is_malformed() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x0D,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0b0000_1010, 0x00, 0x0A,
        0x00, 0x01, b'x',
    ];
    assert_eq!(
        decode_one(&bytes, None).unwrap_err().reason,
        ReasonCode::MalformedPacket
    );
}

#[test]
fn decodes_v5_subscribe_options_and_identifier() {
    #[rustfmt::skip]
    let bytes = [
        0x82, 0x0B,
        0x00, 0x09,
        0x02, 0x0B, 0x07,           // subscription identifier 7
        0x00, 0x03, b'a', b'/', b'#',
        0b0010_1110,                // retain handling 2, RAP, no local, QoS 2
    ];
    let Packet::Subscribe(subscribe) = decode_one(&bytes, Some(ProtocolVersion::V5)).unwrap()
    else {
        panic!("not a SUBSCRIBE")
    };
    assert_eq!(subscribe.packet_id, 9);
    assert_eq!(subscribe.subscription_id, Some(7));
    let filter = &subscribe.filters[0];
    assert_eq!(filter.filter, "a/#");
    assert_eq!(filter.qos, QoS::ExactlyOnce);
    assert!(filter.no_local && filter.retain_as_published);
    assert_eq!(filter.retain_handling, RetainHandling::DoNotSend);
}

#[test]
fn reserved_subscription_option_bits_are_malformed() {
    let bytes = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0b0000_0101];
    assert_eq!(
        decode_one(&bytes, Some(ProtocolVersion::V3_1_1))
            .unwrap_err()
            .reason,
        ReasonCode::MalformedPacket
    );
}

#[test]
fn zero_length_v5_disconnect_is_a_normal_disconnect() {
    let Packet::Disconnect(disconnect) =
        decode_one(&[0xE0, 0x00], Some(ProtocolVersion::V5)).unwrap()
    else {
        panic!("not a DISCONNECT")
    };
    assert_eq!(disconnect.reason, 0);
}

#[test]
fn v5_disconnect_with_a_reason_code_and_no_property_length() {
    // Remaining length 1 [MQTT-3.14.2.2.1]: sent by mosquitto_sub -W on its timeout.
    let Packet::Disconnect(disconnect) =
        decode_one(&[0xE0, 0x01, 0x04], Some(ProtocolVersion::V5)).unwrap()
    else {
        panic!("not a DISCONNECT");
    };
    assert_eq!(disconnect.reason, ReasonCode::DisconnectWithWill as u8);
    assert_eq!(disconnect.session_expiry_interval, None);
    // Still validated: 0x05 is no DISCONNECT reason code.
    assert!(decode_one(&[0xE0, 0x01, 0x05], Some(ProtocolVersion::V5)).is_err());
}

#[test]
fn partial_frames_wait_for_more_bytes_without_consuming() {
    let full = [0x30, 0x05, 0x00, 0x01, b't', b'h', b'i'];
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert!(decode(&mut buf, Some(ProtocolVersion::V3_1_1), 1024)
            .unwrap()
            .is_none());
        assert_eq!(buf.len(), cut);
    }
}

#[test]
fn an_unknown_level_is_unsupported_and_an_unknown_name_is_not_mqtt() {
    // CONNECT of 3.1.1's layout with the given protocol name and level.
    let connect = |name: &[u8], level: u8| {
        let mut body = (name.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(name);
        body.extend([level, 0x02, 0x00, 0x3C, 0x00, 0x01, b'x']);
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    };
    let unsupported = connect(b"MQTT", 6);
    assert_eq!(connect_protocol_level(&unsupported), Some(6));
    assert_eq!(
        decode_one(&unsupported, None).unwrap_err().reason,
        ReasonCode::UnsupportedProtocolVersion
    );
    // The level is known as soon as its byte has arrived.
    assert_eq!(connect_protocol_level(&unsupported[..9]), Some(6));
    assert_eq!(connect_protocol_level(&unsupported[..8]), None);
    assert_eq!(connect_protocol_level(&connect(b"MQIsdp", 5)), Some(5));

    let not_mqtt = connect(b"MQTX", 5);
    assert_eq!(connect_protocol_level(&not_mqtt), None);
    assert_eq!(
        decode_one(&not_mqtt, None).unwrap_err().reason,
        ReasonCode::MalformedPacket
    );
}

/// Decodes a lone first byte: `Ok(())` when the decoder waits for more, the reason otherwise.
fn judge_first_byte(byte: u8, version: Option<ProtocolVersion>) -> Result<(), ReasonCode> {
    let mut buf = BytesMut::from(&[byte][..]);
    match decode(&mut buf, version, 1024) {
        Ok(None) => Ok(()),
        Ok(Some(packet)) => panic!("one byte decoded as {packet:?}"),
        Err(error) => Err(error.reason),
    }
}

#[test]
fn before_connect_every_first_byte_but_connects_is_refused_alone() {
    for byte in 0..=u8::MAX {
        let judged = judge_first_byte(byte, None);
        if byte == 0x10 {
            assert_eq!(judged, Ok(()));
        } else {
            assert!(judged.is_err(), "{byte:#04x} waited for more bytes");
        }
    }
    // An HTTP request to the MQTT port: its "remaining length" ('E') asks for 69 bytes.
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    let error = decode(&mut buf, None, 1024).unwrap_err();
    assert_eq!(error.reason, ReasonCode::ProtocolError);
}

#[test]
fn type_and_flag_errors_are_refused_on_the_first_byte_alone() {
    const MALFORMED: Result<(), ReasonCode> = Err(ReasonCode::MalformedPacket);
    const VIOLATION: Result<(), ReasonCode> = Err(ReasonCode::ProtocolError);
    let refused = [
        (0x36, MALFORMED, MALFORMED), // PUBLISH with QoS 3
        (0x38, MALFORMED, MALFORMED), // DUP on a QoS 0 PUBLISH
        (0x60, MALFORMED, MALFORMED), // PUBREL, SUBSCRIBE, UNSUBSCRIBE need flags 0010
        (0x80, MALFORMED, MALFORMED),
        (0xA3, MALFORMED, MALFORMED),
        (0x41, MALFORMED, MALFORMED), // flags on PUBACK, PINGREQ, DISCONNECT, CONNECT
        (0xC8, MALFORMED, MALFORMED),
        (0xE1, MALFORMED, MALFORMED),
        (0x12, MALFORMED, MALFORMED),
        (0x00, MALFORMED, MALFORMED), // reserved type 0
        (0xF0, MALFORMED, VIOLATION), // reserved in 3.1.1; AUTH, not offered, in 5.0
        (0x10, VIOLATION, VIOLATION), // a second CONNECT
        (0x20, VIOLATION, VIOLATION), // CONNACK, SUBACK, UNSUBACK, PINGRESP: server to client
        (0x90, VIOLATION, VIOLATION),
        (0xB0, VIOLATION, VIOLATION),
        (0xD0, VIOLATION, VIOLATION),
    ];
    for (byte, v3, v5) in refused {
        assert_eq!(
            judge_first_byte(byte, Some(ProtocolVersion::V3_1_1)),
            v3,
            "{byte:#04x}"
        );
        assert_eq!(
            judge_first_byte(byte, Some(ProtocolVersion::V5)),
            v5,
            "{byte:#04x}"
        );
    }
    for byte in [0x30, 0x3B, 0x40, 0x50, 0x62, 0x70, 0x82, 0xA2, 0xC0, 0xE0] {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            assert_eq!(judge_first_byte(byte, Some(version)), Ok(()), "{byte:#04x}");
        }
    }
}

#[test]
fn connack_bytes_for_both_versions() {
    let mut out = BytesMut::new();
    encode::connack(
        ProtocolVersion::V3_1_1,
        &ConnAck {
            session_present: true,
            ..ConnAck::default()
        },
        &mut out,
    );
    assert_eq!(&out[..], &[0x20, 0x02, 0x01, 0x00]);

    let mut out = BytesMut::new();
    encode::connack(
        ProtocolVersion::V5,
        &ConnAck {
            reason: Some(ReasonCode::BadUserNameOrPassword),
            session_present: true,
            receive_maximum: Some(10),
            ..ConnAck::default()
        },
        &mut out,
    );
    // Session present is never set on a refusal [MQTT-3.2.2-6].
    assert_eq!(&out[..], &[0x20, 0x06, 0x00, 0x86, 0x03, 0x21, 0x00, 0x0A]);
}

#[test]
fn v5_acks_with_a_reason_carry_the_property_length_byte() {
    let mut out = BytesMut::new();
    encode::ack(ProtocolVersion::V5, AckKind::PubRel, 5, 0x92, &mut out);
    assert_eq!(&out[..], &[0x62, 0x04, 0x00, 0x05, 0x92, 0x00]);
    out.clear();
    encode::disconnect(ReasonCode::SessionTakenOver, None, &mut out);
    assert_eq!(&out[..], &[0xE0, 0x02, 0x8E, 0x00]);
    out.clear();
    encode::ack(ProtocolVersion::V3_1_1, AckKind::PubAck, 5, 0x10, &mut out);
    assert_eq!(&out[..], &[0x40, 0x02, 0x00, 0x05]);
}

#[test]
fn v5_disconnect_is_readable_by_the_codec() {
    let mut out = BytesMut::new();
    encode::disconnect(ReasonCode::KeepAliveTimeout, Some("idle"), &mut out);
    let packet = codec::v5::Packet::read(&mut out, None).unwrap();
    let codec::v5::Packet::Disconnect(disconnect) = packet else {
        panic!("not a DISCONNECT")
    };
    assert_eq!(disconnect.reason_code as u8, 0x8D);
    assert_eq!(
        disconnect.properties.unwrap().reason_string.as_deref(),
        Some("idle")
    );
}

fn arb_properties() -> impl Strategy<Value = MessageProperties> {
    (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of("[a-z/]{0,12}"),
        proptest::option::of("[a-z]{1,12}"),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::collection::vec(("[a-z]{0,6}", "[a-z]{0,6}"), 0..3),
    )
        .prop_map(
            |(format, expiry, content_type, response_topic, correlation, user)| MessageProperties {
                payload_format_indicator: format,
                message_expiry_interval: expiry,
                content_type,
                response_topic,
                correlation_data: correlation.map(Bytes::from),
                user_properties: user,
            },
        )
}

proptest! {
    /// Whatever the broker encodes, an independent decoder reads back field for field.
    #[test]
    fn encoded_publish_round_trips_through_the_codec(
        topic in "[a-z/]{1,24}",
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        qos in 0u8..=2,
        retain in any::<bool>(),
        dup in any::<bool>(),
        packet_id in 1u16..,
        properties in arb_properties(),
        subscription_ids in proptest::collection::vec(1u32..268_435_455, 0..3),
        topic_alias in proptest::option::of(1u16..),
        v5 in any::<bool>(),
    ) {
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
        let qos = QoS::from_u8(qos).unwrap();
        let payload = Bytes::from(payload);
        let publish = OutgoingPublish {
            topic: &topic,
            qos,
            retain,
            dup: dup && qos != QoS::AtMostOnce,
            packet_id,
            payload: &payload,
            properties: &properties,
            message_expiry_interval: properties.message_expiry_interval,
            topic_alias,
            subscription_ids: &subscription_ids,
        };
        let mut out = BytesMut::new();
        encode::publish(version, &publish, &mut out);
        prop_assert_eq!(out.len(), encode::publish_size(version, &publish));
        if v5 {
            let codec::v5::Packet::Publish(read) = codec::v5::Packet::read(&mut out, None).unwrap() else {
                panic!("not a PUBLISH");
            };
            prop_assert_eq!(&read.topic[..], topic.as_bytes());
            prop_assert_eq!(&read.payload[..], &payload[..]);
            prop_assert_eq!(read.qos as u8, qos as u8);
            prop_assert_eq!(read.retain, retain);
            let props = read.properties.unwrap_or_default();
            prop_assert_eq!(props.payload_format_indicator, properties.payload_format_indicator);
            prop_assert_eq!(props.message_expiry_interval, properties.message_expiry_interval);
            prop_assert_eq!(props.content_type, properties.content_type.clone());
            prop_assert_eq!(props.response_topic, properties.response_topic.clone());
            prop_assert_eq!(props.correlation_data, properties.correlation_data.clone());
            prop_assert_eq!(props.user_properties, properties.user_properties.clone());
            prop_assert_eq!(props.topic_alias, topic_alias);
            let ids: Vec<u32> = props.subscription_identifiers.iter().map(|&id| id as u32).collect();
            prop_assert_eq!(ids, subscription_ids);
        } else {
            let codec::v4::Packet::Publish(read) = codec::v4::Packet::read(&mut out, usize::MAX).unwrap() else {
                panic!("not a PUBLISH");
            };
            prop_assert_eq!(read.topic, topic);
            prop_assert_eq!(&read.payload[..], &payload[..]);
            prop_assert_eq!(read.qos as u8, qos as u8);
            if qos != QoS::AtMostOnce {
                prop_assert_eq!(read.pkid, packet_id);
            }
        }
        prop_assert!(out.is_empty());
    }

    /// The decoder never panics and never consumes a partial frame, whatever the bytes.
    #[test]
    fn decoder_survives_arbitrary_input(bytes in proptest::collection::vec(any::<u8>(), 0..256), v5 in any::<bool>()) {
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode(&mut buf, None, 1024);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match decode(&mut buf, Some(version), 1024) {
                Ok(Some(_)) => prop_assert!(buf.len() < before),
                Ok(None) => { prop_assert_eq!(buf.len(), before); break; }
                Err(_) => break,
            }
        }
    }
}

#[test]
fn a_connect_never_shows_its_password_when_printed() {
    let mut bytes = BytesMut::from(
        &[
            0x10, 0x1C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xC2, 0x00, 0x3C, 0x00, 0x01,
            b'c', 0x00, 0x01, b'u', 0x00, 0x0A, b's', b'3', b'c', b'r', b'e', b't', b'-', b'p',
            b'w', b'!',
        ][..],
    );
    let Some(Packet::Connect(connect)) = decode(&mut bytes, None, 1024).unwrap() else {
        panic!("not a CONNECT");
    };
    assert_eq!(connect.password.as_deref(), Some(&b"s3cret-pw!"[..]));
    let printed = format!("{connect:?}");
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("<redacted>"), "{printed}");
}
