//! A store connection used from async code: every call runs on tokio's blocking pool, so a busy
//! timeout (up to 10 s) or a slow disk never stalls the runtime's worker threads, and with them
//! the API and the deliveries of other endpoints.

use std::sync::{Arc, Mutex};

use super::{Result, Store, StoreError};

/// A store of any backend (`St`), SQLite's by default.
pub struct SharedStore<St = Store> {
    inner: Arc<Mutex<St>>,
}

impl<St> Clone for SharedStore<St> {
    fn clone(&self) -> Self {
        SharedStore {
            inner: self.inner.clone(),
        }
    }
}

impl<St: Send + 'static> SharedStore<St> {
    pub fn new(store: St) -> SharedStore<St> {
        SharedStore {
            inner: Arc::new(Mutex::new(store)),
        }
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut St) -> Result<T> + Send + 'static,
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
