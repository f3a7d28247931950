//! Who may connect (password file, client certificates, anonymous access) and what they may do
//! (the ACL). Both files are reloaded on SIGHUP; a file that fails to load leaves the old one in
//! force.

pub mod acl;
pub mod password;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::AuthConfig;
use crate::metrics;
use crate::protocol::ReasonCode;
use acl::{Acl, ClientAcl};
use password::{PasswordFile, PasswordFileError};

/// A line-oriented file (password file, ACL) that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Invalid {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Reads `path` and parses it with `parse`, which names the 1-based line of an error.
fn load_file<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> Result<T, (usize, String)>,
) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|(line, reason)| FileError::Invalid {
        path: path.display().to_string(),
        line,
        reason,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Passwords(#[from] PasswordFileError),
    #[error(transparent)]
    Acl(#[from] FileError),
}

/// Who the client turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `None` for anonymous clients.
    pub username: Option<Arc<str>>,
}

/// The loaded password file and ACL, swapped whole on reload.
#[derive(Debug)]
pub struct Auth {
    password_path: Option<PathBuf>,
    acl_path: Option<PathBuf>,
    anonymous_allowed: bool,
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl: RwLock<Option<Arc<Acl>>>,
    /// Bumped on every ACL swap, so connections know to rebuild their own rule list.
    acl_generation: AtomicU64,
    verifications: Arc<Semaphore>,
}

impl Auth {
    /// Reads the files named in the configuration; blocking, called at start-up.
    pub fn load(config: &AuthConfig) -> Result<Self, AuthError> {
        let passwords = match &config.password_file {
            Some(path) => Some(Arc::new(PasswordFile::load(path)?)),
            None => None,
        };
        let acl = match &config.acl_file {
            Some(path) => Some(Arc::new(Acl::load(path)?)),
            None => None,
        };
        Ok(Self {
            password_path: config.password_file.clone(),
            acl_path: config.acl_file.clone(),
            anonymous_allowed: config.anonymous_allowed(),
            passwords: RwLock::new(passwords),
            acl: RwLock::new(acl),
            acl_generation: AtomicU64::new(0),
            verifications: Arc::new(Semaphore::new(config.max_concurrent_verifications)),
        })
    }

    /// Re-reads both files; blocking. Each one that fails to load is reported and the one in
    /// force stays.
    pub fn reload(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if let Some(path) = &self.password_path {
            match PasswordFile::load(path) {
                Ok(file) => {
                    info!(path = %path.display(), users = file.len(), "password file reloaded");
                    metrics::reloaded("passwords", true);
                    *write_lock(&self.passwords) = Some(Arc::new(file));
                }
                Err(error) => {
                    warn!(%error, "password file not reloaded; the previous one stays in force");
                    metrics::reloaded("passwords", false);
                    failures.push(error.to_string());
                }
            }
        }
        if let Some(path) = &self.acl_path {
            match Acl::load(path) {
                Ok(acl) => {
                    info!(path = %path.display(), "ACL reloaded");
                    metrics::reloaded("acl", true);
                    *write_lock(&self.acl) = Some(Arc::new(acl));
                    self.acl_generation.fetch_add(1, Ordering::Release);
                }
                Err(error) => {
                    warn!(%error, "ACL not reloaded; the previous one stays in force");
                    metrics::reloaded("acl", false);
                    failures.push(error.to_string());
                }
            }
        }
        failures
    }

    /// Decides whether a CONNECT may proceed, and as whom. `cert_identity` is the name taken
    /// from a verified client certificate, which stands in for a password.
    pub async fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&Bytes>,
        cert_identity: Option<&str>,
    ) -> Result<Identity, ReasonCode> {
        if let Some(name) = cert_identity {
            return Ok(Identity {
                username: Some(name.into()),
            });
        }
        let Some(username) = username else {
            if self.anonymous_allowed {
                return Ok(Identity { username: None });
            }
            metrics::auth_failure("anonymous");
            return Err(ReasonCode::NotAuthorized);
        };
        let passwords = read_lock(&self.passwords).clone();
        let Some(passwords) = passwords else {
            // Without a password file a username is taken at its word, as Mosquitto does; it
            // still selects the client's ACL rules.
            return Ok(Identity {
                username: Some(username.into()),
            });
        };
        let Some(password) = password.cloned() else {
            metrics::auth_failure("no_password");
            return Err(ReasonCode::BadUserNameOrPassword);
        };
        // Argon2 is CPU-bound for tens of milliseconds: off the async workers, and only a few
        // at once so a CONNECT flood queues here instead of taking every core.
        let Ok(_permit) = self.verifications.clone().acquire_owned().await else {
            return Err(ReasonCode::ServerUnavailable);
        };
        let user = username.to_owned();
        let verified =
            tokio::task::spawn_blocking(move || passwords.verify(&user, &password)).await;
        match verified {
            Ok(true) => Ok(Identity {
                username: Some(username.into()),
            }),
            Ok(false) => {
                metrics::auth_failure("bad_password");
                Err(ReasonCode::BadUserNameOrPassword)
            }
            Err(_) => Err(ReasonCode::ServerUnavailable),
        }
    }

    /// The rules for one client, or `None` when no ACL is configured (everything allowed).
    pub fn acl_for(&self, identity: &Identity, client_id: &str) -> Option<ClientAcl> {
        read_lock(&self.acl)
            .as_ref()
            .map(|acl| acl.for_client(identity.username.as_deref(), client_id))
    }

    pub fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::Acquire)
    }
}

/// A poisoned lock only means a reload panicked mid-swap; the value is still a whole one.
fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
