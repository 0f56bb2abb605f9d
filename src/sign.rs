//! Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(key, "id.timestamp.body")).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far a webhook's timestamp may be from now before `verify` calls it stale.
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("secret must start with \"whsec_\" followed by base64 (got {0:?})")]
    MissingPrefix(String),
    #[error("secret after \"whsec_\" is not valid base64: {0}")]
    BadBase64(String),
    #[error("secret decodes to {0} bytes; a secret must decode to 24 to 64 bytes (e.g. whsec_ + `openssl rand -base64 32`)")]
    KeyLength(usize),
    #[error("timestamp {0:?} is not a whole number of Unix seconds")]
    BadTimestamp(String),
    #[error("timestamp {ts} is {age}s away from now ({now}); allowed is {tolerance}s")]
    StaleTimestamp {
        ts: i64,
        now: i64,
        age: i64,
        tolerance: i64,
    },
    #[error("signature header has no \"v1,\" entry")]
    NoV1Signature,
    #[error("no v1 signature matches this secret and body (checked {0})")]
    Mismatch(usize),
}

/// Standard Webhooks keys are 24 to 64 bytes: shorter ones can be guessed.
pub const MIN_KEY_BYTES: usize = 24;
pub const MAX_KEY_BYTES: usize = 64;

/// A webhook signing secret, `whsec_` + base64 key.
#[derive(Clone)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material into logs.
        write!(f, "Secret(whsec_…)")
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, SignError> {
        let b64 = text
            .strip_prefix("whsec_")
            .ok_or_else(|| SignError::MissingPrefix(redact(text)))?;
        let key = B64
            .decode(b64)
            .map_err(|e| SignError::BadBase64(base64_problem(&e)))?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SignError::KeyLength(key.len()));
        }
        Ok(Secret {
            text: text.to_string(),
            key,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// One `v1,<base64>` signature entry.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", B64.encode(tag))
    }

    fn verifies(&self, id: &str, timestamp: i64, body: &[u8], b64_tag: &str) -> bool {
        match B64.decode(b64_tag) {
            Ok(tag) => self.mac(id, timestamp, body).verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }
}

/// What is wrong with the base64, without quoting any of the secret's characters.
fn base64_problem(e: &base64::DecodeError) -> String {
    use base64::DecodeError::*;
    match e {
        InvalidByte(at, _) | InvalidLastSymbol(at, _) => {
            format!("a character that is not base64 at position {at}")
        }
        InvalidLength(n) => format!("{n} characters is not a base64 length"),
        InvalidPadding => "wrong padding".into(),
    }
}

/// A secret as a message may show it: its prefix if it has the right one, else nothing of it.
pub(crate) fn redact(text: &str) -> String {
    if text.starts_with("whsec_") {
        "whsec_…".to_string()
    } else {
        format!("(not shown, {} characters)", text.chars().count())
    }
}

/// The `webhook-signature` header: one entry per active secret, space separated.
pub fn signature_header(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a received webhook: the timestamp is fresh and one `v1` entry matches one secret.
pub fn verify(
    secrets: &[Secret],
    id: &str,
    timestamp: &str,
    signature_header: &str,
    body: &[u8],
    now: i64,
    tolerance: i64,
) -> Result<(), SignError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignError::BadTimestamp(timestamp.to_string()))?;
    let age = (now - ts).abs();
    if age > tolerance {
        return Err(SignError::StaleTimestamp {
            ts,
            now,
            age,
            tolerance,
        });
    }
    let tags: Vec<&str> = signature_header
        .split_whitespace()
        .filter_map(|e| e.strip_prefix("v1,"))
        .collect();
    if tags.is_empty() {
        return Err(SignError::NoV1Signature);
    }
    let ok = secrets
        .iter()
        .any(|s| tags.iter().any(|t| s.verifies(id, ts, body, t)));
    if ok {
        Ok(())
    } else {
        Err(SignError::Mismatch(tags.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test vector from the Standard Webhooks specification's reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_published_vector() {
        let s = Secret::parse(SECRET).unwrap();
        assert_eq!(
            s.sign(ID, TS, BODY),
            SIG,
            "signature must match the spec's vector"
        );
    }

    #[test]
    fn verify_accepts_any_matching_entry_and_rejects_tampering() {
        let s = Secret::parse(SECRET).unwrap();
        let header = format!("v1,bm90IGl0 {SIG}");
        verify(
            std::slice::from_ref(&s),
            ID,
            &TS.to_string(),
            &header,
            BODY,
            TS,
            300,
        )
        .expect("second entry matches");
        let err = verify(
            std::slice::from_ref(&s),
            ID,
            &TS.to_string(),
            SIG,
            b"{}",
            TS,
            300,
        )
        .unwrap_err();
        assert_eq!(err, SignError::Mismatch(1), "tampered body must fail");
        let err = verify(&[s], ID, &TS.to_string(), SIG, BODY, TS + 301, 300).unwrap_err();
        assert!(
            matches!(err, SignError::StaleTimestamp { age: 301, .. }),
            "{err}"
        );
    }

    #[test]
    fn rejects_malformed_secrets() {
        assert!(matches!(
            Secret::parse("MfKQ9r8"),
            Err(SignError::MissingPrefix(_))
        ));
        assert!(matches!(
            Secret::parse("whsec_!!!"),
            Err(SignError::BadBase64(_))
        ));
        assert_eq!(
            Secret::parse("whsec_").unwrap_err(),
            SignError::KeyLength(0)
        );
        assert_eq!(
            Secret::parse("whsec_AQ==").unwrap_err(),
            SignError::KeyLength(1),
            "a 1-byte key is refused"
        );
        let k23 = B64.encode([7u8; 23]);
        let k24 = B64.encode([7u8; 24]);
        let k64 = B64.encode([7u8; 64]);
        let k65 = B64.encode([7u8; 65]);
        assert_eq!(
            Secret::parse(&format!("whsec_{k23}")).unwrap_err(),
            SignError::KeyLength(23)
        );
        assert!(
            Secret::parse(&format!("whsec_{k24}")).is_ok(),
            "24 bytes is the floor"
        );
        assert!(
            Secret::parse(&format!("whsec_{k64}")).is_ok(),
            "64 bytes is the ceiling"
        );
        assert_eq!(
            Secret::parse(&format!("whsec_{k65}")).unwrap_err(),
            SignError::KeyLength(65)
        );
        let err = Secret::parse("sk_live_abcdef").unwrap_err().to_string();
        assert!(
            !err.contains("abcdef"),
            "a malformed secret is not echoed: {err}"
        );
    }
}
