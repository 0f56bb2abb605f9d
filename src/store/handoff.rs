//! Deliveries handed from the commit that wrote them straight to their endpoint's worker, so a
//! payment's webhook does not wait for the worker to read back what was just written (about
//! half a millisecond on SQLite: the reading connection finds its page cache stale after
//! another connection's commit).
//!
//! The commit hands off a delivery only when it is alone in its endpoint's queue and the
//! endpoint is enabled and not backing off, read inside the commit's transaction: then nothing
//! can be owed before it, ordered or not. Only a store without claims (SQLite, one instance)
//! hands off. The worker takes a delivery handed to it only if none of its own store steps
//! finished since the commit began: a step that finished later may have claimed the delivery
//! itself, and taking it again could send it twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::Notify;

use super::DueDelivery;

/// One endpoint's deliveries handed off, and the count of its worker's finished store steps.
#[derive(Default)]
pub struct Mailbox {
    items: Mutex<Vec<(DueDelivery, u64)>>,
    arrived: Notify,
    steps: AtomicU64,
}

impl Mailbox {
    /// Said by the worker whenever a store step of its finishes, before it takes the step's
    /// claims in.
    pub fn step_finished(&self) {
        self.steps.fetch_add(1, Ordering::SeqCst);
    }

    /// Read by a commit before its transaction begins.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    /// Hands `delivery` to the worker; `steps` is what `steps()` said before the commit began.
    pub fn put(&self, delivery: DueDelivery, steps: u64) {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((delivery, steps));
        // A permit is kept if the worker is not waiting right now.
        self.arrived.notify_one();
    }

    /// What was handed off since the last call: the deliveries the worker may still send
    /// directly, and whether others came too late for that (a step finished since their commit
    /// began; the next step finds them in the store).
    pub fn take(&self) -> (Vec<DueDelivery>, bool) {
        let items = std::mem::take(&mut *self.items.lock().unwrap_or_else(|p| p.into_inner()));
        let now = self.steps();
        let mut late = false;
        let mut fresh = Vec::with_capacity(items.len());
        for (d, steps) in items {
            match steps == now {
                true => fresh.push(d),
                false => late = true,
            }
        }
        (fresh, late)
    }

    /// Resolves when something was handed off (at once if it was while nobody waited).
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }
}

/// An endpoint as a commit found it before its transaction began: its name, and its mailbox
/// with the mailbox's step count then, if it has one.
pub(crate) type BeforeCommit<'a> = (&'a str, Option<(Arc<Mailbox>, u64)>);

/// Every endpoint's mailbox. An endpoint without one (the default: none) is never handed
/// anything, and its worker is woken as before.
#[derive(Default)]
pub struct Handoff {
    boxes: HashMap<String, Arc<Mailbox>>,
}

impl Handoff {
    pub fn new<'a>(endpoints: impl IntoIterator<Item = &'a str>) -> Handoff {
        Handoff {
            boxes: endpoints
                .into_iter()
                .map(|name| (name.to_string(), Arc::default()))
                .collect(),
        }
    }

    pub fn mailbox(&self, endpoint: &str) -> Option<Arc<Mailbox>> {
        self.boxes.get(endpoint).cloned()
    }

    /// The mailbox of each of `endpoints` that has one, with its step count now (read before
    /// a commit begins).
    pub(crate) fn before_commit<'a>(
        &self,
        endpoints: impl Iterator<Item = &'a str>,
    ) -> Vec<BeforeCommit<'a>> {
        endpoints
            .map(|name| {
                let mailbox = self.boxes.get(name).map(|m| (m.clone(), m.steps()));
                (name, mailbox)
            })
            .collect()
    }
}

/// What a commit hands off, worked out inside its transaction and sent once it is committed.
#[derive(Default)]
pub(crate) struct Handed {
    deliveries: Vec<(Arc<Mailbox>, DueDelivery, u64)>,
    /// Every delivery the commit wrote is among them.
    pub(crate) all: bool,
}

