//! Replication before acknowledgement: every QoS 1/2 message published on this node is stored
//! in the JetStream stream `<prefix>_log`, and every retained change in the retained bucket,
//! before its publisher gets PUBACK / PUBREC. JetStream answers a publish once a majority of
//! the stream's replicas (`cluster.replicas`, each on another NATS server) hold it, so what a
//! node acknowledges is on more than one machine. When no majority answers (NATS lost its
//! quorum, or this node lost NATS), the publish is refused instead and its publisher retries
//! (see `connection::pending`); the next publish tries again, so service comes back by itself
//! when the quorum does.
//!
//! **Group commit.** JetStream's cost is per entry (a consensus round on every replica, one
//! delivery to each node's consumer), not per byte, so one entry carries every message that
//! queued while earlier entries were being stored: up to [`ENTRY_SPAN`] messages or
//! [`ENTRY_BYTES`]. At most [`IN_FLIGHT`] entries wait for their answers at once; a lone
//! message goes out at once, and under load entries fill up by themselves. Entries are sent in
//! the order their messages arrived, and answered in that order.
//!
//! **Log ids.** A message is known by its log id: its entry's stream sequence times
//! [`ENTRY_SPAN`], plus its place in the entry. Every node gives a message the same log id, so
//! session positions, completed QoS 2 deliveries and the packet ids derived from them hold
//! across nodes (see `cluster::positions`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{codec, subject, Cluster, ClusterError};
use crate::clock;
use crate::config::ClusterConfig;
use crate::metrics;
use crate::publish::{Replicate, ReplicationError, Stored};

/// Log entries waiting for JetStream's answer at once. Past it, requests wait in the link's
/// queue, and go out together in the next entry.
const IN_FLIGHT: usize = 64;

/// How long no new entry is sent after one failed (no stream leader, no link): meanwhile
/// publishes wait instead of failing at once, so refused publishers retrying at once do not
/// flood NATS while it elects a leader.
const FAILURE_PAUSE: Duration = Duration::from_millis(200);

/// Messages one log entry carries at most.
pub const ENTRY_SPAN: u64 = 64;

/// Encoded messages one entry carries at most, well under NATS's default payload limit (1 MiB);
/// a larger message goes alone.
pub(super) const ENTRY_BYTES: usize = 256 * 1024;

/// How long the log remembers the id of a QoS 2 message (see `cluster::positions`).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// The stream's subjects are `<prefix>.log.` and the topic's subject without its prefix, or
/// [`MIXED`] for an entry of several topics.
const LOG_ROOT: &str = "log";

/// The token after the log root of entries whose messages have different topics; a topic's
/// subject never has it there (see `subject`).
const MIXED: &str = "m";

/// Opens the log stream, creating it on first use (several nodes may race; the loser opens the
/// winner's).
pub(super) async fn open(
    jetstream: &jetstream::Context,
    config: &ClusterConfig,
    replicas: usize,
) -> Result<stream::Stream, ClusterError> {
    let name = format!("{}_log", config.prefix);
    if let Ok(stream) = jetstream.get_stream(&name).await {
        return Ok(stream);
    }
    let created = jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![log_root(&config.prefix)],
            num_replicas: replicas,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: config.log_max_age,
            max_bytes: i64::try_from(config.log_max_bytes).unwrap_or(i64::MAX),
            // A QoS 2 publisher whose node failed before PUBREC sends the message again to
            // another node, usually within seconds; within this window the log keeps one copy.
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await;
    match created {
        Ok(stream) => Ok(stream),
        Err(error) => jetstream
            .get_stream(&name)
            .await
            .map_err(|_| ClusterError::Bucket {
                bucket: name,
                reason: error.to_string(),
            }),
    }
}

/// The subject every log entry is under.
pub(super) fn log_root(base: &str) -> String {
    format!("{base}.{LOG_ROOT}.>")
}

/// The log subject of `topic`.
pub(super) fn log_subject(base: &str, topic: &str) -> String {
    let subject = subject::topic_subject(base, topic);
    format!("{base}.{LOG_ROOT}{}", &subject[base.len()..])
}

/// The log id of the message at `index` in the entry at stream sequence `seq`.
pub fn log_id(seq: u64, index: usize) -> u64 {
    seq * ENTRY_SPAN + index as u64
}

/// The highest log id the entry at `seq` can hold: a watermark at `seq`, as a log id.
pub fn last_id(seq: u64) -> u64 {
    seq * ENTRY_SPAN + (ENTRY_SPAN - 1)
}

/// The stream sequence of the entry holding log id `id`.
pub fn entry_of(id: u64) -> u64 {
    id / ENTRY_SPAN
}

