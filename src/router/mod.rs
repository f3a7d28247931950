//! Routing of application messages: the subscription trie, the retained store and fan-out into
//! session mailboxes.
//!
//! Routing runs on the publisher's task. The trie is read under a short read lock that is never
//! held across an `.await`; each target gets an `Arc` of the same message.

pub mod retained;
pub mod shared;
pub mod trie;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::config::OverflowPolicy;
use crate::message::{Delivery, Message};
use crate::metrics;
use crate::overload::PolicyRules;
use crate::protocol::validate::split_shared;
use crate::protocol::{QoS, SubscriptionOptions};
use crate::session::{Kick, Pushed, SessionHandle};
use crate::sync::{read, write};

use retained::RetainedTree;
use shared::SharedSubscriptions;
use trie::SubscriptionTrie;

#[derive(Debug)]
pub struct Subscriber {
    pub session: Arc<SessionHandle>,
    pub options: SubscriptionOptions,
}

/// One matching subscription while a message is being routed.
struct Match {
    session: Arc<SessionHandle>,
    qos: QoS,
    retain: bool,
    subscription_id: Option<u32>,
}

impl Match {
    fn new(message: &Message, subscriber: &Subscriber) -> Self {
        let options = &subscriber.options;
        Self {
            session: subscriber.session.clone(),
            qos: message.qos.min(options.qos),
            // [MQTT-3.3.1-12], [MQTT-3.3.1-13]; 3.1.1 always clears it [MQTT-3.3.1-9].
            retain: options.retain_as_published && message.retain,
            subscription_id: options.subscription_id,
        }
    }
}

/// A session a message is routed to, with the delivery made for it.
#[derive(Debug)]
pub struct Target {
    pub session: Arc<SessionHandle>,
    pub delivery: Delivery,
}

/// A delivery that did not reach its session, and why (a `metrics::DROP_*` reason). The
/// publish pipeline counts it, dead-letters it and releases its storage.
#[derive(Debug)]
pub struct Dropped {
    pub session: Arc<SessionHandle>,
    pub delivery: Delivery,
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Router {
    subscriptions: RwLock<SubscriptionTrie<Arc<str>, Subscriber>>,
    shared: RwLock<SharedSubscriptions>,
    /// Number of shared groups, read without the lock on the publish path.
    shared_groups: AtomicUsize,
    retained: RwLock<RetainedTree<Arc<Message>>>,
    /// Bytes the retained messages hold (`Message::footprint`), kept with the tree.
    retained_bytes: AtomicUsize,
    /// Whether QoS 0 messages are queued for sessions whose client is offline (the spec allows
    /// either; Mosquitto's default is not to).
    queue_qos0_offline: bool,
    policies: PolicyRules,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        Self {
            subscriptions: RwLock::new(SubscriptionTrie::new()),
            shared: RwLock::new(SharedSubscriptions::new(config.shared.clone())),
            shared_groups: AtomicUsize::new(0),
            retained: RwLock::new(RetainedTree::new()),
            retained_bytes: AtomicUsize::new(0),
            queue_qos0_offline: config.queue.qos0_offline,
            policies: PolicyRules::new(&config.queue),
        }
    }

    pub fn policy_for(&self, topic: &str) -> OverflowPolicy {
        self.policies.policy_for(topic)
    }

    /// Whether `message` must be refused to its publisher: its topic's policy is `refuse` and
    /// some target's queue has no room for it.
    pub fn must_refuse(&self, message: &Message, targets: &[Target]) -> bool {
        message.qos != QoS::AtMostOnce
            && !targets.is_empty()
            && self.policy_for(&message.topic) == OverflowPolicy::Refuse
            && targets
                .iter()
                .any(|target| !target.session.mailbox.has_room(target.delivery.footprint()))
    }

