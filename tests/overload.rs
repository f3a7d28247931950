//! Overload seen from clients: bounded queues and their overflow policies, per-filter policies,
//! slow consumers, dead letters, and publishers paused by the memory guard.

mod common;

use std::time::Duration;

use common::packets::{self, parse_publish};
use common::rumqtt::v5::{QoS, V5Client};
use common::rumqtt::wait_until;
use common::{raw_v5, RawClient, TestBroker, QUIET, WAIT};
use telemq::config::OverflowPolicy;
use telemq::config::QueueRule;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;

/// Subscribes a persistent v5 session to `filter` and leaves it offline.
async fn offline_subscriber(broker: &TestBroker, id: &str, filter: &str) {
    let (mut client, _) = V5Client::connect_persistent(broker.addr, id, 3600).await;
    client.subscribe(filter, QoS::AtLeastOnce).await;
    client.disconnect().await;
}

/// Reconnects an offline persistent session and returns the payloads queued for it.
async fn drain_queue(broker: &TestBroker, id: &str) -> Vec<String> {
    let (mut client, connack) = V5Client::connect_large(broker.addr, id, true).await;
    assert!(connack.session_present);
    let mut got = Vec::new();
    while let Some(publish) = client.try_next_publish(QUIET).await {
        got.push(String::from_utf8(publish.payload.to_vec()).unwrap());
    }
    got
}

