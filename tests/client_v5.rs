//! MQTT 5 behaviour seen through a real client library (rumqttc's v5 API).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::rumqtt::v5::{
    Filter, LastWill, PublishProperties, QoS, RetainForwardRule, SubAck, SubscribeReasonCode,
    V5Client,
};
use common::rumqtt::wait_until;
use common::{TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;

/// Slightly longer than a 1-second Message Expiry Interval.
const PAST_ONE_SECOND: Duration = Duration::from_millis(1500);

fn assert_granted(suback: &SubAck, qos: QoS) {
    assert_eq!(suback.return_codes, vec![SubscribeReasonCode::Success(qos)]);
}

fn expiry_of(publish: &common::rumqtt::v5::Publish) -> Option<u32> {
    publish
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
}

fn will(topic: &str, delay: Option<u32>) -> LastWill {
    common::rumqtt::v5::will_gone(topic, delay)
}

#[tokio::test]
async fn round_trip_at_each_qos() {
    let broker = TestBroker::start().await;
    let (mut sub, connack) = V5Client::connect(broker.addr, "v5-qos-sub").await;
    assert!(!connack.session_present);
    sub.subscribe("q5/#", QoS::ExactlyOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-qos-pub").await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let topic = format!("q5/{qos:?}");
        publisher
            .publish(&topic, qos, false, topic.as_bytes().to_vec())
            .await;
        let publish = sub.next_publish().await;
        assert_eq!(publish.topic, topic.as_bytes());
        assert_eq!(publish.payload, topic.as_bytes());
        assert_eq!(publish.qos, qos);
        assert!(!publish.retain && !publish.dup);
    }
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn publish_properties_are_forwarded() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(broker.addr, "v5-props-sub").await;
    sub.subscribe("props/t", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-props-pub").await;
    let user_properties = vec![
        ("k".to_string(), "v".to_string()),
        ("k".to_string(), "v2".to_string()),
        ("other".to_string(), "ünïcode".to_string()),
    ];
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        user_properties: user_properties.clone(),
        ..Default::default()
    };
    publisher
        .publish_with(
            "props/t",
            QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
            properties,
        )
        .await;

    let publish = sub.next_publish().await;
    assert_eq!(publish.payload, b"{}".as_slice());
    let got = publish.properties.expect("properties forwarded");
    assert_eq!(
        got.user_properties, user_properties,
        "order and duplicates kept"
    );
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("props/reply"));
    assert_eq!(
        got.correlation_data.as_deref(),
        Some(b"\x00corr\xff".as_slice())
    );
    assert_eq!(got.payload_format_indicator, Some(1));
    assert!(got.subscription_identifiers.is_empty());
    assert_eq!(got.topic_alias, None);
    broker.shutdown().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_publish_with_both_identifiers() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(broker.addr, "v5-subid-sub").await;
    sub.subscribe_with_id("sid/+", QoS::AtLeastOnce, 1).await;
    sub.subscribe_with_id("sid/#", QoS::AtLeastOnce, 2).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-subid-pub").await;

    publisher
        .publish("sid/x", QoS::AtLeastOnce, false, b"both".to_vec())
        .await;
    let publish = sub.next_publish().await;
    assert_eq!(publish.payload, b"both".as_slice());
    let mut ids = publish
        .properties
        .expect("subscription identifiers")
        .subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
    sub.expect_no_publish().await;

    publisher
        .publish("sid/a/b", QoS::AtLeastOnce, false, b"one".to_vec())
        .await;
    let publish = sub.next_publish().await;
    assert_eq!(publish.payload, b"one".as_slice());
    let ids = publish
        .properties
        .expect("subscription identifier")
        .subscription_identifiers;
    assert_eq!(ids, vec![2]);
    broker.shutdown().await;
}

