//! The Prometheus endpoint, scraped over HTTP: counters move with matching traffic and the
//! state gauges describe the broker. One test in its own binary: the recorder is per process,
//! so counters here are this test's alone.

mod common;

use common::rumqtt::v5::QoS;
use common::scrape::{http_get, scrape, value};
use common::TestBroker;
use telemq::config::OverflowPolicy;

#[tokio::test]
async fn counters_move_with_traffic_and_gauges_describe_the_broker() {
    let broker = TestBroker::start_with(|config| {
        config.queue.max_messages = 2;
        config.queue.policy = OverflowPolicy::DropNewest;
    })
    .await;
    let before = scrape(&broker).await;
    assert!(
        before.contains_key("telemq_auth_failures_total"),
        "present at zero"
    );

    // An offline session whose queue (2 messages) takes m/1 and m/2, a shared member, a
    // publisher, a refused CONNECT and a protocol error.
    let (mut online, mut publisher) = common::traffic::mixed(broker.addr).await;
    for _ in 0..3 {
        online.next_publish().await;
    }

    let after = scrape(&broker).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta("telemq_connections_total"), 5.0);
    assert_eq!(
        delta("telemq_messages_received_total{qos=\"0\",transport=\"tcp\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_messages_received_total{qos=\"1\",transport=\"tcp\"}"),
        2.0
    );
    assert_eq!(
        delta("telemq_messages_received_total{qos=\"2\",transport=\"tcp\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_messages_sent_total{qos=\"1\",transport=\"tcp\"}"),
        2.0,
        "m/1 and m/2 to the shared member at QoS 1"
    );
    // The offline queue took m/1 and m/2 (QoS 0 is not queued offline); nothing overflowed.
    assert_eq!(
        delta("telemq_messages_dropped_total{reason=\"qos0_offline\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_connections_refused_total{reason=\"client_identifier_not_valid\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_protocol_errors_total{reason=\"malformed_packet\"}"),
        1.0
    );
    assert!(delta("telemq_bytes_received_total{transport=\"tcp\"}") > 0.0);
    assert!(delta("telemq_bytes_sent_total{transport=\"tcp\"}") > 0.0);
    assert!(delta("telemq_storage_batches_total") > 0.0);
    assert!(value(&after, "telemq_storage_write_seconds_bucket{le=\"+Inf\"}") > 0.0);

    // One more message overflows the offline queue (2 messages, drop_newest).
    publisher.publish("m/3", QoS::AtLeastOnce, false, "e").await;
    online.next_publish().await;
    let overflowed = scrape(&broker).await;
    assert_eq!(
        value(
            &overflowed,
            "telemq_messages_dropped_total{reason=\"queue_full\"}"
        ) - value(
            &after,
            "telemq_messages_dropped_total{reason=\"queue_full\"}"
        ),
        1.0
    );

    // Gauges read from the broker's state.
    assert_eq!(
        value(&overflowed, "telemq_sessions{state=\"offline\"}"),
        1.0
    );
    assert_eq!(value(&overflowed, "telemq_sessions{state=\"online\"}"), 2.0);
    assert_eq!(value(&overflowed, "telemq_subscriptions"), 2.0);
    assert_eq!(value(&overflowed, "telemq_shared_groups"), 1.0);
    assert_eq!(value(&overflowed, "telemq_retained_messages"), 1.0);
    assert!(value(&overflowed, "telemq_retained_bytes") > 1.0);
    assert_eq!(value(&overflowed, "telemq_queued_messages"), 2.0);
    assert_eq!(value(&overflowed, "telemq_queue_deepest_messages"), 2.0);
    assert!(value(&overflowed, "telemq_queued_bytes") > 0.0);
    assert_eq!(value(&overflowed, "telemq_delayed_messages"), 1.0);
    assert!(value(&overflowed, "telemq_process_resident_memory_bytes") > 1e6);
    assert!(value(&overflowed, "telemq_uptime_seconds") > 0.0);

    let addr = broker.broker().metrics_addr().unwrap();
    assert_eq!(
        http_get(addr, "/health").await,
        ("HTTP/1.1 200 OK".into(), "OK\n".into())
    );
    assert_eq!(http_get(addr, "/nope").await.0, "HTTP/1.1 404 Not Found");
    broker.shutdown().await;
}
