//! One PostgreSQL connection used synchronously, like a SQLite one: the store traits block
//! their caller (always a blocking thread or the follower's own). The connection's socket is
//! driven by a thread of its own, so a call made from inside a tokio runtime (the follower's)
//! only waits on channels and never nests one runtime in another.

use std::cell::{Cell, Ref, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::net::redact_url;
use crate::store::{Result, StoreError};

pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// How every writing transaction starts.
pub const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A statement that runs longer is cancelled and reported; a lock wait counts.
const STATEMENT_TIMEOUT: &str = "30s";
/// A session that sits in a transaction this long is ended by the server, releasing its locks:
/// a leader paused (or cut off) mid-commit must not hold the lease row and the event log's lock
/// past its lease. Our transactions never wait on anything but the database.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "1500ms";

struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark()
    }
}

/// Polls `f` to completion on this thread, parking between wake-ups.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

pub fn pg_error(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{}: {}", db.severity(), db.message())),
        None => StoreError::Postgres(e.to_string()),
    }
}

/// Opens a connection whose socket a thread of its own drives until it closes.
fn connect(url: &str) -> Result<Client> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Postgres(format!("store.url {}: {e}", redact_url(url))))?;
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        // Unacknowledged writes to a vanished server fail after this, not after TCP's minutes.
        .tcp_user_timeout(Duration::from_secs(30))
        .application_name("chainwatch")
        .options(format!(
            "-c statement_timeout={STATEMENT_TIMEOUT} -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT}"
        ));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("postgres".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return drop(tx.send(Err(StoreError::Worker(e.to_string())))),
            };
            rt.block_on(async move {
                match config.connect(NoTls).await {
                    Ok((client, connection)) => {
                        let _ = tx.send(Ok(client));
                        if let Err(e) = connection.await {
                            tracing::warn!(error = %e, "PostgreSQL connection lost; the next call reconnects");
                        }
                    }
                    Err(e) => drop(tx.send(Err(pg_error(e)))),
                }
            })
        })
        .map_err(|e| StoreError::Worker(e.to_string()))?;
    rx.recv()
        .map_err(|_| StoreError::Worker("the PostgreSQL connection thread ended".into()))?
}

/// A connection that comes back by itself: a call after it was lost connects again (outside
/// a transaction; inside one, the transaction is lost and the call fails).
pub struct PgConn {
    url: String,
    client: RefCell<Option<Client>>,
    /// Open transactions and savepoints.
    depth: Cell<u32>,
    /// Statements prepared on this session, by their text: one round trip per call, not two.
    statements: RefCell<HashMap<String, Statement>>,
}

impl PgConn {
    pub fn open(url: &str) -> Result<PgConn> {
        let conn = PgConn {
            url: url.to_string(),
            client: RefCell::new(Some(connect(url)?)),
            depth: Cell::new(0),
            statements: RefCell::new(HashMap::new()),
        };
        Ok(conn)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn client(&self) -> Result<Ref<'_, Client>> {
        let lost = self.client.borrow().as_ref().is_none_or(|c| c.is_closed());
        if lost {
            if self.depth.get() > 0 {
                return Err(StoreError::Postgres(
                    "connection lost inside a transaction".into(),
                ));
            }
            *self.client.borrow_mut() = None;
            self.statements.borrow_mut().clear();
            *self.client.borrow_mut() = Some(connect(&self.url)?);
        }
        Ok(Ref::map(self.client.borrow(), |c| {
            c.as_ref().expect("connected above")
        }))
    }

