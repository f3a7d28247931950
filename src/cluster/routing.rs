//! Messages between nodes: forwarding what is published here, subscribing to what this node's
//! clients want, and delivering what other nodes send.
//!
//! A QoS 0 message goes to its topic's subject, for plain subscriptions and shared groups. A
//! QoS 1/2 one reaches plain subscriptions through the replication log or directly (see
//! `consume`, `direct`); its copy here is for shared groups only, on a shared-only subject
//! (`subject::shared_only_topic_subject`) that a plain subscription does not match, so a node
//! with only plain subscriptions is not sent it.
//!
//! One message, one copy per node: NATS delivers a message once per matching subscription,
//! and a node holding overlapping filters (`a/+` and `a/#`) has several. Of the node's active
//! filters that match the topic, only the smallest (as a string) delivers it; the others skip
//! their copy. The choice depends on the topic alone, so every message of a topic comes through
//! the same subscription and keeps its order. The router then fans it out to every local
//! subscriber, whichever filter matched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{codec, pressure, subject, until_shutdown, Cluster};
use crate::clock;
use crate::message::Message;
use crate::metrics;
use crate::protocol::QoS;
use crate::router::Reach;
use crate::sync::{read, write};

/// How often subscriptions are compared with the router even when nothing was announced:
/// shared groups follow whether a member is online, which changes without a subscribe.
const RECHECK: Duration = Duration::from_secs(1);

/// How long a message waits to be taken by the NATS client before it is dropped.
const PUBLISH_WAIT: Duration = Duration::from_millis(500);

/// Sends every message published on this node to its topic's subject.
pub(super) async fn forward(
    cluster: Arc<Cluster>,
    mut outbox: mpsc::Receiver<Arc<Message>>,
    shutdown: CancellationToken,
) {
    while let Some(message) = until_shutdown(&shutdown, outbox.recv()).await {
        // `$SYS` topics describe one node; they stay on it.
        if message.topic.starts_with("$SYS/") {
            continue;
        }
        if !cluster.is_linked() {
            metrics::cluster_forward_dropped("link_down");
            continue;
        }
        if message.qos != QoS::AtMostOnce {
            pressure::wait_for_room(&cluster, &shutdown).await;
        }
        // QoS 1/2 reaches plain subscriptions through the log or directly: this copy is for
        // shared groups only, on subjects plain subscriptions do not listen to.
        let subject = if message.qos == QoS::AtMostOnce {
            subject::topic_subject(&cluster.base, &message.topic)
        } else {
            subject::shared_only_topic_subject(&cluster.base, &message.topic)
        };
        let payload = codec::encode(&message, clock::now());
        // The client's command queue stops moving while its connection is down and not yet
        // noticed (a silent network partition): dropping after a short wait keeps publishers on
        // this node from waiting behind a dead link.
        match tokio::time::timeout(PUBLISH_WAIT, cluster.client.publish(subject, payload)).await {
            Ok(Ok(())) => metrics::cluster_forwarded(metrics::OUT),
            Ok(Err(error)) => {
                metrics::cluster_forward_dropped("publish_failed");
                debug!(%error, "message not forwarded");
            }
            Err(_) => metrics::cluster_forward_dropped("link_down"),
        }
    }
}

/// A NATS subscription kind this node holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Interest {
    /// A plain filter some local session holds.
    Plain(Arc<str>),
    /// A shared group (`$share/<group>/<filter>`) with an online member here.
    Share(Arc<str>),
}

