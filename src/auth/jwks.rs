//! A JSON Web Key Set fetched over HTTP(S): at start, every `auth.jwks_refresh`, and (at most
//! once a minute) when a token names a key id the set does not have. A failed fetch keeps the
//! last good keys.

use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{KeyKind, PublicKey};
use crate::telemetry::metric;

/// Largest JWKS document read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest a fetch may take, connection and body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest interval between two fetches caused by unknown key ids.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(60);
/// Keys kept from one set at most.
pub const MAX_KEYS: usize = 100;

pub struct Jwks {
    url: String,
    refresh: Duration,
    client: reqwest::Client,
    keys: RwLock<Arc<Vec<PublicKey>>>,
    /// When an unknown key id last caused a fetch; the lock also makes concurrent callers wait
    /// for that one fetch instead of starting their own.
    unknown_kid_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    pub fn new(url: &str, refresh: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("rtgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot create the HTTP client: {e}"))?;
        Ok(Self {
            url: url.to_string(),
            refresh,
            client,
            keys: RwLock::new(Arc::new(Vec::new())),
            unknown_kid_fetch: tokio::sync::Mutex::new(None),
        })
    }

    /// The current keys (empty until a fetch succeeds).
    pub fn keys(&self) -> Arc<Vec<PublicKey>> {
        self.keys.read().clone()
    }

    /// Fetches the set once; on success replaces the keys, else keeps them. Logged and
    /// counted either way; true on success.
    pub async fn refresh(&self) -> bool {
        match self.fetch().await {
            Ok((keys, skipped)) => {
                let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                let old = self.keys();
                let old_kids: Vec<&str> = old.iter().filter_map(|k| k.kid.as_deref()).collect();
                if kids != old_kids || old.len() != keys.len() {
                    tracing::info!(url = %self.url, keys = keys.len(), skipped, kids = ?kids, "JWKS loaded");
                } else {
                    tracing::debug!(url = %self.url, keys = keys.len(), "JWKS unchanged");
                }
                *self.keys.write() = Arc::new(keys);
                metric::jwks_refresh(true);
                true
            }
            Err(why) => {
                let kept = self.keys().len();
                tracing::warn!(url = %self.url, error = %why, kept, "JWKS fetch failed; keeping the last good keys");
                metric::jwks_refresh(false);
                false
            }
        }
    }

    /// Fetches the set again for a token whose `kid` is not in it, unless an unknown key id
    /// caused a fetch less than a minute ago. True when the set now has `kid`.
    pub async fn refetch_for_unknown_kid(&self, kid: &str) -> bool {
        let has_kid = |keys: &[PublicKey]| keys.iter().any(|k| k.kid.as_deref() == Some(kid));
        let wait = FETCH_TIMEOUT + Duration::from_secs(1);
        let Ok(mut last) = tokio::time::timeout(wait, self.unknown_kid_fetch.lock()).await else {
            return false;
        };
        if has_kid(&self.keys()) {
            return true; // fetched by someone else meanwhile
        }
        if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        tracing::info!(kid, "token with an unknown key id: fetching the JWKS again");
        self.refresh().await && has_kid(&self.keys())
    }

    /// Refreshes every `auth.jwks_refresh` until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.refresh) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.refresh() => {}
            }
        }
    }

    async fn fetch(&self) -> Result<(Vec<PublicKey>, usize), String> {
        let mut resp = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("HTTP status {}", resp.status()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(format!("response larger than {MAX_BODY_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading the response failed: {e}"))?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(format!("response larger than {MAX_BODY_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let (keys, skipped) = parse_set(&body)?;
        if keys.is_empty() {
            return Err(format!("no usable key in the set ({skipped} skipped)"));
        }
        Ok((keys, skipped))
    }
}

#[derive(Deserialize)]
struct RawSet<'a> {
    #[serde(borrow)]
    keys: Vec<&'a RawValue>,
}

/// Parses a JWKS document key by key: a key that cannot verify tokens (unknown type or
/// algorithm, encryption key, symmetric key, bad parameters) is logged and skipped. Returns
/// the usable keys and the number skipped.
pub fn parse_set(body: &[u8]) -> Result<(Vec<PublicKey>, usize), String> {
    let set: RawSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = 0;
    for raw in set.keys {
        if keys.len() >= MAX_KEYS {
            skipped += 1;
            continue;
        }
        let parsed = serde_json::from_str::<Jwk>(raw.get())
            .map_err(|e| e.to_string())
            .and_then(|jwk| usable_key(&jwk));
        match parsed {
            Ok(key) => keys.push(key),
            Err(why) => {
                skipped += 1;
                let kid = serde_json::from_str::<serde_json::Value>(raw.get())
                    .ok()
                    .and_then(|v| v.get("kid").and_then(|k| k.as_str()).map(String::from));
                tracing::warn!(kid = ?kid, reason = %why, "JWKS key skipped");
            }
        }
    }
    Ok((keys, skipped))
}

fn usable_key(jwk: &Jwk) -> Result<PublicKey, String> {
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("`use` is {other:?}, not sig")),
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::EcP256,
            EllipticCurve::P384 => KeyKind::EcP384,
            ref c => return Err(format!("unsupported EC curve {c:?}")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => KeyKind::Ed25519,
            ref c => return Err(format!("unsupported OKP curve {c:?}")),
        },
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are not accepted".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => {
            let alg = signing_algorithm(a).ok_or_else(|| format!("`alg` {a:?} does not sign"))?;
            if !kind.supports(alg) {
                return Err(format!(
                    "`alg` {alg:?} does not fit a {} key",
                    kind.as_str()
                ));
            }
            Some(alg)
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key parameters: {e}"))?;
    Ok(PublicKey {
        kid: jwk.common.key_id.clone(),
        kind,
        alg,
        key,
    })
}

fn signing_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        // HMAC algorithms are never taken from a JWKS; the rest encrypt.
        _ => return None,
    })
}
