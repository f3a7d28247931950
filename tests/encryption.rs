//! Encryption at rest: what the data directory holds with `storage.encryption_key_file` set,
//! what survives restarts and `kill -9`, how start-up refuses a directory it cannot read, how
//! altered or moved records are caught, and key rotation with `rekey`.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::packets::{self, parse_publish};
use common::process::BrokerProcess;
use common::{RawClient, TestBroker};
use telemq::storage::cipher::{write_new_key_file, Key, KeyRing, Sealing};
use telemq::{Broker, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PUBLISH: u8 = 3;
const SUBACK: u8 = 9;

/// Column families holding records (the `meta` marker is not sealed).
const FAMILIES: [&str; 7] = [
    "sessions",
    "subscriptions",
    "queue",
    "inbound",
    "messages",
    "retained",
    "delayed",
];

fn new_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    write_new_key_file(&path).expect("keygen");
    path
}

fn with_keys(current: Option<&Path>, old: Option<&Path>) -> impl FnOnce(&mut Config) {
    let (current, old) = (current.map(Path::to_path_buf), old.map(Path::to_path_buf));
    move |config: &mut Config| {
        config.storage.encryption_key_file = current;
        config.storage.old_encryption_key_file = old;
    }
}

/// A configuration like `TestBroker`'s, for starts that are expected to fail.
fn config_in(data_dir: &Path, adjust: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::default();
    config.listener.bind = "127.0.0.1:0".parse().unwrap();
    config.metrics.enabled = false;
    config.websocket.enabled = false;
    config.storage.data_dir = data_dir.to_path_buf();
    adjust(&mut config);
    config
}

async fn refused(data_dir: &Path, adjust: impl FnOnce(&mut Config)) -> String {
    match Broker::start(config_in(data_dir, adjust)).await {
        Ok(broker) => {
            broker.shutdown().await;
            panic!("the broker started");
        }
        Err(error) => error.to_string(),
    }
}

async fn persistent_subscriber(addr: SocketAddr, id: &str, filter: &str) {
    let (mut client, _) = RawClient::handshake(addr, &packets::connect_v4(id, false, 60)).await;
    client.send(&packets::subscribe(1, filter, 1, None)).await;
    client.recv_type(SUBACK).await;
    client.send(&packets::DISCONNECT).await;
    client.expect_closed().await;
}

async fn publish_qos1(addr: SocketAddr, topic: &str, payload: &[u8], retain: bool) {
    let (mut client, _) = RawClient::handshake(addr, &packets::connect_v4("pub", true, 60)).await;
    client
        .send(&packets::publish(topic, 1, 1, retain, false, None, payload))
        .await;
    let ack = client.recv_type(4).await;
    assert_eq!(ack.body, 1u16.to_be_bytes());
    client.send(&packets::DISCONNECT).await;
    client.expect_closed().await;
}

/// Resumes `id`'s session and returns the payloads of the `count` messages it is sent
/// (acknowledged), then asserts nothing else arrives.
async fn drain(addr: SocketAddr, id: &str, count: usize) -> Vec<Vec<u8>> {
    let (mut client, connack) =
        RawClient::handshake(addr, &packets::connect_v4(id, false, 60)).await;
    assert_eq!(connack.body[0], 1, "session present");
    let mut payloads = Vec::new();
    while payloads.len() < count {
        let publish = parse_publish(&client.recv_type(PUBLISH).await, false);
        client.send(&packets::puback(publish.packet_id)).await;
        payloads.push(publish.payload);
    }
    client.expect_silence().await;
    payloads
}

/// Retained payloads a new subscription to `filter` receives.
async fn retained(addr: SocketAddr, filter: &str, count: usize) -> Vec<Vec<u8>> {
    let (mut client, _) = RawClient::handshake(addr, &packets::connect_v4("peek", true, 60)).await;
    client.send(&packets::subscribe(1, filter, 0, None)).await;
    client.recv_type(SUBACK).await;
    let mut payloads = Vec::new();
    while payloads.len() < count {
        payloads.push(parse_publish(&client.recv_type(PUBLISH).await, false).payload);
    }
    client.expect_silence().await;
    payloads.sort();
    payloads
}

/// The RocksDB database opened directly, as someone holding the disk would.
fn open_raw(path: &Path) -> rocksdb::DB {
    let options = rocksdb::Options::default();
    let families = rocksdb::DB::list_cf(&options, path).expect("list column families");
    rocksdb::DB::open_cf(&options, path, families).expect("open RocksDB")
}

