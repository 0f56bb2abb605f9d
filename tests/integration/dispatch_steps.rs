//! A delivery worker's store steps run beside its requests. On a store whose steps take as long
//! as PostgreSQL's, a failure that lands while a step plans must still count against the
//! endpoint: one probe per back-off step, and no second burst into an endpoint that just
//! started refusing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use chainwatch::changeset::ChangeSet;
use chainwatch::dispatch::{self, Clock};
use chainwatch::store::{
    AttemptOutcome, CommittedEvent, DueDelivery, EndpointState, OutboxStore, Store, StoreError,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The SQLite store, its plans changed as a test needs.
struct Plans(Store, Planning);

enum Planning {
    /// Every plan as slow as a few round trips to a remote database.
    Slow,
    /// Plans find nothing due: only what a commit hands off is ever sent.
    Blind,
    /// As the store has it.
    AsStored,
}

const PLAN_TAKES: Duration = Duration::from_millis(30);

impl OutboxStore for Plans {
    fn network(&self) -> Result<String, StoreError> {
        OutboxStore::network(&self.0)
    }
    fn wants(&self, kind: &str) -> bool {
        OutboxStore::wants(&self.0, kind)
    }
    fn due_deliveries(
        &mut self,
        endpoint: &str,
        now_ms: i64,
        ordered: bool,
        limit: u32,
        in_flight: &[i64],
    ) -> Result<Vec<DueDelivery>, StoreError> {
        match self.1 {
            Planning::Blind => Ok(vec![]),
            _ => OutboxStore::due_deliveries(
                &mut self.0,
                endpoint,
                now_ms,
                ordered,
                limit,
                in_flight,
            ),
        }
    }
    fn next_due(&self, endpoint: &str, ordered: bool) -> Result<Option<i64>, StoreError> {
        match self.1 {
            Planning::Blind => Ok(None),
            _ => OutboxStore::next_due(&self.0, endpoint, ordered),
        }
    }
    fn record_attempts(
        &mut self,
        endpoint: &str,
        done: &[(DueDelivery, AttemptOutcome)],
    ) -> Result<(), StoreError> {
        OutboxStore::record_attempts(&mut self.0, endpoint, done)
    }
    fn endpoint_state(&self, name: &str) -> Result<EndpointState, StoreError> {
        // A plan reads the endpoint's state first: the attempts in flight finish meanwhile.
        if let Planning::Slow = self.1 {
            std::thread::sleep(PLAN_TAKES);
        }
        OutboxStore::endpoint_state(&self.0, name)
    }
    fn set_endpoint_backoff(
        &mut self,
        name: &str,
        step: u32,
        until: Option<i64>,
    ) -> Result<(), StoreError> {
        OutboxStore::set_endpoint_backoff(&mut self.0, name, step, until)
    }
    fn set_failing_alerted(&mut self, name: &str) -> Result<(), StoreError> {
        OutboxStore::set_failing_alerted(&mut self.0, name)
    }
    fn commit(
        &mut self,
        changes: &ChangeSet,
        now_ms: i64,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        OutboxStore::commit(&mut self.0, changes, now_ms)
    }
    fn atomically<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // Not one transaction here: this test counts attempts, and nothing in it fails.
        f(self)
    }
}

/// Attempts made in 2 s by a worker (concurrency 16) whose endpoint refuses connections, with
/// 50 events queued, the clock frozen (a back-off's wait never ends), and wake-ups every 2 ms
/// (events committed for other endpoints wake every worker).
async fn attempts_against_a_refusing_endpoint(backing_off: bool) -> i64 {
    let url = format!("http://{}/hooks", chainwatch::testkit::refusing_address());
    attempts_in_two_seconds(&url, true, |store| {
        if backing_off {
            // On back-off step 1, its wait over: what is sent next is one probe.
            OutboxStore::set_endpoint_backoff(store, "shop", 1, Some(T0 - 1)).unwrap();
        }
    })
    .await
}

