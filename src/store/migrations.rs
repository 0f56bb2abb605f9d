//! Versioned schema migrations, applied in order; `PRAGMA user_version` records the last one.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    -- The followed chain: the tip is the highest row. Kept back to finality depth.
    CREATE TABLE blocks (
        height INTEGER PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        prev_hash TEXT NOT NULL,
        time INTEGER NOT NULL
    );
    CREATE TABLE watches (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        confirmations INTEGER NOT NULL,
        label TEXT,
        metadata TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE tracked (
        txid TEXT NOT NULL,
        watch_id TEXT NOT NULL,
        status TEXT NOT NULL,
        block_hash TEXT,
        block_height INTEGER,
        block_time INTEGER,
        reorg_count INTEGER NOT NULL,
        fired INTEGER NOT NULL,
        outputs TEXT NOT NULL,
        inputs TEXT NOT NULL,
        PRIMARY KEY (txid, watch_id)
    );
    CREATE TABLE coins (
        outpoint TEXT PRIMARY KEY,
        watch_id TEXT NOT NULL,
        address TEXT NOT NULL,
        amount_sat INTEGER NOT NULL
    );
    -- Append-only, hash-chained event log.
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        prev_hash TEXT NOT NULL,
        payload_hash TEXT NOT NULL,
        row_hash TEXT NOT NULL
    );
    CREATE TABLE endpoints (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        disabled_reason TEXT,
        last_success_at INTEGER,
        failing_since INTEGER
    );
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        event_seq INTEGER NOT NULL REFERENCES events(seq),
        endpoint TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_status INTEGER,
        last_error TEXT,
        delivered_at INTEGER,
        UNIQUE (event_seq, endpoint)
    );
    CREATE INDEX deliveries_due ON deliveries (endpoint, status, event_seq);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
        started_at INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
        status_code INTEGER,
        error TEXT,
        response_excerpt TEXT
    );
    CREATE INDEX attempts_by_delivery ON attempts (delivery_id);
    "#,
    // 2: what tracked transactions spend (replacements, conflicts); how often blocks were
    // disconnected (ids of chain events for a block that comes back).
    r#"
    ALTER TABLE tracked ADD COLUMN spends TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE block_disconnects (hash TEXT PRIMARY KEY, count INTEGER NOT NULL);
    ALTER TABLE blocks ADD COLUMN tx_count INTEGER;
    "#,
    // 3: descriptor watches (the address column holds the descriptor) and their used indexes.
    r#"
    ALTER TABLE watches ADD COLUMN gap_limit INTEGER;
    CREATE TABLE derivations (
        watch_id TEXT NOT NULL,
        path INTEGER NOT NULL,
        used INTEGER NOT NULL,
        PRIMARY KEY (watch_id, path)
    );
    "#,
    // 4: a watch being rescanned is followed live only once its rescan reaches the tip.
    r#"
    ALTER TABLE watches ADD COLUMN rescan_next INTEGER;
    "#,
    // 5: when an unordered endpoint's next delivery falls due, without scanning its queue.
    r#"
    CREATE INDEX deliveries_next ON deliveries (endpoint, status, next_attempt_at);
    "#,
    // 6: errors stored before URLs were kept out of them may name an endpoint's credentials or
    // query token; what they said beyond that is not worth the risk.
    r#"
    UPDATE attempts SET error = 'request failed (details removed on upgrade: they named the URL)'
     WHERE error LIKE '%://%';
    UPDATE deliveries SET last_error = 'request failed (details removed on upgrade: they named the URL)'
     WHERE last_error LIKE '%://%';
    "#,
    // 7: an endpoint that refuses connections waits as a whole (one probe at a time), shared
    // by every worker; whether its alert.endpoint_failing went out for this failing spell.
    r#"
    ALTER TABLE endpoints ADD COLUMN backoff_until INTEGER;
    ALTER TABLE endpoints ADD COLUMN backoff_step INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE endpoints ADD COLUMN failing_alerted INTEGER NOT NULL DEFAULT 0;
    "#,
    // 8: a watch's events go to its endpoints only (JSON list; NULL: every endpoint), and its
    // outputs below a floor are not matched.
    r#"
    ALTER TABLE watches ADD COLUMN endpoints TEXT;
    ALTER TABLE watches ADD COLUMN min_amount_sat INTEGER NOT NULL DEFAULT 0;
    "#,
    // 9: where a tracked transaction's money came from (JSON; NULL: not known).
    r#"
    ALTER TABLE tracked ADD COLUMN senders TEXT;
    "#,
];

pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version = |c: &Connection| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0));
    if version(conn)? as usize >= MIGRATIONS.len() {
        return Ok(());
    }
    // Read the version again under the write lock: another process may have migrated meanwhile.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current = version(&tx)? as usize;
    for sql in MIGRATIONS.iter().skip(current) {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()
}
