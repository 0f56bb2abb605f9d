//! Counters and gauges shared by the follower, the dispatcher and the API, rendered as
//! Prometheus text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the delivery latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    pub tip_height: AtomicI64,
    pub node_height: AtomicI64,
    pub node_reachable: AtomicBool,
    pub resyncs: AtomicU64,
    zmq_messages: Mutex<BTreeMap<String, u64>>,
    zmq_gaps: Mutex<BTreeMap<String, u64>>,
    zmq_refused: Mutex<BTreeMap<String, u64>>,
    store_errors: Mutex<BTreeMap<String, u64>>,
    worker_restarts: Mutex<BTreeMap<String, u64>>,
    events: Mutex<BTreeMap<String, u64>>,
    deliveries: Mutex<BTreeMap<(String, String), u64>>,
    latency: Mutex<Histogram>,
    /// With a shared PostgreSQL store: 1 leading, 0 standing by (and the lease epoch).
    role: Mutex<Option<(bool, i64)>>,
}

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K) {
    *m.lock().expect("metrics lock").entry(k).or_default() += 1;
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per-endpoint queue state, read from the store at scrape time.
pub struct QueueState {
    pub endpoint: String,
    pub waiting: i64,
    pub oldest_age_seconds: f64,
}

impl Metrics {
    pub fn set_role(&self, leader: bool, epoch: i64) {
        *self.role.lock().expect("metrics lock") = Some((leader, epoch));
    }

    pub fn zmq_message(&self, topic: &str) {
        bump(&self.zmq_messages, topic.to_string());
    }

    pub fn zmq_gap(&self, topic: &str) {
        bump(&self.zmq_gaps, topic.to_string());
    }

    /// A store operation of `who` failed (it is retried).
    pub fn store_error(&self, who: &str) {
        bump(&self.store_errors, who.to_string());
    }

    /// A worker ended and was started again.
    pub fn worker_restart(&self, who: &str) {
        bump(&self.worker_restarts, who.to_string());
    }

    /// A relayed body that did not prove itself (forged or corrupt).
    pub fn zmq_refused(&self, topic: &str) {
        bump(&self.zmq_refused, topic.to_string());
    }

    pub fn event(&self, kind: &str) {
        bump(&self.events, kind.to_string());
    }

    pub fn delivery(&self, endpoint: &str, outcome: &str) {
        bump(
            &self.deliveries,
            (endpoint.to_string(), outcome.to_string()),
        );
    }

    /// Seconds from an event's commit to its successful delivery.
    pub fn delivery_latency(&self, seconds: f64) {
        let mut h = self.latency.lock().expect("metrics lock");
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    pub fn render(&self, queues: &[QueueState]) -> String {
        let mut o = String::new();
        let gauge = |o: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let tip = self.tip_height.load(Ordering::Relaxed);
        let node = self.node_height.load(Ordering::Relaxed);
        gauge(
            &mut o,
            "chainwatch_tip_height",
            "Height of the last block chainwatch processed.",
            tip.to_string(),
        );
        gauge(
            &mut o,
            "chainwatch_node_height",
            "Height of bitcoind's best block, as last seen.",
            node.to_string(),
        );
        gauge(
            &mut o,
            "chainwatch_lag_blocks",
            "Blocks the watcher is behind the node.",
            (node - tip).max(0).to_string(),
        );
        if let Some((leader, epoch)) = *self.role.lock().expect("metrics lock") {
            gauge(
                &mut o,
                "chainwatch_leader",
                "1 while this instance holds the leader lease and follows the chain, 0 on standby.",
                u8::from(leader).to_string(),
            );
            gauge(
                &mut o,
                "chainwatch_lease_epoch",
                "The leader lease's epoch: this instance's while it leads, the latest seen on standby.",
                epoch.to_string(),
            );
        }
        let up = u8::from(self.node_reachable.load(Ordering::Relaxed));
        gauge(
            &mut o,
            "chainwatch_node_reachable",
            "1 while bitcoind answers RPC.",
            up.to_string(),
        );
        let _ = writeln!(o, "# HELP chainwatch_resyncs_total Resyncs over RPC after lost ZMQ messages or restarts.\n# TYPE chainwatch_resyncs_total counter\nchainwatch_resyncs_total {}", self.resyncs.load(Ordering::Relaxed));
        counter_family(
            &mut o,
            "chainwatch_zmq_messages_total",
            "ZMQ messages received.",
            "topic",
            &self.zmq_messages,
        );
        counter_family(
            &mut o,
            "chainwatch_zmq_gaps_total",
            "ZMQ counter gaps (lost messages or restarts).",
            "topic",
            &self.zmq_gaps,
        );
        counter_family(
            &mut o,
            "chainwatch_store_errors_total",
            "Store operations that failed and were retried, by component.",
            "component",
            &self.store_errors,
        );
        counter_family(
            &mut o,
            "chainwatch_worker_restarts_total",
            "Workers that ended and were started again.",
            "worker",
            &self.worker_restarts,
        );
        counter_family(
            &mut o,
            "chainwatch_zmq_refused_total",
            "ZMQ bodies refused because they did not prove themselves (forged or corrupt).",
            "topic",
            &self.zmq_refused,
        );
        counter_family(
            &mut o,
            "chainwatch_events_total",
            "Events recorded.",
            "type",
            &self.events,
        );
        let _ = writeln!(o, "# HELP chainwatch_deliveries_total Delivery attempts by endpoint and outcome.\n# TYPE chainwatch_deliveries_total counter");
        for ((ep, outcome), n) in self.deliveries.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                o,
                "chainwatch_deliveries_total{{endpoint=\"{}\",outcome=\"{}\"}} {n}",
                label(ep),
                label(outcome)
            );
        }
        let h = self.latency.lock().expect("metrics lock");
        let _ = writeln!(o, "# HELP chainwatch_delivery_latency_seconds From an event's commit to its successful delivery.\n# TYPE chainwatch_delivery_latency_seconds histogram");
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "chainwatch_delivery_latency_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            o,
            "chainwatch_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(o, "chainwatch_delivery_latency_seconds_sum {}\nchainwatch_delivery_latency_seconds_count {}", h.sum, h.count);
        let _ = writeln!(o, "# HELP chainwatch_queue_depth Deliveries waiting (pending or failed) per endpoint.\n# TYPE chainwatch_queue_depth gauge");
        for q in queues {
            let _ = writeln!(
                o,
                "chainwatch_queue_depth{{endpoint=\"{}\"}} {}",
                label(&q.endpoint),
                q.waiting
            );
        }
        let _ = writeln!(o, "# HELP chainwatch_oldest_pending_age_seconds Age of the oldest waiting delivery per endpoint.\n# TYPE chainwatch_oldest_pending_age_seconds gauge");
        for q in queues {
            let _ = writeln!(
                o,
                "chainwatch_oldest_pending_age_seconds{{endpoint=\"{}\"}} {}",
                label(&q.endpoint),
                q.oldest_age_seconds
            );
        }
        o
    }
}

