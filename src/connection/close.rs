//! Closing a connection: a client's DISCONNECT, the v5 DISCONNECT the broker sends with its
//! reason, the last flush, shared-subscription deliveries handed to other members, the session
//! handed back (or ended) and the will published where one is due.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::establish::will_message;
use tokio_util::sync::CancellationToken;

use super::{linger, Close, Connection, CLOSE_FLUSH_TIMEOUT};
use crate::clock;
use crate::message::Delivery;
use crate::metrics;
use crate::protocol::encode;
use crate::protocol::{Disconnect, ProtocolError, ReasonCode};
use crate::session::inflight::Stage;
use crate::session::mailbox::is_spilled;
use crate::session::Detached;
use crate::storage::ops;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(super) fn handle_disconnect(&mut self, disconnect: Disconnect) -> Close {
        if let Some(expiry) = disconnect.session_expiry_interval {
            if self.session_expiry_at_connect == 0 && expiry != 0 {
                return Close::Protocol(ProtocolError::violation(
                    "[MQTT-3.14.2-2] session expiry set on DISCONNECT after 0 in CONNECT",
                ));
            }
            self.session_expiry = expiry.min(self.state.config.mqtt.max_session_expiry_interval);
        }
        if disconnect.reason != ReasonCode::DisconnectWithWill as u8 {
            // [MQTT-3.1.2-10] a normal DISCONNECT discards the will.
            self.will = None;
        }
        Close::ClientDisconnect
    }

    /// Tells a v5 client why it is being disconnected, flushes, hands the session back and
    /// publishes the will where one is due.
    pub(super) async fn finish(mut self, close: Close, shutdown: &CancellationToken) -> Close {
        self.traffic.flush(self.transport.label());
        self.drain_pending().await;
        self.state
            .publish
            .write_behind(std::mem::take(&mut self.releases))
            .await;
        if self.version.is_v5() {
            if let Some((reason, detail)) = close.disconnect_reason() {
                encode::disconnect(reason, detail, &mut self.write_buf);
            }
        }
        let flushed = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
            while !self.write_buf.is_empty() {
                self.stream.write_buf(&mut self.write_buf).await?;
            }
            self.stream.shutdown().await
        })
        .await;

        // Shared-subscription messages this client will not complete go to other members of
        // their groups: QoS 1 ones it has not acknowledged, and everything still queued. QoS 2
        // messages already sent stay with this session [MQTT-4.8.2-4].
        let unacked = self
            .session
            .inflight
            .take_where(|e| e.delivery.share.is_some() && e.stage == Stage::AwaitingPubAck)
            .into_iter()
            .map(|entry| {
                let mut delivery = entry.delivery;
                delivery.dup = true;
                delivery
            });
        let mut shared: Vec<Delivery> = unacked.collect();
        shared.extend(self.handle.mailbox.take_where(is_shared_unsent));
        let mut unplaced = self
            .state
            .publish
            .hand_over_shared(&self.handle, shared)
            .await;

        let will = self.will.take().map(|will| {
            let delay = will.delay_interval;
            (Arc::new(will_message(*will, &self.client_id)), delay)
        });
        let state = std::mem::take(&mut self.session);
        if let (Some(cluster), Some(ownership)) = (&self.state.cluster, self.ownership.take()) {
            let subscriptions = super::subscribe::subscription_list(&state);
            cluster
                .disconnected(
                    &self.client_id,
                    *ownership,
                    self.session_expiry,
                    subscriptions,
                )
                .await;
        }
        let detached = self.state.sessions.detach(
            &self.handle,
            self.connection_id,
            state,
            self.session_expiry,
            will,
        );
        // The cluster's record of the will stays while the session holds it pending here
        // (delay interval): should this node die, another publishes it.
        let will_pending = matches!(detached, Detached::Kept { will_now: None })
            && self.handle.inner().pending_will.is_some();
        let forget_will_in_cluster =
            self.will_in_cluster && !will_pending && !matches!(detached, Detached::Stale { .. });
        match detached {
            Detached::Kept { will_now } => {
                // Offline now: what was queued meanwhile may find an online member.
                let queued = self.handle.mailbox.take_where(is_shared_unsent);
                unplaced.extend(
                    self.state
                        .publish
                        .hand_over_shared(&self.handle, queued)
                        .await,
                );
                self.handle.mailbox.restore(unplaced);
                if self.handle.is_persistent() {
                    self.handle.mailbox.set_spillable(true);
                    if self.state.memory.under_pressure() && self.state.publish.is_durable() {
                        self.handle.mailbox.spill();
                    }
                    let pending = {
                        let inner = self.handle.inner();
                        inner
                            .pending_will
                            .as_ref()
                            .map(|w| (w.message.clone(), w.delay_interval, w.publish_at))
                    };
                    let op = ops::session_put(
                        &self.client_id,
                        self.handle.store_id,
                        self.version.level(),
                        self.session_expiry,
                        Some(clock::now()),
                        pending
                            .as_ref()
                            .map(|(message, delay, at)| ops::WillRecord {
                                message,
                                delay_interval: *delay,
                                publish_at: Some(*at),
                            }),
                    );
                    self.state.publish.write_behind(vec![op]).await;
                }
                if let Some(will) = will_now {
                    self.state.publish.publish(will).await;
                }
            }
            Detached::Ended(ended) => {
                for _ in &unplaced {
                    metrics::message_dropped(metrics::DROP_SESSION_ENDED);
                }
                let publish = &self.state.publish;
                publish.release(self.handle.store_id, &unplaced).await;
                publish.finish_ended_sessions(vec![ended]).await
            }
            Detached::Stale { will } => {
                self.handle.mailbox.restore(unplaced);
                if let Some(will) = will {
                    self.state.publish.publish(will).await;
                }
            }
        }
        // Once published or discarded here, not before.
        if let (Some(cluster), true) = (&self.state.cluster, forget_will_in_cluster) {
            cluster.forget_will(&self.client_id).await;
        }
        self.state
            .sessions
            .finished_closing(&self.handle, self.connection_id);
        // Last, so lingering delays no will or takeover; the FIN went out above.
        if matches!(flushed, Ok(Ok(()))) {
            linger::linger_close(&mut self.stream, shutdown).await;
        }
        close
    }
}

/// A delivery of a shared subscription not yet sent, which another member may take.
fn is_shared_unsent(delivery: &Delivery) -> bool {
    delivery.share.is_some() && !delivery.awaiting_pubcomp && !is_spilled(delivery)
}
