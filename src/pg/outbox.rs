//! The shared outbox: every instance delivers. A delivery is claimed (`FOR UPDATE SKIP LOCKED`)
//! before it is sent, so two instances never pick the same one at once; a claim runs out after
//! `claim`, so a dead instance's deliveries return. An ordered endpoint is held by one instance
//! at a time the same way, so its order holds across instances.

use tokio_postgres::Row;

use super::PgStore;
use crate::changeset::ChangeSet;
use crate::store::{
    AttemptOutcome, ChainedRow, CommittedEvent, DeliveryResult, DueDelivery, EndpointState,
    OutboxStore, Result,
};

const DUE_COLUMNS: &str = "d.id, d.event_seq, e.id, e.body, d.attempts, e.type, e.created_at, e.payload_hash, e.prev_hash, e.row_hash";

fn due_of(r: &Row) -> (DueDelivery, ChainedRow) {
    let attempts: i64 = r.get(4);
    let d = DueDelivery {
        delivery_id: r.get(0),
        event_seq: r.get(1),
        event_id: r.get(2),
        body: r.get(3),
        attempts: attempts.clamp(0, u32::MAX as i64) as u32,
        kind: r.get(5),
        created_at: r.get(6),
    };
    let row = ChainedRow {
        seq: d.event_seq,
        id: d.event_id.clone(),
        kind: d.kind.clone(),
        body: d.body.clone(),
        payload_hash: r.get(7),
        prev: r.get(8),
        chain: r.get(9),
    };
    (d, row)
}

impl PgStore {
    fn claim_ms(&self) -> i64 {
        self.claim.as_millis() as i64
    }

