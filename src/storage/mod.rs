//! Durable state in RocksDB: retained messages, persistent sessions with their subscriptions,
//! queues and inbound QoS 2 state, and the messages those queues reference.
//!
//! All RocksDB calls run off the async workers. Writes go through one bounded channel to a
//! writer thread that groups every request waiting at that moment into one `WriteBatch` (group
//! commit) and completes each request when its batch is in the WAL (and, with
//! `durability = "fsync"`, synced). Callers send acknowledgements only after that completion,
//! which is what makes "acknowledged" mean "survives kill -9". Reads happen once, at start-up.
//!
//! With a key configured every value is sealed (`cipher`) on its way in and opened on its way
//! out; the `meta` marker record keeps a directory from being read with the wrong key.

pub mod cipher;
mod keys;
mod memory;
mod meta;
pub mod ops;
mod records;
mod recovery;
mod rekey;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::BoxFuture;
use rocksdb::{ColumnFamilyDescriptor, DBCompressionType, Options, WriteBatch, WriteOptions, DB};
use tokio::sync::{mpsc, oneshot};

use crate::message::{Message, StoredMessage};
use crate::metrics;

pub use memory::Volatile;
/// Record formats the cluster also uses: messages sent between nodes, subscriptions of sessions
/// it records.
pub use records::{
    decode_message, decode_subscription, encode_message, encode_message_into, encode_subscription,
};
pub use recovery::{Recovered, RecoveredSession};
pub use rekey::{rekey, RekeyReport};

use crate::config::{Durability, StorageConfig};
use cipher::{KeyRing, Sealing};

/// Requests waiting for the writer thread; a full channel makes publishers wait, which pushes
/// back on their sockets.
const WRITE_QUEUE: usize = 4096;
/// Most requests folded into one batch.
const MAX_BATCH_REQUESTS: usize = 2048;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage error: {0}")]
    Rocks(Arc<str>),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("storage is shut down")]
    Closed,
    /// A key file is missing, malformed or readable by others.
    #[error("encryption key file {0}")]
    Key(String),
    /// The data directory is sealed differently from what the configured keys can read.
    #[error("{0}")]
    Encryption(String),
    /// The data directory was written in a key or record layout this version does not read.
    #[error("{0}")]
    Layout(String),
    /// A sealed record failed authentication: altered, moved to another key, or sealed with a
    /// key that is not configured. Reported and skipped, never decoded.
    #[error("stored record cannot be trusted: {0}")]
    Unauthentic(String),
}

impl From<rocksdb::Error> for StorageError {
    fn from(error: rocksdb::Error) -> Self {
        Self::Rocks(error.into_string().into())
    }
}

/// Column families, one per record kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cf {
    Meta,
    Sessions,
    Subscriptions,
    Queue,
    Inbound,
    Messages,
    Retained,
    Delayed,
}

impl Cf {
    pub const ALL: [Cf; 8] = [
        Cf::Meta,
        Cf::Sessions,
        Cf::Subscriptions,
        Cf::Queue,
        Cf::Inbound,
        Cf::Messages,
        Cf::Retained,
        Cf::Delayed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Sessions => "sessions",
            Cf::Subscriptions => "subscriptions",
            Cf::Queue => "queue",
            Cf::Inbound => "inbound",
            Cf::Messages => "messages",
            Cf::Retained => "retained",
            Cf::Delayed => "delayed",
        }
    }
}

/// One change; a request's changes are applied atomically with the rest of its batch.
#[derive(Clone, Debug)]
pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
    /// A stored delivery is finished or moved. What it writes depends on the other deliveries
    /// of its message at the moment the writer thread gets to it, so it is decided there.
    Release(Release),
}

/// See [`Op::Release`].
#[derive(Clone, Debug)]
pub struct Release {
    pub stored: Arc<StoredMessage>,
    /// The delivery's `queue` key.
    pub key: Vec<u8>,
    /// False when the reference moves to another delivery (a shared hand-over).
    pub drops_reference: bool,
    /// The delivery is listed in the message record: while the record stays, this value (a
    /// `Released` record, sealed with the rest of the request) is written at `key` to mask it.
    pub mask: Option<Vec<u8>>,
    /// The delivery has a `queue` entry of its own at `key`.
    pub own_entry: bool,
}

