//! Shared subscriptions seen from clients: one member per group gets each message, by the
//! configured strategy; messages of a member that goes away are handed to another.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::rumqtt::v4::{self, V4Client};
use common::rumqtt::v5::{QoS, V5Client};
use common::{TestBroker, QUIET, WAIT};
use telemq::config::ShareStrategy;
use tokio::time::Instant;

const MESSAGES: usize = 400;

/// Reads from every member in turn until `total` messages arrived in all, then checks nothing
/// more comes. Returns the payloads each member got.
async fn collect(members: &mut [V5Client], total: usize) -> Vec<Vec<String>> {
    let mut got: Vec<Vec<String>> = vec![Vec::new(); members.len()];
    let deadline = Instant::now() + WAIT * 2;
    while got.iter().map(Vec::len).sum::<usize>() < total {
        assert!(
            Instant::now() < deadline,
            "only {:?} of {total} messages arrived",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (member, received) in members.iter_mut().zip(&mut got) {
            while let Some(publish) = member.try_next_publish(Duration::from_millis(5)).await {
                received.push(String::from_utf8(publish.payload.to_vec()).unwrap());
            }
        }
    }
    for member in members.iter_mut() {
        member.expect_no_publish_for(QUIET / 2).await;
    }
    got
}

async fn members(broker: &TestBroker, group: &str, filter: &str, count: usize) -> Vec<V5Client> {
    let mut members = Vec::new();
    for i in 0..count {
        let (mut member, _) = V5Client::connect(broker.addr, &format!("{group}-member-{i}")).await;
        member
            .subscribe(&format!("$share/{group}/{filter}"), QoS::AtLeastOnce)
            .await;
        members.push(member);
    }
    members
}

async fn publish_numbered(publisher: &mut V5Client, topic: impl Fn(usize) -> String) {
    for i in 0..MESSAGES {
        publisher
            .publish(&topic(i), QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
}

/// Each message exactly once across the group.
fn assert_exactly_once(got: &[Vec<String>]) {
    let all: Vec<&String> = got.iter().flatten().collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        MESSAGES,
        "duplicates: {}",
        all.len() - distinct.len()
    );
    assert_eq!(distinct.len(), MESSAGES);
}

async fn broker_with(strategy: ShareStrategy) -> TestBroker {
    TestBroker::start_with(|config| config.shared.strategy = strategy).await
}

#[tokio::test]
async fn round_robin_gives_each_member_an_equal_share_and_other_subscribers_everything() {
    let broker = broker_with(ShareStrategy::RoundRobin).await;
    let mut group = members(&broker, "workers", "jobs/+", 4).await;
    let mut other_group = members(&broker, "audit", "jobs/#", 1).await;
    let (mut plain, _) = V5Client::connect(broker.addr, "plain").await;
    plain.subscribe("jobs/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "producer").await;
    publish_numbered(&mut publisher, |_| "jobs/a".into()).await;

    let got = collect(&mut group, MESSAGES).await;
    assert_exactly_once(&got);
    for (i, received) in got.iter().enumerate() {
        assert_eq!(
            received.len(),
            MESSAGES / 4,
            "member {i} got {}",
            received.len()
        );
    }
    // A second group on the same topic and a plain subscriber each get every message.
    assert_eq!(collect(&mut other_group, MESSAGES).await[0].len(), MESSAGES);
    assert_eq!(
        collect(std::slice::from_mut(&mut plain), MESSAGES).await[0].len(),
        MESSAGES
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn sticky_keeps_one_member_while_it_stays() {
    let broker = broker_with(ShareStrategy::Sticky).await;
    let mut group = members(&broker, "g", "jobs/+", 4).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "producer").await;
    publish_numbered(&mut publisher, |i| format!("jobs/{}", i % 7)).await;
    let got = collect(&mut group, MESSAGES).await;
    assert_exactly_once(&got);
    let served: Vec<usize> = got.iter().map(Vec::len).filter(|&n| n > 0).collect();
    assert_eq!(served, [MESSAGES], "one member takes everything");
    broker.shutdown().await;
}

#[tokio::test]
async fn hash_topic_keeps_each_topic_at_one_member_and_spreads_topics() {
    let broker = broker_with(ShareStrategy::HashTopic).await;
    let mut group = members(&broker, "g", "jobs/+", 4).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "producer").await;
    publish_numbered(&mut publisher, |i| format!("jobs/{}", i % 16)).await;
    let got = collect(&mut group, MESSAGES).await;
    assert_exactly_once(&got);
    let mut member_of_topic: BTreeMap<usize, usize> = BTreeMap::new();
    for (member, received) in got.iter().enumerate() {
        for payload in received {
            let topic = payload.parse::<usize>().unwrap() % 16;
            let first = *member_of_topic.entry(topic).or_insert(member);
            assert_eq!(first, member, "topic jobs/{topic} went to two members");
        }
    }
    let used: BTreeSet<usize> = member_of_topic.values().copied().collect();
    assert!(used.len() > 1, "16 topics all hashed to one member");
    broker.shutdown().await;
}

#[tokio::test]
async fn hash_client_keeps_each_publisher_at_one_member() {
    let broker = broker_with(ShareStrategy::HashClient).await;
    let mut group = members(&broker, "g", "jobs/#", 4).await;
    let mut publishers = Vec::new();
    for p in 0..8 {
        publishers.push(
            V5Client::connect(broker.addr, &format!("sensor-{p}"))
                .await
                .0,
        );
    }
    for i in 0..MESSAGES {
        let p = i % publishers.len();
        publishers[p]
            .publish("jobs/x", QoS::AtLeastOnce, false, format!("{p}:{i}"))
            .await;
    }
    let mut got = collect(&mut group, MESSAGES).await;
    for received in &mut got {
        for payload in received.iter_mut() {
            *payload = payload.split(':').nth(1).unwrap().to_owned();
        }
    }
    assert_exactly_once(&got);
    // Messages are numbered so that publisher = number % 8.
    let mut member_of_publisher: BTreeMap<usize, usize> = BTreeMap::new();
    for (member, received) in got.iter().enumerate() {
        for payload in received {
            let publisher = payload.parse::<usize>().unwrap() % publishers.len();
            let first = *member_of_publisher.entry(publisher).or_insert(member);
            assert_eq!(first, member, "sensor-{publisher} went to two members");
        }
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn random_and_least_loaded_deliver_once_and_use_every_member() {
    for strategy in [ShareStrategy::Random, ShareStrategy::LeastLoaded] {
        let broker = broker_with(strategy).await;
        let mut group = members(&broker, "g", "jobs/+", 4).await;
        let (mut publisher, _) = V5Client::connect(broker.addr, "producer").await;
        publish_numbered(&mut publisher, |_| "jobs/a".into()).await;
        let got = collect(&mut group, MESSAGES).await;
        assert_exactly_once(&got);
        for (i, received) in got.iter().enumerate() {
            // Expected 100 each; random falls under 50 with probability ~1e-8.
            assert!(
                received.len() >= 50,
                "{strategy:?}: member {i} got only {}",
                received.len()
            );
        }
        broker.shutdown().await;
    }
}

#[tokio::test]
async fn per_group_prefix_strategies_override_the_default() {
    let broker = TestBroker::start_with(|config| {
        config.shared.strategy = ShareStrategy::RoundRobin;
        config.shared.group.push(telemq::config::GroupStrategy {
            prefix: "pinned-".into(),
            strategy: ShareStrategy::Sticky,
        });
    })
    .await;
    let mut pinned = members(&broker, "pinned-a", "jobs/+", 3).await;
    let mut spread = members(&broker, "spread", "jobs/+", 3).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "producer").await;
    publish_numbered(&mut publisher, |_| "jobs/a".into()).await;
    let pinned = collect(&mut pinned, MESSAGES).await;
    let spread = collect(&mut spread, MESSAGES).await;
    assert_eq!(pinned.iter().filter(|r| !r.is_empty()).count(), 1);
    assert!(spread.iter().all(|r| r.len() >= MESSAGES / 3 - 1));
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_1_1_clients_share_through_share_and_queue_filters() {
    let broker = TestBroker::start().await;
    let mut share_members = Vec::new();
    let mut queue_members = Vec::new();
    for i in 0..2 {
        let (mut a, _) = V4Client::connect(broker.addr, &format!("s{i}"), true).await;
        a.subscribe("$share/g/t/#", v4::QoS::AtLeastOnce).await;
        share_members.push(a);
        let (mut b, _) = V4Client::connect(broker.addr, &format!("q{i}"), true).await;
        b.subscribe("$queue/t/#", v4::QoS::AtLeastOnce).await;
        queue_members.push(b);
    }
    let (mut publisher, _) = V4Client::connect(broker.addr, "producer", true).await;
    for i in 0..10 {
        publisher
            .publish("t/x", v4::QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    for members in [&mut share_members, &mut queue_members] {
        let mut counts = Vec::new();
        for member in members.iter_mut() {
            let mut n = 0;
            while member.try_next_publish(QUIET).await.is_some() {
                n += 1;
            }
            counts.push(n);
        }
        assert_eq!(counts, [5, 5]);
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn unacked_messages_of_a_member_that_leaves_go_to_another_member() {
    let broker = TestBroker::start().await;
    let leaver = member_holding_ten_jobs(&broker, V5Client::options(broker.addr, "leaver")).await;
    let (mut stayer, _) = V5Client::connect(broker.addr, "stayer").await;
    stayer.subscribe("$share/g/jobs", QoS::AtLeastOnce).await;
    leaver.abort().await;
    let got = collect(std::slice::from_mut(&mut stayer), 10).await;
    assert_eq!(job_numbers(&got[0]), (0..10).collect::<Vec<_>>());
    broker.shutdown().await;
}

/// Connects `options` with manual acknowledgements as a member of `$share/g/jobs`, publishes
/// jobs 0 to 9 and returns once the member holds all ten, acknowledging none.
async fn member_holding_ten_jobs(
    broker: &TestBroker,
    mut options: rumqttc::v5::MqttOptions,
) -> V5Client {
    options.set_manual_acks(true);
    let (mut member, _) = V5Client::connect_with(options).await;
    member.subscribe("$share/g/jobs", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "producer").await;
    for i in 0..10 {
        publisher
            .publish("jobs", QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    for _ in 0..10 {
        member.next_publish().await;
    }
    member
}

fn job_numbers(payloads: &[String]) -> Vec<usize> {
    let mut numbers: Vec<usize> = payloads.iter().map(|p| p.parse().unwrap()).collect();
    numbers.sort_unstable();
    numbers
}

#[tokio::test]
async fn with_no_member_online_persistent_members_queue_and_keep_it_across_a_restart() {
    let broker = TestBroker::start().await;
    for id in ["p0", "p1"] {
        let (mut member, _) = V5Client::connect_persistent(broker.addr, id, 3600).await;
        member.subscribe("$share/g/jobs", QoS::AtLeastOnce).await;
        member.disconnect().await;
    }
    let (mut publisher, _) = V5Client::connect(broker.addr, "producer").await;
    for i in 0..10 {
        publisher
            .publish("jobs", QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    drop(publisher);
    let broker = broker.restart().await;
    let mut members = Vec::new();
    for id in ["p0", "p1"] {
        let (member, connack) = V5Client::connect_persistent(broker.addr, id, 3600).await;
        assert!(connack.session_present);
        members.push(member);
    }
    let got = collect(&mut members, 10).await;
    let all: BTreeSet<&String> = got.iter().flatten().collect();
    assert_eq!(all.len(), 10);
    assert_eq!(got[0].len(), 5, "round robin over the two offline members");
    broker.shutdown().await;
}

#[tokio::test]
async fn deliveries_handed_to_an_offline_member_stay_with_it_across_a_restart() {
    let broker = TestBroker::start().await;
    let (mut stayer, _) = V5Client::connect_persistent(broker.addr, "stayer", 3600).await;
    stayer.subscribe("$share/g/jobs", QoS::AtLeastOnce).await;
    stayer.disconnect().await;
    let mut options = V5Client::options(broker.addr, "leaver");
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    // The online member gets all ten, stored as its deliveries, and acknowledges none.
    let leaver = member_holding_ten_jobs(&broker, options).await;
    // Its connection goes: the ten move to the offline member, in storage too (an entry of
    // the stayer's and a record masking the leaver's delivery for each).
    leaver.abort().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let counts = broker.broker().storage_key_counts().await;
        if counts.contains(&("queue", 20)) {
            break;
        }
        assert!(Instant::now() < deadline, "not handed over: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let broker = broker.restart().await;

    let (mut leaver, connack) = V5Client::connect_persistent(broker.addr, "leaver", 3600).await;
    assert!(connack.session_present);
    leaver.expect_no_publish().await;
    let (mut stayer, connack) = V5Client::connect_persistent(broker.addr, "stayer", 3600).await;
    assert!(connack.session_present);
    let got = collect(std::slice::from_mut(&mut stayer), 10).await;
    assert_eq!(job_numbers(&got[0]), (0..10).collect::<Vec<_>>());
    stayer.expect_no_publish().await;
    broker.shutdown().await;
}