fn user_property<'a>(publish: &'a common::rumqtt::v5::Publish, key: &str) -> Option<&'a str> {
    publish
        .properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_and_dead_letters_the_rest_with_reason_and_origin() {
    let broker = TestBroker::start_with(|config| {
        config.queue.max_messages = 5;
        config.queue.policy = OverflowPolicy::DropOldest;
        config.dead_letter.enabled = true;
    })
    .await;
    offline_subscriber(&broker, "dashboard", "sensors/#").await;
    let (mut watcher, _) = V5Client::connect(broker.addr, "dlq-watcher").await;
    watcher.subscribe("$DLQ/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "sensor-7").await;
    for i in 0..10 {
        publisher
            .publish("sensors/t", QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    for i in 0..5 {
        let letter = watcher.next_publish().await;
        assert_eq!(letter.topic, "$DLQ/queue_evicted/sensors/t");
        assert_eq!(letter.payload, i.to_string());
        assert_eq!(user_property(&letter, "dlq-reason"), Some("queue_evicted"));
        assert_eq!(user_property(&letter, "dlq-publisher"), Some("sensor-7"));
        assert_eq!(user_property(&letter, "dlq-subscriber"), Some("dashboard"));
    }
    assert_eq!(
        drain_queue(&broker, "dashboard").await,
        ["5", "6", "7", "8", "9"]
    );
    watcher.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn drop_newest_keeps_the_oldest() {
    let broker = TestBroker::start_with(|config| {
        config.queue.max_messages = 5;
        config.queue.policy = OverflowPolicy::DropNewest;
    })
    .await;
    offline_subscriber(&broker, "dashboard", "sensors/#").await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "sensor").await;
    for i in 0..10 {
        publisher
            .publish("sensors/t", QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    assert_eq!(
        drain_queue(&broker, "dashboard").await,
        ["0", "1", "2", "3", "4"]
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn the_byte_bound_applies_as_well_as_the_count() {
    let broker = TestBroker::start_with(|config| {
        config.queue.max_bytes = 64 * 1024;
        config.queue.policy = OverflowPolicy::DropNewest;
    })
    .await;
    offline_subscriber(&broker, "dashboard", "blobs").await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "camera").await;
    let blob = vec![b'x'; 20 * 1024];
    for _ in 0..10 {
        publisher
            .publish("blobs", QoS::AtLeastOnce, false, blob.clone())
            .await;
    }
    // Three 20 KiB payloads plus their topic and bookkeeping fit in 64 KiB; a fourth does not.
    assert_eq!(drain_queue(&broker, "dashboard").await.len(), 3);
    broker.shutdown().await;
}

#[tokio::test]
async fn per_filter_refuse_protects_alerts_and_tells_v5_publishers_0x97() {
    let broker = TestBroker::start_with(|config| {
        config.queue.max_messages = 3;
        config.queue.policy = OverflowPolicy::DropOldest;
        config.queue.rule.push(QueueRule {
            filter: "alerts/#".into(),
            policy: OverflowPolicy::Refuse,
        });
    })
    .await;
    offline_subscriber(&broker, "ops", "#").await;
    let mut publisher = raw_v5(broker.addr, "plant").await;
    let mut reasons = Vec::new();
    for i in 0..5u16 {
        reasons.push(
            publisher
                .publish_qos1_v5("alerts/fire", i + 1, format!("a{i}").as_bytes())
                .await,
        );
    }
    assert_eq!(reasons, [0, 0, 0, 0x97, 0x97]);
    // Telemetry may drop its own oldest messages, but never the queued alerts.
    for i in 0..3u16 {
        assert_eq!(
            publisher.publish_qos1_v5("telemetry/t", 10 + i, b"t").await,
            0
        );
    }
    // 3.1.1 has no way to refuse a PUBLISH: the connection closes and the client retransmits.
    let mut old = RawClient::handshake(broker.addr, &packets::connect_v4("old-plant", true, 60))
        .await
        .0;
    old.send(&packets::publish(
        "alerts/fire",
        1,
        1,
        false,
        false,
        None,
        b"x",
    ))
    .await;
    assert!(old
        .expect_closed()
        .await
        .iter()
        .all(|p| p.packet_type() != PUBACK));
    assert_eq!(drain_queue(&broker, "ops").await, ["a0", "a1", "a2"]);
    broker.shutdown().await;
}

#[tokio::test]
async fn qos0_messages_are_dropped_first_when_configured() {
    let broker = TestBroker::start_with(|config| {
        config.queue.max_messages = 3;
        config.queue.policy = OverflowPolicy::DropNewest;
        config.queue.qos0_first = true;
        config.queue.qos0_offline = true;
    })
    .await;
    offline_subscriber(&broker, "s", "t").await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "p").await;
    publisher.publish("t", QoS::AtMostOnce, false, "q0").await;
    publisher
        .publish("t", QoS::AtLeastOnce, false, "q1-a")
        .await;
    publisher
        .publish("t", QoS::AtLeastOnce, false, "q1-b")
        .await;
    // Full: the QoS 0 message makes room although the policy is drop_newest.
    publisher
        .publish("t", QoS::AtLeastOnce, false, "q1-c")
        .await;
    // Full of QoS 1: a new QoS 0 message is the one dropped.
    publisher
        .publish("t", QoS::AtMostOnce, false, "q0-late")
        .await;
    assert_eq!(drain_queue(&broker, "s").await, ["q1-a", "q1-b", "q1-c"]);
    broker.shutdown().await;
}

#[tokio::test]
async fn the_disconnect_policy_closes_a_slow_consumer_and_dead_letters_what_it_missed() {
    let broker = TestBroker::start_with(|config| {
        config.queue.max_messages = 5;
        config.queue.policy = OverflowPolicy::Disconnect;
        config.queue.qos0_first = false;
        config.dead_letter.enabled = true;
    })
    .await;
    let mut slow = raw_v5(broker.addr, "slow").await;
    slow.send(&packets::subscribe(1, "flood", 0, Some(&[])))
        .await;
    slow.recv_type(9).await;
    let (mut watcher, _) = V5Client::connect_large(broker.addr, "dlq", false).await;
    watcher
        .subscribe("$DLQ/slow_consumer/#", QoS::AtMostOnce)
        .await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "firehose").await;
    let payload = vec![1u8; 64 * 1024];
    // Enough to fill the socket buffers, the write buffer and the 5-message queue.
    let mut published = 0;
    while watcher.try_next_publish(Duration::ZERO).await.is_none() {
        assert!(published < 2000, "the slow consumer was never cut off");
        publisher
            .publish("flood", QoS::AtLeastOnce, false, payload.clone())
            .await;
        published += 1;
    }
    // Everything the broker had written before closing is readable, then the socket ends.
    let packets = slow.expect_closed().await;
    assert!(
        packets.len() < published,
        "read {} of {published}",
        packets.len()
    );
    if let Some(last) = packets.last().filter(|p| p.packet_type() != PUBLISH) {
        assert_eq!(last.first_byte, 0xE0);
        assert_eq!(last.body[0], 0x97, "quota exceeded");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn the_memory_guard_pauses_a_publisher_and_resumes_it_when_queues_drain() {
    const MESSAGES: usize = 2000;
    let broker = TestBroker::start_with(|config| {
        config.queue.memory_high_watermark = 256 * 1024;
        config.queue.memory_low_watermark = 128 * 1024;
        config.queue.policy = OverflowPolicy::DropNewest;
    })
    .await;
    let mut sleeper = RawClient::connect_small_window(broker.addr).await;
    sleeper
        .send(&packets::connect_v5("sleeper", true, 0, &[]))
        .await;
    sleeper.recv_type(2).await;
    sleeper
        .send(&packets::subscribe(1, "bulk", 0, Some(&[])))
        .await;
    sleeper.recv_type(9).await;

    // The publisher writes from its own task: once the broker stops reading, its writes block.
    let mut stream = TcpStream::connect(broker.addr).await.unwrap();
    stream
        .write_all(&packets::connect_v5("bulk-loader", true, 0, &[]))
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let payload = vec![3u8; 16 * 1024];
    let writing = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let packet_id = (i % 60_000) as u16 + 1;
            let publish = packets::publish("bulk", 1, packet_id, false, false, Some(&[]), &payload);
            writer.write_all(&publish).await.unwrap();
        }
        writer
    });
    let (acks_tx, mut acks) = tokio::sync::watch::channel(0usize);
    let counting = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut count = 0usize;
        loop {
            let read = reader.read(&mut chunk).await.unwrap();
            if read == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..read]);
            // CONNACK (0x20) and PUBACKs (0x40), each 4 or 5 bytes long.
            while buf.len() >= 2 && buf.len() >= 2 + usize::from(buf[1]) {
                let len = 2 + usize::from(buf[1]);
                if buf[0] == 0x40 {
                    count += 1;
                    acks_tx.send_replace(count);
                }
                buf.drain(..len);
            }
        }
    });

    // The sleeper's queue passes the high-water mark and the publisher is no longer read.
    // The sleeper's queue passes the high-water mark and the publisher is no longer read. (The
    // sleeper's connection still moves some of its queue into its write buffer, so the queued
    // bytes may fall back under the high mark; the guard resumes only under the low one.)
    wait_until("the memory guard pauses publishers", || {
        broker.broker().publishers_paused()
    })
    .await;
    assert!(broker.broker().queued_bytes() > 128 * 1024);
    let stalled_at = loop {
        let before = *acks.borrow_and_update();
        if tokio::time::timeout(QUIET, acks.changed()).await.is_err() {
            break before;
        }
    };
    assert!(stalled_at < MESSAGES, "the publisher was never paused");

    // The sleeper reads everything; the queues drain and the publisher is read again.
    let deadline = Instant::now() + WAIT * 6;
    let mut received = 0;
    while received < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "sleeper got {received} of {MESSAGES}"
        );
        match sleeper.recv_within(WAIT).await {
            Ok(Some(packet)) if packet.packet_type() == PUBLISH => {
                assert_eq!(parse_publish(&packet, true).payload.len(), 16 * 1024);
                received += 1;
            }
            Ok(Some(_)) => {}
            other => panic!("sleeper: {other:?} after {received}"),
        }
    }
    wait_until("every publish acknowledged", || *acks.borrow() == MESSAGES).await;
    let _writer = writing.await.unwrap();
    counting.abort();
    broker.shutdown().await;
}

