//! Every metric the broker records, by name, with its description.
//!
//! Names carry the `telemq_` prefix; labels are low-cardinality (never a client id or topic).
//! Recording goes through the `metrics` facade, so without an installed exporter it costs an
//! atomic load and nothing else.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder's handle. One recorder serves every broker in the process (tests
/// run many), so counters are process totals.
mod cluster;

pub use cluster::*;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Process totals the `$SYS` topics report (the recorder's counters cannot be read back).
#[derive(Debug, Default)]
pub struct Totals {
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
}

pub static TOTALS: Totals = Totals {
    messages_received: AtomicU64::new(0),
    messages_sent: AtomicU64::new(0),
    messages_dropped: AtomicU64::new(0),
    bytes_received: AtomicU64::new(0),
    bytes_sent: AtomicU64::new(0),
};

/// Outbound QoS 1/2 messages in flight in all sessions (kept by `session::inflight`).
pub static INFLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Label values of the transports.
pub const TCP: &str = "tcp";
pub const TLS: &str = "tls";
pub const WS: &str = "ws";
pub const WSS: &str = "wss";

/// Counters touched per message or per socket read/write, registered once. Looking a labelled
/// counter up through `counter!` builds its key and hashes it on every call, which cost a third
/// of the throughput of a message path that otherwise allocates nothing.
struct HotCounters {
    received: [metrics::Counter; 3],
    sent: [metrics::Counter; 3],
    bytes_received: metrics::Counter,
    bytes_sent: metrics::Counter,
    dropped: Vec<(&'static str, metrics::Counter)>,
}

static HOT: OnceLock<HotCounters> = OnceLock::new();

fn hot() -> Option<&'static HotCounters> {
    HOT.get()
}

fn register_hot_counters() {
    let per_qos = |name: &'static str| {
        ["0", "1", "2"].map(|qos| counter!(name, "qos" => qos, "transport" => TCP))
    };
    let reasons = [
        DROP_QUEUE_FULL,
        DROP_QUEUE_EVICTED,
        DROP_SLOW_CONSUMER,
        DROP_NO_SUBSCRIBERS,
        DROP_QUOTA_EXCEEDED,
        DROP_DELAYED_LIMIT,
        DROP_DELAYED_INVALID,
        DROP_QOS0_OFFLINE,
        DROP_EXPIRED,
        DROP_TOO_LARGE_FOR_CLIENT,
        DROP_STORAGE_FAILED,
        DROP_SESSION_ENDED,
        DROP_NOT_AUTHORIZED,
    ];
    let _ = HOT.set(HotCounters {
        received: per_qos(MESSAGES_RECEIVED_TOTAL),
        sent: per_qos(MESSAGES_SENT_TOTAL),
        bytes_received: counter!(BYTES_RECEIVED_TOTAL, "transport" => TCP),
        bytes_sent: counter!(BYTES_SENT_TOTAL, "transport" => TCP),
        dropped: reasons
            .into_iter()
            .map(|reason| (reason, counter!(MESSAGES_DROPPED_TOTAL, "reason" => reason)))
            .collect(),
    });
}

/// Buckets of the cluster's latencies (a hop between nodes, a replication): from a quarter
/// millisecond on one machine to seconds while NATS elects a leader.
const CLUSTER_SECONDS_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Installs the Prometheus recorder once per process. `None` when another recorder was
/// installed first (an embedding application's).
pub fn install() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(STORAGE_WRITE_SECONDS.into()),
                    &[
                        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 1.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(CLUSTER_FORWARD_LAG_SECONDS.into()),
                        CLUSTER_SECONDS_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(CLUSTER_REPLICATION_SECONDS.into()),
                        CLUSTER_SECONDS_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(STORAGE_BATCH_REQUESTS.into()),
                        &[
                            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 2048.0,
                        ],
                    )
                })
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            register_hot_counters();
            Some(handle)
        })
        .as_ref()
}

