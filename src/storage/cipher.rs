//! Encryption at rest: the keys the operator holds and the sealing of every stored value.
//!
//! A sealed value is `0xE1 ‖ key id (4) ‖ nonce (12) ‖ AES-256-GCM ciphertext ‖ tag (16)`.
//! The associated data is `0xE1 ‖ key id ‖ column family name ‖ record key`, so a value only
//! opens under the key it was written to: copied to another key or column family, truncated,
//! flipped or sealed with another key, it fails authentication and is reported, never decoded.
//! Keys stay in the clear (they hold topic names and client ids); see `docs/storage.md`.
//!
//! Plain records start with their format byte (1) or are empty, so a sealed value can never be
//! mistaken for a plain one. A [`KeyRing`] without a current key writes plain values.

use std::borrow::Cow;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::{Cf, StorageError};

/// Bytes of key material.
pub const KEY_LEN: usize = 32;
/// First byte of a sealed value (plain records start with their format byte, 1).
const SEALED: u8 = 0xE1;
const KEY_ID_LEN: usize = 4;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;
/// What the fingerprint of a key is a MAC of: a fixed label, so the fingerprint identifies
/// the key without revealing anything about it.
const FINGERPRINT_LABEL: &[u8] = b"telemq storage key fingerprint v1";

/// SHA-256 HMAC of a fixed label under the key: names a key in the data directory's marker
/// record, in error messages and (first 4 bytes) in every sealed value.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The 4 bytes every sealed value carries to say which key sealed it.
    pub fn key_id(&self) -> [u8; KEY_ID_LEN] {
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&self.0[..KEY_ID_LEN]);
        id
    }
}

impl std::fmt::Display for Fingerprint {
    /// The first 8 bytes in hex: enough for an operator to tell keys apart.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// One AES-256-GCM key.
pub struct Key {
    aead: LessSafeKey,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for Key {
    // Never the key material, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.fingerprint)
    }
}

impl Key {
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, StorageError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| StorageError::Key("AES-256-GCM refused the key".into()))?;
        let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, bytes), FINGERPRINT_LABEL);
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(mac.as_ref());
        Ok(Self {
            aead: LessSafeKey::new(unbound),
            fingerprint: Fingerprint(fingerprint),
        })
    }

    /// Reads a key file: 32 raw bytes, or 64 hexadecimal digits (surrounding whitespace such as
    /// a trailing newline is ignored). Refuses a file that group or others may access.
    pub fn load(path: &Path) -> Result<Self, StorageError> {
        let error = |reason: String| StorageError::Key(format!("{}: {reason}", path.display()));
        let metadata = std::fs::metadata(path).map_err(|e| error(format!("cannot read: {e}")))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(error(format!(
                "key file is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
                path.display()
            )));
        }
        let contents = std::fs::read(path).map_err(|e| error(format!("cannot read: {e}")))?;
        let bytes = parse_key(&contents).ok_or_else(|| {
            error("must hold 32 raw bytes or 64 hexadecimal digits (see `telemq keygen`)".into())
        })?;
        Self::from_bytes(&bytes)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// 32 raw bytes, or 64 hex digits with optional surrounding whitespace.
fn parse_key(contents: &[u8]) -> Option<[u8; KEY_LEN]> {
    if let Ok(raw) = <[u8; KEY_LEN]>::try_from(contents) {
        return Some(raw);
    }
    let text = contents.trim_ascii();
    if text.len() != 2 * KEY_LEN {
        return None;
    }
    let mut key = [0; KEY_LEN];
    for (byte, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |c: u8| char::from(c).to_digit(16);
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(key)
}

/// Writes a new random key to `path` as 64 hex digits, readable by its owner only. Refuses to
/// overwrite an existing file (that would orphan whatever the old key sealed).
pub fn write_new_key_file(path: &Path) -> Result<Fingerprint, StorageError> {
    let error = |reason: String| StorageError::Key(format!("{}: {reason}", path.display()));
    let mut bytes = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| error("no randomness available".into()))?;
    let key = Key::from_bytes(&bytes)?;
    let mut text = String::with_capacity(2 * KEY_LEN + 1);
    for byte in bytes {
        text.push_str(&format!("{byte:02x}"));
    }
    text.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => error("already exists; not overwritten".into()),
            _ => error(format!("cannot create: {e}")),
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| error(format!("cannot write: {e}")))?;
    Ok(key.fingerprint)
}

