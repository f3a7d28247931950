//! MQTT over WebSocket (MQTT 5.0 §6): the HTTP upgrade on the configured path with the `mqtt`
//! subprotocol, and an adapter that turns binary frames into the byte stream the connection
//! task reads. MQTT packets may span frames and a frame may hold several packets, so frames are
//! only a transport here; the connection's decoder finds the packet boundaries.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest frame written at once: the connection hands over its whole write buffer, and
/// tungstenite holds a frame that cannot be written yet in memory.
const WRITE_CHUNK: usize = 64 * 1024;

/// Upgrades an HTTP connection on `path` to a WebSocket speaking MQTT.
// The refusal type is tungstenite's, and refusals are rare.
#[allow(clippy::result_large_err)]
pub async fn accept<S>(
    stream: S,
    path: &str,
    max_packet_size: usize,
) -> Result<WsStream<S>, tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // A frame or message larger than the largest packet cannot be a packet (bar a few packets
    // sent together, which the floor leaves room for): refused before it is buffered.
    let max_message = max_packet_size.max(64 * 1024) + 16;
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * WRITE_CHUNK + 1024)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let path = path.to_owned();
    let callback = move |request: &Request, mut response: Response| {
        if request.uri().path() != path {
            let mut refusal = ErrorResponse::new(Some("no MQTT endpoint here".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        // [MQTT-6.0.0-3], [MQTT-6.0.0-4]: the subprotocol is "mqtt"; "mqttv3.1" is what
        // MQTT 3.1 era clients ask for.
        let offered = request
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .find(|protocol| matches!(*protocol, "mqtt" | "mqttv3.1"))
            .map(str::to_owned);
        if let Some(protocol) = offered {
            if let Ok(value) = HeaderValue::from_str(&protocol) {
                response
                    .headers_mut()
                    .insert("Sec-WebSocket-Protocol", value);
            }
        }
        Ok(response)
    };
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsStream::new(inner))
}

/// A WebSocket seen as a byte stream.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// What is left of the last binary frame.
    read: Bytes,
    closed: bool,
}

impl<S> WsStream<S> {
    /// Wraps an established WebSocket (either end: clients in tests use it too).
    pub fn new(inner: WebSocketStream<S>) -> Self {
        Self {
            inner,
            read: Bytes::new(),
            closed: false,
        }
    }
}

fn io_error(error: tokio_tungstenite::tungstenite::Error) -> io::Error {
    match error {
        tokio_tungstenite::tungstenite::Error::Io(error) => error,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.read.is_empty() {
                let take = this.read.len().min(buf.remaining());
                buf.put_slice(&this.read[..take]);
                this.read.advance(take);
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.read = data,
                // Pings are answered by tungstenite itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.closed = true,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "[MQTT-6.0.0-1] MQTT over WebSocket uses binary frames only",
                    )))
                }
                Some(Err(error)) => return Poll::Ready(Err(io_error(error))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(io_error)?;
        let take = buf.len().min(WRITE_CHUNK);
        Pin::new(&mut this.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..take])))
            .map_err(io_error)?;
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_close(cx)
            .map_err(io_error)
    }
}