/// Keeps this node's NATS subscriptions equal to what its clients subscribed to.
pub(super) async fn follow_interest(
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut held: HashMap<Interest, Vec<JoinHandle<()>>> = HashMap::new();
    loop {
        reconcile(&cluster, &mut held, &shutdown, &tracker).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = cluster.router.interest_changed() => {}
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
    for (_, tasks) in held {
        tasks.iter().for_each(JoinHandle::abort);
    }
}

async fn reconcile(
    cluster: &Arc<Cluster>,
    held: &mut HashMap<Interest, Vec<JoinHandle<()>>>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (filters, version) = cluster.router.plain_interest();
    let mut wanted: HashSet<Interest> = filters.into_iter().map(Interest::Plain).collect();
    wanted.extend(
        cluster
            .router
            .shared_interest()
            .into_iter()
            .filter(|(_, online)| *online)
            .map(|(share, _)| Interest::Share(share)),
    );
    let gone: Vec<Interest> = held
        .keys()
        .filter(|i| !wanted.contains(i))
        .cloned()
        .collect();
    for interest in gone {
        if let Interest::Plain(filter) = &interest {
            write(&cluster.active).remove(filter, filter);
        }
        // Dropping a subscriber unsubscribes it.
        if let Some(tasks) = held.remove(&interest) {
            tasks.iter().for_each(JoinHandle::abort);
        }
    }
    let mut added = Vec::new();
    for interest in wanted {
        if held.contains_key(&interest) {
            continue;
        }
        match subscribe(cluster, &interest, shutdown, tracker).await {
            Ok(tasks) => {
                held.insert(interest.clone(), tasks);
                added.push(interest);
            }
            Err(error) => {
                metrics::cluster_error("subscribe");
                warn!(%error, ?interest, "cannot subscribe on NATS; retrying");
            }
        }
    }
    if added.iter().any(|i| matches!(i, Interest::Plain(_))) {
        // Once NATS has the subscriptions, they may take over topics from an overlapping
        // filter; before, that filter still delivers them.
        if let Err(error) = cluster.client.flush().await {
            debug!(%error, "flush after subscribing");
        }
        let mut active = write(&cluster.active);
        for interest in &added {
            if let Interest::Plain(filter) = interest {
                active.insert(filter, filter.clone(), ());
            }
        }
    }
    cluster.interest_applied.send_replace(version);
    let plain = held
        .keys()
        .filter(|i| matches!(i, Interest::Plain(_)))
        .count();
    metrics::cluster_subscriptions("plain", plain);
    metrics::cluster_subscriptions("shared", held.len() - plain);
}

async fn subscribe(
    cluster: &Arc<Cluster>,
    interest: &Interest,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Vec<JoinHandle<()>>, async_nats::SubscribeError> {
    let mut tasks = Vec::new();
    match interest {
        Interest::Plain(filter) => {
            for pattern in subject::filter_subjects(&cluster.base, filter) {
                let subscriber = cluster.client.subscribe(pattern).await?;
                tasks.push(tracker.spawn(receive(
                    cluster.clone(),
                    subscriber,
                    interest.clone(),
                    shutdown.clone(),
                )));
            }
        }
        Interest::Share(share) => {
            let Some(Ok((_, filter))) = crate::protocol::validate::split_shared(share) else {
                return Ok(tasks);
            };
            let queue = subject::token(share);
            let patterns = subject::filter_subjects(&cluster.base, filter)
                .into_iter()
                .chain(subject::shared_only_filter_subjects(&cluster.base, filter));
            for pattern in patterns {
                let subscriber = cluster
                    .client
                    .queue_subscribe(pattern, queue.clone())
                    .await?;
                tasks.push(tracker.spawn(receive(
                    cluster.clone(),
                    subscriber,
                    interest.clone(),
                    shutdown.clone(),
                )));
            }
        }
    }
    Ok(tasks)
}

/// Delivers what one NATS subscription receives.
async fn receive(
    cluster: Arc<Cluster>,
    mut subscriber: async_nats::Subscriber,
    interest: Interest,
    shutdown: CancellationToken,
) {
    while let Some(message) = until_shutdown(&shutdown, subscriber.next()).await {
        let Some(topic) = subject::subject_topic(&cluster.base, &message.subject) else {
            metrics::cluster_forward_dropped("undecodable");
            continue;
        };
        if let Interest::Plain(filter) = &interest {
            if !cluster.delivers(filter, &topic) {
                metrics::cluster_overlap_skipped();
                continue;
            }
        }
        let received = match codec::decode(&message.payload) {
            Ok(received) => received,
            Err(error) => {
                metrics::cluster_forward_dropped("undecodable");
                warn!(%error, %topic, "message from another node dropped");
                continue;
            }
        };
        // QoS 1/2 reaches plain subscriptions through the replication log or directly; a
        // copy sent here (by a node from before shared-only subjects) is for shared groups.
        if matches!(interest, Interest::Plain(_)) && received.message.qos != QoS::AtMostOnce {
            continue;
        }
        if let Ok(lag) = clock::now().duration_since(received.sent_at) {
            metrics::cluster_forward_lag(lag.as_secs_f64());
            cluster.pressure.observe(lag);
        }
        metrics::cluster_forwarded(metrics::IN);
        let message = Arc::new(received.message);
        let reach = match &interest {
            Interest::Plain(_) => Reach::Plain,
            Interest::Share(share) => Reach::Share(share),
        };
        cluster.pipeline.publish_remote(message, reach).await;
    }
}

impl Cluster {
    /// Whether the subscription for `filter` is the one that delivers messages on `topic`:
    /// the smallest active filter matching it.
    fn delivers(&self, filter: &Arc<str>, topic: &str) -> bool {
        let mut first: Option<Arc<str>> = None;
        read(&self.active).for_each_match(topic, |candidate, ()| {
            if first.as_ref().is_none_or(|f| candidate < f) {
                first = Some(candidate.clone());
            }
        });
        // A filter not active yet (subscribed, not flushed) leaves its topics to an active
        // filter overlapping it, if there is one.
        first.is_none_or(|first| first == *filter)
    }
}
