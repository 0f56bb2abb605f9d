//! The leader lease: one row, taken when free or expired, renewed by its holder. Its epoch
//! grows whenever the holder changes, and every chain write checks it (`PgStore::check_fence`).
//! Expiry is measured on the database's clock, so the instances' clocks may disagree.

use std::time::Duration;

use super::PgStore;
use crate::store::Result;

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: i64,
    /// How long until it expires (0 once it has), on the database's clock.
    pub remaining_ms: i64,
}

impl PgStore {
    /// Takes the lease for `holder` if it is free or expired, or renews it if `holder` has it;
    /// the epoch held then, or `None` while another instance holds it.
    pub fn try_lead(&self, holder: &str, lease: Duration) -> Result<Option<i64>> {
        let ms = lease.as_millis() as i64;
        let row = self.conn.query_opt(
            "INSERT INTO leader (id, holder, epoch, expires_at)
             VALUES (1, $1, 1, clock_timestamp() + $2::bigint * interval '1 millisecond')
             ON CONFLICT (id) DO UPDATE SET
               epoch = CASE WHEN leader.holder = excluded.holder THEN leader.epoch ELSE leader.epoch + 1 END,
               holder = excluded.holder,
               expires_at = excluded.expires_at
             WHERE leader.holder = excluded.holder OR leader.expires_at <= clock_timestamp()
             RETURNING epoch",
            &[&holder, &ms],
        )?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Who holds the lease, if anyone ever took it.
    pub fn lease(&self) -> Result<Option<Lease>> {
        Ok(self
            .conn
            .query_opt(
                "SELECT holder, epoch,
                   GREATEST(0, EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000)::bigint
                 FROM leader WHERE id = 1",
                &[],
            )?
            .map(|r| Lease {
                holder: r.get(0),
                epoch: r.get(1),
                remaining_ms: r.get(2),
            }))
    }

    /// Lets the lease go at once (a clean stop), so another instance need not wait it out.
    pub fn resign(&self, holder: &str, epoch: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE leader SET expires_at = clock_timestamp() WHERE id = 1 AND holder = $1 AND epoch = $2",
            &[&holder, &epoch],
        )?;
        Ok(())
    }
}
