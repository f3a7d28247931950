//! Protocol behaviour checked byte by byte: malformed input and violations, exactly-once
//! de-duplication, flow control, keep alive, topic aliases and the other rules a client library
//! would hide.

mod common;

use std::time::Duration;

use common::packets::{self, frame, parse_publish, string};
use common::{RawClient, RawPacket, TestBroker};

const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBACK: u8 = 9;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

async fn v4(addr: std::net::SocketAddr, id: &str) -> RawClient {
    RawClient::handshake(addr, &packets::connect_v4(id, true, 60))
        .await
        .0
}

async fn v5(addr: std::net::SocketAddr, id: &str, props: &[u8]) -> (RawClient, RawPacket) {
    RawClient::handshake(addr, &packets::connect_v5(id, true, 60, props)).await
}

async fn subscribe(client: &mut RawClient, filter: &str, qos: u8, v5: bool) -> u8 {
    let props: &[u8] = &[];
    client
        .send(&packets::subscribe(1, filter, qos, v5.then_some(props)))
        .await;
    let suback = client.recv_type(SUBACK).await;
    *suback.body.last().unwrap()
}

/// The reason code of the v5 DISCONNECT the broker sent before closing.
async fn expect_disconnect_reason(client: &mut RawClient) -> u8 {
    let packets = client.expect_closed().await;
    let disconnect = packets
        .iter()
        .find(|p| p.packet_type() == DISCONNECT)
        .unwrap_or_else(|| panic!("no DISCONNECT before close: {packets:?}"));
    assert_eq!(disconnect.first_byte, 0xE0);
    disconnect.body[0]
}

/// A v5 connection sends `bad`; the broker must close it with `reason`, while a healthy
/// subscriber on another connection keeps receiving.
async fn assert_v5_rejects(bad: &[u8], reason: u8) {
    let broker = TestBroker::start().await;
    let mut healthy = v5(broker.addr, "healthy", &[]).await.0;
    subscribe(&mut healthy, "ok/#", 0, true).await;

    let (mut offender, _) = v5(broker.addr, "offender", &[]).await;
    offender.send_lenient(bad).await;
    assert_eq!(
        expect_disconnect_reason(&mut offender).await,
        reason,
        "wrong reason for {bad:02x?}"
    );

    let mut publisher = v5(broker.addr, "publisher", &[]).await.0;
    publisher
        .send(&packets::publish(
            "ok/1",
            0,
            0,
            false,
            false,
            Some(&[]),
            b"still here",
        ))
        .await;
    let delivered = parse_publish(&healthy.recv_type(PUBLISH).await, true);
    assert_eq!(delivered.payload, b"still here");
    broker.shutdown().await;
}

/// A 3.1.1 connection sends `bad`; the broker closes it without a reply.
async fn assert_v4_rejects(bad: &[u8]) {
    let broker = TestBroker::start().await;
    let mut offender = v4(broker.addr, "offender").await;
    offender.send_lenient(bad).await;
    let sent = offender.expect_closed().await;
    assert!(sent.is_empty(), "3.1.1 gets no DISCONNECT: {sent:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn publish_before_connect_closes_without_connack() {
    let broker = TestBroker::start().await;
    let mut client = RawClient::connect(broker.addr).await;
    client
        .send(&packets::publish("a", 0, 0, false, false, None, b"x"))
        .await;
    assert!(client.expect_closed().await.is_empty());
    broker.shutdown().await;
}

/// The packets the broker sent before closing; panics unless it closed within `limit`.
async fn closed_within(client: &mut RawClient, limit: Duration) -> Vec<RawPacket> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.recv_within(left).await {
            Ok(None) => return before,
            Ok(Some(packet)) => before.push(packet),
            Err(()) => panic!("broker did not close within {limit:?}; got {before:?}"),
        }
    }
}