    /// Finds every session `message` goes to and makes its delivery (with a queue sequence
    /// number reserved). Nothing is queued yet: the caller persists what must be durable first,
    /// then calls [`Router::apply`].
    pub fn plan(&self, message: &Arc<Message>) -> Vec<Target> {
        let mut matches: Vec<Match> = Vec::new();
        {
            let trie = read(&self.subscriptions);
            trie.for_each_match(&message.topic, |client_id, subscriber| {
                // [MQTT-3.8.3-3] No Local: not back to the publishing client.
                if subscriber.options.no_local && message.publisher.as_deref() == Some(&**client_id)
                {
                    return;
                }
                matches.push(Match::new(message, subscriber));
            });
        }
        // A shared subscription is a subscription of its own: its member gets this copy
        // besides any copy through its plain subscriptions.
        let mut shared_matches = Vec::new();
        // Most brokers have no shared groups; then the second lock is not even taken.
        if self.shared_groups.load(Ordering::Acquire) > 0 {
            read(&self.shared).for_each_match(&message.topic, |group| {
                if let Some(member) = group.pick(message, None) {
                    shared_matches.push((group.share.clone(), Match::new(message, member)));
                }
            });
        }
        if matches.len() > 1 {
            // Overlapping subscriptions of one client yield one copy with the highest QoS and
            // every subscription identifier [MQTT-3.3.4-2], [MQTT-3.3.4-3].
            matches.sort_by_key(|m| Arc::as_ptr(&m.session) as usize);
        }
        let mut targets = Vec::with_capacity(matches.len());
        let mut i = 0;
        while i < matches.len() {
            let mut j = i + 1;
            while j < matches.len() && Arc::ptr_eq(&matches[j].session, &matches[i].session) {
                j += 1;
            }
            let group = &matches[i..j];
            let session = group[0].session.clone();
            let qos = group.iter().map(|m| m.qos).max().unwrap_or(QoS::AtMostOnce);
            i = j;
            if qos == QoS::AtMostOnce && !self.queue_qos0_offline && !session.is_online() {
                metrics::message_dropped(metrics::DROP_QOS0_OFFLINE);
                continue;
            }
            let mut subscription_ids: Vec<u32> =
                group.iter().filter_map(|m| m.subscription_id).collect();
            subscription_ids.sort_unstable();
            let delivery = Delivery::new(
                message.clone(),
                qos,
                group.iter().any(|m| m.retain),
                subscription_ids,
                session.next_seq(),
            );
            targets.push(Target { session, delivery });
        }
        for (share, found) in shared_matches {
            let mut delivery = Delivery::new(
                message.clone(),
                found.qos,
                found.retain,
                found.subscription_id.into_iter().collect(),
                found.session.next_seq(),
            );
            delivery.share = Some(share);
            targets.push(Target {
                session: found.session,
                delivery,
            });
        }
        targets
    }

    /// Updates the retained store and queues the planned deliveries. Returns the deliveries that
    /// could not be queued (full mailbox, session gone).
    pub fn apply(&self, message: &Arc<Message>, targets: Vec<Target>) -> Vec<Dropped> {
        if message.retain {
            self.store_retained(message);
        }
        let policy = self.policy_for(&message.topic);
        let mut dropped = Vec::new();
        for target in targets {
            let not_queued = self.enqueue(&target.session, target.delivery, policy);
            if !not_queued.is_empty() {
                dropped.extend(not_queued);
            }
        }
        dropped
    }

    /// Puts a delivery into a session's mailbox under the overflow `policy`. Returns what was
    /// dropped instead: the delivery, or older ones it displaced.
    pub fn enqueue(
        &self,
        session: &Arc<SessionHandle>,
        delivery: Delivery,
        policy: OverflowPolicy,
    ) -> Vec<Dropped> {
        let dropped = |delivery, reason| Dropped {
            session: session.clone(),
            delivery,
            reason,
        };
        if session.is_ended() {
            return vec![dropped(delivery, metrics::DROP_SESSION_ENDED)];
        }
        let Pushed {
            evicted,
            rejected,
            slow_consumer,
        } = session.mailbox.push(delivery, policy);
        if slow_consumer {
            session.kick_live(Kick::SlowConsumer);
        }
        // The common case, once per delivery: builds nothing.
        if evicted.is_empty() && rejected.is_none() {
            return Vec::new();
        }
        let mut out: Vec<Dropped> = evicted
            .into_iter()
            .map(|old| dropped(old, metrics::DROP_QUEUE_EVICTED))
            .collect();
        if let Some(rejected) = rejected {
            let reason = if slow_consumer {
                metrics::DROP_SLOW_CONSUMER
            } else {
                metrics::DROP_QUEUE_FULL
            };
            out.push(dropped(rejected, reason));
        }
        out
    }

