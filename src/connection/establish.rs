//! Establishing a connection: CONNECT read under a deadline, the client authenticated, its
//! session attached (new, resumed or taken over) and made durable, CONNACK sent, and a resumed
//! session's in-flight window sent again.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{handshake, keep_alive, Access, Close, Connection, Peer};
use crate::clock;
use crate::cluster::ClaimError;
use crate::message::Message;
use crate::metrics;
use crate::protocol::encode::{self, AckKind, ConnAck, OutgoingPublish};
use crate::protocol::{Connect, ProtocolVersion, ReasonCode, Will};
use crate::session::inflight::Stage;
use crate::session::{Attached, NEVER_EXPIRES};
use crate::state::BrokerState;
use crate::storage::ops;

/// Reads CONNECT, authenticates, attaches the session and answers CONNACK.
pub(super) async fn establish<S>(
    mut stream: S,
    peer: &Peer,
    state: &Arc<BrokerState>,
    shutdown: &CancellationToken,
) -> Result<Connection<S>, Close>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut read_buf = BytesMut::with_capacity(4096);
    let connect = match handshake::read_connect(&mut stream, &mut read_buf, state, shutdown).await {
        Ok(connect) => connect,
        Err(close) => return Err(close),
    };
    let version = connect.version;
    let (client_id, assigned) = match handshake::choose_client_id(&connect) {
        Ok(id) => id,
        Err((reason, detail)) => {
            info!(peer = %peer.address, detail, "CONNECT refused");
            handshake::refuse(&mut stream, version, reason).await;
            return Err(Close::Refused(reason));
        }
    };
    let keep_alive_secs =
        match keep_alive::negotiate(version, connect.keep_alive, &state.config.mqtt) {
            Ok(secs) => secs,
            Err((reason, detail)) => {
                info!(peer = %peer.address, %client_id, detail, "CONNECT refused");
                handshake::refuse(&mut stream, version, reason).await;
                return Err(Close::Refused(reason));
            }
        };
    if connect.authentication_method.is_some() {
        // Enhanced authentication (AUTH) is not offered [MQTT-4.12.0-1].
        handshake::refuse(&mut stream, version, ReasonCode::BadAuthenticationMethod).await;
        return Err(Close::Refused(ReasonCode::BadAuthenticationMethod));
    }
    tracing::Span::current().record("client_id", &*client_id);
    let identity = match state
        .auth
        .authenticate(
            connect.username.as_deref(),
            connect.password.as_ref(),
            peer.cert_identity.as_deref(),
        )
        .await
    {
        Ok(identity) => identity,
        Err(reason) => {
            // Never the password; the username only, to tell a typo from an attack.
            info!(
                peer = %peer.address,
                %client_id,
                username = connect.username.as_deref(),
                reason = reason.label(),
                "CONNECT refused"
            );
            handshake::refuse(&mut stream, version, reason).await;
            return Err(Close::Refused(reason));
        }
    };
    let acl = state.auth.acl_for(&identity, &client_id);
    let acl_generation = state.auth.acl_generation();
    if let (Some(acl), Some(will)) = (&acl, &connect.will) {
        if !acl.may_publish(&will.topic) {
            // The will could never be published: refused now rather than dropped later.
            metrics::acl_denied("will");
            handshake::refuse(&mut stream, version, ReasonCode::NotAuthorized).await;
            return Err(Close::Refused(ReasonCode::NotAuthorized));
        }
    }

    let config = &state.config.mqtt;
    let requested_expiry = match version {
        ProtocolVersion::V5 => connect.session_expiry_interval,
        _ if connect.clean_start => 0,
        _ => NEVER_EXPIRES,
    };
    let session_expiry = requested_expiry.min(config.max_session_expiry_interval);
    // In a cluster the client id is claimed first: a refused claim leaves the session where it
    // is, on whichever node holds it.
    let claimed = match &state.cluster {
        Some(cluster) => {
            match cluster
                .claim(&client_id, connect.clean_start, session_expiry)
                .await
            {
                Ok(claimed) => Some(claimed),
                Err(error) => {
                    let reason = match error {
                        ClaimError::Conflict => ReasonCode::ServerBusy,
                        ClaimError::Unavailable(_) => ReasonCode::ServerUnavailable,
                    };
                    info!(peer = %peer.address, %client_id, %error, "CONNECT refused");
                    handshake::refuse(&mut stream, version, reason).await;
                    return Err(Close::Refused(reason));
                }
            }
        }
        None => None,
    };
    let mut attached = state
        .sessions
        .attach(
            client_id.clone(),
            connect.clean_start,
            session_expiry,
            version.level(),
        )
        .await;
    info!(
        peer = %peer.address,
        %client_id,
        version = version.label(),
        clean_start = connect.clean_start,
        session_present = attached.session_present,
        "client connected"
    );
    if let Some(ended) = attached.ended.take() {
        state.publish.finish_ended_sessions(vec![ended]).await;
    }
    if let (Some(cluster), Some(claimed)) = (&state.cluster, &claimed) {
        cluster.settle_claim(&client_id, claimed.ownership.claimed_revision());
    }
    let (ownership, resumed, position) = match claimed {
        Some(claimed) => {
            // The cluster's record is the session when it comes from another node (what this
            // node still has of an earlier visit is out of date) or when this node has none
            // (it lost it: a restart without storage).
            // So is a session whose replay failed on an earlier attempt here.
            let resumed = claimed.subscriptions.filter(|_| {
                claimed.moved || !attached.session_present || attached.handle.log().replay_owed()
            });
            (Some(Box::new(claimed.ownership)), resumed, claimed.position)
        }
        None => (None, None, None),
    };
    // A resumed session is owed the replication log after its recorded position: the log's
    // delivery stops while its subscriptions go in and the gap is replayed, so its queue is
    // in log order with nothing missing or twice.
    let log_hold = match (&state.cluster, &resumed, &position) {
        (Some(cluster), Some(_), Some(_)) => Some(cluster.hold_log().await),
        _ => None,
    };
    let mut subscription_ops = Vec::new();
    if let Some(subscriptions) = resumed {
        for filter in attached.state.subscriptions.keys() {
            state.router.unsubscribe_session(&attached.handle, filter);
        }
        attached.state.subscriptions = Default::default();
        if attached.session_present {
            discard_stale_queue(state, &mut attached).await;
        }
        for (filter, options) in subscriptions {
            state
                .router
                .subscribe(&attached.handle, &filter, options.clone());
            if session_expiry > 0 {
                subscription_ops.push(ops::subscription_put(&client_id, &filter, &options));
            }
            attached.state.subscriptions.insert(filter, options);
        }
        attached.session_present = true;
    }
    if let (Some(_), Some(position)) = (&log_hold, &position) {
        // QoS 2 packet ids the client published on the node the session came from and has not
        // released: a retransmission is stored under the same id, which the log keeps once
        // (`Cluster::replicate_qos2`).
        for &(packet_id, id) in &position.inbound {
            attached.handle.log().inbound_restore(packet_id, id);
        }
    }
    let mut replay_failed = false;
    if let (Some(cluster), Some(hold), Some(position)) = (&state.cluster, &log_hold, &position) {
        let subscribed = !attached.state.subscriptions.is_empty();
        match cluster
            .replay(hold, &attached.handle, subscribed, position)
            .await
        {
            Ok(replayed) => {
                debug!(%client_id, position = position.floor, replayed, "session replayed from the replication log")
            }
            Err(error) => {
                // Refused below: were the client served, this node would record the session
                // as having had what the replay did not bring, and those messages would be
                // lost. The next attempt, here or elsewhere, replays from the same position.
                metrics::cluster_error("replay");
                tracing::warn!(%client_id, %error, "session's missed messages not replayed; CONNECT refused");
                replay_failed = true;
            }
        }
    }
    drop(log_hold);
    if state.cluster.is_some() {
        attached.handle.log().set_replay_owed(replay_failed);
        // From now on this node records the session's log position.
        attached.handle.log().set_owned_here(!replay_failed);
    }
    // The session exists on disk before the client is told it does.
    let persisted_session = if session_expiry > 0 && state.publish.is_durable() {
        let will = connect
            .will
            .as_ref()
            .map(|will| (will_message(will.clone(), &client_id), will.delay_interval));
        let op = ops::session_put(
            &client_id,
            attached.handle.store_id,
            version.level(),
            session_expiry,
            None,
            will.as_ref().map(|(message, delay)| ops::WillRecord {
                message,
                delay_interval: *delay,
                publish_at: None,
            }),
        );
        subscription_ops.push(op);
        state.publish.write(subscription_ops).await
    } else {
        Ok(())
    };

    if read_buf.is_empty() {
        // The 4 KiB that CONNECT was read into is not kept for an idle session.
        read_buf = BytesMut::new();
    }
    // The keep-alive sweep starts counting from the CONNECT.
    attached
        .handle
        .heard_from_client(keep_alive_secs, clock::monotonic_ms());
    let mut connection = Connection {
        stream,
        read_buf,
        write_buf: BytesMut::new(),
        state: state.clone(),
        version,
        client_id,
        handle: attached.handle,
        session: attached.state,
        connection_id: attached.connection_id,
        keep_alive: keep_alive_secs,
        will: connect.will.clone().map(Box::new),
        will_in_cluster: false,
        session_expiry,
        session_expiry_at_connect: session_expiry,
        send_quota: connect.receive_maximum.min(config.max_inflight_messages),
        client_max_packet_size: connect.maximum_packet_size.unwrap_or(u32::MAX),
        client_topic_alias_max: connect.topic_alias_maximum,
        aliases: None,
        pending: VecDeque::new(),
        releases: Vec::new(),
        has_published: false,
        paused: false,
        memory_resumed: None,
        traffic: metrics::Traffic::default(),
        transport: peer.transport,
        needs_flush: false,
        access: acl.map(|acl| {
            Box::new(Access {
                identity,
                acl,
                generation: acl_generation,
            })
        }),
        ownership,
    };
    if replay_failed {
        // The client was never connected: its will is not due.
        connection.will = None;
        let reason = ReasonCode::ServerUnavailable;
        handshake::refuse(&mut connection.stream, version, reason).await;
        return Err(Box::pin(connection.finish(Close::Refused(reason), shutdown)).await);
    }
    if let Err(error) = persisted_session {
        tracing::error!(client_id = %connection.client_id, %error, "cannot persist the session");
        return Err(Box::pin(connection.finish(Close::StorageFailure, shutdown)).await);
    }
    if let Err(error) = state.publish.unspill(&connection.handle).await {
        tracing::error!(client_id = %connection.client_id, %error, "cannot read the session's queued messages back");
        return Err(Box::pin(connection.finish(Close::StorageFailure, shutdown)).await);
    }
    if let Some(cluster) = &state.cluster {
        // Recorded before CONNACK: from then on, this node dying does not lose the will.
        if let Some(will) = &connection.will {
            let message = will_message((**will).clone(), &connection.client_id);
            cluster
                .record_will(&connection.client_id, Some((&message, will.delay_interval)))
                .await;
            connection.will_in_cluster = true;
        } else if attached.session_present {
            // A will the session's previous connection left pending here is cancelled
            // [MQTT-3.1.3-9].
            cluster.forget_will(&connection.client_id).await;
        }
    }
    connection.send_connack(
        &connect,
        assigned,
        attached.session_present,
        requested_expiry,
    );
    if attached.session_present {
        connection.resend_inflight();
    }
    Ok(connection)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn send_connack(
        &mut self,
        connect: &Connect,
        assigned: bool,
        session_present: bool,
        requested_expiry: u32,
    ) {
        let config = &self.state.config.mqtt;
        let mut ack = ConnAck {
            session_present,
            reason: Some(ReasonCode::Success),
            ..ConnAck::default()
        };
        if self.version.is_v5() {
            if self.session_expiry != requested_expiry {
                ack.session_expiry_interval = Some(self.session_expiry);
            }
            ack.receive_maximum = Some(config.receive_maximum);
            ack.maximum_packet_size = Some(config.max_packet_size);
            ack.topic_alias_maximum = Some(config.topic_alias_maximum);
            if !config.retain_available {
                ack.retain_available = Some(false);
            }
            if assigned {
                ack.assigned_client_identifier = Some(&self.client_id);
            }
            if self.keep_alive != connect.keep_alive {
                ack.server_keep_alive = Some(self.keep_alive);
            }
        }
        encode::connack(self.version, &ack, &mut self.write_buf);
    }

    /// Re-sends the in-flight window of a resumed session, in its original order, with DUP set
    /// [MQTT-4.4.0-1], [MQTT-3.3.1-1]; deliveries past PUBREC get their PUBREL again.
    fn resend_inflight(&mut self) {
        for entry in self.session.inflight.entries() {
            match entry.stage {
                Stage::AwaitingPubComp => encode::ack(
                    self.version,
                    AckKind::PubRel,
                    entry.packet_id,
                    0,
                    &mut self.write_buf,
                ),
                Stage::AwaitingPubAck | Stage::AwaitingPubRec => {
                    let delivery = &entry.delivery;
                    let message = &delivery.message;
                    let publish = OutgoingPublish {
                        topic: &message.topic,
                        qos: delivery.qos,
                        retain: delivery.retain,
                        dup: true,
                        packet_id: entry.packet_id,
                        payload: &message.payload,
                        properties: &message.properties,
                        message_expiry_interval: message
                            .remaining_expiry(clock::now())
                            .unwrap_or(Some(1)),
                        topic_alias: None,
                        subscription_ids: &delivery.subscription_ids,
                    };
                    encode::publish(self.version, &publish, &mut self.write_buf);
                }
            }
        }
    }
}

pub(super) fn will_message(will: Will, client_id: &Arc<str>) -> Message {
    Message::new(
        will.topic.into(),
        will.payload,
        will.qos,
        will.retain,
        will.properties,
        Some(client_id.clone()),
    )
}

/// Empties what this node still held of a session the cluster recorded elsewhere since: its
/// queue and in-flight messages are out of date, and the replication log brings what the
/// session is owed.
async fn discard_stale_queue(state: &BrokerState, attached: &mut Attached) {
    let store_id = attached.handle.store_id;
    let mut stale = attached.handle.mailbox.drain();
    stale.extend(attached.state.inflight.drain().map(|entry| entry.delivery));
    attached.handle.log().clear();
    let releases = stale
        .iter()
        .filter_map(|delivery| ops::release(store_id, delivery, true))
        .collect();
    state.publish.write_behind(releases).await;
}
