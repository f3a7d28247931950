//! The scenarios: topology set-up, the publisher and subscriber loops, the measurement window,
//! and the JSON report.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout_at, MissedTickBehavior};

use crate::client::{Client, ConnectOptions, Tls};
use crate::codec::{self, Packet, Stamp};
use crate::json::Json;
use crate::stats::{Histogram, SeqTracker};
use crate::{Cli, Failure, Scenario};

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_DONE: u8 = 2;

/// Keep alive of the load clients: long enough that no PINGREQ is ever needed during a run.
const KEEP_ALIVE: u16 = 600;

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Shared run state: phase, stop flags and counters every task adds to once per batch.
struct Ctl {
    start: tokio::time::Instant,
    /// Nothing may block past this instant (publishing, draining, acknowledging).
    hard_deadline: tokio::time::Instant,
    phase: AtomicU8,
    stop_pub: AtomicBool,
    stop_sub: AtomicBool,
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Ctl {
    fn new(cli: &Cli) -> Self {
        let start = tokio::time::Instant::now();
        Self {
            start,
            hard_deadline: start + secs(cli.warmup + cli.duration + 2.0 * cli.drain + 5.0),
            phase: AtomicU8::new(PHASE_WARMUP),
            stop_pub: AtomicBool::new(false),
            stop_sub: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        }
    }

    fn error(&self, msg: String) {
        eprintln!("telemq-bench: {msg}");
        match self.errors.lock() {
            Ok(mut e) => e.push(msg),
            Err(poisoned) => poisoned.into_inner().push(msg),
        }
    }

    fn errors(&self) -> Vec<String> {
        match self.errors.lock() {
            Ok(e) => e.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Immutable per-run settings.
struct RunCfg {
    addr: SocketAddr,
    /// Where subscribers connect, round-robin (`--subscriber-ports`); empty: `addr`.
    subscriber_addrs: Vec<SocketAddr>,
    qos: u8,
    payload_size: usize,
    window: u16,
    batch: usize,
    drain: Duration,
    connect_timeout: Duration,
    run_tag: u32,
    /// Client id prefix, unique per process so concurrent or successive runs never collide.
    prefix: String,
    /// `--tls`: every connection over TLS 1.3.
    tls: Option<Tls>,
}

impl RunCfg {
    fn new(cli: &Cli, addr: SocketAddr, qos: u8) -> anyhow::Result<Self> {
        let run_tag = (unix_nanos() as u32) ^ std::process::id().rotate_left(16);
        let tls = if cli.tls {
            Some(Tls::new(&cli.ca_file, &cli.tls_server_name)?)
        } else {
            None
        };
        Ok(Self {
            addr,
            subscriber_addrs: Vec::new(),
            qos,
            payload_size: cli.payload_size,
            window: cli.window,
            batch: cli.batch,
            drain: secs(cli.drain),
            connect_timeout: secs(cli.connect_timeout),
            run_tag,
            prefix: format!("tb{:08x}", run_tag),
            tls,
        })
    }

    fn connect_opts<'a>(&'a self, client_id: &'a str, clean_session: bool) -> ConnectOptions<'a> {
        self.connect_opts_at(self.addr, client_id, clean_session)
    }

    /// The address subscriber `i` connects to.
    fn subscriber_addr(&self, i: usize) -> SocketAddr {
        match self.subscriber_addrs.len() {
            0 => self.addr,
            n => self.subscriber_addrs[i % n],
        }
    }

    fn connect_opts_at<'a>(
        &'a self,
        addr: SocketAddr,
        client_id: &'a str,
        clean_session: bool,
    ) -> ConnectOptions<'a> {
        ConnectOptions {
            addr,
            client_id,
            clean_session,
            keep_alive: KEEP_ALIVE,
            timeout: self.connect_timeout,
            tls: self.tls.as_ref(),
        }
    }
}

/// CPU seconds (user + system) of a process, from /proc/PID/stat (USER_HZ assumed 100).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3 of the file, utime 14 and stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident set size in bytes, from /proc/PID/status.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Soft limit on open files of this process, from /proc/self/limits.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

pub async fn run(
    cli: Cli,
    addr: SocketAddr,
    subscriber_addrs: Vec<SocketAddr>,
) -> Result<Json, Failure> {
    match cli.scenario.clone() {
        Scenario::FanIn { publishers, rate } => {
            let topo = Topology {
                publishers: (0..publishers)
                    .map(|i| PubSpec {
                        topic: format!("bench/fanin/{i}"),
                        rate: rate.map(|r| r / publishers as f64),
                        phase: i as f64 / publishers as f64,
                    })
                    .collect(),
                groups: vec![Group {
                    filter: "bench/fanin/#".into(),
                    subscribers: 1,
                    expects: (0..publishers as u32).collect(),
                }],
                params: Json::object()
                    .with("publishers", publishers)
                    .with("rate", rate),
            };
            message_run(&cli, addr, &subscriber_addrs, cli.qos, topo).await
        }
        Scenario::FanOut { subscribers, rate } => {
            let topo = Topology {
                publishers: vec![PubSpec {
                    topic: "bench/fanout/topic".into(),
                    rate,
                    phase: 0.0,
                }],
                groups: (0..subscribers)
                    .map(|_| Group {
                        filter: "bench/fanout/topic".into(),
                        subscribers: 1,
                        expects: vec![0],
                    })
                    .collect(),
                params: Json::object()
                    .with("subscribers", subscribers)
                    .with("rate", rate),
            };
            message_run(&cli, addr, &subscriber_addrs, cli.qos, topo).await
        }
        Scenario::Pairs { pairs } => {
            let topo = Topology {
                publishers: (0..pairs)
                    .map(|i| PubSpec {
                        topic: format!("bench/pairs/{i}"),
                        rate: None,
                        phase: 0.0,
                    })
                    .collect(),
                groups: (0..pairs)
                    .map(|i| Group {
                        filter: format!("bench/pairs/{i}"),
                        subscribers: 1,
                        expects: vec![i as u32],
                    })
                    .collect(),
                params: Json::object().with("pairs", pairs),
            };
            message_run(&cli, addr, &subscriber_addrs, cli.qos, topo).await
        }
        Scenario::Shared {
            publishers,
            subscribers,
        } => {
            let topo = Topology {
                publishers: (0..publishers)
                    .map(|i| PubSpec {
                        topic: format!("bench/shared/{i}"),
                        rate: None,
                        phase: 0.0,
                    })
                    .collect(),
                groups: vec![Group {
                    filter: "$share/bench/bench/shared/#".into(),
                    subscribers,
                    expects: (0..publishers as u32).collect(),
                }],
                params: Json::object()
                    .with("publishers", publishers)
                    .with("subscribers", subscribers),
            };
            message_run(&cli, addr, &subscriber_addrs, cli.qos, topo).await
        }
        Scenario::Latency { rate } => {
            let topo = Topology {
                publishers: vec![PubSpec {
                    topic: "bench/latency".into(),
                    rate: Some(rate),
                    phase: 0.0,
                }],
                groups: vec![Group {
                    filter: "bench/latency".into(),
                    subscribers: 1,
                    expects: vec![0],
                }],
                params: Json::object().with("rate", rate),
            };
            message_run(&cli, addr, &subscriber_addrs, cli.qos, topo).await
        }
        Scenario::Connections {
            connections,
            concurrency,
            hold,
        } => connections_run(&cli, addr, connections, concurrency, hold).await,
        Scenario::Handshakes { concurrency } => handshakes_run(&cli, addr, concurrency).await,
        Scenario::Persisted {
            sessions,
            publishers,
            no_drain,
            drain_timeout,
        } => persisted_run(&cli, addr, sessions, publishers, !no_drain, drain_timeout).await,
    }
}

struct PubSpec {
    topic: String,
    /// Messages per second; `None`: as fast as the window and the socket allow.
    rate: Option<f64>,
    /// With a rate: where in its tick period (0..1) this publisher sends, so that many slow
    /// publishers spread their messages instead of all firing on the same tick.
    phase: f64,
}

/// Receivers that together should see every message of `expects` once: one plain subscriber,
/// or the members of a shared subscription.
struct Group {
    filter: String,
    subscribers: usize,
    expects: Vec<u32>,
}

struct Topology {
    publishers: Vec<PubSpec>,
    groups: Vec<Group>,
    params: Json,
}

/// Connects `n` clients with at most `concurrency` handshakes in flight. `setup` runs on each
/// connected client (e.g. SUBSCRIBE). Results keep the input order.
/// Who a batch of connections is for: subscribers go where `--subscriber-ports` says.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Publisher,
    Subscriber,
}

async fn connect_many<T, F, Fut>(
    cfg: &Arc<RunCfg>,
    ids: Vec<(String, bool)>,
    concurrency: usize,
    role: Role,
    setup: F,
) -> Vec<anyhow::Result<T>>
where
    T: Send + 'static,
    F: Fn(Client, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let n = ids.len();
    for (i, (id, clean)) in ids.into_iter().enumerate() {
        let cfg = cfg.clone();
        let permits = permits.clone();
        let setup = setup.clone();
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let result = async {
                let addr = match role {
                    Role::Subscriber => cfg.subscriber_addr(i),
                    Role::Publisher => cfg.addr,
                };
                let (client, _) = Client::connect(&cfg.connect_opts_at(addr, &id, clean)).await?;
                setup(client, i).await
            }
            .await;
            (i, result)
        });
    }
    let mut out: Vec<Option<anyhow::Result<T>>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, r)) => out[i] = Some(r),
            Err(e) => eprintln!("telemq-bench: connect task failed: {e}"),
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("connect task did not finish"))))
        .collect()
}