/// The text exposition of every metric; histograms are folded first.
pub fn render() -> String {
    match RECORDER.get().and_then(Option::as_ref) {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// Broker state read at scrape time.
#[derive(Debug, Default)]
pub struct StateGauges {
    pub sessions_online: usize,
    pub sessions_offline: usize,
    pub subscriptions: usize,
    pub shared_groups: usize,
    pub retained_messages: usize,
    pub retained_bytes: usize,
    pub queued_messages: usize,
    pub queued_bytes: usize,
    pub deepest_queue: usize,
    pub delayed_messages: usize,
    pub uptime_seconds: f64,
}

pub fn set_state_gauges(state: &StateGauges) {
    gauge!(SESSIONS, "state" => "online").set(state.sessions_online as f64);
    gauge!(SESSIONS, "state" => "offline").set(state.sessions_offline as f64);
    gauge!(SUBSCRIPTIONS).set(state.subscriptions as f64);
    gauge!(SHARED_GROUPS).set(state.shared_groups as f64);
    gauge!(RETAINED_MESSAGES).set(state.retained_messages as f64);
    gauge!(RETAINED_BYTES).set(state.retained_bytes as f64);
    gauge!(QUEUED_MESSAGES).set(state.queued_messages as f64);
    gauge!(QUEUED_BYTES).set(state.queued_bytes as f64);
    gauge!(QUEUE_DEEPEST_MESSAGES).set(state.deepest_queue as f64);
    gauge!(INFLIGHT_MESSAGES).set(INFLIGHT.load(Ordering::Relaxed) as f64);
    gauge!(DELAYED_MESSAGES).set(state.delayed_messages as f64);
    gauge!(UPTIME_SECONDS).set(state.uptime_seconds);
    if let Some(rss) = resident_memory_bytes() {
        gauge!(PROCESS_RESIDENT_MEMORY_BYTES).set(rss as f64);
    }
}

/// The process's resident set size, from `/proc/self/status` (Linux).
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

pub const CONNECTIONS_TOTAL: &str = "telemq_connections_total";
pub const CONNECTIONS_CURRENT: &str = "telemq_connections_current";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "telemq_connections_closed_total";
pub const PROTOCOL_ERRORS_TOTAL: &str = "telemq_protocol_errors_total";
pub const MESSAGES_RECEIVED_TOTAL: &str = "telemq_messages_received_total";
pub const MESSAGES_SENT_TOTAL: &str = "telemq_messages_sent_total";
pub const MESSAGES_DROPPED_TOTAL: &str = "telemq_messages_dropped_total";
pub const SESSIONS_EXPIRED_TOTAL: &str = "telemq_sessions_expired_total";
pub const DEAD_LETTERS_TOTAL: &str = "telemq_dead_letters_total";
pub const BYTES_RECEIVED_TOTAL: &str = "telemq_bytes_received_total";
pub const BYTES_SENT_TOTAL: &str = "telemq_bytes_sent_total";
pub const AUTH_FAILURES_TOTAL: &str = "telemq_auth_failures_total";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "telemq_connections_refused_total";
pub const SUBSCRIPTIONS_REFUSED_TOTAL: &str = "telemq_subscriptions_refused_total";
pub const ACL_DENIED_TOTAL: &str = "telemq_acl_denied_total";
pub const HANDSHAKE_FAILURES_TOTAL: &str = "telemq_handshake_failures_total";
pub const RELOADS_TOTAL: &str = "telemq_reloads_total";
// Gauges set from broker state when /metrics is scraped.
pub const SESSIONS: &str = "telemq_sessions";
pub const SUBSCRIPTIONS: &str = "telemq_subscriptions";
pub const SHARED_GROUPS: &str = "telemq_shared_groups";
pub const RETAINED_MESSAGES: &str = "telemq_retained_messages";
pub const RETAINED_BYTES: &str = "telemq_retained_bytes";
pub const QUEUED_MESSAGES: &str = "telemq_queued_messages";
pub const QUEUED_BYTES: &str = "telemq_queued_bytes";
pub const QUEUE_DEEPEST_MESSAGES: &str = "telemq_queue_deepest_messages";
pub const INFLIGHT_MESSAGES: &str = "telemq_inflight_messages";
pub const DELAYED_MESSAGES: &str = "telemq_delayed_messages";
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "telemq_process_resident_memory_bytes";
pub const UPTIME_SECONDS: &str = "telemq_uptime_seconds";
pub const SHARED_REDELIVERED_TOTAL: &str = "telemq_shared_redelivered_total";
pub const PUBLISHERS_PAUSED_TOTAL: &str = "telemq_publishers_paused_total";

/// Drop reasons (`reason` label of [`MESSAGES_DROPPED_TOTAL`]).
pub const DROP_QUEUE_FULL: &str = "queue_full";
pub const DROP_QUEUE_EVICTED: &str = "queue_evicted";
pub const DROP_SLOW_CONSUMER: &str = "slow_consumer";
pub const DROP_NO_SUBSCRIBERS: &str = "no_subscribers";
pub const DROP_QUOTA_EXCEEDED: &str = "quota_exceeded";
pub const DROP_DELAYED_LIMIT: &str = "delayed_limit";
pub const DROP_DELAYED_INVALID: &str = "delayed_invalid";
pub const DROP_QOS0_OFFLINE: &str = "qos0_offline";
pub const DROP_EXPIRED: &str = "expired";
pub const DROP_TOO_LARGE_FOR_CLIENT: &str = "too_large_for_client";
pub const DROP_STORAGE_FAILED: &str = "storage_failed";
pub const DROP_SESSION_ENDED: &str = "session_ended";
pub const DROP_NOT_AUTHORIZED: &str = "not_authorized";
pub const DROP_TOPIC_TOO_DEEP: &str = "topic_too_deep";

pub const STORAGE_BATCHES_TOTAL: &str = "telemq_storage_batches_total";
pub const STORAGE_BATCH_REQUESTS: &str = "telemq_storage_batch_requests";
pub const STORAGE_WRITE_SECONDS: &str = "telemq_storage_write_seconds";
pub const STORAGE_WRITE_ERRORS_TOTAL: &str = "telemq_storage_write_errors_total";
pub const RECOVERY_SECONDS: &str = "telemq_recovery_seconds";
pub const STORAGE_DECRYPT_FAILURES_TOTAL: &str = "telemq_storage_decrypt_failures_total";

fn describe() {
    describe_cluster();
    describe_counter!(
        BYTES_RECEIVED_TOTAL,
        Unit::Bytes,
        "Bytes read from client sockets, by transport"
    );
    describe_counter!(
        BYTES_SENT_TOTAL,
        Unit::Bytes,
        "Bytes written to client sockets, by transport"
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        Unit::Count,
        "CONNECTs refused for bad credentials or a denied client"
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "Connections refused: by CONNACK reason, or by the limit that closed them before CONNECT"
    );
    describe_counter!(
        SUBSCRIPTIONS_REFUSED_TOTAL,
        Unit::Count,
        "Subscription requests refused by a limit (topic levels, subscriptions per client)"
    );
    describe_counter!(
        ACL_DENIED_TOTAL,
        Unit::Count,
        "Publishes, subscriptions and deliveries the ACL denied, by action"
    );
    describe_counter!(
        HANDSHAKE_FAILURES_TOTAL,
        Unit::Count,
        "TLS and WebSocket handshakes that failed or timed out, by transport and reason"
    );
    describe_counter!(
        RELOADS_TOTAL,
        Unit::Count,
        "SIGHUP reloads of a file (passwords, acl, tls), by outcome"
    );
    describe_gauge!(
        SESSIONS,
        Unit::Count,
        "Sessions, by state (online, offline)"
    );
    describe_gauge!(
        SUBSCRIPTIONS,
        Unit::Count,
        "Subscriptions, counting each shared group member"
    );
    describe_gauge!(
        SHARED_GROUPS,
        Unit::Count,
        "Shared subscription groups (group and filter)"
    );
    describe_gauge!(RETAINED_MESSAGES, Unit::Count, "Retained messages");
    describe_gauge!(
        RETAINED_BYTES,
        Unit::Bytes,
        "Bytes held by retained messages (topic, payload, properties)"
    );
    describe_gauge!(
        QUEUED_MESSAGES,
        Unit::Count,
        "Messages queued in all session queues"
    );
    describe_gauge!(
        QUEUED_BYTES,
        Unit::Bytes,
        "Bytes held in all session queues (the memory guard's measure)"
    );
    describe_gauge!(
        QUEUE_DEEPEST_MESSAGES,
        Unit::Count,
        "Messages in the deepest session queue: the worst consumer lag"
    );
    describe_gauge!(
        INFLIGHT_MESSAGES,
        Unit::Count,
        "Outbound QoS 1/2 messages awaiting acknowledgement"
    );
    describe_gauge!(
        DELAYED_MESSAGES,
        Unit::Count,
        "$delayed messages waiting to fall due"
    );
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY_BYTES,
        Unit::Bytes,
        "Resident set size of the broker process"
    );
    describe_gauge!(
        UPTIME_SECONDS,
        Unit::Seconds,
        "Seconds since the broker started"
    );
    // Present from the start (at zero), so dashboards and alerts have a series to read.
    counter!(AUTH_FAILURES_TOTAL).absolute(0);
    counter!(ACL_DENIED_TOTAL).absolute(0);
    counter!(HANDSHAKE_FAILURES_TOTAL).absolute(0);
    counter!(PUBLISHERS_PAUSED_TOTAL).absolute(0);
    counter!(STORAGE_WRITE_ERRORS_TOTAL).absolute(0);
    counter!(STORAGE_DECRYPT_FAILURES_TOTAL).absolute(0);
    counter!(SESSIONS_EXPIRED_TOTAL).absolute(0);
    counter!(SHARED_REDELIVERED_TOTAL).absolute(0);

    describe_counter!(
        CONNECTIONS_TOTAL,
        Unit::Count,
        "Network connections accepted"
    );
    describe_gauge!(
        CONNECTIONS_CURRENT,
        Unit::Count,
        "Network connections open now"
    );
    describe_counter!(
        CONNECTIONS_CLOSED_TOTAL,
        Unit::Count,
        "Connections closed, by close reason"
    );
    describe_counter!(
        PROTOCOL_ERRORS_TOTAL,
        Unit::Count,
        "Connections closed for a protocol violation, by reason code"
    );
    describe_counter!(
        MESSAGES_RECEIVED_TOTAL,
        Unit::Count,
        "PUBLISH packets received from clients, by QoS and transport"
    );
    describe_counter!(
        MESSAGES_SENT_TOTAL,
        Unit::Count,
        "PUBLISH packets sent to clients, by QoS and transport"
    );
    describe_counter!(
        MESSAGES_DROPPED_TOTAL,
        Unit::Count,
        "Messages not delivered to a subscriber, by reason"
    );
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        Unit::Count,
        "Dropped messages republished to $DLQ/<reason>/<topic>, by reason"
    );
    describe_counter!(
        SHARED_REDELIVERED_TOTAL,
        Unit::Count,
        "Messages of a shared subscription member that went away, handed to another member"
    );
    describe_counter!(
        PUBLISHERS_PAUSED_TOTAL,
        Unit::Count,
        "Times a publishing connection stopped reading because queued bytes passed the high-water mark"
    );
    describe_counter!(
        STORAGE_BATCHES_TOTAL,
        Unit::Count,
        "Write batches committed to storage (group commit)"
    );
    describe_histogram!(
        STORAGE_BATCH_REQUESTS,
        Unit::Count,
        "Write requests folded into one storage batch"
    );
    describe_histogram!(
        STORAGE_WRITE_SECONDS,
        Unit::Seconds,
        "Time to write (and with durability = fsync, sync) one storage batch"
    );
    describe_counter!(
        STORAGE_WRITE_ERRORS_TOTAL,
        Unit::Count,
        "Storage batches that failed; their clients were refused"
    );
    describe_counter!(
        STORAGE_DECRYPT_FAILURES_TOTAL,
        Unit::Count,
        "Stored records skipped because they failed authentication (altered, moved, or sealed with another key)"
    );
    describe_gauge!(
        RECOVERY_SECONDS,
        Unit::Seconds,
        "Time the last start-up took to read back stored state"
    );
    describe_counter!(
        SESSIONS_EXPIRED_TOTAL,
        Unit::Count,
        "Offline sessions discarded because their expiry interval passed"
    );
}