    /// Holds an ordered endpoint for this instance (or keeps holding it); false while another
    /// live instance serves it.
    fn hold_ordered(&self, endpoint: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE endpoints SET order_holder = $2, order_until = clock_timestamp() + $3::bigint * interval '1 millisecond'
              WHERE name = $1 AND (order_holder IS NULL OR order_holder = $2 OR order_until < clock_timestamp())",
            &[&endpoint, &self.instance, &self.claim_ms()],
        )?;
        Ok(n > 0)
    }

    /// Claims up to `limit` due deliveries (an ordered endpoint: its head only), oldest first.
    fn claim_due(
        &self,
        endpoint: &str,
        now_ms: i64,
        ordered: bool,
        limit: u32,
        in_flight: &[i64],
    ) -> Result<Vec<(DueDelivery, ChainedRow)>> {
        if ordered && !self.hold_ordered(endpoint)? {
            return Ok(vec![]);
        }
        // The head of an ordered queue holds back the rest, due or not; it is claimed only
        // when due.
        let candidates = if ordered {
            "SELECT id FROM (SELECT id, next_attempt_at FROM deliveries
                WHERE endpoint = $1 AND status IN ('pending', 'failed') ORDER BY event_seq LIMIT LEAST($3::bigint, 1)) head
              WHERE next_attempt_at <= $2 AND NOT (id = ANY($6))"
        } else {
            "SELECT id FROM deliveries
              WHERE endpoint = $1 AND status IN ('pending', 'failed') AND next_attempt_at <= $2
                AND (claimed_by IS NULL OR claimed_by = $4 OR claim_until < clock_timestamp())
                AND NOT (id = ANY($6))
              ORDER BY event_seq LIMIT $3 FOR UPDATE SKIP LOCKED"
        };
        // Claimed and read in one statement: the claim returns its rows with their events.
        let sql = format!(
            "WITH due AS ({candidates}),
             claimed AS (UPDATE deliveries d SET claimed_by = $4, claim_until = clock_timestamp() + $5::bigint * interval '1 millisecond'
               FROM due WHERE d.id = due.id RETURNING d.id, d.event_seq, d.attempts)
             SELECT {DUE_COLUMNS} FROM claimed d JOIN events e ON e.seq = d.event_seq ORDER BY d.event_seq"
        );
        let limit = i64::from(limit);
        Ok(self
            .conn
            .query(
                &sql,
                &[
                    &endpoint,
                    &now_ms,
                    &limit,
                    &self.instance,
                    &self.claim_ms(),
                    &in_flight,
                ],
            )?
            .iter()
            .map(due_of)
            .collect())
    }

    fn hold_delivery(&self, endpoint: &str, d: &DueDelivery, why: &str) -> Result<()> {
        crate::store::outbox::report_held(endpoint, d, why);
        self.conn.execute(
            "UPDATE deliveries SET status = 'held', last_error = $2, claimed_by = NULL WHERE id = $1",
            &[&d.delivery_id, &format!("held: event {why}")],
        )?;
        Ok(())
    }

    /// Records a batch of attempts and their deliveries' new states in three statements,
    /// then the endpoint's success or failing state as the attempts, in order, leave it.
    fn record_batch(&self, endpoint: &str, done: &[(DueDelivery, AttemptOutcome)]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = done.iter().map(|(d, _)| d.delivery_id).collect();
        let started: Vec<i64> = done.iter().map(|(_, o)| o.started_at_ms).collect();
        let durations: Vec<i64> = done.iter().map(|(_, o)| o.duration_ms).collect();
        let codes: Vec<Option<i64>> = done
            .iter()
            .map(|(_, o)| o.status_code.map(i64::from))
            .collect();
        let errors: Vec<Option<&str>> = done.iter().map(|(_, o)| o.error.as_deref()).collect();
        let excerpts: Vec<Option<&str>> = done
            .iter()
            .map(|(_, o)| o.response_excerpt.as_deref())
            .collect();
        self.conn.execute(
            "INSERT INTO attempts (delivery_id, started_at, duration_ms, status_code, error, response_excerpt)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])",
            &[&ids, &started, &durations, &codes, &errors, &excerpts],
        )?;
        let (mut statuses, mut nexts, mut delivered_at) = (vec![], vec![], vec![]);
        for (_, o) in done {
            let (status, next, at) = o.delivery_state();
            statuses.push(status.as_str());
            nexts.push(next);
            delivered_at.push(at);
        }
        // A delivered row stays delivered: another instance that sent it after this one's
        // claim ran out must not turn it back. Only this instance's own claim is released.
        self.conn.execute(
            "UPDATE deliveries d SET status = CASE WHEN d.status = 'delivered' THEN d.status ELSE u.status END,
               attempts = d.attempts + 1, next_attempt_at = u.next, last_status = u.code,
               last_error = u.error, delivered_at = coalesce(d.delivered_at, u.at),
               claim_until = CASE WHEN d.claimed_by = $7 THEN NULL ELSE d.claim_until END,
               claimed_by = CASE WHEN d.claimed_by = $7 THEN NULL ELSE d.claimed_by END
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[])
               AS u(id, status, next, code, error, at)
             WHERE d.id = u.id",
            &[&ids, &statuses, &nexts, &codes, &errors, &delivered_at, &self.instance],
        )?;
        match endpoint_outcome(done) {
            EndpointOutcome::Untouched => {}
            EndpointOutcome::Answers {
                last_success,
                failing_since,
            } => {
                // Every instance's every batch would otherwise lock the endpoint's row until
                // its commit, and the instances' records would queue on it: while all is well,
                // the time of the last success is refreshed at most once a second.
                self.conn.execute(
                    "UPDATE endpoints SET last_success_at = $2::bigint, failing_since = $3::bigint, failing_alerted = false
                      WHERE name = $1 AND (failing_since IS NOT NULL OR $3::bigint IS NOT NULL OR failing_alerted
                        OR last_success_at IS NULL OR last_success_at < $2::bigint - 1000)",
                    &[&endpoint, &last_success, &failing_since],
                )?;
            }
            EndpointOutcome::Failing { since } => {
                self.conn.execute(
                    "UPDATE endpoints SET failing_since = $2 WHERE name = $1 AND failing_since IS NULL",
                    &[&endpoint, &since],
                )?;
            }
        }
        Ok(())
    }

    pub fn endpoint_state(&self, name: &str) -> Result<EndpointState> {
        // Asked at every step of this instance's worker: an ordered endpoint it holds stays
        // held while the worker lives, even while its head is in flight.
        // The hold is renewed and the state read in one round trip: a data-modifying WITH runs
        // to its end whether or not the query reads it. The read sees the row as the statement
        // began, which the renewal (of order_until only) does not change.
        let Some(r) = self.conn.query_opt(
            "WITH held AS (UPDATE endpoints SET order_until = clock_timestamp() + $3::bigint * interval '1 millisecond'
                WHERE name = $1 AND order_holder = $2)
             SELECT enabled, backoff_step, backoff_until, failing_since, failing_alerted FROM endpoints WHERE name = $1",
            &[&name, &self.instance, &self.claim_ms()],
        )?
        else {
            return Ok(EndpointState::default());
        };
        let step: i64 = r.get(1);
        Ok(EndpointState {
            enabled: r.get(0),
            backoff_step: step.clamp(0, u32::MAX as i64) as u32,
            backoff_until: r.get(2),
            failing_since: r.get(3),
            failing_alerted: r.get(4),
        })
    }
}