/// How the records of a data directory are written: in the clear, or sealed with one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sealing {
    Plain,
    Key(Fingerprint),
}

impl std::fmt::Display for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sealing::Plain => f.write_str("no encryption"),
            Sealing::Key(fingerprint) => write!(f, "key {fingerprint}"),
        }
    }
}

/// The keys storage seals with (current) and opens with (current and old), and the nonce
/// source.
#[derive(Debug)]
pub struct KeyRing {
    current: Option<Key>,
    old: Option<Key>,
    /// Whether values in the clear are accepted when reading: only when writing in the clear,
    /// or while `rekey` migrates a plain directory. Otherwise a plain value in an encrypted
    /// directory is an injected one.
    read_plain: bool,
    nonce_prefix: [u8; 4],
    /// Combined with the prefix into the 96-bit nonce; starts at a random value so two runs
    /// of the broker under the same key do not reuse nonces, and counts up so one run never
    /// does.
    nonce_counter: AtomicU64,
}

impl KeyRing {
    /// Writes and reads plain values.
    pub fn plain() -> Self {
        Self {
            current: None,
            old: None,
            read_plain: true,
            nonce_prefix: [0; 4],
            nonce_counter: AtomicU64::new(0),
        }
    }

    /// `current` seals new values (none: they are written in the clear); both open.
    pub fn new(current: Option<Key>, old: Option<Key>) -> Result<Self, StorageError> {
        let mut seed = [0u8; 12];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| StorageError::Key("no randomness available for nonces".into()))?;
        let mut prefix = [0; 4];
        prefix.copy_from_slice(&seed[..4]);
        let mut counter = [0; 8];
        counter.copy_from_slice(&seed[4..]);
        Ok(Self {
            read_plain: current.is_none(),
            current,
            old,
            nonce_prefix: prefix,
            nonce_counter: AtomicU64::new(u64::from_be_bytes(counter)),
        })
    }

    /// Loads the key files named by `storage.encryption_key_file` and
    /// `storage.old_encryption_key_file`.
    pub fn load(current: Option<&Path>, old: Option<&Path>) -> Result<Self, StorageError> {
        let current = current.map(Key::load).transpose()?;
        let old = old.map(Key::load).transpose()?;
        Self::new(current, old)
    }

    /// How new values are written.
    pub fn sealing(&self) -> Sealing {
        self.current
            .as_ref()
            .map_or(Sealing::Plain, |key| Sealing::Key(key.fingerprint))
    }

    /// Whether values written as `sealing` can be read back.
    pub fn can_read(&self, sealing: Sealing) -> bool {
        match sealing {
            Sealing::Plain => self.read_plain,
            Sealing::Key(fingerprint) => self.keys().any(|k| k.fingerprint == fingerprint),
        }
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        self.keys().next().is_some()
    }

    /// The fingerprints of the configured keys (current first), for error messages.
    pub fn describe(&self) -> String {
        let describe = |key: &Option<Key>| {
            key.as_ref()
                .map_or_else(|| "none".to_string(), |k| k.fingerprint.to_string())
        };
        format!(
            "encryption_key_file: {}, old_encryption_key_file: {}",
            describe(&self.current),
            describe(&self.old)
        )
    }

    pub(crate) fn set_read_plain(&mut self, read_plain: bool) {
        self.read_plain = read_plain;
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        self.current.iter().chain(self.old.iter())
    }

    fn next_nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = [0; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.nonce_prefix);
        let counter = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        nonce
    }

    /// Seals `value` stored under `key` in `cf` with the current key; without one, returns it
    /// unchanged.
    pub fn seal(&self, cf: Cf, key: &[u8], value: Vec<u8>) -> Result<Vec<u8>, StorageError> {
        let Some(current) = &self.current else {
            return Ok(value);
        };
        let key_id = current.fingerprint.key_id();
        let nonce = self.next_nonce();
        let mut sealed = Vec::with_capacity(HEADER_LEN + value.len() + TAG_LEN);
        sealed.push(SEALED);
        sealed.extend_from_slice(&key_id);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&value);
        let tag = current
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(key_id, cf, key)),
                &mut sealed[HEADER_LEN..],
            )
            .map_err(|_| StorageError::Key(format!("value too large to seal in {}", cf.name())))?;
        sealed.extend_from_slice(tag.as_ref());
        Ok(sealed)
    }

    /// Opens a value read from `key` in `cf`. Fails with [`StorageError::Unauthentic`] when it
    /// was altered, written under another record key, sealed with a key not in the ring, or is
    /// in the clear where sealed values are expected.
    pub fn open<'a>(
        &self,
        cf: Cf,
        key: &[u8],
        value: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, StorageError> {
        let unauthentic =
            |why: &str| StorageError::Unauthentic(format!("{} record: {why}", cf.name()));
        if value.first() != Some(&SEALED) {
            return if self.read_plain {
                Ok(Cow::Borrowed(value))
            } else {
                Err(unauthentic("not sealed, in an encrypted data directory"))
            };
        }
        if value.len() < HEADER_LEN + TAG_LEN {
            return Err(unauthentic("truncated"));
        }
        let mut key_id = [0; KEY_ID_LEN];
        key_id.copy_from_slice(&value[1..1 + KEY_ID_LEN]);
        let mut nonce = [0; NONCE_LEN];
        nonce.copy_from_slice(&value[1 + KEY_ID_LEN..HEADER_LEN]);
        let mut candidates = self
            .keys()
            .filter(|k| k.fingerprint.key_id() == key_id)
            .peekable();
        if candidates.peek().is_none() {
            return Err(unauthentic("sealed with a key that is not configured"));
        }
        for candidate in candidates {
            let mut buffer = value[HEADER_LEN..].to_vec();
            if let Ok(plain) = candidate.aead.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(key_id, cf, key)),
                &mut buffer,
            ) {
                let len = plain.len();
                buffer.truncate(len);
                return Ok(Cow::Owned(buffer));
            }
        }
        Err(unauthentic(
            "authentication failed (altered, or moved from another key)",
        ))
    }

    /// Which key sealed a stored value (`Plain` for a value in the clear); `None` when the
    /// value names a key that is not in the ring. For tests and `rekey`.
    pub fn sealed_with(&self, value: &[u8]) -> Option<Sealing> {
        if value.first() != Some(&SEALED) {
            return Some(Sealing::Plain);
        }
        let id = value.get(1..1 + KEY_ID_LEN)?;
        self.keys()
            .find(|k| k.fingerprint.key_id() == id)
            .map(|k| Sealing::Key(k.fingerprint))
    }
}