/// Checks SUBACK return codes: 0x80 (or anything above the granted maximum) is a refusal.
fn check_suback(filter: &str, qos: u8, codes: &[u8]) -> Result<(), Failure> {
    match codes {
        [code] if *code <= qos => Ok(()),
        [0x80] => Err(Failure::Refused(format!(
            "the broker refused the subscription to {filter:?} (SUBACK return code 0x80){}",
            if filter.starts_with("$share/") {
                ": shared subscriptions are probably not supported"
            } else {
                ""
            }
        ))),
        other => Err(Failure::Setup(anyhow!(
            "unexpected SUBACK return codes {other:?} for {filter:?} at QoS {qos}"
        ))),
    }
}

/// Connects and subscribes one client per subscriber, all before anyone publishes.
async fn connect_subscribers(
    cfg: &Arc<RunCfg>,
    filters: Vec<String>,
) -> Result<Vec<Client>, Failure> {
    let ids = (0..filters.len())
        .map(|i| (format!("{}-sub-{i}", cfg.prefix), true))
        .collect();
    let filters = Arc::new(filters);
    let qos = cfg.qos;
    let timeout = cfg.connect_timeout;
    let results = connect_many(cfg, ids, 500, Role::Subscriber, {
        let filters = filters.clone();
        move |mut client: Client, i: usize| {
            let filters = filters.clone();
            async move {
                let codes = client.subscribe(1, &[(&filters[i], qos)], timeout).await?;
                Ok((client, codes))
            }
        }
    })
    .await;
    let mut clients = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        let (client, codes) =
            r.map_err(|e| Failure::Setup(e.context("subscriber set-up failed")))?;
        check_suback(&filters[i], qos, &codes)?;
        clients.push(client);
    }
    Ok(clients)
}

async fn connect_publishers(cfg: &Arc<RunCfg>, n: usize) -> Result<Vec<Client>, Failure> {
    let ids = (0..n)
        .map(|i| (format!("{}-pub-{i}", cfg.prefix), true))
        .collect();
    let results = connect_many(cfg, ids, 500, Role::Publisher, |c: Client, _| async move {
        Ok(c)
    })
    .await;
    results
        .into_iter()
        .map(|r| r.map_err(|e| Failure::Setup(e.context("publisher set-up failed"))))
        .collect()
}

struct PubResult {
    id: u32,
    sent: u64,
    acked: u64,
    unexpected_acks: u64,
    unacked: u64,
}

