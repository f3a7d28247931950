//! The CONNECT exchange: reading CONNECT under a deadline, choosing the client identifier and the
//! session, and answering with CONNACK.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::Close;
use crate::metrics;
use crate::protocol::encode::{self, ConnAck};
use crate::protocol::{self, Connect, Packet, ProtocolError, ProtocolVersion, ReasonCode};
use crate::state::BrokerState;

/// Reads the first packet, which must be a CONNECT [MQTT-3.1.0-1], within the connect timeout.
pub(super) async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    read_buf: &mut BytesMut,
    state: &BrokerState,
    shutdown: &CancellationToken,
) -> Result<Connect, Close> {
    let deadline = tokio::time::Instant::now() + state.config.mqtt.connect_timeout;
    let max_packet_size = state.config.mqtt.max_packet_size as usize;
    loop {
        let level = protocol::connect_protocol_level(read_buf);
        match protocol::decode(read_buf, None, max_packet_size) {
            Ok(Some(Packet::Connect(connect))) => return Ok(*connect),
            Ok(Some(_)) => {
                return Err(Close::Protocol(ProtocolError::violation(
                    "[MQTT-3.1.0-1] the first packet from a client must be CONNECT",
                )))
            }
            Ok(None) => {}
            Err(error) => {
                metrics::protocol_error(error.reason.label());
                // Answer where the client can read the answer [MQTT-4.13.1-1]. A protocol level
                // the broker does not speak gets 3.1.1's return code 1 if it is a 3.x level, and
                // otherwise v5's reason 0x84, the answer a newer client looks for [MQTT-3.1.2-2].
                // No answer without a level: the peer did not name MQTT [MQTT-3.1.2-1].
                let answer_version = match (error.reason, level) {
                    (ReasonCode::UnsupportedProtocolVersion, Some(3 | 4)) => {
                        Some(ProtocolVersion::V3_1_1)
                    }
                    (ReasonCode::UnsupportedProtocolVersion, Some(_)) | (_, Some(5)) => {
                        Some(ProtocolVersion::V5)
                    }
                    _ => None,
                };
                if let Some(version) = answer_version {
                    refuse(stream, version, error.reason).await;
                }
                return Err(Close::Protocol(error));
            }
        }
        let read = tokio::select! {
            read = stream.read_buf(read_buf) => read,
            _ = tokio::time::sleep_until(deadline) => return Err(Close::ConnectTimeout),
            _ = shutdown.cancelled() => return Err(Close::ServerShuttingDown),
        };
        match read {
            Ok(0) => return Err(Close::PeerClosed),
            Ok(_) => {}
            Err(_) => return Err(Close::Io),
        }
    }
}

/// Sends a refusing CONNACK and flushes it; the caller closes the connection [MQTT-3.2.2-5].
pub(super) async fn refuse<S: AsyncWrite + Unpin>(
    writer: &mut S,
    version: ProtocolVersion,
    reason: ReasonCode,
) {
    metrics::connection_refused(reason.label());
    let mut out = BytesMut::new();
    encode::connack(
        version,
        &ConnAck {
            reason: Some(reason),
            ..ConnAck::default()
        },
        &mut out,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        writer.write_all(&out).await?;
        writer.flush().await
    })
    .await;
}

/// The client identifier the session is keyed by, or the reason to refuse the CONNECT.
pub(super) fn choose_client_id(
    connect: &Connect,
) -> Result<(Arc<str>, bool), (ReasonCode, &'static str)> {
    if !connect.client_id.is_empty() {
        return Ok((connect.client_id.as_str().into(), false));
    }
    match connect.version {
        // [MQTT-3.1.3-8] a zero-byte ClientId needs CleanSession=1 in 3.1.1; 3.1 requires 1–23 chars.
        ProtocolVersion::V3_1 => Err((
            ReasonCode::ClientIdentifierNotValid,
            "[MQTT-3.1.3-?] MQTT 3.1 requires a client identifier",
        )),
        ProtocolVersion::V3_1_1 if !connect.clean_start => Err((
            ReasonCode::ClientIdentifierNotValid,
            "[MQTT-3.1.3-8] empty client identifier with clean session 0",
        )),
        // [MQTT-3.1.3-6] the server assigns a unique identifier; v5 clients learn it from
        // CONNACK's Assigned Client Identifier [MQTT-3.2.2-16].
        _ => Ok((
            format!("telemq-{:016x}", rand::random::<u64>()).into(),
            true,
        )),
    }
}
