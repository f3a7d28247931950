//! The `telemq` command: runs the broker, prints its default configuration, manages a password
//! file (`passwd`) or the storage encryption key (`keygen`, `rekey`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use telemq::{Broker, Config};
use tracing_subscriber::EnvFilter;

// glibc's malloc is slow for the broker's pattern of allocating on the connection tasks and
// freeing on the storage thread (and vice versa); docs/performance.md has the measurements.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Set a user's password in a password file (created if missing), or delete the user. The
    /// password is prompted for on a terminal, or read as one line from standard input.
    Passwd {
        file: PathBuf,
        user: String,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
    },
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
        Some(Command::Passwd { file, user, delete }) => return passwd(file, user, *delete),
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
        serve_until_signalled(&broker).await?;
        tracing::info!("shutting down");
        broker.shutdown().await;
        Ok(())
    })
}

/// Runs until SIGINT or SIGTERM; SIGHUP reloads the password file, ACL and certificates.
async fn serve_until_signalled(broker: &Broker) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    loop {
        tokio::select! {
            result = tokio::signal::ctrl_c() => return result.context("cannot listen for SIGINT"),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the password file, ACL and certificates");
                // Failures are logged by the reload itself; the files in force stay.
                let _ = broker.reload().await;
            }
        }
    }
}

fn passwd(file: &std::path::Path, user: &str, delete: bool) -> anyhow::Result<()> {
    use telemq::auth::password::{write_file, PasswordFile};
    if user.is_empty() || user.contains(':') {
        anyhow::bail!("a username must be non-empty and must not contain ':'");
    }
    let mut passwords = if file.exists() {
        PasswordFile::load(file)?
    } else {
        PasswordFile::default()
    };
    if delete {
        if !passwords.remove(user) {
            anyhow::bail!("{user} is not in {}", file.display());
        }
    } else {
        let password = read_password(user)?;
        if password.is_empty() {
            anyhow::bail!("empty password refused");
        }
        passwords.set(user, password.as_bytes())?;
    }
    write_file(file, &passwords)?;
    Ok(())
}

/// Prompts twice with echo off on a terminal; otherwise reads the first line of stdin.
fn read_password(user: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let read_line = || -> anyhow::Result<String> {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    if !stdin.is_terminal() {
        return read_line();
    }
    let echo = |on: bool| {
        let _ = std::process::Command::new("stty")
            .arg(if on { "echo" } else { "-echo" })
            .stdin(std::process::Stdio::inherit())
            .status();
    };
    echo(false);
    let ask = |prompt: &str| -> anyhow::Result<String> {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
        let answer = read_line();
        eprintln!();
        answer
    };
    let first = ask(&format!("Password for {user}: "));
    let second = ask("Again: ");
    echo(true);
    let (first, second) = (first?, second?);
    if first != second {
        anyhow::bail!("the passwords differ");
    }
    Ok(first)
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
