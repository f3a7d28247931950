//! Inbound application messages: a client's PUBLISH (topic aliases, limits, ACL, `$delayed`)
//! handed to the publish pipeline and acknowledged once durable, and its PUBREL.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::pending::Action;
use super::{Close, Connection};
use crate::clock;
use crate::delayed;
use crate::message::Message;
use crate::metrics;
use crate::protocol::encode::AckKind;
use crate::protocol::{ProtocolError, Publish, QoS, ReasonCode};
use crate::storage::{ops, Op};

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(super) async fn handle_publish(&mut self, publish: Publish) -> Result<(), Close> {
        self.traffic.received[usize::from(publish.qos as u8)] += 1;
        self.has_published = true;
        let config = &self.state.config.mqtt;
        let topic: Arc<str> = match publish.topic_alias {
            Some(alias) if alias > config.topic_alias_maximum => {
                return Err(Close::Protocol(ProtocolError::new(
                    ReasonCode::TopicAliasInvalid,
                    "[MQTT-3.3.2-9] topic alias greater than the broker's Topic Alias Maximum",
                )))
            }
            Some(alias) if publish.topic.is_empty() => match self
                .aliases
                .as_ref()
                .and_then(|aliases| aliases.inbound.get(&alias))
            {
                Some(topic) => topic.clone(),
                None => {
                    return Err(Close::Protocol(ProtocolError::violation(
                        "[MQTT-3.3.2-?] topic alias used before it was set",
                    )))
                }
            },
            Some(alias) => {
                let topic: Arc<str> = publish.topic.into();
                let aliases = self.aliases.get_or_insert_with(Box::default);
                aliases.inbound.insert(alias, topic.clone());
                topic
            }
            None => publish.topic.into(),
        };
        if publish.retain && !config.retain_available {
            return Err(Close::Protocol(ProtocolError::new(
                ReasonCode::RetainNotSupported,
                "[MQTT-3.3.1-?] RETAIN set although Retain Available is 0",
            )));
        }
        if publish.qos == QoS::ExactlyOnce {
            if self.session.inbound_qos2.contains_key(&publish.packet_id) {
                // A retransmission of a message already accepted: acknowledge it again (after
                // anything still being written), but do not deliver it twice [MQTT-4.3.3-9].
                return self
                    .ack_after(Vec::new(), AckKind::PubRec, publish.packet_id, 0)
                    .await;
            }
            if self.session.inbound_qos2.len() >= usize::from(config.receive_maximum) {
                return Err(Close::Protocol(ProtocolError::new(
                    ReasonCode::ReceiveMaximumExceeded,
                    "[MQTT-3.3.4-9] more unacknowledged QoS 2 PUBLISH than Receive Maximum",
                )));
            }
        }
        let delay = match delayed::parse(&topic, self.state.config.delayed.max_delay) {
            None => None,
            Some(Ok((seconds, inner))) => Some((seconds, Arc::<str>::from(inner))),
            Some(Err(_)) => {
                metrics::message_dropped(metrics::DROP_DELAYED_INVALID);
                return self
                    .refuse_publish(publish.qos, publish.packet_id, ReasonCode::TopicNameInvalid)
                    .await;
            }
        };
        let packet_id = publish.packet_id;
        let (topic, delay_seconds) = match delay {
            Some((seconds, inner)) => (inner, Some(seconds)),
            None => (topic, None),
        };
        if topic.split('/').count() > config.max_topic_levels {
            metrics::message_dropped(metrics::DROP_TOPIC_TOO_DEEP);
            return self
                .refuse_publish(publish.qos, packet_id, ReasonCode::TopicNameInvalid)
                .await;
        }
        self.refresh_acl();
        if self
            .access
            .as_ref()
            .is_some_and(|access| !access.acl.may_publish(&topic))
        {
            debug!(client_id = %self.client_id, %topic, "publish denied by the ACL");
            metrics::acl_denied("publish");
            metrics::message_dropped(metrics::DROP_NOT_AUTHORIZED);
            return self.deny_publish(publish.qos, packet_id).await;
        }
        let message = Arc::new(Message::new(
            topic,
            publish.payload,
            publish.qos,
            publish.retain,
            publish.properties,
            Some(self.client_id.clone()),
        ));
        if let Some(seconds) = delay_seconds {
            return self.hold_delayed(message, seconds, packet_id).await;
        }
        // Sent again to another node if this one fails before PUBREC (`replicate_qos2` below).
        let resendable = publish.qos == QoS::ExactlyOnce && self.handle.is_persistent();
        let mut planned = self.state.publish.plan(message, resendable);
        if self.state.publish.must_refuse(&planned) {
            // The topic's policy is `refuse` and a subscriber's queue is full: nothing is
            // routed, and the publisher is told to back off.
            metrics::message_dropped(metrics::DROP_QUOTA_EXCEEDED);
            return self
                .refuse_publish(publish.qos, publish.packet_id, ReasonCode::QuotaExceeded)
                .await;
        }
        // In a cluster, no subscriber here says nothing of the other nodes': the reason code
        // would be a guess, so it is not given.
        let reason = if planned.targets.is_empty() && self.state.cluster.is_none() {
            metrics::message_dropped(metrics::DROP_NO_SUBSCRIBERS);
            self.state
                .publish
                .dead_letter(&planned.message, metrics::DROP_NO_SUBSCRIBERS, None);
            ReasonCode::NoMatchingSubscribers as u8
        } else {
            0
        };
        let mut batch = std::mem::take(&mut planned.ops);
        let ack = ack_kind(publish.qos).map(|kind| (kind, packet_id, reason));
        let qos2_packet_id = (publish.qos == QoS::ExactlyOnce).then_some(packet_id);
        if let Some(packet_id) = qos2_packet_id {
            // Remembered now, so a retransmission arriving while this one is still being
            // written is recognised.
            self.remember_qos2(packet_id, &mut batch);
        }
        // In a cluster a QoS 1/2 publish is acknowledged once stored with its replicas. A QoS 0
        // retained change is replicated too, but nothing waits for it.
        let replicated = match (&self.state.cluster, qos2_packet_id) {
            // Stored once however often the client sends it, to whichever node.
            (Some(cluster), Some(packet_id)) if self.handle.is_persistent() => {
                Some(cluster.replicate_qos2(&self.handle, &planned.message, packet_id))
            }
            _ => self
                .state
                .publish
                .replicate(&planned)
                .await
                .filter(|_| ack.is_some()),
        };
        self.submit_replicated(
            batch,
            replicated,
            Action::Publish {
                planned,
                ack,
                qos2_packet_id,
            },
        )
        .await
    }

    /// Holds a `$delayed/<seconds>/<topic>` publish until it is due, acknowledging it once it
    /// is stored.
    async fn hold_delayed(
        &mut self,
        message: Arc<Message>,
        seconds: u32,
        packet_id: u16,
    ) -> Result<(), Close> {
        let qos = message.qos;
        let due = clock::now() + Duration::from_secs(u64::from(seconds));
        let op = match self.state.delayed.hold(message, due) {
            Ok(op) => op,
            Err(_) => {
                metrics::message_dropped(metrics::DROP_DELAYED_LIMIT);
                return self
                    .refuse_publish(qos, packet_id, ReasonCode::QuotaExceeded)
                    .await;
            }
        };
        let mut batch = Vec::new();
        if self.state.publish.is_durable() {
            batch.push(op);
        }
        let Some(kind) = ack_kind(qos) else {
            let reply = Action::Reply {
                bytes: BytesMut::new(),
                deliveries: Vec::new(),
            };
            return self.submit(batch, reply).await;
        };
        if qos == QoS::ExactlyOnce {
            self.remember_qos2(packet_id, &mut batch);
        }
        self.ack_after(batch, kind, packet_id, 0).await
    }

    /// Refuses a QoS 1/2 PUBLISH the broker cannot take now: MQTT 5 clients get `reason` in
    /// their PUBACK/PUBREC (which ends a QoS 2 exchange [MQTT-4.3.3-?]) and may retry; 3.1.1
    /// has no way to refuse, so the connection closes and the client retransmits later.
    async fn refuse_publish(
        &mut self,
        qos: QoS,
        packet_id: u16,
        reason: ReasonCode,
    ) -> Result<(), Close> {
        let Some(kind) = ack_kind(qos) else {
            return Ok(());
        };
        if !self.version.is_v5() {
            return Err(Close::Refused(reason));
        }
        self.ack_after(Vec::new(), kind, packet_id, reason as u8)
            .await
    }

    /// Answers a PUBLISH the ACL denies: MQTT 5 clients are told 0x87 [MQTT-3.3.4-?]; 3.1.1
    /// has no refusal, so it is acknowledged as if delivered and dropped, as Mosquitto does.
    async fn deny_publish(&mut self, qos: QoS, packet_id: u16) -> Result<(), Close> {
        if self.version.is_v5() {
            return self
                .refuse_publish(qos, packet_id, ReasonCode::NotAuthorized)
                .await;
        }
        let Some(kind) = ack_kind(qos) else {
            return Ok(());
        };
        if qos == QoS::ExactlyOnce {
            // Its PUBREL must still be answered; nothing was accepted, so nothing is stored.
            self.session.inbound_qos2.insert(packet_id, ());
        }
        self.ack_after(Vec::new(), kind, packet_id, 0).await
    }

    /// PUBREL: the packet id is released, so a later PUBLISH reusing it is a new message; the
    /// release is durable before PUBCOMP tells the client so [MQTT-4.3.3-11].
    pub(super) async fn handle_pubrel(&mut self, packet_id: u16) -> Result<(), Close> {
        let known = self.session.inbound_qos2.remove(&packet_id).is_some();
        // In a cluster, also one the client published on the node its session came from.
        let on_record = self
            .handle
            .log_if_any()
            .is_some_and(|log| log.inbound_remove(packet_id));
        let known = known || on_record;
        let reason = if known {
            0
        } else {
            ReasonCode::PacketIdentifierNotFound as u8
        };
        let batch = if known && self.handle.is_persistent() {
            vec![ops::inbound_delete(&self.client_id, packet_id)]
        } else {
            Vec::new()
        };
        if let (Some(cluster), true) = (&self.state.cluster, known && self.handle.is_persistent()) {
            // Released cluster-wide before PUBCOMP: after it the client may reuse the id for
            // a new message, which no node may take for a retransmission.
            let recorded = Some(cluster.record_position(&self.handle, None));
            return self
                .ack_after_recorded(batch, recorded, AckKind::PubComp, packet_id)
                .await;
        }
        self.ack_after(batch, AckKind::PubComp, packet_id, reason)
            .await
    }

    /// Forgets a QoS 2 packet id whose PUBLISH was refused after it was remembered, so that
    /// the client's retransmission is taken as the new message it is.
    pub(super) async fn forget_qos2(&mut self, packet_id: u16) {
        self.session.inbound_qos2.remove(&packet_id);
        // A refusal that timed out may have been stored after all. A 3.1.1 client sends the
        // message again with the same packet id [MQTT-4.4.0-1], and it keeps the id the log
        // knows it by, so the log keeps one copy. An MQTT 5 refusal ends the exchange: the id
        // is free for a new message.
        if self.version.is_v5() {
            if let Some(log) = self.handle.log_if_any() {
                log.inbound_remove(packet_id);
            }
        }
        if self.handle.is_persistent() {
            let delete = vec![ops::inbound_delete(&self.client_id, packet_id)];
            self.state.publish.write_behind(delete).await;
        }
    }

    /// Remembers a QoS 2 packet id until its PUBREL [MQTT-4.3.3-9]; for a persistent session
    /// `batch` gets the write that keeps it across a restart.
    fn remember_qos2(&mut self, packet_id: u16, batch: &mut Vec<Op>) {
        self.session.inbound_qos2.insert(packet_id, ());
        if self.handle.is_persistent() {
            batch.push(ops::inbound_put(&self.client_id, packet_id));
        }
    }
}

/// The acknowledgement a PUBLISH of `qos` gets: none at QoS 0, PUBACK at 1, PUBREC at 2
/// [MQTT-4.3.2-2], [MQTT-4.3.3-2].
fn ack_kind(qos: QoS) -> Option<AckKind> {
    match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(AckKind::PubAck),
        QoS::ExactlyOnce => Some(AckKind::PubRec),
    }
}
