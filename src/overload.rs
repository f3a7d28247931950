//! What the broker does when producers are faster than consumers: the overflow policy of a full
//! session queue (chosen per topic filter) and the global memory guard that pauses reading from
//! publishers while queues hold too much.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::watch;

use crate::config::{OverflowPolicy, QueueConfig};
use crate::protocol::topic::filter_matches;

/// The overflow policy of each topic: the first rule whose filter matches, else the default.
#[derive(Debug)]
pub struct PolicyRules {
    default: OverflowPolicy,
    rules: Vec<(String, OverflowPolicy)>,
}

impl PolicyRules {
    pub fn new(config: &QueueConfig) -> Self {
        Self {
            default: config.policy,
            rules: config
                .rule
                .iter()
                .map(|rule| (rule.filter.clone(), rule.policy))
                .collect(),
        }
    }

    pub fn policy_for(&self, topic: &str) -> OverflowPolicy {
        self.rules
            .iter()
            .find(|(filter, _)| filter_matches(filter, topic))
            .map_or(self.default, |(_, policy)| *policy)
    }
}

/// Counts the bytes queued in every session's mailbox and raises a flag while they are above
/// the high-water mark, until they fall below the low-water mark (hysteresis, so publishers are
/// not paused and resumed on every message).
#[derive(Debug)]
pub struct MemoryGuard {
    queued: AtomicUsize,
    high: usize,
    low: usize,
    paused: watch::Sender<bool>,
    /// Mirrors `paused` so the per-message paths read an atomic, not the channel's lock.
    paused_now: AtomicBool,
}

impl MemoryGuard {
    pub fn new(high: usize, low: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            high,
            low,
            paused: watch::Sender::new(false),
            paused_now: AtomicBool::new(false),
        }
    }

    pub fn add(&self, bytes: usize) {
        let now = self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if now >= self.high && !self.is_paused() {
            self.paused.send_if_modified(|paused| {
                self.paused_now.store(true, Ordering::Relaxed);
                !std::mem::replace(paused, true)
            });
            tracing::warn!(
                queued_bytes = now,
                "queued messages passed the memory high-water mark: pausing publishers"
            );
        }
    }

    pub fn sub(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let now = self.queued.fetch_sub(bytes, Ordering::Relaxed) - bytes;
        if now <= self.low && self.is_paused() {
            // Checked again under the channel's lock: a racing `add` may have gone high again.
            let resumed = self.paused.send_if_modified(|paused| {
                let resume = *paused && self.queued.load(Ordering::Relaxed) <= self.low;
                if resume {
                    *paused = false;
                    self.paused_now.store(false, Ordering::Relaxed);
                }
                resume
            });
            if resumed {
                tracing::info!(
                    queued_bytes = now,
                    "queued messages below the low-water mark: publishers resume"
                );
            }
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether queued bytes are above the low-water mark: offline queues spill from here on,
    /// so that memory falls back before publishers have to be paused again.
    pub fn under_pressure(&self) -> bool {
        self.queued_bytes() > self.low
    }

    pub fn is_paused(&self) -> bool {
        self.paused_now.load(Ordering::Relaxed)
    }

    /// A receiver whose `changed()` wakes a paused publisher when reading may resume.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueRule;

    #[test]
    fn the_first_matching_rule_decides_and_the_default_covers_the_rest() {
        let config = QueueConfig {
            rule: vec![
                QueueRule {
                    filter: "alerts/#".into(),
                    policy: OverflowPolicy::Refuse,
                },
                QueueRule {
                    filter: "+/critical".into(),
                    policy: OverflowPolicy::Disconnect,
                },
                QueueRule {
                    filter: "alerts/critical".into(),
                    policy: OverflowPolicy::DropNewest,
                },
            ],
            ..QueueConfig::default()
        };
        let rules = PolicyRules::new(&config);
        assert_eq!(rules.policy_for("alerts/critical"), OverflowPolicy::Refuse);
        assert_eq!(
            rules.policy_for("site/critical"),
            OverflowPolicy::Disconnect
        );
        assert_eq!(rules.policy_for("telemetry/a"), OverflowPolicy::DropOldest);
    }

    #[test]
    fn the_guard_pauses_at_the_high_mark_and_resumes_below_the_low_mark() {
        let guard = MemoryGuard::new(100, 50);
        let mut paused = guard.subscribe();
        guard.add(99);
        assert!(!guard.is_paused());
        guard.add(1);
        assert!(guard.is_paused());
        assert!(paused.has_changed().unwrap());
        paused.borrow_and_update();
        guard.sub(40);
        assert!(
            guard.is_paused(),
            "60 bytes is still above the low-water mark"
        );
        guard.sub(10);
        assert!(!guard.is_paused());
        assert!(paused.has_changed().unwrap());
        assert_eq!(guard.queued_bytes(), 50);
    }
}
