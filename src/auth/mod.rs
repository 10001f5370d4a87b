//! Authentication and room access rules.
//!
//! Tokens are JWTs: HS256 with `auth.jwt_secret`, and RS256/RS384/RS512/PS256/PS384/PS512,
//! ES256, ES384 or EdDSA with a public key (`auth.public_key_file`) or a JWKS
//! (`auth.jwks_url`). The algorithm named by a token must be one its key supports: a public key
//! is never used as an HMAC secret, and `none` is never accepted. Server API keys are checked
//! here too.

mod jwks;
pub mod rooms;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::AuthConfig;
#[cfg(test)]
use crate::config::RoomPolicy;

pub use jwks::Jwks;

/// The claims rtgate reads from a token (`iss`, `aud` and `nbf` are checked by the validation).
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// The claims of a token signed by [`Authenticator::issue`].
#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    admin: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Who a connection is, from its token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub admin: bool,
    /// Token expiry, Unix seconds.
    pub expires_at: u64,
}

/// Why a token was refused. Clients only see `missing token`, `token expired` or
/// `invalid token`; the detail is for logs.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    fn invalid(why: impl Into<String>) -> Self {
        AuthError::Invalid(why.into())
    }
}

/// Why the configured keys cannot be used (a configuration error: exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.public_key_file: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.public_key_file: {path}: {why}")]
    Pem { path: String, why: String },
    #[error("auth.jwks_url: {0}")]
    Jwks(String),
}

impl KeyError {
    /// The message without the configuration key's name.
    pub fn detail(&self) -> String {
        match self {
            KeyError::Read { path, source } => format!("cannot read {path}: {source}"),
            KeyError::Pem { path, why } => format!("{path}: {why}"),
            KeyError::Jwks(why) => why.clone(),
        }
    }
}

/// The kind of a public key, which decides the algorithms it verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Whether a token signed with `alg` may be verified with a key of this kind.
    pub fn supports(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::EcP256 => "EC P-256",
            KeyKind::EcP384 => "EC P-384",
            KeyKind::Ed25519 => "Ed25519",
        }
    }
}

/// A public verification key, from a PEM file or a JWKS.
#[derive(Clone)]
pub struct PublicKey {
    /// `kid` of a JWKS key.
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The JWK's `alg`, when it names one: then only that algorithm is accepted.
    pub alg: Option<Algorithm>,
    key: DecodingKey,
}

impl PublicKey {
    /// Whether this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.supports(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

// DER encodings of the object identifiers that name the key types of a SubjectPublicKeyInfo.
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// Parses a PEM public key (`BEGIN PUBLIC KEY` with an RSA, EC P-256/P-384 or Ed25519 key, or
/// `BEGIN RSA PUBLIC KEY`) and detects its type.
pub fn parse_public_key_pem(pem: &str) -> Result<PublicKey, String> {
    let begin = pem
        .find("-----BEGIN ")
        .ok_or("not PEM (no `-----BEGIN PUBLIC KEY-----` line)")?;
    let rest = &pem[begin + "-----BEGIN ".len()..];
    let label_end = rest.find("-----").ok_or("malformed PEM header")?;
    let label = &rest[..label_end];
    let body_and_end = &rest[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let body_end = body_and_end
        .find(&end_marker)
        .ok_or_else(|| format!("no `{end_marker}` line"))?;
    let body: String = body_and_end[..body_end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|e| format!("bad base64 in PEM: {e}"))?;
    let pem_bytes = pem.as_bytes();
    let (kind, key) = match label {
        "RSA PUBLIC KEY" => (KeyKind::Rsa, DecodingKey::from_rsa_pem(pem_bytes)),
        "PUBLIC KEY" => {
            // The AlgorithmIdentifier sits at the start of the SubjectPublicKeyInfo.
            let head = &der[..der.len().min(32)];
            let has = |oid: &[u8]| head.windows(oid.len()).any(|w| w == oid);
            if has(OID_RSA) {
                (KeyKind::Rsa, DecodingKey::from_rsa_pem(pem_bytes))
            } else if has(OID_EC_PUBLIC_KEY) && has(OID_P256) {
                (KeyKind::EcP256, DecodingKey::from_ec_pem(pem_bytes))
            } else if has(OID_EC_PUBLIC_KEY) && has(OID_P384) {
                (KeyKind::EcP384, DecodingKey::from_ec_pem(pem_bytes))
            } else if has(OID_ED25519) {
                // SEQUENCE { SEQUENCE { OID }, BIT STRING (32-byte key) }: 44 bytes.
                if der.len() != 44 {
                    return Err("malformed Ed25519 public key".into());
                }
                (KeyKind::Ed25519, DecodingKey::from_ed_pem(pem_bytes))
            } else {
                return Err(
                    "unsupported public key type (use RSA, EC P-256, EC P-384 or Ed25519)".into(),
                );
            }
        }
        label if label.contains("PRIVATE") => {
            return Err(format!(
                "is a private key (`{label}`); give the public key (`openssl pkey -pubout`)"
            ));
        }
        label => return Err(format!("`{label}` is not a public key")),
    };
    let key = key.map_err(|e| format!("invalid {} public key: {e}", kind.as_str()))?;
    Ok(PublicKey {
        kid: None,
        kind,
        alg: None,
        key,
    })
}

/// Reads and parses `auth.public_key_file`.
pub fn load_public_key_file(path: &str) -> Result<PublicKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_string(),
        source,
    })?;
    parse_public_key_pem(&text).map_err(|why| KeyError::Pem {
        path: path.to_string(),
        why,
    })
}

