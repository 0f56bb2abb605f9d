//! A store connection used from async code: every call runs on tokio's blocking pool, so a busy
//! timeout (up to 10 s) or a slow disk never stalls the runtime's worker threads, and with them
//! the API and the deliveries of other endpoints.

use std::sync::{Arc, Mutex};

use super::{Result, Store, StoreError};

#[derive(Clone)]
pub struct SharedStore {
    inner: Arc<Mutex<Store>>,
}

impl SharedStore {
    pub fn new(store: Store) -> SharedStore {
        SharedStore {
            inner: Arc::new(Mutex::new(store)),
        }
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside `f` poisons the lock; the connection itself is still sound.
            let mut store = inner.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut store)
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
    }
}
