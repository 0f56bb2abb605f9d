//! `[[endpoints]]`: URL, secrets, filters, retry schedule, TLS material and proxy.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    duration, env_secret, invalid, is_loopback_url, parse_duration, resolve, ConfigError,
    EndpointConfig, EndpointTls, OneOrMany, DEFAULT_RETRY_SCHEDULE,
};
use crate::net::redact_url;
use crate::sign::Secret;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    name: String,
    url: String,
    secret: Option<OneOrMany>,
    secret_env: Option<OneOrMany>,
    events: Option<Vec<String>>,
    ordered: Option<bool>,
    timeout: Option<String>,
    retry_schedule: Option<Vec<String>>,
    allow_http: Option<bool>,
    concurrency: Option<u32>,
    disable_after: Option<String>,
    failing_after: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    proxy: Option<String>,
}

impl RawEndpoint {
    pub(super) fn validate(self, i: usize, base: &Path) -> Result<EndpointConfig, ConfigError> {
        let key = |k: &str| format!("endpoints[{i}].{k}");
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                key("name"),
                &self.name,
                "use 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        check_url(&key("url"), &self.url, self.allow_http == Some(true))?;
        let secrets = secrets(&key, self.secret, self.secret_env)?;
        let events = self.events.unwrap_or_else(|| vec!["tx.*".to_string()]);
        for g in &events {
            if g.is_empty()
                || !g
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._*".contains(c))
            {
                return Err(invalid(
                    key("events"),
                    g,
                    "expected an event type glob such as \"tx.*\"",
                ));
            }
        }
        let timeout = duration(&key("timeout"), self.timeout.as_deref(), "15s")?;
        let retry_schedule = match self.retry_schedule {
            None => DEFAULT_RETRY_SCHEDULE
                .iter()
                .map(|d| parse_duration(d).expect("default schedule parses"))
                .collect(),
            Some(list) => list
                .iter()
                .map(|d| duration(&key("retry_schedule"), Some(d), ""))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let concurrency = self.concurrency.unwrap_or(16);
        if concurrency == 0 {
            return Err(invalid(key("concurrency"), 0, "must be at least 1"));
        }
        let disable_after = duration(&key("disable_after"), self.disable_after.as_deref(), "5d")?;
        let failing_after = duration(&key("failing_after"), self.failing_after.as_deref(), "15m")?;
        let tls = tls_material(&key, base, self.ca_file, self.client_cert, self.client_key)?;
        let proxy = self
            .proxy
            .map(|p| check_proxy(&key("proxy"), p))
            .transpose()?;
        Ok(EndpointConfig {
            name: self.name,
            url: self.url,
            secrets,
            events,
            ordered: self.ordered.unwrap_or(true),
            timeout,
            retry_schedule,
            concurrency,
            disable_after,
            failing_after,
            tls,
            proxy,
        })
    }
}

/// https anywhere; plain http only to loopback unless the user says otherwise.
fn check_url(key: &str, text: &str, allow_http: bool) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| invalid(key, redact_url(text), format!("not a URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_url(&url) || allow_http => Ok(()),
        "http" => Err(invalid(
            key,
            redact_url(text),
            "plain http is allowed only to loopback; set allow_http = true to override",
        )),
        other => Err(invalid(
            key,
            redact_url(text),
            format!("unsupported scheme {other:?}"),
        )),
    }
}

fn check_proxy(key: &str, text: String) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(&text)
        .map_err(|e| invalid(key, redact_url(&text), format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            key,
            redact_url(&text),
            "expected an http:// or https:// proxy URL with a host",
        ));
    }
    Ok(text)
}

/// The endpoint's secrets, inline or from the environment; never echoed in a refusal.
fn secrets(
    key: &dyn Fn(&str) -> String,
    inline: Option<OneOrMany>,
    env: Option<OneOrMany>,
) -> Result<Vec<Secret>, ConfigError> {
    let texts = match (inline, env) {
        (Some(s), None) => s.into_vec(),
        (None, Some(env)) => env
            .into_vec()
            .iter()
            .map(|n| env_secret(&key("secret_env"), n))
            .collect::<Result<_, _>>()?,
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("secret"),
                "(not shown)",
                "give secret or secret_env, not both",
            ))
        }
        (None, None) => {
            return Err(invalid(
                key("secret"),
                "",
                "every endpoint needs a secret (whsec_…)",
            ))
        }
    };
    if texts.is_empty() {
        return Err(invalid(
            key("secret"),
            "[]",
            "at least one secret is needed",
        ));
    }
    texts
        .iter()
        .map(|s| {
            Secret::parse(s)
                .map_err(|e| invalid(key("secret"), crate::sign::redact(s), e.to_string()))
        })
        .collect()
}

