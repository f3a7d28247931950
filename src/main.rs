//! The `telemq` command: runs the broker, prints its default configuration, or manages the
//! storage encryption key (`keygen`, `rekey`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use telemq::{Broker, Config};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "telemq",
    version,
    about = "MQTT 3.1.1 / 5.0 broker for IoT telemetry"
)]
struct Cli {
    /// Configuration file (TOML). Without one, the documented defaults apply.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Address of the MQTT listener, overriding `listener.bind`.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Log filter (tracing env-filter syntax), overriding RUST_LOG.
    #[arg(long)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the documented default configuration file.
    PrintDefaultConfig,
    /// Write a new random storage encryption key to FILE (mode 0600; never overwrites).
    Keygen { file: PathBuf },
    /// Re-seal every stored record with storage.encryption_key_file (plain without one), reading
    /// with it and storage.old_encryption_key_file. Run with the broker stopped.
    Rekey,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::PrintDefaultConfig) => {
            print!("{}", telemq::config::DEFAULT_CONFIG);
            return Ok(());
        }
        Some(Command::Keygen { file }) => return keygen(file),
        Some(Command::Rekey) | None => {}
    }
    let filter = match &cli.log {
        Some(directives) => EnvFilter::try_new(directives).context("invalid --log filter")?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(bind) = cli.bind {
        config.listener.bind = bind;
    }
    config.validate()?;
    if let Some(Command::Rekey) = cli.command {
        return rekey(&config);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let broker = Broker::start(config).await?;
        wait_for_signal().await?;
        tracing::info!("shutting down");
        broker.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn keygen(file: &std::path::Path) -> anyhow::Result<()> {
    let fingerprint = telemq::storage::cipher::write_new_key_file(file)?;
    println!(
        "wrote a new storage key to {} (fingerprint {fingerprint}); set storage.encryption_key_file to it",
        file.display()
    );
    Ok(())
}

fn rekey(config: &Config) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    use telemq::config::StorageEngine;
    use telemq::storage::cipher::KeyRing;

    let storage = &config.storage;
    anyhow::ensure!(
        storage.engine == StorageEngine::RocksDb,
        "storage.engine is \"memory\": nothing is stored, nothing to rekey"
    );
    let keys = KeyRing::load(
        storage.encryption_key_file.as_deref(),
        storage.old_encryption_key_file.as_deref(),
    )?;
    let target = keys.sealing();
    let mut last: Option<(Instant, u64)> = None;
    let report = telemq::storage::rekey(&storage.data_dir, keys, |done, total| {
        // At most one line a second, and always the last.
        let due = match last {
            None => true,
            Some((at, printed)) => {
                printed != done && (done == total || at.elapsed() >= Duration::from_secs(1))
            }
        };
        if due {
            println!("rekeyed {done}/{total} records");
            last = Some((Instant::now(), done));
        }
    })
    .with_context(|| format!("rekey of {} failed", storage.data_dir.display()))?;
    println!(
        "done: {} of {} records now under {target}",
        report.rekeyed, report.total
    );
    if report.unreadable > 0 {
        anyhow::bail!(
            "{} records failed authentication (altered or moved) and were left as they were; \
             see the log above",
            report.unreadable
        );
    }
    if storage.old_encryption_key_file.is_some() {
        println!(
            "storage.old_encryption_key_file is no longer needed; remove it from the configuration"
        );
    }
    Ok(())
}
