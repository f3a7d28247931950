//! One task per network connection: it owns the socket, its read and write buffers and, once
//! CONNECT is accepted, the live session state. Everything it does to other clients goes through
//! the router (deliveries into their mailboxes) and the session registry.
//!
//! The task waits on the socket, its session's mailbox, the keep-alive deadline, a takeover and
//! broker shutdown. Replies and deliveries are encoded into one write buffer and written as they
//! fit, so a wake-up that finds many messages makes one `write`.

mod handshake;
mod keep_alive;
mod linger;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use crate::auth::acl::ClientAcl;
use crate::auth::Identity;
use crate::broker::BrokerState;
use crate::delayed;
use crate::message::{Delivery, Message};
use crate::metrics;
use crate::persist;
use crate::protocol::encode::{self, AckKind, ConnAck, OutgoingPublish};
use crate::protocol::validate::{is_valid_filter, split_shared};
use crate::protocol::ReasonCode;
use crate::protocol::{
    self, Connect, Disconnect, Packet, ProtocolError, ProtocolVersion, Publish, QoS,
    RetainHandling, Subscribe, Unsubscribe, Will,
};
use crate::router::{SubscriptionOptions, Target};
use crate::session::inflight::{packet_id_for, OutboundEntry, PubRecOutcome, Stage};
use crate::session::mailbox::is_spilled;
use crate::session::{self, Detached, Kick, SessionHandle, SessionState, NEVER_EXPIRES};
use crate::small_map::SmallMap;
use crate::storage::{Completion, Op, StorageError};
use crate::transport::admission::Admitted;
use crate::transport::Transport;

/// Deliveries are encoded into the write buffer only while it holds less than this, so a client
/// that reads slowly leaves messages in its (bounded) mailbox rather than in memory here.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Past this much unwritten output the task stops reading, so a client that publishes without
/// reading its acknowledgements is slowed down instead of growing the buffer.
const WRITE_BACKLOG_LIMIT: usize = 1024 * 1024;
/// A read at least this long marks a busy client whose buffer is kept and grown.
const READ_BUSY: usize = 1024;
/// Room made for the next read of a busy client.
const READ_CHUNK: usize = 16 * 1024;
/// The most a client whose read buffer was released gets read in one go (on the stack).
const IDLE_READ: usize = READ_BUSY;
/// Packets waiting for storage before the task stops reading more from the client.
const PENDING_LIMIT: usize = 4096;
/// Time allowed to flush the last packets (DISCONNECT) of a closing connection.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a connection ended; the label feeds logs and the close-reason metric.
#[derive(Debug)]
pub(crate) enum Close {
    PeerClosed,
    Io,
    ConnectTimeout,
    ClientDisconnect,
    KeepAliveTimeout,
    TakenOver,
    ServerShuttingDown,
    Refused(ReasonCode),
    Protocol(ProtocolError),
    /// Storage could not make something durable that the client is owed an answer for.
    StorageFailure,
    /// Its queue overflowed under the `disconnect` policy.
    SlowConsumer,
}

impl Close {
    fn label(&self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Io => "io_error",
            Self::ConnectTimeout => "connect_timeout",
            Self::ClientDisconnect => "client_disconnect",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::TakenOver => "session_taken_over",
            Self::ServerShuttingDown => "server_shutting_down",
            Self::Refused(reason) => reason.label(),
            Self::Protocol(error) => error.reason.label(),
            Self::StorageFailure => "storage_failure",
            Self::SlowConsumer => "slow_consumer",
        }
    }

    /// The v5 DISCONNECT the broker sends before closing [MQTT-4.13.1-1], if any.
    fn disconnect_reason(&self) -> Option<(ReasonCode, Option<&'static str>)> {
        match self {
            Self::KeepAliveTimeout => Some((ReasonCode::KeepAliveTimeout, None)),
            Self::TakenOver => Some((ReasonCode::SessionTakenOver, None)),
            Self::ServerShuttingDown => Some((ReasonCode::ServerShuttingDown, None)),
            Self::Protocol(error) => Some((error.reason, Some(error.detail))),
            Self::StorageFailure => Some((
                ReasonCode::UnspecifiedError,
                Some("the broker could not store the session state"),
            )),
            Self::SlowConsumer => Some((
                ReasonCode::QuotaExceeded,
                Some("slow consumer: the session's queue overflowed"),
            )),
            _ => None,
        }
    }
}

/// Where a connection comes from.
#[derive(Debug)]
pub struct Peer {
    pub address: SocketAddr,
    pub transport: Transport,
    /// The username a verified client certificate stands for (`tls.cert_identity`).
    pub cert_identity: Option<String>,
}

