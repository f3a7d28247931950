//! Secure transports and access control: TLS and mutual TLS, WebSocket and WSS, passwords,
//! ACLs, connection limits and reloading them all without dropping clients.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::packets;
use common::pki::Pki;
use common::{RawClient, RawPacket, TestBroker};
use telemq::transport::websocket::WsStream;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn connack_code(packet: &RawPacket) -> u8 {
    assert_eq!(packet.packet_type(), 2, "expected CONNACK, got {packet:?}");
    packet.body[1]
}

async fn connected(mut client: RawClient, connect: &[u8]) -> RawClient {
    let connack = client.connect_with(connect).await.expect("CONNACK");
    assert_eq!(connack_code(&connack), 0, "refused: {connack:?}");
    client
}

/// SUBSCRIBE one filter; returns the SUBACK's code.
async fn subscribe(client: &mut RawClient, v5: bool, filter: &str) -> u8 {
    let properties: Option<&[u8]> = if v5 { Some(&[]) } else { None };
    client
        .send(&packets::subscribe(1, filter, 1, properties))
        .await;
    let suback = client.recv_type(9).await;
    *suback.body.last().unwrap()
}

async fn expect_publish(client: &mut RawClient, v5: bool, topic: &str, payload: &[u8]) {
    let packet = client.recv_type(3).await;
    let publish = packets::parse_publish(&packet, v5);
    assert_eq!(publish.topic, topic);
    assert_eq!(publish.payload, payload);
}

/// Subscribes `subscriber` (connected over any transport) to `topic` and checks that a QoS 1
/// message published to it over plain TCP arrives.
async fn receives_from_tcp(subscriber: &mut RawClient, broker: SocketAddr, topic: &str) {
    assert_eq!(subscribe(subscriber, true, topic).await, 1);
    let mut publisher = common::raw_v5(broker, "tcp-publisher").await;
    assert_eq!(publisher.publish_qos1_v5(topic, 1, b"from tcp").await, 0);
    expect_publish(subscriber, true, topic, b"from tcp").await;
}

/// Opens a WebSocket to `path` asking for the `mqtt` subprotocol, over any stream.
async fn websocket<S>(stream: S, addr: SocketAddr, scheme: &str, path: &str) -> Option<WsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = format!("{scheme}://localhost:{}{path}", addr.port())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (socket, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .ok()?;
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "mqtt",
        "[MQTT-6.0.0-4] the broker selects the mqtt subprotocol"
    );
    Some(WsStream::new(socket))
}

#[tokio::test]
async fn tls_round_trip_and_plain_tcp_on_the_tls_port_fails() {
    let pki = Pki::new();
    let broker = TestBroker::start_with(|c| pki.configure(c)).await;
    let tls_addr = broker.broker().tls_addr().unwrap();

    let stream = pki.connect(tls_addr, None).await.expect("TLS handshake");
    let mut subscriber = connected(
        RawClient::over(stream),
        &packets::connect_v5("tls-sub", true, 60, &[]),
    )
    .await;
    assert_eq!(subscribe(&mut subscriber, true, "t/#").await, 1);
    let stream = pki.connect(tls_addr, None).await.expect("TLS handshake");
    let mut publisher = connected(
        RawClient::over(stream),
        &packets::connect_v5("tls-pub", true, 60, &[]),
    )
    .await;
    assert_eq!(publisher.publish_qos1_v5("t/1", 1, b"over tls").await, 0);
    expect_publish(&mut subscriber, true, "t/1", b"over tls").await;

    // MQTT bytes where a TLS ClientHello belongs: closed, never answered in clear.
    let mut plain = RawClient::connect(tls_addr).await;
    plain
        .send_lenient(&packets::connect_v5("plain", true, 60, &[]))
        .await;
    assert!(plain
        .expect_closed()
        .await
        .iter()
        .all(|packet| packet.packet_type() != 2));
    broker.shutdown().await;
}