/// A log entry: the publishing node's name (its own messages reach only its persistent
/// sessions through the log; the rest it delivered when they were published), then each
/// message as nodes send it to each other, behind its length.
pub(super) fn frame(node: &str, messages: &[Bytes]) -> Bytes {
    let node = &node.as_bytes()[..node.len().min(255)];
    let size: usize = messages.iter().map(|m| 4 + m.len()).sum();
    let mut out = BytesMut::with_capacity(1 + node.len() + size);
    // Node names are tokens, far shorter than 256 bytes (`config::cluster`).
    out.put_u8(node.len() as u8);
    out.put_slice(node);
    for message in messages {
        out.put_u32(message.len() as u32);
        out.put_slice(message);
    }
    out.freeze()
}

/// The publishing node and the messages of a log entry, in order; `None` if any is not
/// understood.
pub(super) fn unframe(data: &[u8]) -> Option<(&str, Vec<codec::Received>)> {
    let (&len, rest) = data.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let (node, mut rest) = rest.split_at(len);
    let node = std::str::from_utf8(node).ok()?;
    let mut messages = Vec::new();
    while !rest.is_empty() {
        let (size, tail) = rest.split_first_chunk::<4>()?;
        let size = u32::from_be_bytes(*size) as usize;
        if tail.len() < size {
            return None;
        }
        let (message, tail) = tail.split_at(size);
        messages.push(codec::decode(message).ok()?);
        rest = tail;
    }
    (!messages.is_empty() && messages.len() as u64 <= ENTRY_SPAN).then_some((node, messages))
}

/// Requests answered together: at most one log entry, and their retained writes.
struct Group {
    requests: Vec<Replicate>,
    /// The encoded messages that go into the entry (QoS 1/2), in request order.
    logged: Vec<Bytes>,
}

/// Takes from the front of `queued` the requests the next entry carries: consecutive ones up
/// to [`ENTRY_SPAN`] logged messages and [`ENTRY_BYTES`]; a request stored under an id
/// (`once`) goes alone, since JetStream keeps or drops a whole entry by its id.
fn take_group(queued: &mut VecDeque<Replicate>) -> Group {
    let now = clock::now();
    let mut group = Group {
        requests: Vec::new(),
        logged: Vec::new(),
    };
    let mut bytes = 0;
    while let Some(next) = queued.front() {
        let once = next.once.is_some();
        if once && !group.requests.is_empty() {
            break;
        }
        let encoded = next
            .logged
            .then(|| codec::encode_sent(&next.message, now, next.sent_directly));
        if let Some(encoded) = &encoded {
            let full = group.logged.len() as u64 >= ENTRY_SPAN
                || (!group.logged.is_empty() && bytes + encoded.len() > ENTRY_BYTES);
            if full {
                break;
            }
            bytes += encoded.len();
        }
        let Some(request) = queued.pop_front() else {
            break;
        };
        group.requests.push(request);
        group.logged.extend(encoded);
        if once {
            break;
        }
    }
    group
}

/// Answers replication requests in order, each once JetStream (and, for a retained change,
/// the retained bucket) has stored it.
pub(super) async fn replicate(
    cluster: Arc<Cluster>,
    mut requests: mpsc::Receiver<Replicate>,
    shutdown: CancellationToken,
) {
    let mut in_flight: FuturesOrdered<BoxFuture<'static, ()>> = FuturesOrdered::new();
    let mut queued = VecDeque::new();
    let failed_at = Arc::new(AtomicU64::new(0));
    loop {
        let pause = paused_for(&failed_at);
        while pause.is_none() && !queued.is_empty() && in_flight.len() < IN_FLIGHT {
            // What queued meanwhile goes out together.
            while queued.len() < ENTRY_SPAN as usize {
                match requests.try_recv() {
                    Ok(request) => queued.push_back(request),
                    Err(_) => break,
                }
            }
            let group = take_group(&mut queued);
            in_flight.push_back(cluster.start_replication(group, failed_at.clone()).await);
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            _ = tokio::time::sleep(pause.unwrap_or_default()), if pause.is_some() => {}
            request = requests.recv(), if queued.is_empty() => {
                let Some(request) = request else { break };
                queued.push_back(request);
            }
        }
    }
    // What is still waiting is answered "not stored" as its senders drop: nothing is
    // acknowledged that the cluster may not hold.
}

/// How much longer sending waits after the last failure at `failed_at` (monotonic ms; 0: none).
fn paused_for(failed_at: &AtomicU64) -> Option<Duration> {
    let at = failed_at.load(Ordering::Relaxed);
    let until = at + FAILURE_PAUSE.as_millis() as u64;
    let now = clock::monotonic_ms();
    (at > 0 && now < until).then(|| Duration::from_millis(until - now))
}