pub fn storage_batch(requests: usize, seconds: f64, ok: bool) {
    counter!(STORAGE_BATCHES_TOTAL).increment(1);
    histogram!(STORAGE_BATCH_REQUESTS).record(requests as f64);
    histogram!(STORAGE_WRITE_SECONDS).record(seconds);
    if !ok {
        counter!(STORAGE_WRITE_ERRORS_TOTAL).increment(1);
    }
}

pub fn storage_decrypt_failure() {
    counter!(STORAGE_DECRYPT_FAILURES_TOTAL).increment(1);
}

pub fn recovery_seconds(seconds: f64) {
    gauge!(RECOVERY_SECONDS).set(seconds);
}

pub fn message_dropped(reason: &'static str) {
    TOTALS.messages_dropped.fetch_add(1, Ordering::Relaxed);
    match hot().and_then(|hot| hot.dropped.iter().find(|(r, _)| *r == reason)) {
        Some((_, counter)) => counter.increment(1),
        None => counter!(MESSAGES_DROPPED_TOTAL, "reason" => reason).increment(1),
    }
}

pub fn dead_lettered(reason: &'static str) {
    counter!(DEAD_LETTERS_TOTAL, "reason" => reason).increment(1);
}

pub fn shared_redelivered(count: usize) {
    counter!(SHARED_REDELIVERED_TOTAL).increment(count as u64);
}