impl Release {
    /// The writes this release comes to now (writer thread only).
    fn resolve(self, out: &mut Vec<Op>) {
        let stored = &self.stored;
        if self.drops_reference && stored.release_reference() {
            out.push(Op::Delete(Cf::Messages, keys::message(stored.id)));
            if self.own_entry {
                out.push(Op::Delete(Cf::Queue, self.key));
            }
            let masks = stored.take_masks();
            out.extend(masks.into_iter().map(|key| Op::Delete(Cf::Queue, key)));
        } else if let Some(value) = self.mask {
            stored.add_mask(self.key.clone());
            out.push(Op::Put(Cf::Queue, self.key, value));
        } else if self.own_entry {
            out.push(Op::Delete(Cf::Queue, self.key));
        }
    }
}

/// Completes when the write is durable (or failed).
pub type Completion = oneshot::Receiver<Result<(), StorageError>>;

/// What the broker asks of a storage engine: the RocksDB engine ([`Storage`]) keeps retained
/// messages and persistent sessions; the memory engine ([`Volatile`]) keeps nothing.
pub trait Store: std::fmt::Debug + Send + Sync {
    /// Whether writes are kept. The publish pipeline plans no storage operations otherwise.
    fn is_durable(&self) -> bool;

    /// The id of the next stored message record.
    fn next_message_id(&self) -> u64;

    /// Queues `ops`; the returned completion resolves once they are durable. Waits while the
    /// writer's queue is full.
    fn write(&self, ops: Vec<Op>) -> BoxFuture<'_, Completion>;

    /// Queues `ops` without waiting for durability: for state whose loss is harmless (deleting
    /// what was acknowledged; a lost delete only means a redelivery after a crash).
    fn write_behind(&self, ops: Vec<Op>) -> BoxFuture<'_, ()>;

    /// Reads message records by id (blocking: call from `spawn_blocking`). Ids without a record
    /// are left out, as are records that fail authentication (reported).
    fn read_messages(&self, ids: &[u64]) -> Result<HashMap<u64, Message>, StorageError>;

    /// Number of keys in each column family (blocking scans; for tests and diagnostics).
    fn key_counts(&self) -> Vec<(&'static str, usize)>;

    /// Writes everything queued, makes it durable and stops.
    fn close(&self) -> BoxFuture<'_, ()>;
}

enum Request {
    Write {
        ops: Vec<Op>,
        done: Option<oneshot::Sender<Result<(), StorageError>>>,
    },
    /// Flush and stop after everything queued before it.
    Close(oneshot::Sender<()>),
}

#[derive(Debug)]
pub struct Storage {
    db: Arc<DB>,
    requests: mpsc::Sender<Request>,
    next_message_id: AtomicU64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    /// Seals values before they are queued (on the caller's thread, so the single writer
    /// thread does not do every client's encryption) and opens them when read back.
    keys: Arc<KeyRing>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Write { .. } => "Write",
            Request::Close(_) => "Close",
        })
    }
}

impl Storage {
    /// Opens the directory `config` names with the keys it names (see [`Storage::open`]).
    /// Blocking: key files are read and RocksDB is opened.
    pub fn open_configured(config: &StorageConfig) -> Result<(Self, Recovered), StorageError> {
        let keys = KeyRing::load(
            config.encryption_key_file.as_deref(),
            config.old_encryption_key_file.as_deref(),
        )?;
        Self::open(&config.data_dir, config.durability, keys)
    }