impl OutboxStore for PgStore {
    fn network(&self) -> Result<String> {
        Ok(self.meta("network")?.unwrap_or_default())
    }
    fn wants(&self, kind: &str) -> bool {
        self.wants_kind(kind)
    }
    fn due_deliveries(
        &mut self,
        endpoint: &str,
        now_ms: i64,
        ordered: bool,
        limit: u32,
        in_flight: &[i64],
    ) -> Result<Vec<DueDelivery>> {
        let mut due = Vec::new();
        for (d, chained) in self.claim_due(endpoint, now_ms, ordered, limit, in_flight)? {
            // Signing an edited body would vouch for it: hold it instead, loudly.
            match chained.check(&self.audit_key) {
                Ok(()) => due.push(d),
                Err(why) => self.hold_delivery(endpoint, &d, why)?,
            }
        }
        Ok(due)
    }
    fn next_due(&self, endpoint: &str, ordered: bool) -> Result<Option<i64>> {
        // An ordered endpoint another live instance holds is its to serve, and deliveries
        // another live instance claimed are its to send: nothing falls due here for them.
        let sql = if ordered {
            "SELECT d.next_attempt_at FROM deliveries d JOIN endpoints ep ON ep.name = d.endpoint
              WHERE d.endpoint = $1 AND d.status IN ('pending', 'failed')
                AND (ep.order_holder IS NULL OR ep.order_holder = $2 OR ep.order_until < clock_timestamp())
              ORDER BY d.event_seq LIMIT 1"
        } else {
            "SELECT min(next_attempt_at) FROM deliveries WHERE endpoint = $1 AND status IN ('pending', 'failed')
               AND (claimed_by IS NULL OR claim_until < clock_timestamp()) AND $2::text IS NOT NULL"
        };
        Ok(self
            .conn
            .query_opt(sql, &[&endpoint, &self.instance])?
            .and_then(|r| r.get::<_, Option<i64>>(0)))
    }
    fn record_attempts(
        &mut self,
        endpoint: &str,
        done: &[(DueDelivery, AttemptOutcome)],
    ) -> Result<()> {
        // Inside the worker's transaction (always, today) a savepoint would only cost two
        // round trips: an error there ends the whole transaction anyway.
        self.conn
            .within_transaction(|| self.record_batch(endpoint, done))
    }
    fn endpoint_state(&self, name: &str) -> Result<EndpointState> {
        PgStore::endpoint_state(self, name)
    }
    fn set_endpoint_backoff(&mut self, name: &str, step: u32, until: Option<i64>) -> Result<()> {
        self.conn.execute(
            "UPDATE endpoints SET backoff_step = $2, backoff_until = $3 WHERE name = $1",
            &[&name, &i64::from(step), &until],
        )?;
        Ok(())
    }
    fn set_failing_alerted(&mut self, name: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE endpoints SET failing_alerted = true WHERE name = $1",
            &[&name],
        )?;
        Ok(())
    }
    fn release(&mut self, endpoint: &str, unstarted: &[i64]) -> Result<()> {
        self.conn.execute(
            "UPDATE endpoints SET order_holder = NULL, order_until = NULL
              WHERE name = $1 AND order_holder = $2",
            &[&endpoint, &self.instance],
        )?;
        if !unstarted.is_empty() {
            // Only this instance's own claims: one that ran out may be another's by now.
            self.conn.execute(
                "UPDATE deliveries SET claimed_by = NULL, claim_until = NULL
                  WHERE id = ANY($1) AND claimed_by = $2",
                &[&unstarted, &self.instance],
            )?;
        }
        Ok(())
    }
    fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        // Alerts and endpoint changes: any instance records them, unfenced.
        let fence = self.fence.take();
        let r = self.commit_changes(changes, now_ms);
        self.fence = fence;
        r
    }
    fn atomically<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let level = self.conn.begin(super::conn::BEGIN)?;
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(r) => r,
            Err(panic) => {
                self.conn.abandon();
                std::panic::resume_unwind(panic)
            }
        };
        self.conn.end(level, result)
    }
}