/// The outcome of one key's attempt at a token.
enum Attempt {
    Verified(Claims),
    /// The signature does not match this key: another key may still verify it.
    WrongKey,
    Refused(AuthError),
}

pub struct Authenticator {
    /// HS256 keys from `auth.jwt_secret`.
    secret: Option<(DecodingKey, EncodingKey)>,
    file_key: Option<PublicKey>,
    jwks: Option<Arc<Jwks>>,
    /// Everything but the algorithm, which comes from each token's header (and its key).
    validation: Validation,
    max_lifetime: Option<Duration>,
    issuer: Option<String>,
    audience: Option<String>,
    api_keys: Vec<String>,
}

impl Authenticator {
    /// HS256 only, with no `iss`/`aud`/lifetime checks.
    pub fn new(secret: &[u8], api_keys: Vec<String>, leeway: Duration) -> Self {
        Self {
            secret: Some((
                DecodingKey::from_secret(secret),
                EncodingKey::from_secret(secret),
            )),
            file_key: None,
            jwks: None,
            validation: base_validation(leeway),
            max_lifetime: None,
            issuer: None,
            audience: None,
            api_keys,
        }
    }

    /// Everything `auth` configures. The JWKS (if any) is not fetched until
    /// [`Authenticator::start_jwks`].
    pub fn from_config(auth: &AuthConfig) -> Result<Self, KeyError> {
        let mut validation = base_validation(auth.jwt_leeway);
        // A checked claim is also required: jsonwebtoken skips the check of an absent (or
        // unparsable) `iss` or `aud`.
        let mut required = vec!["exp", "sub"];
        if !auth.issuer.is_empty() {
            validation.set_issuer(&[&auth.issuer]);
            required.push("iss");
        }
        if !auth.audience.is_empty() {
            validation.validate_aud = true;
            validation.set_audience(&auth.audience);
            required.push("aud");
        }
        // Without an audience, `aud` is not checked (base_validation): jsonwebtoken's default
        // would refuse every token that has one.
        validation.set_required_spec_claims(&required);
        let secret = (!auth.jwt_secret.is_empty()).then(|| {
            let s = auth.jwt_secret.as_bytes();
            (DecodingKey::from_secret(s), EncodingKey::from_secret(s))
        });
        let file_key = if auth.public_key_file.is_empty() {
            None
        } else {
            Some(load_public_key_file(&auth.public_key_file)?)
        };
        let jwks = if auth.jwks_url.is_empty() {
            None
        } else {
            Some(Arc::new(
                Jwks::new(&auth.jwks_url, auth.jwks_refresh).map_err(KeyError::Jwks)?,
            ))
        };
        Ok(Self {
            secret,
            file_key,
            jwks,
            validation,
            max_lifetime: auth.max_token_lifetime,
            issuer: (!auth.issuer.is_empty()).then(|| auth.issuer.clone()),
            audience: auth.audience.first().cloned(),
            api_keys: auth.api_keys.clone(),
        })
    }

    /// Fetches the JWKS once (waiting at most the fetch timeout; a failure is logged, counted,
    /// and leaves JWKS tokens refused until a fetch succeeds), then refreshes it every
    /// `auth.jwks_refresh` in the background until `stop`. Nothing without `auth.jwks_url`.
    pub async fn start_jwks(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let jwks = self.jwks.clone()?;
        jwks.refresh().await;
        Some(tokio::spawn(jwks.run(stop)))
    }

