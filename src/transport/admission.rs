//! Connection limits checked the moment a connection is accepted, before any handshake: the
//! total, per source address, and the rate of new connections. A refused connection is closed
//! at once, counted, and logged (at most once a second per reason, so a flood cannot flood the
//! log as well).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::config::ListenerConfig;
use crate::metrics;

pub const MAX_CONNECTIONS: &str = "max_connections";
pub const MAX_CONNECTIONS_PER_IP: &str = "max_connections_per_ip";
pub const CONNECT_RATE: &str = "connect_rate";

/// Connections open per source address.
type PerIpCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max_per_ip: usize,
    per_ip: PerIpCounts,
    rate: Option<Mutex<TokenBucket>>,
    started: Instant,
    last_logged_ms: AtomicU64,
    suppressed: AtomicU64,
}

#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Held for the life of an admitted connection; dropping it gives the slots back.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    per_ip: Option<(IpAddr, PerIpCounts)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((ip, counts)) = self.per_ip.take() {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = counts.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

impl Admission {
    pub fn new(config: &ListenerConfig) -> Self {
        let now = Instant::now();
        Self {
            permits: Arc::new(Semaphore::new(config.max_connections)),
            max_per_ip: config.max_connections_per_ip,
            per_ip: Arc::default(),
            rate: (config.connect_rate > 0).then(|| {
                Mutex::new(TokenBucket {
                    per_second: f64::from(config.connect_rate),
                    burst: f64::from(config.connect_burst),
                    tokens: f64::from(config.connect_burst),
                    at: now,
                })
            }),
            started: now,
            last_logged_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Admits a connection from `ip`, or says which limit refuses it (counted and logged).
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, &'static str> {
        let result = self.check(ip);
        if let Err(reason) = result {
            metrics::connection_refused(reason);
            self.log_refusal(ip, reason);
        }
        result
    }

    fn check(&self, ip: IpAddr) -> Result<Admitted, &'static str> {
        if let Some(bucket) = &self.rate {
            let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
            if !bucket.take(Instant::now()) {
                return Err(CONNECT_RATE);
            }
        }
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| MAX_CONNECTIONS)?;
        let per_ip = if self.max_per_ip > 0 {
            let mut counts = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                return Err(MAX_CONNECTIONS_PER_IP);
            }
            *count += 1;
            Some((ip, self.per_ip.clone()))
        } else {
            None
        };
        Ok(Admitted {
            _permit: permit,
            per_ip,
        })
    }

    fn log_refusal(&self, ip: IpAddr, reason: &'static str) {
        let now_ms = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < 1000
            || self
                .last_logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        warn!(%ip, reason, suppressed, "connection refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize, per_ip: usize, rate: u32, burst: u32) -> ListenerConfig {
        ListenerConfig {
            max_connections: max,
            max_connections_per_ip: per_ip,
            connect_rate: rate,
            connect_burst: burst,
            ..ListenerConfig::default()
        }
    }

    #[test]
    fn limits_refuse_and_slots_come_back() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let admission = Admission::new(&config(3, 2, 0, 1));
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), MAX_CONNECTIONS_PER_IP);
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), MAX_CONNECTIONS);
        drop(first);
        assert!(admission.admit(a).is_ok());
    }

    #[test]
    fn the_token_bucket_allows_bursts_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket {
            per_second: 10.0,
            burst: 3.0,
            tokens: 3.0,
            at: start,
        };
        assert!((0..3).all(|_| bucket.take(start)));
        assert!(!bucket.take(start));
        let later = start + std::time::Duration::from_millis(100);
        assert!(bucket.take(later));
        assert!(!bucket.take(later));
    }
}
