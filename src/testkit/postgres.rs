//! A fresh PostgreSQL database per test, on the server `CHAINWATCH_TEST_PG_URL` names (CI starts
//! one with `scripts/pg-cluster`). Without that variable the PostgreSQL tests skip, saying so,
//! unless `CHAINWATCH_REQUIRE_PG` is set (CI sets it), where they fail instead.

use crate::pg::PgConn;

pub const URL_VAR: &str = "CHAINWATCH_TEST_PG_URL";
pub const REQUIRE_VAR: &str = "CHAINWATCH_REQUIRE_PG";

/// The URL of a new, empty database, or `None` (the test should return) when no server is
/// configured.
pub fn fresh_database(test: &str) -> Option<String> {
    let Ok(server) = std::env::var(URL_VAR) else {
        assert!(
            std::env::var_os(REQUIRE_VAR).is_none(),
            "{REQUIRE_VAR} is set but {URL_VAR} is not: the PostgreSQL tests cannot run"
        );
        eprintln!(
            "skipping {test}: set {URL_VAR} to a PostgreSQL server (scripts/pg-cluster start)"
        );
        return None;
    };
    let slug = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(30)
        .collect::<String>()
        .to_lowercase();
    let name = format!("cw_{slug}_{:08x}", rand::random::<u32>());
    let admin = PgConn::open(&server).expect("the test PostgreSQL server answers");
    drop_earlier(&admin, &slug);
    admin
        .batch(&format!("CREATE DATABASE {name}"))
        .expect("creating a test database");
    let mut url = url::Url::parse(&server).expect("CHAINWATCH_TEST_PG_URL is a URL");
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

/// Drops the databases earlier runs of this test left, unless someone is connected to one.
/// Left to pile up (hundreds after a few days of runs), they halved this machine's PostgreSQL
/// throughput. Best effort: a database in use is kept.
fn drop_earlier(admin: &PgConn, slug: &str) {
    let pattern = format!("^cw_{slug}_[0-9a-f]{{8}}$");
    let Ok(rows) = admin.query(
        "SELECT datname::text FROM pg_database WHERE datname ~ $1
           AND datname NOT IN (SELECT datname FROM pg_stat_activity WHERE datname IS NOT NULL)",
        &[&pattern],
    ) else {
        return;
    };
    for r in rows {
        let old: String = r.get(0);
        let _ = admin.batch(&format!("DROP DATABASE IF EXISTS {old}"));
    }
}
