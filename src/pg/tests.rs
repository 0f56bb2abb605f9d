//! The PostgreSQL store against a real server (`CHAINWATCH_TEST_PG_URL`; see testkit::postgres).

use std::time::Duration;

use bitcoin::hashes::Hash;
use bitcoin::BlockHash;

use super::{Fence, PgStore};
use crate::changeset::ChangeSet;
use crate::event::{other_event, ALERT_REORG};
use crate::store::{
    AdminStore, AttemptOutcome, ChainStore, DeliveryResult, OutboxStore, StoreError,
};
use crate::testkit::postgres::fresh_database;
use crate::tip::{TipChange, TipChanges};

const CONFIG: &str = "[[endpoints]]\nname = \"shop\"\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"*\"]\n\n[[endpoints]]\nname = \"ledger\"\nurl = \"http://127.0.0.1:9/l\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"*\"]\nordered = true\n";

struct Db {
    url: String,
    key: tempfile::TempDir,
}

impl Db {
    fn new(test: &str) -> Option<Db> {
        Some(Db {
            url: fresh_database(test)?,
            key: tempfile::tempdir().unwrap(),
        })
    }

    fn open(&self, instance: &str) -> PgStore {
        let mut store = PgStore::open(&self.url, &self.key.path().join("audit.key"), instance)
            .expect("opening the PostgreSQL store");
        let cfg = crate::config::Config::parse(CONFIG, "test", None).unwrap();
        store.sync_endpoints(&cfg.endpoints).unwrap();
        store.check_network("regtest").unwrap();
        store
    }
}

fn hash(n: u8) -> BlockHash {
    BlockHash::from_byte_array([n; 32])
}

/// Block `height` has hash `height + 1` (the first, at 0, is `init`'s).
fn connect(height: u32) -> ChangeSet {
    let block = crate::event::BlockRef {
        hash: hash(height as u8 + 1),
        height,
        time: 1_700_000_000 + height,
    };
    ChangeSet {
        tip: TipChanges(vec![TipChange::Connect {
            block,
            prev: hash(height as u8),
            tx_count: 1,
        }]),
        ..ChangeSet::events(alerts(&format!("block-{height}"), 1))
    }
}

fn alerts(tag: &str, n: usize) -> Vec<crate::event::NewEvent> {
    (0..n)
        .map(|i| {
            let f = serde_json::json!({ "i": i }).as_object().unwrap().clone();
            other_event(ALERT_REORG, &format!("{tag}-{i}"), "regtest", f)
        })
        .collect()
}

fn delivered(at: i64) -> AttemptOutcome {
    AttemptOutcome {
        started_at_ms: at,
        duration_ms: 1,
        status_code: Some(204),
        error: None,
        response_excerpt: None,
        result: DeliveryResult::Delivered,
    }
}

fn init(store: &mut PgStore) {
    let first = crate::store::StoredBlock {
        hash: hash(1),
        height: 0,
        prev: BlockHash::all_zeros(),
        time: 1_700_000_000,
        tx_count: None,
    };
    store.init_tip(first).unwrap();
}

#[test]
fn chain_steps_commit_with_their_events_and_the_log_verifies() {
    let Some(db) = Db::new("chain_steps") else {
        return;
    };
    let mut store = db.open("a");
    init(&mut store);
    let one = ChainStore::commit(&mut store, &connect(1), 1_000).unwrap();
    let two = ChainStore::commit(&mut store, &connect(2), 2_000).unwrap();
    assert_eq!(
        (one[0].seq, two[0].seq),
        (1, 2),
        "sequences start at 1, one apart"
    );
    assert_eq!(ChainStore::tip(&store).unwrap().unwrap().height, 2);
    let wrong = ChainStore::commit(&mut store, &connect(1), 3_000);
    assert!(
        matches!(wrong, Err(StoreError::TipMismatch(_))),
        "a block not on the tip is refused: {wrong:?}"
    );
    let report = store.audit().unwrap();
    assert_eq!(
        (report.verified, report.problem),
        (2, None),
        "the keyed chain verifies"
    );
    let events = store.events_after(0, 10).unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        events[1].body.contains("\"sequence\":2"),
        "{}",
        events[1].body
    );
    let pending = store.list_deliveries(None, Some("shop"), 10).unwrap();
    assert_eq!(pending.len(), 2, "one delivery per event for each endpoint");
    // The same step again (a replay after a crash) records nothing twice.
    let again = store.reopen().unwrap();
    assert_eq!(again.events_after(0, 10).unwrap().len(), 2);
}

