//! A cluster of telemq nodes over real NATS servers (JetStream on), on loopback: routing,
//! shared groups, retained messages, session takeover, wills and failures across nodes.
//! Each test starts its own NATS servers and nodes on free ports.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::nats::NatsServer;
use common::packets;
use common::rumqtt::v5::{Filter, QoS, V5Client};
use common::{RawClient, TestBroker, WAIT};

/// NATS servers and three telemq nodes; node `i` prefers server `i % servers`.
struct Cluster {
    nodes: Vec<TestBroker>,
    nats: Vec<NatsServer>,
}

/// The replication log's byte limit in tests.
const TEST_LOG_BYTES: u64 = 64 << 20;

async fn node(name: &str, urls: Vec<String>) -> TestBroker {
    let name = name.to_string();
    TestBroker::start_with(move |config| {
        config.cluster.enabled = true;
        config.cluster.node_id = name;
        // The buckets survive the loss of a NATS server when there are three.
        config.cluster.replicas = urls.len();
        // A small forward queue: publishers meet its back-pressure in every test.
        config.cluster.forward_queue = 64;
        config.cluster.nats_urls = urls;
        config.cluster.request_timeout = Duration::from_secs(2);
        // JetStream reserves a stream's byte limit on disk up front: small on a test machine.
        config.cluster.log_max_bytes = TEST_LOG_BYTES;
    })
    .await
}

impl Cluster {
    async fn start(servers: usize) -> Self {
        let nats = NatsServer::cluster(servers);
        let urls: Vec<String> = nats.iter().map(NatsServer::url).collect();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let mut preferred = urls.clone();
            preferred.rotate_left(i % servers);
            nodes.push(node(&format!("node-{i}"), preferred).await);
        }
        Self { nodes, nats }
    }

    fn addr(&self, node: usize) -> std::net::SocketAddr {
        self.nodes[node].addr
    }

    async fn shutdown(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
        drop(self.nats);
    }
}

/// A clean-start client on `addr` subscribed to `filter`.
async fn subscribed(addr: std::net::SocketAddr, id: &str, filter: &str, qos: QoS) -> V5Client {
    let (mut client, _) = V5Client::connect(addr, id).await;
    subscribe(&mut client, filter, qos).await;
    client
}

async fn subscribe(client: &mut V5Client, filter: &str, qos: QoS) {
    let suback = client
        .subscribe_filter(Filter::new(filter, qos), None)
        .await;
    assert_eq!(
        suback.return_codes,
        vec![common::rumqtt::v5::SubscribeReasonCode::Success(qos)],
        "SUBACK for {filter}"
    );
}

/// The next `count` messages, then nothing more for a while.
async fn receive(client: &mut V5Client, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let publish = client.next_publish().await;
        let topic = String::from_utf8(publish.topic.to_vec()).expect("utf-8 topic");
        got.push((topic, publish.payload.to_vec()));
    }
    client.expect_no_publish().await;
    got
}

/// Payloads received until none arrives for a while, for probes that retry.
/// Publishes at QoS 1 until the cluster accepts (it refuses while a NATS failover leaves the
/// replication log without a leader).
async fn publish_until_accepted(client: &mut V5Client, topic: &str, payload: &[u8]) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while !client.publish_accepted(topic, payload.to_vec()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{topic}: still refused"
        );
    }
}

