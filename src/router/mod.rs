//! Routing of application messages: the subscription trie, the retained store and fan-out into
//! session mailboxes.
//!
//! Routing runs on the publisher's task. The trie is read under a short read lock that is never
//! held across an `.await`; each target gets an `Arc` of the same message.

pub mod retained;
pub mod trie;

use std::sync::{Arc, RwLock};

use crate::message::{Delivery, Message};
use crate::metrics;
use crate::protocol::{QoS, RetainHandling};
use crate::session::SessionHandle;
use crate::sync::{read, write};

use retained::RetainedTree;
use trie::SubscriptionTrie;

/// What a client asked for when it subscribed to one filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS granted.
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
    pub subscription_id: Option<u32>,
}

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

/// A session a message is routed to, with the delivery made for it.
#[derive(Debug)]
pub struct Target {
    pub session: Arc<SessionHandle>,
    pub delivery: Delivery,
}

#[derive(Debug)]
pub struct Router {
    subscriptions: RwLock<SubscriptionTrie<Arc<str>, Subscriber>>,
    retained: RwLock<RetainedTree<Arc<Message>>>,
    /// Whether QoS 0 messages are queued for sessions whose client is offline (the spec allows
    /// either; Mosquitto's default is not to).
    queue_qos0_offline: bool,
}

impl Router {
    pub fn new(queue_qos0_offline: bool) -> Self {
        Self {
            subscriptions: RwLock::new(SubscriptionTrie::new()),
            retained: RwLock::new(RetainedTree::new()),
            queue_qos0_offline,
        }
    }

    /// Finds every session `message` goes to and makes its delivery (with a queue sequence
    /// number reserved). Nothing is queued yet: the caller persists what must be durable first,
    /// then calls [`Router::apply`].
    pub fn plan(&self, message: &Arc<Message>) -> Vec<Target> {
        let mut matches: Vec<Match> = Vec::new();
        {
            let trie = read(&self.subscriptions);
            trie.for_each_match(&message.topic, |client_id, subscriber| {
                let options = &subscriber.options;
                // [MQTT-3.8.3-3] No Local: not back to the publishing client.
                if options.no_local && message.publisher.as_deref() == Some(&**client_id) {
                    return;
                }
                matches.push(Match {
                    session: subscriber.session.clone(),
                    qos: message.qos.min(options.qos),
                    // [MQTT-3.3.1-12], [MQTT-3.3.1-13]; 3.1.1 always clears it [MQTT-3.3.1-9].
                    retain: options.retain_as_published && message.retain,
                    subscription_id: options.subscription_id,
                });
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
        targets
    }

    /// Updates the retained store and queues the planned deliveries. Returns the deliveries that
    /// could not be queued (full mailbox, session gone) so the caller can release their storage.
    pub fn apply(&self, message: &Arc<Message>, targets: Vec<Target>) -> Vec<Target> {
        if message.retain {
            self.store_retained(message);
        }
        let mut dropped = Vec::new();
        for target in targets {
            if let Err(delivery) = self.enqueue(&target.session, target.delivery) {
                dropped.push(Target {
                    session: target.session,
                    delivery,
                });
            }
        }
        dropped
    }

    /// Routes a message whose deliveries need no persistence; returns how many were queued.
    pub fn publish(&self, message: Arc<Message>) -> usize {
        let targets = self.plan(&message);
        let planned = targets.len();
        planned - self.apply(&message, targets).len()
    }

    /// Puts a delivery into a session's mailbox, counting it when it has to be dropped.
    pub fn enqueue(&self, session: &SessionHandle, delivery: Delivery) -> Result<(), Delivery> {
        if session.is_ended() {
            return Err(delivery);
        }
        session.mailbox.push(delivery).inspect_err(|_| {
            metrics::message_dropped(metrics::DROP_QUEUE_FULL);
        })
    }

    /// Adds a retained message recovered from storage.
    pub fn restore_retained(&self, message: Arc<Message>) {
        let topic = message.topic.clone();
        write(&self.retained).insert(&topic, message);
    }

    fn store_retained(&self, message: &Arc<Message>) {
        let mut retained = write(&self.retained);
        if message.payload.is_empty() {
            // [MQTT-3.3.1-10] an empty retained message clears the topic and is not stored
            // [MQTT-3.3.1-11].
            retained.remove(&message.topic);
        } else {
            // [MQTT-3.3.1-5] replaces any retained message on the topic.
            retained.insert(&message.topic, message.clone());
        }
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
        write(&self.subscriptions)
            .insert(
                filter,
                session.client_id.clone(),
                Subscriber {
                    session: session.clone(),
                    options,
                },
            )
            .map(|previous| previous.options)
    }

    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &str) -> bool {
        write(&self.subscriptions)
            .remove(filter, client_id)
            .is_some()
    }

    /// Removes `session`'s subscription on `filter`, but not one a newer session of the same
    /// client id has made since.
    pub fn unsubscribe_session(&self, session: &Arc<SessionHandle>, filter: &str) {
        let mut trie = write(&self.subscriptions);
        let owned = trie
            .get_mut(filter, &session.client_id)
            .is_some_and(|subscriber| Arc::ptr_eq(&subscriber.session, session));
        if owned {
            trie.remove(filter, &session.client_id);
        }
    }

    pub fn subscription_count(&self) -> usize {
        read(&self.subscriptions).len()
    }
}
