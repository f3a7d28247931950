//! Delayed delivery: `$delayed/<seconds>/<topic>` arrives at `<topic>` after its delay, never
//! before, also across a restart; refused clearly past the limits.

mod common;

use std::time::Duration;

use common::packets;
use common::rumqtt::v5::{QoS, V5Client};
use common::{raw_v5, RawClient, TestBroker, WAIT};
use tokio::time::Instant;

const PUBACK: u8 = 4;

#[tokio::test]
async fn a_delayed_message_arrives_after_its_delay_and_not_before() {
    let broker = TestBroker::start().await;
    let (mut subscriber, _) = V5Client::connect(broker.addr, "later").await;
    subscriber.subscribe("reminders/+", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "scheduler").await;
    let sent = Instant::now();
    publisher
        .publish("$delayed/1/reminders/a", QoS::AtLeastOnce, false, "ping")
        .await;
    assert_eq!(broker.broker().delayed_count(), 1);
    let publish = subscriber.next_publish().await;
    let waited = sent.elapsed();
    assert!(waited >= Duration::from_secs(1), "arrived after {waited:?}");
    assert_eq!(publish.topic, "reminders/a");
    assert_eq!(publish.payload, "ping");
    assert_eq!(broker.broker().delayed_count(), 0);
    subscriber.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_delayed_message_survives_a_restart_and_is_delivered_once() {
    let broker = TestBroker::start().await;
    let (mut subscriber, _) = V5Client::connect_persistent(broker.addr, "later", 3600).await;
    subscriber.subscribe("reminders/+", QoS::AtLeastOnce).await;
    subscriber.disconnect().await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "scheduler").await;
    let sent = Instant::now();
    publisher
        .publish("$delayed/2/reminders/a", QoS::AtLeastOnce, false, "ping")
        .await;
    drop(publisher);
    let broker = broker.restart().await;
    assert_eq!(broker.broker().delayed_count(), 1);
    let (mut subscriber, connack) = V5Client::connect_persistent(broker.addr, "later", 3600).await;
    assert!(connack.session_present);
    let publish = subscriber.next_publish().await;
    assert!(sent.elapsed() >= Duration::from_secs(2), "arrived early");
    assert_eq!(publish.topic, "reminders/a");
    subscriber.expect_no_publish().await;
    // Once published, nothing of it is left in storage.
    let delayed_keys = broker
        .broker()
        .storage_key_counts()
        .await
        .into_iter()
        .find(|(cf, _)| *cf == "delayed")
        .map(|(_, n)| n);
    assert_eq!(delayed_keys, Some(0));
    broker.shutdown().await;
}

#[tokio::test]
async fn delayed_publishes_past_the_limits_are_refused_with_a_reason() {
    let broker = TestBroker::start_with(|config| {
        config.delayed.max_messages = 1;
        config.delayed.max_delay = 3600;
    })
    .await;
    let mut publisher = raw_v5(broker.addr, "scheduler").await;
    assert_eq!(
        publisher.publish_qos1_v5("$delayed/600/a", 1, b"x").await,
        0
    );
    // Full.
    assert_eq!(
        publisher.publish_qos1_v5("$delayed/600/b", 2, b"x").await,
        0x97
    );
    // Not a number, past max_delay, or no topic: Topic Name invalid.
    for (i, bad) in ["$delayed/soon/a", "$delayed/3601/a", "$delayed/5/"]
        .into_iter()
        .enumerate()
    {
        let reason = publisher.publish_qos1_v5(bad, 10 + i as u16, b"x").await;
        assert_eq!(reason, 0x90, "{bad}");
    }
    assert_eq!(broker.broker().delayed_count(), 1);
    // A 3.1.1 client cannot be told; its connection closes instead.
    let mut old = RawClient::handshake(broker.addr, &packets::connect_v4("old", true, 60))
        .await
        .0;
    old.send(&packets::publish(
        "$delayed/soon/a",
        1,
        1,
        false,
        false,
        None,
        b"x",
    ))
    .await;
    let before_close = tokio::time::timeout(WAIT, old.expect_closed())
        .await
        .unwrap();
    assert!(before_close.iter().all(|p| p.packet_type() != PUBACK));
    broker.shutdown().await;
}