impl Cluster {
    /// Sends the writes of one group, in arrival order, and returns the future that answers
    /// its requests, in order, once they are stored.
    async fn start_replication(
        &self,
        group: Group,
        failed_at: Arc<AtomicU64>,
    ) -> BoxFuture<'static, ()> {
        let Group { requests, logged } = group;
        let started = Instant::now();
        let failed = move || failed_at.store(clock::monotonic_ms().max(1), Ordering::Relaxed);
        if !self.is_linked() {
            failed();
            answer_all(requests, started, &unavailable("no link to NATS"));
            return futures_util::future::ready(()).boxed();
        }
        let mut retained = Vec::with_capacity(requests.len());
        for request in &requests {
            retained.push(if request.message.retain {
                let (written, stored) = oneshot::channel();
                self.write_retained(&request.message, written).await;
                Some(stored)
            } else {
                None
            });
        }
        let once = requests.first().and_then(|request| request.once.clone());
        let ack = if logged.is_empty() {
            None
        } else {
            let subject = entry_subject(&self.base, &requests);
            let mut publish =
                jetstream::message::PublishMessage::build().payload(frame(&self.node, &logged));
            if let Some(id) = &once {
                publish = publish.message_id(id.clone());
            }
            match self.jetstream.send_publish(subject, publish).await {
                Ok(ack) => {
                    metrics::cluster_log_entry();
                    Some(ack)
                }
                Err(error) => {
                    failed();
                    answer_all(requests, started, &unavailable(&error.to_string()));
                    return futures_util::future::ready(()).boxed();
                }
            }
        };
        let log = self.log.clone();
        let written = self.log_written.clone();
        async move {
            let mut logged = Ok(Stored::New);
            if let Some(ack) = ack {
                let ack = ack.await;
                if let Ok(ack) = &ack {
                    // Before the answer: a direct delivery that follows it waits for this.
                    written.fetch_max(ack.sequence, Ordering::AcqRel);
                }
                match ack {
                    // A duplicate is taken as stored only once the log shows the earlier copy
                    // at the position it names: one still being proposed (no position yet), or
                    // proposed by a leader that lost it, is not stored.
                    Ok(ack) if ack.duplicate => {
                        let stored = ack.sequence > 0
                            && log.get_raw_message(ack.sequence).await.is_ok_and(|copy| {
                                copy.headers.get("Nats-Msg-Id").map(|id| id.as_str())
                                    == once.as_deref()
                            });
                        logged = if stored {
                            Ok(Stored::Again)
                        } else {
                            Err(unavailable("an earlier copy is not known to be stored"))
                        };
                    }
                    Ok(_) => {}
                    Err(error) => logged = Err(unavailable(&error.to_string())),
                }
                if logged.is_err() {
                    failed();
                }
            }
            for (request, retained) in requests.into_iter().zip(retained) {
                let mut outcome = logged.clone();
                if let Some(stored) = retained {
                    let written = stored
                        .await
                        .unwrap_or_else(|_| Err("the retained writer stopped".into()));
                    if let (Ok(_), Err(error)) = (&outcome, written) {
                        outcome = Err(unavailable(&error));
                    }
                }
                answer(request.done, started, outcome);
            }
        }
        .boxed()
    }
}

/// The subject of an entry: its topic's when all its messages share one, otherwise the subject
/// of mixed entries (what a filtered reader of the log, such as an operator's tool, can select
/// on).
fn entry_subject(base: &str, requests: &[Replicate]) -> String {
    let mut logged = requests
        .iter()
        .filter(|request| request.logged)
        .map(|request| &request.message);
    let first = logged.next().map(|message| &message.topic);
    match first {
        Some(topic) if logged.all(|message| &message.topic == topic) => log_subject(base, topic),
        _ => mixed_subject(base),
    }
}

/// The subject of entries whose messages have different topics.
pub(super) fn mixed_subject(base: &str) -> String {
    format!("{base}.{LOG_ROOT}.{MIXED}")
}

/// Answers every request of a group that was not sent: none of it is stored.
fn answer_all(requests: Vec<Replicate>, started: Instant, error: &ReplicationError) {
    for request in requests {
        answer(request.done, started, Err(error.clone()));
    }
}

fn unavailable(reason: &str) -> ReplicationError {
    ReplicationError::replicas(reason)
}