/// Serves one accepted connection until it closes. `admitted` holds the connection's admission
/// slots until then.
pub async fn serve<S>(
    stream: S,
    peer: Peer,
    admitted: Admitted,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    metrics::connection_opened();
    // Everything before and after the event loop is boxed, and no layer of async functions or
    // span sits between this task and the event loop: an idle connection's task then holds the
    // connection and its event loop, not the (larger) CONNECT and close states, nor copies of
    // arguments passed down. Events of the event loop name their client themselves.
    let (close, client_id) = 'served: {
        let establishing = establish(stream, &peer, &state, &shutdown).instrument(span(&peer));
        let mut connection = match Box::pin(establishing).await {
            Ok(connection) => connection,
            Err(close) => break 'served (close, None),
        };
        let close = connection.event_loop(&shutdown).await;
        let client_id = connection.client_id.clone();
        let finishing_span = span(&peer);
        finishing_span.record("client_id", &*client_id);
        let finishing = connection
            .finish(close, &shutdown)
            .instrument(finishing_span);
        (Box::pin(finishing).await, Some(client_id))
    };
    log_close(&close, &peer, client_id.as_deref());
    metrics::connection_closed(close.label());
    drop(admitted);
}

/// A debug span: at info level a span per connection would cost each connection over a
/// kilobyte in the subscriber's registry (measured), so the info events name their client
/// themselves.
fn span(peer: &Peer) -> tracing::Span {
    tracing::debug_span!(
        "conn",
        peer = %peer.address,
        transport = peer.transport.label(),
        client_id = tracing::field::Empty
    )
}

fn log_close(close: &Close, peer: &Peer, client_id: Option<&str>) {
    let detail = match close {
        Close::Protocol(error) => Some(error.detail),
        _ => None,
    };
    info!(
        peer = %peer.address,
        client_id = client_id.map(tracing::field::display),
        reason = close.label(),
        detail,
        "connection closed"
    );
}