    /// Another member of the shared group `share` to take over `delivery` from `from`, which
    /// is going away, with the QoS that member was granted.
    pub fn reroute_shared(
        &self,
        share: &str,
        message: &Message,
        from: &SessionHandle,
    ) -> Option<(Arc<SessionHandle>, SubscriptionOptions)> {
        let Some(Ok((group, filter))) = split_shared(share) else {
            return None;
        };
        let shared = read(&self.shared);
        let member = shared.group(group, filter)?.pick(message, Some(from))?;
        Some((member.session.clone(), member.options.clone()))
    }

    /// Adds a retained message recovered from storage.
    pub fn restore_retained(&self, message: Arc<Message>) {
        self.store_retained(&message);
    }

    fn store_retained(&self, message: &Arc<Message>) {
        let mut retained = write(&self.retained);
        let replaced = if message.payload.is_empty() {
            // [MQTT-3.3.1-10] an empty retained message clears the topic and is not stored
            // [MQTT-3.3.1-11].
            retained.remove(&message.topic)
        } else {
            // [MQTT-3.3.1-5] replaces any retained message on the topic.
            self.retained_bytes
                .fetch_add(message.footprint(), Ordering::Relaxed);
            retained.insert(&message.topic, message.clone())
        };
        if let Some(old) = replaced {
            self.retained_bytes
                .fetch_sub(old.footprint(), Ordering::Relaxed);
        }
    }

    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes.load(Ordering::Relaxed)
    }

    /// Retained messages matching `filter`, for delivery on subscribe [MQTT-3.3.1-6].
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut found = Vec::new();
        read(&self.retained).for_each_match(filter, |message| found.push(message.clone()));
        found
    }

    pub fn retained_count(&self) -> usize {
        read(&self.retained).len()
    }

    /// Adds or replaces `session`'s subscription on `filter` [MQTT-3.8.4-3]; returns the options it
    /// replaced.
    pub fn subscribe(
        &self,
        session: &Arc<SessionHandle>,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Option<SubscriptionOptions> {
        let subscriber = Subscriber {
            session: session.clone(),
            options,
        };
        if let Some(Ok((group, inner))) = split_shared(filter) {
            let mut shared = write(&self.shared);
            let replaced = shared.subscribe(filter, group, inner, subscriber);
            self.shared_groups
                .store(shared.group_count(), Ordering::Release);
            return replaced;
        }
        write(&self.subscriptions)
            .insert(filter, session.client_id.clone(), subscriber)
            .map(|previous| previous.options)
    }

    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &str) -> bool {
        if let Some(Ok((group, inner))) = split_shared(filter) {
            let mut shared = write(&self.shared);
            let removed = shared.unsubscribe(group, inner, client_id, None);
            self.shared_groups
                .store(shared.group_count(), Ordering::Release);
            return removed;
        }
        write(&self.subscriptions)
            .remove(filter, client_id)
            .is_some()
    }

    /// Removes `session`'s subscription on `filter`, but not one a newer session of the same
    /// client id has made since.
    pub fn unsubscribe_session(&self, session: &Arc<SessionHandle>, filter: &str) {
        if let Some(Ok((group, inner))) = split_shared(filter) {
            let mut shared = write(&self.shared);
            shared.unsubscribe(group, inner, &session.client_id, Some(session));
            self.shared_groups
                .store(shared.group_count(), Ordering::Release);
            return;
        }
        let mut trie = write(&self.subscriptions);
        let owned = trie
            .get_mut(filter, &session.client_id)
            .is_some_and(|subscriber| Arc::ptr_eq(&subscriber.session, session));
        if owned {
            trie.remove(filter, &session.client_id);
        }
    }

    /// Plain subscriptions plus members of shared groups.
    pub fn subscription_count(&self) -> usize {
        read(&self.subscriptions).len() + read(&self.shared).len()
    }

    pub fn shared_group_count(&self) -> usize {
        read(&self.shared).group_count()
    }
}
