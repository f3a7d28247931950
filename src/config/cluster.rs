//! The `[cluster]` section: how a node finds NATS and names itself (see `docs/cluster.md`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub enabled: bool,
    /// Empty: the host name (see [`ClusterConfig::node_name`]).
    pub node_id: String,
    pub nats_urls: Vec<String>,
    pub prefix: String,
    /// 0: as many as the NATS cluster has servers, at most 3.
    pub replicas: usize,
    /// How long the replication log keeps a message.
    #[serde(with = "humantime_serde")]
    pub log_max_age: Duration,
    /// How many bytes the replication log keeps; the oldest go first.
    pub log_max_bytes: u64,
    pub forward_queue: usize,
    pub subscription_buffer: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub nkey_seed_file: Option<PathBuf>,
    pub credentials_file: Option<PathBuf>,
    pub tls_required: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_id: String::new(),
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            prefix: "telemq".into(),
            replicas: 0,
            log_max_age: Duration::from_secs(24 * 3600),
            log_max_bytes: 1 << 30,
            forward_queue: 8192,
            subscription_buffer: 65536,
            request_timeout: Duration::from_secs(5),
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            credentials_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl ClusterConfig {
    /// Checks what serde cannot; nothing when the cluster is off.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let name_rule = "may only hold letters, digits, '-' and '_'";
        let broken = [
            (
                !self.node_id.is_empty() && !is_valid_name(&self.node_id),
                format!("cluster.node_id {name_rule}"),
            ),
            (
                !is_valid_name(&self.prefix),
                format!("cluster.prefix {name_rule}"),
            ),
            (
                self.nats_urls.is_empty(),
                "cluster.nats_urls needs at least one server".into(),
            ),
            (
                self.replicas > 5,
                "cluster.replicas must be between 0 (automatic) and 5".into(),
            ),
            (
                self.log_max_age.is_zero() || self.log_max_bytes == 0,
                "cluster.log_max_age and cluster.log_max_bytes must be more than 0".into(),
            ),
            (
                self.subscription_buffer == 0,
                "cluster.subscription_buffer must be at least 1".into(),
            ),
            (
                self.forward_queue == 0,
                "cluster.forward_queue must be at least 1".into(),
            ),
            (
                self.tls_cert_file.is_some() != self.tls_key_file.is_some(),
                "cluster.tls_cert_file and cluster.tls_key_file go together".into(),
            ),
        ];
        match broken.into_iter().find(|(is_broken, _)| *is_broken) {
            Some((_, why)) => Err(ConfigError::Invalid(why)),
            None => Ok(()),
        }
    }

    /// The configured node id, or the host name when none is set.
    pub fn node_name(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_string())
            .filter(|name| is_valid_name(name))
            .unwrap_or_else(|| "telemq".into())
    }
}

/// A byte that NATS subject tokens, key-value keys and bucket names all take as it is.
pub fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// A NATS subject token or bucket name part that needs no encoding.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(is_name_byte)
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn cluster_settings_are_checked_only_when_the_cluster_is_on() {
        let cluster_config: Config =
            toml::from_str(include_str!("../../grafana/cluster/telemq.toml")).unwrap();
        cluster_config.validate().unwrap();
        assert!(cluster_config.cluster.enabled && cluster_config.cluster.replicas == 3);

        let mut config = Config::default();
        config.cluster.node_id = "not a token".into();
        config.validate().unwrap();
        config.cluster.enabled = true;
        let refused = |adjust: fn(&mut ClusterConfig)| {
            let mut config = Config::default();
            config.cluster.enabled = true;
            adjust(&mut config.cluster);
            config.validate().is_err()
        };
        assert!(refused(|c| c.node_id = "a.b".into()));
        assert!(refused(|c| c.prefix = "t>".into()));
        assert!(refused(|c| c.nats_urls.clear()));
        assert!(!refused(|c| c.replicas = 0));
        assert!(refused(|c| c.replicas = 7));
        assert!(refused(|c| c.log_max_bytes = 0));
        assert!(refused(|c| c.forward_queue = 0));
        assert!(refused(|c| c.tls_cert_file = Some("client.pem".into())));
        assert!(!refused(|c| c.node_id = "node-1_a".into()));
    }

    #[test]
    fn an_empty_node_id_falls_back_to_a_valid_name() {
        let name = ClusterConfig::default().node_name();
        assert!(is_valid_name(&name), "{name}");
        let named = ClusterConfig {
            node_id: "n7".into(),
            ..ClusterConfig::default()
        };
        assert_eq!(named.node_name(), "n7");
    }
}