/// Outbound QoS 1/2 state of one publisher.
struct Window {
    /// Per packet id: 0 free, 1 awaiting PUBACK (QoS 1) or PUBREC (QoS 2), 2 awaiting PUBCOMP.
    state: Vec<u8>,
    inflight: u32,
    next_pkid: u16,
    acked: u64,
    unexpected: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            state: vec![0; 65536],
            inflight: 0,
            next_pkid: 1,
            acked: 0,
            unexpected: 0,
        }
    }

    /// A free packet id (the caller keeps `inflight` below 65535).
    fn alloc(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if self.state[id as usize] == 0 {
                self.state[id as usize] = 1;
                self.inflight += 1;
                return id;
            }
        }
    }

    /// Handles every complete packet in `rbuf`; PUBRELs to send go to `out`. Returns the number
    /// of messages newly completed.
    fn on_packets(
        &mut self,
        rbuf: &mut BytesMut,
        qos: u8,
        out: &mut BytesMut,
    ) -> anyhow::Result<u64> {
        let before = self.acked;
        while let Some((packet, used)) = codec::decode(rbuf)? {
            match packet {
                Packet::Puback(id) if qos == 1 && self.state[id as usize] == 1 => {
                    self.state[id as usize] = 0;
                    self.inflight -= 1;
                    self.acked += 1;
                }
                Packet::Pubrec(id) if qos == 2 && self.state[id as usize] == 1 => {
                    self.state[id as usize] = 2;
                    codec::encode_pubrel(out, id);
                }
                Packet::Pubrec(id) if qos == 2 && self.state[id as usize] == 2 => {
                    // A repeated PUBREC: answer again, as the spec asks.
                    codec::encode_pubrel(out, id);
                }
                Packet::Pubcomp(id) if qos == 2 && self.state[id as usize] == 2 => {
                    self.state[id as usize] = 0;
                    self.inflight -= 1;
                    self.acked += 1;
                }
                Packet::Puback(_) | Packet::Pubrec(_) | Packet::Pubcomp(_) => self.unexpected += 1,
                Packet::Pingresp => {}
                other => bail!("publisher received an unexpected {other:?}"),
            }
            rbuf.advance(used);
        }
        Ok(self.acked - before)
    }
}