#[tokio::test]
async fn offline_queues_spill_to_storage_under_pressure_and_come_back_intact() {
    const MESSAGES: usize = 48;
    const PAYLOAD: usize = 16 * 1024;
    let broker = TestBroker::start_with(|config| {
        config.queue.memory_high_watermark = 256 * 1024;
        config.queue.memory_low_watermark = 128 * 1024;
    })
    .await;
    offline_subscriber(&broker, "archive", "logs").await;
    let (mut publisher, _) = V5Client::connect_large(broker.addr, "logger", false).await;
    for i in 0..MESSAGES {
        let mut payload = vec![b'.'; PAYLOAD];
        payload[..4].copy_from_slice(format!("{i:04}").as_bytes());
        publisher
            .publish("logs", QoS::AtLeastOnce, false, payload)
            .await;
    }
    // 768 KiB went to the offline queue; what stays in memory is its bookkeeping.
    wait_until("the offline queue is spilled", || {
        broker.broker().queued_bytes() <= 128 * 1024
    })
    .await;
    let (mut archive, connack) = V5Client::connect_large(broker.addr, "archive", true).await;
    assert!(connack.session_present);
    for i in 0..MESSAGES {
        let publish = archive.next_publish().await;
        assert_eq!(publish.payload.len(), PAYLOAD);
        assert_eq!(&publish.payload[..4], format!("{i:04}").as_bytes());
    }
    archive.expect_no_publish().await;
    broker.shutdown().await;
}
