//! One endpoint's delivery loop. Nothing ends it but shutdown: a store error is reported once,
//! backed off and retried, and outcomes not yet recorded are kept until they are; an endpoint
//! that refuses connections waits as a whole, with one probe at a time on its retry schedule.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use super::alerts;
use super::http::{attempt, Sender};
use super::{log_outcome, outcome_name, Context};
use crate::config::EndpointConfig;
use crate::health::Change;
use crate::store::{
    AttemptOutcome, DeliveryResult, DueDelivery, Mailbox, OutboxStore, SharedStore, StoreError,
};

type Done = (DueDelivery, AttemptOutcome);

const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a claimed delivery may wait for a slot before it is given back. A claim lasts the
/// endpoint's timeout and five seconds more (PostgreSQL): one that waited longer might outlive
/// its claim while in flight, and another instance could send it too.
const READY_FOR: Duration = Duration::from_secs(2);

pub struct Worker<St: OutboxStore> {
    ep: Arc<EndpointConfig>,
    sender: Arc<Sender>,
    store: SharedStore<St>,
    ctx: Context,
    /// This worker's name in health reports.
    who: String,
    /// Attempts made but not yet recorded (the store refused, or a step was running).
    unrecorded: Vec<Done>,
    in_flight_ids: HashSet<i64>,
    /// Claimed ahead, started as slots free up, so the requests need not wait for a step
    /// between them; with when each was claimed.
    ready: VecDeque<(DueDelivery, tokio::time::Instant)>,
    /// How many attempts may be in flight, as the last plan found the endpoint.
    allowed: usize,
    /// Slots taken and claims held, read by a running step when it plans.
    taken: Arc<AtomicUsize>,
    /// Failed attempts in the batch a running step records.
    recording_failures: usize,
    retry: Duration,
    /// Where commits hand this endpoint's deliveries straight to us, if they do.
    mailbox: Option<Arc<Mailbox>>,
}

/// What one planning step decided.
struct Plan {
    due: Vec<DueDelivery>,
    wait: Duration,
    /// How many attempts may be in flight at once: none while backing off or disabled, one
    /// probe when a back-off step is over, else the endpoint's concurrency.
    allowed: usize,
}

/// What a store step (record what finished, then plan) came back with.
struct StepOutcome {
    batch: Arc<Vec<Done>>,
    /// When the step started: what it claims is dated from then.
    started: tokio::time::Instant,
    recorded: Result<Recorded, StoreError>,
    /// None when stopping or when recording failed.
    plan: Option<Result<Plan, StoreError>>,
}

/// Whether recording a batch raised an alert, and the back-off's new step if it changed.
type Recorded = (bool, Option<u32>);

impl<St: OutboxStore> Worker<St> {
    pub fn new(
        ep: EndpointConfig,
        sender: Sender,
        store: SharedStore<St>,
        ctx: Context,
    ) -> Worker<St> {
        Worker {
            who: format!("dispatch:{}", ep.name),
            mailbox: ctx.handoff.mailbox(&ep.name),
            ep: Arc::new(ep),
            sender: Arc::new(sender),
            store,
            ctx,
            unrecorded: Vec::new(),
            in_flight_ids: HashSet::new(),
            ready: VecDeque::new(),
            allowed: 0,
            taken: Arc::new(AtomicUsize::new(0)),
            recording_failures: 0,
            retry: RETRY_MIN,
        }
    }

