//! The password file: one `username:$argon2id$...` line per user, in the PHC string format, so
//! the file never holds a password and a stolen copy costs an argon2 search per guess.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::FileError;

#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Usernames and their argon2 hashes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PasswordFile {
    hashes: HashMap<String, String>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, PasswordFileError> {
        Ok(super::load_file(path, Self::parse)?)
    }

    /// Parses the file's text; an error names the 1-based line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut hashes = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err((index + 1, "expected username:hash".into()));
            };
            if user.is_empty() {
                return Err((index + 1, "empty username".into()));
            }
            // Checked now so that a bad hash is refused on load (or reload), not at login.
            if let Err(error) = PasswordHash::new(hash) {
                return Err((index + 1, format!("not a PHC hash string: {error}")));
            }
            if hashes.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err((index + 1, format!("user {user:?} appears twice")));
            }
        }
        Ok(Self { hashes })
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `password` is `user`'s. Blocking (tens of milliseconds of argon2); call it off
    /// the async workers. An unknown user costs the same as a known one, so response time does
    /// not tell which usernames exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let argon2 = Argon2::default();
        match self.hashes.get(user).map(|hash| PasswordHash::new(hash)) {
            // The comparison inside verify_password is constant-time.
            Some(Ok(hash)) => argon2.verify_password(password, &hash).is_ok(),
            _ => {
                if let Some(decoy) = decoy_hash() {
                    let _ = argon2.verify_password(password, &decoy);
                }
                false
            }
        }
    }

    /// Sets (or replaces) `user`'s password.
    pub fn set(&mut self, user: &str, password: &[u8]) -> Result<(), PasswordFileError> {
        self.hashes
            .insert(user.to_owned(), hash_password(password)?);
        Ok(())
    }

    /// Removes `user`; returns whether they existed.
    pub fn remove(&mut self, user: &str) -> bool {
        self.hashes.remove(user).is_some()
    }

    /// The file's text, users sorted so that edits show as small diffs.
    pub fn to_text(&self) -> String {
        let mut users: Vec<_> = self.hashes.iter().collect();
        users.sort();
        users
            .into_iter()
            .map(|(user, hash)| format!("{user}:{hash}\n"))
            .collect()
    }
}

/// An argon2id hash of `password` with a fresh random salt, in PHC string form.
pub fn hash_password(password: &[u8]) -> Result<String, PasswordFileError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt =
        SaltString::encode_b64(&salt_bytes).map_err(|e| PasswordFileError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordFileError::Hash(e.to_string()))
}

/// A hash with the default parameters, verified against for unknown users; made once.
fn decoy_hash() -> Option<PasswordHash<'static>> {
    static DECOY: OnceLock<Option<String>> = OnceLock::new();
    DECOY
        .get_or_init(|| hash_password(b"decoy").ok())
        .as_deref()
        .and_then(|hash| PasswordHash::new(hash).ok())
}

/// Writes the file with owner-only permissions, through a temporary file and a rename so a
/// crash never leaves it half written.
pub fn write_file(path: &Path, file: &PasswordFile) -> Result<(), PasswordFileError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| PasswordFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    out.write_all(file.to_text().as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(write_error)?;
    std::fs::rename(&temporary, path).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_password_verifies_and_a_wrong_one_does_not() {
        let mut file = PasswordFile::default();
        file.set("alice", b"s3cret").unwrap();
        let reparsed = PasswordFile::parse(&file.to_text()).unwrap();
        assert!(reparsed.verify("alice", b"s3cret"));
        assert!(!reparsed.verify("alice", b"s3cret "));
        assert!(!reparsed.verify("bob", b"s3cret"));
        assert!(file.to_text().starts_with("alice:$argon2id$"));
        assert!(!file.to_text().contains("s3cret"));
    }

    #[test]
    fn the_decoy_hash_parses() {
        assert!(decoy_hash().is_some());
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        assert_eq!(PasswordFile::parse("# users\n\nalice\n").unwrap_err().0, 3);
        assert_eq!(PasswordFile::parse("alice:plaintext\n").unwrap_err().0, 1);
        let hash = hash_password(b"x").unwrap();
        let twice = format!("a:{hash}\na:{hash}\n");
        assert!(PasswordFile::parse(&twice).unwrap_err().1.contains("twice"));
    }
}