/// As above, to the endpoint at `url`, with the store set up by `prepare` first; without the
/// wake-ups unless `waking`.
async fn attempts_in_two_seconds(url: &str, waking: bool, prepare: impl FnOnce(&mut Store)) -> i64 {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ConfigBuilder::default().data_dir(dir.path());
    config.endpoints = vec![Endpoint::new("shop", url)
        .secret(SECRET)
        .events(["*"])
        .ordered(false)
        .concurrency(16)
        .retry_schedule(["60s", "60s", "60s", "60s"])];
    let cfg = config.parse().unwrap();
    let mut store = Store::open(&cfg.data_dir).unwrap();
    store.check_network("regtest").unwrap();
    store.sync_endpoints(&cfg.endpoints).unwrap();
    let events = chainwatch::testkit::sample_events(50, "p");
    OutboxStore::commit(&mut store, &ChangeSet::events(events), T0).unwrap();
    prepare(&mut store);
    let now = Arc::new(AtomicI64::new(T0));
    let clock: Clock = Arc::new(move || now.load(Ordering::SeqCst));
    let (wake, token) = (Arc::new(Notify::new()), CancellationToken::new());
    let ctx = dispatch::Context {
        clock,
        ..dispatch::Context::new(wake.clone(), token.clone())
    };
    let worker = tokio::spawn(dispatch::run_endpoint(
        cfg.endpoints[0].clone(),
        Plans(Store::open(dir.path()).unwrap(), Planning::Slow),
        ctx,
    ));
    let waker = waking.then(|| keep_waking(&wake, &token, Duration::from_millis(2)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    token.cancel();
    worker.await.unwrap();
    if let Some(waker) = waker {
        waker.await.unwrap();
    }
    let db = rusqlite::Connection::open(chainwatch::store::db_path(dir.path())).unwrap();
    db.query_row("SELECT count(*) FROM attempts", [], |r| r.get(0))
        .unwrap()
}

/// Wakes the workers every `every` until `token` is cancelled, as commits for other endpoints
/// would.
fn keep_waking(
    wake: &Arc<Notify>,
    token: &CancellationToken,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let (wake, token) = (wake.clone(), token.clone());
    tokio::spawn(async move {
        while !token.is_cancelled() {
            wake.notify_waiters();
            tokio::time::sleep(every).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_backing_off_one_probe_is_sent_even_when_it_fails_during_a_slow_plan() {
    assert_eq!(
        attempts_against_a_refusing_endpoint(true).await,
        1,
        "one probe per back-off step: a failure not yet recorded still holds its slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_starts_refusing_gets_one_burst_not_two() {
    assert_eq!(
        attempts_against_a_refusing_endpoint(false).await,
        16,
        "the first 16 fail; the plan running meanwhile must not send 16 more before they are recorded"
    );
}

/// The first request answers 410 Gone at once and the other fifteen 204 a little later, while
/// the step that records the 410 (and disables the endpoint) is still planning: those fifteen
/// free their slots, but the claims waiting behind them must not go to an endpoint being
/// disabled. No wake-ups: a step that happened to be running when the 410 came would record
/// it later, with the fifteen, and the moment this test is about would not come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_claimed_ahead_is_sent_while_a_410_is_being_recorded() {
    let receiver = Receiver::start().await;
    receiver.set_reply(Reply::After(204, Duration::from_millis(15)));
    receiver.push(Reply::Status(410));
    let attempts = attempts_in_two_seconds(&receiver.url, false, |_| {}).await;
    assert_eq!(
        receiver.count(),
        16,
        "the first 16 requests only: the endpoint is disabled after them"
    );
    assert_eq!(attempts, 16, "and those 16 recorded");
}

/// Two instances' stores on one fresh PostgreSQL database, and one endpoint ("shop",
/// unordered, concurrency 1) at `receiver`, whose claims last `claim`.
struct SharedOutbox {
    url: String,
    cfg: chainwatch::config::Config,
    dir: tempfile::TempDir,
    claim: Duration,
}

impl SharedOutbox {
    fn new(slug: &str, receiver: &Receiver, timeout: &str, claim: Duration) -> Option<Self> {
        let url = chainwatch::testkit::postgres::fresh_database(slug)?;
        let dir = tempfile::tempdir().unwrap();
        let mut config = ConfigBuilder::default().data_dir(dir.path());
        config.endpoints = vec![Endpoint::new("shop", &receiver.url)
            .secret(SECRET)
            .events(["*"])
            .ordered(false)
            .concurrency(1)
            .timeout(timeout)];
        let cfg = config.parse().unwrap();
        Some(SharedOutbox {
            url,
            cfg,
            dir,
            claim,
        })
    }

    fn open(&self, instance: &str) -> chainwatch::pg::PgStore {
        let key = self.dir.path().join("audit.key");
        let mut s = chainwatch::pg::PgStore::open(&self.url, &key, instance).unwrap();
        s.check_network("regtest").unwrap();
        s.sync_endpoints(&self.cfg.endpoints).unwrap();
        s.set_claim(self.claim);
        s
    }

    /// Opens instance `a` and queues `n` events with it.
    fn first_with_events(&self, n: usize, tag: &str) -> chainwatch::pg::PgStore {
        let mut first = self.open("a");
        let events = chainwatch::testkit::sample_events(n, tag);
        let now = chainwatch::daemon::now_ms();
        OutboxStore::commit(&mut first, &ChangeSet::events(events), now).unwrap();
        first
    }

    fn start(
        &self,
        store: chainwatch::pg::PgStore,
        token: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let ctx = dispatch::Context::new(Arc::new(Notify::new()), token.clone());
        tokio::spawn(dispatch::run_endpoint(
            self.cfg.endpoints[0].clone(),
            store,
            ctx,
        ))
    }
}

/// Each of the three sample events the receiver got, and each once.
fn sent_once_each(receiver: &Receiver) {
    let ids: Vec<String> = receiver.all().iter().map(|c| c.id.clone()).collect();
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3, "all three events sent: {ids:?}");
    assert_eq!(ids.len(), 3, "and each once: {ids:?}");
}

/// Two instances share a PostgreSQL outbox, and one claims more ahead than it can send before
/// its claims run out (concurrency 1, every request held 1.7 s). A claim that waited longer
/// than 2 s for a slot must be given back and claimed again: sent as it was, it would still
/// be in flight when its claim ran out, and the other instance would send it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_waited_too_long_is_given_back_and_sent_once() {
    let receiver = Receiver::start().await;
    receiver.set_hang(Duration::from_millis(1_700));
    // A claim shorter than the daemon's (timeout + 5 s), so the test is quick; still longer
    // than a claim may wait (2 s) and its request then take (1.7 s).
    let claim = Duration::from_millis(4_100);
    let Some(outbox) = SharedOutbox::new("claim_ahead", &receiver, "3s", claim) else {
        return;
    };
    let first = outbox.first_with_events(3, "c");
    let token = CancellationToken::new();
    // The first instance claims all three (one slot, two ahead) before the second starts.
    let a = outbox.start(first, &token);
    wait_until("the first request under way", WAIT, || {
        receiver.count() >= 1
    })
    .await;
    let b = outbox.start(outbox.open("b"), &token);
    wait_until("three requests", WAIT, || receiver.count() >= 3).await;
    // Sent when it waited 3.4 s, the third would still be in flight when its claim ran out
    // (4.1 s after the start), and the second instance, which looks every second, would claim
    // it before the first recorded it (5.1 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    token.cancel();
    a.await.unwrap();
    b.await.unwrap();
    sent_once_each(&receiver);
}

/// An instance that stops gives back what it claimed ahead and never sent: the other instance
/// sends those at once, not when the claims run out (here a minute, so waiting for it would
/// fail the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stops_gives_back_its_unsent_claims() {
    let receiver = Receiver::start().await;
    receiver.set_hang(Duration::from_millis(500));
    let claim = Duration::from_secs(60);
    let Some(outbox) = SharedOutbox::new("claims_released", &receiver, "10s", claim) else {
        return;
    };
    let first = outbox.first_with_events(3, "r");
    // One request in flight and two claimed ahead when the first instance is told to stop.
    let (token_a, token_b) = (CancellationToken::new(), CancellationToken::new());
    let a = outbox.start(first, &token_a);
    wait_until("the first request under way", WAIT, || {
        receiver.count() >= 1
    })
    .await;
    token_a.cancel();
    let b = outbox.start(outbox.open("b"), &token_b);
    a.await.unwrap();
    wait_until(
        "the other instance sends the two given back",
        Duration::from_secs(15),
        || receiver.count() >= 3,
    )
    .await;
    token_b.cancel();
    b.await.unwrap();
    sent_once_each(&receiver);
}

/// One endpoint ("shop", ordered, as by default) at a receiver, a worker for it with a mailbox,
/// and a store whose commits hand deliveries off to that mailbox (as the daemon's follower
/// does on SQLite).
struct HandingOff {
    dir: tempfile::TempDir,
    ep: chainwatch::config::EndpointConfig,
    store: Store,
    handoff: Arc<chainwatch::store::Handoff>,
    wake: Arc<Notify>,
    token: CancellationToken,
}

impl HandingOff {
    fn new(receiver: &Receiver) -> HandingOff {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ConfigBuilder::default().data_dir(dir.path());
        config.endpoints = vec![Endpoint::new("shop", &receiver.url)
            .secret(SECRET)
            .events(["*"])];
        let cfg = config.parse().unwrap();
        let mut store = Store::open(&cfg.data_dir).unwrap();
        store.check_network("regtest").unwrap();
        store.sync_endpoints(&cfg.endpoints).unwrap();
        let handoff = Arc::new(chainwatch::store::Handoff::new(["shop"]));
        store.hand_off_to(handoff.clone());
        HandingOff {
            dir,
            ep: cfg.endpoints[0].clone(),
            store,
            handoff,
            wake: Arc::new(Notify::new()),
            token: CancellationToken::new(),
        }
    }

    fn mailbox(&self) -> Arc<chainwatch::store::Mailbox> {
        self.handoff.mailbox("shop").unwrap()
    }

    /// Starts the worker and waits for its first store step to finish (a commit before that
    /// is handed off too late to be taken).
    async fn start(&self, planning: Planning) -> tokio::task::JoinHandle<()> {
        let ctx = dispatch::Context {
            handoff: self.handoff.clone(),
            ..dispatch::Context::new(self.wake.clone(), self.token.clone())
        };
        let store = Plans(Store::open(self.dir.path()).unwrap(), planning);
        let worker = tokio::spawn(dispatch::run_endpoint(self.ep.clone(), store, ctx));
        let mailbox = self.mailbox();
        wait_until("the worker's first step", WAIT, || mailbox.steps() >= 1).await;
        worker
    }

    fn commit(&mut self, tag: &str) -> CommittedEvent {
        let events = chainwatch::testkit::sample_events(1, tag);
        let now = chainwatch::daemon::now_ms();
        let committed = OutboxStore::commit(&mut self.store, &ChangeSet::events(events), now);
        committed.unwrap().remove(0)
    }

    async fn delivered(&self, n: i64) {
        let db = rusqlite::Connection::open(chainwatch::store::db_path(self.dir.path())).unwrap();
        wait_until(&format!("{n} recorded as delivered"), WAIT, || {
            db.query_row(
                "SELECT count(*) FROM deliveries WHERE status = 'delivered'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
                == n
        })
        .await;
    }

    async fn stop(self, worker: tokio::task::JoinHandle<()>) {
        self.token.cancel();
        worker.await.unwrap();
    }
}

/// A payment's delivery, alone in its queue, goes from the commit that wrote it straight to the
/// request: the worker's plans here never find anything due, so it arrives only if handed off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_alone_in_its_queue_is_sent_by_its_commit_without_a_plan() {
    let receiver = Receiver::start().await;
    let mut h = HandingOff::new(&receiver);
    let worker = h.start(Planning::Blind).await;
    let event = h.commit("alone");
    assert!(event.handed_off, "the commit handed its one delivery off");
    let got = receiver.wait_accepted(1, WAIT).await;
    assert_eq!(
        got[0].id, event.id,
        "the committed event, sent as it was handed off"
    );
    assert_eq!(got[0].kind(), event.kind);
    h.delivered(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count(), 1, "sent once");
    h.stop(worker).await;
}

/// A delivery handed off by a commit that began before one of the worker's steps finished may
/// already have been claimed, sent and recorded by that step: it must not be sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_handed_off_after_a_step_claimed_it_is_not_sent_again() {
    let receiver = Receiver::start().await;
    let h = HandingOff::new(&receiver);
    // Written by another connection, so only a step can find it.
    let mut plain = Store::open(h.dir.path()).unwrap();
    let now = chainwatch::daemon::now_ms();
    let events = chainwatch::testkit::sample_events(1, "claimed");
    OutboxStore::commit(&mut plain, &ChangeSet::events(events), now).unwrap();
    let due = OutboxStore::due_deliveries(&mut plain, "shop", now, true, 1, &[]).unwrap();
    let before = h.mailbox().steps();
    let worker = h.start(Planning::Slow).await;
    receiver.wait_accepted(1, WAIT).await;
    h.delivered(1).await;
    // As a commit that read the step count before the worker's steps would hand it off.
    h.mailbox().put(due[0].clone(), before);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.count(), 1, "a late hand-off is left to the store");
    h.stop(worker).await;
}

/// Payments committed a few milliseconds apart while wake-ups start steps all the time, so
/// hand-offs and the steps' own claims race: each is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_handed_off_while_steps_run_are_each_sent_once() {
    let receiver = Receiver::start().await;
    let mut h = HandingOff::new(&receiver);
    let worker = h.start(Planning::AsStored).await;
    let waker = keep_waking(&h.wake, &h.token, Duration::from_millis(1));
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(h.commit(&format!("race-{i}")).id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    h.delivered(30).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent: Vec<String> = receiver.all().iter().map(|c| c.id.clone()).collect();
    assert_eq!(
        sent, ids,
        "each payment once, in the order committed (ordered endpoint)"
    );
    h.stop(worker).await;
    waker.await.unwrap();
}
