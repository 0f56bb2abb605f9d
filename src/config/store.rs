//! `[store]`: SQLite in the data directory (the default), or a PostgreSQL database shared by
//! several instances, one of which leads (holds the lease) at a time.

use std::time::Duration;

use serde::Deserialize;

use super::{duration, env_secret, invalid, ConfigError};
use crate::net::redact_url;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    url: Option<String>,
    url_env: Option<String>,
    leader_lease: Option<String>,
}

/// Where the store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `data_dir/chainwatch.sqlite`.
    Sqlite,
    /// A PostgreSQL database; the URL may carry a password, so it is never printed whole.
    Postgres {
        url: String,
        /// How long a leader that stopped renewing keeps the lease.
        leader_lease: Duration,
    },
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Sqlite => f.write_str("Sqlite"),
            StoreConfig::Postgres { url, leader_lease } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .field("leader_lease", leader_lease)
                .finish(),
        }
    }
}

impl StoreConfig {
    pub fn is_postgres(&self) -> bool {
        matches!(self, StoreConfig::Postgres { .. })
    }
}

/// Whether `url` names a PostgreSQL database (the only other backend).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl RawStore {
    pub(super) fn validate(self) -> Result<StoreConfig, ConfigError> {
        let url = match (self.url, self.url_env) {
            (Some(_), Some(env)) => {
                return Err(invalid(
                    "store.url_env",
                    env,
                    "set store.url or store.url_env, not both",
                ))
            }
            (Some(url), None) => url,
            (None, Some(env)) => env_secret("store.url_env", &env)?,
            (None, None) => "sqlite".to_string(),
        };
        let lease_text = self.leader_lease.as_deref();
        if url == "sqlite" {
            if let Some(lease) = lease_text {
                return Err(invalid(
                    "store.leader_lease",
                    lease,
                    "only a PostgreSQL store has a leader lease",
                ));
            }
            return Ok(StoreConfig::Sqlite);
        }
        if !is_postgres_url(&url) {
            return Err(invalid(
                "store.url",
                redact_url(&url),
                "expected \"sqlite\" or a postgres://user:password@host:port/database URL",
            ));
        }
        let leader_lease = duration("store.leader_lease", lease_text, "10s")?;
        if leader_lease < Duration::from_secs(2) || leader_lease > Duration::from_secs(600) {
            return Err(invalid(
                "store.leader_lease",
                lease_text.unwrap_or_default(),
                "must be between 2s and 10m",
            ));
        }
        Ok(StoreConfig::Postgres { url, leader_lease })
    }
}