    /// The session and `sql` prepared on it (once per session).
    fn prepared(&self, sql: &str) -> Result<(Ref<'_, Client>, Statement)> {
        let c = self.client()?;
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok((c, s.clone()));
        }
        let s = block_on(c.prepare(sql)).map_err(pg_error)?;
        self.statements
            .borrow_mut()
            .insert(sql.to_string(), s.clone());
        Ok((c, s))
    }

    pub fn query(&self, sql: &str, params: Params) -> Result<Vec<Row>> {
        let (c, s) = self.prepared(sql)?;
        block_on(c.query(&s, params)).map_err(pg_error)
    }

    pub fn query_opt(&self, sql: &str, params: Params) -> Result<Option<Row>> {
        let (c, s) = self.prepared(sql)?;
        block_on(c.query_opt(&s, params)).map_err(pg_error)
    }

    pub fn query_one(&self, sql: &str, params: Params) -> Result<Row> {
        let (c, s) = self.prepared(sql)?;
        block_on(c.query_one(&s, params)).map_err(pg_error)
    }

    pub fn execute(&self, sql: &str, params: Params) -> Result<u64> {
        let (c, s) = self.prepared(sql)?;
        block_on(c.execute(&s, params)).map_err(pg_error)
    }

    /// Prepares on this session those of `sqls` it has not prepared yet, all at once: one
    /// round trip instead of one per statement, and none in the middle of a pipeline, where
    /// a statement's preparation waits for every statement sent before it.
    fn prepare_all(&self, sqls: &[&str]) -> Result<()> {
        let client = self.client()?;
        let missing: Vec<&str> = {
            let known = self.statements.borrow();
            sqls.iter()
                .copied()
                .filter(|s| !known.contains_key(*s))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut pending: Vec<_> = missing
            .iter()
            .map(|sql| Box::pin(client.prepare(sql)))
            .collect();
        // A first poll sends each request; then the answers are read in order.
        let polled: Vec<_> = pending.iter_mut().map(|f| poll_once(f.as_mut())).collect();
        let mut known = self.statements.borrow_mut();
        for ((sql, mut f), first) in missing.into_iter().zip(pending).zip(polled) {
            let statement = match first {
                Poll::Ready(r) => r,
                Poll::Pending => block_on(f.as_mut()),
            };
            known.insert(sql.to_string(), statement.map_err(pg_error)?);
        }
        Ok(())
    }

    /// Runs `f` with a pipeline on this session, then waits for all it sent. `statements` are
    /// the only ones `f` may send; they are prepared first.
    pub fn pipelined<T>(
        &self,
        statements: &[&str],
        f: impl FnOnce(&mut Pipeline<'_>) -> Result<T>,
    ) -> Result<T> {
        self.prepare_all(statements)?;
        let client = self.client()?;
        let mut pipeline = Pipeline {
            conn: self,
            client: &client,
            waiting: Vec::new(),
            answered: Vec::new(),
        };
        let out = f(&mut pipeline);
        let answers = pipeline.finish();
        let out = out?;
        answers.map(|()| out)
    }

    pub fn batch(&self, sql: &str) -> Result<()> {
        let c = self.client()?;
        block_on(c.batch_execute(sql)).map_err(pg_error)
    }

    /// Runs `f` in a transaction (a savepoint when one is open already): all or nothing.
    pub fn transaction<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // Pinned: the fence's FOR SHARE and the log's newest row must see commits made while
        // waiting for their locks, whatever the server's default isolation.
        self.transaction_as(BEGIN, f)
    }

    /// Runs `f` in the transaction already open, or in a transaction of its own if none is.
    pub fn within_transaction<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.depth.get() > 0 {
            f()
        } else {
            self.transaction(f)
        }
    }

    /// Like `transaction`, with the isolation a read of many statements needs to see one snapshot.
    pub fn snapshot<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.transaction_as("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", f)
    }

    fn transaction_as<T>(&self, begin: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let level = self.begin(begin)?;
        let result = self.unless_panicking(f);
        self.end(level, result)
    }

    /// Runs `f`; if it panics, the session is abandoned (the server rolls its transaction
    /// back) before the panic goes on, so the connection is never left inside a transaction.
    pub fn unless_panicking<T>(&self, f: impl FnOnce() -> T) -> T {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(v) => v,
            Err(panic) => {
                self.abandon();
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Opens a transaction (or a savepoint inside one); `end` closes it.
    pub fn begin(&self, begin: &str) -> Result<Level> {
        let depth = self.depth.get();
        if depth == 0 {
            self.batch(begin)?;
        } else {
            self.batch(&format!("SAVEPOINT s{depth}"))?;
        }
        self.depth.set(depth + 1);
        Ok(Level(depth))
    }

    /// Commits what `begin` opened if `result` is a success, else rolls it back.
    pub fn end<T>(&self, level: Level, result: Result<T>) -> Result<T> {
        let depth = level.0;
        let (commit, rollback) = if depth == 0 {
            ("COMMIT".to_string(), "ROLLBACK".to_string())
        } else {
            (
                format!("RELEASE SAVEPOINT s{depth}"),
                format!("ROLLBACK TO SAVEPOINT s{depth}"),
            )
        };
        // Sent while still inside: a session lost meanwhile fails the COMMIT here. Were the
        // depth lowered first, the call would connect afresh, and a COMMIT on a new session
        // "succeeds" (a warning) while the transaction died with the old one.
        let result = result.and_then(|v| self.batch(&commit).map(|()| v));
        if result.is_err() {
            self.roll_back(&rollback);
        }
        // Back to the enclosing level, even after an abandoned session: the enclosing
        // transaction's next statement then fails instead of running outside it.
        self.depth.set(depth);
        result
    }

    /// Rolls back on the same session only: a lost connection took its transaction with it,
    /// and a new one has nothing to roll back.
    fn roll_back(&self, sql: &str) {
        let connected = self
            .client
            .borrow()
            .as_ref()
            .is_some_and(|c| !c.is_closed());
        if !connected || self.batch(sql).is_err() {
            self.abandon();
        }
    }

    /// Forgets the session (the server rolls back whatever it had open when it closes); the
    /// next call connects afresh.
    pub fn abandon(&self) {
        self.depth.set(0);
        if let Ok(mut c) = self.client.try_borrow_mut() {
            *c = None;
        }
        if let Ok(mut s) = self.statements.try_borrow_mut() {
            s.clear();
        }
    }
}

/// A parameter a pipelined statement owns: it outlives the call that sent it.
pub type Owned = Box<dyn ToSql + Sync + Send>;

type Answer<'c> =
    Pin<Box<dyn Future<Output = std::result::Result<u64, tokio_postgres::Error>> + 'c>>;

/// Statements sent one after another without waiting for their answers: the server works
/// through them while this thread builds the next one. `PgConn::pipelined` collects the
/// answers, in order; the first error is the pipeline's (in a transaction, the statements
/// after a failed one fail too, and the transaction is rolled back).
pub struct Pipeline<'c> {
    conn: &'c PgConn,
    client: &'c Client,
    waiting: Vec<Answer<'c>>,
    answered: Vec<Result<u64>>,
}