/// Whether a TLS client with `identity` gets a CONNACK from a broker requiring certificates.
async fn mutual_tls_admits(
    pki: &Pki,
    addr: SocketAddr,
    identity: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> bool {
    // With TLS 1.3 the client finishes its side before the server checks its certificate, so a
    // refusal may show at connect or at the first read.
    let Ok(stream) = pki.connect(addr, identity).await else {
        return false;
    };
    let mut client = RawClient::over(stream);
    client
        .send_lenient(&packets::connect_v5("mtls", true, 60, &[]))
        .await;
    matches!(client.recv_within(common::WAIT).await, Ok(Some(p)) if p.packet_type() == 2)
}

#[tokio::test]
async fn a_required_client_certificate_must_come_from_the_configured_ca() {
    let pki = Pki::new();
    let broker = TestBroker::start_with(|c| {
        pki.configure(c);
        c.tls.require_client_cert = true;
    })
    .await;
    let addr = broker.broker().tls_addr().unwrap();
    assert!(mutual_tls_admits(&pki, addr, Some(&pki.client)).await);
    assert!(!mutual_tls_admits(&pki, addr, None).await, "no certificate");
    assert!(
        !mutual_tls_admits(&pki, addr, Some(&pki.foreign_client)).await,
        "certificate from another CA"
    );
    let metrics = telemq::metrics::render();
    assert!(
        metrics
            .contains("telemq_handshake_failures_total{transport=\"tls\",reason=\"tls_failed\"}"),
        "{metrics}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn the_certificate_common_name_is_the_username_the_acl_sees() {
    let pki = Pki::new();
    let acl = pki.dir.path().join("acl");
    std::fs::write(&acl, "user sensor-1\ntopic write sensors/%u/#\n").unwrap();
    let broker = TestBroker::start_with(|c| {
        pki.configure(c);
        c.tls.require_client_cert = true;
        c.tls.cert_identity = telemq::config::CertIdentity::Cn;
        c.auth.acl_file = Some(acl.clone());
        // Certificates stand in for passwords: anonymous clients are not let in.
        c.auth.allow_anonymous = Some(false);
    })
    .await;
    let addr = broker.broker().tls_addr().unwrap();
    let stream = pki.connect(addr, Some(&pki.client)).await.unwrap();
    let mut client = connected(
        RawClient::over(stream),
        &packets::connect_v5("any-id", true, 60, &[]),
    )
    .await;
    assert_eq!(
        client.publish_qos1_v5("sensors/sensor-1/t", 1, b"ok").await,
        0x10
    );
    assert_eq!(
        client.publish_qos1_v5("sensors/sensor-2/t", 2, b"no").await,
        0x87
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn websocket_clients_exchange_messages_with_tcp_clients() {
    let broker = TestBroker::start().await;
    let ws_addr = broker.broker().ws_addr().unwrap();
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    let ws = websocket(tcp, ws_addr, "ws", "/mqtt")
        .await
        .expect("upgrade");
    let mut ws_subscriber = connected(
        RawClient::over(ws),
        &packets::connect_v5("ws-sub", true, 60, &[]),
    )
    .await;
    receives_from_tcp(&mut ws_subscriber, broker.addr, "x/1").await;

    // The other way, with packets split across frames and frames holding several packets.
    let mut tcp_subscriber = common::raw_v5(broker.addr, "tcp-sub").await;
    assert_eq!(subscribe(&mut tcp_subscriber, true, "y/#").await, 1);
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    let mut ws = websocket(tcp, ws_addr, "ws", "/mqtt").await.unwrap();
    let connect = packets::connect_v5("ws-pub", true, 60, &[]);
    let first = packets::publish("y/1", 0, 0, false, false, Some(&[]), b"one");
    let second = packets::publish("y/2", 0, 0, false, false, Some(&[]), b"two");
    use tokio::io::AsyncWriteExt;
    ws.write_all(&connect[..5]).await.unwrap();
    ws.flush().await.unwrap();
    let mut rest = connect[5..].to_vec();
    rest.extend_from_slice(&first);
    rest.extend_from_slice(&second[..4]);
    ws.write_all(&rest).await.unwrap();
    ws.flush().await.unwrap();
    ws.write_all(&second[4..]).await.unwrap();
    ws.flush().await.unwrap();
    let mut ws_publisher = RawClient::over(ws);
    assert_eq!(connack_code(&ws_publisher.recv().await.unwrap()), 0);
    expect_publish(&mut tcp_subscriber, true, "y/1", b"one").await;
    expect_publish(&mut tcp_subscriber, true, "y/2", b"two").await;
    ws_publisher.expect_silence().await;

    // Only the configured path upgrades.
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    assert!(websocket(tcp, ws_addr, "ws", "/other").await.is_none());
    broker.shutdown().await;
}

#[tokio::test]
async fn secure_websocket_round_trip() {
    let pki = Pki::new();
    let broker = TestBroker::start_with(|c| {
        pki.configure(c);
        c.websocket.tls_enabled = true;
    })
    .await;
    let wss_addr = broker.broker().wss_addr().unwrap();
    let tls = pki.connect(wss_addr, None).await.unwrap();
    let wss = websocket(tls, wss_addr, "wss", "/mqtt")
        .await
        .expect("upgrade");
    let mut client = connected(
        RawClient::over(wss),
        &packets::connect_v5("wss", true, 60, &[]),
    )
    .await;
    receives_from_tcp(&mut client, broker.addr, "w/1").await;
    broker.shutdown().await;
}

fn password_file(dir: &Path, users: &[(&str, &[u8])]) -> std::path::PathBuf {
    let mut file = telemq::auth::password::PasswordFile::default();
    for (user, password) in users {
        file.set(user, password).unwrap();
    }
    let path = dir.join("passwd");
    telemq::auth::password::write_file(&path, &file).unwrap();
    path
}

#[tokio::test]
async fn passwords_are_checked_and_refusals_use_each_versions_code() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = password_file(dir.path(), &[("alice", b"wonderland")]);
    let broker = TestBroker::start_with(|c| c.auth.password_file = Some(passwd.clone())).await;
    let answer = |connect: Vec<u8>| async move {
        let mut client = RawClient::connect(broker.addr).await;
        connack_code(&client.connect_with(&connect).await.expect("CONNACK"))
    };
    assert_eq!(
        answer(packets::connect_v5_login("a", "alice", b"wonderland")).await,
        0
    );
    assert_eq!(
        answer(packets::connect_v4_login("b", "alice", b"wonderland")).await,
        0
    );
    assert_eq!(
        answer(packets::connect_v5_login("c", "alice", b"wrong")).await,
        0x86
    );
    assert_eq!(
        answer(packets::connect_v4_login("d", "alice", b"wrong")).await,
        4
    );
    assert_eq!(
        answer(packets::connect_v5_login("e", "mallory", b"wonderland")).await,
        0x86
    );
    // A password file makes anonymous access opt-in.
    assert_eq!(answer(packets::connect_v5("f", true, 60, &[])).await, 0x87);
    assert_eq!(answer(packets::connect_v4("g", true, 60)).await, 5);
    let metrics = telemq::metrics::render();
    assert!(
        metrics.contains("telemq_auth_failures_total{reason=\"bad_password\"}"),
        "{metrics}"
    );
    broker.shutdown().await;
}

const ACL: &str = "\
user admin
topic readwrite #
user alice
topic read public/#
topic readwrite alice/#
topic read shared/#
topic deny shared/secret/#
";

#[tokio::test]
async fn the_acl_denies_subscriptions_publishes_and_retained_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, ACL).unwrap();
    let broker = TestBroker::start_with(|c| c.auth.acl_file = Some(acl.clone())).await;
    let login = |user: &str, id: &str, v5: bool| {
        if v5 {
            packets::connect_v5_login(id, user, b"")
        } else {
            packets::connect_v4_login(id, user, b"")
        }
    };
    let mut admin = connected(
        RawClient::connect(broker.addr).await,
        &login("admin", "adm", true),
    )
    .await;
    for (topic, payload) in [("shared/open", b"open"), ("shared/secret/key", b"hush")] {
        admin
            .send(&packets::publish(
                topic,
                1,
                9,
                true,
                false,
                Some(&[]),
                payload,
            ))
            .await;
        admin.recv_type(4).await;
    }

    let mut v5 = connected(
        RawClient::connect(broker.addr).await,
        &login("alice", "a5", true),
    )
    .await;
    assert_eq!(subscribe(&mut v5, true, "admin/#").await, 0x87);
    assert_eq!(subscribe(&mut v5, true, "shared/secret/#").await, 0x87);
    assert_eq!(subscribe(&mut v5, true, "$SYS/#").await, 0x87);
    // Allowed as a whole, but the retained secret under it is filtered on delivery.
    assert_eq!(subscribe(&mut v5, true, "shared/#").await, 1);
    expect_publish(&mut v5, true, "shared/open", b"open").await;
    v5.expect_silence().await;
    assert_eq!(v5.publish_qos1_v5("public/x", 1, b"no").await, 0x87);
    assert_eq!(v5.publish_qos1_v5("alice/x", 2, b"yes").await, 0x10);

    let mut v4 = connected(
        RawClient::connect(broker.addr).await,
        &login("alice", "a4", false),
    )
    .await;
    assert_eq!(subscribe(&mut v4, false, "admin/#").await, 0x80);
    assert_eq!(subscribe(&mut v4, false, "public/#").await, 1);
    // 3.1.1 cannot refuse a PUBLISH: acknowledged, and not delivered.
    let mut watcher = connected(
        RawClient::connect(broker.addr).await,
        &login("admin", "w", true),
    )
    .await;
    assert_eq!(subscribe(&mut watcher, true, "public/#").await, 1);
    v4.send(&packets::publish(
        "public/y", 1, 5, false, false, None, b"dropped",
    ))
    .await;
    let puback = v4.recv_type(4).await;
    assert_eq!(puback.body[..2], 5u16.to_be_bytes());
    watcher.expect_silence().await;
    let metrics = telemq::metrics::render();
    for action in ["publish", "subscribe", "deliver"] {
        assert!(
            metrics.contains(&format!("telemq_acl_denied_total{{action=\"{action}\"}}")),
            "{action}: {metrics}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn reload_swaps_the_acl_under_a_connected_client_and_keeps_it_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite feed/#\n").unwrap();
    let broker = TestBroker::start_with(|c| c.auth.acl_file = Some(acl.clone())).await;
    let mut client = common::raw_v5(broker.addr, "reader").await;
    assert_eq!(subscribe(&mut client, true, "feed/#").await, 1);
    let mut publisher = common::raw_v5(broker.addr, "writer").await;
    assert_eq!(publisher.publish_qos1_v5("feed/a", 1, b"before").await, 0);
    expect_publish(&mut client, true, "feed/a", b"before").await;

    std::fs::write(&acl, "topic write feed/#\n").unwrap();
    broker.broker().reload().await.expect("reload");
    assert_eq!(publisher.publish_qos1_v5("feed/a", 2, b"after").await, 0);
    client.expect_silence().await;

    // A broken file is refused and the rules in force stay.
    std::fs::write(&acl, "topic sometimes feed/#\n").unwrap();
    let failures = broker.broker().reload().await.expect_err("bad file");
    assert!(failures[0].contains("line 1"), "{failures:?}");
    assert!(telemq::metrics::render()
        .contains("telemq_reloads_total{file=\"acl\",outcome=\"rejected\"}"));
    assert_eq!(publisher.publish_qos1_v5("feed/a", 3, b"still").await, 0);
    assert_eq!(subscribe(&mut client, true, "other/#").await, 0x87);
    // Still connected throughout.
    client.send(&[0xC0, 0x00]).await;
    assert_eq!(client.recv_type(13).await.first_byte, 0xD0);
    broker.shutdown().await;
}

#[tokio::test]
async fn reload_reads_new_passwords_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = password_file(dir.path(), &[("alice", b"one")]);
    let broker = TestBroker::start_with(|c| c.auth.password_file = Some(passwd.clone())).await;
    let mut alice = connected(
        RawClient::connect(broker.addr).await,
        &packets::connect_v5_login("a", "alice", b"one"),
    )
    .await;
    password_file(dir.path(), &[("alice", b"two")]);
    broker.broker().reload().await.unwrap();
    let mut client = RawClient::connect(broker.addr).await;
    let code = connack_code(
        &client
            .connect_with(&packets::connect_v5_login("b", "alice", b"one"))
            .await
            .unwrap(),
    );
    assert_eq!(code, 0x86);
    connected(
        RawClient::connect(broker.addr).await,
        &packets::connect_v5_login("c", "alice", b"two"),
    )
    .await;
    alice.send(&[0xC0, 0x00]).await;
    assert_eq!(alice.recv_type(13).await.first_byte, 0xD0);
    broker.shutdown().await;
}

#[tokio::test]
async fn connection_limits_close_excess_connections_before_connect() {
    let broker = TestBroker::start_with(|c| {
        c.listener.max_connections = 2;
    })
    .await;
    let _first = common::raw_v5(broker.addr, "one").await;
    let _second = common::raw_v5(broker.addr, "two").await;
    let mut third = RawClient::connect(broker.addr).await;
    third
        .send_lenient(&packets::connect_v5("three", true, 60, &[]))
        .await;
    assert!(third.expect_closed().await.is_empty());
    drop(_first);
    // The slot comes back once the first connection's task has ended.
    let mut admitted = false;
    for _ in 0..100 {
        let mut retry = RawClient::connect(broker.addr).await;
        retry
            .send_lenient(&packets::connect_v5("retry", true, 60, &[]))
            .await;
        if matches!(retry.recv_within(common::WAIT).await, Ok(Some(p)) if p.packet_type() == 2) {
            admitted = true;
            break;
        }
    }
    assert!(admitted);
    assert!(telemq::metrics::render()
        .contains("telemq_connections_refused_total{reason=\"max_connections\"}"));
    broker.shutdown().await;

    let broker = TestBroker::start_with(|c| c.listener.max_connections_per_ip = 1).await;
    let _only = common::raw_v5(broker.addr, "only").await;
    let mut second = RawClient::connect(broker.addr).await;
    second
        .send_lenient(&packets::connect_v5("second", true, 60, &[]))
        .await;
    assert!(second.expect_closed().await.is_empty());
    broker.shutdown().await;

    // A rate far below what a test can open: the burst is all that gets in.
    let broker = TestBroker::start_with(|c| {
        c.listener.connect_rate = 1;
        c.listener.connect_burst = 2;
    })
    .await;
    let _a = common::raw_v5(broker.addr, "a").await;
    let _b = common::raw_v5(broker.addr, "b").await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_lenient(&packets::connect_v5("c", true, 60, &[]))
        .await;
    assert!(c.expect_closed().await.is_empty());
    assert!(telemq::metrics::render()
        .contains("telemq_connections_refused_total{reason=\"connect_rate\"}"));
    broker.shutdown().await;
}

#[tokio::test]
async fn topic_depth_and_subscription_count_are_limited() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_topic_levels = 3;
        c.mqtt.max_subscriptions_per_client = 2;
    })
    .await;
    let mut client = common::raw_v5(broker.addr, "limited").await;
    assert_eq!(client.publish_qos1_v5("a/b/c/d", 1, b"deep").await, 0x90);
    assert_eq!(client.publish_qos1_v5("a/b/c", 2, b"ok").await, 0x10);
    assert_eq!(subscribe(&mut client, true, "a/b/c/#").await, 0x8F);
    assert_eq!(subscribe(&mut client, true, "$share/g/a/b/c/d").await, 0x8F);
    assert_eq!(subscribe(&mut client, true, "one").await, 1);
    assert_eq!(subscribe(&mut client, true, "two").await, 1);
    assert_eq!(subscribe(&mut client, true, "three").await, 0x97);
    // Re-subscribing to a filter it holds is not a new subscription.
    assert_eq!(subscribe(&mut client, true, "two").await, 1);
    let mut v4 = connected(
        RawClient::connect(broker.addr).await,
        &packets::connect_v4("v4", true, 60),
    )
    .await;
    assert_eq!(subscribe(&mut v4, false, "a/b/c/d").await, 0x80);
    assert!(telemq::metrics::render()
        .contains("telemq_subscriptions_refused_total{reason=\"max_subscriptions\"}"));
    broker.shutdown().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
    let pki = Pki::new();
    let broker = TestBroker::start_with(|c| {
        pki.configure(c);
        c.tls.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut silent = RawClient::connect(broker.broker().tls_addr().unwrap()).await;
    assert!(silent.expect_closed().await.is_empty());
    assert!(telemq::metrics::render()
        .contains("telemq_handshake_failures_total{transport=\"tls\",reason=\"timeout\"}"));
    broker.shutdown().await;
}

#[tokio::test]
async fn telemq_passwd_writes_a_file_the_broker_accepts_and_sighup_reloads_the_acl() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    for (user, password) in [("sensor", "pa55"), ("dashboard", "view")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_telemq"))
            .args(["passwd", passwd.to_str().unwrap(), user])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        assert!(child.wait().unwrap().success());
    }
    let text = std::fs::read_to_string(&passwd).unwrap();
    assert!(
        !text.contains("pa55") && text.contains("sensor:$argon2id$"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&passwd).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the password file is private");

    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite a/#\n").unwrap();
    let config = dir.path().join("telemq.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\nbind = \"127.0.0.1:0\"\n[websocket]\nenabled = false\n\
             [metrics]\nenabled = false\n[storage]\nengine = \"memory\"\n\
             [auth]\npassword_file = {passwd:?}\nacl_file = {acl:?}\n"
        ),
    )
    .unwrap();
    let broker = common::process::BrokerProcess::start(&config);
    let mut client = connected(
        RawClient::connect(broker.addr).await,
        &packets::connect_v5_login("s", "sensor", b"pa55"),
    )
    .await;
    assert_eq!(subscribe(&mut client, true, "b/#").await, 0x87);
    std::fs::write(&acl, "topic readwrite b/#\n").unwrap();
    broker.signal(libc::SIGHUP);
    // The reload lands asynchronously; ask until it has (or WAIT runs out).
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        if subscribe(&mut client, true, "b/#").await == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload the ACL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut refused = RawClient::connect(broker.addr).await;
    let answer = refused
        .connect_with(&packets::connect_v4_login("d", "dashboard", b"wrong"))
        .await
        .unwrap();
    assert_eq!(connack_code(&answer), 4);
}