impl Handed {
    pub(crate) fn send(self) {
        for (mailbox, d, steps) in self.deliveries {
            mailbox.put(d, steps);
        }
    }
}

/// Finds, inside a commit's transaction, the deliveries it wrote (events from `first_seq` on)
/// that may go straight to their workers. `endpoints`: every endpoint deliveries are written
/// for, with its mailbox (if it has one) and the mailbox's step count read before the
/// transaction began.
pub(crate) fn hand_off(
    tx: &Connection,
    endpoints: &[BeforeCommit],
    first_seq: i64,
) -> super::Result<Handed> {
    let mut handed = Handed {
        deliveries: vec![],
        all: true,
    };
    for (name, mailbox) in endpoints {
        let new: Vec<i64> = tx
            .prepare_cached(
                "SELECT id FROM deliveries WHERE endpoint = ?1 AND status = 'pending'
                   AND event_seq >= ?2 ORDER BY event_seq LIMIT 2",
            )?
            .query_map(params![name, first_seq], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let alone = match (new.as_slice(), mailbox) {
            ([], _) => continue,
            ([id], Some(mailbox)) => alone_and_healthy(tx, name, *id)?.map(|d| (mailbox, d)),
            _ => None,
        };
        match alone {
            Some(((mailbox, steps), d)) => handed.deliveries.push((mailbox.clone(), d, *steps)),
            None => handed.all = false,
        }
    }
    Ok(handed)
}

/// Delivery `id` as it is to be sent, if nothing else is queued for `endpoint` and the
/// endpoint is enabled and not backing off.
fn alone_and_healthy(
    tx: &Connection,
    endpoint: &str,
    id: i64,
) -> super::Result<Option<DueDelivery>> {
    let others: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE endpoint = ?1
               AND status IN ('pending', 'failed') AND id <> ?2)",
        )?
        .query_row(params![endpoint, id], |r| r.get(0))?;
    let state = super::outbox::read_endpoint_state(tx, endpoint)?;
    if others || !state.enabled || state.backoff_step > 0 {
        return Ok(None);
    }
    Ok(tx
        .prepare_cached(
            "SELECT d.event_seq, e.id, e.type, e.body, d.attempts, e.created_at
               FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id = ?1",
        )?
        .query_row([id], |r| {
            Ok(DueDelivery {
                delivery_id: id,
                event_seq: r.get(0)?,
                event_id: r.get(1)?,
                kind: r.get(2)?,
                body: r.get(3)?,
                attempts: r.get(4)?,
                created_at: r.get(5)?,
            })
        })
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changeset::ChangeSet;
    use crate::store::{test_store, Store};
    use crate::testkit::sample_events;

    const T: i64 = 1_800_000_000_000;

    /// The test store (endpoint `shop`, every event, ordered), its commits handing off.
    fn handing_store(dir: &std::path::Path) -> (Store, Arc<Mailbox>) {
        let mut store = test_store(dir);
        let handoff = Arc::new(Handoff::new(["shop"]));
        store.hand_off_to(handoff.clone());
        (store, handoff.mailbox("shop").unwrap())
    }

    fn commit(store: &mut Store, n: usize, tag: &str) -> Vec<crate::store::CommittedEvent> {
        store
            .commit(&ChangeSet::events(sample_events(n, tag)), T)
            .unwrap()
    }

    #[test]
    fn a_delivery_alone_in_its_queue_is_handed_off_as_the_store_would_give_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mailbox) = handing_store(dir.path());
        let committed = commit(&mut store, 1, "a");
        assert!(committed[0].handed_off, "nobody needs waking for it");
        let (handed, late) = mailbox.take();
        assert!(!late);
        let read = store.due_deliveries("shop", T, true, 10).unwrap();
        assert_eq!(handed.len(), 1, "the one delivery written");
        assert_eq!(read.len(), 1);
        let (h, r) = (&handed[0], &read[0]);
        assert_eq!(
            (
                h.delivery_id,
                h.event_seq,
                &h.event_id,
                &h.kind,
                &h.body,
                h.attempts,
                h.created_at
            ),
            (
                r.delivery_id,
                r.event_seq,
                &r.event_id,
                &r.kind,
                &r.body,
                r.attempts,
                r.created_at
            ),
            "the delivery handed off is the one the worker would read"
        );
        assert_eq!(h.event_id, committed[0].id);

        // The first is still queued: the next must wait behind it (the endpoint is ordered).
        let committed = commit(&mut store, 1, "b");
        assert!(!committed[0].handed_off, "its worker must be woken");
        assert!(mailbox.take().0.is_empty(), "not alone in its queue");
    }

    #[test]
    fn nothing_is_handed_off_from_a_busy_unhealthy_or_nested_commit() {
        type Case = (
            &'static str,
            fn(&mut Store) -> Vec<crate::store::CommittedEvent>,
        );
        let cases: [Case; 4] = [
            ("two deliveries in one commit", |s| commit(s, 2, "two")),
            ("an endpoint backing off", |s| {
                s.set_endpoint_backoff("shop", 1, Some(T + 60_000)).unwrap();
                commit(s, 1, "backoff")
            }),
            ("a disabled endpoint", |s| {
                s.set_endpoint_enabled("shop", false, Some("test")).unwrap();
                commit(s, 1, "disabled")
            }),
            (
                "a commit inside another transaction, which may still roll back",
                |s| {
                    s.atomically(|s| s.commit(&ChangeSet::events(sample_events(1, "nested")), T))
                        .unwrap()
                },
            ),
        ];
        for (case, run) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (mut store, mailbox) = handing_store(dir.path());
            let committed = run(&mut store);
            assert!(!committed.is_empty(), "{case}: committed");
            assert!(
                committed.iter().all(|e| !e.handed_off),
                "{case}: the worker must be woken"
            );
            assert!(mailbox.take().0.is_empty(), "{case}: nothing handed off");
        }
    }

    #[test]
    fn only_the_endpoints_an_event_goes_to_are_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let cfg = crate::config::Config::parse(
            "[[endpoints]]\nname = \"shop\"\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"tx.*\"]\n\
             [[endpoints]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/o\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"alert.*\"]\n",
            "test",
            None,
        )
        .unwrap();
        store.sync_endpoints(&cfg.endpoints).unwrap();
        // `ops` has no mailbox: an event it took would need its worker woken.
        let handoff = Arc::new(Handoff::new(["shop"]));
        store.hand_off_to(handoff.clone());
        let committed = commit(&mut store, 1, "a");
        assert!(committed[0].handed_off, "a tx.pending goes to shop alone");
        assert_eq!(handoff.mailbox("shop").unwrap().take().0.len(), 1);
    }

    #[test]
    fn an_endpoint_without_a_mailbox_is_woken() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = test_store(dir.path());
        store.hand_off_to(Arc::new(Handoff::new(["other"])));
        let committed = commit(&mut store, 1, "a");
        assert!(!committed[0].handed_off, "shop has no mailbox");
    }

    fn delivery(id: i64) -> DueDelivery {
        DueDelivery {
            delivery_id: id,
            event_seq: id,
            event_id: format!("evt_{id}"),
            kind: "tx.pending".into(),
            body: "{}".into(),
            attempts: 0,
            created_at: 0,
        }
    }

    #[test]
    fn a_delivery_handed_off_before_a_step_finished_is_not_taken() {
        let h = Handoff::new(["shop"]);
        let m = h.mailbox("shop").expect("shop has a mailbox");
        assert!(h.mailbox("other").is_none(), "only configured endpoints");
        let before = m.steps();
        m.put(delivery(1), before);
        let (fresh, late) = m.take();
        assert_eq!(fresh.len(), 1, "no step finished: the worker may send it");
        assert!(!late);
        let before = m.steps();
        m.step_finished();
        m.put(delivery(2), before);
        let (fresh, late) = m.take();
        assert!(fresh.is_empty(), "a step finished since the commit began");
        assert!(late, "the worker must step to find it");
        let (fresh, late) = m.take();
        assert!(fresh.is_empty() && !late, "taken once");
    }
}
