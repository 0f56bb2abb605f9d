//! What every outgoing HTTP client shares: one TLS crypto provider for the process, and URLs
//! shown without their credentials. A leaf: it imports nothing of the crate.

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
