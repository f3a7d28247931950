//! `$SYS/broker/...` topics, published as retained QoS 0 messages every
//! `metrics.sys_interval`, under Mosquitto's names where Mosquitto has one. They are kept in
//! memory only: after a restart they are simply published again.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::message::Message;
use crate::metrics;
use crate::protocol::QoS;
use crate::state::BrokerState;

/// The topics and their current values.
pub fn snapshot(state: &BrokerState) -> Vec<(&'static str, String)> {
    let queues = state.sessions.queue_stats();
    let totals = &metrics::TOTALS;
    vec![
        (
            "$SYS/broker/version",
            format!("telemq {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", state.started.elapsed().as_secs()),
        ),
        ("$SYS/broker/clients/connected", queues.online.to_string()),
        (
            "$SYS/broker/clients/disconnected",
            queues.offline.to_string(),
        ),
        (
            "$SYS/broker/clients/total",
            (queues.online + queues.offline).to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            state.router.subscription_count().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            state.router.retained_count().to_string(),
        ),
        (
            "$SYS/broker/store/messages/count",
            queues.queued_messages.to_string(),
        ),
        (
            "$SYS/broker/store/messages/bytes",
            state.memory.queued_bytes().to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            totals.messages_received.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/messages/sent",
            totals.messages_sent.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/publish/messages/dropped",
            totals.messages_dropped.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/bytes/received",
            totals.bytes_received.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/bytes/sent",
            totals.bytes_sent.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/delayed/messages/count",
            state.delayed.len().to_string(),
        ),
    ]
}

/// Publishes the `$SYS` topics every `metrics.sys_interval` until shutdown.
pub async fn run(state: Arc<BrokerState>, shutdown: CancellationToken) {
    let interval = state.config.metrics.sys_interval;
    if interval.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for (topic, value) in snapshot(&state) {
            let message = Message::new(
                topic.into(),
                Bytes::from(value),
                QoS::AtMostOnce,
                true,
                Default::default(),
                None,
            );
            state.publish.publish_transient(Arc::new(message));
        }
    }
}