/// Reads and parses `ca_file`, `client_cert` and `client_key`, so a bad file is refused at
/// start naming its key rather than failing every delivery later.
fn tls_material(
    key: &dyn Fn(&str) -> String,
    base: &Path,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
) -> Result<EndpointTls, ConfigError> {
    let read = |k: &str, p: &Path| {
        std::fs::read(p).map_err(|e| invalid(key(k), p.display(), format!("cannot read: {e}")))
    };
    let ca_pem = match ca_file {
        None => None,
        Some(p) => {
            let p = resolve(base, p);
            let pem = read("ca_file", &p)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                invalid(
                    key("ca_file"),
                    p.display(),
                    format!("not PEM certificates: {e}"),
                )
            })?;
            if certs.is_empty() {
                return Err(invalid(
                    key("ca_file"),
                    p.display(),
                    "holds no PEM certificate",
                ));
            }
            Some(pem)
        }
    };
    let identity_pem = match (client_cert, client_key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                key("client_key"),
                "",
                "client_cert needs client_key (mutual TLS)",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                key("client_cert"),
                "",
                "client_key needs client_cert (mutual TLS)",
            ))
        }
        (Some(cert), Some(pkey)) => {
            let (cert, pkey) = (resolve(base, cert), resolve(base, pkey));
            check_private_mode(&key("client_key"), &pkey)?;
            let mut pem = read("client_cert", &cert)?;
            pem.push(b'\n');
            pem.extend(read("client_key", &pkey)?);
            reqwest::Identity::from_pem(&pem).map_err(|e| {
                invalid(
                    key("client_key"),
                    pkey.display(),
                    format!("client_cert and client_key do not make a PEM identity: {e}"),
                )
            })?;
            Some(pem)
        }
    };
    Ok(EndpointTls {
        ca_pem,
        identity_pem,
    })
}

/// A private key that others may read is refused, as ssh does.
fn check_private_mode(key: &str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(key, path.display(), format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            key,
            path.display(),
            format!("the private key is readable by others (mode {mode:o}); chmod 600 it"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const HEAD: &str = "[[endpoints]]\nname = \"shop\"\nurl = \"https://shop.example/hooks\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";

    fn err(dir: &std::path::Path, extra: &str) -> String {
        Config::parse(&format!("{HEAD}{extra}"), "watcher.toml", Some(dir))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn tls_files_are_read_and_checked_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = err(d, "ca_file = \"missing.pem\"");
        assert!(
            e.contains("endpoints[0].ca_file") && e.contains("cannot read"),
            "{e}"
        );
        std::fs::write(d.join("junk.pem"), "not a certificate").unwrap();
        let e = err(d, "ca_file = \"junk.pem\"");
        assert!(e.contains("endpoints[0].ca_file"), "{e}");
        let e = err(d, "client_cert = \"c.pem\"");
        assert!(e.contains("client_cert needs client_key"), "{e}");
        std::fs::write(d.join("c.pem"), "x").unwrap();
        std::fs::write(d.join("k.pem"), "x").unwrap();
        std::fs::set_permissions(d.join("k.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = err(d, "client_cert = \"c.pem\"\nclient_key = \"k.pem\"");
        assert!(
            e.contains("endpoints[0].client_key") && e.contains("readable by others"),
            "{e}"
        );
        std::fs::set_permissions(d.join("k.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = err(d, "client_cert = \"c.pem\"\nclient_key = \"k.pem\"");
        assert!(e.contains("do not make a PEM identity"), "{e}");
        let e = err(d, "proxy = \"socks5://h:1\"");
        assert!(e.contains("endpoints[0].proxy"), "{e}");
        assert_eq!(
            err(d, "proxy = \"http://127.0.0.1:3128\""),
            "",
            "an http proxy is fine"
        );
    }

    #[test]
    fn labels_are_bounded() {
        let label = "x".repeat(257);
        let text = format!(
            "[[watches]]\naddress = \"bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp\"\nlabel = \"{label}\"\n"
        );
        let e = Config::parse(&text, "watcher.toml", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("watches[0].label") && e.contains("at most 256"),
            "{e}"
        );
        let ok = text.replace(&label, &"x".repeat(256));
        assert!(Config::parse(&ok, "watcher.toml", None).is_ok());
    }
}