pub fn publisher_paused() {
    counter!(PUBLISHERS_PAUSED_TOTAL).increment(1);
}

pub fn protocol_error(reason: &'static str) {
    counter!(PROTOCOL_ERRORS_TOTAL, "reason" => reason).increment(1);
}

pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A SUBSCRIBE filter refused by a limit (`reason`); ACL refusals count in `acl_denied`.
pub fn subscription_refused(reason: &'static str) {
    counter!(SUBSCRIPTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

pub fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
}

/// `action` is "publish", "subscribe", "deliver" or "will".
pub fn acl_denied(action: &'static str) {
    counter!(ACL_DENIED_TOTAL, "action" => action).increment(1);
}

pub fn handshake_failed(transport: &'static str, reason: &'static str) {
    counter!(HANDSHAKE_FAILURES_TOTAL, "transport" => transport, "reason" => reason).increment(1);
}

pub fn reloaded(file: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "rejected" };
    counter!(RELOADS_TOTAL, "file" => file, "outcome" => outcome).increment(1);
}

/// One connection's message and byte counts, accumulated locally and added to the shared
/// counters (atomics on cache lines every core writes) once per turn of its event loop.
/// 32-bit: one turn is one read or write and what it led to, and every connection holds one.
#[derive(Debug, Default)]
pub struct Traffic {
    pub received: [u32; 3],
    pub sent: [u32; 3],
    bytes_received: u32,
    bytes_sent: u32,
}