    /// The loop. The store's work (a step: record what finished, then claim what is due) runs
    /// beside the requests in flight, not between them: on a store with round trips
    /// (PostgreSQL) a step takes milliseconds, and the requests it started finish meanwhile.
    /// What finishes while a step runs is recorded by the next step, started at once.
    pub async fn run(mut self) {
        if let Err(e) = self.store.run(|s| s.prepare_for_deliveries()).await {
            self.store_failed(&e);
        }
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        let mut step: Option<BoxFuture<'static, StepOutcome>> = None;
        let mut step_now = true;
        let mut next_step = tokio::time::Instant::now();
        let wake = self.ctx.wake.clone();
        let shutdown = self.ctx.shutdown.clone();
        let mailbox = self.mailbox.clone();
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stopping = shutdown.is_cancelled();
            if stopping && in_flight.is_empty() && step.is_none() {
                return self.stop().await;
            }
            if let Some(m) = &mailbox {
                step_now |= self.take_handed(m, &mut in_flight);
            }
            if step.is_none() && step_now {
                step = Some(self.start_step(stopping));
                step_now = false;
            }
            tokio::select! {
                out = async { step.as_mut().expect("polled only while a step runs").await }, if step.is_some() => {
                    step = None;
                    // Both ready in one poll: the wake-up must not be dropped with this iteration.
                    if notified.as_mut().now_or_never().is_some() {
                        step_now = true;
                    }
                    let (wait, failed) = self.finish_step(out, &mut in_flight).await;
                    // A wake-up that came while the step ran still counts: its plan may have
                    // been made before what woke us was committed.
                    step_now |= !failed && !self.unrecorded.is_empty();
                    next_step = tokio::time::Instant::now() + wait;
                }
                Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                    // Record everything that finished together in one transaction.
                    let mut done = vec![first];
                    while let Some(Some(more)) = in_flight.next().now_or_never() {
                        done.push(more);
                    }
                    for (d, o) in &done {
                        self.in_flight_ids.remove(&d.delivery_id);
                        log_outcome(&self.ep.name, d, o);
                        self.ctx.metrics.delivery(&self.ep.name, outcome_name(o, d, &self.ctx.metrics));
                    }
                    self.unrecorded.extend(done);
                    self.start_ready(&mut in_flight);
                    step_now = true;
                }
                _ = shutdown.cancelled(), if !stopping => step_now = true,
                _ = &mut notified, if !stopping => step_now = true,
                // Taken at the top of the loop.
                _ = handed_off(&mailbox), if !stopping => {}
                _ = tokio::time::sleep_until(next_step), if !stopping && step.is_none() && !step_now => step_now = true,
            }
        }
    }

    /// Records what is left and gives up this instance's hold on the endpoint.
    async fn stop(mut self) {
        let (batch, ep, now) = (
            std::mem::take(&mut self.unrecorded),
            self.ep.clone(),
            (self.ctx.clock)(),
        );
        let recorded = self
            .store
            .run(move |s| store_step(s, &ep, &batch, now, true, None).0)
            .await;
        if let Err(e) = recorded {
            tracing::error!(endpoint = %self.ep.name, error = %e, "stopping with attempts unrecorded; their deliveries will be sent again");
        }
        let name = self.ep.name.clone();
        let unstarted: Vec<i64> = self.ready.iter().map(|(d, _)| d.delivery_id).collect();
        if let Err(e) = self.store.run(move |s| s.release(&name, &unstarted)).await {
            tracing::warn!(endpoint = %self.ep.name, error = %e, "could not give up this instance's hold on the endpoint and its claims; another takes them when they run out");
        }
    }

    /// A step over what has finished so far; it runs on its own while requests go on.
    fn start_step(&mut self, stopping: bool) -> BoxFuture<'static, StepOutcome> {
        let batch = Arc::new(std::mem::take(&mut self.unrecorded));
        self.recording_failures = failures(&batch);
        // The batch is recorded before this step plans.
        self.count_taken();
        // Every delivery not yet recorded as sent is left out of the claim: those claimed
        // ahead, those in flight, and those that finish while the step runs (in flight now,
        // recorded by the next step).
        let sending: Vec<i64> = self
            .in_flight_ids
            .iter()
            .copied()
            .chain(self.ready.iter().map(|(d, _)| d.delivery_id))
            .collect();
        let (store, ep, now) = (self.store.clone(), self.ep.clone(), (self.ctx.clock)());
        let taken = self.taken.clone();
        let done = batch.clone();
        // After a failed step the record goes alone, so a fault in planning cannot keep what
        // finished from being recorded.
        let alone = self.retry > RETRY_MIN;
        let started = tokio::time::Instant::now();
        async move {
            let (recorded, plan) = store
                .run(move |s| {
                    let claims = (!stopping).then_some((sending.as_slice(), taken.as_ref()));
                    Ok(store_step(s, &ep, &done, now, alone, claims))
                })
                .await
                .unwrap_or_else(|e| (Err(e), None));
            StepOutcome {
                batch,
                started,
                recorded,
                plan,
            }
        }
        .boxed()
    }

    /// Takes a step's outcome in: starts what it claimed, or keeps what it could not record.
    /// Returns how long to wait at most before the next step, and whether the store failed.
    async fn finish_step(
        &mut self,
        out: StepOutcome,
        in_flight: &mut FuturesUnordered<BoxFuture<'static, Done>>,
    ) -> (Duration, bool) {
        self.recording_failures = 0;
        if let Some(m) = &self.mailbox {
            // What a commit hands off from now on may be among this step's claims.
            m.step_finished();
        }
        let plan = match out.recorded {
            Err(e) => {
                // Not recorded: kept, before what finished since, for the next step.
                let batch = Arc::try_unwrap(out.batch).unwrap_or_else(|a| (*a).clone());
                let newer = std::mem::replace(&mut self.unrecorded, batch);
                self.unrecorded.extend(newer);
                return self.step_failed(&e);
            }
            Ok((alerted, step)) => {
                self.recorded(alerted, step);
                match out.plan {
                    Some(Err(e)) => return self.step_failed(&e),
                    plan => plan,
                }
            }
        };
        self.store_recovered().await;
        let Some(Ok(plan)) = plan else {
            // Stopping: nothing new starts.
            return (Duration::from_secs(1), false);
        };
        self.allowed = plan.allowed;
        let claimed = out.started;
        for d in plan.due {
            if !self.sending(d.delivery_id) {
                self.ready.push_back((d, claimed));
            }
        }
        let gave_back = self.start_ready(in_flight);
        let wait = if gave_back {
            // Claimed again by the next step.
            Duration::ZERO
        } else if in_flight.is_empty() {
            plan.wait
        } else {
            // Their completion wakes us; this only bounds how stale our view can get.
            Duration::from_secs(1)
        };
        (wait, false)
    }

    /// Starts deliveries claimed ahead into the free slots, unless an attempt failed and is
    /// not recorded yet (or is being recorded): until the plan after it, the endpoint's state
    /// does not show the failure, and filling its slot would send a second probe while backing
    /// off, a second burst into an endpoint that just started refusing, or a request to one a
    /// 410 is disabling. A delivered attempt frees its slot at once.
    /// Returns whether claims that waited too long were given back.
    fn start_ready(&mut self, in_flight: &mut FuturesUnordered<BoxFuture<'static, Done>>) -> bool {
        let mut gave_back = false;
        let failed = self.unrecorded_failures() + self.recording_failures;
        if failed == 0 && !self.ctx.shutdown.is_cancelled() {
            while self.in_flight_ids.len() < self.allowed {
                let Some((d, claimed)) = self.ready.pop_front() else {
                    break;
                };
                // Given back: the next plan claims it again, or another instance.
                if claimed.elapsed() > READY_FOR {
                    gave_back = true;
                    continue;
                }
                self.in_flight_ids.insert(d.delivery_id);
                let (sender, ep, clock) =
                    (self.sender.clone(), self.ep.clone(), self.ctx.clock.clone());
                in_flight.push(
                    async move {
                        let o = attempt(&sender, &ep, &d, &clock).await;
                        (d, o)
                    }
                    .boxed(),
                );
            }
        }
        self.count_taken();
        gave_back
    }

    /// Whether delivery `id` is claimed, in flight, or sent and not yet recorded. A plan that
    /// read the store before a delivery handed off was sent and recorded may claim it too.
    fn sending(&self, id: i64) -> bool {
        self.in_flight_ids.contains(&id)
            || self.ready.iter().any(|(r, _)| r.delivery_id == id)
            || self.unrecorded.iter().any(|(r, _)| r.delivery_id == id)
    }

    /// Starts what commits handed straight to this worker (see `Handoff`), as if a step had
    /// claimed it. Returns whether a step is needed: some came too late to be taken (the
    /// store has them), or wait for a slot.
    fn take_handed(
        &mut self,
        mailbox: &Mailbox,
        in_flight: &mut FuturesUnordered<BoxFuture<'static, Done>>,
    ) -> bool {
        let (fresh, late) = mailbox.take();
        if late {
            tracing::debug!(endpoint = %self.ep.name, "a delivery was handed off after a step that may have claimed it; left to the next step");
        }
        if fresh.is_empty() || self.ctx.shutdown.is_cancelled() {
            // Stopping: they stay queued in the store for the next start.
            return late;
        }
        let now = tokio::time::Instant::now();
        for d in fresh {
            if !self.sending(d.delivery_id) {
                tracing::debug!(endpoint = %self.ep.name, event = %d.event_id, "handed off by its commit");
                self.ready.push_back((d, now));
            }
        }
        self.start_ready(in_flight);
        late || !self.ready.is_empty()
    }

    fn unrecorded_failures(&self) -> usize {
        failures(&self.unrecorded)
    }

    /// Tells a running plan how many slots are taken and claims held: the attempts in flight,
    /// those that failed and are not recorded yet (see `start_ready`), and the claims waiting.
    fn count_taken(&self) {
        let taken = self.in_flight_ids.len() + self.unrecorded_failures() + self.ready.len();
        self.taken.store(taken, Ordering::SeqCst);
    }

    fn step_failed(&mut self, e: &StoreError) -> (Duration, bool) {
        // Nothing new starts while the store refuses what finished.
        self.allowed = 0;
        self.store_failed(e);
        let wait = self.retry;
        self.retry = (self.retry * 2).min(RETRY_MAX);
        (wait, true)
    }

    /// What follows a recorded batch: a wake-up for the alerts it raised, a line for a change
    /// of the endpoint's back-off.
    fn recorded(&self, alerted: bool, step: Option<u32>) {
        if alerted {
            self.ctx.wake.notify_waiters();
        }
        match step {
            Some(0) => {
                tracing::info!(endpoint = %self.ep.name, "endpoint answers again; delivering at full rate")
            }
            Some(1) => {
                tracing::warn!(endpoint = %self.ep.name, "endpoint refuses connections or times out; its deliveries wait, one probe at a time on the retry schedule")
            }
            _ => {}
        }
    }

    fn store_failed(&self, e: &StoreError) {
        self.ctx.metrics.store_error(&self.who);
        if self.ctx.health.store_failed(&self.who, &e.to_string()) == Change::Started {
            tracing::error!(endpoint = %self.ep.name, error = %e, "store refuses delivery work; retrying with back-off (deliveries resume by themselves)");
        }
    }

    /// After a successful step: ends a store incident, raising `alert.store_error` for a long one.
    async fn store_recovered(&mut self) {
        self.retry = RETRY_MIN;
        // The alert is written before the incident is closed: if writing it fails, the
        // incident (and its alert) stay for the next step.
        if let Some(incident) = self
            .ctx
            .health
            .store_alert_due(crate::health::STORE_ALERT_AFTER)
        {
            let (who, now) = (self.who.clone(), (self.ctx.clock)());
            let a = alerts::store_error_alert(
                incident.since_unix_ms,
                &incident.error,
                incident.age().as_secs(),
                &who,
            );
            match self
                .store
                .run(move |s| alerts::record_alerts(s, vec![a], None, now))
                .await
            {
                Ok(_) => {
                    self.ctx.health.store_alert_recorded();
                    self.ctx.wake.notify_waiters();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "recording alert.store_error failed; will try again");
                    return;
                }
            }
        }
        if let Change::Ended(after) = self.ctx.health.store_ok(&self.who) {
            tracing::info!(endpoint = %self.ep.name, after_s = after.as_secs(), "store accepts delivery work again");
        }
    }
}