fn answer(
    done: oneshot::Sender<Result<Stored, ReplicationError>>,
    started: Instant,
    outcome: Result<Stored, ReplicationError>,
) {
    metrics::cluster_replicated(outcome.is_ok(), started.elapsed().as_secs_f64());
    if let Err(error) = &outcome {
        tracing::debug!(%error, "not replicated");
    }
    let _ = done.send(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::QoS;

    #[test]
    fn log_subjects_sit_under_their_own_root_and_keep_the_dollar_split() {
        assert_eq!(log_subject("telemq", "a/b"), "telemq.log.t.a.b");
        assert_eq!(log_subject("telemq", "$x/y"), "telemq.log.d.=24x.y");
    }

    fn message(topic: &str, qos: QoS, payload_len: usize) -> Message {
        Message::new(
            topic.into(),
            Bytes::from(vec![7u8; payload_len]),
            qos,
            false,
            Default::default(),
            Some("publisher".into()),
        )
    }

    fn request(message: Message, once: Option<&str>) -> Replicate {
        Replicate {
            logged: message.qos != QoS::AtMostOnce,
            message: Arc::new(message),
            once: once.map(Into::into),
            sent_directly: None,
            done: oneshot::channel().0,
        }
    }

    #[test]
    fn an_entry_names_its_node_and_carries_its_messages_in_order() {
        let now = clock::now();
        let messages = [
            message("a/b", QoS::ExactlyOnce, 7),
            message("c", QoS::AtLeastOnce, 0),
        ];
        let encoded: Vec<Bytes> = messages.iter().map(|m| codec::encode(m, now)).collect();
        let entry = frame("node-1", &encoded);
        let (node, received) = unframe(&entry).unwrap();
        assert_eq!(node, "node-1");
        assert_eq!(received.len(), 2);
        for (received, sent) in received.iter().zip(&messages) {
            assert_eq!(received.message.topic, sent.topic);
            assert_eq!(received.message.payload, sent.payload);
            assert_eq!(received.message.qos, sent.qos);
        }
        assert!(unframe(&entry[..entry.len() - 1]).is_none());
        assert!(unframe(&frame("node-1", &[])).is_none());
    }

    #[test]
    fn log_ids_order_messages_by_entry_then_place() {
        assert!(log_id(5, 0) > last_id(4));
        assert!(log_id(5, ENTRY_SPAN as usize - 1) == last_id(5));
        assert_eq!(entry_of(log_id(9, 3)), 9);
        assert_eq!(entry_of(last_id(9) + 1), 10);
    }

    #[test]
    fn a_group_takes_what_queued_up_to_its_limits_and_an_id_goes_alone() {
        let mut queued: VecDeque<Replicate> = VecDeque::new();
        for _ in 0..ENTRY_SPAN + 3 {
            queued.push_back(request(message("a", QoS::AtLeastOnce, 10), None));
        }
        assert_eq!(take_group(&mut queued).logged.len(), ENTRY_SPAN as usize);
        assert_eq!(take_group(&mut queued).logged.len(), 3);

        queued.push_back(request(message("a", QoS::AtLeastOnce, 10), None));
        queued.push_back(request(message("b", QoS::ExactlyOnce, 10), Some("id")));
        queued.push_back(request(message("c", QoS::AtLeastOnce, 10), None));
        assert_eq!(take_group(&mut queued).requests.len(), 1);
        let alone = take_group(&mut queued);
        assert_eq!(alone.requests.len(), 1);
        assert!(alone.requests[0].once.is_some());
        assert_eq!(take_group(&mut queued).requests.len(), 1);

        // A retained QoS 0 message rides along without a place in the entry.
        let mut retained = message("r", QoS::AtMostOnce, 1);
        retained.retain = true;
        queued.push_back(request(retained, None));
        queued.push_back(request(message("a", QoS::AtLeastOnce, 10), None));
        let group = take_group(&mut queued);
        assert_eq!((group.requests.len(), group.logged.len()), (2, 1));
        assert_eq!(entry_subject("t", &group.requests), "t.log.t.a");

        // Bytes: a large message closes the entry before it, and goes alone if it must.
        queued.push_back(request(message("a", QoS::AtLeastOnce, 10), None));
        queued.push_back(request(message("b", QoS::AtLeastOnce, ENTRY_BYTES), None));
        queued.push_back(request(message("c", QoS::AtLeastOnce, 10), None));
        assert_eq!(take_group(&mut queued).logged.len(), 1);
        assert_eq!(take_group(&mut queued).logged.len(), 1);
        let last = take_group(&mut queued);
        assert_eq!(last.logged.len(), 1);
        assert!(queued.is_empty());
    }

    #[test]
    fn an_entry_of_several_topics_goes_to_the_mixed_subject() {
        let requests = [
            request(message("a", QoS::AtLeastOnce, 1), None),
            request(message("b", QoS::AtLeastOnce, 1), None),
        ];
        assert_eq!(entry_subject("t", &requests), "t.log.m");
    }
}