    /// Opens (creating if needed) the database in `path` and reads back everything stored.
    /// Refuses a directory `keys` cannot read (encrypted without the key, plain with a key,
    /// another key). Blocking: call it from `spawn_blocking` or before the runtime serves
    /// clients.
    pub fn open(
        path: &Path,
        durability: Durability,
        keys: KeyRing,
    ) -> Result<(Self, Recovered), StorageError> {
        let db = Arc::new(open_db(path)?);
        meta::check_layout(&db)?;
        meta::check_and_mark(&db, &keys)?;
        let started = Instant::now();
        let recovered = recovery::load(&db, &keys)?;
        tracing::info!(
            path = %path.display(),
            sessions = recovered.sessions.len(),
            retained = recovered.retained.len(),
            queued = recovered.queued_messages(),
            encryption = %keys.sealing(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "storage recovered"
        );
        metrics::recovery_seconds(started.elapsed().as_secs_f64());

        let (requests, receiver) = mpsc::channel(WRITE_QUEUE);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("telemq-storage".into())
            .spawn(move || write_loop(&writer_db, receiver, durability))
            .map_err(|e| StorageError::Rocks(format!("cannot start writer thread: {e}").into()))?;
        let storage = Self {
            db,
            requests,
            next_message_id: AtomicU64::new(recovered.next_message_id),
            writer: Mutex::new(Some(writer)),
            path: path.to_path_buf(),
            keys: Arc::new(keys),
        };
        Ok((storage, recovered))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seals the value of every put (no-op without a key).
    fn seal(&self, mut ops: Vec<Op>) -> Result<Vec<Op>, StorageError> {
        if self.keys.sealing() == Sealing::Plain {
            return Ok(ops);
        }
        for op in &mut ops {
            match op {
                Op::Put(cf, key, value) => {
                    *value = self.keys.seal(*cf, key, std::mem::take(value))?;
                }
                Op::Release(Release {
                    key,
                    mask: Some(value),
                    ..
                }) => {
                    *value = self.keys.seal(Cf::Queue, key, std::mem::take(value))?;
                }
                _ => {}
            }
        }
        Ok(ops)
    }

    /// Flushes memtables to SST files (tests grep the files for plaintext).
    pub fn flush(&self) -> Result<(), StorageError> {
        let handles: Vec<_> = Cf::ALL
            .iter()
            .filter_map(|cf| self.db.cf_handle(cf.name()))
            .collect();
        self.db
            .flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())?;
        Ok(())
    }
}

impl Store for Storage {
    fn is_durable(&self) -> bool {
        true
    }

    fn next_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    fn write(&self, ops: Vec<Op>) -> BoxFuture<'_, Completion> {
        // Queuing waits for room in the writer's channel; the completion it yields is awaited
        // later, by whoever holds the acknowledgement.
        #[allow(clippy::async_yields_async)]
        Box::pin(async move {
            let (done, completion) = oneshot::channel();
            let ops = match self.seal(ops) {
                Ok(ops) => ops,
                Err(error) => {
                    let _ = done.send(Err(error));
                    return completion;
                }
            };
            let request = Request::Write {
                ops,
                done: Some(done),
            };
            if let Err(mpsc::error::SendError(Request::Write {
                done: Some(done), ..
            })) = self.requests.send(request).await
            {
                let _ = done.send(Err(StorageError::Closed));
            }
            completion
        })
    }

    fn write_behind(&self, ops: Vec<Op>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if ops.is_empty() {
                return;
            }
            match self.seal(ops) {
                Ok(ops) => {
                    let _ = self.requests.send(Request::Write { ops, done: None }).await;
                }
                Err(error) => tracing::error!(%error, "storage write not queued"),
            }
        })
    }

    fn read_messages(&self, ids: &[u64]) -> Result<HashMap<u64, Message>, StorageError> {
        let handle = self
            .db
            .cf_handle(Cf::Messages.name())
            .ok_or_else(|| StorageError::Corrupt("column family messages missing".into()))?;
        let keys: Vec<_> = ids.iter().map(|&id| (&handle, keys::message(id))).collect();
        let mut found = HashMap::with_capacity(ids.len());
        for (&id, value) in ids.iter().zip(self.db.multi_get_cf(keys)) {
            let Some(value) = value? else { continue };
            let key = keys::message(id);
            match self.keys.open(Cf::Messages, &key, &value) {
                Ok(plain) => {
                    found.insert(id, records::decode_stored_message_only(&plain)?);
                }
                Err(error @ StorageError::Unauthentic(_)) => {
                    report_unauthentic(Cf::Messages, &key, &error);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(found)
    }

    fn key_counts(&self) -> Vec<(&'static str, usize)> {
        Cf::ALL
            .iter()
            .filter_map(|&cf| {
                let handle = self.db.cf_handle(cf.name())?;
                let count = self
                    .db
                    .iterator_cf(handle, rocksdb::IteratorMode::Start)
                    .filter(Result::is_ok)
                    .count();
                Some((cf.name(), count))
            })
            .collect()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done, closed) = oneshot::channel();
            if self.requests.send(Request::Close(done)).await.is_ok() {
                let _ = closed.await;
            }
            let writer = crate::sync::lock(&self.writer).take();
            if let Some(writer) = writer {
                let _ = tokio::task::spawn_blocking(move || writer.join()).await;
            }
        })
    }
}

