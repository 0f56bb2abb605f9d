//! With a shared PostgreSQL store, this instance follows the chain only while it holds the
//! leader lease: it stands by until the lease is free, follows while it renews it, and stops
//! following the moment it cannot (another instance took it, or renewing failed for a whole
//! lease). Its chain writes are fenced besides, so a leader paused past its lease (SIGSTOP, a
//! long GC-like stall, a VM migration) writes nothing when it wakes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{follow, Backend, PgBackend};
use crate::config::Config;
use crate::dispatch::{self, alerts};
use crate::health::Role;
use crate::node::{ChainInfo, RpcClient};
use crate::pg::{Fence, PgStore};
use crate::store::SharedStore;

const WHO: &str = "leader lease";

pub(super) async fn lead(
    cfg: &Config,
    backend: &PgBackend,
    store: PgStore,
    rpc: Arc<RpcClient>,
    mut first: Option<ChainInfo>,
    ctx: &dispatch::Context,
) -> anyhow::Result<()> {
    let (holder, lease) = (backend.instance.clone(), backend.leader_lease);
    let store = SharedStore::new(store);
    loop {
        let Some((epoch, previous)) = stand_by(&store, &holder, lease, ctx).await else {
            return Ok(());
        };
        tracing::info!(epoch, instance = %holder, "took the leader lease; following the chain");
        set_role(ctx, true, epoch);
        announce(&store, epoch, &holder, previous, ctx).await;
        let fence = Fence {
            holder: holder.clone(),
            epoch,
        };
        let opened = {
            let backend = backend.clone();
            tokio::task::spawn_blocking(move || backend.open().map(|s| s.fenced(fence))).await?
        };
        let fenced = match opened {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the follower's store connection; giving the lease up");
                let h = holder.clone();
                let _ = store.run(move |s| s.resign(&h, epoch)).await;
                set_role(ctx, false, epoch);
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(lease / 4) => continue,
                }
            }
        };
        let term = ctx.shutdown.child_token();
        let term_ctx = dispatch::Context {
            shutdown: term.clone(),
            ..ctx.clone()
        };
        let follower = follow(cfg, fenced, rpc.clone(), first.take(), &term_ctx);
        tokio::pin!(follower);
        let lost = match hold(&store, &holder, epoch, lease, follower.as_mut(), ctx).await {
            Held::FollowerEnded(r) => {
                if ctx.shutdown.is_cancelled() {
                    let h = holder.clone();
                    let _ = store.run(move |s| s.resign(&h, epoch)).await;
                    tracing::info!(epoch, "leader lease given up on shutdown");
                }
                return r;
            }
            Held::Lost(why) => why,
        };
        tracing::warn!(epoch, why = %lost, "lost the leader lease: stopping the follower and standing by");
        term.cancel();
        let _ = follower.await;
        set_role(ctx, false, epoch);
    }
}

/// How a term as leader ended.
enum Held {
    /// The follower stopped (shutdown, or a fault that ends the daemon).
    FollowerEnded(anyhow::Result<()>),
    /// The lease is no longer this instance's, for this reason.
    Lost(String),
}

/// Renews the lease every quarter of it while `follower` runs, until one of them ends.
async fn hold(
    store: &SharedStore<PgStore>,
    holder: &str,
    epoch: i64,
    lease: Duration,
    mut follower: std::pin::Pin<&mut impl std::future::Future<Output = anyhow::Result<()>>>,
    ctx: &dispatch::Context,
) -> Held {
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            r = &mut follower => return Held::FollowerEnded(r),
            _ = tokio::time::sleep(lease / 4) => {}
        }
        let h = holder.to_string();
        // A renewal that hangs (a vanished server) counts as failed, so a whole lease
        // without one still ends the term.
        let renewal = tokio::time::timeout(lease / 4, store.run(move |s| s.try_lead(&h, lease)))
            .await
            .unwrap_or_else(|_| {
                Err(crate::store::StoreError::Postgres(
                    "renewing the lease timed out".into(),
                ))
            });
        match renewal {
            Ok(Some(e)) if e == epoch => {
                renewed = Instant::now();
                ctx.health.store_ok(WHO);
            }
            Ok(_) => return Held::Lost("another instance holds it now".into()),
            Err(e) => {
                ctx.health.store_failed(WHO, &e.to_string());
                if renewed.elapsed() >= lease {
                    return Held::Lost(format!("it could not be renewed for {lease:?}: {e}"));
                }
            }
        }
    }
}

fn set_role(ctx: &dispatch::Context, leader: bool, epoch: i64) {
    ctx.health.set_role(Role { leader, epoch });
    ctx.metrics.set_role(leader, epoch);
}

/// Waits until this instance takes the lease: its epoch, and who held it before. `None` on
/// shutdown.
async fn stand_by(
    store: &SharedStore<PgStore>,
    holder: &str,
    lease: Duration,
    ctx: &dispatch::Context,
) -> Option<(i64, Option<String>)> {
    let mut said: Option<String> = None;
    loop {
        let h = holder.to_string();
        let tried = store
            .run(move |s| {
                let before = s.lease()?;
                Ok((s.try_lead(&h, lease)?, before))
            })
            .await;
        let mut wait = lease / 4;
        match tried {
            Ok((Some(epoch), before)) => {
                ctx.health.store_ok(WHO);
                return Some((epoch, before.map(|l| l.holder).filter(|h| h != holder)));
            }
            Ok((None, before)) => {
                ctx.health.store_ok(WHO);
                if let Some(l) = before {
                    set_role(ctx, false, l.epoch);
                    if said.as_deref() != Some(l.holder.as_str()) {
                        tracing::info!(leader = %l.holder, epoch = l.epoch, "standing by: another instance leads");
                        said = Some(l.holder.clone());
                    }
                    // Try again just after it runs out, so a dead leader is replaced at once.
                    wait = wait.min(Duration::from_millis(l.remaining_ms as u64 + 50));
                }
            }
            Err(e) => {
                if ctx.health.store_failed(WHO, &e.to_string()) == crate::health::Change::Started {
                    tracing::error!(error = %e, "cannot reach the leader lease; retrying");
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Records `alert.leader_changed`; a failure is reported and does not stop following.
async fn announce(
    store: &SharedStore<PgStore>,
    epoch: i64,
    holder: &str,
    previous: Option<String>,
    ctx: &dispatch::Context,
) {
    let alert = alerts::leader_changed_alert(epoch, holder, previous.as_deref());
    let now = (ctx.clock)();
    match store
        .run(move |s| alerts::record_alerts(s, vec![alert], None, now))
        .await
    {
        Ok(true) => ctx.wake.notify_waiters(),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "recording alert.leader_changed failed"),
    }
}