#[tokio::test]
async fn no_local_suppresses_only_the_clients_own_messages() {
    let broker = TestBroker::start().await;
    let (mut me, _) = V5Client::connect(broker.addr, "v5-nolocal-me").await;
    let filter = Filter {
        nolocal: true,
        ..Filter::new("nl/t", QoS::AtLeastOnce)
    };
    assert_granted(&me.subscribe_filter(filter, None).await, QoS::AtLeastOnce);
    let (mut other, _) = V5Client::connect(broker.addr, "v5-nolocal-other").await;

    me.publish("nl/t", QoS::AtLeastOnce, false, b"mine".to_vec())
        .await;
    other
        .publish("nl/t", QoS::AtLeastOnce, false, b"theirs".to_vec())
        .await;
    let publish = me.next_publish().await;
    assert_eq!(publish.payload, b"theirs".as_slice(), "own message echoed");
    me.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_for_live_messages() {
    let broker = TestBroker::start().await;
    let (mut rap, _) = V5Client::connect(broker.addr, "v5-rap-keep").await;
    let filter = Filter {
        preserve_retain: true,
        ..Filter::new("rap/t", QoS::AtLeastOnce)
    };
    assert_granted(&rap.subscribe_filter(filter, None).await, QoS::AtLeastOnce);
    let (mut plain, _) = V5Client::connect(broker.addr, "v5-rap-plain").await;
    plain.subscribe("rap/t", QoS::AtLeastOnce).await;

    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-rap-pub").await;
    publisher
        .publish("rap/t", QoS::AtLeastOnce, true, b"r".to_vec())
        .await;
    assert!(
        rap.next_publish().await.retain,
        "RAP subscriber sees retain=1"
    );
    assert!(
        !plain.next_publish().await.retain,
        "plain subscriber sees retain=0"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn retain_handling_controls_retained_delivery_on_subscribe() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-rh-pub").await;
    publisher
        .publish("rh/t", QoS::AtLeastOnce, true, b"kept".to_vec())
        .await;

    let with_rule = |rule| Filter {
        retain_forward_rule: rule,
        ..Filter::new("rh/t", QoS::AtLeastOnce)
    };

    // 2: never send.
    let (mut never, _) = V5Client::connect(broker.addr, "v5-rh-never").await;
    let suback = never
        .subscribe_filter(with_rule(RetainForwardRule::Never), None)
        .await;
    assert_granted(&suback, QoS::AtLeastOnce);
    never.expect_no_publish().await;

    // 1: only for a new subscription.
    let (mut new_only, _) = V5Client::connect(broker.addr, "v5-rh-new").await;
    new_only
        .subscribe_filter(with_rule(RetainForwardRule::OnNewSubscribe), None)
        .await;
    let publish = new_only.next_publish().await;
    assert_eq!(publish.payload, b"kept".as_slice());
    assert!(publish.retain);
    let suback = new_only
        .subscribe_filter(with_rule(RetainForwardRule::OnNewSubscribe), None)
        .await;
    assert_granted(&suback, QoS::AtLeastOnce);
    new_only.expect_no_publish().await;

    // 0: on every subscribe, re-subscribing included.
    new_only
        .subscribe_filter(with_rule(RetainForwardRule::OnEverySubscribe), None)
        .await;
    let publish = new_only.next_publish().await;
    assert_eq!(publish.payload, b"kept".as_slice());
    assert!(publish.retain);
    broker.shutdown().await;
}

#[tokio::test]
async fn session_expiry_zero_ends_the_session_with_the_connection() {
    let broker = TestBroker::start().await;
    let (mut client, _) = V5Client::connect_persistent(broker.addr, "v5-sx0", 0).await;
    client.subscribe("sx0/t", QoS::AtLeastOnce).await;
    client.disconnect().await;
    wait_until("the session is discarded", || {
        broker.broker().session_count() == 0
    })
    .await;
    assert_eq!(broker.broker().subscription_count(), 0);

    let (_client, connack) = V5Client::connect_persistent(broker.addr, "v5-sx0", 0).await;
    assert!(!connack.session_present);
    broker.shutdown().await;
}

#[tokio::test]
async fn session_with_expiry_survives_and_receives_offline_messages() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect_persistent(broker.addr, "v5-sx60", 60).await;
    sub.subscribe("sx60/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-sx60-pub").await;
    publisher
        .publish("sx60/t", QoS::AtLeastOnce, false, b"offline".to_vec())
        .await;

    let (mut sub, connack) = V5Client::connect_persistent(broker.addr, "v5-sx60", 60).await;
    assert!(connack.session_present);
    let publish = sub.next_publish().await;
    assert_eq!(publish.payload, b"offline".as_slice());
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn session_expires_after_its_interval() {
    let broker = TestBroker::start().await;
    let (mut client, _) = V5Client::connect_persistent(broker.addr, "v5-sx1", 1).await;
    client.subscribe("sx1/t", QoS::AtLeastOnce).await;
    client.disconnect().await;
    assert_eq!(broker.broker().session_count(), 1, "kept while not expired");

    wait_until("the session expires", || {
        broker.broker().session_count() == 0
    })
    .await;
    assert_eq!(broker.broker().subscription_count(), 0);
    let (_client, connack) = V5Client::connect_persistent(broker.addr, "v5-sx1", 1).await;
    assert!(!connack.session_present);
    broker.shutdown().await;
}

#[tokio::test]
async fn expired_retained_message_is_not_delivered() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-mxr-pub").await;
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    publisher
        .publish_with(
            "mxr/short",
            QoS::AtLeastOnce,
            true,
            b"short".to_vec(),
            short,
        )
        .await;
    publisher
        .publish("mxr/forever", QoS::AtLeastOnce, true, b"forever".to_vec())
        .await;
    // Expiry is time-based: the 1 s interval passes.
    common::skip_time(PAST_ONE_SECOND).await;

    let (mut sub, _) = V5Client::connect(broker.addr, "v5-mxr-sub").await;
    sub.subscribe("mxr/#", QoS::AtLeastOnce).await;
    let publish = sub.next_publish().await;
    assert_eq!(publish.payload, b"forever".as_slice());
    assert_eq!(expiry_of(&publish), None);
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn expired_queued_message_is_dropped_and_others_carry_remaining_expiry() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect_persistent(broker.addr, "v5-mxq-sub", 60).await;
    sub.subscribe("mxq/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-mxq-pub").await;
    for (payload, expiry) in [("short", 1), ("long", 60)] {
        let properties = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        publisher
            .publish_with("mxq/t", QoS::AtLeastOnce, false, payload, properties)
            .await;
    }
    common::skip_time(PAST_ONE_SECOND).await;

    let (mut sub, connack) = V5Client::connect_persistent(broker.addr, "v5-mxq-sub", 60).await;
    assert!(connack.session_present);
    let publish = sub.next_publish().await;
    assert_eq!(
        publish.payload,
        b"long".as_slice(),
        "expired message delivered"
    );
    let remaining = expiry_of(&publish).expect("message expiry interval forwarded");
    assert!(
        (1..=59).contains(&remaining),
        "remaining expiry {remaining} after waiting 1.5 s of 60 s"
    );
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn live_message_carries_at_most_its_original_expiry() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(broker.addr, "v5-mxl-sub").await;
    sub.subscribe("mxl/t", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-mxl-pub").await;
    let properties = PublishProperties {
        message_expiry_interval: Some(30),
        ..Default::default()
    };
    publisher
        .publish_with("mxl/t", QoS::AtLeastOnce, false, b"x".to_vec(), properties)
        .await;
    let publish = sub.next_publish().await;
    let remaining = expiry_of(&publish).expect("message expiry interval forwarded");
    assert!(
        (25..=30).contains(&remaining),
        "remaining expiry {remaining}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn receive_maximum_limits_unacknowledged_deliveries() {
    let broker = TestBroker::start().await;
    let mut options = V5Client::options(broker.addr, "v5-rmax-sub");
    options.set_receive_maximum(Some(2)).set_manual_acks(true);
    let (mut sub, _) = V5Client::connect_with(options).await;
    sub.subscribe("rmax/t", QoS::AtLeastOnce).await;

    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-rmax-pub").await;
    for i in 0..5u8 {
        publisher
            .publish("rmax/t", QoS::AtLeastOnce, false, vec![i])
            .await;
    }
    let first = sub.next_publish().await;
    let second = sub.next_publish().await;
    assert_eq!((first.payload[0], second.payload[0]), (0, 1));
    sub.expect_no_publish().await;

    sub.ack(&first).await;
    let third = sub.next_publish().await;
    assert_eq!(third.payload[0], 2);
    sub.expect_no_publish().await;

    sub.ack(&second).await;
    sub.ack(&third).await;
    let fourth = sub.next_publish().await;
    let fifth = sub.next_publish().await;
    assert_eq!((fourth.payload[0], fifth.payload[0]), (3, 4));
    broker.shutdown().await;
}

#[tokio::test]
async fn empty_client_id_gets_an_assigned_identifier() {
    let broker = TestBroker::start().await;
    let (_client, connack) = V5Client::connect(broker.addr, "").await;
    let assigned = connack
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("assigned client identifier in CONNACK");
    assert!(!assigned.is_empty());

    let (_other, connack) = V5Client::connect(broker.addr, "").await;
    let other = connack
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("assigned client identifier in CONNACK");
    assert_ne!(assigned, other, "identifiers must be unique");
    assert_eq!(broker.broker().session_count(), 2);
    broker.shutdown().await;
}

#[tokio::test]
async fn session_takeover_sends_disconnect_with_reason_session_taken_over() {
    let broker = TestBroker::start().await;
    let (mut first, _) = V5Client::connect(broker.addr, "v5-takeover").await;
    let (mut second, _) = V5Client::connect(broker.addr, "v5-takeover").await;
    let error = first.wait_closed().await;
    assert_eq!(
        V5Client::server_disconnect_reason(&error),
        Some(DisconnectReasonCode::SessionTakenOver),
        "first connection ended with {error:?}"
    );

    second.subscribe("to5/t", QoS::AtLeastOnce).await;
    second
        .publish("to5/t", QoS::AtLeastOnce, false, b"mine now".to_vec())
        .await;
    assert_eq!(second.next_publish().await.payload, b"mine now".as_slice());
    broker.shutdown().await;
}

#[tokio::test]
async fn delayed_will_is_published_after_the_delay() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(broker.addr, "v5-wd-sub").await;
    sub.subscribe("wd/t", QoS::AtLeastOnce).await;

    let mut options = V5Client::options(broker.addr, "v5-wd-dies");
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(10))
        .set_last_will(will("wd/t", Some(2)));
    let (dying, _) = V5Client::connect_with(options).await;
    dying.abort().await;

    sub.expect_no_publish().await;
    let publish = sub.next_publish().await;
    assert_eq!(publish.topic, b"wd/t".as_slice());
    assert_eq!(publish.payload, b"gone".as_slice());
    broker.shutdown().await;
}

#[tokio::test]
async fn reconnecting_within_the_will_delay_cancels_the_will() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(broker.addr, "v5-wdc-sub").await;
    sub.subscribe("wdc/t", QoS::AtLeastOnce).await;

    let mut options = V5Client::options(broker.addr, "v5-wdc-flaky");
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(10))
        .set_last_will(will("wdc/t", Some(2)));
    let (flaky, _) = V5Client::connect_with(options.clone()).await;
    flaky.abort().await;
    let (flaky, connack) = V5Client::connect_with(options).await;
    assert!(connack.session_present);

    // The will was due 2 s after the drop (the broker checks every second): it must not come.
    sub.expect_no_publish_for(Duration::from_millis(3500)).await;

    // Control: the new connection's will still works.
    flaky.abort().await;
    let publish = tokio::time::timeout(WAIT, sub.next_publish())
        .await
        .expect("will after the second drop");
    assert_eq!(publish.payload, b"gone".as_slice());
    broker.shutdown().await;
}