/// Reads whatever is available without waiting. `Ok(false)`: the broker closed the connection.
fn try_read_all(client: &mut Client) -> std::io::Result<bool> {
    loop {
        client.reserve_read();
        match client.stream.try_read_buf(&mut client.rbuf) {
            Ok(0) => return Ok(false),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

async fn publisher(
    mut client: Client,
    id: u32,
    spec: PubSpec,
    cfg: Arc<RunCfg>,
    ctl: Arc<Ctl>,
) -> PubResult {
    let mut result = PubResult {
        id,
        sent: 0,
        acked: 0,
        unexpected_acks: 0,
        unacked: 0,
    };
    let mut window = Window::new();
    let outcome = publish_loop(&mut client, id, &spec, &cfg, &ctl, &mut window, &mut result).await;
    if let Err(e) = outcome {
        ctl.error(format!("publisher {id} ({}): {e:#}", spec.topic));
    } else {
        // Wait (bounded) for the acknowledgements of what is still in flight.
        let deadline = tokio::time::Instant::now() + cfg.drain;
        let mut out = BytesMut::new();
        let drained: anyhow::Result<()> = async {
            while window.inflight > 0 && tokio::time::Instant::now() < deadline {
                let n = window.on_packets(&mut client.rbuf, cfg.qos, &mut out)?;
                ctl.acked.fetch_add(n, Relaxed);
                if !out.is_empty() {
                    timeout_at(deadline, client.stream.send(&out)).await??;
                    out.clear();
                }
                if window.inflight == 0 {
                    break;
                }
                client.reserve_read();
                match timeout_at(deadline, client.stream.read_buf(&mut client.rbuf)).await {
                    Err(_) => break,
                    Ok(Ok(0)) => bail!("connection closed while waiting for acknowledgements"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = drained {
            ctl.error(format!("publisher {id}: {e:#}"));
        }
    }
    result.acked = window.acked;
    result.unexpected_acks = window.unexpected;
    result.unacked = window.inflight as u64;
    client.disconnect(Duration::from_secs(1)).await;
    result
}

async fn publish_loop(
    client: &mut Client,
    id: u32,
    spec: &PubSpec,
    cfg: &RunCfg,
    ctl: &Ctl,
    window: &mut Window,
    result: &mut PubResult,
) -> anyhow::Result<()> {
    let qos = cfg.qos;
    let topic = spec.topic.as_bytes();
    let mut payload = vec![0u8; cfg.payload_size];
    let mut wbuf = BytesMut::with_capacity(cfg.batch * (cfg.payload_size + topic.len() + 9) + 64);
    let mut ctrl = BytesMut::new();
    let mut tick = spec.rate.map(|rate| {
        // At most one tick per millisecond; a publisher with a smaller share (1,000 sensors at
        // 20 msg/s each) ticks once per message instead of waking a thousand times a second.
        let period = Duration::from_secs_f64((1.0 / rate).max(0.001));
        let mut t = tokio::time::interval_at(ctl.start + period.mul_f64(spec.phase), period);
        t.set_missed_tick_behavior(MissedTickBehavior::Skip);
        t
    });
    let mut batches: u64 = 0;
    let deadline = ctl.hard_deadline;
    let mut seq: u64 = 0;
    while !ctl.stop_pub.load(Relaxed) {
        let mut n = cfg.batch as u64;
        if let (Some(rate), Some(tick)) = (spec.rate, tick.as_mut()) {
            let due = (rate * ctl.start.elapsed().as_secs_f64()) as u64;
            if due <= seq {
                tick.tick().await;
                if qos > 0 {
                    if !try_read_all(client)? {
                        bail!("connection closed by the broker");
                    }
                    let acked = window.on_packets(&mut client.rbuf, qos, &mut ctrl)?;
                    ctl.acked.fetch_add(acked, Relaxed);
                }
                continue;
            }
            n = n.min(due - seq);
        }
        if qos > 0 {
            let free = u64::from(cfg.window).saturating_sub(u64::from(window.inflight));
            // Unpaced publishers wait until a useful batch fits, so a slow acknowledger is not
            // answered with one tiny write per PUBACK; paced ones send whatever is due.
            let min_free = if spec.rate.is_some() {
                1
            } else {
                (cfg.batch as u64).min(u64::from(cfg.window) / 2).max(1)
            };
            if free < min_free {
                if !ctrl.is_empty() {
                    timeout_at(deadline, client.stream.send(&ctrl)).await??;
                    ctrl.clear();
                }
                client.read_within(Duration::from_millis(50)).await?;
                let acked = window.on_packets(&mut client.rbuf, qos, &mut ctrl)?;
                ctl.acked.fetch_add(acked, Relaxed);
                continue;
            }
            n = n.min(free);
        }
        // PUBRELs first, then the batch of PUBLISH packets, in one write.
        wbuf.extend_from_slice(&ctrl);
        ctrl.clear();
        let now = unix_nanos();
        for _ in 0..n {
            Stamp {
                publisher: id,
                run_tag: cfg.run_tag,
                seq,
                sent_ns: now,
            }
            .write(&mut payload);
            let pkid = if qos > 0 { window.alloc() } else { 0 };
            codec::encode_publish(&mut wbuf, topic, qos, pkid, false, false, &payload);
            seq += 1;
        }
        match timeout_at(deadline, client.stream.send(&wbuf)).await {
            Ok(r) => r?,
            Err(_) => bail!("write stalled past the run's deadline"),
        }
        wbuf.clear();
        result.sent = seq;
        ctl.sent.fetch_add(n, Relaxed);
        batches += 1;
        if qos > 0 || batches.is_multiple_of(64) {
            if !try_read_all(client)? {
                bail!("connection closed by the broker");
            }
            let acked = window.on_packets(&mut client.rbuf, qos, &mut ctrl)?;
            ctl.acked.fetch_add(acked, Relaxed);
        }
        if spec.rate.is_none() && qos == 0 && batches.is_multiple_of(16) {
            // Let the other tasks on this worker run: a QoS 0 publisher whose socket always
            // accepts data would otherwise never yield.
            tokio::task::yield_now().await;
        }
    }
    // PUBRELs owed for PUBRECs read in the last round.
    if !ctrl.is_empty() {
        timeout_at(deadline, client.stream.send(&ctrl)).await??;
    }
    Ok(())
}

struct SubResult {
    hist: Histogram,
    foreign: u64,
}

async fn subscriber(
    mut client: Client,
    index: usize,
    tracker: Arc<Mutex<SeqTracker>>,
    cfg: Arc<RunCfg>,
    ctl: Arc<Ctl>,
) -> SubResult {
    let mut result = SubResult {
        hist: Histogram::default(),
        foreign: 0,
    };
    let outcome = subscribe_loop(&mut client, &tracker, &cfg, &ctl, &mut result).await;
    if let Err(e) = outcome {
        ctl.error(format!("subscriber {index}: {e:#}"));
    }
    client.disconnect(Duration::from_secs(1)).await;
    result
}

async fn subscribe_loop(
    client: &mut Client,
    tracker: &Mutex<SeqTracker>,
    cfg: &RunCfg,
    ctl: &Ctl,
    result: &mut SubResult,
) -> anyhow::Result<()> {
    let mut acks = BytesMut::new();
    loop {
        let now = unix_nanos();
        let measuring = ctl.phase.load(Relaxed) == PHASE_MEASURE;
        let mut count = 0u64;
        {
            let mut t = match tracker.lock() {
                Ok(t) => t,
                Err(poisoned) => poisoned.into_inner(),
            };
            while let Some((packet, used)) = codec::decode(&client.rbuf)? {
                match packet {
                    Packet::Publish {
                        qos, pkid, payload, ..
                    } => {
                        match Stamp::read(payload) {
                            Some(s) if s.run_tag == cfg.run_tag => {
                                if t.record(s.publisher, s.seq) {
                                    count += 1;
                                    if measuring {
                                        result.hist.record(now.saturating_sub(s.sent_ns) / 1000);
                                    }
                                } else {
                                    result.foreign += 1;
                                }
                            }
                            _ => result.foreign += 1,
                        }
                        match qos {
                            1 => codec::encode_puback(&mut acks, pkid),
                            2 => codec::encode_pubrec(&mut acks, pkid),
                            _ => {}
                        }
                    }
                    Packet::Pubrel(pkid) => codec::encode_pubcomp(&mut acks, pkid),
                    Packet::Pingresp => {}
                    other => bail!("subscriber received an unexpected {other:?}"),
                }
                client.rbuf.advance(used);
            }
        }
        if count > 0 {
            ctl.received.fetch_add(count, Relaxed);
        }
        if !acks.is_empty() {
            match timeout_at(ctl.hard_deadline, client.stream.send(&acks)).await {
                Ok(r) => r?,
                Err(_) => bail!("acknowledgement write stalled past the run's deadline"),
            }
            acks.clear();
        }
        if ctl.stop_sub.load(Relaxed) {
            return Ok(());
        }
        client.read_within(Duration::from_millis(100)).await?;
    }
}

/// Counter values at one instant.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    sent: u64,
    acked: u64,
    received: u64,
    broker_cpu: Option<f64>,
    own_cpu: Option<f64>,
}

fn snapshot(ctl: &Ctl, broker_pid: Option<u32>) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        sent: ctl.sent.load(Relaxed),
        acked: ctl.acked.load(Relaxed),
        received: ctl.received.load(Relaxed),
        broker_cpu: broker_pid.and_then(|p| cpu_seconds(&p.to_string())),
        own_cpu: cpu_seconds("self"),
    }
}

/// Warm-up, measurement window, stop: returns the snapshots at the window's two ends.
async fn measurement_window(cli: &Cli, ctl: &Ctl) -> (Snapshot, Snapshot) {
    sleep_until(ctl.start + secs(cli.warmup)).await;
    let a = snapshot(ctl, cli.broker_pid);
    ctl.phase.store(PHASE_MEASURE, Relaxed);
    eprintln!(
        "telemq-bench: warm-up done, measuring for {} s",
        cli.duration
    );
    let end = ctl.start + secs(cli.warmup + cli.duration);
    let mut last = a;
    while tokio::time::Instant::now() < end {
        sleep_until(end.min(tokio::time::Instant::now() + Duration::from_secs(1))).await;
        let s = snapshot(ctl, None);
        let dt = s.at.duration_since(last.at).as_secs_f64().max(1e-9);
        if matches!(cli.scenario, Scenario::Handshakes { .. }) {
            eprintln!(
                "telemq-bench:   connects {:>10.0}/s",
                (s.sent - last.sent) as f64 / dt
            );
            last = s;
            continue;
        }
        eprintln!(
            "telemq-bench:   sent {:>10.0}/s  acked {:>10.0}/s  received {:>10.0}/s",
            (s.sent - last.sent) as f64 / dt,
            (s.acked - last.acked) as f64 / dt,
            (s.received - last.received) as f64 / dt,
        );
        last = s;
    }
    let b = snapshot(ctl, cli.broker_pid);
    ctl.phase.store(PHASE_DONE, Relaxed);
    ctl.stop_pub.store(true, Relaxed);
    (a, b)
}

fn rate(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

fn latency_json(hist: &Histogram) -> Json {
    if hist.count() == 0 {
        return Json::Null;
    }
    let p = |q: f64| hist.percentile(q);
    Json::object()
        .with("p50", p(50.0))
        .with("p90", p(90.0))
        .with("p99", p(99.0))
        .with("p999", p(99.9))
        .with("max", hist.max())
        .with("samples", hist.count())
}

fn window_json(
    report: &mut Json,
    cli: &Cli,
    qos: u8,
    subscribers: bool,
    a: &Snapshot,
    b: &Snapshot,
) {
    let window = b.at.duration_since(a.at).as_secs_f64();
    report.set("duration_s", window);
    report.set("warmup_s", cli.warmup);
    report.set("sent_per_s", rate(b.sent - a.sent, window));
    if qos > 0 {
        report.set("acked_per_s", rate(b.acked - a.acked, window));
    }
    if subscribers {
        report.set("received_per_s", rate(b.received - a.received, window));
    }
    if let (Some(x), Some(y)) = (a.broker_cpu, b.broker_cpu) {
        report.set("broker_cpu_s", y - x);
    }
    if let (Some(x), Some(y)) = (a.own_cpu, b.own_cpu) {
        report.set("generator_cpu_s", y - x);
    }
}

async fn message_run(
    cli: &Cli,
    addr: SocketAddr,
    subscriber_addrs: &[SocketAddr],
    qos: u8,
    topo: Topology,
) -> Result<Json, Failure> {
    let mut cfg = RunCfg::new(cli, addr, qos)?;
    cfg.subscriber_addrs = subscriber_addrs.to_vec();
    let cfg = Arc::new(cfg);
    let filters: Vec<String> = topo
        .groups
        .iter()
        .flat_map(|g| std::iter::repeat_n(g.filter.clone(), g.subscribers))
        .collect();
    eprintln!(
        "telemq-bench: {} at QoS {qos}: connecting {} subscribers and {} publishers to {addr}",
        cli.scenario.name(),
        filters.len(),
        topo.publishers.len()
    );
    let subs = connect_subscribers(&cfg, filters).await?;
    let pubs = connect_publishers(&cfg, topo.publishers.len()).await?;
    let broker_rss_start = cli.broker_pid.and_then(rss_bytes);
    let tls = subs.first().and_then(|c| c.stream.tls_description());

    let ctl = Arc::new(Ctl::new(cli));
    let trackers: Vec<Arc<Mutex<SeqTracker>>> = topo
        .groups
        .iter()
        .map(|_| Arc::new(Mutex::new(SeqTracker::default())))
        .collect();
    let mut sub_tasks = JoinSet::new();
    let mut subs = subs.into_iter();
    let mut index = 0;
    for (g, group) in topo.groups.iter().enumerate() {
        for _ in 0..group.subscribers {
            let Some(client) = subs.next() else { break };
            sub_tasks.spawn(subscriber(
                client,
                index,
                trackers[g].clone(),
                cfg.clone(),
                ctl.clone(),
            ));
            index += 1;
        }
    }
    let mut pub_tasks = JoinSet::new();
    for (i, (client, spec)) in pubs.into_iter().zip(topo.publishers).enumerate() {
        pub_tasks.spawn(publisher(client, i as u32, spec, cfg.clone(), ctl.clone()));
    }

    let (a, b) = measurement_window(cli, &ctl).await;

    let mut sent_by: Vec<u64> = Vec::new();
    let (mut acked, mut unexpected_acks, mut unacked) = (0u64, 0u64, 0u64);
    while let Some(joined) = pub_tasks.join_next().await {
        match joined {
            Ok(r) => {
                let i = r.id as usize;
                if sent_by.len() <= i {
                    sent_by.resize(i + 1, 0);
                }
                sent_by[i] = r.sent;
                acked += r.acked;
                unexpected_acks += r.unexpected_acks;
                unacked += r.unacked;
            }
            Err(e) => ctl.error(format!("publisher task failed: {e}")),
        }
    }
    let sent: u64 = sent_by.iter().sum();
    let expected: u64 = topo
        .groups
        .iter()
        .map(|g| {
            g.expects
                .iter()
                .map(|&p| sent_by.get(p as usize).copied().unwrap_or(0))
                .sum::<u64>()
        })
        .sum();
    // Drain: until every expected message arrived or --drain elapsed.
    let drain_end = tokio::time::Instant::now() + cfg.drain;
    while ctl.received.load(Relaxed) < expected && tokio::time::Instant::now() < drain_end {
        sleep(Duration::from_millis(10)).await;
    }
    ctl.stop_sub.store(true, Relaxed);
    let mut hist = Histogram::default();
    let mut foreign = 0;
    while let Some(joined) = sub_tasks.join_next().await {
        match joined {
            Ok(r) => {
                hist.merge(&r.hist);
                foreign += r.foreign;
            }
            Err(e) => ctl.error(format!("subscriber task failed: {e}")),
        }
    }
    let (mut received, mut duplicated, mut out_of_order, mut lost, mut beyond) = (0, 0, 0, 0, 0);
    for (group, tracker) in topo.groups.iter().zip(&trackers) {
        let t = match tracker.lock() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let (r, d, o) = t.totals();
        received += r;
        duplicated += d;
        out_of_order += o;
        let exp: Vec<(u32, u64)> = group
            .expects
            .iter()
            .map(|&p| (p, sent_by.get(p as usize).copied().unwrap_or(0)))
            .collect();
        lost += t.lost(&exp);
        beyond += exp
            .iter()
            .filter_map(|&(p, s)| t.publisher(p).map(|x| x.beyond(s)))
            .sum::<u64>();
    }

    let errors = ctl.errors();
    let mut report = Json::object()
        .with("scenario", cli.scenario.name())
        .with("label", cli.label.clone())
        .with("qos", qos)
        .with("params", with_common(topo.params, cli))
        .with("tls", tls);
    window_json(&mut report, cli, qos, true, &a, &b);
    report.set("sent", sent);
    if qos > 0 {
        report.set("acked", acked);
        report.set("unacked", unacked);
        report.set("unexpected_acks", unexpected_acks);
    }
    report.set("expected", expected);
    report.set("received", received);
    report.set("lost", lost);
    report.set("duplicated", duplicated);
    report.set("out_of_order", out_of_order);
    if beyond > 0 {
        report.set("beyond_sent", beyond);
    }
    if foreign > 0 {
        report.set("foreign", foreign);
    }
    report.set("latency_us", latency_json(&hist));
    if let Some(pid) = cli.broker_pid {
        report.set(
            "broker_stats",
            Json::object()
                .with("pid", pid)
                .with("rss_bytes_start", broker_rss_start)
                .with("rss_bytes_end", rss_bytes(pid)),
        );
    }
    let ok = errors.is_empty();
    report.set("errors", errors);
    report.set("ok", ok);
    eprintln!(
        "telemq-bench: sent {sent}, received {received} of {expected} expected; lost {lost}, duplicated {duplicated}, out of order {out_of_order}"
    );
    Ok(report)
}

fn with_common(params: Json, cli: &Cli) -> Json {
    params
        .with("tls", cli.tls)
        .with("payload_size", cli.payload_size)
        .with("window", cli.window)
        .with("batch", cli.batch)
}

async fn connections_run(
    cli: &Cli,
    addr: SocketAddr,
    connections: usize,
    concurrency: usize,
    hold: f64,
) -> Result<Json, Failure> {
    if let Some(limit) = open_files_limit() {
        if (connections as u64).saturating_add(64) > limit {
            return Err(Failure::Setup(anyhow!(
                "{connections} connections need more open files than this process may have \
                 ({limit}); raise it first, e.g. `ulimit -n {}`",
                connections + 1024
            )));
        }
    }
    let cfg = Arc::new(RunCfg::new(cli, addr, cli.qos)?);
    let rss_before = cli.broker_pid.and_then(rss_bytes);
    eprintln!(
        "telemq-bench: connections: opening {connections} clients ({concurrency} handshakes in flight) to {addr}"
    );
    let ids = (0..connections)
        .map(|i| (format!("{}-conn-{i}", cfg.prefix), true))
        .collect();
    let prefix = cfg.prefix.clone();
    let qos = cfg.qos;
    let sub_timeout = cfg.connect_timeout;
    let started = Instant::now();
    let results = connect_many(
        &cfg,
        ids,
        concurrency,
        Role::Subscriber,
        move |mut c: Client, i: usize| {
            let topic = format!("bench/conn/{prefix}/{i}");
            async move {
                let codes = c.subscribe(1, &[(&topic, qos)], sub_timeout).await?;
                match codes.as_slice() {
                    [code] if *code <= qos => Ok(c),
                    other => Err(anyhow!("SUBACK {other:?} for {topic}")),
                }
            }
        },
    )
    .await;
    let connect_s = started.elapsed().as_secs_f64();
    let mut clients = Vec::with_capacity(connections);
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(c) => clients.push(c),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    eprintln!(
        "telemq-bench: {} connected and subscribed in {connect_s:.2} s ({} failed); holding {hold} s",
        clients.len(),
        failures.len()
    );
    sleep(secs(hold)).await;
    let rss_after = cli.broker_pid.and_then(rss_bytes);
    let broker_cpu = cli.broker_pid.and_then(|p| cpu_seconds(&p.to_string()));

    // Every connection must still be alive: PINGREQ / PINGRESP on each (bounded concurrency).
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let ping_timeout = cfg.connect_timeout;
    for mut c in clients {
        let permits = permits.clone();
        set.spawn(async move {
            let _p = permits.acquire_owned().await;
            let alive = c.ping(ping_timeout).await;
            (c, alive)
        });
    }
    let mut clients = Vec::with_capacity(connections);
    let mut alive = 0u64;
    while let Some(joined) = set.join_next().await {
        if let Ok((c, ok)) = joined {
            alive += u64::from(ok);
            clients.push(c);
        }
    }
    // Close them all (bounded).
    let close_started = Instant::now();
    let mut set = JoinSet::new();
    for c in clients {
        let permits = permits.clone();
        set.spawn(async move {
            let _p = permits.acquire_owned().await;
            c.disconnect(Duration::from_secs(2)).await;
        });
    }
    while set.join_next().await.is_some() {}
    let close_s = close_started.elapsed().as_secs_f64();

    let connected = connections - failures.len();
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some((a.saturating_sub(b)) as f64 / connected as f64)
        }
        _ => None,
    };
    let mut errors: Vec<String> = failures.iter().take(10).cloned().collect();
    if failures.len() > 10 {
        errors.push(format!(
            "... and {} more connect failures",
            failures.len() - 10
        ));
    }
    if alive < connected as u64 {
        errors.push(format!(
            "{} of {connected} connections did not answer PINGREQ after the hold",
            connected as u64 - alive
        ));
    }
    eprintln!(
        "telemq-bench: {connected} connected, {alive} alive after {hold} s; broker RSS {:?} → {:?} bytes",
        rss_before, rss_after
    );
    let ok = errors.is_empty();
    let report = Json::object()
        .with("scenario", cli.scenario.name())
        .with("label", cli.label.clone())
        .with("qos", qos)
        .with(
            "params",
            Json::object()
                .with("connections", connections)
                .with("concurrency", concurrency)
                .with("hold_s", hold)
                .with("keep_alive", KEEP_ALIVE),
        )
        .with("connected", connected)
        .with("failed", failures.len())
        .with("alive_after_hold", alive)
        .with("connect_s", connect_s)
        .with("connects_per_s", rate(connected as u64, connect_s))
        .with("close_s", close_s)
        .with("rss_bytes_before", rss_before)
        .with("rss_bytes_after", rss_after)
        .with("rss_bytes_per_connection", per_conn)
        .with("broker_cpu_s_total", broker_cpu)
        .with("errors", errors)
        .with("ok", ok);
    if rss_before.is_none() {
        eprintln!(
            "telemq-bench: no --broker-pid (or unreadable /proc): RSS per connection not measured"
        );
    }
    if connected == 0 {
        return Err(Failure::Setup(anyhow!(
            "no connection succeeded: {}",
            failures.first().cloned().unwrap_or_default()
        )));
    }
    Ok(report)
}

/// Connects/s of fresh connections: `concurrency` workers each connect (TCP, TLS with --tls,
/// CONNECT, CONNACK), send DISCONNECT and close, over and over. Connects completed within the
/// measurement window count; `ctl.sent` counts them (there are no messages here).
async fn handshakes_run(cli: &Cli, addr: SocketAddr, concurrency: usize) -> Result<Json, Failure> {
    let cfg = Arc::new(RunCfg::new(cli, addr, cli.qos)?);
    // One connection first: a wrong port or certificate fails here, once, rather than in every
    // worker; it also tells which TLS parameters the broker chose.
    let probe_id = format!("{}-probe", cfg.prefix);
    let (probe, _) = Client::connect(&cfg.connect_opts(&probe_id, true))
        .await
        .map_err(|e| Failure::Setup(e.context("first connection failed")))?;
    let tls = probe.stream.tls_description();
    probe.disconnect(Duration::from_secs(1)).await;
    eprintln!(
        "telemq-bench: handshakes: {concurrency} workers connecting and disconnecting to {addr}{}",
        tls.as_deref()
            .map(|t| format!(" over {t}"))
            .unwrap_or_default()
    );

    let ctl = Arc::new(Ctl::new(cli));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for w in 0..concurrency {
        let (cfg, ctl, failed) = (cfg.clone(), ctl.clone(), failed.clone());
        workers.spawn(async move {
            let mut n = 0u64;
            while !ctl.stop_pub.load(Relaxed) {
                let id = format!("{}-hs-{w}-{n}", cfg.prefix);
                n += 1;
                match Client::connect(&cfg.connect_opts(&id, true)).await {
                    Ok((client, _)) => {
                        // Counted at CONNACK: closing is not part of the set-up rate.
                        ctl.sent.fetch_add(1, Relaxed);
                        client.disconnect(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        // The first few reasons are enough to diagnose; a refusing broker
                        // must not fill memory with the same message.
                        if failed.fetch_add(1, Relaxed) < 10 {
                            ctl.error(format!("{e:#}"));
                        }
                        // Back off briefly so a broker that refuses does not get a busy loop.
                        sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    let (a, b) = measurement_window(cli, &ctl).await;
    // Workers finish the connection under way (bounded by --connect-timeout each).
    let joined = timeout_at(ctl.hard_deadline, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        workers.abort_all();
    }

    let window = b.at.duration_since(a.at).as_secs_f64();
    let connects = b.sent - a.sent;
    let per_connect_us = |cpu: Option<(f64, f64)>| match cpu {
        Some((x, y)) if connects > 0 => Some((y - x) * 1e6 / connects as f64),
        _ => None,
    };
    let broker_us = per_connect_us(a.broker_cpu.zip(b.broker_cpu));
    let own_us = per_connect_us(a.own_cpu.zip(b.own_cpu));
    let failures = failed.load(Relaxed);
    let mut errors = ctl.errors();
    if failures > 10 {
        errors.push(format!("... {failures} failed connects in all"));
    }
    let us = |v: Option<f64>| v.map_or_else(|| "?".to_string(), |v| format!("{v:.0}"));
    eprintln!(
        "telemq-bench: {connects} connects in {window:.2} s ({:.0}/s), {failures} failed; CPU per connect: broker {} µs, generator {} µs",
        rate(connects, window),
        us(broker_us),
        us(own_us)
    );
    let ok = errors.is_empty();
    let mut report = Json::object()
        .with("scenario", cli.scenario.name())
        .with("label", cli.label.clone())
        .with(
            "params",
            Json::object()
                .with("concurrency", concurrency)
                .with("tls", cli.tls)
                .with("keep_alive", KEEP_ALIVE),
        )
        .with("tls", tls);
    window_json(&mut report, cli, 0, false, &a, &b);
    report.set("connects", connects);
    report.set("connects_per_s", rate(connects, window));
    report.set("failed", failures);
    report.set("broker_cpu_us_per_connect", broker_us);
    report.set("generator_cpu_us_per_connect", own_us);
    report.set("errors", errors);
    report.set("ok", ok);
    if connects == 0 {
        return Err(Failure::Setup(anyhow!(
            "no connection succeeded in the window: {}",
            ctl.errors().first().cloned().unwrap_or_default()
        )));
    }
    Ok(report)
}

async fn persisted_run(
    cli: &Cli,
    addr: SocketAddr,
    sessions: usize,
    publishers: usize,
    drain_one: bool,
    drain_timeout: f64,
) -> Result<Json, Failure> {
    let qos = cli.qos.max(1);
    let cfg = Arc::new(RunCfg::new(cli, addr, qos)?);
    let filter = "bench/persist/#";
    let session_ids: Vec<String> = (0..sessions)
        .map(|i| format!("{}-persist-{i}", cfg.prefix))
        .collect();
    eprintln!("telemq-bench: persisted: creating {sessions} offline sessions on {addr}");
    // Create the sessions: clean first (a stale session of the same id must not count), then
    // clean_session = 0 + SUBSCRIBE QoS 1, then DISCONNECT.
    let mut set = JoinSet::new();
    for id in session_ids.clone() {
        let cfg = cfg.clone();
        set.spawn(async move {
            let (c, _) = Client::connect(&cfg.connect_opts(&id, true)).await?;
            c.disconnect(Duration::from_secs(2)).await;
            let (mut c, _) = Client::connect(&cfg.connect_opts(&id, false)).await?;
            let codes = c
                .subscribe(1, &[(filter, qos)], cfg.connect_timeout)
                .await?;
            c.disconnect(Duration::from_secs(2)).await;
            Ok::<Vec<u8>, anyhow::Error>(codes)
        });
    }
    while let Some(joined) = set.join_next().await {
        let codes = joined
            .map_err(|e| Failure::Setup(anyhow!("session task failed: {e}")))?
            .map_err(|e| Failure::Setup(e.context("persistent session set-up failed")))?;
        check_suback(filter, qos, &codes)?;
    }
    // Give the broker a moment to mark the sessions offline.
    sleep(Duration::from_millis(200)).await;

    let pubs = connect_publishers(&cfg, publishers).await?;
    let broker_rss_start = cli.broker_pid.and_then(rss_bytes);
    let ctl = Arc::new(Ctl::new(cli));
    let mut pub_tasks = JoinSet::new();
    for (i, client) in pubs.into_iter().enumerate() {
        let spec = PubSpec {
            topic: format!("bench/persist/{i}"),
            rate: None,
            phase: 0.0,
        };
        pub_tasks.spawn(publisher(client, i as u32, spec, cfg.clone(), ctl.clone()));
    }
    let (a, b) = measurement_window(cli, &ctl).await;
    let mut sent_by = vec![0u64; publishers];
    let (mut acked, mut unexpected_acks, mut unacked) = (0u64, 0u64, 0u64);
    while let Some(joined) = pub_tasks.join_next().await {
        match joined {
            Ok(r) => {
                if let Some(slot) = sent_by.get_mut(r.id as usize) {
                    *slot = r.sent;
                }
                acked += r.acked;
                unexpected_acks += r.unexpected_acks;
                unacked += r.unacked;
            }
            Err(e) => ctl.error(format!("publisher task failed: {e}")),
        }
    }
    let sent: u64 = sent_by.iter().sum();
    let broker_rss_queued = cli.broker_pid.and_then(rss_bytes);

    let mut drain = Json::Null;
    if drain_one {
        match drain_session(&cfg, &session_ids[0], &sent_by, secs(drain_timeout)).await {
            Ok(d) => drain = d,
            Err(e) => ctl.error(format!("drain of {}: {e:#}", session_ids[0])),
        }
    }
    // Remove every session so the broker does not keep their queues.
    let mut set = JoinSet::new();
    for id in session_ids {
        let cfg = cfg.clone();
        set.spawn(async move {
            if let Ok((c, _)) = Client::connect(&cfg.connect_opts(&id, true)).await {
                c.disconnect(Duration::from_secs(2)).await;
            }
        });
    }
    while set.join_next().await.is_some() {}

    let errors = ctl.errors();
    let mut report = Json::object()
        .with("scenario", cli.scenario.name())
        .with("label", cli.label.clone())
        .with("qos", qos)
        .with(
            "params",
            with_common(
                Json::object()
                    .with("sessions", sessions)
                    .with("publishers", publishers),
                cli,
            ),
        );
    window_json(&mut report, cli, qos, false, &a, &b);
    report.set("sent", sent);
    report.set("acked", acked);
    report.set("unacked", unacked);
    report.set("unexpected_acks", unexpected_acks);
    report.set("drain", drain);
    if let Some(pid) = cli.broker_pid {
        report.set(
            "broker_stats",
            Json::object()
                .with("pid", pid)
                .with("rss_bytes_start", broker_rss_start)
                .with("rss_bytes_queued", broker_rss_queued),
        );
    }
    let ok = errors.is_empty();
    report.set("errors", errors);
    report.set("ok", ok);
    Ok(report)
}

/// Reconnects one persistent session and counts what its queue delivers (acknowledging each),
/// until nothing arrives for a second or `limit` elapses.
async fn drain_session(
    cfg: &Arc<RunCfg>,
    id: &str,
    sent_by: &[u64],
    limit: Duration,
) -> anyhow::Result<Json> {
    let started = Instant::now();
    let (mut client, session_present) = Client::connect(&cfg.connect_opts(id, false)).await?;
    let mut tracker = SeqTracker::default();
    let mut foreign = 0u64;
    let mut acks = BytesMut::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_message = Instant::now();
    loop {
        while let Some((packet, used)) = codec::decode(&client.rbuf)? {
            match packet {
                Packet::Publish {
                    qos: q,
                    pkid,
                    payload,
                    ..
                } => {
                    match Stamp::read(payload) {
                        Some(s)
                            if s.run_tag == cfg.run_tag && tracker.record(s.publisher, s.seq) => {}
                        _ => foreign += 1,
                    }
                    match q {
                        1 => codec::encode_puback(&mut acks, pkid),
                        2 => codec::encode_pubrec(&mut acks, pkid),
                        _ => {}
                    }
                    last_message = Instant::now();
                }
                Packet::Pubrel(pkid) => codec::encode_pubcomp(&mut acks, pkid),
                Packet::Pingresp => {}
                other => bail!("unexpected {other:?} while draining"),
            }
            client.rbuf.advance(used);
        }
        if !acks.is_empty() {
            timeout_at(deadline, client.stream.send(&acks)).await??;
            acks.clear();
        }
        if last_message.elapsed() >= Duration::from_secs(1) {
            break;
        }
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_millis(200));
        if !anyhow::Context::context(client.read_within(wait).await, "draining")?
            && tokio::time::Instant::now() >= deadline
        {
            break;
        }
    }
    let drain_s = last_message.duration_since(started).as_secs_f64();
    client.disconnect(Duration::from_secs(1)).await;
    let (received, duplicated, out_of_order) = tracker.totals();
    let expected: Vec<(u32, u64)> = sent_by
        .iter()
        .enumerate()
        .map(|(p, &s)| (p as u32, s))
        .collect();
    eprintln!(
        "telemq-bench: drained {received} messages from {id} in {drain_s:.2} s (session present: {session_present})"
    );
    Ok(Json::object()
        .with("session_present", session_present)
        .with("received", received)
        .with("drain_s", drain_s)
        .with("received_per_s", rate(received, drain_s))
        .with("not_received", tracker.lost(&expected))
        .with("duplicated", duplicated)
        .with("out_of_order", out_of_order)
        .with("foreign", foreign))
}