    /// Whether HS256 tokens can be signed (and verified) with a secret.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    pub async fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        // Fails on unknown algorithms, `none` included.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::invalid(format!("header: {e}")))?;
        let alg = header.alg;
        let claims = match alg {
            Algorithm::HS256 => {
                let Some((key, _)) = &self.secret else {
                    return Err(AuthError::invalid(
                        "HS256 is not accepted: auth.jwt_secret is not set",
                    ));
                };
                match self.attempt(token, alg, key) {
                    Attempt::Verified(c) => c,
                    Attempt::WrongKey => return Err(AuthError::invalid("bad signature")),
                    Attempt::Refused(e) => return Err(e),
                }
            }
            Algorithm::HS384 | Algorithm::HS512 => {
                return Err(AuthError::invalid(format!("{alg:?} is not accepted")));
            }
            _ => {
                self.verify_public(token, alg, header.kid.as_deref())
                    .await?
            }
        };
        self.check_claims(claims)
    }

    async fn verify_public(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Claims, AuthError> {
        if let Some(key) = self.file_key.as_ref().filter(|k| k.accepts(alg)) {
            match self.attempt(token, alg, &key.key) {
                Attempt::Verified(c) => return Ok(c),
                Attempt::Refused(e) => return Err(e),
                Attempt::WrongKey => {}
            }
        }
        let Some(jwks) = &self.jwks else {
            return Err(AuthError::invalid(format!(
                "no configured key verifies this {alg:?} token"
            )));
        };
        let keys = jwks.keys();
        if let Some(claims) = self.attempt_set(token, alg, kid, &keys)? {
            return Ok(claims);
        }
        // A key id the set does not have: perhaps the keys were rotated. Fetch again (at most
        // once a minute, whatever the tokens say).
        if let Some(kid) = kid
            && !keys.iter().any(|k| k.kid.as_deref() == Some(kid))
            && jwks.refetch_for_unknown_kid(kid).await
        {
            let keys = jwks.keys();
            if let Some(claims) = self.attempt_set(token, alg, Some(kid), &keys)? {
                return Ok(claims);
            }
        }
        Err(AuthError::invalid(match kid {
            Some(kid) => format!("no key with kid {kid:?} verifies this {alg:?} token"),
            None => format!("no key verifies this {alg:?} token"),
        }))
    }

    /// Tries the keys of `keys` that match `kid` (all of them without one) and accept `alg`.
    fn attempt_set(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
        keys: &[PublicKey],
    ) -> Result<Option<Claims>, AuthError> {
        let candidates = keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.accepts(alg));
        for key in candidates {
            match self.attempt(token, alg, &key.key) {
                Attempt::Verified(c) => return Ok(Some(c)),
                Attempt::Refused(e) => return Err(e),
                Attempt::WrongKey => {}
            }
        }
        Ok(None)
    }

    fn attempt(&self, token: &str, alg: Algorithm, key: &DecodingKey) -> Attempt {
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        match jsonwebtoken::decode::<Claims>(token, key, &validation) {
            Ok(data) => Attempt::Verified(data.claims),
            Err(e) => match e.kind() {
                ErrorKind::InvalidSignature => Attempt::WrongKey,
                ErrorKind::ExpiredSignature => Attempt::Refused(AuthError::Expired),
                ErrorKind::ImmatureSignature => {
                    Attempt::Refused(AuthError::invalid("not valid yet (nbf)"))
                }
                _ => Attempt::Refused(AuthError::invalid(e.to_string())),
            },
        }
    }

    /// Checks a verified token's claims beyond what the validation does.
    fn check_claims(&self, claims: Claims) -> Result<Identity, AuthError> {
        if claims.sub.is_empty() {
            return Err(AuthError::invalid("empty sub"));
        }
        if let Some(max) = self.max_lifetime {
            let from = claims
                .iat
                .unwrap_or_else(|| crate::protocol::now_ms() / 1000);
            let lifetime = claims.exp.saturating_sub(from);
            if lifetime > max.as_secs() {
                return Err(AuthError::invalid(format!(
                    "lifetime {lifetime}s exceeds auth.max_token_lifetime ({}s)",
                    max.as_secs()
                )));
            }
        }
        Ok(Identity {
            user_id: claims.sub.into(),
            admin: claims.admin,
            expires_at: claims.exp,
        })
    }

    /// Signs an HS256 token for `sub`, valid for `ttl` (at most `auth.max_token_lifetime`), with
    /// the configured issuer and first audience.
    ///
    /// Panics without `auth.jwt_secret` (see [`Authenticator::has_secret`]).
    pub fn issue(&self, sub: &str, admin: bool, ttl: Duration) -> String {
        let (_, encoding) = self
            .secret
            .as_ref()
            .expect("issuing a token needs auth.jwt_secret");
        let ttl = self.max_lifetime.map_or(ttl, |max| ttl.min(max));
        let iat = crate::protocol::now_ms() / 1000;
        let claims = IssuedClaims {
            sub,
            exp: iat + ttl.as_secs().max(1),
            iat,
            admin,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .expect("HS256 signing does not fail")
    }

    /// Whether `key` is one of the configured server API keys. Keys are compared as SHA-256
    /// digests in constant time, so neither their bytes nor their lengths leak through timing.
    pub fn is_api_key(&self, key: &str) -> bool {
        let offered = api_key_digest(key);
        let mut found = false;
        for k in &self.api_keys {
            found |= bool::from(api_key_digest(k).ct_eq(&offered));
        }
        found
    }
}

fn api_key_digest(key: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn base_validation(leeway: Duration) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation
}

#[cfg(test)]
mod tests;