impl<'c> Pipeline<'c> {
    /// Sends `sql` (one of the pipeline's statements) now; its answer is read when the
    /// pipeline ends.
    pub fn send(&mut self, sql: &str, params: Vec<Owned>) -> Result<()> {
        let Some(statement) = self.conn.statements.borrow().get(sql).cloned() else {
            return Err(StoreError::Postgres(format!(
                "a statement not prepared for this pipeline: {sql}"
            )));
        };
        let client = self.client;
        let mut answer: Answer<'c> =
            Box::pin(async move { client.execute_raw(&statement, params).await });
        // The first poll writes the request to the connection's thread, which sends it.
        match poll_once(answer.as_mut()) {
            Poll::Ready(r) => self.answered.push(r.map_err(pg_error)),
            Poll::Pending => self.waiting.push(answer),
        }
        Ok(())
    }

    /// Polls every unanswered statement once, keeping the answers that came.
    fn read_answers(&mut self) {
        let mut still = Vec::with_capacity(self.waiting.len());
        for mut answer in self.waiting.drain(..) {
            match poll_once(answer.as_mut()) {
                Poll::Ready(r) => self.answered.push(r.map_err(pg_error)),
                Poll::Pending => still.push(answer),
            }
        }
        self.waiting = still;
    }

    /// Waits for every answer; the first error, if any.
    fn finish(mut self) -> Result<()> {
        while !self.waiting.is_empty() {
            self.read_answers();
            if !self.waiting.is_empty() {
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
        self.answered
            .into_iter()
            .find(|r| r.is_err())
            .unwrap_or(Ok(0))
            .map(drop)
    }
}

/// Polls `f` once with a waker that unparks this thread.
fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    f.poll(&mut Context::from_waker(&waker))
}

/// An open transaction's (or savepoint's) nesting depth.
#[must_use]
pub struct Level(u32);