#[test]
fn a_commit_sent_down_the_pipeline_is_all_or_nothing_and_its_chunks_chain() {
    let Some(db) = Db::new("pipelined") else {
        return;
    };
    let mut store = db.open("a");
    init(&mut store);
    let big = ChangeSet {
        events: alerts("big", 600),
        ..connect(1)
    };
    // A statement that fails on the server part way down the pipeline: the deliveries of the
    // second chunk of events, sent after two chunks of events and the first deliveries.
    store
        .conn
        .batch(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN IF NEW.event_seq > 300 THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON deliveries FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .unwrap();
    let failed = ChainStore::commit(&mut store, &big, 1_000);
    assert!(
        matches!(&failed, Err(StoreError::Postgres(m)) if m.contains("refused by the test")),
        "the server's error is the commit's: {:?}",
        failed.as_ref().map(|e| e.len())
    );
    assert_eq!(
        store.events_after(0, 1000).unwrap().len(),
        0,
        "no event of the failed commit stays"
    );
    assert_eq!(
        ChainStore::tip(&store).unwrap().unwrap().height,
        0,
        "nor its tip"
    );
    store
        .conn
        .batch("DROP TRIGGER refuse ON deliveries")
        .unwrap();
    let done = ChainStore::commit(&mut store, &big, 2_000).expect("the same session commits it");
    let seqs: Vec<i64> = done.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=600).collect::<Vec<_>>(),
        "600 events, in order, none lost between chunks"
    );
    assert_eq!(
        store
            .list_deliveries(None, Some("ledger"), 1000)
            .unwrap()
            .len(),
        600,
        "a delivery of every event for each endpoint"
    );
    let report = store.audit().unwrap();
    assert_eq!(
        (report.verified, report.problem),
        (600, None),
        "the keyed chain verifies across the chunks"
    );
}

#[test]
fn a_deposed_leader_writes_nothing() {
    let Some(db) = Db::new("deposed") else {
        return;
    };
    let (a, b) = (db.open("a"), db.open("b"));
    let lease = Duration::from_millis(400);
    let epoch_a = a
        .try_lead("a", lease)
        .unwrap()
        .expect("a free lease is taken");
    assert_eq!(
        b.try_lead("b", lease).unwrap(),
        None,
        "a live lease is not taken"
    );
    assert_eq!(
        a.try_lead("a", lease).unwrap(),
        Some(epoch_a),
        "renewing keeps the epoch"
    );
    let mut leader = a.fenced(Fence {
        holder: "a".into(),
        epoch: epoch_a,
    });
    init(&mut leader);
    ChainStore::commit(&mut leader, &connect(1), 1_000).unwrap();
    std::thread::sleep(lease + Duration::from_millis(100));
    let epoch_b = b
        .try_lead("b", lease)
        .unwrap()
        .expect("an expired lease is taken");
    assert_eq!(epoch_b, epoch_a + 1, "a new holder is a new epoch");
    let refused = ChainStore::commit(&mut leader, &connect(2), 2_000);
    assert!(
        matches!(refused, Err(StoreError::Fenced(_))),
        "the deposed leader's step is refused: {refused:?}"
    );
    assert_eq!(
        ChainStore::tip(&b).unwrap().unwrap().height,
        1,
        "and nothing of it was written"
    );
    assert_eq!(b.events_after(0, 10).unwrap().len(), 1);
    assert_eq!(
        a_lease(&b),
        ("b".to_string(), epoch_b),
        "the lease is the new leader's"
    );
}

fn a_lease(store: &PgStore) -> (String, i64) {
    let l = store.lease().unwrap().unwrap();
    (l.holder, l.epoch)
}

#[test]
fn instances_claim_disjoint_deliveries_and_a_dead_ones_claims_return() {
    let Some(db) = Db::new("claims") else {
        return;
    };
    let (mut a, mut b) = (db.open("a"), db.open("b"));
    a.set_claim(Duration::from_millis(500));
    b.set_claim(Duration::from_millis(500));
    OutboxStore::commit(&mut a, &ChangeSet::events(alerts("x", 10)), 1_000).unwrap();
    let by_a = a.due_deliveries("shop", 5_000, false, 6, &[]).unwrap();
    let by_b = b.due_deliveries("shop", 5_000, false, 10, &[]).unwrap();
    let seqs = |d: &[crate::store::DueDelivery]| d.iter().map(|d| d.event_seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(&by_a),
        vec![1, 2, 3, 4, 5, 6],
        "a claims the oldest six"
    );
    assert_eq!(
        seqs(&by_b),
        vec![7, 8, 9, 10],
        "b gets only what a did not claim"
    );
    // a dies with its claims; once they run out, b sends them.
    std::thread::sleep(Duration::from_millis(600));
    let done: Vec<_> = by_b.into_iter().map(|d| (d, delivered(5_000))).collect();
    b.record_attempts("shop", &done).unwrap();
    let returned = b.due_deliveries("shop", 6_000, false, 10, &[]).unwrap();
    assert_eq!(
        seqs(&returned),
        vec![1, 2, 3, 4, 5, 6],
        "a's claims came back"
    );
    // An ordered endpoint is one instance's at a time.
    let head = a.due_deliveries("ledger", 6_000, true, 1, &[]).unwrap();
    assert_eq!(seqs(&head), vec![1], "a serves the ordered endpoint's head");
    assert!(
        b.due_deliveries("ledger", 6_000, true, 1, &[])
            .unwrap()
            .is_empty(),
        "b may not serve it meanwhile"
    );
    assert_eq!(
        b.next_due("ledger", true).unwrap(),
        None,
        "nor wake up for it: it is a's to serve"
    );
    assert!(
        a.next_due("ledger", true).unwrap().is_some(),
        "a still sees its head"
    );
}

