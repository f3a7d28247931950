//! The real `telemq` binary as a child process, for tests of what only a process has: signals,
//! SIGKILL, the command line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The broker as a child process.
pub struct BrokerProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl BrokerProcess {
    pub fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_telemq"))
            .arg("--config")
            .arg(config)
            .arg("--log")
            .arg(std::env::var("TELEMQ_TEST_BROKER_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start telemq");
        let stdout = child.stdout.take().expect("stdout");
        let config_name = config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (found, addr) = mpsc::channel();
        // Keep draining the log so the broker never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut found = Some(found);
            let echo = std::env::var_os("TELEMQ_TEST_BROKER_LOG").is_some();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[{config_name}] {line}");
                }
                if let Some(rest) = line.split("mqtt_addr=").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    if let Some(found) = found.take() {
                        let _ = found.send(addr);
                    }
                }
            }
        });
        let addr = addr
            .recv_timeout(Duration::from_secs(30))
            .expect("broker announced its address")
            .parse()
            .expect("address parses");
        Self { child, addr }
    }

    /// Sends a signal (`libc::SIGHUP`, `libc::SIGTERM`) with kill(2), from this process: a
    /// minimal Debian has no kill(1) (package procps).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) takes two integers and touches no memory of ours. The child is reaped
        // only in drop, so its pid cannot have been reused by another process.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            sent,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for BrokerProcess {
    // Also on a failing assertion: an orphaned broker would outlive the test and hold its
    // output pipe open.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
