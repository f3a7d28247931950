//! The Prometheus endpoint: a small HTTP listener (default `0.0.0.0:9464`) answering
//! `GET /metrics` with the text exposition format and `GET /health` with `OK`.
//!
//! Counters and histograms are recorded where things happen (see [`crate::metrics`]); gauges
//! that describe broker state (sessions, queues, retained messages, memory) are read from the
//! state when a scrape arrives, so nothing walks the sessions between scrapes.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::metrics;
use crate::state::BrokerState;

/// Scrapes served at once; more wait for a permit (Prometheus scrapes one at a time).
const CONCURRENT_SCRAPES: usize = 8;
/// Longest request head read; anything longer is not a scrape.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves scrapes until shutdown.
pub async fn serve(
    listener: TcpListener,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_SCRAPES));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            // Out of file descriptors or similar: the next accept may work.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        tracker.spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &state))
                .await
                .is_err()
            {
                debug!("metrics request timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, state: &BrokerState) {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&chunk[..read]),
        }
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
    }
    let request_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != b"GET" {
        return respond(&mut stream, "405 Method Not Allowed", "").await;
    }
    match path {
        b"/metrics" => {
            let body = render(state);
            respond(&mut stream, "200 OK", &body).await
        }
        b"/health" => respond(&mut stream, "200 OK", "OK\n").await,
        _ => respond(&mut stream, "404 Not Found", "try /metrics\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Sets the state gauges and renders every metric.
pub fn render(state: &BrokerState) -> String {
    let queues = state.sessions.queue_stats();
    metrics::set_state_gauges(&metrics::StateGauges {
        sessions_online: queues.online,
        sessions_offline: queues.offline,
        subscriptions: state.router.subscription_count(),
        shared_groups: state.router.shared_group_count(),
        retained_messages: state.router.retained_count(),
        retained_bytes: state.router.retained_bytes(),
        queued_messages: queues.queued_messages,
        queued_bytes: state.memory.queued_bytes(),
        deepest_queue: queues.deepest,
        delayed_messages: state.delayed.len(),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
    });
    metrics::render()
}
