//! `watcher.toml`: parsing, defaults and validation. Every refusal is one line naming key and value.

mod endpoint;
mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitcoin::Network;
use serde::Deserialize;

use crate::net::redact_url;
use crate::sign::Secret;
pub use crate::watch::network_name;
use crate::watch::Watch;
use endpoint::RawEndpoint;
use store::RawStore;
pub use store::{is_postgres_url, StoreConfig};

/// A configuration refusal: which key, which value, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config {path} line {line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    #[error("config key {key} = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

pub fn invalid(
    key: impl Into<String>,
    value: impl ToString,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// One string or a list of strings (secrets may be several, for rotation).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum StartHeightRaw {
    Word(String),
    Height(u32),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_network")]
    network: String,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_confirmations")]
    default_confirmations: u32,
    #[serde(default)]
    start_height: Option<StartHeightRaw>,
    #[serde(default = "default_finality_depth")]
    finality_depth: u32,
    #[serde(default = "default_alert_reorg_depth")]
    alert_reorg_depth: u32,
    #[serde(default)]
    node_unreachable_after: Option<String>,
    #[serde(default)]
    log_format: Option<String>,
    #[serde(default)]
    bitcoind: RawBitcoind,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    watches: Vec<RawWatch>,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    store: RawStore,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    attempts: Option<String>,
    events: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBitcoind {
    rpc_url: Option<String>,
    cookie_file: Option<PathBuf>,
    rpc_user: Option<String>,
    rpc_password: Option<String>,
    rpc_password_env: Option<String>,
    zmq_sequence: Option<String>,
    zmq_rawtx: Option<String>,
    zmq_rawblock: Option<String>,
    poll_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    address: Option<String>,
    descriptor: Option<String>,
    gap_limit: Option<u32>,
    confirmations: Option<u32>,
    label: Option<String>,
    metadata: Option<toml::Table>,
    endpoints: Option<Vec<String>>,
    min_amount_sat: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    token: Option<String>,
    token_env: Option<String>,
    allow_ips: Option<Vec<String>>,
}

fn default_network() -> String {
    "regtest".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_confirmations() -> u32 {
    3
}
fn default_finality_depth() -> u32 {
    100
}
fn default_alert_reorg_depth() -> u32 {
    2
}

/// Where the first run starts scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartHeight {
    Tip,
    Height(u32),
}

#[derive(Clone)]
pub enum RpcAuth {
    Cookie(PathBuf),
    UserPass { user: String, password: String },
}

#[derive(Clone)]
pub struct BitcoindConfig {
    pub rpc_url: String,
    pub auth: RpcAuth,
    pub zmq_sequence: Option<String>,
    pub zmq_rawtx: Option<String>,
    pub zmq_rawblock: Option<String>,
    pub poll_interval: Duration,
}

#[derive(Clone)]
pub struct EndpointConfig {
    pub name: String,
    pub url: String,
    pub secrets: Vec<Secret>,
    pub events: Vec<String>,
    pub ordered: bool,
    pub timeout: Duration,
    pub retry_schedule: Vec<Duration>,
    pub concurrency: u32,
    pub disable_after: Duration,
    /// alert.endpoint_failing after failing this long without a success.
    pub failing_after: Duration,
    pub tls: EndpointTls,
    /// An explicit proxy; environment proxies (HTTP_PROXY …) are never used.
    pub proxy: Option<String>,
}

// Debug by hand for everything that holds a secret or a URL: a `{:?}` anywhere must not leak.
impl std::fmt::Debug for RpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcAuth::Cookie(p) => f.debug_tuple("Cookie").field(p).finish(),
            RpcAuth::UserPass { .. } => write!(f, "UserPass(not shown)"),
        }
    }
}

impl std::fmt::Debug for BitcoindConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitcoindConfig")
            .field("rpc_url", &redact_url(&self.rpc_url))
            .field("auth", &self.auth)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("events", &self.events)
            .field("ordered", &self.ordered)
            .field("tls", &self.tls)
            .field("proxy", &self.proxy.as_deref().map(redact_url))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "(not shown)"))
            .field("allow_ips", &self.allow_ips)
            .finish()
    }
}

