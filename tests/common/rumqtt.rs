//! rumqttc-based clients for black-box tests (`client_v4.rs`, `client_v5.rs`).
//!
//! Each client's `EventLoop` is driven by a spawned task that forwards every event into a channel
//! and stops at the first error (polling again would silently reconnect), so a test can observe a
//! broker-side close. Events a test is not waiting for are buffered, never dropped, so a later
//! `next_publish` still sees a PUBLISH that arrived while the test waited for a SUBACK.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{QUIET, WAIT};

/// Polls `condition` every 10 ms until it holds; panics with `what` after `WAIT`.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

enum Waited<E> {
    Got(E),
    Closed,
    TimedOut,
}

/// The receiving end of a driven event loop: events in arrival order plus the error that ended it.
struct Pump<E, Er> {
    rx: mpsc::UnboundedReceiver<Result<E, Er>>,
    buffered: VecDeque<E>,
    error: Option<Er>,
    task: JoinHandle<()>,
}

impl<E: Debug, Er: Debug> Pump<E, Er> {
    /// First event satisfying `pick` (buffered ones first); others are kept for later.
    async fn wait(&mut self, within: Duration, mut pick: impl FnMut(&E) -> bool) -> Waited<E> {
        if let Some(index) = self.buffered.iter().position(&mut pick) {
            return Waited::Got(self.buffered.remove(index).unwrap());
        }
        if self.error.is_some() {
            return Waited::Closed;
        }
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Waited::TimedOut,
                Ok(None) => return Waited::Closed,
                Ok(Some(Err(error))) => {
                    self.error = Some(error);
                    return Waited::Closed;
                }
                Ok(Some(Ok(event))) if pick(&event) => return Waited::Got(event),
                Ok(Some(Ok(event))) => self.buffered.push_back(event),
            }
        }
    }

    /// Like `wait` with `WAIT`, but panics (naming `what`) on timeout or a closed connection.
    async fn expect(&mut self, id: &str, what: &str, pick: impl FnMut(&E) -> bool) -> E {
        match self.wait(WAIT, pick).await {
            Waited::Got(event) => event,
            Waited::Closed => panic!(
                "{id}: connection closed while waiting for {what}: {:?}; buffered {:?}",
                self.error, self.buffered
            ),
            Waited::TimedOut => panic!(
                "{id}: timed out waiting for {what}; buffered {:?}",
                self.buffered
            ),
        }
    }

    /// Waits for the event loop to fail (broker closed the connection) and returns the error.
    async fn wait_closed(&mut self, id: &str) -> Er {
        match self.wait(WAIT, |_| false).await {
            Waited::Closed => self
                .error
                .take()
                .unwrap_or_else(|| panic!("{id}: event loop ended without an error")),
            Waited::TimedOut => panic!(
                "{id}: connection still open after {WAIT:?}; buffered {:?}",
                self.buffered
            ),
            Waited::Got(_) => unreachable!(),
        }
    }

    async fn abort(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl<E, Er> Drop for Pump<E, Er> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Defines a client type around rumqttc's `AsyncClient` + driven `EventLoop`. Expanded in a
/// module whose `client_api` names the v4 or v5 types (`AsyncClient`, `Event`, `Packet`, ...), so
/// both protocol versions share one implementation.
macro_rules! driven_client {
    ($name:ident) => {
        pub struct $name {
            pub client: client_api::AsyncClient,
            pub id: String,
            pump: Pump<client_api::Event, client_api::ConnectionError>,
        }

        impl $name {
            /// Spawns the event-loop driver and waits for a successful CONNACK.
            pub async fn connect_with(
                options: client_api::MqttOptions,
            ) -> (Self, client_api::ConnAck) {
                let id = options.client_id();
                let (client, mut eventloop) = client_api::AsyncClient::new(options, 64);
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(async move {
                    loop {
                        let result = eventloop.poll().await;
                        let stop = result.is_err();
                        if tx.send(result).is_err() || stop {
                            break;
                        }
                    }
                });
                let mut this = Self {
                    client,
                    id,
                    pump: Pump {
                        rx,
                        buffered: VecDeque::new(),
                        error: None,
                        task,
                    },
                };
                let event = this
                    .pump
                    .expect(&this.id, "CONNACK", |event| {
                        matches!(
                            event,
                            client_api::Event::Incoming(client_api::Packet::ConnAck(_))
                        )
                    })
                    .await;
                let client_api::Event::Incoming(client_api::Packet::ConnAck(connack)) = event
                else {
                    unreachable!()
                };
                (this, connack)
            }

            /// Waits for an incoming packet selected by `pick`, keeping other events buffered.
            pub async fn expect_incoming<T>(
                &mut self,
                what: &str,
                mut pick: impl FnMut(&client_api::Packet) -> Option<T>,
            ) -> T {
                let mut found = None;
                self.pump
                    .expect(&self.id, what, |event| match event {
                        client_api::Event::Incoming(packet) if found.is_none() => {
                            found = pick(packet);
                            found.is_some()
                        }
                        _ => false,
                    })
                    .await;
                found.unwrap()
            }

            /// Waits until the event loop has written an outgoing packet selected by `pick`.
            async fn expect_outgoing<T>(
                &mut self,
                what: &str,
                mut pick: impl FnMut(&rumqttc::Outgoing) -> Option<T>,
            ) -> T {
                let mut found = None;
                self.pump
                    .expect(&self.id, what, |event| match event {
                        client_api::Event::Outgoing(outgoing) if found.is_none() => {
                            found = pick(outgoing);
                            found.is_some()
                        }
                        _ => false,
                    })
                    .await;
                found.unwrap()
            }

            /// Publishes and waits for the PUBLISH to be written (QoS 0), PUBACK (QoS 1) or
            /// PUBCOMP (QoS 2). Use only for publishes issued through this helper, one at a time.
            pub async fn publish(
                &mut self,
                topic: &str,
                qos: client_api::QoS,
                retain: bool,
                payload: impl Into<Vec<u8>>,
            ) {
                let payload: Vec<u8> = payload.into();
                self.client
                    .publish(topic, qos, retain, payload)
                    .await
                    .expect("publish request");
                self.await_publish_done(qos).await;
            }

            async fn await_publish_done(&mut self, qos: client_api::QoS) {
                let want_zero = qos == client_api::QoS::AtMostOnce;
                let pkid = self
                    .expect_outgoing("outgoing PUBLISH", |outgoing| match outgoing {
                        rumqttc::Outgoing::Publish(pkid) if (*pkid == 0) == want_zero => {
                            Some(*pkid)
                        }
                        _ => None,
                    })
                    .await;
                match qos {
                    client_api::QoS::AtMostOnce => {}
                    client_api::QoS::AtLeastOnce => {
                        self.expect_incoming("PUBACK", |packet| match packet {
                            client_api::Packet::PubAck(ack) if ack.pkid == pkid => Some(()),
                            _ => None,
                        })
                        .await
                    }
                    client_api::QoS::ExactlyOnce => {
                        self.expect_incoming("PUBCOMP", |packet| match packet {
                            client_api::Packet::PubComp(comp) if comp.pkid == pkid => Some(()),
                            _ => None,
                        })
                        .await
                    }
                }
            }

            /// Waits for the SUBSCRIBE just requested to be sent and acknowledged.
            async fn await_suback(&mut self) -> client_api::SubAck {
                let pkid = self
                    .expect_outgoing("outgoing SUBSCRIBE", |outgoing| match outgoing {
                        rumqttc::Outgoing::Subscribe(pkid) => Some(*pkid),
                        _ => None,
                    })
                    .await;
                self.expect_incoming("SUBACK", |packet| match packet {
                    client_api::Packet::SubAck(ack) if ack.pkid == pkid => Some(ack.clone()),
                    _ => None,
                })
                .await
            }

            /// Subscribes and asserts the broker granted exactly `qos`.
            pub async fn subscribe(&mut self, filter: &str, qos: client_api::QoS) {
                self.client
                    .subscribe(filter, qos)
                    .await
                    .expect("subscribe request");
                let suback = self.await_suback().await;
                assert_eq!(
                    suback.return_codes,
                    vec![client_api::SubscribeReasonCode::Success(qos)],
                    "{}: SUBACK for {filter}",
                    self.id
                );
            }

            /// Unsubscribes and waits for the UNSUBACK.
            pub async fn unsubscribe(&mut self, filter: &str) -> client_api::UnsubAck {
                self.client
                    .unsubscribe(filter)
                    .await
                    .expect("unsubscribe request");
                let pkid = self
                    .expect_outgoing("outgoing UNSUBSCRIBE", |outgoing| match outgoing {
                        rumqttc::Outgoing::Unsubscribe(pkid) => Some(*pkid),
                        _ => None,
                    })
                    .await;
                self.expect_incoming("UNSUBACK", |packet| match packet {
                    client_api::Packet::UnsubAck(ack) if ack.pkid == pkid => Some(ack.clone()),
                    _ => None,
                })
                .await
            }

            /// The next PUBLISH from the broker; panics after `WAIT`.
            pub async fn next_publish(&mut self) -> client_api::Publish {
                self.expect_incoming("PUBLISH", |packet| match packet {
                    client_api::Packet::Publish(publish) => Some(publish.clone()),
                    _ => None,
                })
                .await
            }

            /// The next PUBLISH if one arrives within `within`.
            pub async fn try_next_publish(
                &mut self,
                within: Duration,
            ) -> Option<client_api::Publish> {
                let waited = self
                    .pump
                    .wait(within, |event| {
                        matches!(
                            event,
                            client_api::Event::Incoming(client_api::Packet::Publish(_))
                        )
                    })
                    .await;
                match waited {
                    Waited::Got(client_api::Event::Incoming(client_api::Packet::Publish(p))) => {
                        Some(p)
                    }
                    _ => None,
                }
            }

            /// Asserts no PUBLISH arrives within `within`.
            pub async fn expect_no_publish_for(&mut self, within: Duration) {
                if let Some(publish) = self.try_next_publish(within).await {
                    panic!("{}: expected no PUBLISH, got {publish:?}", self.id);
                }
            }

            /// Asserts no PUBLISH arrives within `QUIET`.
            pub async fn expect_no_publish(&mut self) {
                self.expect_no_publish_for(QUIET).await;
            }

            /// Acknowledges a received QoS 1/2 message (with `set_manual_acks(true)`).
            pub async fn ack(&self, publish: &client_api::Publish) {
                self.client.ack(publish).await.expect("ack request");
            }

            /// Sends DISCONNECT and waits until the broker has closed the connection.
            pub async fn disconnect(mut self) {
                self.client.disconnect().await.expect("disconnect request");
                self.expect_outgoing("outgoing DISCONNECT", |outgoing| {
                    matches!(outgoing, rumqttc::Outgoing::Disconnect).then_some(())
                })
                .await;
                let id = self.id.clone();
                self.pump.wait_closed(&id).await;
            }

            /// Drops the connection without DISCONNECT (an abnormal close for the broker).
            pub async fn abort(mut self) {
                self.pump.abort().await;
            }

            /// Asserts the broker closes the connection within `WAIT`; returns the client's error.
            pub async fn wait_closed(&mut self) -> client_api::ConnectionError {
                let id = self.id.clone();
                self.pump.wait_closed(&id).await
            }
        }
    };
}

pub mod v4 {
    use super::*;

    /// The names `driven_client!` expects, from rumqttc's MQTT 3.1.1 API.
    mod client_api {
        pub use rumqttc::{
            AsyncClient, ConnAck, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
            SubAck, SubscribeReasonCode, UnsubAck,
        };
    }
    #[allow(unused_imports)]
    pub use client_api::{ConnAck, ConnectionError, Publish, QoS};

    driven_client!(V4Client);

    impl V4Client {
        pub fn options(addr: SocketAddr, id: &str) -> client_api::MqttOptions {
            client_api::MqttOptions::new(id, addr.ip().to_string(), addr.port())
        }

        pub async fn connect(addr: SocketAddr, id: &str, clean_session: bool) -> (Self, ConnAck) {
            let mut options = Self::options(addr, id);
            options.set_clean_session(clean_session);
            Self::connect_with(options).await
        }
    }
}

pub mod v5 {
    use super::*;

    /// The names `driven_client!` expects, from rumqttc's MQTT 5 API.
    mod client_api {
        pub use rumqttc::v5::mqttbytes::v5::*;
        pub use rumqttc::v5::mqttbytes::QoS;
        pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
    }
    #[allow(unused_imports)]
    pub use client_api::{
        ConnAck, ConnectionError, Filter, LastWill, LastWillProperties, Publish, PublishProperties,
        QoS, RetainForwardRule, StateError, SubAck, SubscribeProperties, SubscribeReasonCode,
    };

    driven_client!(V5Client);

    /// A QoS 1 will with payload "gone" on `topic`, after `delay` seconds if given.
    pub fn will_gone(topic: &str, delay: Option<u32>) -> LastWill {
        let properties = LastWillProperties {
            delay_interval: delay,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        LastWill::new(topic, "gone", QoS::AtLeastOnce, false, Some(properties))
    }

    impl V5Client {
        pub fn options(addr: SocketAddr, id: &str) -> client_api::MqttOptions {
            client_api::MqttOptions::new(id, addr.ip().to_string(), addr.port())
        }

        /// Clean start, no session expiry (the session ends with the connection).
        pub async fn connect(addr: SocketAddr, id: &str) -> (Self, ConnAck) {
            Self::connect_with(Self::options(addr, id)).await
        }

        /// A client that accepts packets up to 1 MiB (rumqttc's default is 10 KiB), resuming
        /// its session (expiry one hour) when `persistent`.
        pub async fn connect_large(
            addr: SocketAddr,
            id: &str,
            persistent: bool,
        ) -> (Self, ConnAck) {
            let mut options = Self::options(addr, id);
            options.set_max_packet_size(Some(1 << 20));
            if persistent {
                options
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(3600));
            }
            Self::connect_with(options).await
        }

        /// `clean_start = false` with the given Session Expiry Interval.
        pub async fn connect_persistent(
            addr: SocketAddr,
            id: &str,
            session_expiry: u32,
        ) -> (Self, ConnAck) {
            let mut options = Self::options(addr, id);
            options
                .set_clean_start(false)
                .set_session_expiry_interval(Some(session_expiry));
            Self::connect_with(options).await
        }

        /// Publishes at QoS 1 and returns whether the broker accepted it (a PUBACK reason
        /// below 0x80). A cluster without a replication quorum refuses; the caller retries.
        pub async fn publish_accepted(&mut self, topic: &str, payload: impl Into<Vec<u8>>) -> bool {
            let payload: Vec<u8> = payload.into();
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish request");
            let pkid = self
                .expect_outgoing("outgoing PUBLISH", |outgoing| match outgoing {
                    rumqttc::Outgoing::Publish(pkid) if *pkid != 0 => Some(*pkid),
                    _ => None,
                })
                .await;
            self.expect_incoming("PUBACK", |packet| match packet {
                client_api::Packet::PubAck(ack) if ack.pkid == pkid => Some(matches!(
                    ack.reason,
                    client_api::PubAckReason::Success
                        | client_api::PubAckReason::NoMatchingSubscribers
                )),
                _ => None,
            })
            .await
        }

        /// Publishes with properties; waits like `publish`.
        pub async fn publish_with(
            &mut self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: impl Into<Vec<u8>>,
            properties: PublishProperties,
        ) {
            let payload: Vec<u8> = payload.into();
            self.client
                .publish_with_properties(topic, qos, retain, payload, properties)
                .await
                .expect("publish request");
            self.await_publish_done(qos).await;
        }

        /// Subscribes with full subscription options; returns the SUBACK.
        pub async fn subscribe_filter(
            &mut self,
            filter: Filter,
            properties: Option<SubscribeProperties>,
        ) -> SubAck {
            let request = match properties {
                Some(properties) => {
                    self.client
                        .subscribe_many_with_properties([filter], properties)
                        .await
                }
                None => self.client.subscribe_many([filter]).await,
            };
            request.expect("subscribe request");
            self.await_suback().await
        }

        /// Subscribes with a Subscription Identifier; asserts QoS `qos` was granted.
        pub async fn subscribe_with_id(&mut self, filter: &str, qos: QoS, id: usize) {
            let properties = SubscribeProperties {
                id: Some(id),
                user_properties: Vec::new(),
            };
            let suback = self
                .subscribe_filter(Filter::new(filter, qos), Some(properties))
                .await;
            assert_eq!(
                suback.return_codes,
                vec![SubscribeReasonCode::Success(qos)],
                "{}: SUBACK for {filter}",
                self.id
            );
        }

        /// The reason code of the DISCONNECT that ended the connection, if the broker sent one.
        pub fn server_disconnect_reason(
            error: &ConnectionError,
        ) -> Option<client_api::DisconnectReasonCode> {
            match error {
                ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code, ..
                }) => Some(*reason_code),
                _ => None,
            }
        }
    }
}
