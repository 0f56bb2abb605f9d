//! `watcher.toml` built from typed values instead of `format!`: one struct per table, the
//! keys of docs/configuration.md, and only the keys that were set are written, so every other
//! key keeps the daemon's default exactly as an operator's file would.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// A whole `watcher.toml`. Fields are public so a test can change one key of a config it
/// was handed; the methods chain for building one.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigBuilder {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_confirmations: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_height: Option<StartHeight>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finality_depth: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_reorg_depth: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_unreachable_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitcoind: Option<Bitcoind>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub watches: Vec<WatchEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<Api>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<Audit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreSection>,
}

/// `start_height`: the word `"tip"` or a height.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(untagged)]
pub enum StartHeight {
    Height(u32),
    #[serde(serialize_with = "tip")]
    Tip,
}

fn tip<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("tip")
}

/// One secret, or several (rotation): written as a string or a list, as operators do.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Secrets {
    One(String),
    Many(Vec<String>),
}

/// `[bitcoind]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bitcoind {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_password_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zmq_sequence: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zmq_rawtx: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zmq_rawblock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
}

/// One `[[endpoints]]` table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secrets>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<Secrets>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_schedule: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_http: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// One `[[watches]]` table: an address, or a descriptor with its gap limit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub descriptor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmations: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_amount_sat: Option<u64>,
    // A table: after the plain values, as TOML wants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<toml::Table>,
}

/// `[api]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Api {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_ips: Option<Vec<String>>,
}

/// `[audit]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// `[store]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_lease: Option<String>,
}

/// `[retention]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Retention {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
}

fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Vec<String> {
    items.into_iter().map(Into::into).collect()
}

impl ConfigBuilder {
    /// A regtest config with nothing else set.
    pub fn regtest() -> ConfigBuilder {
        ConfigBuilder::default().network("regtest")
    }

    pub fn network(mut self, name: &str) -> Self {
        self.network = Some(name.into());
        self
    }
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }
    pub fn default_confirmations(mut self, n: u32) -> Self {
        self.default_confirmations = Some(n);
        self
    }
    pub fn start_height(mut self, h: StartHeight) -> Self {
        self.start_height = Some(h);
        self
    }
    pub fn finality_depth(mut self, n: u32) -> Self {
        self.finality_depth = Some(n);
        self
    }
    pub fn alert_reorg_depth(mut self, n: u32) -> Self {
        self.alert_reorg_depth = Some(n);
        self
    }
    pub fn node_unreachable_after(mut self, d: &str) -> Self {
        self.node_unreachable_after = Some(d.into());
        self
    }
    pub fn log_format(mut self, f: &str) -> Self {
        self.log_format = Some(f.into());
        self
    }
    pub fn bitcoind(mut self, b: Bitcoind) -> Self {
        self.bitcoind = Some(b);
        self
    }
    pub fn endpoint(mut self, e: Endpoint) -> Self {
        self.endpoints.push(e);
        self
    }
    /// Changes the endpoint called `name`; panics if there is none, as a test's typo should.
    pub fn map_endpoint(mut self, name: &str, change: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        let e = self
            .endpoints
            .iter_mut()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no endpoint {name:?} in this config"));
        *e = change(std::mem::take(e));
        self
    }
    pub fn watch(mut self, w: WatchEntry) -> Self {
        self.watches.push(w);
        self
    }
    pub fn api(mut self, a: Api) -> Self {
        self.api = Some(a);
        self
    }
    pub fn audit_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.audit = Some(Audit {
            key_file: Some(path.into()),
        });
        self
    }
    pub fn retention(mut self, r: Retention) -> Self {
        self.retention = Some(r);
        self
    }
    /// A PostgreSQL store whose URL is in the environment variable `url_env`.
    pub fn postgres_env(mut self, url_env: &str, leader_lease: &str) -> Self {
        self.store = Some(StoreSection {
            url: None,
            url_env: Some(url_env.into()),
            leader_lease: Some(leader_lease.into()),
        });
        self
    }

    /// The TOML text, as the daemon reads it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config of strings, numbers and tables serialises")
    }

    /// Writes the TOML text to `path`.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_toml())
    }

    /// Parses the text as the daemon would (relative paths against the working directory).
    pub fn parse(&self) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(&self.to_toml(), "built config", None)
    }
}