/// TLS material of an endpoint, read and parsed at start so a bad file is refused there.
#[derive(Clone, Default)]
pub struct EndpointTls {
    /// PEM certificates trusted in addition to the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain followed by the private key, for mutual TLS.
    pub identity_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for EndpointTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material into logs.
        f.debug_struct("EndpointTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_identity", &self.identity_pem.is_some())
            .finish()
    }
}

#[derive(Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub allow_ips: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub network: Network,
    pub data_dir: PathBuf,
    pub default_confirmations: u32,
    pub start_height: StartHeight,
    pub finality_depth: u32,
    pub alert_reorg_depth: u32,
    pub node_unreachable_after: Duration,
    pub json_logs: bool,
    pub bitcoind: BitcoindConfig,
    pub endpoints: Vec<EndpointConfig>,
    pub watches: Vec<Watch>,
    pub api: ApiConfig,
    /// The HMAC key of the event log's chain (`[audit] key_file`; default data_dir/audit.key).
    pub audit_key_file: PathBuf,
    /// `[retention] attempts`: attempt records and delivered delivery rows kept this long.
    pub retain_attempts: Duration,
    /// `[retention] events`: events kept this long (default: forever).
    pub retain_events: Option<Duration>,
    /// `[store]`: SQLite in the data directory, or PostgreSQL.
    pub store: StoreConfig,
}

/// The audit key's file name in the data directory when `[audit] key_file` is not set.
pub const AUDIT_KEY_FILE: &str = "audit.key";

/// A bearer token shorter than this could be guessed.
pub const MIN_API_TOKEN_CHARS: usize = 32;

pub const DEFAULT_RETRY_SCHEDULE: [&str; 9] =
    ["5s", "5m", "30m", "2h", "5h", "10h", "14h", "20h", "24h"];

/// The spec's network names.
pub fn parse_network(name: &str) -> Option<Network> {
    Some(match name {
        "mainnet" => Network::Bitcoin,
        "testnet" => Network::Testnet,
        "testnet4" => Network::Testnet4,
        "signet" => Network::Signet,
        "regtest" => Network::Regtest,
        _ => return None,
    })
}

/// The name `getblockchaininfo` reports as `chain` for a network.
pub fn core_chain_name(network: Network) -> &'static str {
    match network {
        Network::Bitcoin => "main",
        Network::Testnet => "test",
        Network::Testnet4 => "testnet4",
        Network::Signet => "signet",
        _ => "regtest",
    }
}

/// "500ms", "2s", "5m", "2h", "1d".
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

fn duration(key: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or(default);
    parse_duration(text).ok_or_else(|| {
        invalid(
            key,
            text,
            "expected a duration such as \"500ms\", \"15s\", \"5m\", \"2h\" or \"1d\"",
        )
    })
}

fn is_loopback_url(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn env_secret(key: &str, name: &str) -> Result<String, ConfigError> {
    std::env::var(name).map_err(|_| invalid(key, name, "environment variable is not set"))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Config::parse(&text, &path.display().to_string(), path.parent())
    }

    /// Parses config text; relative paths are resolved against `base_dir`.
    pub fn parse(text: &str, origin: &str, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, origin, &e))?;
        let base = base_dir.unwrap_or(Path::new("."));
        raw.validate(base)
    }
}

fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
        .unwrap_or(0);
    let message = e.message().replace('\n', " ");
    // The line itself is never repeated: a mistyped key (`rpc_pass = …`) or an inline table
    // can carry a secret under a name no list foresees. The key is named instead.
    let key = key_at(text, line);
    let line_text = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
    let secretive = |t: &str| {
        let lower = t.to_ascii_lowercase();
        SECRET_KEY_PARTS.iter().any(|p| lower.contains(p))
    };
    let message = if key.as_deref().is_some_and(secretive) || secretive(line_text) {
        // The parser's message may quote the value: keep only what was expected.
        let expected = message
            .find("expected")
            .map(|i| &message[i..])
            .filter(|m| !m.contains(['`', '"', '\'']))
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let shown = key.map(|k| format!(" for `{k}`")).unwrap_or_default();
        format!("invalid value{shown} (not shown: it may hold a secret){expected}")
    } else {
        match key {
            Some(k) => format!("{message} (key `{k}`)"),
            None => message,
        }
    };
    ConfigError::Syntax {
        path: origin.to_string(),
        line,
        message,
    }
}