impl Traffic {
    pub fn add_bytes_received(&mut self, bytes: usize) {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.bytes_received = self.bytes_received.saturating_add(bytes);
    }

    pub fn add_bytes_sent(&mut self, bytes: usize) {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.bytes_sent = self.bytes_sent.saturating_add(bytes);
    }

    pub fn flush(&mut self, transport: &'static str) {
        let traffic = std::mem::take(self);
        for (qos, count) in (0u8..).zip(traffic.received) {
            if count > 0 {
                messages_received(qos, transport, u64::from(count));
            }
        }
        for (qos, count) in (0u8..).zip(traffic.sent) {
            if count > 0 {
                messages_sent(qos, transport, u64::from(count));
            }
        }
        if traffic.bytes_received > 0 {
            bytes_received(transport, u64::from(traffic.bytes_received));
        }
        if traffic.bytes_sent > 0 {
            bytes_sent(transport, u64::from(traffic.bytes_sent));
        }
    }
}

fn bytes_received(transport: &'static str, bytes: u64) {
    TOTALS.bytes_received.fetch_add(bytes, Ordering::Relaxed);
    match hot().filter(|_| transport == TCP) {
        Some(hot) => hot.bytes_received.increment(bytes),
        None => counter!(BYTES_RECEIVED_TOTAL, "transport" => transport).increment(bytes),
    }
}

fn bytes_sent(transport: &'static str, bytes: u64) {
    TOTALS.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    match hot().filter(|_| transport == TCP) {
        Some(hot) => hot.bytes_sent.increment(bytes),
        None => counter!(BYTES_SENT_TOTAL, "transport" => transport).increment(bytes),
    }
}

pub fn connection_opened() {
    counter!(CONNECTIONS_TOTAL).increment(1);
    gauge!(CONNECTIONS_CURRENT).increment(1.0);
}

pub fn connection_closed(reason: &'static str) {
    gauge!(CONNECTIONS_CURRENT).decrement(1.0);
    counter!(CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
}

fn messages_received(qos: u8, transport: &'static str, count: u64) {
    TOTALS.messages_received.fetch_add(count, Ordering::Relaxed);
    match hot().filter(|_| transport == TCP) {
        Some(hot) => hot.received[qos_index(qos)].increment(count),
        None => {
            counter!(MESSAGES_RECEIVED_TOTAL, "qos" => qos_label(qos), "transport" => transport)
                .increment(count)
        }
    }
}

fn messages_sent(qos: u8, transport: &'static str, count: u64) {
    TOTALS.messages_sent.fetch_add(count, Ordering::Relaxed);
    match hot().filter(|_| transport == TCP) {
        Some(hot) => hot.sent[qos_index(qos)].increment(count),
        None => counter!(MESSAGES_SENT_TOTAL, "qos" => qos_label(qos), "transport" => transport)
            .increment(count),
    }
}

fn qos_index(qos: u8) -> usize {
    usize::from(qos.min(2))
}

pub fn sessions_expired(count: usize) {
    counter!(SESSIONS_EXPIRED_TOTAL).increment(count as u64);
}

fn qos_label(qos: u8) -> &'static str {
    match qos {
        0 => "0",
        1 => "1",
        _ => "2",
    }
}
