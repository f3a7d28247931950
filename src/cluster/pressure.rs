//! Flow control between nodes. Core NATS has none: a node that receives faster than it can
//! deliver has messages dropped by its NATS client once the subscription's buffer is full.
//!
//! Each node watches how late the messages it receives are (from the sending node's clock to
//! its own, after they waited in its buffer). When the worst lag of a 50 ms period passes
//! [`CONGESTED`], the node says so on `<prefix>.pressure.<node>`, and says it again every
//! period while the lag stays above [`RELIEVED`]. Senders hold back QoS 1/2 messages while any
//! node's word is fresh, which fills their forward queues and so slows the publishers (their
//! PUBACKs wait) instead of losing what was acknowledged. QoS 0 messages are not held.
//!
//! A congested word that is not repeated expires after [`FRESH`], so a node that dies congested
//! holds no one back for long. The lag uses both nodes' clocks: a skew of the order of
//! [`RELIEVED`] makes the signal less exact, not wrong for long, since a sender waits at most
//! [`MOST_WAIT`] per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{subject, Cluster};

/// Lag above which a node asks senders to hold back.
pub(super) const CONGESTED: Duration = Duration::from_millis(100);
/// Lag below which it stops asking.
pub(super) const RELIEVED: Duration = Duration::from_millis(20);
/// How often a node judges its lag.
const PERIOD: Duration = Duration::from_millis(50);
/// How long a congested word holds senders back unless repeated.
const FRESH: Duration = Duration::from_millis(500);
/// The longest a sender holds one message back.
pub(super) const MOST_WAIT: Duration = Duration::from_secs(1);

/// This node's side: its worst lag, and whether other nodes asked it to hold back.
#[derive(Debug, Default)]
pub(super) struct Pressure {
    /// The worst lag seen this period, in microseconds.
    worst_lag_us: AtomicU64,
    /// Whether some node's congested word is fresh.
    hold_back: AtomicBool,
}

impl Pressure {
    /// Called for every message received from another node.
    pub(super) fn observe(&self, lag: Duration) {
        let us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        self.worst_lag_us.fetch_max(us, Ordering::Relaxed);
    }

    pub(super) fn holding_back(&self) -> bool {
        self.hold_back.load(Ordering::Acquire)
    }
}

/// The hysteresis of one node's own state.
#[derive(Debug, Default, PartialEq, Eq)]
struct Judge {
    congested: bool,
}

impl Judge {
    /// The state after a period whose worst lag was `worst`.
    fn after(&mut self, worst: Duration) -> bool {
        self.congested = if self.congested {
            worst > RELIEVED
        } else {
            worst > CONGESTED
        };
        self.congested
    }
}

/// Judges this node's lag every period and tells the others; follows what they say.
pub(super) async fn run(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let words = format!("{}.pressure.*", cluster.base);
    let own = format!(
        "{}.pressure.{}",
        cluster.base,
        subject::token(&cluster.node)
    );
    let mut heard = match cluster.client.subscribe(words).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            debug!(%error, "pressure words not followed");
            return;
        }
    };
    let mut judge = Judge::default();
    let mut congested_peers: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            word = heard.next() => {
                let Some(word) = word else { return };
                let from = word.subject.to_string();
                if word.payload.first() == Some(&1) {
                    congested_peers.insert(from, Instant::now());
                } else {
                    congested_peers.remove(&from);
                }
            }
            _ = tick.tick() => {
                let worst = Duration::from_micros(
                    cluster.pressure.worst_lag_us.swap(0, Ordering::Relaxed),
                );
                let was = judge.congested;
                let now = judge.after(worst);
                if now != was {
                    info!(lag_ms = worst.as_millis() as u64, congested = now, "inbound from other nodes");
                }
                if now || was {
                    let word = Bytes::from_static(if now { &[1] } else { &[0] });
                    if let Err(error) = cluster.client.publish(own.clone(), word).await {
                        debug!(%error, "pressure word not sent");
                    }
                }
            }
        }
        let fresh_after = Instant::now().checked_sub(FRESH);
        congested_peers.retain(|_, at| fresh_after.is_none_or(|limit| *at > limit));
        cluster
            .pressure
            .hold_back
            .store(!congested_peers.is_empty(), Ordering::Release);
    }
}

/// Waits while other nodes ask to hold back, at most [`MOST_WAIT`].
pub(super) async fn wait_for_room(cluster: &Cluster, shutdown: &CancellationToken) {
    if !cluster.pressure.holding_back() {
        return;
    }
    let until = Instant::now() + MOST_WAIT;
    while cluster.pressure.holding_back() && Instant::now() < until {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PERIOD / 10) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_begins_above_the_high_mark_and_ends_below_the_low_one() {
        let mut judge = Judge::default();
        assert!(
            !judge.after(Duration::from_millis(50)),
            "between the marks, from calm"
        );
        assert!(judge.after(Duration::from_millis(150)));
        assert!(
            judge.after(Duration::from_millis(50)),
            "between the marks, from congested"
        );
        assert!(!judge.after(Duration::from_millis(10)));
    }

    #[test]
    fn the_worst_lag_of_a_period_is_kept() {
        let pressure = Pressure::default();
        pressure.observe(Duration::from_millis(3));
        pressure.observe(Duration::from_millis(120));
        pressure.observe(Duration::from_millis(7));
        assert_eq!(pressure.worst_lag_us.load(Ordering::Relaxed), 120_000);
    }
}
