//! The connection's queue of work waiting for storage: acknowledgements leave only once what
//! they acknowledge is durable, and in the order the client's packets arrived [MQTT-4.6.0-2].
//! In a cluster, durable also means stored by the cluster with its replicas: a publish waits
//! for its local write and its replication, which run at the same time. The event loop polls
//! the front entry ([`first_completion`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Close, Connection};
use crate::message::Delivery;
use crate::metrics;
use crate::protocol::encode::{self, AckKind};
use crate::protocol::{ProtocolVersion, ReasonCode};
use crate::publish::{Planned, Replicated, ReplicationError, Stored};
use crate::storage::{Completion, Op, StorageError};

/// Something to finish once its storage write (and, in a cluster, its replication) completes.
pub(super) struct Pending {
    /// `None` when nothing had to be written, or once written.
    completion: Option<Completion>,
    /// `None` when nothing is replicated, or once replicated.
    replicated: Option<Replicated>,
    action: Action,
}

impl Pending {
    /// Whether something is still being written or replicated.
    pub(super) fn is_waiting(&self) -> bool {
        self.completion.is_some() || self.replicated.is_some()
    }

    /// Ready once the write and the replication both finished, or either failed.
    fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stored, Failure>> {
        if let Some(completion) = self.completion.as_mut() {
            let written = std::task::ready!(Pin::new(completion).poll(cx))
                .unwrap_or(Err(StorageError::Closed));
            self.completion = None;
            written.map_err(Failure::Storage)?;
        }
        if let Some(replicated) = self.replicated.as_mut() {
            let stored = std::task::ready!(Pin::new(replicated).poll(cx))
                .unwrap_or_else(|_| Err(ReplicationError::replicas("the cluster link closed")));
            self.replicated = None;
            return Poll::Ready(stored.map_err(Failure::Replication));
        }
        Poll::Ready(Ok(Stored::New))
    }

    /// The outcome if it is known now, without waiting.
    fn try_outcome(&mut self) -> Option<Result<Stored, Failure>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_outcome(&mut cx) {
            Poll::Ready(outcome) => Some(outcome),
            Poll::Pending => None,
        }
    }
}

/// Why pending work cannot be acknowledged.
pub(super) enum Failure {
    Storage(StorageError),
    Replication(ReplicationError),
}

pub(super) enum Action {
    /// Route a received message and acknowledge it.
    Publish {
        planned: Planned,
        ack: Option<(AckKind, u16, u8)>,
        qos2_packet_id: Option<u16>,
    },
    /// Send an encoded reply, then queue deliveries for this session (retained on subscribe).
    Reply {
        bytes: BytesMut,
        deliveries: Vec<Delivery>,
    },
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Queues `action` behind everything already waiting; when `ops` must be written first, it
    /// completes once they are durable. With nothing to wait for it runs at once.
    pub(super) async fn submit(&mut self, ops: Vec<Op>, action: Action) -> Result<(), Close> {
        self.submit_replicated(ops, None, action).await
    }

    /// As [`Connection::submit`], also waiting for `replicated`.
    pub(super) async fn submit_replicated(
        &mut self,
        ops: Vec<Op>,
        replicated: Option<Replicated>,
        action: Action,
    ) -> Result<(), Close> {
        let completion = self.state.publish.submit(ops).await;
        if completion.is_none() && replicated.is_none() && self.pending.is_empty() {
            return self.apply(action, Ok(Stored::New)).await;
        }
        self.pending.push_back(Pending {
            completion,
            replicated,
            action,
        });
        Ok(())
    }

    /// Sends a reply once `ops` are durable.
    pub(super) async fn reply_after(
        &mut self,
        ops: Vec<Op>,
        encode_reply: impl FnOnce(&mut BytesMut, ProtocolVersion),
    ) -> Result<(), Close> {
        let mut bytes = BytesMut::new();
        encode_reply(&mut bytes, self.version);
        self.submit(
            ops,
            Action::Reply {
                bytes,
                deliveries: Vec::new(),
            },
        )
        .await
    }

    /// Sends the acknowledgement `kind` once `ops` (and everything queued before) are durable.
    pub(super) async fn ack_after(
        &mut self,
        ops: Vec<Op>,
        kind: AckKind,
        packet_id: u16,
        reason: u8,
    ) -> Result<(), Close> {
        self.reply_after(ops, |out, version| {
            encode::ack(version, kind, packet_id, reason, out)
        })
        .await
    }

    /// Sends the acknowledgement `kind` once `ops` are durable and `recorded` (the cluster's
    /// record of the session's log position) succeeded; if it failed, the connection closes
    /// instead, and the client repeats the exchange on its next connection.
    pub(super) async fn ack_after_recorded(
        &mut self,
        ops: Vec<Op>,
        recorded: Option<Replicated>,
        kind: AckKind,
        packet_id: u16,
    ) -> Result<(), Close> {
        let mut bytes = BytesMut::new();
        encode::ack(self.version, kind, packet_id, 0, &mut bytes);
        self.submit_replicated(
            ops,
            recorded,
            Action::Reply {
                bytes,
                deliveries: Vec::new(),
            },
        )
        .await
    }