/// Reads CONNECT, authenticates, attaches the session and answers CONNACK.
async fn establish<S>(
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
    let attached = state
        .sessions
        .attach(
            &state.router,
            client_id.clone(),
            connect.clean_start,
            session_expiry,
            persist::protocol_level(version),
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
    if let Some(ended) = attached.ended {
        persist::finish_ended_sessions(state, vec![ended]).await;
    }
    // The session exists on disk before the client is told it does.
    let persisted_session = if session_expiry > 0 && state.storage.is_some() {
        let will = connect
            .will
            .as_ref()
            .map(|will| (will_message(will.clone(), &client_id), will.delay_interval));
        let op = persist::session_put(
            &client_id,
            attached.handle.store_id,
            version,
            session_expiry,
            None,
            will.as_ref()
                .map(|(message, delay)| (message, *delay, None)),
        );
        persist::write(state, vec![op]).await
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
        .heard_from_client(keep_alive_secs, session::clock_ms());
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
    };
    if let Err(error) = persisted_session {
        tracing::error!(client_id = %connection.client_id, %error, "cannot persist the session");
        return Err(Box::pin(connection.finish(Close::StorageFailure, shutdown)).await);
    }
    if let Err(error) = persist::unspill(state, &connection.handle).await {
        tracing::error!(client_id = %connection.client_id, %error, "cannot read the session's queued messages back");
        return Err(Box::pin(connection.finish(Close::StorageFailure, shutdown)).await);
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

/// What woke the event loop.
enum Event {
    Read(std::io::Result<usize>),
    /// Bytes written, or `None` when the write buffer was empty and a flush completed.
    Wrote(std::io::Result<Option<usize>>),
    MailboxReady,
    MemoryGuardChanged,
    Stored(Result<(), StorageError>),
}

struct Connection<S> {
    /// Not split into halves: the halves share an allocation, and one poll can serve both
    /// directions (`read_or_write`).
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    state: Arc<BrokerState>,
    version: ProtocolVersion,
    client_id: Arc<str>,
    handle: Arc<SessionHandle>,
    session: SessionState,
    connection_id: u64,
    /// Keep Alive in seconds, 0 for none. The broker's keep-alive sweep, not a timer of this
    /// connection's, closes it when its client falls silent: see `Kick::KeepAliveTimeout`.
    keep_alive: u16,
    /// Boxed: most clients have none, and every idle connection would reserve its room.
    will: Option<Box<Will>>,
    session_expiry: u32,
    session_expiry_at_connect: u32,
    /// Outbound QoS 1/2 messages allowed in flight: the client's Receive Maximum capped by ours.
    send_quota: u16,
    client_max_packet_size: u32,
    client_topic_alias_max: u16,
    /// Made on first use: few telemetry clients use topic aliases, and every idle connection
    /// would reserve room for both maps.
    aliases: Option<Box<TopicAliases>>,
    /// Work waiting for storage, in the order the client's packets arrived: acknowledgements
    /// leave only once what they acknowledge is durable, and in order [MQTT-4.6.0-2].
    pending: VecDeque<Pending>,
    /// Storage releases of deliveries dropped while filling the write buffer, written behind
    /// on the next turn of the event loop.
    releases: Vec<Op>,
    /// Whether this client has published; only publishers are paused by the memory guard.
    has_published: bool,
    /// Whether reading is paused by the memory guard now (for counting pauses).
    paused: bool,
    /// While paused, resolves when the memory guard lets publishers resume. Boxed and made only then:
    /// the wait is rare and its future would otherwise be in every connection's memory.
    memory_resumed: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// Message and byte counts since the last turn of the event loop, added to the shared
    /// counters once per turn rather than once per message.
    traffic: metrics::Traffic,
    /// Transport label of the byte and message counters.
    transport: Transport,
    /// Whether written bytes may sit in a TLS or WebSocket layer's buffer until flushed.
    needs_flush: bool,
    /// This client's ACL rules; `None` when no ACL is configured (a reload does not add one).
    access: Option<Box<Access>>,
}

#[derive(Default)]
struct TopicAliases {
    /// Set by the client [MQTT-3.3.2-?]: alias → topic.
    inbound: SmallMap<u16, Arc<str>>,
    /// Set by the broker: topic → alias.
    outbound: SmallMap<Arc<str>, u16>,
}

/// A client's ACL rules and what they were built from.
struct Access {
    identity: Identity,
    acl: ClientAcl,
    /// The ACL generation `acl` was built from; a reload makes it stale.
    generation: u64,
}

/// Something to finish once its storage write completes.
struct Pending {
    /// `None` when nothing had to be written but earlier work is still waiting.
    completion: Option<Completion>,
    action: Action,
}

enum Action {
    /// Route a received message and acknowledge it.
    Publish {
        message: Arc<Message>,
        targets: Vec<Target>,
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
                            .remaining_expiry(SystemTime::now())
                            .unwrap_or(Some(1)),
                        topic_alias: None,
                        subscription_ids: &delivery.subscription_ids,
                    };
                    encode::publish(self.version, &publish, &mut self.write_buf);
                }
            }
        }
    }

    async fn event_loop(&mut self, shutdown: &CancellationToken) -> Close {
        loop {
            // Shutdown and takeover come through the session (its mailbox wakes this loop),
            // not as futures of their own in the select below: every idle connection would
            // hold them. The token is checked as well for a shutdown that began before this
            // connection's session was attached, which `kick_all` could not see.
            if shutdown.is_cancelled() {
                return Close::ServerShuttingDown;
            }
            match self.handle.kicked(self.connection_id) {
                Some(Kick::ShuttingDown) => return Close::ServerShuttingDown,
                Some(Kick::TakenOver) => return Close::TakenOver,
                Some(Kick::SlowConsumer) => return Close::SlowConsumer,
                // [MQTT-3.1.2-24] silent for one and a half times its keep alive.
                Some(Kick::KeepAliveTimeout) => return Close::KeepAliveTimeout,
                None => {}
            }
            self.fill_from_mailbox();
            self.traffic.flush(self.transport.label());
            if !self.releases.is_empty() {
                let releases = std::mem::take(&mut self.releases);
                Box::pin(persist::write_behind(&self.state, releases)).await;
            }
            let paused = self.paused_by_memory_guard();
            let can_read = !paused
                && self.write_buf.len() < WRITE_BACKLOG_LIMIT
                && self.pending.len() < PENDING_LIMIT;
            let awaiting_storage = self
                .pending
                .front()
                .is_some_and(|pending| pending.completion.is_some());
            let wants_write = !self.write_buf.is_empty() || self.needs_flush;
            // Every branch is a small future borrowing the connection's state: the select's
            // futures are part of every idle connection's memory.
            let event = tokio::select! {
                biased;
                stored = first_completion(&mut self.pending), if awaiting_storage => Event::Stored(stored),
                io = read_or_write(&mut self.stream, &mut self.read_buf, can_read, &mut self.write_buf, wants_write), if can_read || wants_write => io,
                () = self.handle.mailbox.notified() => Event::MailboxReady,
                () = completion_of(&mut self.memory_resumed), if paused => Event::MemoryGuardChanged,
            };
            let outcome = match event {
                Event::MailboxReady => Ok(()),
                Event::MemoryGuardChanged => {
                    // Completed: never polled again.
                    self.memory_resumed = None;
                    Ok(())
                }
                Event::Wrote(Ok(None)) => {
                    self.needs_flush = false;
                    Ok(())
                }
                Event::Wrote(Ok(Some(written))) => {
                    self.traffic.add_bytes_sent(written);
                    self.needs_flush = self.transport != Transport::Tcp;
                    if self.write_buf.is_empty() {
                        // Idle connections hold no output buffer; a busy one gets a new one
                        // on its next wake-up, which costs far less than the write did.
                        self.write_buf = BytesMut::new();
                    }
                    Ok(())
                }
                Event::Wrote(Err(_)) | Event::Read(Err(_)) => Err(Close::Io),
                Event::Read(Ok(0)) => Err(Close::PeerClosed),
                Event::Read(Ok(read)) => {
                    self.traffic.add_bytes_received(read);
                    // Boxed: handling a packet is the deepest state of the connection's future,
                    // and inline it would be reserved in every idle connection's memory.
                    let outcome = Box::pin(self.process_input()).await;
                    self.size_read_buffer(read);
                    outcome
                }
                Event::Stored(result) => Box::pin(self.complete_pending(result)).await,
            };
            if let Err(close) = outcome {
                return close;
            }
        }
    }

    /// Whether to stop reading from this client because queued messages passed the memory
    /// high-water mark. Only publishers pause, and not while the client owes acknowledgements
    /// for messages sent to it: reading those is what lets queues drain.
    fn paused_by_memory_guard(&mut self) -> bool {
        let paused =
            self.has_published && self.session.inflight.is_empty() && self.state.memory.is_paused();
        if paused && !self.paused {
            metrics::publisher_paused();
            debug!(client_id = %self.client_id, "memory high-water mark passed: not reading from this publisher");
        }
        if !paused {
            self.memory_resumed = None;
        } else if self.memory_resumed.is_none() {
            // The guard's flag changes under the channel's lock, so this agrees with the
            // atomic read above.
            let mut memory = self.state.memory.subscribe();
            self.memory_resumed = Some(Box::pin(async move {
                let _ = memory.wait_for(|paused| !*paused).await;
            }));
        }
        self.paused = paused;
        paused
    }

    /// Keeps the read buffer small for quiet clients and large for busy ones: after a short
    /// read that left nothing unparsed it is released (the next read lands on the stack, see
    /// `read_into`), after a long one it gets room for a large next read.
    fn size_read_buffer(&mut self, last_read: usize) {
        if self.read_buf.is_empty() && last_read < READ_BUSY {
            self.read_buf = BytesMut::new();
        } else if self.read_buf.capacity() - self.read_buf.len() < READ_BUSY {
            self.read_buf.reserve(READ_CHUNK);
        }
    }

    /// Decodes and handles every complete packet in the read buffer.
    async fn process_input(&mut self) -> Result<(), Close> {
        let max_packet_size = self.state.config.mqtt.max_packet_size as usize;
        // Once per read, not per packet: the word is shared with the sweep's core.
        let mut heard = false;
        loop {
            let packet =
                match protocol::decode(&mut self.read_buf, Some(self.version), max_packet_size) {
                    Ok(Some(packet)) => packet,
                    Ok(None) => return Ok(()),
                    Err(error) => {
                        metrics::protocol_error(error.reason.label());
                        return Err(Close::Protocol(error));
                    }
                };
            if !heard {
                heard = true;
                self.handle
                    .heard_from_client(self.keep_alive, session::clock_ms());
            }
            if let Err(close) = self.handle_packet(packet).await {
                if let Close::Protocol(error) = &close {
                    metrics::protocol_error(error.reason.label());
                }
                return Err(close);
            }
        }
    }

    async fn handle_packet(&mut self, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish).await?,
            Packet::PubAck { packet_id, .. } => match self.session.inflight.on_puback(packet_id) {
                Some(entry) => self.release(&entry.delivery).await,
                None => {
                    debug!(client_id = %self.client_id, packet_id, "PUBACK for no in-flight QoS 1 message")
                }
            },
            Packet::PubRec { packet_id, reason } => {
                match self.session.inflight.on_pubrec(packet_id, reason >= 0x80) {
                    (PubRecOutcome::Release, _) => {
                        let store_id = self.handle.store_id;
                        let ops = self
                            .session
                            .inflight
                            .get_mut(packet_id)
                            .map(|entry| persist::pubrec_ops(store_id, &mut entry.delivery))
                            .unwrap_or_default();
                        self.reply_after(ops, |out, version| {
                            encode::ack(version, AckKind::PubRel, packet_id, 0, out)
                        })
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
            }
            Packet::PubComp { packet_id, .. } => {
                match self.session.inflight.on_pubcomp(packet_id) {
                    Some(entry) => self.release(&entry.delivery).await,
                    None => {
                        debug!(client_id = %self.client_id, packet_id, "PUBCOMP for no in-flight QoS 2 message")
                    }
                }
            }
            Packet::PubRel { packet_id, .. } => {
                // The packet id is released: a later PUBLISH reusing it is a new message, so the
                // release is durable before PUBCOMP tells the client so [MQTT-4.3.3-11].
                let known = self.session.inbound_qos2.remove(&packet_id).is_some();
                let reason = if known {
                    0
                } else {
                    ReasonCode::PacketIdentifierNotFound as u8
                };
                let ops = if known && self.handle.is_persistent() {
                    vec![persist::inbound_delete(&self.client_id, packet_id)]
                } else {
                    Vec::new()
                };
                self.reply_after(ops, |out, version| {
                    encode::ack(version, AckKind::PubComp, packet_id, reason, out)
                })
                .await?;
            }
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe).await?,
            Packet::Unsubscribe(unsubscribe) => self.handle_unsubscribe(unsubscribe).await?,
            Packet::PingReq => encode::pingresp(&mut self.write_buf),
            Packet::Disconnect(disconnect) => return Err(self.handle_disconnect(disconnect)),
            Packet::Connect(_) => {
                return Err(Close::Protocol(ProtocolError::violation(
                    "[MQTT-3.1.0-2] a second CONNECT on one connection",
                )))
            }
        }
        Ok(())
    }

    /// v3 clients get acknowledgements without reason codes; `encode::ack` drops them.
    fn ack(&mut self, kind: AckKind, packet_id: u16, reason: u8) {
        encode::ack(self.version, kind, packet_id, reason, &mut self.write_buf);
    }

    /// Releases the storage of a finished delivery (written behind: losing it after a crash
    /// means a redelivery, which QoS 1 allows and QoS 2's PUBREL state covers).
    async fn release(&self, delivery: &Delivery) {
        let mut ops = Vec::new();
        persist::release_ops(self.handle.store_id, delivery, &mut ops);
        persist::write_behind(&self.state, ops).await;
    }

    /// Queues `action` behind everything already waiting; when `ops` must be written first, it
    /// completes once they are durable. With nothing to wait for it runs at once.
    async fn submit(&mut self, ops: Vec<Op>, action: Action) -> Result<(), Close> {
        let completion = match &self.state.storage {
            Some(storage) if !ops.is_empty() => Some(storage.write(ops).await),
            _ => None,
        };
        if completion.is_none() && self.pending.is_empty() {
            return self.apply(action, Ok(())).await;
        }
        self.pending.push_back(Pending { completion, action });
        Ok(())
    }

    /// Sends a reply once `ops` are durable.
    async fn reply_after(
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

    /// The front of the queue finished writing: run it and everything behind it that is ready.
    async fn complete_pending(&mut self, first: Result<(), StorageError>) -> Result<(), Close> {
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
    async fn drain_pending(&mut self) {
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
                message,
                targets,
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
                let dropped = self.state.router.apply(&message, targets);
                persist::release_dropped(&self.state, dropped).await;
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
                let router = &self.state.router;
                for delivery in deliveries {
                    let policy = router.policy_for(&delivery.message.topic);
                    // Retained deliveries are not stored, so a dropped one needs no release.
                    router.enqueue(&self.handle, delivery, policy);
                }
                Ok(())
            }
        }
    }

    async fn handle_publish(&mut self, publish: Publish) -> Result<(), Close> {
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
                let packet_id = publish.packet_id;
                return self
                    .reply_after(Vec::new(), |out, version| {
                        encode::ack(version, AckKind::PubRec, packet_id, 0, out)
                    })
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
        let mut targets = self.state.router.plan(&message);
        if self.state.router.must_refuse(&message, &targets) {
            // The topic's policy is `refuse` and a subscriber's queue is full: nothing is
            // routed, and the publisher is told to back off.
            metrics::message_dropped(metrics::DROP_QUOTA_EXCEEDED);
            return self
                .refuse_publish(publish.qos, publish.packet_id, ReasonCode::QuotaExceeded)
                .await;
        }
        let reason = if targets.is_empty() {
            metrics::message_dropped(metrics::DROP_NO_SUBSCRIBERS);
            self.state
                .router
                .dead_letter(&message, metrics::DROP_NO_SUBSCRIBERS, None);
            ReasonCode::NoMatchingSubscribers as u8
        } else {
            0
        };
        let mut ops = match &self.state.storage {
            Some(storage) => persist::publish_ops(storage, &message, &mut targets),
            None => Vec::new(),
        };
        let (ack, qos2_packet_id) = match publish.qos {
            QoS::AtMostOnce => (None, None),
            QoS::AtLeastOnce => (Some((AckKind::PubAck, publish.packet_id, reason)), None),
            QoS::ExactlyOnce => {
                // Remembered now, so a retransmission arriving while this one is still being
                // written is recognised.
                self.session.inbound_qos2.insert(publish.packet_id, ());
                if self.handle.is_persistent() {
                    ops.push(persist::inbound_put(&self.client_id, publish.packet_id));
                }
                (
                    Some((AckKind::PubRec, publish.packet_id, reason)),
                    Some(publish.packet_id),
                )
            }
        };
        self.submit(
            ops,
            Action::Publish {
                message,
                targets,
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
        let due = SystemTime::now() + Duration::from_secs(u64::from(seconds));
        let op = match self.state.delayed.hold(message, due) {
            Ok(op) => op,
            Err(_) => {
                metrics::message_dropped(metrics::DROP_DELAYED_LIMIT);
                return self
                    .refuse_publish(qos, packet_id, ReasonCode::QuotaExceeded)
                    .await;
            }
        };
        let mut ops = Vec::new();
        if self.state.storage.is_some() {
            ops.push(op);
        }
        let kind = match qos {
            QoS::AtMostOnce => {
                return self
                    .submit(
                        ops,
                        Action::Reply {
                            bytes: BytesMut::new(),
                            deliveries: Vec::new(),
                        },
                    )
                    .await
            }
            QoS::AtLeastOnce => AckKind::PubAck,
            QoS::ExactlyOnce => {
                self.session.inbound_qos2.insert(packet_id, ());
                if self.handle.is_persistent() {
                    ops.push(persist::inbound_put(&self.client_id, packet_id));
                }
                AckKind::PubRec
            }
        };
        self.reply_after(ops, |out, version| {
            encode::ack(version, kind, packet_id, 0, out)
        })
        .await
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
        let kind = match qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => AckKind::PubAck,
            QoS::ExactlyOnce => AckKind::PubRec,
        };
        if !self.version.is_v5() {
            return Err(Close::Refused(reason));
        }
        self.reply_after(Vec::new(), |out, version| {
            encode::ack(version, kind, packet_id, reason as u8, out)
        })
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
        let kind = match qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => AckKind::PubAck,
            QoS::ExactlyOnce => {
                // Its PUBREL must still be answered.
                self.session.inbound_qos2.insert(packet_id, ());
                AckKind::PubRec
            }
        };
        self.reply_after(Vec::new(), |out, version| {
            encode::ack(version, kind, packet_id, 0, out)
        })
        .await
    }

    /// Rebuilds this client's ACL rules if a reload swapped the file since they were built.
    fn refresh_acl(&mut self) {
        let Some(access) = self.access.as_mut() else {
            return;
        };
        let generation = self.state.auth.acl_generation();
        if generation != access.generation {
            if let Some(acl) = self.state.auth.acl_for(&access.identity, &self.client_id) {
                access.acl = acl;
            }
            access.generation = generation;
        }
    }

    async fn handle_subscribe(&mut self, subscribe: Subscribe) -> Result<(), Close> {
        self.refresh_acl();
        let limits = &self.state.config.mqtt;
        let (max_levels, max_subscriptions) =
            (limits.max_topic_levels, limits.max_subscriptions_per_client);
        let v5 = self.version.is_v5();
        let persistent = self.handle.is_persistent();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained = Vec::new();
        let mut ops = Vec::new();
        for request in subscribe.filters {
            let shared = match split_shared(&request.filter) {
                None => false,
                Some(Ok(_)) if v5 && request.no_local => {
                    return Err(Close::Protocol(ProtocolError::violation(
                        "[MQTT-3.8.3-4] No Local set on a shared subscription",
                    )));
                }
                Some(Ok(_)) => true,
                Some(Err(())) => {
                    // [MQTT-4.8.2-1], [MQTT-4.8.2-2]
                    codes.push(ReasonCode::TopicFilterInvalid as u8);
                    continue;
                }
            };
            if !shared && !is_valid_filter(&request.filter) {
                // [MQTT-4.7.1-2], [MQTT-4.7.1-3]: refused per filter, the others still apply.
                codes.push(ReasonCode::TopicFilterInvalid as u8);
                continue;
            }
            let filter = match split_shared(&request.filter) {
                Some(Ok((_, filter))) => filter,
                _ => request.filter.as_str(),
            };
            if filter.split('/').count() > max_levels {
                metrics::subscription_refused("topic_too_deep");
                codes.push(ReasonCode::TopicFilterInvalid as u8);
                continue;
            }
            if self
                .access
                .as_ref()
                .is_some_and(|access| !access.acl.may_subscribe(filter))
            {
                debug!(client_id = %self.client_id, filter, "subscription denied by the ACL");
                metrics::acl_denied("subscribe");
                codes.push(ReasonCode::NotAuthorized as u8);
                continue;
            }
            if max_subscriptions > 0
                && self.session.subscriptions.len() >= max_subscriptions
                && !self.session.subscriptions.contains_key(&request.filter)
            {
                metrics::subscription_refused("max_subscriptions");
                codes.push(ReasonCode::QuotaExceeded as u8);
                continue;
            }
            let options = SubscriptionOptions {
                qos: request.qos,
                no_local: v5 && request.no_local,
                retain_as_published: v5 && request.retain_as_published,
                retain_handling: if v5 {
                    request.retain_handling
                } else {
                    RetainHandling::SendOnSubscribe
                },
                subscription_id: subscribe.subscription_id.filter(|_| v5),
            };
            let previous =
                self.state
                    .router
                    .subscribe(&self.handle, &request.filter, options.clone());
            // Retained messages are not sent when a shared subscription is made (§4.8.2).
            let send_retained = !shared
                && match options.retain_handling {
                    RetainHandling::SendOnSubscribe => true,
                    RetainHandling::SendIfNewSubscription => previous.is_none(),
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                let now = SystemTime::now();
                for message in self.state.router.retained_matching(&request.filter) {
                    if message.remaining_expiry(now).is_err() {
                        continue;
                    }
                    retained.push(Delivery::new(
                        message.clone(),
                        message.qos.min(options.qos),
                        true,
                        options.subscription_id.into_iter().collect(),
                        self.handle.next_seq(),
                    ));
                }
            }
            if persistent {
                ops.push(persist::subscription_put(
                    &self.client_id,
                    &request.filter,
                    &options,
                ));
            }
            codes.push(options.qos as u8);
            self.session.subscriptions.insert(request.filter, options);
        }
        // [MQTT-3.8.4-1] SUBACK once the subscriptions are durable, before the retained
        // messages they trigger.
        let mut bytes = BytesMut::new();
        encode::suback(self.version, subscribe.packet_id, &codes, &mut bytes);
        self.submit(
            ops,
            Action::Reply {
                bytes,
                deliveries: retained,
            },
        )
        .await
    }

    async fn handle_unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Result<(), Close> {
        let persistent = self.handle.is_persistent();
        let mut codes = Vec::with_capacity(unsubscribe.filters.len());
        let mut ops = Vec::new();
        for filter in &unsubscribe.filters {
            let existed = self.session.subscriptions.remove(filter).is_some();
            self.state.router.unsubscribe(&self.client_id, filter);
            if existed && persistent {
                ops.push(persist::subscription_delete(&self.client_id, filter));
            }
            codes.push(if existed {
                ReasonCode::Success as u8
            } else {
                ReasonCode::NoSubscriptionExisted as u8
            });
        }
        // [MQTT-3.10.4-4] UNSUBACK even when nothing was removed.
        let packet_id = unsubscribe.packet_id;
        self.reply_after(ops, |out, version| {
            encode::unsuback(version, packet_id, &codes, out)
        })
        .await
    }

    fn handle_disconnect(&mut self, disconnect: Disconnect) -> Close {
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

    /// Moves deliveries from the mailbox into the write buffer while the client's receive window
    /// and the buffer allow.
    fn fill_from_mailbox(&mut self) {
        self.refresh_acl();
        let now = SystemTime::now();
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
            if let Some(dropped) = self.send_delivery(delivery, now) {
                expired.push(dropped);
            }
        }
        for delivery in &expired {
            persist::release_ops(self.handle.store_id, delivery, &mut self.releases);
        }
    }

    /// Encodes one delivery; returns it back if it was dropped instead (expired, too large).
    fn send_delivery(&mut self, delivery: Delivery, now: SystemTime) -> Option<Delivery> {
        let message = delivery.message.clone();
        let Ok(message_expiry_interval) = message.remaining_expiry(now) else {
            // [MQTT-3.3.2-5] expired messages are not delivered.
            self.state
                .router
                .dropped(&self.handle, &delivery, metrics::DROP_EXPIRED);
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

    /// Tells a v5 client why it is being disconnected, flushes, hands the session back and
    /// publishes the will where one is due.
    async fn finish(mut self, close: Close, shutdown: &CancellationToken) -> Close {
        self.traffic.flush(self.transport.label());
        self.drain_pending().await;
        persist::write_behind(&self.state, std::mem::take(&mut self.releases)).await;
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
        let mut unplaced = persist::hand_over_shared(&self.state, &self.handle, shared).await;

        let will = self.will.take().map(|will| {
            let delay = will.delay_interval;
            (Arc::new(will_message(*will, &self.client_id)), delay)
        });
        let state = std::mem::take(&mut self.session);
        let detached = self.state.sessions.detach(
            &self.state.router,
            &self.handle,
            self.connection_id,
            state,
            self.session_expiry,
            will,
        );
        match detached {
            Detached::Kept { will_now } => {
                // Offline now: what was queued meanwhile may find an online member.
                let queued = self.handle.mailbox.take_where(is_shared_unsent);
                unplaced.extend(persist::hand_over_shared(&self.state, &self.handle, queued).await);
                self.handle.mailbox.restore(unplaced);
                if self.handle.is_persistent() {
                    self.handle.mailbox.set_spillable(true);
                    if self.state.memory.under_pressure() && self.state.storage.is_some() {
                        self.handle.mailbox.spill();
                    }
                    let pending = {
                        let inner = self.handle.inner();
                        inner
                            .pending_will
                            .as_ref()
                            .map(|w| (w.message.clone(), w.delay_interval, w.publish_at))
                    };
                    let op = persist::session_put(
                        &self.client_id,
                        self.handle.store_id,
                        self.version,
                        self.session_expiry,
                        Some(SystemTime::now()),
                        pending
                            .as_ref()
                            .map(|(message, delay, at)| (&**message, *delay, Some(*at))),
                    );
                    persist::write_behind(&self.state, vec![op]).await;
                }
                if let Some(will) = will_now {
                    persist::publish(&self.state, will).await;
                }
            }
            Detached::Ended(ended) => {
                let mut ops = Vec::new();
                for delivery in &unplaced {
                    metrics::message_dropped(metrics::DROP_SESSION_ENDED);
                    persist::release_ops(self.handle.store_id, delivery, &mut ops);
                }
                persist::write_behind(&self.state, ops).await;
                persist::finish_ended_sessions(&self.state, vec![ended]).await
            }
            Detached::Stale { will } => {
                self.handle.mailbox.restore(unplaced);
                if let Some(will) = will {
                    persist::publish(&self.state, will).await;
                }
            }
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

/// Resolves when the storage write at the front of `pending` completes.
/// Writes what the buffer holds or, once it is empty, flushes what a TLS or WebSocket layer
/// may still hold.
/// Writes what `output` holds, or flushes when it is empty, if `write`; else (or while that
/// cannot proceed) reads what the client sent into `input`, if `read`. Writing first lets
/// output drain before more input adds to it.
///
/// A hand-written future (as are the ones below): each is in the select of every connection's
/// event loop, and an `async fn`'s state would be larger than the references this one holds.
fn read_or_write<'a, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &'a mut S,
    input: &'a mut BytesMut,
    read: bool,
    output: &'a mut BytesMut,
    write: bool,
) -> impl Future<Output = Event> + 'a {
    std::future::poll_fn(move |cx| {
        if write {
            if let Poll::Ready(wrote) = poll_write_or_flush(Pin::new(&mut *stream), cx, output) {
                return Poll::Ready(Event::Wrote(wrote));
            }
        }
        if read {
            if let Poll::Ready(read) = poll_read_into(Pin::new(&mut *stream), cx, input) {
                return Poll::Ready(Event::Read(read));
            }
        }
        Poll::Pending
    })
}

fn poll_write_or_flush<S: AsyncWrite>(
    stream: Pin<&mut S>,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<Option<usize>>> {
    if buf.is_empty() {
        return stream.poll_flush(cx).map_ok(|()| None);
    }
    let written = std::task::ready!(stream.poll_write(cx, buf))?;
    buf.advance(written);
    Poll::Ready(Ok(Some(written)))
}

/// A released buffer (a quiet client's) is not given memory until bytes arrive: they are read
/// into the stack first, so an idle connection waits holding no read buffer at all.
fn poll_read_into<S: AsyncRead + Unpin>(
    mut stream: Pin<&mut S>,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() > 0 {
        return std::pin::pin!(stream.read_buf(&mut *buf)).poll(cx);
    }
    // Uninitialised: a subscriber with no read buffer is polled here on every wake-up for
    // deliveries, and zeroing the landing each time would be wasted work.
    let mut landing = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_READ];
    let mut landed = tokio::io::ReadBuf::uninit(&mut landing);
    std::task::ready!(stream.as_mut().poll_read(cx, &mut landed))?;
    buf.extend_from_slice(landed.filled());
    Poll::Ready(Ok(landed.filled().len()))
}

/// The result of the oldest pending storage write; never resolves when it has none.
fn first_completion(
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

/// A delivery of a shared subscription not yet sent, which another member may take.
fn is_shared_unsent(delivery: &Delivery) -> bool {
    delivery.share.is_some() && !delivery.awaiting_pubcomp && !is_spilled(delivery)
}

fn will_message(will: Will, client_id: &Arc<str>) -> Message {
    Message::new(
        will.topic.into(),
        will.payload,
        will.qos,
        will.retain,
        will.properties,
        Some(client_id.clone()),
    )
}

/// Resolves when the boxed future in `slot` does; never when the slot is empty.
fn completion_of<F: Future + ?Sized>(
    slot: &mut Option<Pin<Box<F>>>,
) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match slot {
        Some(future) => future.as_mut().poll(cx).map(|_| ()),
        None => Poll::Pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, StorageEngine};
    use crate::transport::admission::Admission;

    /// tokio allocates a task as one block: header and scheduler (48 bytes), the future, the
    /// trailer (48), rounded up to 128 bytes; `transport::accept` spawns `serve` under the task
    /// tracker (8 more). Past 920 bytes every idle connection costs 128 more; the layout
    /// choices that keep it under are in docs/architecture.md ("Memory per connection").
    #[tokio::test]
    async fn an_idle_tcp_connection_task_fits_in_1024_bytes() {
        let mut config = Config::default();
        config.storage.engine = StorageEngine::Memory;
        config.listener.bind = "127.0.0.1:0".parse().unwrap();
        config.metrics.enabled = false;
        config.websocket.enabled = false;
        let broker = crate::Broker::start(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let admission = Admission::new(&broker.state().config.listener);
        let admitted = admission.admit(address.ip()).unwrap();
        let peer = Peer {
            address,
            transport: Transport::Tcp,
            cert_identity: None,
        };
        let task = serve(
            stream,
            peer,
            admitted,
            broker.state().clone(),
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        drop(task);
        broker.shutdown().await;
        assert!(
            size <= 920,
            "the connection future is {size} bytes: every idle connection now costs 128 more"
        );
    }
}
