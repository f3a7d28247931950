//! The monitoring files against a real Prometheus: `promtool` accepts the rules and config in
//! `grafana/prometheus/`, and after Prometheus has scraped a running broker, every PromQL
//! expression of the Grafana dashboard returns data and every metric the alert rules use
//! exists. So the dashboard cannot reference a metric the broker does not export.
//!
//! Needs Debian's `prometheus` package (`scripts/test` installs it when missing).

mod common;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::rumqtt::v5::{QoS, V5Client};
use common::TestBroker;
use telemq::config::OverflowPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// Whether an instant query returned any series; panics when Prometheus reports an error.
/// (Prometheus answers compactly: `{"status":"success","data":{"resultType":..,"result":[..]}}`.)
async fn has_data(prometheus: &Prometheus, expr: &str) -> bool {
    let body = http_get(
        prometheus.addr,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    )
    .await
    .expect("query answered");
    assert!(body.contains(r#""status":"success""#), "{expr}: {body}");
    assert!(body.contains(r#""result":["#), "{expr}: {body}");
    !body.contains(r#""result":[]"#)
}

fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus) is installed");
    assert!(
        output.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn start_prometheus(dir: &Path, target: SocketAddr, rules: &str) -> Prometheus {
    let rules = Path::new(ROOT).join("grafana/prometheus").join(rules);
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: telemq\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus) is installed");
    Prometheus { child, addr }
}

#[tokio::test]
async fn every_dashboard_query_and_alert_metric_has_data_in_a_real_prometheus() {
    promtool(&[
        "check",
        "rules",
        &format!("{ROOT}/grafana/prometheus/alerts.yml"),
    ]);
    promtool(&[
        "check",
        "config",
        &format!("{ROOT}/grafana/prometheus/prometheus.yml"),
    ]);

    let broker = TestBroker::start_with(|config| {
        config.queue.max_messages = 1;
        config.queue.policy = OverflowPolicy::DropNewest;
        config.dead_letter.enabled = true;
    })
    .await;
    // Every series of the dashboard exists after this: the queue (1 message) overflows too.
    let _clients = common::traffic::mixed(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let prometheus = start_prometheus(
        dir.path(),
        broker.broker().metrics_addr().unwrap(),
        "alerts.yml",
    );

    check_monitoring_files(&prometheus, "telemq.json", "alerts.yml", 20, 8).await;
    broker.shutdown().await;
}

/// Waits until Prometheus has scraped twice, then checks that every query of the dashboard
/// returns data and every metric the alert rules read exists.
async fn check_monitoring_files(
    prometheus: &Prometheus,
    dashboard: &str,
    rules: &str,
    min_queries: usize,
    min_rules: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until its storage is up, Prometheus answers 503 "Service Unavailable" here.
    while !http_get(prometheus.addr, "/-/ready")
        .await
        .is_some_and(|body| body.contains("Ready"))
    {
        assert!(Instant::now() < deadline, "Prometheus did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // rate() needs two scrapes of a series; wait until it has them.
    while !has_data(prometheus, "rate(telemq_connections_total[1m])").await {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped telemq twice"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let dashboard =
        std::fs::read_to_string(format!("{ROOT}/grafana/dashboards/{dashboard}")).unwrap();
    let expressions = dashboard_exprs(&dashboard);
    assert!(
        expressions.len() >= min_queries,
        "only {} queries found",
        expressions.len()
    );
    let mut empty = Vec::new();
    for expr in &expressions {
        if !has_data(prometheus, expr).await {
            empty.push(expr.clone());
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );

    let rules = std::fs::read_to_string(format!("{ROOT}/grafana/prometheus/{rules}")).unwrap();
    let mut rule_count = 0;
    for expr in rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")) {
        rule_count += 1;
        // The expression itself must be valid (it is usually empty while nothing fires)...
        has_data(prometheus, expr.trim()).await;
        // ...and every metric it reads must exist.
        for metric in metric_names(expr) {
            assert!(
                has_data(prometheus, &format!("count({metric})")).await,
                "alert rule `{}` reads {metric}, which has no data",
                expr.trim()
            );
        }
    }
    assert!(
        rule_count >= min_rules,
        "only {rule_count} alert rules found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_dashboard_query_and_alert_metric_has_data() {
    promtool(&[
        "check",
        "config",
        &format!("{ROOT}/grafana/prometheus/prometheus-cluster.yml"),
    ]);
    let nats = common::nats::NatsServer::start();
    let node = |name: &'static str| {
        let url = nats.url();
        TestBroker::start_with(move |config| {
            config.cluster.enabled = true;
            config.cluster.node_id = name.into();
            config.cluster.nats_urls = vec![url];
            config.cluster.log_max_bytes = 64 << 20;
        })
    };
    let (first, second) = (node("m-0").await, node("m-1").await);
    // Traffic between the nodes, through overlapping filters: every forwarding series exists.
    let (mut subscriber, _) = V5Client::connect(second.addr, "cross-sub").await;
    subscriber.subscribe("m/+", QoS::AtLeastOnce).await;
    subscriber.subscribe("m/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(first.addr, "cross-pub").await;
    publisher
        .publish("m/1", QoS::AtLeastOnce, false, b"x".to_vec())
        .await;
    subscriber.next_publish().await;

    let dir = tempfile::tempdir().unwrap();
    let prometheus = start_prometheus(
        dir.path(),
        first.broker().metrics_addr().unwrap(),
        "cluster-alerts.yml",
    );
    check_monitoring_files(
        &prometheus,
        "telemq-cluster.json",
        "cluster-alerts.yml",
        13,
        4,
    )
    .await;
    first.shutdown().await;
    second.shutdown().await;
}

/// The values of every `"expr"` key in the dashboard JSON (JSON string escapes decoded).
fn dashboard_exprs(json: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut rest = json;
    while let Some(start) = rest.find(r#""expr""#) {
        rest = rest[start + 6..].trim_start();
        let Some(after_colon) = rest.strip_prefix(':') else {
            continue;
        };
        let Some(string) = after_colon.trim_start().strip_prefix('"') else {
            continue;
        };
        let mut expr = String::new();
        let mut chars = string.char_indices();
        let mut end = string.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = i + 1;
                    break;
                }
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('n') => expr.push('\n'),
                    Some('t') => expr.push('\t'),
                    Some('u') => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next().map(|(_, h)| h))
                            .collect();
                        expr.extend(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32));
                    }
                    Some(other) => expr.push(other),
                    None => {}
                },
                c => expr.push(c),
            }
        }
        exprs.push(expr);
        rest = &string[end..];
    }
    exprs
}

/// Metric names in a PromQL expression: `up` and every `telemq_...` identifier.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("telemq_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        names.push(name);
    }
    if expr.contains("up{") {
        names.push("up".into());
    }
    names
}