#[tokio::test]
async fn reload_swaps_the_server_certificate_and_keeps_it_on_a_bad_file() {
    let old = Pki::new();
    let new = Pki::new();
    let broker = TestBroker::start_with(|c| old.configure(c)).await;
    let addr = broker.broker().tls_addr().unwrap();
    let mut kept = connected(
        RawClient::over(old.connect(addr, None).await.unwrap()),
        &packets::connect_v5("kept", true, 60, &[]),
    )
    .await;

    std::fs::write(&old.server_cert, "not a certificate").unwrap();
    let failures = broker.broker().reload().await.expect_err("bad certificate");
    assert!(failures[0].contains("server.pem"), "{failures:?}");
    assert!(
        old.connect(addr, None).await.is_ok(),
        "old certificate kept"
    );

    std::fs::copy(&new.server_cert, &old.server_cert).unwrap();
    std::fs::copy(&new.server_key, &old.server_key).unwrap();
    broker.broker().reload().await.expect("reload");
    assert!(
        new.connect(addr, None).await.is_ok(),
        "new certificate served"
    );
    assert!(
        old.connect(addr, None).await.is_err(),
        "old CA no longer matches"
    );
    kept.send(&[0xC0, 0x00]).await;
    assert_eq!(kept.recv_type(13).await.first_byte, 0xD0);
    broker.shutdown().await;
}

