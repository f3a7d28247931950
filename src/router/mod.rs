//! Routing of application messages: the subscription trie, the retained store and fan-out into
//! session mailboxes.
//!
//! Routing runs on the publisher's task. The trie is read under a short read lock that is never
//! held across an `.await`; each target gets an `Arc` of the same message.

pub mod persistent;
pub mod retained;
pub mod shared;
pub mod trie;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use crate::config::Config;
use crate::config::OverflowPolicy;
use crate::message::{Delivery, Message};
use crate::metrics;
use crate::overload::PolicyRules;
use crate::protocol::validate::split_shared;
use crate::protocol::{QoS, SubscriptionOptions};
use crate::session::{Kick, Pushed, SessionHandle};
use crate::sync::{lock, read, write};

use retained::RetainedTree;
use shared::{SharedGroup, SharedSubscriptions};
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

/// Which subscriptions a message is routed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach<'a> {
    /// Plain subscriptions and every matching shared group: a message published on this node.
    All,
    /// As `All`, but not persistent sessions' plain subscriptions: a message published on this
    /// node that the cluster's replication log brings to those.
    AllButPersistent,
    /// Plain subscriptions only: a message another node forwarded (shared groups get theirs
    /// through the cluster's own queue groups).
    Plain,
    /// Plain subscriptions of sessions that are not persistent: a message another node sent
    /// this node directly (persistent sessions get theirs through the replication log).
    PlainNotPersistent,
    /// Persistent sessions' plain subscriptions only: a message published on this node, or sent
    /// here directly before, read back from the replication log.
    PlainPersistent,
    /// The plain subscriptions of one client id: a message replayed from the replication log
    /// into a session that moved here.
    Session(&'a str),
    /// One member of one shared group (`$share/<group>/<filter>`), which the cluster picked
    /// this node for.
    Share(&'a str),
}

/// The filters this node's clients hold, kept when a cluster needs to subscribe to them.
#[derive(Debug, Default)]
pub struct Interest {
    /// Plain filters, with how many sessions hold each.
    filters: HashMap<Arc<str>, usize>,
    /// Bumped on every change, so that a watcher can tell whether it is up to date.
    version: u64,
}

#[derive(Debug)]
pub struct Router {
    subscriptions: RwLock<SubscriptionTrie<Arc<str>, Subscriber>>,
    /// `Some` in a cluster: the filters other nodes must forward messages for.
    interest: Option<Mutex<Interest>>,
    /// Wakes the cluster when `interest` or the shared groups changed.
    interest_changed: Notify,
    /// Whether shared groups are served through the cluster (while it is reachable) rather than
    /// by picking among this node's members when the message is published.
    shares_in_cluster: AtomicBool,
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
            interest: config
                .cluster
                .enabled
                .then(|| Mutex::new(Interest::default())),
            interest_changed: Notify::new(),
            shares_in_cluster: AtomicBool::new(false),
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
        self.plan_reaching(message, Reach::All)
    }

    /// [`Router::plan`] for the subscriptions `reach` names.
    pub fn plan_reaching(&self, message: &Arc<Message>, reach: Reach<'_>) -> Vec<Target> {
        let mut matches: Vec<Match> = Vec::new();
        // A message for one shared group reaches no plain subscription.
        if !matches!(reach, Reach::Share(_)) {
            let trie = read(&self.subscriptions);
            trie.for_each_match(&message.topic, |client_id, subscriber| {
                // [MQTT-3.8.3-3] No Local: not back to the publishing client.
                if subscriber.options.no_local && message.publisher.as_deref() == Some(&**client_id)
                {
                    return;
                }
                let reached = match reach {
                    Reach::AllButPersistent | Reach::PlainNotPersistent => {
                        !subscriber.session.is_persistent()
                    }
                    Reach::PlainPersistent => subscriber.session.is_persistent(),
                    Reach::Session(only) => **client_id == *only,
                    _ => true,
                };
                if reached {
                    matches.push(Match::new(message, subscriber));
                }
            });
        }
        // A shared subscription is a subscription of its own: its member gets this copy
        // besides any copy through its plain subscriptions.
        let mut shared_matches = Vec::new();
        // Most brokers have no shared groups; then the second lock is not even taken.
        let mut take = |group: &SharedGroup| {
            if let Some(member) = group.pick(message, None) {
                shared_matches.push((group.share.clone(), Match::new(message, member)));
            }
        };
        match reach {
            Reach::All | Reach::AllButPersistent
                if self.shared_groups.load(Ordering::Acquire) > 0
                    && !self.shares_in_cluster.load(Ordering::Acquire) =>
            {
                read(&self.shared).for_each_match(&message.topic, take);
            }
            Reach::Share(share) => {
                if let Some(Ok((group, filter))) = split_shared(share) {
                    if let Some(found) = read(&self.shared).group(group, filter) {
                        take(found);
                    }
                }
            }
            _ => {}
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
        self.deliver(message, targets)
    }

    /// Queues the planned deliveries, leaving the retained store alone (a message from another
    /// node: the cluster keeps retained messages itself). Returns what could not be queued.
    pub fn deliver(&self, message: &Arc<Message>, targets: Vec<Target>) -> Vec<Dropped> {
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

    /// Adds a retained message recovered from storage or learnt from the cluster.
    pub fn restore_retained(&self, message: Arc<Message>) {
        self.store_retained(&message);
    }

    /// Clears the retained message on `topic` (the cluster learnt it was cleared).
    pub fn forget_retained(&self, topic: &str) {
        if let Some(old) = write(&self.retained).remove(topic) {
            self.retained_bytes
                .fetch_sub(old.footprint(), Ordering::Relaxed);
        }
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
            drop(shared);
            self.shared_interest_changed();
            return replaced;
        }
        let replaced = write(&self.subscriptions)
            .insert(filter, session.client_id.clone(), subscriber)
            .map(|previous| previous.options);
        if replaced.is_none() {
            self.note_interest(filter, true);
        }
        replaced
    }

    fn shared_interest_changed(&self) {
        if let Some(interest) = &self.interest {
            lock(interest).version += 1;
        }
        self.interest_changed.notify_one();
    }

    /// The version of the interest set now; see [`Router::plain_interest`].
    pub fn interest_version(&self) -> u64 {
        self.interest.as_ref().map_or(0, |i| lock(i).version)
    }

    fn note_interest(&self, filter: &str, added: bool) {
        let Some(interest) = &self.interest else {
            return;
        };
        let mut interest = lock(interest);
        if added {
            *interest.filters.entry(filter.into()).or_default() += 1;
        } else if let Some(count) = interest.filters.get_mut(filter) {
            *count -= 1;
            if *count == 0 {
                interest.filters.remove(filter);
            }
        }
        interest.version += 1;
        drop(interest);
        self.interest_changed.notify_one();
    }

    /// The plain filters this node's sessions hold and the version of that set; empty unless
    /// the router was made for a cluster.
    pub fn plain_interest(&self) -> (Vec<Arc<str>>, u64) {
        let Some(interest) = &self.interest else {
            return (Vec::new(), 0);
        };
        let interest = lock(interest);
        (interest.filters.keys().cloned().collect(), interest.version)
    }

    /// Every shared group (`$share/<group>/<filter>`) with whether a member is online.
    pub fn shared_interest(&self) -> Vec<(Arc<str>, bool)> {
        read(&self.shared).shares()
    }

    /// Resolves when subscriptions changed since the last call.
    pub async fn interest_changed(&self) {
        self.interest_changed.notified().await;
    }

    /// Serve shared groups through the cluster (`true`) or among this node's members.
    pub fn set_shares_in_cluster(&self, in_cluster: bool) {
        self.shares_in_cluster.store(in_cluster, Ordering::Release);
    }

    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &str) -> bool {
        if let Some(Ok((group, inner))) = split_shared(filter) {
            let mut shared = write(&self.shared);
            let removed = shared.unsubscribe(group, inner, client_id, None);
            self.shared_groups
                .store(shared.group_count(), Ordering::Release);
            drop(shared);
            self.shared_interest_changed();
            return removed;
        }
        let removed = write(&self.subscriptions)
            .remove(filter, client_id)
            .is_some();
        if removed {
            self.note_interest(filter, false);
        }
        removed
    }

    /// Removes `session`'s subscription on `filter`, but not one a newer session of the same
    /// client id has made since.
    pub fn unsubscribe_session(&self, session: &Arc<SessionHandle>, filter: &str) {
        if let Some(Ok((group, inner))) = split_shared(filter) {
            let mut shared = write(&self.shared);
            shared.unsubscribe(group, inner, &session.client_id, Some(session));
            self.shared_groups
                .store(shared.group_count(), Ordering::Release);
            drop(shared);
            self.shared_interest_changed();
            return;
        }
        let mut trie = write(&self.subscriptions);
        let owned = trie
            .get_mut(filter, &session.client_id)
            .is_some_and(|subscriber| Arc::ptr_eq(&subscriber.session, session));
        if owned {
            trie.remove(filter, &session.client_id);
            drop(trie);
            self.note_interest(filter, false);
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
