//! SUBSCRIBE and UNSUBSCRIBE: filters checked (syntax, depth, ACL, limits), the router and the
//! session's own list updated, the change made durable before SUBACK / UNSUBACK, and retained
//! messages queued behind the SUBACK.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::pending::Action;
use super::{Close, Connection};
use crate::clock;
use crate::message::Delivery;
use crate::metrics;
use crate::protocol::encode;
use crate::protocol::validate::{is_valid_filter, split_shared};
use crate::protocol::{
    ProtocolError, ReasonCode, RetainHandling, Subscribe, SubscriptionOptions, Unsubscribe,
};
use crate::session::SessionState;
use crate::storage::ops;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(super) async fn handle_subscribe(&mut self, subscribe: Subscribe) -> Result<(), Close> {
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
                let now = clock::now();
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
                ops.push(ops::subscription_put(
                    &self.client_id,
                    &request.filter,
                    &options,
                ));
            }
            codes.push(options.qos as u8);
            self.session.subscriptions.insert(request.filter, options);
        }
        // Retained messages sent to a persistent session are queued deliveries like any other:
        // stored in the same batch, so a crash before they are acknowledged does not lose them.
        ops.extend(
            self.state
                .publish
                .store_deliveries(&self.handle, &mut retained),
        );
        self.record_subscriptions().await;
        if let Some(cluster) = &self.state.cluster {
            cluster
                .settle_interest(self.state.router.interest_version())
                .await;
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

    /// In a cluster, a persistent session's subscriptions are recorded cluster-wide before
    /// they are acknowledged, so the session resumes with them on any node.
    async fn record_subscriptions(&mut self) {
        let (Some(cluster), Some(ownership)) = (&self.state.cluster, &mut self.ownership) else {
            return;
        };
        if !self.handle.is_persistent() {
            return;
        }
        cluster
            .record_subscriptions(
                &self.client_id,
                ownership,
                self.session_expiry,
                subscription_list(&self.session),
            )
            .await;
    }

    pub(super) async fn handle_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
    ) -> Result<(), Close> {
        let persistent = self.handle.is_persistent();
        let mut codes = Vec::with_capacity(unsubscribe.filters.len());
        let mut ops = Vec::new();
        for filter in &unsubscribe.filters {
            let existed = self.session.subscriptions.remove(filter).is_some();
            self.state.router.unsubscribe(&self.client_id, filter);
            if existed && persistent {
                ops.push(ops::subscription_delete(&self.client_id, filter));
            }
            codes.push(if existed {
                ReasonCode::Success as u8
            } else {
                ReasonCode::NoSubscriptionExisted as u8
            });
        }
        self.record_subscriptions().await;
        // [MQTT-3.10.4-4] UNSUBACK even when nothing was removed.
        let packet_id = unsubscribe.packet_id;
        self.reply_after(ops, |out, version| {
            encode::unsuback(version, packet_id, &codes, out)
        })
        .await
    }
}

/// A session's subscriptions as the cluster records them.
pub(super) fn subscription_list(session: &SessionState) -> Vec<(String, SubscriptionOptions)> {
    session
        .subscriptions
        .iter()
        .map(|(filter, options)| (filter.clone(), options.clone()))
        .collect()
}