/// `0xE1 ‖ key id ‖ column family name length ‖ name ‖ record key`.
fn associated_data(key_id: [u8; KEY_ID_LEN], cf: Cf, key: &[u8]) -> Vec<u8> {
    let name = cf.name().as_bytes();
    let mut aad = Vec::with_capacity(1 + KEY_ID_LEN + 1 + name.len() + key.len());
    aad.push(SEALED);
    aad.extend_from_slice(&key_id);
    // Column family names are short constants.
    aad.push(name.len() as u8);
    aad.extend_from_slice(name);
    aad.extend_from_slice(key);
    aad
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn key(byte: u8) -> Key {
        Key::from_bytes(&[byte; KEY_LEN]).unwrap()
    }

    fn ring(current: u8) -> KeyRing {
        KeyRing::new(Some(key(current)), None).unwrap()
    }

    #[test]
    fn sealed_values_round_trip_and_hide_the_plaintext() {
        let ring = ring(1);
        let plain = b"\x01 a payload nobody may read".to_vec();
        let sealed = ring.seal(Cf::Messages, b"k1", plain.clone()).unwrap();
        assert_eq!(sealed.len(), plain.len() + HEADER_LEN + TAG_LEN);
        assert!(!sealed.windows(b"payload".len()).any(|w| w == b"payload"));
        assert_eq!(
            ring.open(Cf::Messages, b"k1", &sealed).unwrap().as_ref(),
            &plain[..]
        );
        // Empty values (inbound QoS 2 ids) are sealed too.
        let empty = ring.seal(Cf::Inbound, b"k", Vec::new()).unwrap();
        assert!(ring.open(Cf::Inbound, b"k", &empty).unwrap().is_empty());
    }

    #[test]
    fn every_altered_byte_and_every_truncation_is_detected() {
        let ring = ring(1);
        let sealed = ring
            .seal(Cf::Retained, b"t", b"\x01value".to_vec())
            .unwrap();
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x01;
            assert!(
                matches!(
                    ring.open(Cf::Retained, b"t", &altered),
                    Err(StorageError::Unauthentic(_))
                ),
                "flip at {i}"
            );
        }
        for cut in 0..sealed.len() {
            assert!(
                ring.open(Cf::Retained, b"t", &sealed[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn a_value_moved_to_another_key_or_family_does_not_open() {
        let ring = ring(1);
        let sealed = ring.seal(Cf::Retained, b"a/b", b"\x01v".to_vec()).unwrap();
        assert!(ring.open(Cf::Retained, b"a/c", &sealed).is_err());
        assert!(ring.open(Cf::Messages, b"a/b", &sealed).is_err());
        assert!(ring.open(Cf::Retained, b"a/b", &sealed).is_ok());
    }

    #[test]
    fn another_key_does_not_open_and_an_old_key_does() {
        let sealed = ring(1).seal(Cf::Sessions, b"c", b"\x01s".to_vec()).unwrap();
        assert!(matches!(
            ring(2).open(Cf::Sessions, b"c", &sealed),
            Err(StorageError::Unauthentic(_))
        ));
        let rotated = KeyRing::new(Some(key(2)), Some(key(1))).unwrap();
        assert_eq!(
            rotated.open(Cf::Sessions, b"c", &sealed).unwrap().as_ref(),
            b"\x01s"
        );
        assert_eq!(
            rotated.sealed_with(&sealed),
            Some(Sealing::Key(key(1).fingerprint()))
        );
        let resealed = rotated.seal(Cf::Sessions, b"c", b"\x01s".to_vec()).unwrap();
        assert_eq!(
            rotated.sealed_with(&resealed),
            Some(Sealing::Key(key(2).fingerprint()))
        );
    }

    #[test]
    fn plain_values_are_refused_where_sealed_ones_are_expected() {
        assert!(ring(1).open(Cf::Messages, b"k", b"\x01plain").is_err());
        assert!(ring(1).open(Cf::Inbound, b"k", b"").is_err());
        let plain = KeyRing::plain();
        assert_eq!(
            plain.seal(Cf::Messages, b"k", b"\x01p".to_vec()).unwrap(),
            b"\x01p"
        );
        assert_eq!(
            plain.open(Cf::Messages, b"k", b"\x01p").unwrap().as_ref(),
            b"\x01p"
        );
    }

    #[test]
    fn nonces_are_unique() {
        let ring = ring(1);
        let nonces: HashSet<Vec<u8>> = (0..10_000)
            .map(|_| {
                let sealed = ring.seal(Cf::Messages, b"k", b"\x01same".to_vec()).unwrap();
                sealed[1 + KEY_ID_LEN..HEADER_LEN].to_vec()
            })
            .collect();
        assert_eq!(nonces.len(), 10_000);
        // Two rings under the same key (two runs of the broker) start apart.
        let other = KeyRing::new(Some(key(1)), None).unwrap();
        assert_ne!(ring.next_nonce(), other.next_nonce());
    }

    #[test]
    fn key_files_raw_or_hex_and_private_only() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [7u8; KEY_LEN]).unwrap();
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Key::load(&raw).unwrap().fingerprint(), key(7).fingerprint());

        let hex = dir.path().join("hex");
        std::fs::write(&hex, format!("{}\n", "07".repeat(KEY_LEN))).unwrap();
        std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(Key::load(&hex).unwrap().fingerprint(), key(7).fingerprint());

        std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Key::load(&hex).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");

        let short = dir.path().join("short");
        std::fs::write(&short, "abcd").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::load(&short).is_err());
        assert!(parse_key(&[b'g'; 64]).is_none());
    }

    #[test]
    fn keygen_writes_a_private_loadable_key_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let fingerprint = write_new_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Key::load(&path).unwrap().fingerprint(), fingerprint);
        let before = std::fs::read(&path).unwrap();
        assert!(write_new_key_file(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let other = dir.path().join("k2");
        assert_ne!(write_new_key_file(&other).unwrap(), fingerprint);
    }
}
