//! MQTT 3.1.1 behaviour seen through a real client library (rumqttc's v4 API).

mod common;

use common::rumqtt::v4::{QoS, V4Client};
use common::rumqtt::wait_until;
use common::TestBroker;

fn qos_from(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A payload that is not all ASCII and spans several TCP segments' worth of bytes.
fn binary_payload(tag: u8) -> Vec<u8> {
    (0..4000u32).map(|i| (i % 251) as u8 ^ tag).collect()
}

#[tokio::test]
async fn qos_round_trip_is_downgraded_to_the_subscription_qos() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-qos-sub", true).await;
    for sub_qos in 0..=2u8 {
        sub.subscribe(&format!("qos/{sub_qos}"), qos_from(sub_qos))
            .await;
    }
    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-qos-pub", true).await;

    let mut expected = Vec::new();
    for sub_qos in 0..=2u8 {
        for pub_qos in 0..=2u8 {
            let tag = sub_qos * 3 + pub_qos;
            let topic = format!("qos/{sub_qos}");
            publisher
                .publish(&topic, qos_from(pub_qos), false, binary_payload(tag))
                .await;
            expected.push((topic, qos_from(sub_qos.min(pub_qos)), binary_payload(tag)));
        }
    }
    for (topic, qos, payload) in expected {
        let publish = sub.next_publish().await;
        assert_eq!(publish.topic, topic);
        assert_eq!(publish.qos, qos, "delivered QoS on {topic}");
        assert!(publish.payload == payload, "payload on {topic} altered");
        assert!(!publish.retain && !publish.dup);
    }
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn qos1_messages_on_one_topic_keep_their_order() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-order-sub", true).await;
    sub.subscribe("order/t", QoS::AtLeastOnce).await;
    let (publisher, _) = V4Client::connect(broker.addr, "v4-order-pub", true).await;

    const COUNT: u32 = 200;
    let client = publisher.client.clone();
    let sender = tokio::spawn(async move {
        for i in 0..COUNT {
            client
                .publish("order/t", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                .await
                .expect("publish request");
        }
    });
    for i in 0..COUNT {
        let publish = sub.next_publish().await;
        assert_eq!(publish.qos, QoS::AtLeastOnce);
        assert_eq!(publish.payload.as_ref(), i.to_be_bytes(), "message {i}");
    }
    sender.await.unwrap();
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

/// Publishes each topic at QoS 1, in order.
async fn publish_all(publisher: &mut V4Client, topics: &[&str]) {
    for topic in topics {
        publisher
            .publish(topic, QoS::AtLeastOnce, false, topic.as_bytes().to_vec())
            .await;
    }
}

/// Asserts `client` receives exactly `topics`, in order.
async fn expect_topics(client: &mut V4Client, topics: &[&str]) {
    for topic in topics {
        let publish = client.next_publish().await;
        assert_eq!(publish.topic, *topic, "{}", client.id);
        assert_eq!(publish.payload.as_ref(), topic.as_bytes());
    }
    client.expect_no_publish().await;
}

#[tokio::test]
async fn wildcards_match_levels_and_dollar_topics_only_explicitly() {
    let broker = TestBroker::start().await;
    let addr = broker.addr;
    let (mut plus, _) = V4Client::connect(addr, "v4-wild-plus", true).await;
    plus.subscribe("w/+/c", QoS::AtLeastOnce).await;
    let (mut hash, _) = V4Client::connect(addr, "v4-wild-hash", true).await;
    hash.subscribe("a/#", QoS::AtLeastOnce).await;
    let (mut all, _) = V4Client::connect(addr, "v4-wild-all", true).await;
    all.subscribe("#", QoS::AtLeastOnce).await;
    let (mut plus_x, _) = V4Client::connect(addr, "v4-wild-plus-x", true).await;
    plus_x.subscribe("+/x", QoS::AtLeastOnce).await;
    let (mut sys, _) = V4Client::connect(addr, "v4-wild-sys", true).await;
    sys.subscribe("$SYS/#", QoS::AtLeastOnce).await;

    let (mut publisher, _) = V4Client::connect(addr, "v4-wild-pub", true).await;
    let topics = [
        "w/b/c", "w/b/d", "w/b/c/d", "w//c", "a", "a/b/c", "ab", "$SYS/x", "q/x",
    ];
    publish_all(&mut publisher, &topics).await;

    expect_topics(&mut plus, &["w/b/c", "w//c"]).await;
    expect_topics(&mut hash, &["a", "a/b/c"]).await;
    expect_topics(
        &mut all,
        &[
            "w/b/c", "w/b/d", "w/b/c/d", "w//c", "a", "a/b/c", "ab", "q/x",
        ],
    )
    .await;
    expect_topics(&mut plus_x, &["q/x"]).await;
    expect_topics(&mut sys, &["$SYS/x"]).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-overlap-sub", true).await;
    sub.subscribe("ov/+", QoS::AtMostOnce).await;
    sub.subscribe("ov/#", QoS::ExactlyOnce).await;
    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-overlap-pub", true).await;
    publisher
        .publish("ov/x", QoS::ExactlyOnce, false, b"once".to_vec())
        .await;

    let publish = sub.next_publish().await;
    assert_eq!(publish.topic, "ov/x");
    assert_eq!(publish.qos, QoS::ExactlyOnce);
    assert_eq!(publish.payload.as_ref(), b"once");
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn retained_message_is_delivered_on_subscribe_including_wildcards() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-ret-pub", true).await;
    publisher
        .publish("r/a", QoS::AtLeastOnce, true, b"kept".to_vec())
        .await;
    assert_eq!(broker.broker().retained_count(), 1);

    for (id, filter) in [
        ("v4-ret-exact", "r/a"),
        ("v4-ret-plus", "r/+"),
        ("v4-ret-hash", "r/#"),
    ] {
        let (mut sub, _) = V4Client::connect(broker.addr, id, true).await;
        sub.subscribe(filter, QoS::AtLeastOnce).await;
        let publish = sub.next_publish().await;
        assert_eq!(publish.topic, "r/a", "{filter}");
        assert_eq!(publish.payload.as_ref(), b"kept", "{filter}");
        assert!(publish.retain, "retain flag on subscribe via {filter}");
        assert_eq!(publish.qos, QoS::AtLeastOnce, "{filter}");
        sub.expect_no_publish().await;
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn retained_message_is_replaced_then_cleared_by_an_empty_payload() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-retrep-pub", true).await;
    publisher
        .publish("rr/a", QoS::AtLeastOnce, true, b"old".to_vec())
        .await;
    publisher
        .publish("rr/a", QoS::AtLeastOnce, true, b"new".to_vec())
        .await;

    let (mut first, _) = V4Client::connect(broker.addr, "v4-retrep-sub1", true).await;
    first.subscribe("rr/#", QoS::AtLeastOnce).await;
    let publish = first.next_publish().await;
    assert_eq!(publish.payload.as_ref(), b"new");
    assert!(publish.retain);
    first.expect_no_publish().await;

    publisher
        .publish("rr/a", QoS::AtLeastOnce, true, Vec::new())
        .await;
    wait_until("the retained message is cleared", || {
        broker.broker().retained_count() == 0
    })
    .await;
    let (mut second, _) = V4Client::connect(broker.addr, "v4-retrep-sub2", true).await;
    second.subscribe("rr/#", QoS::AtLeastOnce).await;
    second.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn live_retained_publish_is_forwarded_with_retain_flag_clear() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-retlive-sub", true).await;
    sub.subscribe("rl/a", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-retlive-pub", true).await;
    publisher
        .publish("rl/a", QoS::AtLeastOnce, true, b"live".to_vec())
        .await;

    let publish = sub.next_publish().await;
    assert_eq!(publish.payload.as_ref(), b"live");
    assert!(
        !publish.retain,
        "retain flag must be 0 for a live subscriber"
    );
    assert_eq!(broker.broker().retained_count(), 1, "still stored");
    broker.shutdown().await;
}

#[tokio::test]
async fn persistent_session_queues_qos1_but_not_qos0_while_offline() {
    let broker = TestBroker::start().await;
    let (mut sub, connack) = V4Client::connect(broker.addr, "v4-persist-sub", false).await;
    assert!(!connack.session_present);
    sub.subscribe("ps/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-persist-pub", true).await;
    publisher
        .publish("ps/t", QoS::AtMostOnce, false, b"qos0".to_vec())
        .await;
    publisher
        .publish("ps/t", QoS::AtLeastOnce, false, b"qos1".to_vec())
        .await;

    let (mut sub, connack) = V4Client::connect(broker.addr, "v4-persist-sub", false).await;
    assert!(connack.session_present, "session must be resumed");
    let publish = sub.next_publish().await;
    assert_eq!(publish.payload.as_ref(), b"qos1");
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    sub.expect_no_publish().await;

    // The subscription survived too: a live message still arrives.
    publisher
        .publish("ps/t", QoS::AtLeastOnce, false, b"live".to_vec())
        .await;
    assert_eq!(sub.next_publish().await.payload.as_ref(), b"live");
    broker.shutdown().await;
}

#[tokio::test]
async fn clean_session_discards_the_stored_session_and_its_subscriptions() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-clean-sub", false).await;
    sub.subscribe("cs/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    assert_eq!(
        broker.broker().session_count(),
        1,
        "persistent session kept"
    );

    let (mut sub, connack) = V4Client::connect(broker.addr, "v4-clean-sub", true).await;
    assert!(!connack.session_present);
    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-clean-pub", true).await;
    publisher
        .publish("cs/t", QoS::AtLeastOnce, false, b"nobody".to_vec())
        .await;
    sub.expect_no_publish().await;
    sub.disconnect().await;

    wait_until("the clean session is gone", || {
        broker.broker().session_count() == 1 // only the publisher's
    })
    .await;
    let (_sub, connack) = V4Client::connect(broker.addr, "v4-clean-sub", false).await;
    assert!(
        !connack.session_present,
        "no session may survive a clean one"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn second_connection_with_same_id_takes_over() {
    let broker = TestBroker::start().await;
    let (mut first, _) = V4Client::connect(broker.addr, "v4-takeover", true).await;
    let (mut second, _) = V4Client::connect(broker.addr, "v4-takeover", true).await;
    let error = first.wait_closed().await;
    println!("first connection closed with {error:?}");

    second.subscribe("to/t", QoS::AtLeastOnce).await;
    second
        .publish("to/t", QoS::AtLeastOnce, false, b"still here".to_vec())
        .await;
    assert_eq!(second.next_publish().await.payload.as_ref(), b"still here");
    assert_eq!(broker.broker().session_count(), 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn will_is_published_when_the_connection_drops() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-will-sub", true).await;
    sub.subscribe("will/t", QoS::AtLeastOnce).await;

    let mut options = V4Client::options(broker.addr, "v4-will-dies");
    options.set_last_will(rumqttc::LastWill::new(
        "will/t",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (dying, _) = V4Client::connect_with(options).await;
    sub.expect_no_publish().await;
    dying.abort().await;

    let will = sub.next_publish().await;
    assert_eq!(will.topic, "will/t");
    assert_eq!(will.payload.as_ref(), b"gone");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    broker.shutdown().await;
}

#[tokio::test]
async fn will_is_not_published_after_disconnect() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-nowill-sub", true).await;
    sub.subscribe("nowill/t", QoS::AtLeastOnce).await;

    let mut options = V4Client::options(broker.addr, "v4-nowill-leaves");
    options.set_last_will(rumqttc::LastWill::new(
        "nowill/t",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (leaving, _) = V4Client::connect_with(options).await;
    leaving.disconnect().await;
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn unacked_qos1_is_redelivered_with_dup_on_reconnect() {
    let broker = TestBroker::start().await;
    let mut options = V4Client::options(broker.addr, "v4-dup-sub");
    options.set_clean_session(false).set_manual_acks(true);
    let (mut sub, _) = V4Client::connect_with(options.clone()).await;
    sub.subscribe("dup/t", QoS::AtLeastOnce).await;

    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-dup-pub", true).await;
    publisher
        .publish("dup/t", QoS::AtLeastOnce, false, b"again".to_vec())
        .await;
    let first = sub.next_publish().await;
    assert_eq!(first.payload.as_ref(), b"again");
    assert!(!first.dup);
    sub.disconnect().await; // never acked

    let (mut sub, connack) = V4Client::connect_with(options).await;
    assert!(connack.session_present);
    let again = sub.next_publish().await;
    assert_eq!(again.payload.as_ref(), b"again");
    assert_eq!(again.topic, "dup/t");
    assert!(again.dup, "redelivery must carry DUP");
    assert_eq!(again.pkid, first.pkid, "redelivery keeps the packet id");
    sub.ack(&again).await;
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V4Client::connect(broker.addr, "v4-unsub-sub", true).await;
    sub.subscribe("un/t", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V4Client::connect(broker.addr, "v4-unsub-pub", true).await;
    publisher
        .publish("un/t", QoS::AtLeastOnce, false, b"before".to_vec())
        .await;
    assert_eq!(sub.next_publish().await.payload.as_ref(), b"before");
    assert_eq!(broker.broker().subscription_count(), 1);

    sub.unsubscribe("un/t").await;
    assert_eq!(broker.broker().subscription_count(), 0);
    publisher
        .publish("un/t", QoS::AtLeastOnce, false, b"after".to_vec())
        .await;
    sub.expect_no_publish().await;
    broker.shutdown().await;
}
