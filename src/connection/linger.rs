//! Lingering close, as HTTP servers do it: a connection the broker closes is not dropped the
//! moment its last bytes (a v5 DISCONNECT saying why) are written.
//!
//! Dropping a socket that still has unread input, or that input arrives for afterwards, makes
//! the kernel answer with a reset, which discards whatever the broker sent that the client has
//! not read yet: the DISCONNECT of a client still publishing when it broke a limit (0x93, 0x95)
//! is lost, and a client library whose next write fails often never reads it anyway. So once the
//! write side is shut down, what the client still sends is read and discarded until it closes
//! too, falls quiet, or a time or byte bound runs out. Broker shutdown waits for no lingering.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest a closing connection lingers.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// A client silent this long has stopped sending: whatever it writes later comes long after the
/// DISCONNECT reached it.
const LINGER_QUIET: Duration = Duration::from_millis(500);
/// Most input read and discarded; a client still sending this much is not listening.
const LINGER_MAX_BYTES: usize = 1024 * 1024;
/// Size of each read; allocated only while lingering.
const LINGER_READ: usize = 8 * 1024;

/// Reads and discards the client's input until it closes its side, falls silent for
/// `LINGER_QUIET`, `LINGER_TIME` or `LINGER_MAX_BYTES` runs out or the broker shuts down, then
/// returns for the caller to drop the socket. Call it once the last bytes are flushed and the
/// write side is shut down.
pub(super) async fn linger_close<S: AsyncRead + Unpin>(
    stream: &mut S,
    shutdown: &CancellationToken,
) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut discard = vec![0; LINGER_READ];
    let mut discarded = 0;
    while discarded < LINGER_MAX_BYTES {
        let quiet_at = (Instant::now() + LINGER_QUIET).min(deadline);
        let read = tokio::select! {
            read = tokio::time::timeout_at(quiet_at, stream.read(&mut discard)) => read,
            () = shutdown.cancelled() => return,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(read)) => discarded += read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn returns_when_the_client_closes() {
        let (mut broker, mut client) = tokio::io::duplex(64);
        client.write_all(b"late input").await.unwrap();
        drop(client);
        let started = Instant::now();
        linger_close(&mut broker, &CancellationToken::new()).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn returns_once_the_client_falls_quiet() {
        let (mut broker, _client) = tokio::io::duplex(64);
        let started = Instant::now();
        linger_close(&mut broker, &CancellationToken::new()).await;
        assert_eq!(started.elapsed(), LINGER_QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_sending_is_given_up_on_after_linger_time() {
        let (mut broker, mut client) = tokio::io::duplex(LINGER_READ);
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(LINGER_QUIET / 2);
            loop {
                tick.tick().await;
                if client.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        linger_close(&mut broker, &CancellationToken::new()).await;
        drop(broker);
        let lingered = started.elapsed();
        assert!(
            lingered >= LINGER_TIME && lingered < LINGER_TIME + LINGER_QUIET,
            "lingered {lingered:?}"
        );
        sender.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn broker_shutdown_ends_it_at_once() {
        let (mut broker, _client) = tokio::io::duplex(64);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let started = Instant::now();
        linger_close(&mut broker, &shutdown).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_too_much_is_given_up_on_at_once() {
        let (mut broker, mut client) = tokio::io::duplex(LINGER_READ);
        let sender = tokio::spawn(async move {
            let chunk = vec![0; LINGER_READ];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let started = Instant::now();
        linger_close(&mut broker, &CancellationToken::new()).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(broker);
        sender.await.unwrap();
    }
}
