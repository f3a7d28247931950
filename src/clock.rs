//! The broker's clocks. Both follow tokio's clock, so a test that pauses tokio time moves the
//! broker's keep-alive and expiry bookkeeping with it instead of sleeping.
//!
//! Wall-clock time (message and session expiry, which must survive a restart) is the system
//! time read once at start plus tokio's monotonic time since: a clock step after start-up
//! is not seen until the next restart, which also keeps an expiry interval from jumping.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The system time and tokio instant of the first reading.
static START: LazyLock<(SystemTime, Instant)> =
    LazyLock::new(|| (SystemTime::now(), Instant::now()));

/// Wall-clock time now.
pub fn now() -> SystemTime {
    let (system, instant) = *START;
    system + instant.elapsed()
}

/// Milliseconds since the first reading: monotonic, and small enough to share a word with a
/// Keep Alive (see `session::SessionHandle`).
pub fn monotonic_ms() -> u64 {
    START.1.elapsed().as_millis() as u64
}

/// Milliseconds since the Unix epoch, as stored.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn both_clocks_follow_paused_tokio_time() {
        let (wall, ms) = (now(), monotonic_ms());
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(now().duration_since(wall).unwrap(), Duration::from_secs(90));
        assert_eq!(monotonic_ms() - ms, 90_000);
    }

    #[test]
    fn unix_milliseconds_round_trip() {
        let time = from_unix_ms(1_700_000_000_123);
        assert_eq!(unix_ms(time), 1_700_000_000_123);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
