//! Offline re-sealing of every stored record under the current key: the end of a key rotation,
//! and the migration of a plain directory to encryption (or back, with no current key).
//!
//! Runs with the broker stopped (RocksDB's lock refuses it otherwise). The marker record first
//! gains the target sealing, then every record is re-sealed in batches, then the marker is set
//! to the target alone and the column families are compacted, so no file keeps a copy sealed
//! with the old key (the reason to rotate may be that it leaked). Interrupted, it can simply be
//! run again.

use std::path::Path;

use rocksdb::{IteratorMode, WriteBatch, DB};

use super::cipher::{KeyRing, Sealing};
use super::{meta, report_unauthentic, Cf, StorageError};

/// Records re-sealed per write.
const BATCH: usize = 1000;

/// What a rekey pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyReport {
    /// Records in the directory.
    pub total: u64,
    /// Records now under the target sealing.
    pub rekeyed: u64,
    /// Records that failed authentication (altered or moved); left as they were, reported.
    pub unreadable: u64,
}

/// Re-seals every record in the data directory at `path` with `keys`' current key (plain
/// without one), reading with any key of the ring. `progress(done, total)` is called after each
/// batch.
pub fn rekey(
    path: &Path,
    mut keys: KeyRing,
    mut progress: impl FnMut(u64, u64),
) -> Result<RekeyReport, StorageError> {
    if !path.join("CURRENT").exists() {
        return Err(StorageError::Rocks(
            format!("no telemq data directory at {}", path.display()).into(),
        ));
    }
    let db = super::open_db(path)?;
    let present = meta::present(&db)?;
    // Reading plain values is what migrating a plain directory means; where the marker says
    // the directory is encrypted, a plain value is an injected one and stays refused.
    keys.set_read_plain(keys.sealing() == Sealing::Plain || present.contains(&Sealing::Plain));
    for sealing in &present {
        if !keys.can_read(*sealing) {
            return Err(meta::refusal(*sealing, &keys));
        }
    }
    let target = keys.sealing();
    let mut marker = present.clone();
    if !marker.contains(&target) {
        marker.push(target);
        meta::store(&db, &marker)?;
    }

    let families: Vec<Cf> = Cf::ALL.into_iter().filter(|&cf| cf != Cf::Meta).collect();
    let mut report = RekeyReport::default();
    for &cf in &families {
        let handle = meta::handle(&db, cf)?;
        report.total += db.iterator_cf(handle, IteratorMode::Start).count() as u64;
    }
    progress(0, report.total);
    let mut done = 0u64;
    for &cf in &families {
        let handle = meta::handle(&db, cf)?;
        let mut batch = WriteBatch::default();
        // The iterator reads a snapshot taken when it was created, so the batches written
        // while it runs are not visited again.
        for item in db.iterator_cf(handle, IteratorMode::Start) {
            let (key, value) = item?;
            match keys.open(cf, &key, &value) {
                Ok(plain) => {
                    batch.put_cf(handle, &key, keys.seal(cf, &key, plain.into_owned())?);
                    report.rekeyed += 1;
                }
                Err(error @ StorageError::Unauthentic(_)) => {
                    report_unauthentic(cf, &key, &error);
                    report.unreadable += 1;
                }
                Err(error) => return Err(error),
            }
            done += 1;
            if batch.len() >= BATCH {
                db.write(std::mem::take(&mut batch))?;
                progress(done, report.total);
            }
        }
        if !batch.is_empty() {
            db.write(batch)?;
        }
        progress(done, report.total);
    }
    finish(&db, &families, target)?;
    Ok(report)
}

fn finish(db: &DB, families: &[Cf], target: Sealing) -> Result<(), StorageError> {
    db.flush_wal(true)?;
    meta::store(db, &[target])?;
    let handles = families
        .iter()
        .map(|&cf| meta::handle(db, cf))
        .collect::<Result<Vec<_>, _>>()?;
    db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())?;
    // Forced: by default files already in the bottom level are left as they are, and those
    // may be the only place the old copies live.
    let mut compaction = rocksdb::CompactOptions::default();
    compaction.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
    for handle in handles {
        db.compact_range_cf_opt(handle, None::<&[u8]>, None::<&[u8]>, &compaction);
    }
    Ok(())
}