/// Keys whose values may carry a secret: secrets, passwords, tokens, and URLs (user info,
/// query tokens). Their values are never repeated in a refusal.
const SECRET_KEY_PARTS: [&str; 6] = ["secret", "password", "token", "url", "proxy", "key"];

/// The key whose value spans `line` (1-based): the nearest `key =` at or above the line, so
/// a value continued over several lines counts too.
fn key_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().take(line.max(1)).collect();
    lines.iter().rev().find_map(|l| {
        let (k, _) = l.split_once('=')?;
        let k = k.trim();
        (!k.is_empty() && !k.contains(['"', '\'', '[', ' ', '{'])).then(|| k.to_string())
    })
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() || base.as_os_str().is_empty() {
        p
    } else {
        base.join(p)
    }
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let network = parse_network(&self.network).ok_or_else(|| {
            invalid(
                "network",
                &self.network,
                "expected mainnet, testnet, testnet4, signet or regtest",
            )
        })?;
        if self.default_confirmations == 0 || self.default_confirmations > 1000 {
            return Err(invalid(
                "default_confirmations",
                self.default_confirmations,
                "must be between 1 and 1000",
            ));
        }
        let start_height = match self.start_height {
            None => StartHeight::Tip,
            Some(StartHeightRaw::Word(w)) if w == "tip" => StartHeight::Tip,
            Some(StartHeightRaw::Word(w)) => {
                return Err(invalid(
                    "start_height",
                    w,
                    "expected \"tip\" or a block height",
                ))
            }
            Some(StartHeightRaw::Height(h)) => StartHeight::Height(h),
        };
        if self.finality_depth < 1 {
            return Err(invalid(
                "finality_depth",
                self.finality_depth,
                "must be at least 1",
            ));
        }
        let json_logs = match self.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    other,
                    "expected \"text\" or \"json\"",
                ))
            }
        };
        let node_unreachable_after = duration(
            "node_unreachable_after",
            self.node_unreachable_after.as_deref(),
            "60s",
        )?;
        let bitcoind = self.bitcoind.validate(network, base)?;
        let mut endpoints = Vec::new();
        for (i, e) in self.endpoints.into_iter().enumerate() {
            let ep = e.validate(i, base)?;
            if endpoints.iter().any(|x: &EndpointConfig| x.name == ep.name) {
                return Err(invalid(
                    format!("endpoints[{i}].name"),
                    &ep.name,
                    "duplicate endpoint name",
                ));
            }
            endpoints.push(ep);
        }
        let names: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
        let mut watches = Vec::new();
        for (i, w) in self.watches.into_iter().enumerate() {
            watches.push(w.validate(i, network, self.default_confirmations, &names)?);
        }
        let api = self.api.validate()?;
        let retain_attempts = duration(
            "retention.attempts",
            self.retention.attempts.as_deref(),
            "30d",
        )?;
        let retain_events = self
            .retention
            .events
            .as_deref()
            .map(|e| duration("retention.events", Some(e), ""))
            .transpose()?;
        if retain_events.is_some_and(|e| e < retain_attempts) {
            return Err(invalid(
                "retention.events",
                self.retention.events.as_deref().unwrap_or(""),
                "must be at least retention.attempts",
            ));
        }
        let store = self.store.validate()?;
        let data_dir = resolve(base, self.data_dir);
        let audit_key_file = match self.audit.key_file {
            Some(p) => resolve(base, p),
            None => data_dir.join(AUDIT_KEY_FILE),
        };
        Ok(Config {
            network,
            data_dir,
            audit_key_file,
            retain_attempts,
            retain_events,
            store,
            default_confirmations: self.default_confirmations,
            start_height,
            finality_depth: self.finality_depth,
            alert_reorg_depth: self.alert_reorg_depth,
            node_unreachable_after,
            json_logs,
            bitcoind,
            endpoints,
            watches,
            api,
        })
    }
}

fn default_rpc_url(network: Network) -> &'static str {
    match network {
        Network::Bitcoin => "http://127.0.0.1:8332",
        Network::Testnet => "http://127.0.0.1:18332",
        Network::Testnet4 => "http://127.0.0.1:48332",
        Network::Signet => "http://127.0.0.1:38332",
        _ => "http://127.0.0.1:18443",
    }
}