#[test]
fn instances_opening_a_new_database_together_all_get_in() {
    let Some(db) = Db::new("racing") else {
        return;
    };
    let db = std::sync::Arc::new(db);
    let openers: Vec<_> = (0..4)
        .map(|i| {
            let db = db.clone();
            std::thread::spawn(move || {
                PgStore::open(&db.url, &db.key.path().join("audit.key"), &format!("i{i}"))
                    .map(|_| ())
            })
        })
        .collect();
    for o in openers {
        o.join().unwrap().expect("every opener gets in");
    }
}

#[test]
fn a_worker_gets_only_what_it_can_send_and_never_its_own_in_flight_rows() {
    let Some(db) = Db::new("in_flight") else {
        return;
    };
    let (mut a, mut b) = (db.open("a"), db.open("b"));
    OutboxStore::commit(&mut a, &ChangeSet::events(alerts("y", 5)), 1_000).unwrap();
    let seqs = |d: &[crate::store::DueDelivery]| d.iter().map(|d| d.event_seq).collect::<Vec<_>>();
    let ids = |d: &[crate::store::DueDelivery]| d.iter().map(|d| d.delivery_id).collect::<Vec<_>>();
    let first = a.due_deliveries("shop", 5_000, false, 2, &[]).unwrap();
    assert_eq!(seqs(&first), vec![1, 2]);
    let more = a
        .due_deliveries("shop", 5_000, false, 2, &ids(&first))
        .unwrap();
    assert_eq!(
        seqs(&more),
        vec![3, 4],
        "the rows in flight are not handed out again, and no more than asked are claimed"
    );
    assert_eq!(
        seqs(&b.due_deliveries("shop", 5_000, false, 10, &[]).unwrap()),
        vec![5],
        "the rest is free for another instance"
    );
    let head = a.due_deliveries("ledger", 5_000, true, 1, &[]).unwrap();
    assert_eq!(seqs(&head), vec![1]);
    assert!(
        a.due_deliveries("ledger", 5_000, true, 1, &ids(&head))
            .unwrap()
            .is_empty(),
        "an ordered endpoint whose head is in flight gives nothing"
    );
}

#[test]
fn retention_prunes_old_rows_from_the_front_and_the_log_still_verifies() {
    use crate::store::{RetentionPolicy, RetentionStore};
    let Some(db) = Db::new("retention") else {
        return;
    };
    const DAY: i64 = 86_400_000;
    let mut a = db.open("a");
    OutboxStore::commit(&mut a, &ChangeSet::events(alerts("old", 10)), DAY).unwrap();
    for endpoint in ["shop", "ledger"] {
        let ordered = endpoint == "ledger";
        loop {
            let due = a.due_deliveries(endpoint, DAY, ordered, 10, &[]).unwrap();
            if due.is_empty() {
                break;
            }
            let done: Vec<_> = due.into_iter().map(|d| (d, delivered(DAY))).collect();
            a.record_attempts(endpoint, &done).unwrap();
        }
    }
    OutboxStore::commit(&mut a, &ChangeSet::events(alerts("new", 5)), 40 * DAY).unwrap();
    let policy = RetentionPolicy {
        attempts: Duration::from_secs(30 * 86_400),
        events: Some(Duration::from_secs(30 * 86_400)),
    };
    let pruned = a.prune_batch(&policy, 40 * DAY + 1, 500).unwrap();
    assert_eq!(
        (pruned.attempts, pruned.deliveries, pruned.events),
        (20, 20, 10),
        "the old attempts, delivered rows and events go; the new ones stay"
    );
    let left = a.events_after(0, 100).unwrap();
    assert_eq!(
        left.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![11, 12, 13, 14, 15]
    );
    let report = a.audit().unwrap();
    assert_eq!(
        (report.verified, report.problem),
        (5, None),
        "the rest chains from the keyed checkpoint"
    );
    assert_eq!(a.audit_checkpoint().unwrap(), Some(10));
    assert!(
        a.prune_batch(&policy, 40 * DAY + 1, 500)
            .unwrap()
            .is_empty(),
        "nothing more to prune: new events wait for their deliveries and their age"
    );
}

#[test]
fn a_session_lost_before_its_commit_fails_the_commit_instead_of_reconnecting_into_success() {
    let Some(db) = Db::new("lost_session") else {
        return;
    };
    let (conn, other) = (
        super::PgConn::open(&db.url).unwrap(),
        super::PgConn::open(&db.url).unwrap(),
    );
    conn.batch("CREATE TABLE t (x BIGINT)").unwrap();
    let pid: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let r = conn.transaction(|| {
        conn.execute("INSERT INTO t VALUES (1)", &[])?;
        // The server ends the session (as its idle-in-transaction timeout or a restart would).
        other.execute("SELECT pg_terminate_backend($1)", &[&pid])?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    });
    assert!(r.is_err(), "the commit of a lost session fails: {r:?}");
    let rows: i64 = other
        .query_one("SELECT count(*) FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "and nothing of it was written");
    conn.execute("INSERT INTO t VALUES (2)", &[])
        .expect("outside a transaction, the next call connects afresh");
}
