//! What `/health` tells: whether the follower is at the node's tip, whether the store accepts
//! writes, and whether every worker is alive. Workers report incidents here; an incident is
//! logged by its reporter once when it starts and once when it ends, never per retry. A leaf:
//! it imports nothing of the crate.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a store incident lasts before `alert.store_error`.
pub const STORE_ALERT_AFTER: Duration = Duration::from_secs(60);

/// An ongoing fault: since when, and the latest error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    pub since_unix_ms: i64,
    started: Instant,
    pub error: String,
}

impl Incident {
    fn new(error: &str) -> Incident {
        let since_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Incident {
            since_unix_ms,
            started: Instant::now(),
            error: error.to_string(),
        }
    }

    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Where the follower stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Following {
    /// Not synced yet since start.
    #[default]
    Starting,
    AtTip,
    Behind {
        tip: i64,
        node: i64,
    },
}

/// This instance's part when several share a PostgreSQL store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// Whether it holds the leader lease (and follows the chain).
    pub leader: bool,
    /// The lease's epoch: this instance's while it leads, the latest seen while it stands by.
    pub epoch: i64,
}

#[derive(Default)]
struct State {
    following: Following,
    /// None: a store of one instance (SQLite), which always follows.
    role: Option<Role>,
    node: Option<Incident>,
    /// Store incidents per reporter (each worker has its own connection).
    store: BTreeMap<String, Incident>,
    /// Workers that ended and have not been restarted yet, with why.
    dead: BTreeMap<String, String>,
    store_alerted: bool,
}

#[derive(Default)]
pub struct Health {
    state: Mutex<State>,
}

/// What a report changed, so the reporter can log it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Started,
    Ongoing,
    /// The incident ended after this long.
    Ended(Duration),
    Nothing,
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_following(&self, f: Following) {
        self.state().following = f;
    }

    /// A standby follows nothing: its following and node state start afresh when it leads.
    pub fn set_role(&self, role: Role) {
        let mut s = self.state();
        if !role.leader {
            s.following = Following::Starting;
            s.node = None;
        }
        s.role = Some(role);
    }

    pub fn role(&self) -> Option<Role> {
        self.state().role
    }

    pub fn node_failed(&self, error: &str) -> Change {
        let mut s = self.state();
        match &mut s.node {
            Some(i) => {
                i.error = error.to_string();
                Change::Ongoing
            }
            None => {
                s.node = Some(Incident::new(error));
                Change::Started
            }
        }
    }

    pub fn node_ok(&self) -> Change {
        match self.state().node.take() {
            Some(i) => Change::Ended(i.age()),
            None => Change::Nothing,
        }
    }

    /// A write (or read) of `who`'s store connection failed.
    pub fn store_failed(&self, who: &str, error: &str) -> Change {
        let mut s = self.state();
        match s.store.get_mut(who) {
            Some(i) => {
                i.error = error.to_string();
                Change::Ongoing
            }
            None => {
                s.store.insert(who.to_string(), Incident::new(error));
                Change::Started
            }
        }
    }

    /// `who`'s store work succeeded.
    pub fn store_ok(&self, who: &str) -> Change {
        let mut s = self.state();
        let Some(i) = s.store.remove(who) else {
            return Change::Nothing;
        };
        if s.store.is_empty() {
            s.store_alerted = false;
        }
        Change::Ended(i.age())
    }

    /// The oldest store incident, if one has lasted `after` and no one has claimed its alert;
    /// the caller records `alert.store_error` and calls `store_alert_recorded`.
    pub fn store_alert_due(&self, after: Duration) -> Option<Incident> {
        let s = self.state();
        if s.store_alerted {
            return None;
        }
        s.store
            .values()
            .min_by_key(|i| i.since_unix_ms)
            .filter(|i| i.age() >= after)
            .cloned()
    }

    pub fn store_alert_recorded(&self) {
        self.state().store_alerted = true;
    }

    pub fn worker_ended(&self, who: &str, why: &str) {
        self.state().dead.insert(who.to_string(), why.to_string());
    }

    pub fn worker_running(&self, who: &str) {
        self.state().dead.remove(who);
    }

    /// Everything that keeps `/health` from saying ok, in words; empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        let s = self.state();
        let mut out = Vec::new();
        if let Some(i) = &s.node {
            out.push(format!(
                "node unreachable since {} ({}s): {}",
                rfc3339(i.since_unix_ms),
                i.age().as_secs(),
                i.error
            ));
        }
        let standby = s.role.is_some_and(|r| !r.leader);
        match &s.following {
            _ if standby => {}
            Following::AtTip => {}
            Following::Starting if s.node.is_none() => {
                out.push("follower: not synced with the node yet".into())
            }
            Following::Starting => {}
            Following::Behind { tip, node } => {
                out.push(format!("follower: at height {tip}, the node is at {node}"))
            }
        }
        for (who, i) in &s.store {
            out.push(format!(
                "store: {} ({who}, since {}, {}s)",
                i.error,
                rfc3339(i.since_unix_ms),
                i.age().as_secs()
            ));
        }
        for (who, why) in &s.dead {
            out.push(format!("worker {who} is not running: {why}"));
        }
        out
    }

    pub fn following(&self) -> Following {
        self.state().following.clone()
    }
}

fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incident_is_reported_once_when_it_starts_and_once_when_it_ends() {
        let h = Health::default();
        h.set_following(Following::AtTip);
        assert!(h.problems().is_empty());
        assert_eq!(
            h.store_failed("dispatch:shop", "database is locked"),
            Change::Started
        );
        assert_eq!(
            h.store_failed("dispatch:shop", "database is locked"),
            Change::Ongoing
        );
        let p = h.problems();
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("store: database is locked (dispatch:shop, since "),
            "{p:?}"
        );
        assert!(matches!(h.store_ok("dispatch:shop"), Change::Ended(_)));
        assert_eq!(h.store_ok("dispatch:shop"), Change::Nothing);
        assert!(h.problems().is_empty());
    }

    #[test]
    fn a_store_alert_is_due_once_per_incident() {
        let h = Health::default();
        h.store_failed("follower", "disk I/O error");
        assert!(
            h.store_alert_due(Duration::from_secs(60)).is_none(),
            "not yet a minute"
        );
        let i = h.store_alert_due(Duration::ZERO).expect("due");
        assert_eq!(i.error, "disk I/O error");
        h.store_alert_recorded();
        assert!(h.store_alert_due(Duration::ZERO).is_none(), "claimed");
        h.store_ok("follower");
        h.store_failed("follower", "disk I/O error");
        assert!(
            h.store_alert_due(Duration::ZERO).is_some(),
            "a new incident, a new alert"
        );
    }

    #[test]
    fn node_following_and_workers_each_name_their_problem() {
        let h = Health::default();
        assert_eq!(h.problems(), vec!["follower: not synced with the node yet"]);
        h.node_failed("connection refused");
        let p = h.problems();
        assert!(
            p[0].starts_with("node unreachable since ") && p[0].ends_with("connection refused")
        );
        assert_eq!(p.len(), 1, "{p:?}");
        h.node_ok();
        h.set_following(Following::Behind { tip: 5, node: 9 });
        h.worker_ended("dispatch:shop", "panicked");
        assert_eq!(
            h.problems(),
            vec![
                "follower: at height 5, the node is at 9".to_string(),
                "worker dispatch:shop is not running: panicked".to_string()
            ]
        );
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_187_262_000), "2025-11-26T20:01:02Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