impl RawBitcoind {
    fn validate(self, network: Network, base: &Path) -> Result<BitcoindConfig, ConfigError> {
        let rpc_url = self
            .rpc_url
            .unwrap_or_else(|| default_rpc_url(network).to_string());
        reqwest::Url::parse(&rpc_url).map_err(|e| {
            invalid(
                "bitcoind.rpc_url",
                redact_url(&rpc_url),
                format!("not a URL: {e}"),
            )
        })?;
        let password = match (self.rpc_password, self.rpc_password_env) {
            (Some(p), _) => Some(p),
            (None, Some(env)) => Some(env_secret("bitcoind.rpc_password_env", &env)?),
            (None, None) => None,
        };
        let auth = match (self.rpc_user, password, self.cookie_file) {
            (Some(user), Some(password), _) => RpcAuth::UserPass { user, password },
            (Some(user), None, _) => {
                return Err(invalid(
                    "bitcoind.rpc_user",
                    user,
                    "rpc_user needs rpc_password or rpc_password_env",
                ))
            }
            (None, Some(_), _) => {
                return Err(invalid(
                    "bitcoind.rpc_password",
                    "…",
                    "rpc_password needs rpc_user",
                ))
            }
            (None, None, Some(cookie)) => RpcAuth::Cookie(resolve(base, cookie)),
            (None, None, None) => RpcAuth::Cookie(resolve(
                base,
                PathBuf::from("./regtest/data/regtest/.cookie"),
            )),
        };
        for (key, v) in [
            ("bitcoind.zmq_sequence", &self.zmq_sequence),
            ("bitcoind.zmq_rawtx", &self.zmq_rawtx),
            ("bitcoind.zmq_rawblock", &self.zmq_rawblock),
        ] {
            if let Some(v) = v {
                if !(v.starts_with("tcp://") || v.starts_with("ipc://")) {
                    return Err(invalid(
                        key,
                        v,
                        "expected a ZMQ endpoint such as tcp://127.0.0.1:28332",
                    ));
                }
            }
        }
        let poll_interval = duration(
            "bitcoind.poll_interval",
            self.poll_interval.as_deref(),
            "2s",
        )?;
        if poll_interval.is_zero() {
            return Err(invalid(
                "bitcoind.poll_interval",
                "0",
                "must be more than zero",
            ));
        }
        Ok(BitcoindConfig {
            rpc_url,
            auth,
            zmq_sequence: self.zmq_sequence,
            zmq_rawtx: self.zmq_rawtx,
            zmq_rawblock: self.zmq_rawblock,
            poll_interval,
        })
    }
}

impl RawWatch {
    fn validate(
        self,
        i: usize,
        network: Network,
        default_conf: u32,
        endpoint_names: &[&str],
    ) -> Result<Watch, ConfigError> {
        let key = |k: &str| format!("watches[{i}].{k}");
        if let Some(routes) = &self.endpoints {
            crate::watch::check_routes(routes, endpoint_names)
                .map_err(|r| invalid(key("endpoints"), format!("{routes:?}"), r))?;
        }
        let (routes, floor) = (self.endpoints, self.min_amount_sat.unwrap_or(0));
        let (field, target) = match (self.address, self.descriptor) {
            (Some(a), None) => ("address", a),
            (None, Some(d)) => ("descriptor", d),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    key("address"),
                    "…",
                    "give address or descriptor, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    key("address"),
                    "",
                    "a watch needs an address or a descriptor",
                ))
            }
        };
        if field == "address" && self.gap_limit.is_some() {
            return Err(invalid(
                key("gap_limit"),
                self.gap_limit.unwrap_or(0),
                "gap_limit applies to descriptor watches only",
            ));
        }
        let confirmations = self.confirmations.unwrap_or(default_conf);
        if confirmations == 0 || confirmations > 1000 {
            return Err(invalid(
                key("confirmations"),
                confirmations,
                "must be between 1 and 1000",
            ));
        }
        let metadata = match self.metadata {
            None => serde_json::Value::Object(Default::default()),
            Some(t) => {
                serde_json::to_value(t).map_err(|e| invalid(key("metadata"), "…", e.to_string()))?
            }
        };
        crate::watch::check_metadata(&metadata)
            .map_err(|r| invalid(key("metadata"), metadata.to_string(), r))?;
        let (gap_key, gap) = (key("gap_limit"), self.gap_limit);
        let label_len = self.label.as_deref().map_or(0, |l| l.chars().count());
        crate::watch::parse_target(&target, network, gap, confirmations, self.label, metadata)
            .map(|w| w.routed(routes, floor))
            .map_err(|reason| {
                if reason.starts_with("gap_limit") {
                    invalid(gap_key, gap.unwrap_or(0), reason)
                } else if reason.starts_with("label") {
                    invalid(key("label"), format!("{} characters", label_len), reason)
                } else {
                    invalid(key(field), crate::watch::shown_target(&target), reason)
                }
            })
    }
}

