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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
struct Target {
    session: Arc<SessionHandle>,
    qos: QoS,
    retain: bool,
    subscription_id: Option<u32>,
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

    /// Routes `message` to every matching subscription and updates the retained store.
    /// Returns the number of sessions it was queued for.
    pub fn publish(&self, message: Arc<Message>) -> usize {
        if message.retain {
            self.store_retained(&message);
        }
        let mut targets: Vec<Target> = Vec::new();
        {
            let trie = read(&self.subscriptions);
            trie.for_each_match(&message.topic, |client_id, subscriber| {
                let options = &subscriber.options;
                // [MQTT-3.8.3-3] No Local: not back to the publishing client.
                if options.no_local && message.publisher.as_deref() == Some(&**client_id) {
                    return;
                }
                targets.push(Target {
                    session: subscriber.session.clone(),
                    qos: message.qos.min(options.qos),
                    // [MQTT-3.3.1-12], [MQTT-3.3.1-13]; 3.1.1 always clears it [MQTT-3.3.1-9].
                    retain: options.retain_as_published && message.retain,
                    subscription_id: options.subscription_id,
                });
            });
        }
        if targets.len() > 1 {
            // Overlapping subscriptions of one client yield one copy with the highest QoS and
            // every subscription identifier [MQTT-3.3.4-2], [MQTT-3.3.4-3].
            targets.sort_by_key(|t| Arc::as_ptr(&t.session) as usize);
        }
        let mut queued = 0;
        let mut i = 0;
        while i < targets.len() {
            let mut j = i + 1;
            while j < targets.len() && Arc::ptr_eq(&targets[j].session, &targets[i].session) {
                j += 1;
            }
            let group = &targets[i..j];
            let mut delivery = Delivery {
                message: message.clone(),
                qos: group.iter().map(|t| t.qos).max().unwrap_or(QoS::AtMostOnce),
                retain: group.iter().any(|t| t.retain),
                subscription_ids: group.iter().filter_map(|t| t.subscription_id).collect(),
            };
            delivery.subscription_ids.sort_unstable();
            if self.enqueue(&group[0].session, delivery) {
                queued += 1;
            }
            i = j;
        }
        queued
    }

    /// Puts a delivery into a session's mailbox, counting it when it has to be dropped.
    pub fn enqueue(&self, session: &SessionHandle, delivery: Delivery) -> bool {
        if delivery.qos == QoS::AtMostOnce && !self.queue_qos0_offline && !session.is_online() {
            metrics::message_dropped(metrics::DROP_QOS0_OFFLINE);
            return false;
        }
        if session.mailbox.push(delivery) {
            true
        } else {
            metrics::message_dropped(metrics::DROP_QUEUE_FULL);
            false
        }
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

    pub fn subscription_count(&self) -> usize {
        read(&self.subscriptions).len()
    }
}
