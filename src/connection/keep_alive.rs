//! The keep alive a connection is held to: the client's own, the broker's Server Keep Alive
//! (`mqtt.server_keep_alive`) or the broker's cap (`mqtt.max_keep_alive`).
//!
//! How the two settings combine: `server_keep_alive` is imposed on every MQTT 5 client whatever
//! it asked for (validation keeps it within `max_keep_alive`). Without it, a client asking for
//! more than `max_keep_alive`, or for none at all (0, which is more than any cap), gets the cap:
//! an MQTT 5 client is told so in CONNACK's Server Keep Alive [MQTT-3.2.2-21], while an MQTT 3.1
//! or 3.1.1 client, which cannot be told, is refused with return code 2 (identifier rejected),
//! as Mosquitto's `max_keepalive` does. A client asking for no more than the cap keeps its own
//! value [MQTT-3.2.2-22].

use crate::config::MqttConfig;
use crate::protocol::{ProtocolVersion, ReasonCode};

/// The keep alive in seconds (0: none) for a client that asked for `requested`, or why its
/// CONNECT is refused. CONNACK carries Server Keep Alive when the result differs from
/// `requested`.
pub(super) fn negotiate(
    version: ProtocolVersion,
    requested: u16,
    config: &MqttConfig,
) -> Result<u16, (ReasonCode, &'static str)> {
    if let (true, Some(server)) = (version.is_v5(), config.server_keep_alive) {
        return Ok(server);
    }
    match config.max_keep_alive {
        Some(max) if requested == 0 || requested > max => {
            if version.is_v5() {
                Ok(max)
            } else {
                Err((
                    ReasonCode::ClientIdentifierNotValid,
                    "keep alive above mqtt.max_keep_alive, which 3.1.1 cannot lower",
                ))
            }
        }
        _ => Ok(requested),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(server: Option<u16>, max: Option<u16>) -> MqttConfig {
        MqttConfig {
            server_keep_alive: server,
            max_keep_alive: max,
            ..MqttConfig::default()
        }
    }

    const V5: ProtocolVersion = ProtocolVersion::V5;
    const V4: ProtocolVersion = ProtocolVersion::V3_1_1;
    const V3: ProtocolVersion = ProtocolVersion::V3_1;

    #[test]
    fn without_settings_the_client_keeps_its_own_value() {
        for version in [V3, V4, V5] {
            for requested in [0, 1, 60, u16::MAX] {
                assert_eq!(
                    negotiate(version, requested, &config(None, None)),
                    Ok(requested)
                );
            }
        }
    }

    #[test]
    fn a_v5_client_asking_for_more_than_the_cap_or_none_gets_the_cap() {
        let capped = config(None, Some(10));
        assert_eq!(negotiate(V5, 100, &capped), Ok(10));
        assert_eq!(negotiate(V5, 0, &capped), Ok(10));
        assert_eq!(negotiate(V5, 10, &capped), Ok(10));
        assert_eq!(negotiate(V5, 1, &capped), Ok(1));
    }

    #[test]
    fn a_3_x_client_asking_for_more_than_the_cap_or_none_is_refused_as_identifier_rejected() {
        let capped = config(None, Some(10));
        for version in [V3, V4] {
            for requested in [0, 11, u16::MAX] {
                let (reason, _) = negotiate(version, requested, &capped).unwrap_err();
                assert_eq!(reason.v3_connack_code(), 2);
            }
            assert_eq!(negotiate(version, 10, &capped), Ok(10));
            assert_eq!(negotiate(version, 1, &capped), Ok(1));
        }
    }

    #[test]
    fn server_keep_alive_is_imposed_on_v5_clients_only() {
        let both = config(Some(5), Some(10));
        for requested in [0, 1, 5, 100] {
            assert_eq!(negotiate(V5, requested, &both), Ok(5));
        }
        assert_eq!(negotiate(V4, 1, &both), Ok(1));
        assert!(negotiate(V4, 100, &both).is_err());
        assert_eq!(negotiate(V4, 100, &config(Some(5), None)), Ok(100));
    }
}
