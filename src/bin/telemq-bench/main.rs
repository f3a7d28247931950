//! `telemq-bench`: a client-side MQTT 3.1.1 load generator.
//!
//! It speaks MQTT through its own small codec (`codec.rs`, independent of `telemq::protocol`) on
//! raw tokio TCP, or with `--tls` over TLS 1.3 (rustls, `ring`, no session resumption). Publishers encode many PUBLISH packets per write (QoS 1/2: at most `--window`
//! unacknowledged); subscribers read large buffers and acknowledge per read. Every payload
//! carries the publisher id, a run tag, a sequence number and the UNIX send time, so receivers
//! count lost, duplicated and out-of-order messages and the end-to-end latency.
//!
//! Output: one JSON object on stdout; progress on stderr. Exit status: 0 success, 1 errors
//! during the run (the JSON says which), 2 connection / set-up failure, 3 the broker refused a
//! subscription (e.g. shared subscriptions unsupported).

mod client;
mod codec;
mod json;
mod scenarios;
mod stats;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::json::Json;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "telemq-bench",
    about = "MQTT 3.1.1 load generator (fan-in, fan-out, pairs, shared, latency, connections, handshakes, persisted)"
)]
pub struct Cli {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1", global = true)]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883, global = true)]
    pub port: u16,
    /// Ports (on --host) the subscribers connect to, round-robin, instead of --port: with the
    /// nodes of a cluster, publishers on one node and subscribers on others.
    #[arg(long, value_delimiter = ',', global = true)]
    pub subscriber_ports: Vec<u16>,
    /// Measurement window in seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0, global = true)]
    pub duration: f64,
    /// Warm-up in seconds: traffic flows but is not counted in the rates.
    #[arg(long, default_value_t = 2.0, global = true)]
    pub warmup: f64,
    /// QoS of publishes and subscriptions (the persisted scenario always uses at least 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2), global = true)]
    pub qos: u8,
    /// Payload size in bytes (at least 24: publisher id, run tag, sequence, send time).
    #[arg(long, default_value_t = 64, global = true)]
    pub payload_size: usize,
    /// QoS 1/2: unacknowledged PUBLISH packets a publisher keeps in flight.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..), global = true)]
    pub window: u16,
    /// PUBLISH packets encoded into one write at most.
    #[arg(long, default_value_t = 64, global = true)]
    pub batch: usize,
    /// Seconds to wait after publishing stops for in-flight messages and acknowledgements.
    #[arg(long, default_value_t = 2.0, global = true)]
    pub drain: f64,
    /// Timeout in seconds for each TCP connect + CONNACK (and each SUBACK).
    #[arg(long, default_value_t = 10.0, global = true)]
    pub connect_timeout: f64,
    /// PID of the broker: its RSS and CPU time are reported (required for the RSS of
    /// `connections`).
    #[arg(long, global = true)]
    pub broker_pid: Option<u32>,
    /// Free-form label copied into the JSON (e.g. the broker's name).
    #[arg(long, global = true)]
    pub label: Option<String>,
    /// Every connection (publishers and subscribers alike) over TLS 1.3, with a full handshake
    /// each (no session resumption).
    #[arg(long, global = true)]
    pub tls: bool,
    /// With --tls: PEM file of the CA the broker's certificate must chain to.
    #[arg(long, default_value = "certs/ca.pem", global = true)]
    pub ca_file: std::path::PathBuf,
    /// With --tls: the name the broker's certificate must be valid for (SNI and verification).
    #[arg(long, default_value = "localhost", global = true)]
    pub tls_server_name: String,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// P publishers → 1 subscriber on bench/fanin/#, publishing as fast as they can.
    FanIn {
        #[arg(long, default_value_t = 8)]
        publishers: usize,
        /// Total publish rate in messages/s, shared evenly by the publishers, each sending one
        /// message per tick like a sensor (default: every publisher as fast as it can).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// 1 publisher → S subscribers on the same topic.
    FanOut {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Publish rate in messages/s (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// N publisher/subscriber pairs, each pair on its own topic.
    Pairs {
        #[arg(long, default_value_t = 8)]
        pairs: usize,
    },
    /// P publishers → k subscribers in one shared subscription $share/bench/bench/shared/#.
    Shared {
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        #[arg(long, default_value_t = 4)]
        subscribers: usize,
    },
    /// 1 publisher at a fixed rate (bursts every 1 ms) → 1 subscriber; latency percentiles.
    Latency {
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
    },
    /// C idle clients (keep alive 600), each subscribed to its own topic; broker RSS per
    /// connection (needs --broker-pid).
    Connections {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Connection attempts in flight at once while ramping up.
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
        /// Seconds to hold all connections before measuring RSS.
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
    },
    /// C workers each connecting, waiting for CONNACK, disconnecting and closing, again and
    /// again: connects/s of fresh connections (with --tls: full TLS 1.3 handshakes).
    Handshakes {
        /// Connections being set up at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// QoS 1 into S offline persistent sessions; PUBACKs/s is the throughput. Then one session
    /// reconnects and drains its queue.
    Persisted {
        #[arg(long, default_value_t = 10)]
        sessions: usize,
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Skip reconnecting one session to drain its queue.
        #[arg(long)]
        no_drain: bool,
        /// Upper bound in seconds on the queue drain.
        #[arg(long, default_value_t = 20.0)]
        drain_timeout: f64,
    },
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::FanIn { .. } => "fan-in",
            Scenario::FanOut { .. } => "fan-out",
            Scenario::Pairs { .. } => "pairs",
            Scenario::Shared { .. } => "shared",
            Scenario::Latency { .. } => "latency",
            Scenario::Connections { .. } => "connections",
            Scenario::Handshakes { .. } => "handshakes",
            Scenario::Persisted { .. } => "persisted",
        }
    }
}

/// How a run ended, for the exit status.
#[derive(Debug)]
pub enum Failure {
    /// Connecting or setting up failed (exit 2).
    Setup(anyhow::Error),
    /// The broker refused a subscription (exit 3).
    Refused(String),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Setup(e)
    }
}

fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host}:{port} does not resolve"))
}

