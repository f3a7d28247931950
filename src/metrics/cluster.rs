//! The cluster's metrics (`telemq_cluster_*`): the NATS link, forwarding, ownership,
//! replication before acknowledgement and replays. Created at zero when a node joins a cluster,
//! so a dashboard shows "none so far" rather than "no data"; never created on a single node.

use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

pub const CLUSTER_LINK_UP: &str = "telemq_cluster_link_up";
pub const CLUSTER_FORWARDED_TOTAL: &str = "telemq_cluster_forwarded_total";
pub const CLUSTER_FORWARD_DROPPED_TOTAL: &str = "telemq_cluster_forward_dropped_total";
pub const CLUSTER_FORWARD_LAG_SECONDS: &str = "telemq_cluster_forward_lag_seconds";
pub const CLUSTER_OVERLAP_SKIPPED_TOTAL: &str = "telemq_cluster_overlap_skipped_total";
pub const CLUSTER_OWNERSHIP_CONFLICTS_TOTAL: &str = "telemq_cluster_ownership_conflicts_total";
pub const CLUSTER_TAKEOVERS_TOTAL: &str = "telemq_cluster_takeovers_total";
pub const CLUSTER_SUBSCRIPTIONS: &str = "telemq_cluster_subscriptions";
pub const CLUSTER_ERRORS_TOTAL: &str = "telemq_cluster_errors_total";
pub const CLUSTER_REPLICATED_TOTAL: &str = "telemq_cluster_replicated_total";
pub const CLUSTER_REPLICATION_SECONDS: &str = "telemq_cluster_replication_seconds";
pub const CLUSTER_QUORUM: &str = "telemq_cluster_quorum";
pub const CLUSTER_REPLAYED_TOTAL: &str = "telemq_cluster_replayed_total";
pub const CLUSTER_LOG_ENTRIES_TOTAL: &str = "telemq_cluster_log_entries_total";
pub const CLUSTER_WILLS_ADOPTED_TOTAL: &str = "telemq_cluster_wills_adopted_total";
pub const CLUSTER_DIRECT_TOTAL: &str = "telemq_cluster_direct_total";

/// Results of a direct delivery (`cluster::direct`): queued by every other node, or handed to
/// the replication log after all (a node has a persistent session for it, or did not answer).
pub const DIRECT_QUEUED: usize = 0;
pub const DIRECT_LOGGED: usize = 1;
const DIRECT_RESULTS: [&str; 2] = ["queued", "logged"];

/// Label values of cluster forwarding.
pub const OUT: &str = "out";
pub const IN: &str = "in";