/// Resolves when a commit hands this worker something; never without a mailbox.
async fn handed_off(mailbox: &Option<Arc<Mailbox>>) {
    match mailbox {
        Some(m) => m.arrived().await,
        None => std::future::pending().await,
    }
}

fn failures(done: &[Done]) -> usize {
    done.iter()
        .filter(|(_, o)| o.result != DeliveryResult::Delivered)
        .count()
}

/// A step's store work: records `done`, then, given the claims held (none when stopping),
/// plans. One transaction, as a store with commits as slow as PostgreSQL's pays for one, not
/// two; or, `alone`, the record in a transaction of its own and the plan after it.
fn store_step<St: OutboxStore>(
    s: &mut St,
    ep: &EndpointConfig,
    done: &[Done],
    now: i64,
    alone: bool,
    claims: Option<(&[i64], &AtomicUsize)>,
) -> (
    Result<Recorded, StoreError>,
    Option<Result<Plan, StoreError>>,
) {
    let plan = |s: &mut St, (sending, taken)| plan(s, ep, now, sending, taken);
    if alone || done.is_empty() {
        let recorded = match done.is_empty() {
            true => Ok((false, None)),
            false => s.atomically(|s| record(s, ep, done, now)),
        };
        let planned = match (&recorded, claims) {
            (Ok(_), Some(claims)) => Some(plan(s, claims)),
            _ => None,
        };
        return (recorded, planned);
    }
    let both = s.atomically(|s| {
        let recorded = record(s, ep, done, now)?;
        Ok((recorded, claims.map(|c| plan(s, c)).transpose()?))
    });
    match both {
        Ok((recorded, planned)) => (Ok(recorded), planned.map(Ok)),
        Err(e) => (Err(e), None),
    }
}