async fn drain(client: &mut V5Client) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    while let Some(publish) = client.try_next_publish(Duration::from_millis(500)).await {
        let topic = String::from_utf8(publish.topic.to_vec()).expect("utf-8 topic");
        got.push((topic, publish.payload.to_vec()));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_nodes_once_per_client_in_order_at_every_qos() {
    let cluster = Cluster::start(1).await;
    // Overlapping filters of one client on node 1, and overlapping filters of clients on two
    // nodes: each client gets each message once.
    let mut overlapping =
        subscribed(cluster.addr(1), "overlapping", "a/+/c", QoS::AtLeastOnce).await;
    subscribe(&mut overlapping, "a/#", QoS::ExactlyOnce).await;
    let mut everything = subscribed(cluster.addr(2), "everything", "#", QoS::AtMostOnce).await;
    let mut parent = subscribed(cluster.addr(2), "parent", "a/#", QoS::AtLeastOnce).await;

    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "publisher").await;
    let qos_levels = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for i in 0..60u32 {
        let qos = qos_levels[(i % 3) as usize];
        publisher
            .publish("a/b/c", qos, false, i.to_be_bytes().to_vec())
            .await;
    }
    // `a/#` matches its parent level; `#` does not match `$` topics [MQTT-4.7.2-1].
    publisher
        .publish("a", QoS::AtLeastOnce, false, b"parent".to_vec())
        .await;
    publisher
        .publish("$internal/x", QoS::AtLeastOnce, false, b"dollar".to_vec())
        .await;

    let expected: Vec<(String, Vec<u8>)> = (0..60u32)
        .map(|i| ("a/b/c".to_string(), i.to_be_bytes().to_vec()))
        .chain([("a".to_string(), b"parent".to_vec())])
        .collect();
    // In order per topic and QoS [MQTT-4.6.0-6]: QoS 0 (and QoS 1 that no persistent session
    // wants) crosses nodes through core NATS, QoS 2 through the replication log, so they may
    // interleave differently. The parent topic's message counts with QoS 1.
    let by_qos = |messages: &[(String, Vec<u8>)], qos: u32| -> Vec<(String, Vec<u8>)> {
        messages
            .iter()
            .filter(|(topic, payload)| {
                let of = if topic == "a/b/c" {
                    u32::from_be_bytes(payload[..4].try_into().unwrap()) % 3
                } else {
                    1
                };
                of == qos
            })
            .cloned()
            .collect()
    };
    for (client, what) in [
        (&mut overlapping, "overlapping filters on one node"),
        (&mut parent, "a/# on another node"),
        (&mut everything, "# on another node, no $ topic"),
    ] {
        let got = receive(client, expected.len()).await;
        for qos in 0..3 {
            assert_eq!(by_qos(&got, qos), by_qos(&expected, qos), "{what}");
        }
    }
    // Interest: NATS sends a node only what its own clients subscribed to. Node 0 has no
    // subscriber and subscribes to no topic subject.
    let topic_subjects = |node: &str| -> Vec<String> {
        let mut subjects: Vec<String> = cluster.nats[0]
            .subscriptions_of(&format!("telemq-{node}"))
            .into_iter()
            .filter(|s| s.starts_with("telemq.t.") || s.starts_with("telemq.d."))
            .collect();
        subjects.sort();
        subjects
    };
    assert_eq!(topic_subjects("node-0"), Vec::<String>::new());
    assert_eq!(
        topic_subjects("node-1"),
        vec!["telemq.t.a", "telemq.t.a.*.c", "telemq.t.a.>"]
    );
    assert_eq!(
        topic_subjects("node-2"),
        vec!["telemq.t.>", "telemq.t.a", "telemq.t.a.>"]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_properties_and_no_local_survive_the_hop() {
    use common::rumqtt::v5::PublishProperties;
    let cluster = Cluster::start(1).await;
    let mut subscriber = subscribed(cluster.addr(1), "props-sub", "p/#", QoS::AtMostOnce).await;
    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "props-pub").await;
    let mut filter = Filter::new("p/#", QoS::AtLeastOnce);
    filter.nolocal = true;
    publisher.subscribe_filter(filter, None).await;
    let properties = PublishProperties {
        message_expiry_interval: Some(100),
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        correlation_data: Some(b"corr".to_vec().into()),
        response_topic: Some("p/reply".into()),
        ..PublishProperties::default()
    };
    publisher
        .publish_with("p/1", QoS::AtLeastOnce, false, b"x".to_vec(), properties)
        .await;
    let got = subscriber.next_publish().await;
    assert_eq!(
        got.qos,
        QoS::AtMostOnce,
        "downgraded to the subscription's QoS"
    );
    let props = got.properties.expect("properties");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr"[..]));
    assert_eq!(props.response_topic.as_deref(), Some("p/reply"));
    let expiry = props.message_expiry_interval.expect("expiry forwarded");
    assert!((99..=100).contains(&expiry), "remaining expiry {expiry}");
    // No Local: the publisher's own subscription on its own node gets nothing back.
    publisher.expect_no_publish().await;
    // The only subscriber is on another node: the PUBACK must not say "no matching subscribers"
    // (0x10), which a single node answers when it has none.
    // Retain As Published, per subscription, on the receiving node [MQTT-3.3.1-12].
    let (mut as_published, _) = V5Client::connect(cluster.addr(2), "rap").await;
    let mut keep_flag = Filter::new("rap/#", QoS::AtLeastOnce);
    keep_flag.preserve_retain = true;
    as_published.subscribe_filter(keep_flag, None).await;
    let mut plain = subscribed(cluster.addr(2), "rap-plain", "rap/#", QoS::AtLeastOnce).await;
    publisher
        .publish("rap/1", QoS::AtLeastOnce, true, b"kept".to_vec())
        .await;
    assert!(
        as_published.next_publish().await.retain,
        "retain flag as published"
    );
    assert!(!plain.next_publish().await.retain, "retain flag cleared");
    let mut raw = common::raw_v5(cluster.addr(0), "raw-pub").await;
    assert_eq!(raw.publish_qos1_v5("p/raw", 1, b"r").await, 0x00);
    assert_eq!(receive(&mut subscriber, 1).await[0].0, "p/raw");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_set_and_cleared_from_any_node() {
    let cluster = Cluster::start(1).await;
    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "retainer").await;
    publisher
        .publish("r/temp", QoS::AtLeastOnce, true, b"21".to_vec())
        .await;
    // The retained message reaches every node's mirror through the bucket.
    for node in 1..3 {
        let got = retained_on(&cluster, node, "r/+").await;
        assert_eq!(
            got,
            vec![("r/temp".to_string(), b"21".to_vec())],
            "node {node}"
        );
    }
    // Cleared from another node.
    let (mut clearer, _) = V5Client::connect(cluster.addr(2), "clearer").await;
    clearer
        .publish("r/temp", QoS::AtLeastOnce, true, Vec::new())
        .await;
    for node in 0..3 {
        wait_for_retained(&cluster, node, "r/#", 0).await;
    }
    cluster.shutdown().await;
}

/// What one new subscription on `node` gets at once: the retained messages.
async fn probe_retained(cluster: &Cluster, node: usize, filter: &str) -> Vec<(String, Vec<u8>)> {
    let mut probe = subscribed(
        cluster.addr(node),
        &format!("probe-{node}"),
        filter,
        QoS::AtLeastOnce,
    )
    .await;
    let got = drain(&mut probe).await;
    probe.disconnect().await;
    got
}

/// The retained messages a new subscription on `node` gets, once there are some.
async fn retained_on(cluster: &Cluster, node: usize, filter: &str) -> Vec<(String, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = probe_retained(cluster, node, filter).await;
        if !got.is_empty() || tokio::time::Instant::now() > deadline {
            return got;
        }
    }
}