pub(super) fn describe_cluster() {
    describe_gauge!(
        CLUSTER_LINK_UP,
        Unit::Count,
        "1 while this node is connected to NATS, 0 while not (cluster mode only)"
    );
    describe_counter!(
        CLUSTER_FORWARDED_TOTAL,
        Unit::Count,
        "Messages sent to (out) and received from (in) other nodes"
    );
    describe_counter!(
        CLUSTER_FORWARD_DROPPED_TOTAL,
        Unit::Count,
        "Messages not forwarded to other nodes, by reason (link_down, queue_full, publish_failed, undecodable)"
    );
    describe_histogram!(
        CLUSTER_FORWARD_LAG_SECONDS,
        Unit::Seconds,
        "Time from a message leaving its node to reaching this one (clocks of both nodes)"
    );
    describe_counter!(
        CLUSTER_OVERLAP_SKIPPED_TOTAL,
        Unit::Count,
        "Copies of a message that arrived through a second overlapping subscription and were skipped"
    );
    describe_counter!(
        CLUSTER_OWNERSHIP_CONFLICTS_TOTAL,
        Unit::Count,
        "Connects refused because another node claimed the same client id at the same time"
    );
    describe_counter!(
        CLUSTER_TAKEOVERS_TOTAL,
        Unit::Count,
        "Sessions taken over from another node (from) or by another node (to)"
    );
    describe_gauge!(
        CLUSTER_SUBSCRIPTIONS,
        Unit::Count,
        "NATS subscriptions this node holds for its clients' filters, by kind (plain, shared)"
    );
    describe_counter!(
        CLUSTER_REPLICATED_TOTAL,
        Unit::Count,
        "Messages the cluster was asked to store with their replicas before acknowledging them, by result (stored, refused)"
    );
    describe_counter!(
        CLUSTER_LOG_ENTRIES_TOTAL,
        Unit::Count,
        "Entries this node wrote to the replication log; replicated messages per entry is the group commit's batch"
    );
    describe_counter!(
        CLUSTER_WILLS_ADOPTED_TOTAL,
        Unit::Count,
        "Wills of clients of a dead node that this node published"
    );
    describe_counter!(
        CLUSTER_DIRECT_TOTAL,
        Unit::Count,
        "QoS 1/2 messages for clean sessions only, handed to the other nodes directly instead of replicated, by result (queued; logged: a node had a persistent session for it, or did not answer)"
    );
    describe_histogram!(
        CLUSTER_REPLICATION_SECONDS,
        Unit::Seconds,
        "Time from handing a message to the cluster to its replicas holding it (or its refusal)"
    );
    describe_counter!(
        CLUSTER_REPLAYED_TOTAL,
        Unit::Count,
        "Replication log entries read for sessions that moved to this node (what they were owed)"
    );
    describe_gauge!(
        CLUSTER_QUORUM,
        Unit::Count,
        "1 while the last replicated write succeeded, 0 after one was refused (no quorum): QoS 1/2 publishes are being refused"
    );
    describe_counter!(
        CLUSTER_ERRORS_TOTAL,
        Unit::Count,
        "Cluster operations that failed, by operation"
    );
}

/// Creates every cluster series at zero when a node joins, so that dashboards and alerts see
/// "none so far" rather than "no data" for events that have not happened.
pub fn cluster_init() {
    for direction in [OUT, IN] {
        counter!(CLUSTER_FORWARDED_TOTAL, "direction" => direction).increment(0);
    }
    // Registered once, as the hot counters are: a labelled lookup per forwarded message costs
    // a key built and hashed each time.
    let _ = CLUSTER_HOT.set(ClusterHot {
        forwarded_out: counter!(CLUSTER_FORWARDED_TOTAL, "direction" => OUT),
        forwarded_in: counter!(CLUSTER_FORWARDED_TOTAL, "direction" => IN),
        lag: histogram!(CLUSTER_FORWARD_LAG_SECONDS),
        stored: counter!(CLUSTER_REPLICATED_TOTAL, "result" => "stored"),
        refused: counter!(CLUSTER_REPLICATED_TOTAL, "result" => "refused"),
        replication: histogram!(CLUSTER_REPLICATION_SECONDS),
        quorum: gauge!(CLUSTER_QUORUM),
        log_entries: counter!(CLUSTER_LOG_ENTRIES_TOTAL),
        direct: DIRECT_RESULTS.map(|result| counter!(CLUSTER_DIRECT_TOTAL, "result" => result)),
    });
    for result in DIRECT_RESULTS {
        counter!(CLUSTER_DIRECT_TOTAL, "result" => result).increment(0);
    }
    for result in ["stored", "refused"] {
        counter!(CLUSTER_REPLICATED_TOTAL, "result" => result).increment(0);
    }
    gauge!(CLUSTER_QUORUM).set(1.0);
    counter!(CLUSTER_REPLAYED_TOTAL).increment(0);
    counter!(CLUSTER_LOG_ENTRIES_TOTAL).increment(0);
    counter!(CLUSTER_WILLS_ADOPTED_TOTAL).increment(0);
    for reason in [
        "link_down",
        "queue_full",
        "link_closed",
        "publish_failed",
        "undecodable",
        "slow_consumer",
    ] {
        counter!(CLUSTER_FORWARD_DROPPED_TOTAL, "reason" => reason).increment(0);
    }
    counter!(CLUSTER_OVERLAP_SKIPPED_TOTAL).increment(0);
    counter!(CLUSTER_OWNERSHIP_CONFLICTS_TOTAL).increment(0);
    for direction in ["from", "to"] {
        counter!(CLUSTER_TAKEOVERS_TOTAL, "direction" => direction).increment(0);
    }
    for operation in [
        "claim",
        "subscribe",
        "retained_write",
        "retained_watch",
        "retained_queue_full",
        "log_read",
        "log_gap",
        "replay",
        "replay_truncated",
        "position",
        "will",
    ] {
        counter!(CLUSTER_ERRORS_TOTAL, "operation" => operation).increment(0);
    }
    for kind in ["plain", "shared"] {
        gauge!(CLUSTER_SUBSCRIPTIONS, "kind" => kind).set(0.0);
    }
}

