//! The memory engine (`storage.engine = "memory"`): nothing is kept, so nothing survives a
//! restart. The publish pipeline asks [`Store::is_durable`] and plans no storage operations
//! for it; whatever still reaches it completes at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::{Completion, Op, StorageError, Store};
use crate::message::Message;

#[derive(Debug)]
pub struct Volatile {
    next_message_id: AtomicU64,
}

impl Volatile {
    pub fn new() -> Self {
        Self {
            next_message_id: AtomicU64::new(1),
        }
    }
}

impl Default for Volatile {
    fn default() -> Self {
        Self::new()
    }
}

impl Store for Volatile {
    fn is_durable(&self) -> bool {
        false
    }

    fn next_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    fn write(&self, _ops: Vec<Op>) -> BoxFuture<'_, Completion> {
        let (done, completion) = oneshot::channel();
        let _ = done.send(Ok(()));
        Box::pin(std::future::ready(completion))
    }

    fn write_behind(&self, _ops: Vec<Op>) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn read_messages(&self, _ids: &[u64]) -> Result<HashMap<u64, Message>, StorageError> {
        Ok(HashMap::new())
    }

    fn key_counts(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_complete_at_once_and_nothing_is_kept() {
        let store = Volatile::new();
        assert!(!store.is_durable());
        let completion = store.write(vec![Op::Delete(super::super::Cf::Sessions, b"a".to_vec())]);
        assert!(completion.await.await.unwrap().is_ok());
        assert_eq!(store.next_message_id() + 1, store.next_message_id());
        assert!(store.read_messages(&[1, 2]).unwrap().is_empty());
        store.close().await;
    }
}
