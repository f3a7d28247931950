//! Traffic that makes a broker's metrics move, shared by the metrics and monitoring tests.

use std::net::SocketAddr;

use super::packets;
use super::rumqtt::v5::{QoS, V5Client};
use super::{raw_v5, RawClient};

/// Five connections: an offline persistent session subscribed to `m/#`, a shared-group member
/// (`$share/g/m/#`, returned) and a publisher (returned) that sends `m/0` (QoS 0), `m/1` (QoS 1,
/// retained), `m/2` (QoS 2) and `$delayed/3600/m/later`; then a CONNECT refused for its empty
/// client id and a connection closed for a malformed packet.
pub async fn mixed(addr: SocketAddr) -> (V5Client, V5Client) {
    let (mut offline, _) = V5Client::connect_persistent(addr, "offline", 3600).await;
    offline.subscribe("m/#", QoS::AtLeastOnce).await;
    offline.disconnect().await;
    let (mut member, _) = V5Client::connect(addr, "member").await;
    member.subscribe("$share/g/m/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(addr, "publisher").await;
    publisher.publish("m/0", QoS::AtMostOnce, false, "a").await;
    publisher.publish("m/1", QoS::AtLeastOnce, true, "b").await;
    publisher.publish("m/2", QoS::ExactlyOnce, false, "c").await;
    publisher
        .publish("$delayed/3600/m/later", QoS::AtLeastOnce, false, "d")
        .await;
    let mut refused = RawClient::connect(addr).await;
    refused.send(&packets::connect_v4("", false, 60)).await;
    refused.expect_closed().await;
    let mut offender = raw_v5(addr, "offender").await;
    offender.send(&[0x30, 0x02, 0x00, 0x01]).await;
    offender.expect_closed().await;
    (member, publisher)
}