fn records(db: &rocksdb::DB, cf: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let handle = db.cf_handle(cf).expect("column family");
    db.iterator_cf(handle, rocksdb::IteratorMode::Start)
        .map(|item| {
            let (key, value) = item.expect("read");
            (key.to_vec(), value.to_vec())
        })
        .collect()
}

/// Every file under `dir` (WAL, SST, manifest, logs) that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .expect("read file")
            .windows(needle.len())
            .any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}

/// One of each kind of stored payload, then a shutdown.
async fn store_secrets(broker: TestBroker) -> Arc<tempfile::TempDir> {
    persistent_subscriber(broker.addr, "vault", "s/#").await;
    publish_qos1(broker.addr, "s/queued", b"QUEUED-SECRET-7f3a9c", false).await;
    publish_qos1(broker.addr, "s/retained", b"RETAINED-SECRET-41be07", true).await;
    publish_qos1(
        broker.addr,
        "$delayed/3600/s/later",
        b"DELAYED-SECRET-c0ffee",
        false,
    )
    .await;

    // A v5 persistent session with a will: the will is in its session record.
    let mut body = packets::string("MQTT");
    body.push(5);
    body.push(0x04 | 0x08); // will flag, will QoS 1
    body.extend(60u16.to_be_bytes());
    body.extend([5, 0x11, 0, 0, 0x0E, 0x10]); // session expiry 3600 s
    body.extend(packets::string("holder"));
    body.extend([5, 0x18, 0, 0, 0x0E, 0x10]); // will delay 3600 s
    body.extend(packets::string("s/will"));
    body.extend(packets::binary(b"WILL-SECRET-9d1c55"));
    let (_holder, _) = RawClient::handshake(broker.addr, &packets::frame(0x10, &body)).await;

    let data_dir = broker.data_dir.clone();
    broker.shutdown().await;
    data_dir
}

const SECRETS: [&[u8]; 4] = [
    b"QUEUED-SECRET-7f3a9c",
    b"RETAINED-SECRET-41be07",
    b"DELAYED-SECRET-c0ffee",
    b"WILL-SECRET-9d1c55",
];

/// Which secrets appear in the directory's files: as the broker left them (in the WAL), and
/// after RocksDB flushed everything into table files.
fn leaked_secrets(data_dir: &Path) -> Vec<String> {
    let mut leaked = Vec::new();
    let mut check = |stage: &str| {
        for secret in SECRETS {
            let files = files_containing(data_dir, secret);
            if !files.is_empty() {
                leaked.push(format!(
                    "{} {stage} in {files:?}",
                    String::from_utf8_lossy(secret)
                ));
            }
        }
    };
    check("after shutdown");
    {
        let db = open_raw(data_dir);
        for cf in FAMILIES {
            db.flush_cf(db.cf_handle(cf).unwrap()).expect("flush");
        }
    }
    check("after a flush");
    leaked
}

