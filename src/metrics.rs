//! Every metric the broker records, by name, with its description.
//!
//! Names carry the `telemq_` prefix; labels are low-cardinality (never a client id or topic).
//! Recording goes through the `metrics` facade, so without an installed exporter it costs an
//! atomic load and nothing else.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

pub const CONNECTIONS_TOTAL: &str = "telemq_connections_total";
pub const CONNECTIONS_CURRENT: &str = "telemq_connections_current";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "telemq_connections_closed_total";
pub const PROTOCOL_ERRORS_TOTAL: &str = "telemq_protocol_errors_total";
pub const MESSAGES_RECEIVED_TOTAL: &str = "telemq_messages_received_total";
pub const MESSAGES_SENT_TOTAL: &str = "telemq_messages_sent_total";
pub const MESSAGES_DROPPED_TOTAL: &str = "telemq_messages_dropped_total";
pub const SESSIONS_EXPIRED_TOTAL: &str = "telemq_sessions_expired_total";
pub const DEAD_LETTERS_TOTAL: &str = "telemq_dead_letters_total";
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

pub const STORAGE_BATCHES_TOTAL: &str = "telemq_storage_batches_total";
pub const STORAGE_BATCH_REQUESTS: &str = "telemq_storage_batch_requests";
pub const STORAGE_WRITE_SECONDS: &str = "telemq_storage_write_seconds";
pub const STORAGE_WRITE_ERRORS_TOTAL: &str = "telemq_storage_write_errors_total";
pub const RECOVERY_SECONDS: &str = "telemq_recovery_seconds";

pub fn describe() {
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
        "PUBLISH packets received from clients, by QoS"
    );
    describe_counter!(
        MESSAGES_SENT_TOTAL,
        Unit::Count,
        "PUBLISH packets sent to clients, by QoS"
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

pub fn recovery_seconds(seconds: f64) {
    gauge!(RECOVERY_SECONDS).set(seconds);
}

pub fn message_dropped(reason: &'static str) {
    counter!(MESSAGES_DROPPED_TOTAL, "reason" => reason).increment(1);
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

pub fn connection_opened() {
    counter!(CONNECTIONS_TOTAL).increment(1);
    gauge!(CONNECTIONS_CURRENT).increment(1.0);
}

pub fn connection_closed(reason: &'static str) {
    gauge!(CONNECTIONS_CURRENT).decrement(1.0);
    counter!(CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
}

pub fn message_received(qos: u8) {
    counter!(MESSAGES_RECEIVED_TOTAL, "qos" => qos_label(qos)).increment(1);
}

pub fn message_sent(qos: u8) {
    counter!(MESSAGES_SENT_TOTAL, "qos" => qos_label(qos)).increment(1);
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
