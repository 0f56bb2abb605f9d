//! One endpoint's delivery loop. Nothing ends it but shutdown: a store error is reported once,
//! backed off and retried, and outcomes not yet recorded are kept until they are; an endpoint
//! that refuses connections waits as a whole, with one probe at a time on its retry schedule.

use std::collections::HashSet;
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
use crate::store::{AttemptOutcome, DueDelivery, OutboxStore, SharedStore, StoreError};

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
    /// Attempts made but not yet recorded (the store refused).
    unrecorded: Vec<Done>,
    in_flight_ids: HashSet<i64>,
    retry: Duration,
}

/// What one planning step decided.
struct Plan {
    due: Vec<DueDelivery>,
    wait: Duration,
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
            retry: RETRY_MIN,
        }
    }

    pub async fn run(mut self) {
        if let Err(e) = self.store.run(|s| s.prepare_for_deliveries()).await {
            self.store_failed(&e);
        }
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        let wake = self.ctx.wake.clone();
        let shutdown = self.ctx.shutdown.clone();
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stopping = shutdown.is_cancelled();
            if stopping && in_flight.is_empty() {
                if let Err(e) = self.record().await {
                    tracing::error!(endpoint = %self.ep.name, error = %e, "stopping with attempts unrecorded; their deliveries will be sent again");
                }
                let name = self.ep.name.clone();
                if let Err(e) = self.store.run(move |s| s.release(&name)).await {
                    tracing::warn!(endpoint = %self.ep.name, error = %e, "could not give up this instance's hold on the endpoint; another takes it when the hold runs out");
                }
                return;
            }
            let wait = match self.step(&mut in_flight, stopping).await {
                Ok(wait) => {
                    self.store_recovered().await;
                    wait
                }
                Err(e) => {
                    self.store_failed(&e);
                    let wait = self.retry;
                    self.retry = (self.retry * 2).min(RETRY_MAX);
                    wait
                }
            };
            tokio::select! {
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
                }
                _ = shutdown.cancelled(), if !stopping => {}
                _ = &mut notified, if !stopping => {}
                _ = tokio::time::sleep(wait), if !stopping => {}
            }
        }
    }

    /// Records what finished, then starts what is due; returns how long to wait at most.
    async fn step(
        &mut self,
        in_flight: &mut FuturesUnordered<BoxFuture<'static, Done>>,
        stopping: bool,
    ) -> Result<Duration, StoreError> {
        self.record().await?;
        if stopping {
            return Ok(Duration::from_secs(1));
        }
        let plan = self.plan(in_flight.len()).await?;
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
        Ok(if in_flight.is_empty() {
            plan.wait
        } else {
            // Their completion wakes us; this only bounds how stale our view can get.
            Duration::from_secs(1)
        })
    }

    /// Reads the endpoint's state and what is due, honouring its back-off.
    async fn plan(&self, in_flight: usize) -> Result<Plan, StoreError> {
        let now = (self.ctx.clock)();
        let ep = self.ep.clone();
        let sending: Vec<i64> = self.in_flight_ids.iter().copied().collect();
        self.store
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

    /// Records finished attempts and what follows from them (alerts, disabling, back-off) in
    /// one transaction, so a crash or a refused write never keeps one without the other. They
    /// leave the queue only once stored.
    async fn record(&mut self) -> Result<(), StoreError> {
        if self.unrecorded.is_empty() {
            return Ok(());
        }
        let done = Arc::new(std::mem::take(&mut self.unrecorded));
        let (ep, batch, now) = (self.ep.clone(), done.clone(), (self.ctx.clock)());
        let r = self
            .store
            .run(move |s| {
                s.atomically(|s| {
                    s.record_attempts(&ep.name, &batch)?;
                    let alerted = alerts::after_attempts(s, &ep, &batch, now)?;
                    let step = alerts::update_backoff(s, &ep, &batch, now)?;
                    Ok((alerted, step))
                })
            })
            .await;
        let (alerted, step) = match r {
            Ok(r) => r,
            Err(e) => {
                self.unrecorded = Arc::try_unwrap(done).unwrap_or_else(|a| (*a).clone());
                return Err(e);
            }
        };
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
        Ok(())
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