/// Opens (creating if needed) the RocksDB database with every column family.
fn open_db(path: &Path) -> Result<DB, StorageError> {
    std::fs::create_dir_all(path).map_err(|e| {
        StorageError::Rocks(format!("cannot create {}: {e}", path.display()).into())
    })?;
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_compression_type(DBCompressionType::Lz4);
    options.set_bottommost_compression_type(DBCompressionType::Zstd);
    // Cross-column-family batches must be recovered all-or-nothing.
    options.set_atomic_flush(true);
    options.set_keep_log_file_num(4);
    let descriptors = Cf::ALL.iter().map(|cf| {
        let mut cf_options = Options::default();
        cf_options.set_compression_type(DBCompressionType::Lz4);
        ColumnFamilyDescriptor::new(cf.name(), cf_options)
    });
    Ok(DB::open_cf_descriptors(&options, path, descriptors)?)
}

/// A record that failed authentication: logged and counted, and the caller skips it. The key
/// is logged because it holds no payload (topic, client id or ids; in the clear on disk too).
fn report_unauthentic(cf: Cf, key: &[u8], error: &StorageError) {
    metrics::storage_decrypt_failure();
    tracing::error!(
        cf = cf.name(),
        key = %String::from_utf8_lossy(key).escape_debug(),
        %error,
        "stored record skipped: it fails authentication (altered, moved, or another key)"
    );
}

fn write_loop(db: &DB, mut receiver: mpsc::Receiver<Request>, durability: Durability) {
    let mut write_options = WriteOptions::default();
    write_options.set_sync(durability == Durability::Fsync);
    let mut waiters = Vec::with_capacity(MAX_BATCH_REQUESTS);
    // Kept from batch to batch: under load each batch is about as large as the last.
    let mut ops = Vec::new();
    let mut order = Vec::new();
    while let Some(first) = receiver.blocking_recv() {
        let mut batch = WriteBatch::default();
        let mut close = None;
        let mut requests = 0usize;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Write { ops: more, done } => {
                    requests += 1;
                    for op in more {
                        match op {
                            Op::Release(release) => release.resolve(&mut ops),
                            op => ops.push(op),
                        }
                    }
                    waiters.extend(done);
                }
                Request::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if requests < MAX_BATCH_REQUESTS {
                next = receiver.try_recv().ok();
            }
        }
        sort_point_ops(&ops, &mut order);
        for &(_, index) in &order {
            add_to_batch(db, &mut batch, &ops[index as usize]);
        }
        ops.clear();
        let result = if batch.is_empty() {
            Ok(())
        } else {
            let started = Instant::now();
            let result = db
                .write_opt(batch, &write_options)
                .map_err(StorageError::from);
            metrics::storage_batch(requests, started.elapsed().as_secs_f64(), result.is_ok());
            if let Err(error) = &result {
                tracing::error!(%error, requests, "storage write failed; clients are told");
            }
            result
        };
        for waiter in waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
        if let Some(done) = close {
            if let Err(error) = db.flush_wal(true) {
                tracing::error!(error = %error, "final WAL sync failed");
            }
            let _ = done.send(());
            return;
        }
    }
}

/// The order to apply `ops` in, as (run, index into `ops`): within each run of point writes
/// (between range deletes), sorted by column family and key, keeping the submitted order of
/// writes to the same key. Writes to different keys commute, so the batch means the same;
/// sorted, each session's keys reach the memtable's skip list in order, each inserted next to
/// the previous one. Sorting indices in place, rather than the ops with a stable sort, needs no
/// scratch allocation per batch.
fn sort_point_ops(ops: &[Op], order: &mut Vec<(u32, u32)>) {
    fn cf_and_key(op: &Op) -> (usize, &[u8]) {
        match op {
            Op::Put(cf, key, _) | Op::Delete(cf, key) | Op::DeleteRange(cf, key, _) => {
                (*cf as usize, key.as_slice())
            }
            Op::Release(release) => (Cf::Queue as usize, release.key.as_slice()),
        }
    }
    order.clear();
    let mut run = 0u32;
    for (index, op) in ops.iter().enumerate() {
        if matches!(op, Op::DeleteRange(..)) {
            order.push((run + 1, index as u32));
            run += 2;
        } else {
            order.push((run, index as u32));
        }
    }
    order.sort_unstable_by(|&(run_a, a), &(run_b, b)| {
        run_a
            .cmp(&run_b)
            .then_with(|| cf_and_key(&ops[a as usize]).cmp(&cf_and_key(&ops[b as usize])))
            .then(a.cmp(&b))
    });
}

