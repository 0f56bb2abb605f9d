//! `chainwatch store migrate --to postgres://…`: copies a SQLite store, history and chain
//! included, into an empty PostgreSQL database, in one transaction, then checks the copy (row
//! counts and the keyed event log under the same audit key).

use std::path::Path;

use tokio_postgres::types::ToSql;

use super::conn::{PgConn, BEGIN};
use super::schema;
use crate::store::{db_path, Result, StoreError};

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Bool,
}

use Kind::{Bool, Int, Text};

/// Every table and column a SQLite store holds, parents before the rows that refer to them.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    ("meta", &[("key", Text), ("value", Text)]),
    (
        "blocks",
        &[
            ("height", Int),
            ("hash", Text),
            ("prev_hash", Text),
            ("time", Int),
            ("tx_count", Int),
        ],
    ),
    ("block_disconnects", &[("hash", Text), ("count", Int)]),
    (
        "watches",
        &[
            ("id", Text),
            ("address", Text),
            ("confirmations", Int),
            ("label", Text),
            ("metadata", Text),
            ("source", Text),
            ("created_at", Int),
            ("gap_limit", Int),
            ("rescan_next", Int),
            ("endpoints", Text),
            ("min_amount_sat", Int),
        ],
    ),
    (
        "tracked",
        &[
            ("txid", Text),
            ("watch_id", Text),
            ("status", Text),
            ("block_hash", Text),
            ("block_height", Int),
            ("block_time", Int),
            ("reorg_count", Int),
            ("fired", Int),
            ("outputs", Text),
            ("inputs", Text),
            ("spends", Text),
            ("senders", Text),
        ],
    ),
    (
        "coins",
        &[
            ("outpoint", Text),
            ("watch_id", Text),
            ("address", Text),
            ("amount_sat", Int),
        ],
    ),
    (
        "derivations",
        &[("watch_id", Text), ("path", Int), ("used", Int)],
    ),
    (
        "events",
        &[
            ("seq", Int),
            ("id", Text),
            ("type", Text),
            ("body", Text),
            ("created_at", Int),
            ("prev_hash", Text),
            ("payload_hash", Text),
            ("row_hash", Text),
        ],
    ),
    (
        "endpoints",
        &[
            ("name", Text),
            ("url", Text),
            ("events", Text),
            ("enabled", Bool),
            ("disabled_reason", Text),
            ("last_success_at", Int),
            ("failing_since", Int),
            ("backoff_until", Int),
            ("backoff_step", Int),
            ("failing_alerted", Bool),
        ],
    ),
    (
        "deliveries",
        &[
            ("id", Int),
            ("event_seq", Int),
            ("endpoint", Text),
            ("status", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("last_status", Int),
            ("last_error", Text),
            ("delivered_at", Int),
        ],
    ),
    (
        "attempts",
        &[
            ("id", Int),
            ("delivery_id", Int),
            ("started_at", Int),
            ("duration_ms", Int),
            ("status_code", Int),
            ("error", Text),
            ("response_excerpt", Text),
        ],
    ),
];

/// Rows per INSERT statement.
const BATCH: usize = 500;

/// One copied value, typed as its PostgreSQL column.
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Bool(Option<bool>),
}

impl Value {
    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Value::Int(v) => v,
            Value::Text(v) => v,
            Value::Bool(v) => v,
        }
    }
}

fn read(row: &rusqlite::Row, i: usize, kind: Kind) -> rusqlite::Result<Value> {
    Ok(match kind {
        Int => Value::Int(row.get(i)?),
        Text => Value::Text(row.get(i)?),
        Bool => Value::Bool(row.get::<_, Option<i64>>(i)?.map(|v| v != 0)),
    })
}

/// How many rows of each table were copied.
pub type Copied = Vec<(&'static str, u64)>;

/// Copies the SQLite store in `data_dir` into the empty database at `url`; `progress` hears
/// each table as it is done.
pub fn migrate_sqlite(
    data_dir: &Path,
    url: &str,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Copied> {
    let path = db_path(data_dir);
    if !path.exists() {
        return Err(StoreError::DataDir {
            path: path.display().to_string(),
            reason: "no SQLite store here to migrate".into(),
        });
    }
    let mut sqlite =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    sqlite.busy_timeout(crate::store::BUSY_TIMEOUT)?;
    // One snapshot of the source, though a daemon should not be writing it.
    let snapshot = sqlite.transaction()?;
    let pg = PgConn::open(url)?;
    schema::migrate(&pg)?;
    let level = pg.begin(BEGIN)?;
    let copied = copy_all(&snapshot, &pg, progress);
    pg.end(level, copied)
}

fn copy_all(
    sqlite: &rusqlite::Connection,
    pg: &PgConn,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Copied> {
    for table in ["events", "blocks", "watches", "meta"] {
        let n: i64 = pg
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])?
            .get(0);
        if n > 0 {
            return Err(StoreError::Corrupt(format!(
                "the target database is not empty (its {table} table has {n} rows): migrate into a new database"
            )));
        }
    }
    // Another instance started on it must not lead meanwhile.
    pg.batch("LOCK TABLE meta, blocks, events, deliveries, leader IN EXCLUSIVE MODE")?;
    let mut copied = Vec::new();
    for (table, columns) in TABLES {
        let n = copy_table(sqlite, pg, table, columns)?;
        progress(table, n);
        copied.push((*table, n));
    }
    // Serial ids continue after the copied ones.
    for table in ["deliveries", "attempts"] {
        pg.execute(
            &format!("SELECT setval(pg_get_serial_sequence('{table}', 'id'), GREATEST((SELECT max(id) FROM {table}), 1))"),
            &[],
        )?;
    }
    Ok(copied)
}

fn copy_table(
    sqlite: &rusqlite::Connection,
    pg: &PgConn,
    table: &str,
    columns: &[(&str, Kind)],
) -> Result<u64> {
    let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let mut stmt = sqlite.prepare(&format!("SELECT {} FROM {table}", names.join(", ")))?;
    let mut rows = stmt.query([])?;
    let mut batch: Vec<Vec<Value>> = Vec::with_capacity(BATCH);
    let mut total = 0u64;
    loop {
        let row = rows.next()?;
        if let Some(r) = row {
            let values = columns
                .iter()
                .enumerate()
                .map(|(i, (_, kind))| read(r, i, *kind))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            batch.push(values);
        }
        if batch.len() == BATCH || (row.is_none() && !batch.is_empty()) {
            insert(pg, table, &names, &batch)?;
            total += batch.len() as u64;
            batch.clear();
        }
        if row.is_none() {
            return Ok(total);
        }
    }
}

fn insert(pg: &PgConn, table: &str, names: &[&str], rows: &[Vec<Value>]) -> Result<()> {
    let width = names.len();
    let tuples: Vec<String> = (0..rows.len())
        .map(|r| {
            let slots: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
            format!("({})", slots.join(", "))
        })
        .collect();
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES {}",
        names.join(", "),
        tuples.join(", ")
    );
    let params: Vec<&(dyn ToSql + Sync)> = rows.iter().flatten().map(Value::param).collect();
    pg.execute(&sql, &params)?;
    Ok(())
}