async fn wait_for_retained(cluster: &Cluster, node: usize, filter: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = probe_retained(cluster, node, filter).await;
        if got.len() == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {node}: {} retained on {filter}, wanted {count}",
            got.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart_of_every_node() {
    let mut cluster = Cluster::start(1).await;
    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "retainer").await;
    publisher
        .publish("keep/me", QoS::AtLeastOnce, true, b"kept".to_vec())
        .await;
    wait_for_retained(&cluster, 2, "keep/#", 1).await;
    publisher.disconnect().await;
    let url = cluster.nats[0].url();
    let mut restarted = Vec::new();
    for (i, node) in cluster.nodes.drain(..).enumerate() {
        node.shutdown().await;
        // A fresh data directory: only the cluster's bucket can bring the message back.
        restarted.push(self::node(&format!("node-{i}"), vec![url.clone()]).await);
    }
    cluster.nodes = restarted;
    let got = retained_on(&cluster, 1, "keep/#").await;
    assert_eq!(got, vec![("keep/me".to_string(), b"kept".to_vec())]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_the_node_its_client_connects_to() {
    let cluster = Cluster::start(1).await;
    let (mut first, connack) = V5Client::connect_persistent(cluster.addr(0), "mover", 600).await;
    assert!(!connack.session_present);
    subscribe(&mut first, "move/#", QoS::AtLeastOnce).await;

    let (mut second, connack) = V5Client::connect_persistent(cluster.addr(1), "mover", 600).await;
    assert!(connack.session_present, "the session came from node 0");
    // The old connection is told why it is closed [MQTT-3.1.4-3].
    let error = first.wait_closed().await;
    assert_eq!(
        V5Client::server_disconnect_reason(&error),
        Some(rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver)
    );
    // Its subscription came along: a message published on node 2 reaches node 1, once.
    let (mut publisher, _) = V5Client::connect(cluster.addr(2), "mover-pub").await;
    publisher
        .publish("move/1", QoS::AtLeastOnce, false, b"here".to_vec())
        .await;
    assert_eq!(
        receive(&mut second, 1).await,
        vec![("move/1".to_string(), b"here".to_vec())]
    );
    cluster.shutdown().await;
}

/// CONNECT with the given client id; the CONNACK's reason code, and the client if accepted.
async fn raw_connect(addr: std::net::SocketAddr, id: &str) -> (u8, RawClient) {
    let mut client = RawClient::connect(addr).await;
    let connack = client
        .connect_with(&packets::connect_v5(id, true, 60, &[]))
        .await
        .expect("an answer to CONNECT");
    assert_eq!(connack.packet_type(), 2, "CONNACK");
    (connack.body[1], client)
}

/// Whether the broker still serves `client`: PINGREQ answered with PINGRESP.
async fn still_connected(client: &mut RawClient) -> bool {
    client.send_lenient(&[0xC0, 0x00]).await;
    loop {
        match client.recv().await {
            Some(packet) if packet.packet_type() == 13 => return true,
            Some(_) => continue,
            None => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_simultaneous_connects_on_two_nodes_exactly_one_stays() {
    let cluster = Cluster::start(1).await;
    let mut refused = 0;
    for round in 0..100 {
        let id = format!("racer-{round}");
        let (a, b) = tokio::join!(
            raw_connect(cluster.addr(0), &id),
            raw_connect(cluster.addr(1), &id)
        );
        let mut connected = 0;
        for (reason, mut client) in [a, b] {
            match reason {
                0 => {
                    // A takeover closes the loser before the winner's CONNACK leaves, so a
                    // client that is still answered now is the one that stays.
                    if still_connected(&mut client).await {
                        connected += 1;
                    }
                }
                0x89 => refused += 1,
                other => panic!("round {round}: CONNACK reason {other:#x}"),
            }
        }
        assert_eq!(connected, 1, "round {round}: exactly one connection stays");
    }
    eprintln!("{refused} of 100 races ended with a refused CONNECT (Server Busy), the others with a takeover");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shared_group_gets_each_message_once_across_nodes() {
    let cluster = Cluster::start(1).await;
    let mut members = Vec::new();
    for (i, node) in [0, 1, 2].into_iter().enumerate() {
        let member = subscribed(
            cluster.addr(node),
            &format!("g-{i}"),
            "$share/g/work/+",
            QoS::AtLeastOnce,
        )
        .await;
        members.push(member);
    }
    let mut other_group =
        subscribed(cluster.addr(2), "h-0", "$share/h/work/#", QoS::AtLeastOnce).await;

    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "worker-pub").await;
    publish_numbered(&mut publisher, "work/item", QoS::AtLeastOnce, 90).await;
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.values().sum::<usize>() < 90 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "group g got {seen:?}"
        );
        for member in &mut members {
            if let Some(publish) = member.try_next_publish(Duration::from_millis(10)).await {
                *seen.entry(publish.payload.to_vec()).or_default() += 1;
            }
        }
    }
    for member in &mut members {
        member.expect_no_publish().await;
    }
    assert_eq!(seen.len(), 90, "every message reached group g");
    assert!(
        seen.values().all(|&n| n == 1),
        "no message twice in group g"
    );
    assert_eq!(
        receive(&mut other_group, 90).await.len(),
        90,
        "group h got every message too"
    );
    // QoS 0 crosses on other subjects than QoS 1/2's copies for shared groups.
    publish_numbered(&mut publisher, "work/light", QoS::AtMostOnce, 10).await;
    assert_eq!(
        receive(&mut other_group, 10).await.len(),
        10,
        "group h got the QoS 0 messages"
    );
    cluster.shutdown().await;
}

/// Publishes `count` messages on `topic`, each its number as 4 bytes.
async fn publish_numbered(publisher: &mut V5Client, topic: &str, qos: QoS, count: u32) {
    for i in 0..count {
        publisher
            .publish(topic, qos, false, i.to_be_bytes().to_vec())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_and_a_delayed_message_are_published_once_across_nodes() {
    use common::rumqtt::v5::LastWill;
    let cluster = Cluster::start(1).await;
    let mut watcher = subscribed(cluster.addr(1), "watcher", "status/#", QoS::AtLeastOnce).await;
    let mut watcher2 = subscribed(cluster.addr(2), "watcher2", "status/#", QoS::AtLeastOnce).await;

    let mut options = V5Client::options(cluster.addr(0), "dying");
    options.set_last_will(LastWill::new(
        "status/dying",
        b"gone".to_vec(),
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (dying, _) = V5Client::connect_with(options).await;
    dying.abort().await;

    let (mut scheduler, _) = V5Client::connect(cluster.addr(0), "scheduler").await;
    scheduler
        .publish(
            "$delayed/1/status/later",
            QoS::AtLeastOnce,
            false,
            b"late".to_vec(),
        )
        .await;
    let wanted = vec![
        ("status/dying".to_string(), b"gone".to_vec()),
        ("status/later".to_string(), b"late".to_vec()),
    ];
    for watcher in [&mut watcher, &mut watcher2] {
        let mut got = Vec::new();
        while got.len() < 2 {
            let publish = watcher.next_publish().await;
            got.push((
                String::from_utf8(publish.topic.to_vec()).expect("topic"),
                publish.payload.to_vec(),
            ));
        }
        got.sort();
        assert_eq!(got, wanted);
        watcher.expect_no_publish().await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_keeps_serving_when_one_nats_server_of_three_dies() {
    let mut cluster = Cluster::start(3).await;
    // Every bucket is read from its leader: a follower's direct answer may miss the last write.
    let streams = cluster.nats[0].streams();
    let buckets: Vec<&str> = streams
        .split("\"config\":{\"name\":\"")
        .skip(1)
        .filter(|config| config.starts_with("KV_"))
        .collect();
    assert!(
        buckets.len() >= 5
            && buckets
                .iter()
                .all(|config| config.contains("\"allow_direct\":false")),
        "buckets answering direct gets: {streams}"
    );
    // Node 0 prefers server 0, which dies; node 0 fails over to another server.
    let mut subscriber =
        subscribed(cluster.addr(1), "survivor-sub", "alive/#", QoS::AtLeastOnce).await;
    cluster.nats[0].kill();
    // The buckets may elect new leaders first: a CONNECT meanwhile is refused, and retried.
    let (mut publisher, _) = connect_when_available(&cluster, 2, "survivor-pub").await;
    publish_until_accepted(&mut publisher, "alive/1", b"1").await;
    // Node 1's reading of the log moves to the log consumer's new leader: a few seconds.
    let delivered = subscriber.try_next_publish(WAIT * 4).await;
    assert_eq!(
        delivered.map(|publish| publish.payload.to_vec()),
        Some(b"1".to_vec())
    );
    // Node 0, cut off from its server, reconnects to another and routes again.
    let (mut from_zero, _) = connect_when_available(&cluster, 0, "survivor-pub0").await;
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    let mut delivered = 0;
    let mut n = 0u32;
    while delivered == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 0 never routed again"
        );
        n += 1;
        publish_until_accepted(&mut from_zero, "alive/0", &n.to_be_bytes()).await;
        delivered = drain(&mut subscriber).await.len();
    }
    // A takeover (a cross-node state change) works again too.
    let (_, connack) = connect_when_available(&cluster, 0, "survivor-sub").await;
    assert_eq!(
        connack.code,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
    );
    cluster.shutdown().await;
}

/// QoS 1 for clean sessions only is handed to the other nodes directly; when the NATS server
/// one node is connected to dies under load, the batches that node cannot answer go through
/// the log, which it reads once it reconnected. On that node and on one that answered, every
/// acknowledged message arrives, and none overtakes an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_qos1_across_nodes_survives_the_death_of_a_nats_server_complete_and_in_order() {
    clean_load_survives_the_death_of_a_nats_server(QoS::AtLeastOnce).await;
}

/// As for QoS 1, and exactly once: the node that delivered a batch before it went through the
/// log does not deliver the log's copy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_qos2_across_nodes_survives_the_death_of_a_nats_server_exactly_once_in_order() {
    clean_load_survives_the_death_of_a_nats_server(QoS::ExactlyOnce).await;
}

async fn clean_load_survives_the_death_of_a_nats_server(qos: QoS) {
    let mut cluster = Cluster::start(3).await;
    // Node 1 prefers server 1, which dies; the publisher's node 0 and node 2 keep theirs.
    let mut cut_off = subscribed(cluster.addr(1), "cut-off-sub", "load/#", qos).await;
    let mut answering = subscribed(cluster.addr(2), "answering-sub", "load/#", qos).await;
    let mut publisher = common::raw_v5(cluster.addr(0), "load-pub").await;
    const TOTAL: u32 = 12_000;
    const WINDOW: usize = 400;
    let mut accepted = Vec::new();
    let mut refused = 0;
    let payloads: Vec<u32> = (0..TOTAL).collect();
    for (round, window) in payloads.chunks(WINDOW).enumerate() {
        if round == 8 {
            cluster.nats[1].kill();
        }
        let payloads: Vec<[u8; 4]> = window.iter().map(|n| n.to_be_bytes()).collect();
        let publishes: Vec<(&str, u16, &[u8])> = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| ("load/1", i as u16 + 1, &payload[..]))
            .collect();
        let acks = if qos == QoS::ExactlyOnce {
            publisher.publish_qos2_window_v5(&publishes).await
        } else {
            publisher.publish_qos1_window_v5(&publishes).await
        };
        for (n, ack) in window.iter().zip(acks) {
            if ack.first().copied().unwrap_or(0) == 0 {
                accepted.push(*n);
            } else {
                refused += 1;
            }
        }
    }
    assert!(
        accepted.len() > TOTAL as usize / 2,
        "{refused} of {TOTAL} refused"
    );
    for (name, subscriber) in [("cut off", &mut cut_off), ("answering", &mut answering)] {
        let first_seen = receive_all(subscriber, &accepted, qos == QoS::ExactlyOnce)
            .await
            .unwrap_or_else(|problem| panic!("node {name}: {problem} ({refused} refused)"));
        let delivered_accepted: Vec<u32> = first_seen
            .into_iter()
            .filter(|n| accepted.binary_search(n).is_ok())
            .collect();
        assert_eq!(
            delivered_accepted, accepted,
            "node {name}: every acknowledged message, in order ({refused} refused)"
        );
    }
    cluster.shutdown().await;
}

/// Receives until every one of `accepted` (sorted numbers, each a 4-byte payload) arrived;
/// returns the numbers in the order of their first copy. With `once`, a second copy of any
/// message is an error: it comes before the last accepted message, since a log copy comes
/// before anything published after the batch it copies (`cluster::direct`, "Order").
async fn receive_all(
    subscriber: &mut V5Client,
    accepted: &[u32],
    once: bool,
) -> Result<Vec<u32>, String> {
    let mut first_seen = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut accepted_seen = 0;
    while accepted_seen < accepted.len() {
        let Some(publish) = subscriber.try_next_publish(WAIT * 4).await else {
            let missing: Vec<u32> = accepted
                .iter()
                .filter(|n| !seen.contains(*n))
                .copied()
                .take(20)
                .collect();
            return Err(format!(
                "acknowledged messages missing, first ones: {missing:?}"
            ));
        };
        let n = u32::from_be_bytes(publish.payload[..4].try_into().expect("4 bytes"));
        if seen.insert(n) {
            first_seen.push(n);
            accepted_seen += usize::from(accepted.binary_search(&n).is_ok());
        } else if once {
            return Err(format!("message {n} arrived twice"));
        }
    }
    Ok(first_seen)
}

/// A node of the cluster as a process of its own (with its own data directory), which a test
/// can kill.
fn process_node(
    cluster: &Cluster,
    name: &str,
) -> (tempfile::TempDir, common::process::BrokerProcess) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("telemq.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\nbind = \"127.0.0.1:0\"\n[websocket]\nenabled = false\n[metrics]\nenabled = false\n\
             [storage]\ndata_dir = \"{}\"\n[cluster]\nenabled = true\nnode_id = \"{name}\"\n\
             nats_urls = [\"{}\"]\nrequest_timeout = \"2s\"\nlog_max_bytes = {TEST_LOG_BYTES}\n",
            dir.path().join("data").display(),
            cluster.nats[0].url()
        ),
    )
    .expect("config written");
    let node = common::process::BrokerProcess::start(&config);
    (dir, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_on_another_with_what_they_missed() {
    let cluster = Cluster::start(1).await;
    let (_dir, victim) = process_node(&cluster, "victim");

    let (mut subscriber, _) = V5Client::connect_persistent(victim.addr, "survivor", 600).await;
    subscribe(&mut subscriber, "k/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "steady-pub").await;
    publisher
        .publish("k/before", QoS::AtLeastOnce, false, b"before".to_vec())
        .await;
    assert_eq!(
        subscriber.next_publish().await.payload.as_ref(),
        b"before",
        "routed to the victim before the kill"
    );

    victim.kill();
    // The other nodes go on acknowledging.
    publisher
        .publish("k/during", QoS::AtLeastOnce, false, b"during".to_vec())
        .await;
    drop(subscriber);

    // The client comes back on another node: its session, with its subscription, is there,
    // and so is what it missed while its node was dead (replayed from the replication log).
    let (mut resumed, connack) =
        V5Client::connect_persistent(cluster.addr(1), "survivor", 600).await;
    assert!(connack.session_present, "session resumed on node 1");
    publisher
        .publish("k/after", QoS::AtLeastOnce, false, b"after".to_vec())
        .await;
    let mut got = Vec::new();
    while !got.iter().any(|(topic, _)| topic == "k/after") {
        let publish = resumed.next_publish().await;
        got.push((
            String::from_utf8_lossy(&publish.topic).to_string(),
            publish.dup,
        ));
    }
    // "before" was acknowledged by the client; if its position was not recorded before the
    // kill it comes again, marked DUP (at least once). Nothing else comes twice.
    got.retain(|(topic, dup)| !(topic == "k/before" && *dup));
    assert_eq!(
        got,
        vec![
            ("k/during".to_string(), true),
            ("k/after".to_string(), false)
        ]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_a_node_serves_its_own_clients_and_refuses_what_it_cannot_decide() {
    let mut cluster = Cluster::start(1).await;
    let mut local_sub = subscribed(cluster.addr(0), "local-sub", "l/#", QoS::AtLeastOnce).await;
    // A persistent subscriber makes `l/` QoS 1 messages need the log; `c/` has clean
    // subscribers only.
    let (mut keeper, _) = V5Client::connect_persistent(cluster.addr(0), "keeper", 600).await;
    subscribe(&mut keeper, "l/#", QoS::AtLeastOnce).await;
    let mut clean_sub = subscribed(cluster.addr(0), "clean-sub", "c/#", QoS::AtLeastOnce).await;
    let (mut local_pub, _) = V5Client::connect(cluster.addr(0), "local-pub").await;
    let mut flood = common::raw_v5(cluster.addr(0), "local-flood").await;
    let (mut v3_pub, _) =
        RawClient::handshake(cluster.addr(0), &packets::connect_v4("v3-pub", true, 60)).await;

    cluster.nats[0].kill();
    // QoS 0 needs no replicas: served locally.
    local_pub
        .publish("l/0", QoS::AtMostOnce, false, b"local".to_vec())
        .await;
    assert_eq!(
        receive(&mut local_sub, 1).await,
        vec![("l/0".to_string(), b"local".to_vec())],
        "QoS 0 served locally without NATS"
    );
    // QoS 1 is acknowledged only once replicated, or, when no persistent session wants it
    // (`c/`), once the other nodes queued it, which without NATS falls back on the log: every
    // publish is refused with 0x80 and a reason string, none waits on the dead link for ever,
    // and none is delivered.
    const FLOOD: u16 = 1500;
    let topic = |id: u16| {
        if id.is_multiple_of(2) {
            "l/flood"
        } else {
            "c/flood"
        }
    };
    // In windows under the broker's Receive Maximum (1024).
    for window in (1..=FLOOD).collect::<Vec<_>>().chunks(500) {
        let publishes: Vec<(&str, u16, &[u8])> = window
            .iter()
            .map(|&id| (topic(id), id, &b"f"[..]))
            .collect();
        let acks = flood.publish_qos1_window_v5(&publishes).await;
        for (&id, ack) in window.iter().zip(acks) {
            assert_eq!(ack.first(), Some(&0x80), "refused: {ack:?}");
            let reason = String::from_utf8_lossy(&ack[2..]);
            assert!(
                reason.contains("replicas"),
                "reason string of {id}: {reason}"
            );
        }
    }
    // 3.1.1 cannot refuse a PUBLISH: the connection closes and the client will retransmit.
    v3_pub
        .send(&packets::publish("l/v3", 1, 1, false, false, None, b"v3"))
        .await;
    let before_close = v3_pub.expect_closed().await;
    assert!(
        before_close.iter().all(|p| p.packet_type() != 4),
        "no PUBACK for an unreplicated 3.1.1 publish"
    );
    assert!(
        drain(&mut local_sub).await.is_empty() && drain(&mut clean_sub).await.is_empty(),
        "nothing refused was delivered"
    );
    // A CONNECT needs the cluster to decide who owns the client id: refused, with a reason.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut client = RawClient::connect(cluster.addr(1)).await;
        let answer = client
            .connect_with(&packets::connect_v5("newcomer", true, 60, &[]))
            .await
            .expect("CONNACK");
        if answer.body[1] == 0x88 {
            break;
        }
        // The node has not yet noticed the link went down.
        assert!(
            tokio::time::Instant::now() < deadline,
            "CONNACK {:?}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.nats[0].restart();
    // The nodes reconnect on their own and route again; QoS 1 is accepted again.
    let (mut remote_sub, _) = connect_when_available(&cluster, 2, "remote-sub").await;
    subscribe(&mut remote_sub, "l/#", QoS::AtLeastOnce).await;
    // Node 0 too, whose reconnect back-off grew while NATS was away.
    connect_when_available(&cluster, 0, "local-pub-probe").await;
    local_pub
        .publish("l/2", QoS::AtLeastOnce, false, b"again".to_vec())
        .await;
    assert_eq!(
        receive(&mut remote_sub, 1).await,
        vec![("l/2".to_string(), b"again".to_vec())]
    );
    assert_eq!(
        receive(&mut local_sub, 1).await,
        vec![("l/2".to_string(), b"again".to_vec())]
    );
    // And QoS 1 for clean sessions only, which other nodes queue directly.
    subscribe(&mut remote_sub, "c/#", QoS::AtLeastOnce).await;
    local_pub
        .publish("c/2", QoS::AtLeastOnce, false, b"clean".to_vec())
        .await;
    for client in [&mut remote_sub, &mut clean_sub] {
        assert_eq!(
            receive(client, 1).await,
            vec![("c/2".to_string(), b"clean".to_vec())]
        );
    }
    cluster.shutdown().await;
}

/// A QoS 1 or 2 message only clean sessions subscribe to is not replicated: its publisher waits
/// for the other nodes to queue it, not for a quorum. So it crosses nodes even while two NATS
/// servers of three are down and nothing can be stored, while a message a persistent session
/// subscribes to is refused meanwhile, and so is a QoS 2 message a persistent session
/// publishes (only the log keeps it once if its client sends it again to another node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_2_for_clean_sessions_only_cross_nodes_without_a_nats_majority() {
    let mut cluster = Cluster::start(3).await;
    let mut clean_sub = subscribed(cluster.addr(1), "clean-sub", "c/#", QoS::ExactlyOnce).await;
    let (mut keeper, _) = V5Client::connect_persistent(cluster.addr(2), "keeper", 600).await;
    subscribe(&mut keeper, "p/#", QoS::AtLeastOnce).await;
    let mut publisher = common::raw_v5(cluster.addr(0), "publisher").await;
    let (mut durable_publisher, _) = RawClient::handshake(
        cluster.addr(0),
        &packets::connect_v5("durable-publisher", false, 60, &[0x11, 0, 0, 0, 60]),
    )
    .await;
    let mut packet_id = 0u16;
    let mut publish = async |topic: &str, payload: &[u8]| -> u8 {
        packet_id += 1;
        publisher.publish_qos1_v5(topic, packet_id, payload).await
    };
    assert_eq!(publish("p/0", b"stored").await, 0, "a quorum at first");
    assert_eq!(receive(&mut keeper, 1).await[0].1, b"stored");

    cluster.nats[1].kill();
    cluster.nats[2].kill();
    // Nodes 1 and 2 reconnect to the one NATS server left; until then a batch goes through
    // the log, which refuses it.
    let mut accepted = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    for attempt in 0.. {
        if !accepted.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no clean QoS 1 publish accepted"
        );
        let payload = format!("c{attempt}").into_bytes();
        if publish("c/1", &payload).await == 0 {
            accepted.push(payload);
        }
    }
    for i in 0..200 {
        let payload = format!("again{i}").into_bytes();
        assert_eq!(
            publish("c/1", &payload).await,
            0,
            "accepted without a quorum"
        );
        accepted.push(payload);
    }
    assert_eq!(
        publish("p/1", b"refused").await,
        0x80,
        "a persistent session's message needs the quorum"
    );
    let recs = publisher
        .publish_qos2_window_v5(&[("c/1", 1000, b"exactly"), ("c/1", 1001, b"once")])
        .await;
    assert_eq!(recs, vec![Vec::<u8>::new(); 2], "QoS 2 accepted too");
    accepted.extend([b"exactly".to_vec(), b"once".to_vec()]);
    let recs = durable_publisher
        .publish_qos2_window_v5(&[("c/1", 1, b"resendable")])
        .await;
    assert_eq!(
        recs[0].first(),
        Some(&0x80),
        "a persistent session's QoS 2 publish needs the quorum"
    );
    // Every accepted message arrives, once and in order (refused ones may arrive too: a node
    // that queued one before another node failed to answer keeps it).
    let mut got = Vec::new();
    while got.len() < accepted.len() {
        let publish = clean_sub.next_publish().await;
        if accepted.contains(&publish.payload.to_vec()) {
            got.push(publish.payload.to_vec());
        }
    }
    assert_eq!(got, accepted);
    cluster.shutdown().await;
}

/// Connects as a client does after a refusal: again, until the node can decide who owns the
/// client id (CONNECT is refused with 0x88 while NATS or its buckets are unreachable).
async fn connect_when_available(
    cluster: &Cluster,
    node: usize,
    id: &str,
) -> (V5Client, common::rumqtt::v5::ConnAck) {
    let started = tokio::time::Instant::now();
    let deadline = started + WAIT * 4;
    loop {
        let mut probe = RawClient::connect(cluster.addr(node)).await;
        let answer = probe
            .connect_with(&packets::connect_v5(&format!("probe-{id}"), true, 60, &[]))
            .await
            .expect("CONNACK");
        if answer.body[1] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {node} never available again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "node {node} took CONNECTs again after {:?}",
        started.elapsed()
    );
    V5Client::connect(cluster.addr(node), id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_storage_resumes_sessions_from_the_cluster() {
    let mut cluster = Cluster::start(1).await;
    let (mut client, _) = V5Client::connect_persistent(cluster.addr(0), "forgotten", 600).await;
    subscribe(&mut client, "lost/#", QoS::AtLeastOnce).await;
    client.disconnect().await;
    // Node 0 comes back under the same name with an empty data directory.
    let url = cluster.nats[0].url();
    let old = cluster.nodes.remove(0);
    old.shutdown().await;
    cluster.nodes.insert(0, node("node-0", vec![url]).await);

    let (mut client, connack) =
        V5Client::connect_persistent(cluster.addr(0), "forgotten", 600).await;
    assert!(
        connack.session_present,
        "the cluster remembered the session"
    );
    let (mut publisher, _) = V5Client::connect(cluster.addr(1), "lost-pub").await;
    publisher
        .publish("lost/1", QoS::AtLeastOnce, false, b"found".to_vec())
        .await;
    assert_eq!(
        receive(&mut client, 1).await,
        vec![("lost/1".to_string(), b"found".to_vec())]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_on_another_node_discards_what_the_old_node_queued() {
    let cluster = Cluster::start(1).await;
    let (mut client, _) = V5Client::connect_persistent(cluster.addr(0), "restarter", 600).await;
    subscribe(&mut client, "q/#", QoS::AtLeastOnce).await;
    client.disconnect().await;
    // Queued on node 0 for the offline session.
    let (mut publisher, _) = V5Client::connect(cluster.addr(1), "q-pub").await;
    publisher
        .publish("q/old", QoS::AtLeastOnce, false, b"old".to_vec())
        .await;

    // A Clean Start on node 1 discards the session, node 0's queue included [MQTT-3.1.2-4].
    let mut options = V5Client::options(cluster.addr(1), "restarter");
    options
        .set_clean_start(true)
        .set_session_expiry_interval(Some(600));
    let (client, connack) = V5Client::connect_with(options).await;
    assert!(!connack.session_present);
    client.disconnect().await;

    // Back on node 0, resuming: the session is the one started clean, with nothing queued.
    let (mut client, connack) =
        V5Client::connect_persistent(cluster.addr(0), "restarter", 600).await;
    assert!(
        connack.session_present,
        "the session started clean on node 1"
    );
    client.expect_no_publish().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_acknowledged_messages_reaches_another_node_complete_and_in_order() {
    let nats = NatsServer::start();
    // The forward queue holds 64 messages: the publisher is slowed, not dropped. The receiving
    // side keeps its default buffer, which holds the whole flood. (Whether flow control
    // between nodes prevents loss under sustained overload is measured by `scripts/bench-compare`'s
    // cluster scenarios; with a small buffer a burst in a debug build overflows it before
    // any 50 ms signal, as docs/cluster.md says.)
    let sender = node("fast", vec![nats.url()]).await;
    let receiver = node("slow", vec![nats.url()]).await;
    let mut subscriber = subscribed(receiver.addr, "behind", "flow/#", QoS::AtLeastOnce).await;

    let mut publisher = common::raw_v5(sender.addr, "flooder").await;
    const TOTAL: u16 = 20_000;
    let ids: Vec<u16> = (1..=TOTAL).collect();
    let flood = async {
        for window in ids.chunks(500) {
            let payloads: Vec<[u8; 2]> = window.iter().map(|id| id.to_be_bytes()).collect();
            let publishes: Vec<(&str, u16, &[u8])> = window
                .iter()
                .zip(&payloads)
                .map(|(&id, payload)| ("flow/1", id, &payload[..]))
                .collect();
            publisher.publish_qos1_window_v5(&publishes).await;
        }
    };
    let collect = async {
        let mut got = Vec::with_capacity(usize::from(TOTAL));
        while got.len() < usize::from(TOTAL) {
            let publish = subscriber.next_publish().await;
            got.push(u16::from_be_bytes([publish.payload[0], publish.payload[1]]));
        }
        got
    };
    let ((), got) = tokio::join!(flood, collect);
    assert_eq!(got, ids, "every acknowledged message, in order");
    sender.shutdown().await;
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_group_members_are_all_offline_is_not_chosen() {
    let cluster = Cluster::start(1).await;
    let mut online = subscribed(
        cluster.addr(1),
        "g-online",
        "$share/g/jobs/+",
        QoS::AtLeastOnce,
    )
    .await;
    let (mut away, _) = V5Client::connect_persistent(cluster.addr(2), "g-away", 600).await;
    subscribe(&mut away, "$share/g/jobs/+", QoS::AtLeastOnce).await;
    away.disconnect().await;
    // Node 2 leaves the group's queue on NATS once its only member is offline.
    let deadline = tokio::time::Instant::now() + WAIT;
    while cluster.nats[0]
        .subscriptions_of("telemq-node-2")
        .iter()
        .any(|subject| subject == "telemq.t.jobs.*")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 2 still in the group"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "jobs-pub").await;
    for i in 0..20u32 {
        publisher
            .publish("jobs/x", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
            .await;
    }
    assert_eq!(
        receive(&mut online, 20).await.len(),
        20,
        "all to the online member"
    );
    let (mut away, connack) = V5Client::connect_persistent(cluster.addr(2), "g-away", 600).await;
    assert!(connack.session_present);
    away.expect_no_publish().await;
    cluster.shutdown().await;
}

/// A client's will survives its node: when the node dies, another node publishes it; a client
/// that comes back (to another node) before its will's delay has passed cancels it
/// [MQTT-3.1.3-9].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_of_a_client_of_a_dead_node_is_published_by_another_node() {
    use common::rumqtt::v5::will_gone;
    let cluster = Cluster::start(1).await;
    let (_dir, victim) = process_node(&cluster, "doomed");
    let mut watcher = subscribed(
        cluster.addr(1),
        "will-watcher",
        "status/#",
        QoS::AtLeastOnce,
    )
    .await;

    let mut options = V5Client::options(victim.addr, "doomed-device");
    options.set_last_will(will_gone("status/doomed-device", Some(0)));
    let (_doomed, _) = V5Client::connect_with(options).await;
    let mut options = V5Client::options(victim.addr, "returning-device");
    options.set_last_will(will_gone("status/returning-device", Some(2)));
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(600));
    let (_returning, _) = V5Client::connect_with(options).await;

    victim.kill();
    // Back on another node well within its will's delay.
    let (_back, connack) =
        V5Client::connect_persistent(cluster.addr(2), "returning-device", 600).await;
    assert!(connack.session_present);

    // The dead node is noticed within seconds (three unanswered checks a second apart).
    let publish = watcher
        .try_next_publish(Duration::from_secs(30))
        .await
        .expect("the will of the dead node's client");
    assert_eq!(publish.topic.as_ref(), b"status/doomed-device");
    assert_eq!(publish.payload.as_ref(), b"gone");
    // The returning client's will (2 s after adoption at the latest) never comes.
    watcher.expect_no_publish_for(Duration::from_secs(4)).await;
    cluster.shutdown().await;
}

/// Persistent sessions cost no NATS objects of their own (issue 17, "Scale the state, not the
/// consumers"): however many there are, with queued messages and moves between nodes, the
/// cluster holds the same streams (the log and the buckets) and the same consumers on them
/// (one durable consumer of the log per node, each node's watches; a move's replay reader is
/// gone once it read; the liveness checks read the nodes bucket's mirror).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_cost_no_nats_objects_of_their_own() {
    const SESSIONS: usize = 1_000;
    const MOVED: usize = 30;
    let cluster = Cluster::start(3).await;
    for node in 0..3 {
        connect_when_available(&cluster, node, &format!("ready-{node}")).await;
    }
    let at_start = jetstream_objects(&cluster.nats);
    for chunk in (0..SESSIONS).collect::<Vec<_>>().chunks(10) {
        let mut sessions = tokio::task::JoinSet::new();
        for &i in chunk {
            let addr = cluster.addr(i % 3);
            sessions.spawn(async move {
                let (mut client, _) = connect_retrying(addr, &format!("fleet-{i}")).await;
                client
                    .send(&packets::subscribe(1, &format!("fleet/{i}/cmd"), 1, None))
                    .await;
                let suback = client.recv_type(9).await;
                assert_eq!(suback.body[2], 1, "fleet-{i} granted QoS 1");
                client.send(&[0xE0, 0x00]).await;
            });
        }
        while let Some(done) = sessions.join_next().await {
            done.expect("session set up");
        }
    }
    // A command each for some of them while they are offline, then they come back on another
    // node, which replays it from the log.
    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "fleet-commander").await;
    for i in 0..MOVED {
        publisher
            .publish(
                &format!("fleet/{i}/cmd"),
                QoS::AtLeastOnce,
                false,
                format!("cmd-{i}").into_bytes(),
            )
            .await;
    }
    for i in 0..MOVED {
        let (mut client, connack) =
            connect_retrying(cluster.addr((i + 1) % 3), &format!("fleet-{i}")).await;
        assert_eq!(connack.body[0], 1, "fleet-{i}'s session is present");
        let publish = client.recv_type(3).await;
        assert!(
            publish.body.ends_with(format!("cmd-{i}").as_bytes()),
            "fleet-{i} got {publish:?}"
        );
    }
    // A replay reader whose deletion failed under load goes after its 30 s of inactivity.
    let settled = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let now = jetstream_objects(&cluster.nats);
        if now == at_start {
            break;
        }
        assert!(
            tokio::time::Instant::now() < settled,
            "{SESSIONS} sessions, {MOVED} moved: {at_start:?} at start, {now:?} now"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{SESSIONS} persistent sessions, {MOVED} moved: {at_start:?}");
    cluster.shutdown().await;
}

/// Connects a persistent 3.1.1 session as a client does after a refusal: again, until its node
/// decides who owns the client id (a claim that times out under load is refused with 0x03).
async fn connect_retrying(addr: std::net::SocketAddr, id: &str) -> (RawClient, common::RawPacket) {
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    loop {
        let mut client = RawClient::connect(addr).await;
        let connack = client
            .connect_with(&packets::connect_v4(id, false, 60))
            .await
            .expect("an answer to CONNECT");
        if connack.body[1] == 0 {
            return (client, connack);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} refused until the end: {connack:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The streams, and how many consumers each has on all servers together (a consumer of a
/// replicated stream once per replica).
fn jetstream_objects(servers: &[NatsServer]) -> (u64, std::collections::BTreeMap<String, usize>) {
    let streams = servers[0].stream_count();
    let mut consumers = std::collections::BTreeMap::new();
    for server in servers {
        for line in server.consumers().lines() {
            let stream = line.split(':').next().unwrap_or_default();
            *consumers.entry(stream.to_string()).or_default() += 1;
        }
    }
    (streams, consumers)
}

/// A node found unlisted in the nodes bucket while alive (another node took it for dead while
/// it was cut off) lists itself again, so that its wills are adopted if it dies later and the
/// others send it their direct deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_unlisted_while_alive_lists_itself_again() {
    let cluster = Cluster::start(1).await;
    connect_when_available(&cluster, 1, "ready").await;
    let client = async_nats::connect(cluster.nats[0].url())
        .await
        .expect("NATS");
    let nodes = async_nats::jetstream::new(client)
        .get_key_value("telemq_nodes")
        .await
        .expect("the nodes bucket");
    let listed = async || matches!(nodes.get("node-1").await, Ok(Some(_)));
    assert!(listed().await, "node-1 listed itself at start");
    nodes.delete("node-1").await.expect("unlisted");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !listed().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node-1 did not list itself again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it gets direct deliveries again.
    let mut subscriber = subscribed(cluster.addr(1), "relisted-sub", "r/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(cluster.addr(0), "relisted-pub").await;
    publisher
        .publish("r/1", QoS::AtLeastOnce, false, b"back".to_vec())
        .await;
    assert_eq!(receive(&mut subscriber, 1).await[0].1, b"back");
    cluster.shutdown().await;
}