#[tokio::test]
async fn no_payload_reaches_the_disk_in_the_clear() {
    let keys = tempfile::tempdir().unwrap();
    let key = new_key(keys.path(), "storage.key");
    let broker = TestBroker::start_with(with_keys(Some(&key), None)).await;
    let data_dir = store_secrets(broker).await;
    assert_eq!(leaked_secrets(data_dir.path()), Vec::<String>::new());

    // The same traffic without a key leaves every secret readable: the search can fail.
    let plain = store_secrets(TestBroker::start().await).await;
    let leaked = leaked_secrets(plain.path());
    for secret in SECRETS {
        let name = String::from_utf8_lossy(secret);
        assert!(
            leaked.iter().any(|l| l.starts_with(&*name)),
            "{name} not found in the clear: {leaked:?}"
        );
    }

    // And everything still reads back with the key.
    let broker = TestBroker::start_in(data_dir, with_keys(Some(&key), None)).await;
    assert_eq!(broker.broker().retained_count(), 1);
    assert_eq!(broker.broker().delayed_count(), 1);
    assert_eq!(
        drain(broker.addr, "vault", 2).await,
        vec![
            b"QUEUED-SECRET-7f3a9c".to_vec(),
            b"RETAINED-SECRET-41be07".to_vec()
        ]
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn messages_survive_a_restart_with_encryption() {
    let keys = tempfile::tempdir().unwrap();
    let key = new_key(keys.path(), "storage.key");
    let broker = TestBroker::start_with(with_keys(Some(&key), None)).await;
    persistent_subscriber(broker.addr, "keeper", "keep/#").await;
    publish_qos1(broker.addr, "keep/a", b"one", false).await;
    publish_qos1(broker.addr, "keep/status", b"up", true).await;
    let broker = broker.restart_with(with_keys(Some(&key), None)).await;
    assert_eq!(
        retained(broker.addr, "keep/status", 1).await,
        vec![b"up".to_vec()]
    );
    assert_eq!(
        drain(broker.addr, "keeper", 2).await,
        vec![b"one".to_vec(), b"up".to_vec()]
    );
    broker.shutdown().await;
}

fn write_config(dir: &Path, data_dir: &Path, key: Option<&Path>, old: Option<&Path>) -> PathBuf {
    let mut text = format!(
        "[listener]\nbind = \"127.0.0.1:0\"\n[websocket]\nenabled = false\n[metrics]\nenabled = false\n[storage]\ndata_dir = {:?}\n",
        data_dir.display().to_string()
    );
    if let Some(key) = key {
        text.push_str(&format!(
            "encryption_key_file = {:?}\n",
            key.display().to_string()
        ));
    }
    if let Some(old) = old {
        text.push_str(&format!(
            "old_encryption_key_file = {:?}\n",
            old.display().to_string()
        ));
    }
    let path = dir.join("telemq.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn messages_survive_kill_9_with_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_key(dir.path(), "storage.key");
    let data_dir = dir.path().join("data");
    let config = write_config(dir.path(), &data_dir, Some(&key), None);

    let broker = BrokerProcess::start(&config);
    persistent_subscriber(broker.addr, "survivor", "k/#").await;
    publish_qos1(broker.addr, "k/1", b"acked before the kill", false).await;
    publish_qos1(broker.addr, "k/state", b"retained before the kill", true).await;
    drop(broker); // SIGKILL: no shutdown, no flush

    let broker = BrokerProcess::start(&config);
    assert_eq!(
        drain(broker.addr, "survivor", 2).await,
        vec![
            b"acked before the kill".to_vec(),
            b"retained before the kill".to_vec()
        ]
    );
    assert_eq!(
        retained(broker.addr, "k/state", 1).await,
        vec![b"retained before the kill".to_vec()]
    );
    drop(broker);
    assert!(files_containing(&data_dir, b"acked before the kill").is_empty());
}

#[tokio::test]
async fn start_up_refuses_a_directory_the_keys_cannot_read() {
    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (new_key(keys.path(), "a.key"), new_key(keys.path(), "b.key"));

    let encrypted = TestBroker::start_with(with_keys(Some(&a), None)).await;
    publish_qos1(encrypted.addr, "x", b"v", true).await;
    let encrypted_dir = encrypted.data_dir.clone();
    encrypted.shutdown().await;

    let wrong = refused(encrypted_dir.path(), with_keys(Some(&b), None)).await;
    assert!(wrong.contains("wrong key"), "{wrong}");
    let fingerprint = Key::load(&a).unwrap().fingerprint().to_string();
    assert!(
        wrong.contains(&fingerprint),
        "names the key it needs: {wrong}"
    );

    let without = refused(encrypted_dir.path(), |_| {}).await;
    assert!(
        without.contains("encrypted") && without.contains("no key"),
        "{without}"
    );

    let plain = TestBroker::start().await;
    publish_qos1(plain.addr, "x", b"v", true).await;
    let plain_dir = plain.data_dir.clone();
    plain.shutdown().await;
    let with_key = refused(plain_dir.path(), with_keys(Some(&a), None)).await;
    assert!(
        with_key.contains("without encryption") && with_key.contains("telemq rekey"),
        "{with_key}"
    );

    // Nothing was changed by the refusals: the right configuration still starts.
    let broker = TestBroker::start_in(encrypted_dir, with_keys(Some(&a), None)).await;
    assert_eq!(broker.broker().retained_count(), 1);
    broker.shutdown().await;
    let broker = TestBroker::start_in(plain_dir, |_| {}).await;
    assert_eq!(broker.broker().retained_count(), 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_key_file_others_can_read_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let key = new_key(keys.path(), "storage.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let error = refused(data.path(), with_keys(Some(&key), None)).await;
    assert!(
        error.contains("mode 0644") && error.contains("chmod 600"),
        "{error}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let broker = TestBroker::start_with(with_keys(Some(&key), None)).await;
    broker.shutdown().await;
}

async fn decrypt_failures(addr: SocketAddr) -> f64 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .lines()
        .find_map(|line| line.strip_prefix("telemq_storage_decrypt_failures_total "))
        .expect("counter exported")
        .parse()
        .unwrap()
}

/// One test for both kinds of damage: the failure counter is process-wide, and this is the
/// only test in this binary that makes it move, so its exact increase is checked.
#[tokio::test]
async fn altered_and_moved_records_are_reported_and_not_delivered() {
    let keys = tempfile::tempdir().unwrap();
    let key = new_key(keys.path(), "storage.key");
    let broker = TestBroker::start_with(with_keys(Some(&key), None)).await;
    let before = decrypt_failures(broker.broker().metrics_addr().unwrap()).await;
    persistent_subscriber(broker.addr, "victim", "t/#").await;
    publish_qos1(broker.addr, "t/1", b"altered on disk", false).await;
    publish_qos1(broker.addr, "t/2", b"intact", false).await;
    publish_qos1(broker.addr, "r/a", b"retained a", true).await;
    publish_qos1(broker.addr, "r/b", b"retained b", true).await;
    let data_dir = broker.data_dir.clone();
    broker.shutdown().await;

    {
        let db = open_raw(data_dir.path());
        // Message ids grow, so the first record is "altered on disk": one bit of its
        // ciphertext flipped.
        let messages = records(&db, "messages");
        assert_eq!(messages.len(), 2);
        let (id, mut value) = messages[0].clone();
        value[20] ^= 0x01;
        db.put_cf(db.cf_handle("messages").unwrap(), id, value)
            .unwrap();
        // r/a's sealed value copied over r/b's: valid ciphertext, wrong place.
        let retained = db.cf_handle("retained").unwrap();
        let a = db.get_cf(retained, b"r/a").unwrap().unwrap();
        db.put_cf(retained, b"r/b", a).unwrap();
    }

    let broker = TestBroker::start_in(data_dir, with_keys(Some(&key), None)).await;
    let after = decrypt_failures(broker.broker().metrics_addr().unwrap()).await;
    assert_eq!(after - before, 2.0, "each damaged record is counted");
    assert_eq!(broker.broker().retained_count(), 1);
    assert_eq!(
        retained(broker.addr, "r/#", 1).await,
        vec![b"retained a".to_vec()]
    );
    assert_eq!(
        drain(broker.addr, "victim", 1).await,
        vec![b"intact".to_vec()]
    );
    // The broker carries on: new messages are stored and delivered.
    persistent_subscriber(broker.addr, "victim", "t/#").await;
    publish_qos1(broker.addr, "t/3", b"after the damage", false).await;
    assert_eq!(
        drain(broker.addr, "victim", 1).await,
        vec![b"after the damage".to_vec()]
    );
    broker.shutdown().await;
}

/// Every stored value with the sealing `ring` sees on it.
fn sealings(data_dir: &Path, ring: &KeyRing) -> Vec<(Option<Sealing>, Vec<u8>)> {
    let db = open_raw(data_dir);
    FAMILIES
        .iter()
        .flat_map(|cf| records(&db, cf))
        .map(|(_, value)| (ring.sealed_with(&value), value))
        .collect()
}

#[tokio::test]
async fn rotation_reads_old_records_and_rekey_moves_everything_to_the_new_key() {
    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (new_key(keys.path(), "a.key"), new_key(keys.path(), "b.key"));
    let broker = TestBroker::start_with(with_keys(Some(&a), None)).await;
    persistent_subscriber(broker.addr, "rot", "rot/#").await;
    publish_qos1(broker.addr, "rot/1", b"under a", false).await;
    publish_qos1(broker.addr, "kept", b"retained under a", true).await;

    // New key b for writing, a kept for reading.
    let broker = broker.restart_with(with_keys(Some(&b), Some(&a))).await;
    assert_eq!(broker.broker().retained_count(), 1);
    publish_qos1(broker.addr, "rot/2", b"under b", false).await;
    let data_dir = broker.data_dir.clone();
    broker.shutdown().await;

    let ring = || KeyRing::new(Some(Key::load(&b).unwrap()), Some(Key::load(&a).unwrap())).unwrap();
    let (key_a, key_b) = (
        Sealing::Key(Key::load(&a).unwrap().fingerprint()),
        Sealing::Key(Key::load(&b).unwrap().fingerprint()),
    );
    let mixed = sealings(data_dir.path(), &ring());
    let under_a: Vec<Vec<u8>> = mixed
        .iter()
        .filter(|(sealing, _)| *sealing == Some(key_a))
        .map(|(_, value)| value.clone())
        .collect();
    assert!(!under_a.is_empty());
    assert!(mixed.iter().any(|(sealing, _)| *sealing == Some(key_b)));
    // Checked below to be gone; here, that the search finds them.
    for value in &under_a {
        assert!(!files_containing(data_dir.path(), value).is_empty());
    }
    // Without a, the directory is refused: records still need it.
    let error = refused(data_dir.path(), with_keys(Some(&b), None)).await;
    assert!(error.contains("wrong key"), "{error}");

    let mut progress = Vec::new();
    let report = telemq::storage::rekey(data_dir.path(), ring(), |done, total| {
        progress.push((done, total));
    })
    .expect("rekey");
    assert_eq!(report.unreadable, 0);
    assert_eq!(report.rekeyed, report.total);
    assert_eq!(report.total as usize, mixed.len());
    assert_eq!(progress.last(), Some(&(report.total, report.total)));
    let after = sealings(data_dir.path(), &ring());
    assert!(after.iter().all(|(s, _)| *s == Some(key_b)), "{after:?}");
    // No file keeps a copy sealed with the old key (which may be why it was rotated).
    for value in &under_a {
        assert!(files_containing(data_dir.path(), value).is_empty());
    }

    // Only b now: a alone is the wrong key, b alone reads everything.
    let error = refused(data_dir.path(), with_keys(Some(&a), None)).await;
    assert!(error.contains("wrong key"), "{error}");
    let broker = TestBroker::start_in(data_dir, with_keys(Some(&b), None)).await;
    assert_eq!(
        drain(broker.addr, "rot", 2).await,
        vec![b"under a".to_vec(), b"under b".to_vec()]
    );
    assert_eq!(
        retained(broker.addr, "kept", 1).await,
        vec![b"retained under a".to_vec()]
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn the_cli_generates_keys_and_migrates_a_plain_directory() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("storage.key");
    let telemq = || Command::new(env!("CARGO_BIN_EXE_telemq"));
    let keygen = telemq().arg("keygen").arg(&key).output().unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = std::fs::read(&key).unwrap();
    let again = telemq().arg("keygen").arg(&key).output().unwrap();
    assert!(!again.status.success(), "overwrote a key: {again:?}");
    assert_eq!(std::fs::read(&key).unwrap(), before);

    let broker = TestBroker::start().await;
    persistent_subscriber(broker.addr, "migrant", "m/#").await;
    publish_qos1(broker.addr, "m/1", b"written in the clear", false).await;
    let data_dir = broker.data_dir.clone();
    broker.shutdown().await;

    let config = write_config(dir.path(), data_dir.path(), Some(&key), None);
    let rekey = telemq()
        .arg("rekey")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&rekey.stdout);
    assert!(rekey.status.success(), "{rekey:?}");
    let last = stdout
        .lines()
        .rfind(|l| l.starts_with("rekeyed "))
        .expect("progress printed");
    let (done, total) = last
        .trim_start_matches("rekeyed ")
        .trim_end_matches(" records")
        .split_once('/')
        .unwrap();
    assert_eq!(done, total, "{stdout}");
    // The session, its subscription and the message record (which lists the delivery).
    assert!(total.parse::<u64>().unwrap() >= 3, "{stdout}");
    let leaked = files_containing(data_dir.path(), b"written in the clear");
    assert!(leaked.is_empty(), "{leaked:?}");

    let error = refused(data_dir.path(), |_| {}).await;
    assert!(error.contains("encrypted"), "{error}");
    let broker = TestBroker::start_in(data_dir, with_keys(Some(&key), None)).await;
    assert_eq!(
        drain(broker.addr, "migrant", 1).await,
        vec![b"written in the clear".to_vec()]
    );
    broker.shutdown().await;
}
