//! The connection's queue of work waiting for storage: acknowledgements leave only once what
//! they acknowledge is durable, and in the order the client's packets arrived [MQTT-4.6.0-2].
//! The event loop polls the front write's completion ([`first_completion`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::{Close, Connection};
use crate::message::Delivery;
use crate::metrics;
use crate::protocol::encode::{self, AckKind};
use crate::protocol::{ProtocolVersion, ReasonCode};
use crate::publish::Planned;
use crate::storage::{Completion, Op, StorageError};

/// Something to finish once its storage write completes.
pub(super) struct Pending {
    /// `None` when nothing had to be written but earlier work is still waiting.
    pub(super) completion: Option<Completion>,
    action: Action,
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
        let completion = self.state.publish.submit(ops).await;
        if completion.is_none() && self.pending.is_empty() {
            return self.apply(action, Ok(())).await;
        }
        self.pending.push_back(Pending { completion, action });
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

    /// The front of the queue finished writing: run it and everything behind it that is ready.
    pub(super) async fn complete_pending(
        &mut self,
        first: Result<(), StorageError>,
    ) -> Result<(), Close> {
        let mut result = Some(first);
        while let Some(front) = self.pending.front_mut() {
            let outcome = match (result.take(), front.completion.as_mut()) {
                (Some(outcome), _) => outcome,
                (None, None) => Ok(()),
                (None, Some(completion)) => match completion.try_recv() {
                    Ok(outcome) => outcome,
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => Err(StorageError::Closed),
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
        while let Some(pending) = self.pending.pop_front() {
            let outcome = match pending.completion {
                Some(completion) => completion.await.unwrap_or(Err(StorageError::Closed)),
                None => Ok(()),
            };
            let _ = self.apply(pending.action, outcome).await;
        }
    }

    async fn apply(
        &mut self,
        action: Action,
        outcome: Result<(), StorageError>,
    ) -> Result<(), Close> {
        match action {
            Action::Publish {
                planned,
                ack,
                qos2_packet_id,
            } => {
                if let Err(error) = outcome {
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
                self.state.publish.apply(planned).await;
                if let Some((kind, packet_id, reason)) = ack {
                    self.ack(kind, packet_id, reason);
                }
                Ok(())
            }
            Action::Reply { bytes, deliveries } => {
                if let Err(error) = outcome {
                    tracing::error!(client_id = %self.client_id, %error, "request not completed: storage failed");
                    return Err(Close::StorageFailure);
                }
                self.write_buf.extend_from_slice(&bytes);
                self.state.publish.enqueue(&self.handle, deliveries).await;
                Ok(())
            }
        }
    }
}

/// The result of the oldest pending storage write; never resolves when it has none.
pub(super) fn first_completion(
    pending: &mut VecDeque<Pending>,
) -> impl Future<Output = Result<(), StorageError>> + '_ {
    std::future::poll_fn(
        move |cx| match pending.front_mut().and_then(|p| p.completion.as_mut()) {
            Some(completion) => Pin::new(completion)
                .poll(cx)
                .map(|result| result.unwrap_or(Err(StorageError::Closed))),
            None => Poll::Pending,
        },
    )
}
