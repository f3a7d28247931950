//! Security counters through a real scrape, with exact deltas: each refusal or denial moves its
//! own series by one. One test in its own binary, so the process-wide recorder counts only it.

mod common;

use common::packets;
use common::scrape::{scrape, value};
use common::{RawClient, TestBroker};

async fn suback(client: &mut RawClient, packet_id: u16, filter: &str) -> u8 {
    client
        .send(&packets::subscribe(packet_id, filter, 1, Some(&[])))
        .await;
    *client.recv_type(9).await.body.last().unwrap()
}

#[tokio::test]
async fn refusals_and_denials_are_counted_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut passwords = telemq::auth::password::PasswordFile::default();
    passwords.set("alice", b"right").unwrap();
    let passwd = dir.path().join("passwd");
    telemq::auth::password::write_file(&passwd, &passwords).unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\n").unwrap();
    let broker = TestBroker::start_with(|c| {
        c.auth.password_file = Some(passwd.clone());
        c.auth.acl_file = Some(acl.clone());
        c.mqtt.max_subscriptions_per_client = 1;
    })
    .await;
    let before = scrape(&broker).await;

    let mut wrong = RawClient::connect(broker.addr).await;
    let answer = wrong
        .connect_with(&packets::connect_v5_login("w", "alice", b"wrong"))
        .await
        .unwrap();
    assert_eq!(answer.body[1], 0x86);
    let mut anonymous = RawClient::connect(broker.addr).await;
    let answer = anonymous
        .connect_with(&packets::connect_v5("anon", true, 60, &[]))
        .await
        .unwrap();
    assert_eq!(answer.body[1], 0x87);

    let mut alice = RawClient::connect(broker.addr).await;
    let answer = alice
        .connect_with(&packets::connect_v5_login("a", "alice", b"right"))
        .await
        .unwrap();
    assert_eq!(answer.body[1], 0);
    assert_eq!(alice.publish_qos1_v5("bob/x", 1, b"no").await, 0x87);
    assert_eq!(suback(&mut alice, 2, "bob/#").await, 0x87);
    assert_eq!(suback(&mut alice, 3, "alice/#").await, 1);
    assert_eq!(suback(&mut alice, 4, "alice/more/#").await, 0x97);

    let after = scrape(&broker).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        delta("telemq_auth_failures_total{reason=\"bad_password\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_auth_failures_total{reason=\"anonymous\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_connections_refused_total{reason=\"bad_username_or_password\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_connections_refused_total{reason=\"not_authorized\"}"),
        1.0
    );
    assert_eq!(delta("telemq_acl_denied_total{action=\"publish\"}"), 1.0);
    assert_eq!(delta("telemq_acl_denied_total{action=\"subscribe\"}"), 1.0);
    assert_eq!(
        delta("telemq_messages_dropped_total{reason=\"not_authorized\"}"),
        1.0
    );
    assert_eq!(
        delta("telemq_subscriptions_refused_total{reason=\"max_subscriptions\"}"),
        1.0
    );
    broker.shutdown().await;
}