    /// The front of the queue finished: run it and everything behind it that is ready.
    pub(super) async fn complete_pending(
        &mut self,
        first: Result<Stored, Failure>,
    ) -> Result<(), Close> {
        let mut result = Some(first);
        while let Some(front) = self.pending.front_mut() {
            let outcome = match result.take() {
                Some(outcome) => outcome,
                None => match front.try_outcome() {
                    Some(outcome) => outcome,
                    None => break,
                },
            };
            let Some(pending) = self.pending.pop_front() else {
                break;
            };
            self.apply(pending.action, outcome).await?;
        }
        Ok(())
    }

    /// Waits for and runs everything still queued (the connection is closing; routing of
    /// messages already made durable must still happen).
    pub(super) async fn drain_pending(&mut self) {
        while let Some(mut pending) = self.pending.pop_front() {
            let outcome = std::future::poll_fn(|cx| pending.poll_outcome(cx)).await;
            let _ = self.apply(pending.action, outcome).await;
        }
    }

    async fn apply(
        &mut self,
        action: Action,
        outcome: Result<Stored, Failure>,
    ) -> Result<(), Close> {
        match action {
            Action::Publish {
                planned,
                ack,
                qos2_packet_id,
            } => {
                if let Err(Failure::Replication(error)) = outcome {
                    return self
                        .refuse_unreplicated(&planned, ack, qos2_packet_id, error)
                        .await;
                }
                if let Err(Failure::Storage(error)) = outcome {
                    tracing::error!(client_id = %self.client_id, %error, "message not accepted: storage failed");
                    metrics::message_dropped(metrics::DROP_STORAGE_FAILED);
                    if let Some(packet_id) = qos2_packet_id {
                        self.session.inbound_qos2.remove(&packet_id);
                    }
                    let Some((kind, packet_id, _)) = ack else {
                        return Ok(());
                    };
                    if !self.version.is_v5() {
                        // 3.1.1 cannot refuse a PUBLISH: closing makes the client retransmit.
                        return Err(Close::StorageFailure);
                    }
                    self.ack(kind, packet_id, ReasonCode::UnspecifiedError as u8);
                    return Ok(());
                }
                // Stored before by an attempt whose acknowledgement was lost with its node: it
                // was routed then.
                if outcome.is_ok_and(|stored| stored == Stored::New) {
                    self.state.publish.apply(planned).await;
                }
                if let Some((kind, packet_id, reason)) = ack {
                    self.ack(kind, packet_id, reason);
                }
                Ok(())
            }
            Action::Reply { bytes, deliveries } => {
                if let Err(Failure::Storage(error)) = outcome {
                    tracing::error!(client_id = %self.client_id, %error, "request not completed: storage failed");
                    return Err(Close::StorageFailure);
                }
                if let Err(Failure::Replication(error)) = outcome {
                    // A PUBREL or PUBCOMP whose record in the cluster failed: not sent. The
                    // client retries the exchange on its next connection.
                    tracing::warn!(client_id = %self.client_id, %error, "acknowledgement held back: not recorded in the cluster");
                    return Err(Close::NotReplicated);
                }
                self.write_buf.extend_from_slice(&bytes);
                self.state.publish.enqueue(&self.handle, deliveries).await;
                Ok(())
            }
        }
    }

    /// The cluster did not store a publish with its replicas: it is not routed, what was
    /// written for it here is undone, and the publisher is told. MQTT 5 gets the reason code
    /// 0x80 with a reason string and may retry; 3.1.1 cannot refuse a PUBLISH, so the
    /// connection closes and the client retransmits after reconnecting.
    async fn refuse_unreplicated(
        &mut self,
        planned: &Planned,
        ack: Option<(AckKind, u16, u8)>,
        qos2_packet_id: Option<u16>,
        error: ReplicationError,
    ) -> Result<(), Close> {
        tracing::warn!(client_id = %self.client_id, %error, topic = %planned.message.topic, "publish refused");
        self.state.publish.abandon(planned).await;
        if let Some(packet_id) = qos2_packet_id {
            self.forget_qos2(packet_id).await;
        }
        let Some((kind, packet_id, _)) = ack else {
            return Ok(());
        };
        if !self.version.is_v5() {
            return Err(Close::NotReplicated);
        }
        encode::ack_with_reason_string(
            self.version,
            kind,
            packet_id,
            ReasonCode::UnspecifiedError as u8,
            NOT_REPLICATED,
            &mut self.write_buf,
        );
        Ok(())
    }
}

/// The reason string of a publish refused for want of replicas.
const NOT_REPLICATED: &str = "the cluster cannot store messages with their replicas now; retry";

/// The outcome of the oldest pending entry; never resolves when it waits for nothing.
pub(super) fn first_completion(
    pending: &mut VecDeque<Pending>,
) -> impl Future<Output = Result<Stored, Failure>> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some(front) if front.is_waiting() => front.poll_outcome(cx),
        _ => Poll::Pending,
    })
}