impl Bitcoind {
    /// A node reached at `rpc_url` with its cookie file (how the simulated node is reached).
    pub fn cookie(rpc_url: &str, cookie_file: impl Into<PathBuf>) -> Bitcoind {
        Bitcoind {
            rpc_url: Some(rpc_url.into()),
            cookie_file: Some(cookie_file.into()),
            ..Bitcoind::default()
        }
    }
    /// The simulated node's RPC address and cookie.
    pub fn simnode(node: &crate::simnode::SimNode) -> Bitcoind {
        Bitcoind::cookie(&node.rpc_url(), node.cookie_path())
    }
    pub fn poll_interval(mut self, d: &str) -> Self {
        self.poll_interval = Some(d.into());
        self
    }
}

impl Endpoint {
    pub fn new(name: &str, url: &str) -> Endpoint {
        Endpoint {
            name: name.into(),
            url: url.into(),
            ..Endpoint::default()
        }
    }
    pub fn secret(mut self, s: &str) -> Self {
        self.secret = Some(Secrets::One(s.into()));
        self
    }
    /// Several secrets, each signing (a rotation).
    pub fn secrets<S: Into<String>>(mut self, s: impl IntoIterator<Item = S>) -> Self {
        self.secret = Some(Secrets::Many(strings(s)));
        self
    }
    pub fn url(mut self, url: &str) -> Self {
        self.url = url.into();
        self
    }
    pub fn events<S: Into<String>>(mut self, globs: impl IntoIterator<Item = S>) -> Self {
        self.events = Some(strings(globs));
        self
    }
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = Some(ordered);
        self
    }
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n);
        self
    }
    pub fn timeout(mut self, d: &str) -> Self {
        self.timeout = Some(d.into());
        self
    }
    pub fn retry_schedule<S: Into<String>>(mut self, delays: impl IntoIterator<Item = S>) -> Self {
        self.retry_schedule = Some(strings(delays));
        self
    }
    pub fn disable_after(mut self, d: &str) -> Self {
        self.disable_after = Some(d.into());
        self
    }
    pub fn failing_after(mut self, d: &str) -> Self {
        self.failing_after = Some(d.into());
        self
    }
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }
    pub fn client_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some(cert.into());
        self.client_key = Some(key.into());
        self
    }
    pub fn proxy(mut self, url: &str) -> Self {
        self.proxy = Some(url.into());
        self
    }
}

impl WatchEntry {
    pub fn address(address: &str) -> WatchEntry {
        WatchEntry {
            address: Some(address.into()),
            ..WatchEntry::default()
        }
    }
    pub fn descriptor(descriptor: &str, gap_limit: u32) -> WatchEntry {
        WatchEntry {
            descriptor: Some(descriptor.into()),
            gap_limit: Some(gap_limit),
            ..WatchEntry::default()
        }
    }
    pub fn confirmations(mut self, n: u32) -> Self {
        self.confirmations = Some(n);
        self
    }
    pub fn label(mut self, label: &str) -> Self {
        self.label = Some(label.into());
        self
    }
    /// Routes the watch's events to these endpoints only.
    pub fn endpoints<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.endpoints = Some(strings(names));
        self
    }
    pub fn min_amount_sat(mut self, sat: u64) -> Self {
        self.min_amount_sat = Some(sat);
        self
    }
    /// Sets one metadata key (the table is created on first use).
    pub fn meta(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.metadata
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        self
    }
}

impl Api {
    pub fn listen(addr: &str) -> Api {
        Api {
            listen: Some(addr.into()),
            ..Api::default()
        }
    }
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }
    pub fn allow_ips<S: Into<String>>(mut self, nets: impl IntoIterator<Item = S>) -> Self {
        self.allow_ips = Some(strings(nets));
        self
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