#[tokio::test]
async fn tls_1_2_clients_are_served_too() {
    use rustls::pki_types::ServerName;
    let pki = Pki::new();
    let broker = TestBroker::start_with(|c| pki.configure(c)).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca)
            .unwrap()
            .map(Result::unwrap),
    );
    use rustls::pki_types::pem::PemObject;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(broker.broker().tls_addr().unwrap())
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    connected(
        RawClient::over(stream),
        &packets::connect_v5("tls12", true, 60, &[]),
    )
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn websocket_text_frames_and_oversized_frames_close_the_connection() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let broker = TestBroker::start_with(|c| c.mqtt.max_packet_size = 1024).await;
    let ws_addr = broker.broker().ws_addr().unwrap();
    let open = || async {
        let mut request = format!("ws://localhost:{}/mqtt", ws_addr.port())
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        let tcp = TcpStream::connect(ws_addr).await.unwrap();
        tokio_tungstenite::client_async(request, tcp)
            .await
            .unwrap()
            .0
    };
    let closed = |mut socket: tokio_tungstenite::WebSocketStream<TcpStream>| async move {
        use futures_util::StreamExt;
        loop {
            match tokio::time::timeout(common::WAIT, socket.next()).await {
                Err(_) => panic!("the broker kept the connection open"),
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return,
                Ok(Some(Ok(other))) => assert!(!other.is_binary(), "got MQTT data: {other:?}"),
            }
        }
    };
    // [MQTT-6.0.0-1] text frames close the connection.
    let mut text = open().await;
    text.send(Message::Text("CONNECT".into())).await.unwrap();
    closed(text).await;
    // A frame far past the largest packet is refused before it is buffered (64 KiB floor).
    // The frame holds nothing but valid PINGREQs, which would each be answered if it were taken.
    let mut big = open().await;
    let connect = packets::connect_v5("big", true, 60, &[]);
    big.send(Message::Binary(connect.into())).await.unwrap();
    {
        use futures_util::StreamExt;
        let connack = tokio::time::timeout(common::WAIT, big.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(connack.is_binary());
    }
    let pings: Vec<u8> = [0xC0u8, 0x00].repeat(100 * 1024);
    let _ = big.send(Message::Binary(pings.into())).await;
    closed(big).await;
    broker.shutdown().await;
}