#[tokio::test]
async fn an_http_request_is_closed_at_once_not_after_the_connect_timeout() {
    let broker = TestBroker::start_with(|c| c.mqtt.connect_timeout = Duration::from_secs(30)).await;
    let mut client = RawClient::connect(broker.addr).await;
    // Only the request line: as a fixed header its "remaining length" ('E') asks for 69 bytes
    // more, which a browser waiting for an answer never sends.
    client.send(b"GET / HTTP/1.1\r\n").await;
    let sent = closed_within(&mut client, Duration::from_secs(2)).await;
    assert!(sent.is_empty(), "no CONNACK for a non-MQTT peer: {sent:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_fixed_header_error_closes_on_its_first_byte_without_the_rest() {
    let broker = TestBroker::start().await;
    // Each first byte alone, never followed by a length or body.
    for (first_byte, reason) in [
        (0x36, 0x81), // PUBLISH with QoS 3 [MQTT-3.3.1-4]
        (0x60, 0x81), // PUBREL, SUBSCRIBE, UNSUBSCRIBE need flags 0010 [MQTT-2.2.2-2]
        (0x80, 0x81),
        (0xA0, 0x81),
        (0x00, 0x81), // reserved packet type
        (0xF0, 0x82), // AUTH without enhanced authentication
    ] {
        let (mut client, _) = v5(broker.addr, "early5", &[]).await;
        client.send(&[first_byte]).await;
        let sent = closed_within(&mut client, Duration::from_secs(2)).await;
        let disconnect = sent.iter().find(|p| p.packet_type() == DISCONNECT);
        assert_eq!(
            disconnect.map(|p| p.body[0]),
            Some(reason),
            "after {first_byte:#04x}: {sent:?}"
        );
    }
    for first_byte in [0x36, 0xF0] {
        let mut client = v4(broker.addr, "early4").await;
        client.send(&[first_byte]).await;
        let sent = closed_within(&mut client, Duration::from_secs(2)).await;
        assert!(sent.is_empty(), "3.1.1 gets no DISCONNECT: {sent:?}");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn second_connect_is_a_protocol_error() {
    assert_v5_rejects(&packets::connect_v5("again", true, 60, &[]), 0x82).await;
    assert_v4_rejects(&packets::connect_v4("again", true, 60)).await;
}

#[tokio::test]
async fn oversized_packet_is_refused_before_it_is_buffered() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_packet_size = 1024).await;
    let (mut client, connack) = v5(broker.addr, "big", &[]).await;
    // CONNACK advertises the limit: property 0x27 = 1024.
    assert!(connack
        .body
        .windows(5)
        .any(|w| w == [0x27, 0x00, 0x00, 0x04, 0x00]));
    // Announce 100 MB but send only the header: the broker must not wait for the body.
    let mut header = vec![0x30];
    header.extend(packets::remaining_length(100_000_000));
    client.send(&header).await;
    assert_eq!(expect_disconnect_reason(&mut client).await, 0x95);
    broker.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_topic_is_malformed() {
    let mut body = vec![0x00, 0x02, 0xC3, 0x28];
    body.push(0); // empty property section
    body.extend_from_slice(b"payload");
    assert_v5_rejects(&frame(0x30, &body), 0x81).await;
}

#[tokio::test]
async fn nul_character_in_topic_is_malformed() {
    assert_v5_rejects(
        &packets::publish("a\0b", 0, 0, false, false, Some(&[]), b"x"),
        0x81,
    )
    .await;
    assert_v4_rejects(&packets::publish("a\0b", 0, 0, false, false, None, b"x")).await;
}

#[tokio::test]
async fn wildcard_in_publish_topic_is_refused() {
    assert_v5_rejects(
        &packets::publish("a/+/b", 0, 0, false, false, Some(&[]), b"x"),
        0x90,
    )
    .await;
    assert_v4_rejects(&packets::publish("a/#", 1, 1, false, false, None, b"x")).await;
}

#[tokio::test]
async fn subscribe_with_wrong_fixed_header_flags_is_malformed() {
    let mut bad = packets::subscribe(1, "a", 0, Some(&[]));
    bad[0] = 0x80;
    assert_v5_rejects(&bad, 0x81).await;
}

#[tokio::test]
async fn subscribe_without_filters_is_a_protocol_error() {
    // Packet id 1 and an empty property section, no filters.
    assert_v5_rejects(&frame(0x82, &[0x00, 0x01, 0x00]), 0x82).await;
    assert_v4_rejects(&frame(0x82, &[0x00, 0x01])).await;
}

#[tokio::test]
async fn qos_3_publish_is_malformed() {
    let mut bad = packets::publish("a", 1, 1, false, false, Some(&[]), b"x");
    bad[0] = 0x36;
    assert_v5_rejects(&bad, 0x81).await;
}

#[tokio::test]
async fn five_byte_remaining_length_is_malformed() {
    assert_v5_rejects(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], 0x81).await;
}

#[tokio::test]
async fn auth_packet_is_a_protocol_error_without_enhanced_auth() {
    assert_v5_rejects(&[0xF0, 0x00], 0x82).await;
}

#[tokio::test]
async fn subscription_identifier_from_a_client_publish_is_a_protocol_error() {
    assert_v5_rejects(
        &packets::publish("a", 0, 0, false, false, Some(&[0x0B, 0x01]), b"x"),
        0x82,
    )
    .await;
}

#[tokio::test]
async fn payload_not_matching_its_utf8_format_indicator_is_refused() {
    assert_v5_rejects(
        &packets::publish("a", 0, 0, false, false, Some(&[0x01, 0x01]), &[0xFF, 0xFE]),
        0x99,
    )
    .await;
}

#[tokio::test]
async fn connect_with_reserved_flag_is_closed() {
    let broker = TestBroker::start().await;
    let mut connect = packets::connect_v4("x", true, 60);
    connect[9] |= 0x01; // connect flags byte
    let mut client = RawClient::connect(broker.addr).await;
    client.send(&connect).await;
    assert!(client.expect_closed().await.is_empty());
    broker.shutdown().await;
}

#[tokio::test]
async fn unsupported_protocol_levels_get_connack_0x84_or_for_3_x_levels_return_code_1() {
    let broker = TestBroker::start().await;
    // `20 03 00 84 00`: MQTT 5 CONNACK, Unsupported Protocol Version, no properties.
    let v5_refusal = RawPacket {
        first_byte: 0x20,
        body: vec![0x00, 0x84, 0x00],
    };
    // `20 02 00 01`: 3.1.1 CONNACK, unacceptable protocol version.
    let v3_refusal = RawPacket {
        first_byte: 0x20,
        body: vec![0x00, 0x01],
    };
    for (name, level, answer) in [
        ("MQTT", 6, Some(&v5_refusal)),
        ("MQTT", 0, Some(&v5_refusal)),
        ("MQTT", 0x84, Some(&v5_refusal)),
        ("MQIsdp", 5, Some(&v5_refusal)),
        ("MQTT", 3, Some(&v3_refusal)),
        ("MQIsdp", 4, Some(&v3_refusal)),
        // Not MQTT at all: closed without an answer in MQTT's terms [MQTT-3.1.2-1].
        ("MQTX", 5, None),
        ("HTTP", 4, None),
    ] {
        let mut body = string(name);
        body.push(level);
        body.push(0x02);
        body.extend(60u16.to_be_bytes());
        body.push(0); // v5's property length; a 3.x CONNECT is refused before reading on
        body.extend(string("x"));
        let mut client = RawClient::connect(broker.addr).await;
        client.send(&frame(0x10, &body)).await;
        let sent = client.expect_closed().await;
        assert_eq!(
            sent,
            answer.into_iter().cloned().collect::<Vec<_>>(),
            "{name} level {level}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn empty_client_id_with_persistent_session_is_rejected_in_3_1_1() {
    let broker = TestBroker::start().await;
    let mut client = RawClient::connect(broker.addr).await;
    client.send(&packets::connect_v4("", false, 60)).await;
    let sent = client.expect_closed().await;
    assert_eq!(sent[0].body, vec![0x00, 0x02]);
    broker.shutdown().await;
}

#[tokio::test]
async fn connect_must_arrive_within_the_connect_timeout() {
    let broker =
        TestBroker::start_with(|c| c.mqtt.connect_timeout = Duration::from_millis(200)).await;
    let mut client = RawClient::connect(broker.addr).await;
    assert!(client.expect_closed().await.is_empty());
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_1_clients_are_served() {
    let broker = TestBroker::start().await;
    let mut body = string("MQIsdp");
    body.push(3);
    body.push(0x02);
    body.extend(60u16.to_be_bytes());
    body.extend(string("legacy"));
    let (mut client, _) = RawClient::handshake(broker.addr, &frame(0x10, &body)).await;
    assert_eq!(subscribe(&mut client, "old/+", 1, false).await, 1);
    client
        .send(&packets::publish("old/x", 1, 5, false, false, None, b"hi"))
        .await;
    let ack = client.recv_type(PUBACK).await;
    assert_eq!(ack.body, vec![0, 5]);
    let delivered = parse_publish(&client.recv_type(PUBLISH).await, false);
    assert_eq!(
        (delivered.topic.as_str(), delivered.payload.as_slice()),
        ("old/x", &b"hi"[..])
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn binary_password_is_accepted() {
    let broker = TestBroker::start().await;
    let mut body = string("MQTT");
    body.push(4);
    body.push(0x02 | 0x80 | 0x40);
    body.extend(60u16.to_be_bytes());
    body.extend(string("bin"));
    body.extend(string("user"));
    body.extend(packets::binary(&[0xFF, 0x00, 0xC3]));
    RawClient::handshake(broker.addr, &frame(0x10, &body)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn retransmitted_qos2_publish_is_delivered_once() {
    let broker = TestBroker::start().await;
    let mut subscriber = v4(broker.addr, "sub").await;
    assert_eq!(subscribe(&mut subscriber, "exact/once", 2, false).await, 2);
    let mut publisher = v4(broker.addr, "pub").await;

    publisher
        .send(&packets::publish(
            "exact/once",
            2,
            7,
            false,
            false,
            None,
            b"m1",
        ))
        .await;
    assert_eq!(publisher.recv_type(PUBREC).await.body, vec![0, 7]);
    // The PUBREC was "lost": the client retransmits with DUP before sending PUBREL.
    publisher
        .send(&packets::publish(
            "exact/once",
            2,
            7,
            false,
            true,
            None,
            b"m1",
        ))
        .await;
    assert_eq!(publisher.recv_type(PUBREC).await.body, vec![0, 7]);
    publisher.send(&packets::pubrel(7)).await;
    assert_eq!(publisher.recv_type(PUBCOMP).await.body, vec![0, 7]);

    let first = parse_publish(&subscriber.recv_type(PUBLISH).await, false);
    assert_eq!(first.payload, b"m1");
    subscriber.send(&packets::pubrec(first.packet_id)).await;
    assert_eq!(
        subscriber.recv_type(PUBREL).await.body,
        first.packet_id.to_be_bytes()
    );
    subscriber.send(&packets::pubcomp(first.packet_id)).await;
    subscriber.expect_silence().await;

    // After PUBCOMP the packet id is free again: a new message with id 7 is a new message.
    publisher
        .send(&packets::publish(
            "exact/once",
            2,
            7,
            false,
            false,
            None,
            b"m2",
        ))
        .await;
    publisher.recv_type(PUBREC).await;
    let second = parse_publish(&subscriber.recv_type(PUBLISH).await, false);
    assert_eq!(second.payload, b"m2");
    broker.shutdown().await;
}

#[tokio::test]
async fn pubrel_for_unknown_packet_id_gets_pubcomp_0x92_in_v5() {
    let broker = TestBroker::start().await;
    let (mut client, _) = v5(broker.addr, "c", &[]).await;
    client.send(&packets::pubrel(42)).await;
    let pubcomp = client.recv_type(PUBCOMP).await;
    assert_eq!(pubcomp.body, vec![0, 42, 0x92, 0]);
    broker.shutdown().await;
}

/// A v5 QoS 2 PUBLISH whose PUBREL never follows: each one holds a slot of the broker's Receive
/// Maximum.
fn unreleased_qos2_v5(topic: &str, packet_id: u16) -> Vec<u8> {
    packets::publish(topic, 2, packet_id, false, false, Some(&[]), b"x")
}

#[tokio::test]
async fn exceeding_the_brokers_receive_maximum_disconnects_with_0x93() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    let (mut client, connack) = v5(broker.addr, "flood", &[]).await;
    // Receive Maximum (0x21) = 2 advertised.
    assert!(connack.body.windows(3).any(|w| w == [0x21, 0x00, 0x02]));
    for packet_id in 1..=3u16 {
        client
            .send_lenient(&unreleased_qos2_v5("q2", packet_id))
            .await;
    }
    assert_eq!(expect_disconnect_reason(&mut client).await, 0x93);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_client_still_sending_when_disconnected_can_read_why() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    // A small receive window, not read while the client sends: the broker's last bytes, the
    // DISCONNECT among them, wait in the broker's send queue, which a reset would discard.
    let mut client = RawClient::connect_small_window(broker.addr).await;
    let connack = client
        .connect_with(&packets::connect_v5("eager", true, 60, &[]))
        .await
        .expect("CONNACK");
    assert_eq!(connack.body[1], 0, "{connack:?}");
    // 8 KiB of PINGRESP: more than the window holds.
    client.send(&packets::PINGREQ.repeat(4096)).await;
    // QoS 2 publishes never released: the third exceeds the Receive Maximum. The client goes
    // on publishing for a while before it reads, as a busy publisher does; the pace only
    // spreads its writes out.
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for packet_id in 1..=20u16 {
        pace.tick().await;
        client
            .send_lenient(&unreleased_qos2_v5("eager/q2", packet_id))
            .await;
    }
    assert_eq!(expect_disconnect_reason(&mut client).await, 0x93);
    broker.shutdown().await;
}

#[tokio::test]
async fn silent_client_is_disconnected_after_one_and_a_half_keep_alives() {
    let broker = TestBroker::start().await;
    let (mut v5_client, _) =
        RawClient::handshake(broker.addr, &packets::connect_v5("ka5", true, 1, &[])).await;
    let (mut v4_client, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("ka4", true, 1)).await;
    // Silent for 1.3 s (1 s of time skipped, about 0.3 s waited): still open.
    common::skip_time(Duration::from_secs(1)).await;
    v5_client.expect_silence().await;
    // Past 1.5 × 1 s [MQTT-3.1.2-24]: v5 hears why (0x8D), 3.1.1 is just closed.
    common::skip_time(Duration::from_millis(600)).await;
    assert_eq!(expect_disconnect_reason(&mut v5_client).await, 0x8D);
    assert!(v4_client.expect_closed().await.is_empty());
    broker.shutdown().await;
}

#[tokio::test]
async fn pings_keep_a_connection_alive() {
    let broker = TestBroker::start().await;
    let (mut client, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("pinger", true, 1)).await;
    let mut ticker = tokio::time::interval(Duration::from_millis(400));
    for _ in 0..6 {
        ticker.tick().await;
        client.send(&packets::PINGREQ).await;
        let pong = client.recv().await.expect("still connected");
        assert_eq!(pong.packet_type(), PINGRESP);
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn server_keep_alive_is_imposed_on_v5_clients() {
    let broker = TestBroker::start_with(|c| c.mqtt.server_keep_alive = Some(1)).await;
    let (mut client, connack) =
        RawClient::handshake(broker.addr, &packets::connect_v5("ska", true, 600, &[])).await;
    assert!(connack.body.windows(3).any(|w| w == [0x13, 0x00, 0x01]));
    // 1.5 × the imposed 1 s passes (skipped, not waited for), not 1.5 × the client's 600 s.
    common::skip_time(Duration::from_millis(1600)).await;
    assert_eq!(expect_disconnect_reason(&mut client).await, 0x8D);
    broker.shutdown().await;
}

#[tokio::test]
async fn inbound_topic_alias_is_resolved_and_bounded() {
    let broker = TestBroker::start().await;
    let (mut subscriber, _) = v5(broker.addr, "sub", &[]).await;
    subscribe(&mut subscriber, "alias/#", 0, true).await;
    let (mut publisher, connack) = v5(broker.addr, "pub", &[]).await;
    // Topic Alias Maximum (0x22) = 64 by default.
    assert!(connack.body.windows(3).any(|w| w == [0x22, 0x00, 64]));

    publisher
        .send(&packets::publish(
            "alias/long/topic",
            0,
            0,
            false,
            false,
            Some(&[0x23, 0, 1]),
            b"1",
        ))
        .await;
    publisher
        .send(&packets::publish(
            "",
            0,
            0,
            false,
            false,
            Some(&[0x23, 0, 1]),
            b"2",
        ))
        .await;
    for expected in [b"1", b"2"] {
        let got = parse_publish(&subscriber.recv_type(PUBLISH).await, true);
        assert_eq!(got.topic, "alias/long/topic");
        assert_eq!(got.payload, expected);
    }
    publisher
        .send_lenient(&packets::publish(
            "x",
            0,
            0,
            false,
            false,
            Some(&[0x23, 0, 65]),
            b"3",
        ))
        .await;
    assert_eq!(expect_disconnect_reason(&mut publisher).await, 0x94);
    broker.shutdown().await;
}

#[tokio::test]
async fn unknown_inbound_topic_alias_is_a_protocol_error() {
    assert_v5_rejects(
        &packets::publish("", 0, 0, false, false, Some(&[0x23, 0, 9]), b"x"),
        0x82,
    )
    .await;
}

#[tokio::test]
async fn outbound_topic_aliases_replace_repeated_topics() {
    let broker = TestBroker::start().await;
    // Topic Alias Maximum 4 on the subscriber's CONNECT.
    let (mut subscriber, _) = v5(broker.addr, "sub", &[0x22, 0x00, 0x04]).await;
    subscribe(&mut subscriber, "t/#", 0, true).await;
    let (mut publisher, _) = v5(broker.addr, "pub", &[]).await;
    for payload in [b"a", b"b"] {
        publisher
            .send(&packets::publish(
                "t/1",
                0,
                0,
                false,
                false,
                Some(&[]),
                payload,
            ))
            .await;
    }
    let first = parse_publish(&subscriber.recv_type(PUBLISH).await, true);
    assert_eq!(first.topic, "t/1");
    assert_eq!(first.properties, vec![0x23, 0, 1]);
    let second = parse_publish(&subscriber.recv_type(PUBLISH).await, true);
    assert_eq!(second.topic, "");
    assert_eq!(second.properties, vec![0x23, 0, 1]);
    assert_eq!(second.payload, b"b");
    broker.shutdown().await;
}

#[tokio::test]
async fn messages_larger_than_the_clients_maximum_packet_size_are_not_sent() {
    let broker = TestBroker::start().await;
    // Maximum Packet Size (0x27) = 64 bytes.
    let (mut subscriber, _) = v5(broker.addr, "small", &[0x27, 0, 0, 0, 64]).await;
    subscribe(&mut subscriber, "size/#", 0, true).await;
    let (mut publisher, _) = v5(broker.addr, "pub", &[]).await;
    publisher
        .send(&packets::publish(
            "size/big",
            0,
            0,
            false,
            false,
            Some(&[]),
            &[b'x'; 200],
        ))
        .await;
    publisher
        .send(&packets::publish(
            "size/small",
            0,
            0,
            false,
            false,
            Some(&[]),
            b"ok",
        ))
        .await;
    let got = parse_publish(&subscriber.recv_type(PUBLISH).await, true);
    assert_eq!(got.topic, "size/small");
    broker.shutdown().await;
}

#[tokio::test]
async fn normal_disconnect_discards_the_will_and_0x04_keeps_it() {
    let broker = TestBroker::start().await;
    let mut watcher = v4(broker.addr, "watcher").await;
    subscribe(&mut watcher, "wills/#", 0, false).await;

    let will_props = |topic: &str| {
        let mut body = string("MQTT");
        body.push(5);
        body.push(0x02 | 0x04);
        body.extend(60u16.to_be_bytes());
        body.push(0); // connect properties
        body.extend(string(topic));
        body.push(0); // will properties
        body.extend(string(topic));
        body.extend(packets::binary(b"gone"));
        frame(0x10, &body)
    };
    let (mut polite, _) = RawClient::handshake(broker.addr, &will_props("wills/polite")).await;
    polite.send(&packets::DISCONNECT).await;
    assert!(polite.expect_closed().await.is_empty());
    watcher.expect_silence().await;

    let (mut with_will, _) = RawClient::handshake(broker.addr, &will_props("wills/asked")).await;
    with_will.send(&[0xE0, 0x02, 0x04, 0x00]).await;
    with_will.expect_closed().await;
    let will = parse_publish(&watcher.recv_type(PUBLISH).await, false);
    assert_eq!(
        (will.topic.as_str(), will.payload.as_slice()),
        ("wills/asked", &b"gone"[..])
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn protocol_violation_publishes_the_will() {
    let broker = TestBroker::start().await;
    let mut watcher = v4(broker.addr, "watcher").await;
    subscribe(&mut watcher, "wills/#", 0, false).await;
    let (mut offender, _) = RawClient::handshake(
        broker.addr,
        &packets::connect_v4_will("bad", 60, "wills/bad", b"bye", 1),
    )
    .await;
    offender
        .send_lenient(&packets::publish(
            "no/+/wildcards",
            0,
            0,
            false,
            false,
            None,
            b"",
        ))
        .await;
    offender.expect_closed().await;
    let will = parse_publish(&watcher.recv_type(PUBLISH).await, false);
    assert_eq!(will.topic, "wills/bad");
    broker.shutdown().await;
}

#[tokio::test]
async fn invalid_filters_are_refused_per_filter_without_closing() {
    let broker = TestBroker::start().await;
    let mut client4 = v4(broker.addr, "c4").await;
    assert_eq!(subscribe(&mut client4, "a/#/b", 1, false).await, 0x80);
    assert_eq!(subscribe(&mut client4, "a/b+", 1, false).await, 0x80);
    assert_eq!(subscribe(&mut client4, "a/+", 1, false).await, 0x01);
    let (mut client5, _) = v5(broker.addr, "c5", &[]).await;
    assert_eq!(subscribe(&mut client5, "a/#/b", 1, true).await, 0x8F);
    assert_eq!(subscribe(&mut client5, "$share/g+/a", 1, true).await, 0x8F);
    assert_eq!(subscribe(&mut client5, "$share/g", 1, true).await, 0x8F);
    assert_eq!(subscribe(&mut client5, "$share/g/a", 1, true).await, 0x01);
    broker.shutdown().await;
}

#[tokio::test]
async fn qos1_without_subscribers_is_acked_with_no_matching_subscribers_in_v5() {
    let broker = TestBroker::start().await;
    let (mut client, _) = v5(broker.addr, "lonely", &[]).await;
    client
        .send(&packets::publish(
            "nobody/listens",
            1,
            3,
            false,
            false,
            Some(&[]),
            b"x",
        ))
        .await;
    let ack = client.recv_type(PUBACK).await;
    assert_eq!(ack.body, vec![0, 3, 0x10, 0]);
    broker.shutdown().await;
}

#[tokio::test]
async fn shutdown_tells_v5_clients_the_server_is_shutting_down() {
    let broker = TestBroker::start().await;
    let (mut client, _) = v5(broker.addr, "c", &[]).await;
    let shutdown = tokio::spawn(broker.shutdown());
    assert_eq!(expect_disconnect_reason(&mut client).await, 0x8B);
    shutdown.await.unwrap();
}

#[tokio::test]
async fn connack_is_the_first_packet_and_session_present_is_zero_for_new_sessions() {
    let broker = TestBroker::start().await;
    let (_client, connack) = v5(broker.addr, "fresh", &[]).await;
    assert_eq!(connack.packet_type(), CONNACK);
    assert_eq!(connack.body[0], 0, "session present must be 0");
    broker.shutdown().await;
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    // [MQTT-3.8.3-4]; options 0x05 = QoS 1 + No Local.
    assert_v5_rejects(&packets::subscribe(1, "$share/g/a", 0x05, Some(&[])), 0x82).await;
}