fn counter_family(
    o: &mut String,
    name: &str,
    help: &str,
    key: &str,
    m: &Mutex<BTreeMap<String, u64>>,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
    for (k, n) in m.lock().expect("metrics lock").iter() {
        let _ = writeln!(o, "{name}{{{key}=\"{}\"}} {n}", label(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every `chainwatch_*` name in `text`.
    fn names_in(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("chainwatch_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn every_metric_the_dashboard_and_the_alert_rules_name_is_exported() {
        let m = Metrics::default();
        m.set_role(true, 3);
        let queues = [QueueState {
            endpoint: "shop".into(),
            waiting: 1,
            oldest_age_seconds: 2.0,
        }];
        let rendered = m.render(&queues);
        let mut exported = BTreeSet::new();
        for line in rendered.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
                exported.insert(name.to_string());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        exported.insert(format!("{name}{suffix}"));
                    }
                }
            }
        }
        let dir = env!("CARGO_MANIFEST_DIR");
        for file in [
            "contrib/grafana/chainwatch.json",
            "contrib/prometheus/alerts.yml",
        ] {
            let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
            let named = names_in(&text);
            assert!(named.len() >= 8, "{file} names {named:?}");
            let missing: Vec<_> = named.difference(&exported).collect();
            assert!(
                missing.is_empty(),
                "{file} names metrics /metrics lacks: {missing:?}"
            );
        }
    }
}
