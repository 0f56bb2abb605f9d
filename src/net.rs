//! What every network client and listener shares: one TLS crypto provider for the process,
//! bounded reads of error answers, URLs shown without their credentials, and address blocks
//! (`IpNet`) for allow-lists. A leaf:
//! it imports nothing of the crate.

use std::net::IpAddr;
use std::sync::Once;

/// Installs ring as the process's rustls crypto provider, once. reqwest is built without a
/// provider of its own so that the build needs no cmake (aws-lc); every client calls this first.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another part of the process installed one first: that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The first `limit` bytes of `resp`'s body, no more read, and the error that ended the read
/// early, if one did: what an error answer says, kept to a size a log line or a row can hold.
pub async fn body_prefix(
    resp: &mut reqwest::Response,
    limit: usize,
) -> (Vec<u8>, Option<reqwest::Error>) {
    let mut buf = Vec::new();
    while buf.len() < limit {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c[..c.len().min(limit - buf.len())]),
            Ok(None) => break,
            Err(e) => return (buf, Some(e)),
        }
    }
    (buf, None)
}

/// A URL as it may appear in a log line, an error, a listing or the store: user info, query
/// values and every path segment after the first replaced, so `https://user:pw@host/p?token=x`
/// shows as `https://***@host/p?token=***` and a token in the path
/// (`https://hooks.example/services/T0/B0/XYZ`) as `https://hooks.example/services/***`.
/// Text that is not a URL is shown only by its scheme-less length, never verbatim.
pub fn redact_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return format!("<unparsable URL of {} characters>", text.chars().count());
    };
    let had_userinfo = !url.username().is_empty() || url.password().is_some();
    if had_userinfo {
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    if url.query().is_some() {
        let keys: Vec<String> = url
            .query_pairs()
            .map(|(k, _)| format!("{}=***", sanitize_key(&k)))
            .collect();
        let shown = keys.join("&");
        url.set_query((!shown.is_empty()).then_some(shown.as_str()));
    }
    url.set_fragment(None);
    let segments: Vec<String> = url
        .path_segments()
        .map(|s| s.map(str::to_string).collect())
        .unwrap_or_default();
    if segments.len() > 1 {
        url.set_path(&format!("/{}/***", segments[0]));
    }
    let shown = url.to_string();
    if had_userinfo {
        // Url has no way to set a placeholder user, so insert it after the scheme's "//".
        if let Some(i) = shown.find("//") {
            return format!("{}***@{}", &shown[..i + 2], &shown[i + 2..]);
        }
    }
    shown
}

/// Query keys are shown (they say which parameter it was), but only in a plain form.
fn sanitize_key(k: &str) -> String {
    k.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_and_query_values_never_show() {
        let cases = [
            (
                "https://alice:hunter2@shop.example/hooks?token=s3cr3t&x=1",
                "https://***@shop.example/hooks?token=***&x=***",
            ),
            ("https://shop.example/hooks", "https://shop.example/hooks"),
            (
                "http://rpcuser:rpcpass@127.0.0.1:8332/",
                "http://***@127.0.0.1:8332/",
            ),
            ("https://onlyuser@h.example/#frag", "https://***@h.example/"),
            (
                "https://hooks.example/services/T000/B000/XXXXsecretpathXXXX",
                "https://hooks.example/services/***",
            ),
        ];
        for (input, want) in cases {
            let got = redact_url(input);
            assert_eq!(got, want, "redacting {input}");
            for secret in [
                "hunter2",
                "s3cr3t",
                "rpcpass",
                "alice",
                "onlyuser",
                "frag",
                "secretpath",
            ] {
                assert!(!got.contains(secret), "{got} shows {secret}");
            }
        }
        assert_eq!(
            redact_url("not a url with pass"),
            "<unparsable URL of 19 characters>"
        );
    }
}

/// An address block, `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<IpNet, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse()
                .map_err(|_| format!("{p:?} is not a prefix length"))?
        };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max}"));
        }
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}
