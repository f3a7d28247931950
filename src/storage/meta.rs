//! The `meta` record saying how the data directory's records are sealed, so that start-up
//! refuses a directory it would misread: encrypted without the key, plain with a key (that
//! needs `telemq rekey`), or sealed with a key that is not configured.
//!
//! The record lists every sealing that may be present: one entry normally, two during a key
//! rotation (old records under the old key, new ones under the new key) until `rekey` has
//! re-sealed everything. It is updated, synced, before the first record of a new sealing is
//! written, so it never understates what the directory holds.

use rocksdb::{IteratorMode, WriteOptions, DB};

use super::cipher::{Fingerprint, KeyRing, Sealing};
use super::{Cf, StorageError};

const MARKER_KEY: &[u8] = b"encryption";
const FORMAT: u8 = 1;
const LAYOUT_KEY: &[u8] = b"layout";
/// Version of the key and record layout. 2 (2026-11-25): `queue` keyed by session store id,
/// deliveries listed in their message record.
const LAYOUT: u8 = 2;

pub(super) fn handle(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StorageError::Corrupt(format!("column family {} missing", cf.name())))
}

/// The sealings the directory may hold. A directory without the record is empty (new) or
/// was written before encryption existed (plain).
pub fn present(db: &DB) -> Result<Vec<Sealing>, StorageError> {
    match db.get_cf(handle(db, Cf::Meta)?, MARKER_KEY)? {
        Some(value) => decode(&value),
        None => {
            for cf in Cf::ALL.iter().filter(|&&cf| cf != Cf::Meta) {
                if db
                    .iterator_cf(handle(db, *cf)?, IteratorMode::Start)
                    .next()
                    .is_some()
                {
                    return Ok(vec![Sealing::Plain]);
                }
            }
            Ok(Vec::new())
        }
    }
}

/// Writes the record (synced: it must be durable before any record it describes).
pub fn store(db: &DB, sealings: &[Sealing]) -> Result<(), StorageError> {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    db.put_cf_opt(
        handle(db, Cf::Meta)?,
        MARKER_KEY,
        encode(sealings),
        &options,
    )?;
    Ok(())
}

/// Refuses a directory written in another layout; marks a new one with this layout.
pub fn check_layout(db: &DB) -> Result<(), StorageError> {
    match db.get_cf(handle(db, Cf::Meta)?, LAYOUT_KEY)? {
        Some(value) if value.as_slice() == [LAYOUT] => Ok(()),
        Some(value) => Err(StorageError::Layout(format!(
            "the data directory uses storage layout {value:?}, this version reads layout \
             {LAYOUT}; run the telemq version that wrote it, or start from an empty \
             storage.data_dir"
        ))),
        None => {
            for cf in [Cf::Sessions, Cf::Queue, Cf::Messages] {
                if db
                    .iterator_cf(handle(db, cf)?, IteratorMode::Start)
                    .next()
                    .is_some()
                {
                    return Err(StorageError::Layout(
                        "the data directory holds sessions in storage layout 1 (telemq \
                         before 2026-11-25), which this version cannot read; let the clients \
                         drain their sessions with the version that wrote it, or start from \
                         an empty storage.data_dir"
                            .into(),
                    ));
                }
            }
            let mut options = WriteOptions::default();
            options.set_sync(true);
            db.put_cf_opt(handle(db, Cf::Meta)?, LAYOUT_KEY, [LAYOUT], &options)?;
            Ok(())
        }
    }
}

/// Refuses a directory `keys` cannot read, then records that `keys` will write with its
/// current sealing.
pub fn check_and_mark(db: &DB, keys: &KeyRing) -> Result<(), StorageError> {
    let mut present = present(db)?;
    for sealing in &present {
        if !keys.can_read(*sealing) {
            return Err(refusal(*sealing, keys));
        }
    }
    if !present.contains(&keys.sealing()) {
        present.push(keys.sealing());
        store(db, &present)?;
    }
    Ok(())
}

pub(super) fn refusal(sealing: Sealing, keys: &KeyRing) -> StorageError {
    let text = match (sealing, keys.sealing()) {
        (Sealing::Plain, _) => "the data directory holds records written without encryption, \
             but storage.encryption_key_file is set; stop the broker and run \
             `telemq rekey --config FILE` to encrypt them, or remove the key"
            .to_string(),
        (Sealing::Key(fingerprint), _) if !keys.has_keys() => {
            format!(
                "the data directory is encrypted (key {fingerprint}) but no key is \
                 configured; set storage.encryption_key_file to that key, or run \
                 `telemq rekey` with it as storage.old_encryption_key_file to decrypt"
            )
        }
        (Sealing::Key(fingerprint), _) => format!(
            "the data directory holds records sealed with key {fingerprint}, which is not \
             configured ({}): wrong key. Configure that key (as storage.encryption_key_file, \
             or as storage.old_encryption_key_file during a rotation)",
            keys.describe()
        ),
    };
    StorageError::Encryption(text)
}

fn encode(sealings: &[Sealing]) -> Vec<u8> {
    let mut out = vec![FORMAT, sealings.len() as u8];
    for sealing in sealings {
        match sealing {
            Sealing::Plain => out.push(0),
            Sealing::Key(fingerprint) => {
                out.push(1);
                out.extend_from_slice(&fingerprint.0);
            }
        }
    }
    out
}

fn decode(value: &[u8]) -> Result<Vec<Sealing>, StorageError> {
    let corrupt = || StorageError::Corrupt("encryption marker record is malformed".into());
    let [FORMAT, count, rest @ ..] = value else {
        return Err(corrupt());
    };
    let mut rest: &[u8] = rest;
    let mut sealings = Vec::with_capacity(usize::from(*count));
    for _ in 0..*count {
        match rest {
            [0, tail @ ..] => {
                sealings.push(Sealing::Plain);
                rest = tail;
            }
            [1, tail @ ..] if tail.len() >= 32 => {
                let mut fingerprint = [0; 32];
                fingerprint.copy_from_slice(&tail[..32]);
                sealings.push(Sealing::Key(Fingerprint(fingerprint)));
                rest = &tail[32..];
            }
            _ => return Err(corrupt()),
        }
    }
    if !rest.is_empty() {
        return Err(corrupt());
    }
    Ok(sealings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_rejects_garbage() {
        let sealings = vec![Sealing::Plain, Sealing::Key(Fingerprint([9; 32]))];
        assert_eq!(decode(&encode(&sealings)).unwrap(), sealings);
        assert_eq!(decode(&encode(&[])).unwrap(), Vec::new());
        let encoded = encode(&sealings);
        for cut in 0..encoded.len() {
            assert!(decode(&encoded[..cut]).is_err(), "cut {cut}");
        }
        assert!(decode(&[2, 0]).is_err());
    }
}
