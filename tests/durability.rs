//! What survives a restart of the broker (graceful here; `crash.rs` kills the process), what is
//! cleaned up, and how start-up fails on a data directory it cannot use.

mod common;

use std::time::Duration;

use common::packets::{self, parse_publish};
use common::{RawClient, TestBroker, WAIT};
use telemq::{Broker, Config};

const PUBLISH: u8 = 3;
const SUBACK: u8 = 9;

/// Polls the storage key counts until `done` holds (writes behind acknowledgements land a
/// little later); fails after `WAIT` with the last counts.
async fn wait_for_storage(
    broker: &TestBroker,
    done: impl Fn(&dyn Fn(&str) -> usize) -> bool,
) -> Vec<(&'static str, usize)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counts = broker.broker().storage_key_counts().await;
        let count = |cf: &str| {
            counts
                .iter()
                .find(|(name, _)| *name == cf)
                .map_or(0, |c| c.1)
        };
        if done(&count) {
            return counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "storage still holds: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn persistent_subscriber(addr: std::net::SocketAddr, id: &str, filter: &str, qos: u8) {
    let (mut client, connack) =
        RawClient::handshake(addr, &packets::connect_v4(id, false, 60)).await;
    assert_eq!(connack.body[0], 0, "new session");
    client.send(&packets::subscribe(1, filter, qos, None)).await;
    client.recv_type(SUBACK).await;
    client.send(&packets::DISCONNECT).await;
    client.expect_closed().await;
}

async fn publish_qos1(addr: std::net::SocketAddr, topic: &str, payloads: &[&[u8]], retain: bool) {
    let (mut client, _) = RawClient::handshake(addr, &packets::connect_v4("pub", true, 60)).await;
    for (i, payload) in payloads.iter().enumerate() {
        let packet_id = i as u16 + 1;
        client
            .send(&packets::publish(
                topic, 1, packet_id, retain, false, None, payload,
            ))
            .await;
        let ack = client.recv_type(4).await;
        assert_eq!(ack.body, packet_id.to_be_bytes());
    }
}

#[tokio::test]
async fn queued_messages_subscriptions_and_retained_survive_a_restart() {
    let broker = TestBroker::start().await;
    persistent_subscriber(broker.addr, "keeper", "keep/#", 1).await;
    publish_qos1(broker.addr, "keep/a", &[b"1", b"2", b"3"], false).await;
    publish_qos1(broker.addr, "keep/status", &[b"retained"], true).await;

    let broker = broker.restart().await;
    assert_eq!(broker.broker().retained_count(), 1);

    // The subscription came back too: a message published after the restart is queued.
    publish_qos1(broker.addr, "keep/b", &[b"4"], false).await;

    let (mut client, connack) =
        RawClient::handshake(broker.addr, &packets::connect_v4("keeper", false, 60)).await;
    assert_eq!(connack.body[0], 1, "session present after restart");
    let mut received = Vec::new();
    while received.len() < 5 {
        let publish = parse_publish(&client.recv_type(PUBLISH).await, false);
        client.send(&packets::puback(publish.packet_id)).await;
        received.push((publish.topic, publish.payload));
    }
    let expected: Vec<(String, Vec<u8>)> = [
        ("keep/a", &b"1"[..]),
        ("keep/a", b"2"),
        ("keep/a", b"3"),
        ("keep/status", b"retained"),
        ("keep/b", b"4"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_vec()))
    .collect();
    assert_eq!(received, expected, "in order, none lost");
    client.expect_silence().await;

    let (mut late, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("late", true, 60)).await;
    late.send(&packets::subscribe(1, "keep/+", 0, None)).await;
    late.recv_type(SUBACK).await;
    let retained = parse_publish(&late.recv_type(PUBLISH).await, false);
    assert!(retained.retain);
    assert_eq!(retained.payload, b"retained");
    broker.shutdown().await;
}

/// Retained messages sent on SUBSCRIBE to a persistent session are stored like any queued
/// delivery: one sent but not acknowledged before a restart comes again after it.
#[tokio::test]
async fn retained_messages_sent_on_subscribe_survive_a_restart_until_acknowledged() {
    let broker = TestBroker::start().await;
    publish_qos1(broker.addr, "held/status", &[b"on"], true).await;
    let (mut client, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("holder", false, 60)).await;
    client.send(&packets::subscribe(1, "held/#", 1, None)).await;
    client.recv_type(SUBACK).await;
    let first = parse_publish(&client.recv_type(PUBLISH).await, false);
    assert!(first.retain);
    // Gone without a PUBACK.
    drop(client);
    wait_for_storage(&broker, |count| count("messages") == 1).await;

    let broker = broker.restart().await;
    let (mut client, connack) =
        RawClient::handshake(broker.addr, &packets::connect_v4("holder", false, 60)).await;
    assert_eq!(connack.body[0], 1, "session present after restart");
    let again = parse_publish(&client.recv_type(PUBLISH).await, false);
    assert_eq!(
        (again.topic.as_str(), &again.payload[..]),
        ("held/status", &b"on"[..])
    );
    assert!(again.retain, "still sent as retained");
    assert!(again.dup, "it may have been received before the restart");
    client.send(&packets::puback(again.packet_id)).await;
    client.expect_silence().await;
    // Acknowledged: only the retained store still holds it.
    wait_for_storage(&broker, |count| count("messages") == 0).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_cleared_retained_message_stays_cleared_after_restart() {
    let broker = TestBroker::start().await;
    publish_qos1(broker.addr, "gone/x", &[b"v"], true).await;
    publish_qos1(broker.addr, "gone/x", &[b""], true).await;
    let broker = broker.restart().await;
    assert_eq!(broker.broker().retained_count(), 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_session_that_expired_while_the_broker_was_down_is_gone() {
    let broker = TestBroker::start().await;
    // v5 sessions: one expiring after 1 s, one after an hour.
    for (id, expiry) in [("short", 1u32), ("long", 3600)] {
        let mut props = vec![0x11];
        props.extend(expiry.to_be_bytes());
        let (mut client, _) =
            RawClient::handshake(broker.addr, &packets::connect_v5(id, true, 60, &props)).await;
        client.send(&packets::DISCONNECT).await;
        client.expect_closed().await;
    }
    let data_dir = broker.data_dir.clone();
    broker.shutdown().await;
    common::skip_time(Duration::from_millis(1500)).await;
    let broker = TestBroker::start_in(data_dir, |_| {}).await;
    assert_eq!(broker.broker().session_count(), 1);
    let counts = broker.broker().storage_key_counts().await;
    assert!(counts.contains(&("sessions", 1)), "{counts:?}");

    for (id, present) in [("short", 0u8), ("long", 1u8)] {
        let (_client, connack) = RawClient::handshake(
            broker.addr,
            &packets::connect_v5(id, false, 60, &[0x11, 0, 0, 0, 60]),
        )
        .await;
        assert_eq!(connack.body[0], present, "session present for {id}");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn acknowledged_deliveries_leave_storage_and_it_does_not_grow() {
    let broker = TestBroker::start().await;
    let (mut subscriber, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("drain", false, 60)).await;
    subscriber
        .send(&packets::subscribe(1, "flow/#", 2, None))
        .await;
    subscriber.recv_type(SUBACK).await;
    let (mut publisher, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("flow-pub", false, 60)).await;

    const COUNT: u16 = 500;
    for i in 1..=COUNT {
        let qos = if i % 2 == 0 { 1 } else { 2 };
        publisher
            .send(&packets::publish(
                "flow/x",
                qos,
                i,
                false,
                false,
                None,
                &i.to_be_bytes(),
            ))
            .await;
    }
    let mut delivered = 0;
    let mut publisher_done = 0;
    while delivered < COUNT || publisher_done < COUNT {
        tokio::select! {
            packet = subscriber.recv() => {
                let packet = packet.expect("subscriber connected");
                match packet.packet_type() {
                    3 => {
                        let publish = parse_publish(&packet, false);
                        if publish.qos == 1 {
                            subscriber.send(&packets::puback(publish.packet_id)).await;
                            delivered += 1;
                        } else {
                            subscriber.send(&packets::pubrec(publish.packet_id)).await;
                        }
                    }
                    6 => {
                        let id = u16::from_be_bytes([packet.body[0], packet.body[1]]);
                        subscriber.send(&packets::pubcomp(id)).await;
                        delivered += 1;
                    }
                    other => panic!("unexpected packet type {other}"),
                }
            }
            packet = publisher.recv() => {
                let packet = packet.expect("publisher connected");
                match packet.packet_type() {
                    4 | 7 => publisher_done += 1,
                    5 => {
                        let id = u16::from_be_bytes([packet.body[0], packet.body[1]]);
                        publisher.send(&packets::pubrel(id)).await;
                    }
                    other => panic!("unexpected packet type {other}"),
                }
            }
        }
    }
    // Releases are written behind the acknowledgements; wait for them to land.
    let counts = wait_for_storage(&broker, |count| {
        count("queue") == 0 && count("messages") == 0 && count("inbound") == 0
    })
    .await;
    assert!(counts.contains(&("sessions", 2)), "{counts:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_clean_session_leaves_nothing_in_storage() {
    let broker = TestBroker::start().await;
    persistent_subscriber(broker.addr, "temp", "t/#", 1).await;
    publish_qos1(broker.addr, "t/1", &[b"x"], false).await;
    // Clean session over the persistent one discards it, queue and all.
    let (mut client, connack) =
        RawClient::handshake(broker.addr, &packets::connect_v4("temp", true, 60)).await;
    assert_eq!(connack.body[0], 0);
    client.send(&packets::DISCONNECT).await;
    client.expect_closed().await;
    wait_for_storage(&broker, |count| {
        [
            "sessions",
            "subscriptions",
            "queue",
            "inbound",
            "messages",
            "retained",
        ]
        .iter()
        .all(|cf| count(cf) == 0)
    })
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_second_broker_on_the_same_data_dir_is_refused_clearly() {
    let broker = TestBroker::start().await;
    let mut config = Config::default();
    config.listener.bind = "127.0.0.1:0".parse().unwrap();
    config.websocket.enabled = false;
    config.storage.data_dir = broker.data_dir.path().to_path_buf();
    let error = Broker::start(config).await.expect_err("must refuse");
    let text = error.to_string();
    assert!(text.contains("cannot open storage"), "{text}");
    assert!(text.to_lowercase().contains("lock"), "{text}");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_data_dir_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("CURRENT"), b"MANIFEST-999999\n").unwrap();
    let mut config = Config::default();
    config.listener.bind = "127.0.0.1:0".parse().unwrap();
    config.websocket.enabled = false;
    config.storage.data_dir = dir.path().to_path_buf();
    let error = Broker::start(config).await.expect_err("must refuse");
    assert!(error.to_string().contains("cannot open storage"), "{error}");
}

#[tokio::test]
async fn memory_engine_keeps_nothing_across_restarts() {
    let broker = TestBroker::start_with(|c| {
        c.storage.engine = telemq::config::StorageEngine::Memory;
    })
    .await;
    publish_qos1(broker.addr, "m/x", &[b"v"], true).await;
    assert_eq!(broker.broker().retained_count(), 1);
    let data_dir = broker.data_dir.clone();
    broker.shutdown().await;
    assert_eq!(std::fs::read_dir(data_dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_message_for_many_persistent_sessions_is_stored_once() {
    let broker = TestBroker::start().await;
    for id in ["fan-1", "fan-2", "fan-3"] {
        persistent_subscriber(broker.addr, id, "fan/#", 1).await;
    }
    publish_qos1(broker.addr, "fan/x", &[b"shared payload"], false).await;
    // The PUBACK came after the write, so the counts are final now: one record, listing the
    // three deliveries.
    let counts = broker.broker().storage_key_counts().await;
    assert!(counts.contains(&("messages", 1)), "{counts:?}");
    assert!(counts.contains(&("queue", 0)), "{counts:?}");

    // Each session's acknowledgement releases one reference and masks its listed delivery;
    // the record and the masks go with the last.
    for (i, id) in ["fan-1", "fan-2", "fan-3"].into_iter().enumerate() {
        let (mut client, _) =
            RawClient::handshake(broker.addr, &packets::connect_v4(id, false, 60)).await;
        let publish = parse_publish(&client.recv_type(PUBLISH).await, false);
        client.send(&packets::puback(publish.packet_id)).await;
        client.send(&packets::DISCONNECT).await;
        client.expect_closed().await;
        let left = 2 - i;
        let masks = if left > 0 { i + 1 } else { 0 };
        wait_for_storage(&broker, |count| {
            count("queue") == masks && count("messages") == usize::from(left > 0)
        })
        .await;
    }
    broker.shutdown().await;
}

/// Connects `id` as a persistent 3.1.1 session and acknowledges every PUBLISH until the
/// broker falls silent; returns the payloads in the order they came.
async fn drain_session(addr: std::net::SocketAddr, id: &str) -> (bool, Vec<Vec<u8>>) {
    let (mut client, connack) =
        RawClient::handshake(addr, &packets::connect_v4(id, false, 60)).await;
    let mut received = Vec::new();
    while let Ok(Some(packet)) = client.recv_within(Duration::from_millis(300)).await {
        assert_eq!(packet.packet_type(), PUBLISH, "{packet:?}");
        let publish = parse_publish(&packet, false);
        client.send(&packets::puback(publish.packet_id)).await;
        received.push(publish.payload);
    }
    client.send(&packets::DISCONNECT).await;
    client.expect_closed().await;
    (connack.body[0] == 1, received)
}

#[tokio::test]
async fn released_deliveries_stay_released_and_a_new_session_inherits_nothing_across_restarts() {
    let broker = TestBroker::start().await;
    for id in ["rel-a", "rel-b", "rel-c"] {
        persistent_subscriber(broker.addr, id, "rel/#", 1).await;
    }
    publish_qos1(broker.addr, "rel/x", &[b"m1", b"m2", b"m3"], false).await;

    // rel-a takes all three: its deliveries are masked, the records stay for rel-c.
    let (present, got) = drain_session(broker.addr, "rel-a").await;
    assert!(present);
    assert_eq!(got, [b"m1", b"m2", b"m3"]);
    wait_for_storage(&broker, |count| {
        count("queue") == 3 && count("messages") == 3
    })
    .await;

    // rel-b starts over: a clean session ends the old one, then a new persistent session
    // for the same client id subscribes elsewhere. The records still list the old rel-b.
    let (mut clean, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("rel-b", true, 60)).await;
    clean.send(&packets::DISCONNECT).await;
    clean.expect_closed().await;
    persistent_subscriber(broker.addr, "rel-b", "other/#", 1).await;

    // Two restarts: one between the releases and the next publish, one after it, so the
    // new delivery to rel-a is read back next to the records masking its old ones.
    let broker = broker.restart().await;
    publish_qos1(broker.addr, "rel/x", &[b"m4"], false).await;
    let broker = broker.restart().await;

    let (present, got) = drain_session(broker.addr, "rel-a").await;
    assert!(present);
    assert_eq!(got, [b"m4"], "rel-a: only what it had not acknowledged");
    let (present, got) = drain_session(broker.addr, "rel-b").await;
    assert!(present);
    assert!(
        got.is_empty(),
        "the new rel-b got the old one's messages: {got:?}"
    );
    let (present, got) = drain_session(broker.addr, "rel-c").await;
    assert!(present);
    assert_eq!(got, [&b"m1"[..], b"m2", b"m3", b"m4"]);
    let counts = wait_for_storage(&broker, |count| {
        count("queue") == 0 && count("messages") == 0
    })
    .await;
    assert!(counts.contains(&("sessions", 3)), "{counts:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_delayed_will_is_published_once_even_across_a_restart() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) =
        RawClient::handshake(broker.addr, &packets::connect_v4("will-watcher", false, 60)).await;
    watcher
        .send(&packets::subscribe(1, "wills/#", 1, None))
        .await;
    watcher.recv_type(SUBACK).await;

    // v5 client: session expiry 60 s, will delay 1 s.
    let mut body = packets::string("MQTT");
    body.push(5);
    body.push(0x04 | 0x08); // will flag, will QoS 1
    body.extend(60u16.to_be_bytes());
    body.extend([5, 0x11, 0, 0, 0, 60]);
    body.extend(packets::string("dying"));
    body.extend([5, 0x18, 0, 0, 0, 1]);
    body.extend(packets::string("wills/dying"));
    body.extend(packets::binary(b"gone"));
    let (dying, _) = RawClient::handshake(broker.addr, &packets::frame(0x10, &body)).await;
    drop(dying); // no DISCONNECT: the will is due after its delay

    let will = parse_publish(&watcher.recv_type(PUBLISH).await, false);
    assert_eq!(will.topic, "wills/dying");
    watcher.send(&packets::puback(will.packet_id)).await;
    watcher.send(&packets::DISCONNECT).await;
    watcher.expect_closed().await;

    let broker = broker.restart().await;
    let (mut watcher, connack) =
        RawClient::handshake(broker.addr, &packets::connect_v4("will-watcher", false, 60)).await;
    assert_eq!(connack.body[0], 1);
    // A will published twice would arrive now (queued for the offline watcher on start-up).
    match watcher.recv_within(Duration::from_millis(1500)).await {
        Err(()) => {}
        Ok(packet) => panic!("will delivered again after restart: {packet:?}"),
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_data_dir_in_another_storage_layout_is_refused_clearly() {
    let broker = TestBroker::start().await;
    persistent_subscriber(broker.addr, "old-layout", "old/#", 1).await;
    let data_dir = broker.data_dir.clone();
    broker.shutdown().await;
    let set_layout = |value: Option<&[u8]>| {
        let options = rocksdb::Options::default();
        let families = rocksdb::DB::list_cf(&options, data_dir.path()).expect("families");
        let db = rocksdb::DB::open_cf(&options, data_dir.path(), families).expect("open");
        let meta = db.cf_handle("meta").expect("meta");
        match value {
            Some(value) => db.put_cf(meta, b"layout", value).expect("put"),
            None => db.delete_cf(meta, b"layout").expect("delete"),
        }
    };
    let start = || {
        let mut config = Config::default();
        config.listener.bind = "127.0.0.1:0".parse().unwrap();
        config.websocket.enabled = false;
        config.metrics.enabled = false;
        config.storage.data_dir = data_dir.path().to_path_buf();
        Broker::start(config)
    };
    // Sessions without a layout record were written by a broker before layout 2.
    set_layout(None);
    let error = start().await.expect_err("must refuse").to_string();
    assert!(error.contains("storage layout 1"), "{error}");
    set_layout(Some(&[9]));
    let error = start().await.expect_err("must refuse").to_string();
    assert!(error.contains("layout [9]"), "{error}");
    set_layout(Some(&[2]));
    let broker = start().await.expect("layout 2 is read");
    broker.shutdown().await;
}