fn add_to_batch(db: &DB, batch: &mut WriteBatch, op: &Op) {
    let cf_of = |cf: Cf| db.cf_handle(cf.name());
    match op {
        Op::Put(cf, key, value) => {
            if let Some(handle) = cf_of(*cf) {
                batch.put_cf(handle, key, value);
            }
        }
        Op::Delete(cf, key) => {
            if let Some(handle) = cf_of(*cf) {
                batch.delete_cf(handle, key);
            }
        }
        Op::DeleteRange(cf, from, to) => {
            if let Some(handle) = cf_of(*cf) {
                batch.delete_range_cf(handle, from, to);
            }
        }
        // Resolved into the ops above before the batch is built.
        Op::Release(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cf: Cf, key: &[u8], value: &[u8]) -> Op {
        Op::Put(cf, key.to_vec(), value.to_vec())
    }

    fn describe(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::Put(cf, key, value) => format!(
                    "put {} {} {}",
                    cf.name(),
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(value)
                ),
                Op::Delete(cf, key) => {
                    format!("del {} {}", cf.name(), String::from_utf8_lossy(key))
                }
                Op::DeleteRange(cf, from, _) => {
                    format!("range {} {}", cf.name(), String::from_utf8_lossy(from))
                }
                Op::Release(release) => format!("release {:?}", release.key),
            })
            .collect()
    }

    fn sorted(ops: &[Op]) -> Vec<Op> {
        let mut order = Vec::new();
        sort_point_ops(ops, &mut order);
        order
            .iter()
            .map(|&(_, i)| ops[i as usize].clone())
            .collect()
    }

    fn release(stored: &Arc<StoredMessage>, key: &[u8], listed: bool, own_entry: bool) -> Release {
        Release {
            stored: stored.clone(),
            key: key.to_vec(),
            drops_reference: true,
            mask: listed.then(|| b"R".to_vec()),
            own_entry,
        }
    }

    fn resolve(release: Release) -> Vec<String> {
        let mut out = Vec::new();
        release.resolve(&mut out);
        describe(&out)
    }

    #[test]
    fn releases_mask_listed_deliveries_until_the_last_one_deletes_record_entries_and_masks() {
        let stored = Arc::new(StoredMessage::new(0x41, 3));
        assert_eq!(
            resolve(release(&stored, b"s1", true, false)),
            ["put queue s1 R"]
        );
        // Past PUBREC, the delivery's own entry is overwritten by the mask.
        assert_eq!(
            resolve(release(&stored, b"s2", true, true)),
            ["put queue s2 R"]
        );
        assert_eq!(
            resolve(release(&stored, b"s3", true, true)),
            [
                "del messages \0\0\0\0\0\0\0A".to_string(),
                "del queue s3".into(),
                "del queue s1".into(),
                "del queue s2".into(),
            ]
        );
    }

    #[test]
    fn an_unlisted_delivery_deletes_its_entry_and_a_moved_one_keeps_its_reference() {
        let stored = Arc::new(StoredMessage::new(1, 2));
        let moved = Release {
            drops_reference: false,
            ..release(&stored, b"old", true, false)
        };
        assert_eq!(resolve(moved), ["put queue old R"]);
        assert_eq!(
            resolve(release(&stored, b"new", false, true)),
            ["del queue new"]
        );
        let last = resolve(release(&stored, b"other", false, true));
        assert_eq!(last.len(), 3, "{last:?}");
        assert!(last[0].starts_with("del messages"));
        assert_eq!(last[1..], ["del queue other", "del queue old"]);
    }

    #[test]
    fn point_writes_are_sorted_without_reordering_writes_to_one_key_or_across_range_deletes() {
        let ops = vec![
            put(Cf::Queue, b"b1", b"x"),
            put(Cf::Messages, b"m1", b"x"),
            put(Cf::Queue, b"a1", b"x"),
            put(Cf::Queue, b"b1", b"y"),
            Op::Delete(Cf::Queue, b"a1".to_vec()),
            Op::DeleteRange(Cf::Queue, b"a".to_vec(), b"b".to_vec()),
            put(Cf::Queue, b"a2", b"x"),
            put(Cf::Queue, b"a0", b"x"),
        ];
        assert_eq!(
            describe(&sorted(&ops)),
            [
                "put queue a1 x",
                "del queue a1",
                "put queue b1 x",
                "put queue b1 y",
                "put messages m1 x",
                "range queue a",
                "put queue a0 x",
                "put queue a2 x",
            ]
        );
    }
}