/// What a batch of attempts, taken in order, leaves of an endpoint's state.
#[derive(Debug, PartialEq, Eq)]
enum EndpointOutcome {
    /// Only 410s: disabling is the dispatcher's next step.
    Untouched,
    /// A success, the last at `last_success`; failures after it start a failing spell.
    Answers {
        last_success: i64,
        failing_since: Option<i64>,
    },
    /// Failures only: failing since the first, unless it was failing already.
    Failing { since: i64 },
}

fn endpoint_outcome(done: &[(DueDelivery, AttemptOutcome)]) -> EndpointOutcome {
    let mut out = EndpointOutcome::Untouched;
    for (_, o) in done {
        let t = o.started_at_ms;
        out = match (o.result, out) {
            (DeliveryResult::EndpointGone, same) => same,
            (DeliveryResult::Delivered, _) => EndpointOutcome::Answers {
                last_success: t,
                failing_since: None,
            },
            (_, EndpointOutcome::Untouched) => EndpointOutcome::Failing { since: t },
            (
                _,
                EndpointOutcome::Answers {
                    last_success,
                    failing_since,
                },
            ) => EndpointOutcome::Answers {
                last_success,
                failing_since: failing_since.or(Some(t)),
            },
            (_, failing) => failing,
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: i64, result: DeliveryResult) -> (DueDelivery, AttemptOutcome) {
        let d = DueDelivery {
            delivery_id: t,
            event_seq: t,
            event_id: String::new(),
            kind: String::new(),
            body: String::new(),
            attempts: 0,
            created_at: 0,
        };
        let o = AttemptOutcome {
            started_at_ms: t,
            duration_ms: 1,
            status_code: None,
            error: None,
            response_excerpt: None,
            result,
        };
        (d, o)
    }

    #[test]
    fn a_batch_leaves_the_endpoint_as_its_attempts_in_order_would() {
        use DeliveryResult::*;
        let outcome = |batch: &[(i64, DeliveryResult)]| {
            let done: Vec<_> = batch.iter().map(|(t, r)| at(*t, *r)).collect();
            endpoint_outcome(&done)
        };
        assert_eq!(outcome(&[(1, EndpointGone)]), EndpointOutcome::Untouched);
        assert_eq!(
            outcome(&[(1, RetryAt(9)), (2, Dead)]),
            EndpointOutcome::Failing { since: 1 },
            "failures only: failing since the first"
        );
        assert_eq!(
            outcome(&[(1, RetryAt(9)), (2, Delivered), (3, Delivered)]),
            EndpointOutcome::Answers {
                last_success: 3,
                failing_since: None
            },
            "a success ends the failing spell"
        );
        assert_eq!(
            outcome(&[(1, Delivered), (2, RetryAt(9)), (3, RetryAt(9))]),
            EndpointOutcome::Answers {
                last_success: 1,
                failing_since: Some(2)
            },
            "failures after the last success start a new spell"
        );
    }
}