impl RawApi {
    fn validate(self) -> Result<ApiConfig, ConfigError> {
        let listen_text = self.listen.unwrap_or_else(|| "127.0.0.1:8577".into());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "api.listen",
                &listen_text,
                "expected IP:PORT such as 127.0.0.1:8577",
            )
        })?;
        let (token, token_key) = match (self.token, self.token_env) {
            (Some(t), _) => (Some(t), "api.token".to_string()),
            // The token is optional until the API is used; an unset variable means the API stays closed.
            (None, Some(env)) => (std::env::var(&env).ok(), format!("api.token_env ({env})")),
            (None, None) => (
                std::env::var("CHAINWATCH_API_TOKEN").ok(),
                "api.token_env (CHAINWATCH_API_TOKEN)".to_string(),
            ),
        };
        if let Some(t) = &token {
            let n = t.chars().count();
            if n < MIN_API_TOKEN_CHARS {
                return Err(invalid(
                    token_key,
                    "(not shown)",
                    format!("the API token has {n} characters; at least {MIN_API_TOKEN_CHARS} are needed (e.g. `openssl rand -hex 32`)"),
                ));
            }
        }
        let allow_ips = self
            .allow_ips
            .unwrap_or_else(|| vec!["127.0.0.1/32".into(), "::1/128".into()]);
        for ip in &allow_ips {
            ip.parse::<crate::net::IpNet>()
                .map_err(|e| invalid("api.allow_ips", ip, e))?;
        }
        Ok(ApiConfig {
            listen,
            token,
            allow_ips,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "watcher.toml", None)
    }

    const ENDPOINT: &str = "[[endpoints]]\nname = \"shop\"\nurl = \"http://127.0.0.1:8080/hooks\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = parse("").unwrap();
        assert_eq!(c.network, Network::Regtest);
        assert_eq!(c.default_confirmations, 3);
        assert_eq!(c.bitcoind.rpc_url, "http://127.0.0.1:18443");
        assert_eq!(c.bitcoind.poll_interval, Duration::from_secs(2));
        assert_eq!(c.start_height, StartHeight::Tip);
    }

    #[test]
    fn endpoint_defaults_follow_the_spec() {
        let c = parse(ENDPOINT).unwrap();
        let e = &c.endpoints[0];
        assert_eq!(e.events, vec!["tx.*"]);
        assert!(e.ordered);
        assert_eq!(e.timeout, Duration::from_secs(15));
        let hours: u64 = e.retry_schedule.iter().map(|d| d.as_secs()).sum::<u64>() / 3600;
        assert_eq!(hours, 75, "default schedule spans about 75 hours");
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn refusals_name_key_and_value() {
        let e = err("netwrk = \"regtest\"");
        assert!(
            e.contains("unknown field `netwrk`") && e.contains("line 1"),
            "{e}"
        );
        let e = err("network = \"moon\"");
        assert!(e.contains("network = \"moon\""), "{e}");
        let e = err("default_confirmations = \"three\"");
        assert!(
            e.contains("line 1") && e.contains("default_confirmations"),
            "{e}"
        );
        let e = err("[[watches]]\naddress = \"bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq\"");
        assert!(
            e.contains("watches[0].address") && e.contains("not for network regtest"),
            "{e}"
        );
        let e = err(&ENDPOINT.replace("whsec_MfKQ", "MfKQ"));
        assert!(
            e.contains("endpoints[0].secret") && e.contains("whsec_"),
            "{e}"
        );
        let e = err(&ENDPOINT.replace("127.0.0.1", "example.com"));
        assert!(
            e.contains("endpoints[0].url") && e.contains("loopback"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }
}