fn validate(cli: &Cli) -> Result<(), String> {
    if cli.payload_size < codec::STAMP_LEN {
        return Err(format!(
            "--payload-size must be at least {}",
            codec::STAMP_LEN
        ));
    }
    for (name, v) in [
        ("--duration", cli.duration),
        ("--warmup", cli.warmup),
        ("--drain", cli.drain),
        ("--connect-timeout", cli.connect_timeout),
    ] {
        if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
            return Err(format!("{name} must be between 0 and 86400 seconds"));
        }
    }
    if cli.duration <= 0.0 {
        return Err("--duration must be positive".into());
    }
    if cli.connect_timeout <= 0.0 {
        return Err("--connect-timeout must be positive".into());
    }
    if cli.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let positive = |name: &str, n: usize| {
        if n == 0 {
            Err(format!("{name} must be at least 1"))
        } else {
            Ok(())
        }
    };
    let positive_rate = |rate: &Option<f64>| match rate {
        Some(r) if !r.is_finite() || *r <= 0.0 => Err("--rate must be positive".to_string()),
        _ => Ok(()),
    };
    if cli.tls && cli.tls_server_name.is_empty() {
        return Err("--tls-server-name must not be empty".into());
    }
    match &cli.scenario {
        Scenario::FanIn { publishers, rate } => {
            positive("--publishers", *publishers)?;
            positive_rate(rate)?;
        }
        Scenario::FanOut { subscribers, rate } => {
            positive("--subscribers", *subscribers)?;
            positive_rate(rate)?;
        }
        Scenario::Pairs { pairs } => positive("--pairs", *pairs)?,
        Scenario::Shared {
            publishers,
            subscribers,
        } => {
            positive("--publishers", *publishers)?;
            positive("--subscribers", *subscribers)?;
        }
        Scenario::Latency { rate } => {
            if !rate.is_finite() || *rate <= 0.0 {
                return Err("--rate must be positive".into());
            }
        }
        Scenario::Connections {
            connections,
            concurrency,
            hold,
        } => {
            positive("--connections", *connections)?;
            positive("--concurrency", *concurrency)?;
            if !hold.is_finite() || !(0.0..=3600.0).contains(hold) {
                return Err("--hold must be between 0 and 3600 seconds".into());
            }
        }
        Scenario::Handshakes { concurrency } => positive("--concurrency", *concurrency)?,
        Scenario::Persisted {
            sessions,
            publishers,
            drain_timeout,
            ..
        } => {
            positive("--sessions", *sessions)?;
            positive("--publishers", *publishers)?;
            if !drain_timeout.is_finite() || *drain_timeout <= 0.0 || *drain_timeout > 3600.0 {
                return Err("--drain-timeout must be between 0 and 3600 seconds".into());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(msg) = validate(&cli) {
        eprintln!("telemq-bench: {msg}");
        return ExitCode::from(2);
    }
    let base = Json::object()
        .with("scenario", cli.scenario.name())
        .with("label", cli.label.clone())
        .with("qos", cli.qos);
    let addr = match resolve(&cli.host, cli.port) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("telemq-bench: {e:#}");
            println!("{}", base.with("error", format!("{e:#}")).with("ok", false));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("telemq-bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let mut subscriber_addrs = Vec::new();
    for &port in &cli.subscriber_ports {
        match resolve(&cli.host, port) {
            Ok(a) => subscriber_addrs.push(a),
            Err(e) => {
                eprintln!("telemq-bench: {e:#}");
                println!("{}", base.with("error", format!("{e:#}")).with("ok", false));
                return ExitCode::from(2);
            }
        }
    }
    let outcome = runtime.block_on(scenarios::run(cli.clone(), addr, subscriber_addrs));
    // Connections still open in detached tasks must not delay the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(report) => {
            let failed = matches!(&report, Json::Object(fields)
                if fields.iter().any(|(k, v)| k == "ok" && *v == Json::Bool(false)));
            println!("{report}");
            if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(Failure::Setup(e)) => {
            eprintln!("telemq-bench: {e:#}");
            println!("{}", base.with("error", format!("{e:#}")).with("ok", false));
            ExitCode::from(2)
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("telemq-bench: {msg}");
            println!(
                "{}",
                base.with("error", msg)
                    .with("refused", true)
                    .with("ok", false)
            );
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_global_options_after_the_scenario() {
        let cli = Cli::try_parse_from([
            "telemq-bench",
            "--port",
            "18830",
            "fan-in",
            "--publishers",
            "3",
            "--qos",
            "1",
            "--duration",
            "5",
        ])
        .unwrap();
        assert_eq!(cli.port, 18830);
        assert_eq!(cli.qos, 1);
        assert_eq!(cli.duration, 5.0);
        assert!(matches!(
            cli.scenario,
            Scenario::FanIn {
                publishers: 3,
                rate: None
            }
        ));
        assert!(!cli.tls);
        assert!(validate(&cli).is_ok());
    }

    #[test]
    fn cli_rejects_bad_values() {
        assert!(Cli::try_parse_from(["telemq-bench", "--qos", "3", "pairs"]).is_err());
        let cli = Cli::try_parse_from(["telemq-bench", "--payload-size", "8", "pairs"]).unwrap();
        assert!(validate(&cli).is_err());
        let cli = Cli::try_parse_from(["telemq-bench", "latency", "--rate", "0"]).unwrap();
        assert!(validate(&cli).is_err());
    }

    #[test]
    fn cli_parses_tls_fan_in_at_a_fixed_rate() {
        let cli = Cli::try_parse_from([
            "telemq-bench",
            "fan-in",
            "--tls",
            "--publishers",
            "1000",
            "--rate",
            "20000",
            "--qos",
            "1",
            "--ca-file",
            "/tmp/ca.pem",
        ])
        .unwrap();
        assert!(cli.tls);
        assert_eq!(cli.ca_file, std::path::PathBuf::from("/tmp/ca.pem"));
        assert_eq!(cli.tls_server_name, "localhost");
        match cli.scenario {
            Scenario::FanIn { publishers, rate } => {
                assert_eq!(publishers, 1000);
                assert_eq!(rate, Some(20_000.0));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(validate(&cli).is_ok());
    }

    #[test]
    fn cli_rejects_bad_tls_and_rate_values() {
        for args in [
            &["telemq-bench", "fan-in", "--rate", "0"][..],
            &["telemq-bench", "fan-in", "--rate=-5"],
            &["telemq-bench", "fan-in", "--rate", "NaN"],
            &["telemq-bench", "fan-in", "--publishers", "0"],
            &["telemq-bench", "handshakes", "--concurrency", "0"],
            &[
                "telemq-bench",
                "--tls",
                "--tls-server-name",
                "",
                "handshakes",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(validate(&cli).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn cli_parses_handshakes() {
        let cli = Cli::try_parse_from(["telemq-bench", "handshakes", "--tls"]).unwrap();
        assert!(cli.tls);
        assert!(matches!(
            cli.scenario,
            Scenario::Handshakes { concurrency: 64 }
        ));
        assert_eq!(cli.scenario.name(), "handshakes");
        assert!(validate(&cli).is_ok());
    }
}