/// Records finished attempts and what follows from them (alerts, disabling, back-off), inside
/// the caller's transaction, so a crash or a refused write never keeps one without the other.
/// They leave the queue only once stored.
fn record<St: OutboxStore>(
    s: &mut St,
    ep: &EndpointConfig,
    batch: &[Done],
    now: i64,
) -> Result<Recorded, StoreError> {
    if batch.is_empty() {
        return Ok((false, None));
    }
    s.record_attempts(&ep.name, batch)?;
    let alerted = alerts::after_attempts(s, ep, batch, now)?;
    let step = alerts::update_backoff(s, ep, batch, now)?;
    Ok((alerted, step))
}

/// Reads the endpoint's state and claims what is due, honouring its back-off and the slots
/// and claims held when it runs. An unordered endpoint in good health is claimed for three
/// times its concurrency, so that a request finishing is followed at once by one claimed ahead
/// instead of waiting for a step (a dozen round trips and a commit on PostgreSQL). Twice was
/// measured too: 8,500–9,900 deliveries/s with two PostgreSQL instances, against
/// 10,000–11,700 (BENCHMARKS.md).
fn plan<St: OutboxStore>(
    s: &mut St,
    ep: &EndpointConfig,
    now: i64,
    sending: &[i64],
    taken: &AtomicUsize,
) -> Result<Plan, StoreError> {
    let state = s.endpoint_state(&ep.name)?;
    let idle = |allowed| Plan {
        due: vec![],
        wait: Duration::from_secs(1),
        allowed,
    };
    if !state.enabled {
        return Ok(idle(0));
    }
    let concurrency = ep.concurrency as usize;
    // While backing off, only one probe at a time, and only once the step is over.
    let (allowed, ahead) = match state.backoff_until {
        Some(until) if state.backoff_step > 0 && now < until => {
            return Ok(Plan {
                due: vec![],
                wait: Duration::from_millis((until - now).clamp(5, 1000) as u64),
                allowed: 0,
            })
        }
        _ if state.backoff_step > 0 => (1, 0),
        _ if ep.ordered => (1, 0),
        _ => (concurrency, 2 * concurrency),
    };
    let taken = taken.load(Ordering::SeqCst);
    if taken >= allowed + ahead {
        return Ok(idle(allowed));
    }
    let limit = (allowed + ahead - taken) as u32;
    let due = s.due_deliveries(&ep.name, now, ep.ordered, limit, sending)?;
    // With something to send, what falls due next is asked after it is done.
    let next = match due.is_empty() {
        true => s.next_due(&ep.name, ep.ordered)?,
        false => None,
    };
    let wait = match next {
        Some(t) => Duration::from_millis((t - now).clamp(5, 1000) as u64),
        None => Duration::from_secs(1),
    };
    Ok(Plan { due, wait, allowed })
}
