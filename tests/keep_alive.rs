//! `mqtt.max_keep_alive`: the cap on the keep alive a client may ask for, checked with raw
//! clients (rumqttc's v5 client refuses keep alives under 5 s).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::packets::{self, frame, parse_publish, string};
use common::{skip_time, RawClient, RawPacket, TestBroker};

const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const SUBACK: u8 = 9;
const DISCONNECT: u8 = 14;

/// The Server Keep Alive property (0x13) of a v5 CONNACK, if present.
fn server_keep_alive(connack: &RawPacket) -> Option<u16> {
    assert_eq!(connack.packet_type(), CONNACK, "{connack:?}");
    // Flags, reason code, property length (short here), then the properties.
    let mut props = &connack.body[3..];
    while let Some((&id, rest)) = props.split_first() {
        let len = match id {
            0x13 | 0x21 | 0x22 => 2,
            0x11 | 0x27 => 4,
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x12 | 0x1F => 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]])),
            other => panic!("unexpected CONNACK property {other:#04x}: {connack:?}"),
        };
        if id == 0x13 {
            return Some(u16::from_be_bytes([rest[0], rest[1]]));
        }
        props = &rest[len..];
    }
    None
}

/// MQTT 5 CONNECT (clean start) with a QoS 0 will.
fn connect_v5_will(client_id: &str, keep_alive: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(5);
    body.push(0x02 | 0x04);
    body.extend(keep_alive.to_be_bytes());
    body.push(0); // properties
    body.extend(string(client_id));
    body.push(0); // will properties
    body.extend(string(topic));
    body.extend(packets::binary(payload));
    frame(0x10, &body)
}

async fn capped(max_keep_alive: u16) -> TestBroker {
    TestBroker::start_with(|c| c.mqtt.max_keep_alive = Some(max_keep_alive)).await
}

/// Connects, sends `connect` and returns the broker's answer.
async fn answer(addr: SocketAddr, connect: &[u8]) -> (RawClient, RawPacket) {
    let mut client = RawClient::connect(addr).await;
    let answer = client.connect_with(connect).await.expect("CONNACK");
    (client, answer)
}

/// A client with a 1 s keep alive that stays silent is still open 1.3 s later (1 s of time
/// skipped, about 0.3 s waited), and closed once 1.5 × 1 s has passed [MQTT-3.1.2-24]:
/// returns what the broker sent before closing. Time is skipped, not waited for.
async fn silent_for_one_and_a_half_keep_alives(client: &mut RawClient) -> Vec<RawPacket> {
    skip_time(Duration::from_secs(1)).await;
    client.expect_silence().await;
    skip_time(Duration::from_millis(600)).await;
    client.expect_closed().await
}

#[tokio::test]
async fn a_v5_client_asking_for_more_than_the_cap_or_none_is_given_the_cap() {
    let broker = capped(10).await;
    for requested in [0, 100] {
        let connect = packets::connect_v5(&format!("ask{requested}"), true, requested, &[]);
        let (_client, connack) = answer(broker.addr, &connect).await;
        assert_eq!(connack.body[1], 0, "accepted: {connack:?}");
        assert_eq!(server_keep_alive(&connack), Some(10), "asked {requested}");
    }
    // At or under the cap the client's own value stands, and CONNACK does not repeat it.
    let (_client, connack) = answer(broker.addr, &packets::connect_v5("ask5", true, 5, &[])).await;
    assert_eq!(connack.body[1], 0, "accepted: {connack:?}");
    assert_eq!(server_keep_alive(&connack), None);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_v5_client_under_the_cap_is_held_to_its_own_keep_alive_and_its_will_published() {
    let broker = capped(60).await;
    let mut watcher = common::raw_v5(broker.addr, "watcher").await;
    watcher
        .send(&packets::subscribe(1, "wills/#", 0, Some(&[])))
        .await;
    assert_eq!(watcher.recv_type(SUBACK).await.body, vec![0, 1, 0, 0]);

    let connect = connect_v5_will("short", 1, "wills/short", b"gone");
    let (mut client, connack) = answer(broker.addr, &connect).await;
    assert_eq!(connack.body[1], 0, "accepted: {connack:?}");
    assert_eq!(server_keep_alive(&connack), None);
    // Silent from here: closed with DISCONNECT 0x8D, well before the cap's 1.5 × 60 s.
    let sent = silent_for_one_and_a_half_keep_alives(&mut client).await;
    let disconnect = sent.iter().find(|p| p.packet_type() == DISCONNECT);
    assert_eq!(disconnect.map(|p| p.body[0]), Some(0x8D), "{sent:?}");

    let will = parse_publish(&watcher.recv_type(PUBLISH).await, true);
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("wills/short", &b"gone"[..])
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_3_1_1_client_asking_for_more_than_the_cap_or_none_is_refused_with_return_code_2() {
    let broker = capped(10).await;
    for requested in [0, 100] {
        let connect = packets::connect_v4(&format!("ask{requested}"), true, requested);
        let (mut client, connack) = answer(broker.addr, &connect).await;
        // `20 02 00 02`: identifier rejected.
        assert_eq!(
            connack,
            RawPacket {
                first_byte: 0x20,
                body: vec![0x00, 0x02]
            },
            "asked {requested}"
        );
        assert!(client.expect_closed().await.is_empty());
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_3_1_1_client_under_the_cap_is_closed_after_one_and_a_half_of_its_keep_alive() {
    let broker = capped(60).await;
    let (mut client, connack) = answer(broker.addr, &packets::connect_v4("short4", true, 1)).await;
    assert_eq!(connack.body, vec![0x00, 0x00]);
    let sent = silent_for_one_and_a_half_keep_alives(&mut client).await;
    assert!(sent.is_empty(), "3.1.1 gets no DISCONNECT: {sent:?}");
    broker.shutdown().await;
}
