//! The PostgreSQL schema, as versioned migrations applied in order under an advisory lock (so
//! instances starting together migrate once). The tables are SQLite's, with PostgreSQL types,
//! plus what sharing the database needs: the leader lease and delivery claims.

use super::conn::PgConn;
use crate::store::Result;

/// The advisory lock key taken while migrating ("chainwatch" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x6368_6169_6e77;

const MIGRATIONS: &[&str] = &[
    // 1: the first schema, at SQLite's seventh migration.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE blocks (
        height BIGINT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        prev_hash TEXT NOT NULL,
        time BIGINT NOT NULL,
        tx_count BIGINT
    );
    CREATE TABLE block_disconnects (hash TEXT PRIMARY KEY, count BIGINT NOT NULL);
    CREATE TABLE watches (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        confirmations BIGINT NOT NULL,
        label TEXT,
        metadata TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        gap_limit BIGINT,
        rescan_next BIGINT
    );
    CREATE TABLE tracked (
        txid TEXT NOT NULL,
        watch_id TEXT NOT NULL,
        status TEXT NOT NULL,
        block_hash TEXT,
        block_height BIGINT,
        block_time BIGINT,
        reorg_count BIGINT NOT NULL,
        fired BIGINT NOT NULL,
        outputs TEXT NOT NULL,
        inputs TEXT NOT NULL,
        spends TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (txid, watch_id)
    );
    CREATE TABLE coins (
        outpoint TEXT PRIMARY KEY,
        watch_id TEXT NOT NULL,
        address TEXT NOT NULL,
        amount_sat BIGINT NOT NULL
    );
    CREATE TABLE derivations (
        watch_id TEXT NOT NULL,
        path BIGINT NOT NULL,
        used BIGINT NOT NULL,
        PRIMARY KEY (watch_id, path)
    );
    CREATE TABLE events (
        seq BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        prev_hash TEXT NOT NULL,
        payload_hash TEXT NOT NULL,
        row_hash TEXT NOT NULL
    );
    -- order_holder: the one instance serving an ordered endpoint, until order_until.
    CREATE TABLE endpoints (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        enabled BOOLEAN NOT NULL DEFAULT true,
        disabled_reason TEXT,
        last_success_at BIGINT,
        failing_since BIGINT,
        backoff_until BIGINT,
        backoff_step BIGINT NOT NULL DEFAULT 0,
        failing_alerted BOOLEAN NOT NULL DEFAULT false,
        order_holder TEXT,
        order_until TIMESTAMPTZ
    );
    -- claimed_by/claim_until: an instance sending it; a dead instance's claim runs out.
    CREATE TABLE deliveries (
        id BIGSERIAL PRIMARY KEY,
        event_seq BIGINT NOT NULL REFERENCES events(seq),
        endpoint TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        last_status BIGINT,
        last_error TEXT,
        delivered_at BIGINT,
        claimed_by TEXT,
        claim_until TIMESTAMPTZ,
        UNIQUE (event_seq, endpoint)
    );
    CREATE INDEX deliveries_queue ON deliveries (endpoint, event_seq) WHERE status IN ('pending', 'failed');
    CREATE INDEX deliveries_by_status ON deliveries (status, endpoint);
    CREATE TABLE attempts (
        id BIGSERIAL PRIMARY KEY,
        delivery_id BIGINT NOT NULL REFERENCES deliveries(id),
        started_at BIGINT NOT NULL,
        duration_ms BIGINT NOT NULL,
        status_code BIGINT,
        error TEXT,
        response_excerpt TEXT
    );
    CREATE INDEX attempts_by_delivery ON attempts (delivery_id);
    -- The leader lease: one row; epoch grows with every change of holder (fencing).
    CREATE TABLE leader (
        id SMALLINT PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    "#,
    // 2: a watch's events go to its endpoints only (JSON list; NULL: every endpoint), and its
    // outputs below a floor are not matched (SQLite's eighth).
    r#"
    ALTER TABLE watches ADD COLUMN endpoints TEXT;
    ALTER TABLE watches ADD COLUMN min_amount_sat BIGINT NOT NULL DEFAULT 0;
    "#,
    // 3: where a tracked transaction's money came from (SQLite's ninth).
    r#"
    ALTER TABLE tracked ADD COLUMN senders TEXT;
    "#,
    // 4: no foreign keys on the outbox. Their per-row check doubled the cost of inserting a
    // block's deliveries (8 of 16 ms for 1,000 here) and weighs on every attempt recorded;
    // the store writes a delivery in the transaction of its event, and retention deletes
    // attempts, deliveries and events in that order, so they guarded nothing it relies on.
    r#"
    ALTER TABLE deliveries DROP CONSTRAINT IF EXISTS deliveries_event_seq_fkey;
    ALTER TABLE attempts DROP CONSTRAINT IF EXISTS attempts_delivery_id_fkey;
    "#,
    // 5: when an endpoint's next delivery falls due, asked after every delivery step, read
    // from an index instead of every queued row (1.4 ms a step with 10,000 queued).
    r#"
    CREATE INDEX deliveries_due ON deliveries (endpoint, next_attempt_at) WHERE status IN ('pending', 'failed');
    "#,
    // 6: room on each page of the queue, so that claiming a delivery (which changes no
    // indexed column) writes its new row version beside the old one and touches no index:
    // a claim of 64 took 0.95 ms on full pages, 0.6 ms with this. New pages only; rows
    // already queued keep theirs.
    r#"
    ALTER TABLE deliveries SET (fillfactor = 60);
    "#,
];

/// Applies the migrations this database lacks.
pub fn migrate(conn: &PgConn) -> Result<()> {
    conn.transaction(|| {
        conn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        conn.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
        let current: i64 = conn
            .query_opt("SELECT version FROM schema_version", &[])?
            .map(|r| r.get(0))
            .unwrap_or(0);
        for sql in MIGRATIONS.iter().skip(current as usize) {
            conn.batch(sql)?;
        }
        let latest = MIGRATIONS.len() as i64;
        if current == 0 {
            conn.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&latest],
            )?;
        } else if current < latest {
            conn.execute("UPDATE schema_version SET version = $1", &[&latest])?;
        }
        Ok(())
    })
}