pub fn cluster_link(up: bool) {
    gauge!(CLUSTER_LINK_UP).set(if up { 1.0 } else { 0.0 });
}

/// The per-message cluster metrics, registered when a node joins a cluster.
struct ClusterHot {
    forwarded_out: metrics::Counter,
    forwarded_in: metrics::Counter,
    lag: metrics::Histogram,
    stored: metrics::Counter,
    refused: metrics::Counter,
    replication: metrics::Histogram,
    quorum: metrics::Gauge,
    log_entries: metrics::Counter,
    /// By `DIRECT_*`.
    direct: [metrics::Counter; 2],
}

static CLUSTER_HOT: OnceLock<ClusterHot> = OnceLock::new();

pub fn cluster_forwarded(direction: &'static str) {
    match (CLUSTER_HOT.get(), direction) {
        (Some(hot), OUT) => hot.forwarded_out.increment(1),
        (Some(hot), _) => hot.forwarded_in.increment(1),
        (None, _) => counter!(CLUSTER_FORWARDED_TOTAL, "direction" => direction).increment(1),
    }
}

pub fn cluster_forward_dropped(reason: &'static str) {
    counter!(CLUSTER_FORWARD_DROPPED_TOTAL, "reason" => reason).increment(1);
}

pub fn cluster_forward_lag(seconds: f64) {
    match CLUSTER_HOT.get() {
        Some(hot) => hot.lag.record(seconds),
        None => histogram!(CLUSTER_FORWARD_LAG_SECONDS).record(seconds),
    }
}

/// One replication request answered: stored with its replicas, or refused.
pub fn cluster_replicated(stored: bool, seconds: f64) {
    let Some(hot) = CLUSTER_HOT.get() else {
        return;
    };
    if stored {
        hot.stored.increment(1);
    } else {
        hot.refused.increment(1);
    }
    hot.replication.record(seconds);
    hot.quorum.set(if stored { 1.0 } else { 0.0 });
}

/// One entry written to the replication log.
pub fn cluster_log_entry() {
    if let Some(hot) = CLUSTER_HOT.get() {
        hot.log_entries.increment(1);
    }
}

/// One message handed to the other nodes directly, by its result (`DIRECT_*`).
pub fn cluster_direct(result: usize) {
    if let Some(counter) = CLUSTER_HOT.get().and_then(|hot| hot.direct.get(result)) {
        counter.increment(1);
    }
}

pub fn cluster_will_adopted() {
    counter!(CLUSTER_WILLS_ADOPTED_TOTAL).increment(1);
}

pub fn cluster_replayed(entries: usize) {
    counter!(CLUSTER_REPLAYED_TOTAL).increment(entries as u64);
}

pub fn cluster_overlap_skipped() {
    counter!(CLUSTER_OVERLAP_SKIPPED_TOTAL).increment(1);
}

pub fn cluster_ownership_conflict() {
    counter!(CLUSTER_OWNERSHIP_CONFLICTS_TOTAL).increment(1);
}

/// `direction`: "from" (this node took a session over) or "to" (another node took it).
pub fn cluster_takeover(direction: &'static str) {
    counter!(CLUSTER_TAKEOVERS_TOTAL, "direction" => direction).increment(1);
}

pub fn cluster_subscriptions(kind: &'static str, count: usize) {
    gauge!(CLUSTER_SUBSCRIPTIONS, "kind" => kind).set(count as f64);
}

pub fn cluster_error(operation: &'static str) {
    counter!(CLUSTER_ERRORS_TOTAL, "operation" => operation).increment(1);
}