#[tokio::test]
async fn connack_advertises_configured_limits() {
    let broker = TestBroker::start_with(|config| {
        config.mqtt.receive_maximum = 77;
        config.mqtt.max_packet_size = 200_000;
        config.mqtt.topic_alias_maximum = 9;
    })
    .await;
    let (_client, connack) = V5Client::connect(broker.addr, "v5-connack").await;
    let properties = connack.properties.expect("CONNACK properties");
    assert_eq!(properties.receive_max, Some(77));
    assert_eq!(properties.max_packet_size, Some(200_000));
    assert_eq!(properties.topic_alias_max, Some(9));
    broker.shutdown().await;
}

#[tokio::test]
async fn topic_alias_from_client_is_resolved() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(broker.addr, "v5-alias-sub").await;
    sub.subscribe("alias/t", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "v5-alias-pub").await;
    let with_alias = || PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    };
    publisher
        .publish_with(
            "alias/t",
            QoS::AtLeastOnce,
            false,
            b"set".to_vec(),
            with_alias(),
        )
        .await;
    publisher
        .publish_with("", QoS::AtLeastOnce, false, b"use".to_vec(), with_alias())
        .await;

    for payload in [b"set".as_slice(), b"use".as_slice()] {
        let publish = sub.next_publish().await;
        assert_eq!(publish.topic, b"alias/t".as_slice());
        assert_eq!(publish.payload, payload);
        let alias = publish.properties.and_then(|p| p.topic_alias);
        assert_eq!(alias, None, "subscriber allowed no aliases");
    }
    broker.shutdown().await;
}
