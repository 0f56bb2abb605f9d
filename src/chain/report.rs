//! How the follower tells what goes wrong: once when a fault starts and once when it ends (in
//! the log and in `/health`), alerts for a node unreachable too long and for a store that
//! refused writes for more than a minute.

use std::sync::atomic::Ordering;

use serde_json::json;

use super::{fields, FollowError, Follower, Outage};
use crate::event::{self, now_ms, rfc3339_ms};
use crate::health::{Change, Following};
use crate::node::ChainSource;
use crate::store::ChainStore;

/// The follower's name in health reports and metrics.
const WHO: &str = "follower";

impl<S: ChainSource, St: ChainStore> Follower<S, St> {
    /// A sync or a ZMQ batch failed; it is retried by the caller.
    pub(super) fn sync_failed(&mut self, e: &FollowError) {
        match e {
            FollowError::Node(n) if n.is_transient() => {
                self.metrics.node_reachable.store(false, Ordering::Relaxed);
                if self.health.node_failed(&e.to_string()) == Change::Started {
                    tracing::warn!(error = %e, "bitcoind unreachable; retrying with back-off");
                }
                self.node_failed(e);
            }
            FollowError::Store(_) | FollowError::Lookup(_) => {
                self.metrics.store_error(WHO);
                if self.health.store_failed(WHO, &e.to_string()) == Change::Started {
                    tracing::error!(error = %e, "store refuses chain work; retrying with back-off (nothing is lost: the step is redone)");
                }
            }
            FollowError::Node(_) => {
                let told = e.to_string();
                if told != self.last_error {
                    tracing::error!(error = %e, "sync failed; retrying with back-off");
                    self.last_error = told;
                }
            }
        }
    }

    /// A resync reached the node's tip: every incident of the follower is over.
    pub(super) fn sync_succeeded(&mut self) {
        self.last_error.clear();
        self.metrics.node_reachable.store(true, Ordering::Relaxed);
        self.health.set_following(Following::AtTip);
        if let Change::Ended(after) = self.health.node_ok() {
            tracing::info!(after_s = after.as_secs(), "bitcoind answers again");
        }
        self.node_answered();
        // The alert is written before the incident is closed, so a failed write keeps both.
        if let Some(i) = self
            .health
            .store_alert_due(crate::health::STORE_ALERT_AFTER)
        {
            let f = fields(json!({
                "since": rfc3339_ms(i.since_unix_ms), "error": i.error,
                "seconds": i.age().as_secs(), "component": WHO,
            }));
            match self.commit_other(
                event::ALERT_STORE_ERROR,
                &format!("store|{}", i.since_unix_ms),
                f,
            ) {
                Ok(()) => self.health.store_alert_recorded(),
                Err(e) => {
                    tracing::warn!(error = %e, "recording alert.store_error failed; will try again");
                    return;
                }
            }
        }
        if let Change::Ended(after) = self.health.store_ok(WHO) {
            tracing::info!(after_s = after.as_secs(), "store accepts chain work again");
        }
    }

    /// Raises `alert.node_unreachable` once the outage lasts `node_unreachable_after`.
    fn node_failed(&mut self, e: &FollowError) {
        let now = now_ms();
        let outage = self.outage.get_or_insert(Outage {
            since_ms: now,
            alerted: false,
            error: String::new(),
        });
        outage.error = e.to_string();
        if outage.alerted
            || now - outage.since_ms < self.opts.node_unreachable_after.as_millis() as i64
        {
            return;
        }
        let since = outage.since_ms;
        let fields = fields(json!({ "since": rfc3339_ms(since), "error": outage.error }));
        tracing::error!(since = %rfc3339_ms(since), "bitcoind unreachable; alerting");
        if self
            .commit_other(event::ALERT_NODE_UNREACHABLE, &since.to_string(), fields)
            .is_ok()
        {
            if let Some(o) = self.outage.as_mut() {
                o.alerted = true;
            }
        }
    }

    /// Raises `alert.node_recovered` after an outage that was alerted.
    fn node_answered(&mut self) {
        let Some(outage) = self.outage.take() else {
            return;
        };
        if !outage.alerted {
            return;
        }
        let down_secs = (now_ms() - outage.since_ms) / 1000;
        tracing::info!(down_secs, "bitcoind reachable again");
        let fields =
            fields(json!({ "since": rfc3339_ms(outage.since_ms), "down_seconds": down_secs }));
        if let Err(e) = self.commit_other(
            event::ALERT_NODE_RECOVERED,
            &outage.since_ms.to_string(),
            fields,
        ) {
            tracing::warn!(error = %e, "recording alert.node_recovered failed");
        }
    }
}
