//! Shared subscriptions (`$share/<group>/<filter>`, MQTT 5 §4.8.2, also accepted from 3.1.1
//! clients, and `$queue/<filter>` for the group `queue`): each message matching a group's filter
//! goes to one member of the group, chosen by the group's strategy.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::trie::SubscriptionTrie;
use super::Subscriber;
use crate::config::{ShareStrategy, SharedConfig};
use crate::message::Message;
use crate::protocol::SubscriptionOptions;
use crate::session::SessionHandle;
use crate::sync::lock;

/// One shared subscription group on one filter.
#[derive(Debug)]
pub struct SharedGroup {
    /// The filter as subscribed (`$share/<group>/<filter>`), which names the group in
    /// deliveries so that they can be redelivered to another member.
    pub share: Arc<str>,
    strategy: ShareStrategy,
    members: Vec<Subscriber>,
    cursor: AtomicUsize,
    sticky: Mutex<Option<Arc<str>>>,
}

/// Members that may take a message now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Eligible {
    Online,
    /// No member is online: persistent members queue the message until they return.
    Persistent,
}

impl SharedGroup {
    fn new(share: Arc<str>, strategy: ShareStrategy) -> Self {
        Self {
            share,
            strategy,
            members: Vec::new(),
            cursor: AtomicUsize::new(0),
            sticky: Mutex::new(None),
        }
    }

    fn is_eligible(
        member: &Subscriber,
        eligible: Eligible,
        exclude: Option<&SessionHandle>,
    ) -> bool {
        let session = &member.session;
        if session.is_ended() || exclude.is_some_and(|excluded| std::ptr::eq(excluded, &**session))
        {
            return false;
        }
        match eligible {
            Eligible::Online => session.is_online(),
            Eligible::Persistent => session.is_persistent(),
        }
    }

    /// The member that gets `message`: an online one if any, else a persistent one; never
    /// `exclude` (a member handing its messages back).
    pub fn pick(&self, message: &Message, exclude: Option<&SessionHandle>) -> Option<&Subscriber> {
        for eligible in [Eligible::Online, Eligible::Persistent] {
            let candidates = || {
                self.members
                    .iter()
                    .filter(move |m| Self::is_eligible(m, eligible, exclude))
            };
            let count = candidates().count();
            if count == 0 {
                continue;
            }
            let index = match self.strategy {
                ShareStrategy::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed) % count,
                ShareStrategy::Random => rand::random_range(0..count),
                ShareStrategy::HashClient => hash_index(message.publisher.as_deref(), count),
                ShareStrategy::HashTopic => hash_index(Some(&*message.topic), count),
                ShareStrategy::LeastLoaded => {
                    // Ties rotate, so equally idle members share the load.
                    let start = self.cursor.fetch_add(1, Ordering::Relaxed) % count;
                    let loads: Vec<usize> = candidates().map(|m| m.session.mailbox.len()).collect();
                    (0..count)
                        .map(|i| (start + i) % count)
                        .min_by_key(|&i| loads[i])
                        .unwrap_or(0)
                }
                ShareStrategy::Sticky => {
                    let mut sticky = lock(&self.sticky);
                    let current = sticky
                        .as_ref()
                        .and_then(|id| candidates().position(|m| m.session.client_id == *id));
                    match current {
                        Some(index) => index,
                        None => {
                            let index = rand::random_range(0..count);
                            *sticky = candidates().nth(index).map(|m| m.session.client_id.clone());
                            index
                        }
                    }
                }
            };
            return candidates().nth(index);
        }
        None
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

fn hash_index(key: Option<&str>, count: usize) -> usize {
    // SipHash with fixed keys: the same key picks the same member in every run.
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % count as u64) as usize
}

/// Every shared subscription group, by filter and group name.
#[derive(Debug)]
pub struct SharedSubscriptions {
    groups: SubscriptionTrie<Arc<str>, SharedGroup>,
    /// Every group's `$share/<group>/<filter>`, which the trie cannot list.
    shares: BTreeSet<Arc<str>>,
    members: usize,
    config: SharedConfig,
}

impl SharedSubscriptions {
    pub fn new(config: SharedConfig) -> Self {
        Self {
            groups: SubscriptionTrie::new(),
            shares: BTreeSet::new(),
            members: 0,
            config,
        }
    }

    fn strategy_for(&self, group: &str) -> ShareStrategy {
        self.config
            .group
            .iter()
            .find(|rule| group.starts_with(&rule.prefix))
            .map_or(self.config.strategy, |rule| rule.strategy)
    }

    /// Adds or replaces a member of `group` on `filter`; returns the options it replaced.
    pub fn subscribe(
        &mut self,
        share: &str,
        group: &str,
        filter: &str,
        subscriber: Subscriber,
    ) -> Option<SubscriptionOptions> {
        let name: Arc<str> = group.into();
        if self.groups.get_mut(filter, &name).is_none() {
            let strategy = self.strategy_for(group);
            let share: Arc<str> = share.into();
            self.shares.insert(share.clone());
            self.groups
                .insert(filter, name.clone(), SharedGroup::new(share, strategy));
        }
        let shared = self.groups.get_mut(filter, &name)?;
        let client_id = &subscriber.session.client_id;
        match shared
            .members
            .iter_mut()
            .find(|m| m.session.client_id == *client_id)
        {
            Some(existing) => Some(std::mem::replace(existing, subscriber).options),
            None => {
                shared.members.push(subscriber);
                self.members += 1;
                None
            }
        }
    }

    /// Removes the member with `client_id` (only when it is `session`, if given).
    pub fn unsubscribe(
        &mut self,
        group: &str,
        filter: &str,
        client_id: &str,
        session: Option<&Arc<SessionHandle>>,
    ) -> bool {
        let name: Arc<str> = group.into();
        let Some(shared) = self.groups.get_mut(filter, &name) else {
            return false;
        };
        let Some(index) = shared.members.iter().position(|m| {
            &*m.session.client_id == client_id
                && session.is_none_or(|session| Arc::ptr_eq(session, &m.session))
        }) else {
            return false;
        };
        shared.members.remove(index);
        self.members -= 1;
        if shared.is_empty() {
            if let Some(group) = self.groups.remove(filter, &name) {
                self.shares.remove(&group.share);
            }
        }
        true
    }

    /// Calls `visit` with every group whose filter matches `topic`.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&SharedGroup)) {
        self.groups.for_each_match(topic, |_, group| visit(group));
    }

    /// The group a delivery came through, by its `$share/...` filter.
    pub fn group(&self, group: &str, filter: &str) -> Option<&SharedGroup> {
        self.groups.get(filter, &Arc::from(group))
    }

    /// Every group as `$share/<group>/<filter>`, with whether a member's client is online.
    pub fn shares(&self) -> Vec<(Arc<str>, bool)> {
        self.shares
            .iter()
            .map(|share| {
                let online = crate::protocol::validate::split_shared(share)
                    .and_then(Result::ok)
                    .and_then(|(group, filter)| self.group(group, filter))
                    .is_some_and(|group| {
                        group
                            .members
                            .iter()
                            .any(|m| m.session.is_online() && !m.session.is_ended())
                    });
                (share.clone(), online)
            })
            .collect()
    }

    /// Members of every group.
    pub fn len(&self) -> usize {
        self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members == 0
    }

    /// Number of groups.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }
}
