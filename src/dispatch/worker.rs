//! One endpoint's delivery loop. Nothing ends it but shutdown: a store error is reported once,
//! backed off and retried, and outcomes not yet recorded are kept until they are; an endpoint
//! that refuses connections waits as a whole, with one probe at a time on its retry schedule.

use std::collections::HashSet;
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
    AttemptOutcome, DeliveryResult, DueDelivery, OutboxStore, SharedStore, StoreError,
};

type Done = (DueDelivery, AttemptOutcome);

const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

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
    /// How many attempts are in flight now, read by a running step when it plans.
    running: Arc<AtomicUsize>,
    retry: Duration,
}

/// What one planning step decided.
struct Plan {
    due: Vec<DueDelivery>,
    wait: Duration,
}

/// What a store step (record what finished, then plan) came back with.
struct StepOutcome {
    batch: Arc<Vec<Done>>,
    recorded: Result<(bool, Option<u32>), StoreError>,
    /// None when stopping or when recording failed.
    plan: Option<Result<Plan, StoreError>>,
}

impl<St: OutboxStore> Worker<St> {
    pub fn new(
        ep: EndpointConfig,
        sender: Sender,
        store: SharedStore<St>,
        ctx: Context,
    ) -> Worker<St> {
        Worker {
            who: format!("dispatch:{}", ep.name),
            ep: Arc::new(ep),
            sender: Arc::new(sender),
            store,
            ctx,
            unrecorded: Vec::new(),
            in_flight_ids: HashSet::new(),
            running: Arc::new(AtomicUsize::new(0)),
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
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stopping = shutdown.is_cancelled();
            if stopping && in_flight.is_empty() && step.is_none() {
                return self.stop().await;
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
                    self.count_running();
                    step_now = true;
                }
                _ = shutdown.cancelled(), if !stopping => step_now = true,
                _ = &mut notified, if !stopping => step_now = true,
                _ = tokio::time::sleep_until(next_step), if !stopping && step.is_none() && !step_now => step_now = true,
            }
        }
    }

    /// Records what is left and gives up this instance's hold on the endpoint.
    async fn stop(mut self) {
        let batch = Arc::new(std::mem::take(&mut self.unrecorded));
        if let Err(e) = record(&self.store, &self.ep, batch, (self.ctx.clock)()).await {
            tracing::error!(endpoint = %self.ep.name, error = %e, "stopping with attempts unrecorded; their deliveries will be sent again");
        }
        let name = self.ep.name.clone();
        if let Err(e) = self.store.run(move |s| s.release(&name)).await {
            tracing::warn!(endpoint = %self.ep.name, error = %e, "could not give up this instance's hold on the endpoint; another takes it when the hold runs out");
        }
    }

    /// A step over what has finished so far; it runs on its own while requests go on.
    fn start_step(&mut self, stopping: bool) -> BoxFuture<'static, StepOutcome> {
        let batch = Arc::new(std::mem::take(&mut self.unrecorded));
        // The batch is recorded before this step plans.
        self.count_running();
        // Every delivery not yet recorded as sent is left out of the claim: those in flight,
        // and those that finish while the step runs (in flight now, recorded by the next step).
        let sending: Vec<i64> = self.in_flight_ids.iter().copied().collect();
        let (store, ep, now) = (self.store.clone(), self.ep.clone(), (self.ctx.clock)());
        let running = self.running.clone();
        async move {
            let recorded = record(&store, &ep, batch.clone(), now).await;
            let plan = match (&recorded, stopping) {
                (Ok(_), false) => Some(plan(&store, ep, now, sending, running).await),
                _ => None,
            };
            StepOutcome {
                batch,
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
        for d in plan.due {
            if self.in_flight_ids.insert(d.delivery_id) {
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
        self.count_running();
        let wait = if in_flight.is_empty() {
            plan.wait
        } else {
            // Their completion wakes us; this only bounds how stale our view can get.
            Duration::from_secs(1)
        };
        (wait, false)
    }

    /// Tells a running plan how many slots are taken: the attempts in flight, and those that
    /// failed and are not recorded yet. Until a failure is recorded the endpoint's state does
    /// not show it: a plan refilling its slot would send a second probe while backing off, or
    /// a second burst into an endpoint that just started refusing. A delivered attempt frees
    /// its slot at once; recording it changes nothing a plan relies on.
    fn count_running(&self) {
        let failed = self
            .unrecorded
            .iter()
            .filter(|(_, o)| o.result != DeliveryResult::Delivered)
            .count();
        self.running
            .store(self.in_flight_ids.len() + failed, Ordering::SeqCst);
    }

    fn step_failed(&mut self, e: &StoreError) -> (Duration, bool) {
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

/// Records finished attempts and what follows from them (alerts, disabling, back-off) in one
/// transaction, so a crash or a refused write never keeps one without the other. They leave
/// the queue only once stored. Returns whether an alert was raised, and the back-off's new
/// step if it changed.
async fn record<St: OutboxStore>(
    store: &SharedStore<St>,
    ep: &Arc<EndpointConfig>,
    batch: Arc<Vec<Done>>,
    now: i64,
) -> Result<(bool, Option<u32>), StoreError> {
    if batch.is_empty() {
        return Ok((false, None));
    }
    let ep = ep.clone();
    store
        .run(move |s| {
            s.atomically(|s| {
                s.record_attempts(&ep.name, &batch)?;
                let alerted = alerts::after_attempts(s, &ep, &batch, now)?;
                let step = alerts::update_backoff(s, &ep, &batch, now)?;
                Ok((alerted, step))
            })
        })
        .await
}

/// Reads the endpoint's state and claims what is due, honouring its back-off and the attempts
/// in flight when it runs.
async fn plan<St: OutboxStore>(
    store: &SharedStore<St>,
    ep: Arc<EndpointConfig>,
    now: i64,
    sending: Vec<i64>,
    running: Arc<AtomicUsize>,
) -> Result<Plan, StoreError> {
    store
        .run(move |s| {
            let state = s.endpoint_state(&ep.name)?;
            let idle = Plan {
                due: vec![],
                wait: Duration::from_secs(1),
            };
            if !state.enabled {
                return Ok(idle);
            }
            let capacity = if ep.ordered {
                1
            } else {
                ep.concurrency as usize
            };
            // While backing off, only one probe at a time, and only once the step is over.
            let capacity = match state.backoff_until {
                Some(until) if state.backoff_step > 0 && now < until => {
                    return Ok(Plan {
                        due: vec![],
                        wait: Duration::from_millis((until - now).clamp(5, 1000) as u64),
                    })
                }
                _ if state.backoff_step > 0 => 1,
                _ => capacity,
            };
            let in_flight = running.load(Ordering::SeqCst);
            if in_flight >= capacity {
                return Ok(idle);
            }
            let limit = (capacity - in_flight) as u32;
            let due = s.due_deliveries(&ep.name, now, ep.ordered, limit, &sending)?;
            let wait = match s.next_due(&ep.name, ep.ordered)? {
                Some(t) => Duration::from_millis((t - now).clamp(5, 1000) as u64),
                None => Duration::from_secs(1),
            };
            Ok(Plan { due, wait })
        })
        .await
}
