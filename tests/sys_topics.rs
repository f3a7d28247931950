//! `$SYS/broker/...` topics: retained, under Mosquitto's names, republished every interval.

mod common;

use std::time::Duration;

use common::rumqtt::v5::{QoS, V5Client};
use common::TestBroker;

/// Reads the watcher's `$SYS` messages until `topic` carries a value `accept` agrees to.
async fn wait_for(watcher: &mut V5Client, topic: &str, accept: impl Fn(&str) -> bool) {
    loop {
        let publish = watcher.next_publish().await;
        assert!(publish.topic.starts_with(b"$SYS/broker/"));
        let value = String::from_utf8(publish.payload.to_vec()).unwrap();
        if publish.topic == topic && accept(&value) {
            return;
        }
    }
}

#[tokio::test]
async fn sys_topics_are_published_retained_and_follow_the_broker() {
    let broker = TestBroker::start_with(|config| {
        config.metrics.sys_interval = Duration::from_millis(100);
    })
    .await;
    let (mut everything, _) = V5Client::connect(broker.addr, "everything").await;
    everything.subscribe("#", QoS::AtMostOnce).await;
    let (mut watcher, _) = V5Client::connect(broker.addr, "watcher").await;
    watcher.subscribe("$SYS/broker/#", QoS::AtMostOnce).await;
    // Retained: the first values arrive on subscribing.
    let first = watcher.next_publish().await;
    assert!(first.retain);
    wait_for(&mut watcher, "$SYS/broker/version", |v| {
        v.starts_with("telemq ")
    })
    .await;

    let (mut publisher, _) = V5Client::connect(broker.addr, "publisher").await;
    publisher.publish("a", QoS::AtLeastOnce, false, "x").await;
    assert_eq!(everything.next_publish().await.topic, "a");
    wait_for(&mut watcher, "$SYS/broker/messages/received", |v| {
        v.parse::<u64>().unwrap() >= 1
    })
    .await;
    wait_for(&mut watcher, "$SYS/broker/clients/connected", |v| v == "3").await;
    wait_for(&mut watcher, "$SYS/broker/subscriptions/count", |v| {
        v == "2"
    })
    .await;
    // A '#' subscription never sees $SYS topics [MQTT-4.7.2-1].
    everything.expect_no_publish().await;
    broker.shutdown().await;
}
