//! Outbound delivery: the session's mailbox drained into the write buffer within the client's
//! receive window (expiry, ACL read check, maximum packet size, topic aliases), and the
//! client's PUBACK / PUBREC / PUBCOMP completing what was sent.

use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{Close, Connection, WRITE_HIGH_WATER};
use crate::clock;
use crate::message::Delivery;
use crate::metrics;
use crate::protocol::encode::{self, AckKind, OutgoingPublish};
use crate::protocol::{QoS, ReasonCode};
use crate::publish;
use crate::session::inflight::{packet_id_for, OutboundEntry, PubRecOutcome, Stage};
use crate::storage::ops;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Moves deliveries from the mailbox into the write buffer while the client's receive window
    /// and the buffer allow.
    pub(super) fn fill_from_mailbox(&mut self) {
        self.refresh_acl();
        let now = clock::now();
        let mut expired = Vec::new();
        while self.write_buf.len() < WRITE_HIGH_WATER {
            let window_full = self.session.inflight.len() >= usize::from(self.send_quota);
            let inflight = &self.session.inflight;
            let Some(delivery) = self.handle.mailbox.pop_if(|d| {
                d.qos == QoS::AtMostOnce
                    || (!window_full && !inflight.is_in_use(packet_id_for(d.seq)))
            }) else {
                break;
            };
            let at_most_once = delivery.qos == QoS::AtMostOnce;
            let log_seq = delivery.log_seq;
            match self.send_delivery(delivery, now) {
                Some(dropped) => {
                    self.handle.log_done(&dropped);
                    expired.push(dropped);
                }
                None if at_most_once => {
                    if let Some(seq) = log_seq {
                        self.handle.log().done_at(seq);
                    }
                }
                None => {}
            }
        }
        let store_id = self.handle.store_id;
        self.releases.extend(
            expired
                .iter()
                .filter_map(|delivery| ops::release(store_id, delivery, true)),
        );
    }

    /// Encodes one delivery; returns it back if it was dropped instead (expired, too large).
    fn send_delivery(&mut self, delivery: Delivery, now: SystemTime) -> Option<Delivery> {
        let message = delivery.message.clone();
        let Ok(message_expiry_interval) = message.remaining_expiry(now) else {
            // [MQTT-3.3.2-5] expired messages are not delivered.
            self.state
                .publish
                .drop_one(&self.handle, &delivery, metrics::DROP_EXPIRED);
            return Some(delivery);
        };
        if self
            .access
            .as_ref()
            .is_some_and(|access| !access.acl.may_read(&message.topic))
        {
            // Subscriptions are checked when made, but a deny rule may cover part of one, and
            // a reload may have narrowed the rules since.
            metrics::acl_denied("deliver");
            metrics::message_dropped(metrics::DROP_NOT_AUTHORIZED);
            return Some(delivery);
        }
        let stage = match delivery.qos {
            QoS::AtMostOnce => None,
            _ if delivery.awaiting_pubcomp => Some(Stage::AwaitingPubComp),
            QoS::AtLeastOnce => Some(Stage::AwaitingPubAck),
            QoS::ExactlyOnce => Some(Stage::AwaitingPubRec),
        };
        let packet_id = if stage.is_some() {
            packet_id_for(delivery.seq)
        } else {
            0
        };
        if stage == Some(Stage::AwaitingPubComp) {
            // Recovered past PUBREC: only the release is repeated.
            self.ack(AckKind::PubRel, packet_id, 0);
            self.session.inflight.push(OutboundEntry {
                packet_id,
                stage: Stage::AwaitingPubComp,
                delivery,
            });
            return None;
        }
        let mut publish = OutgoingPublish {
            topic: &message.topic,
            qos: delivery.qos,
            retain: delivery.retain,
            dup: delivery.dup && stage.is_some(),
            packet_id,
            payload: &message.payload,
            properties: &message.properties,
            message_expiry_interval,
            topic_alias: None,
            subscription_ids: &delivery.subscription_ids,
        };
        if encode::publish_size(self.version, &publish) > self.client_max_packet_size as usize {
            // [MQTT-3.1.2-25] discarded as if delivered.
            metrics::message_dropped(metrics::DROP_TOO_LARGE_FOR_CLIENT);
            return Some(delivery);
        }
        // Aliases are assigned only once the packet is certain to be sent: an alias the client
        // never saw would make every later use of it unresolvable.
        if self.version.is_v5() && self.client_topic_alias_max > 0 {
            let outbound = &mut self.aliases.get_or_insert_with(Box::default).outbound;
            match outbound.get(&message.topic) {
                Some(&alias) => {
                    publish.topic = "";
                    publish.topic_alias = Some(alias);
                }
                None if outbound.len() < usize::from(self.client_topic_alias_max) => {
                    // [MQTT-3.3.2-12]: aliases stay within the client's Topic Alias Maximum.
                    let alias = outbound.len() as u16 + 1;
                    outbound.insert(message.topic.clone(), alias);
                    publish.topic_alias = Some(alias);
                }
                None => {}
            }
        }
        encode::publish(self.version, &publish, &mut self.write_buf);
        self.traffic.sent[usize::from(delivery.qos as u8)] += 1;
        if let Some(stage) = stage {
            self.session.inflight.push(OutboundEntry {
                packet_id,
                stage,
                delivery,
            });
        }
        None
    }

    /// PUBACK: the QoS 1 delivery is complete.
    pub(super) async fn handle_puback(&mut self, packet_id: u16) {
        match self.session.inflight.on_puback(packet_id) {
            Some(entry) => self.release(&entry.delivery).await,
            None => {
                debug!(client_id = %self.client_id, packet_id, "PUBACK for no in-flight QoS 1 message")
            }
        }
    }

    /// PUBREC: the QoS 2 delivery moves on to PUBREL, once the move is durable; a PUBREC with
    /// an error code ends it [MQTT-4.3.3-?].
    pub(super) async fn handle_pubrec(&mut self, packet_id: u16, reason: u8) -> Result<(), Close> {
        match self.session.inflight.on_pubrec(packet_id, reason >= 0x80) {
            (PubRecOutcome::Release, _) => {
                let store_id = self.handle.store_id;
                let handle = &self.handle;
                let mut completed = None;
                let batch = self
                    .session
                    .inflight
                    .get_mut(packet_id)
                    .map(|entry| {
                        match entry.delivery.log_seq.take() {
                            // The client has the message: wherever the session goes, the
                            // log's copy must not reach it again as a new message.
                            Some(seq) if seq > 0 => {
                                handle.log().complete(seq);
                                completed = Some(seq);
                            }
                            Some(seq) => handle.log().done_at(seq),
                            None => {}
                        }
                        publish::pubrec_ops(store_id, &mut entry.delivery)
                    })
                    .unwrap_or_default();
                // In a cluster, PUBREL (after which the client forgets the packet id) waits
                // until the session's recorded position says the message is done.
                let recorded = match (&self.state.cluster, completed) {
                    (Some(cluster), Some(_)) => Some(cluster.record_position(&self.handle, None)),
                    _ => None,
                };
                self.ack_after_recorded(batch, recorded, AckKind::PubRel, packet_id)
                    .await?;
            }
            (PubRecOutcome::Refused, entry) => {
                if let Some(entry) = entry {
                    self.release(&entry.delivery).await;
                }
            }
            (PubRecOutcome::Unknown, _) => self.ack(
                AckKind::PubRel,
                packet_id,
                ReasonCode::PacketIdentifierNotFound as u8,
            ),
        }
        Ok(())
    }

    /// PUBCOMP: the QoS 2 delivery is complete.
    pub(super) async fn handle_pubcomp(&mut self, packet_id: u16) {
        match self.session.inflight.on_pubcomp(packet_id) {
            Some(entry) => self.release(&entry.delivery).await,
            None => {
                debug!(client_id = %self.client_id, packet_id, "PUBCOMP for no in-flight QoS 2 message")
            }
        }
    }

    /// Releases the storage of a finished delivery (written behind: losing it after a crash
    /// means a redelivery, which QoS 1 allows and QoS 2's PUBREL state covers).
    async fn release(&self, delivery: &Delivery) {
        self.handle.log_done(delivery);
        self.state
            .publish
            .release(self.handle.store_id, [delivery])
            .await;
    }
}
