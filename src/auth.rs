//! Authentication (HS256 JWT, server API keys) and room access rules.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::RoomPolicy;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// Who a connection is, from its token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub admin: bool,
    /// Token expiry, Unix seconds.
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    api_keys: Vec<String>,
}

impl Authenticator {
    pub fn new(secret: &[u8], api_keys: Vec<String>, leeway: Duration) -> Self {
        // Only HS256: a token naming any other algorithm (including `none`) is rejected.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            api_keys,
        }
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        if data.claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty sub".into()));
        }
        Ok(Identity {
            user_id: data.claims.sub.into(),
            admin: data.claims.admin,
            expires_at: data.claims.exp,
        })
    }

    /// Signs a token for `sub`, valid for `ttl`.
    pub fn issue(&self, sub: &str, admin: bool, ttl: Duration) -> String {
        let exp = crate::protocol::now_ms() / 1000 + ttl.as_secs().max(1);
        let claims = Claims {
            sub: sub.to_string(),
            exp,
            admin,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing does not fail")
    }

    /// Whether `key` is one of the configured server API keys (constant time per key).
    pub fn is_api_key(&self, key: &str) -> bool {
        let mut found = false;
        for k in &self.api_keys {
            found |= bool::from(k.as_bytes().ct_eq(key.as_bytes()));
        }
        found
    }
}

/// Whether `who` may join and publish in `room`.
pub fn may_access(who: &Identity, room: &str, policy: RoomPolicy) -> bool {
    if who.admin || room.starts_with("public:") {
        return true;
    }
    if let Some(owner) = room.strip_prefix("private:") {
        return owner == &*who.user_id;
    }
    policy == RoomPolicy::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(b"secret-for-tests", vec!["k1".into()], Duration::ZERO)
    }

    #[test]
    fn issued_token_verifies() {
        let a = auth();
        let t = a.issue("42", true, Duration::from_secs(60));
        let id = a.verify(Some(&t)).unwrap();
        assert_eq!(&*id.user_id, "42");
        assert!(id.admin);
    }

    #[test]
    fn rejects_bad_tokens() {
        let a = auth();
        assert!(matches!(a.verify(None), Err(AuthError::Missing)));
        assert!(matches!(
            a.verify(Some("x.y.z")),
            Err(AuthError::Invalid(_))
        ));
        let other = Authenticator::new(b"another-secret", vec![], Duration::ZERO);
        let t = other.issue("42", false, Duration::from_secs(60));
        assert!(matches!(a.verify(Some(&t)), Err(AuthError::Invalid(_))));
        // alg: none, with a valid-looking payload.
        let exp = crate::protocol::now_ms() / 1000 + 60;
        let payload = format!(r#"{{"sub":"42","exp":{exp}}}"#);
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(payload.as_bytes())
        );
        assert!(matches!(a.verify(Some(&none)), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn rejects_expired() {
        let a = auth();
        let claims = Claims {
            sub: "42".into(),
            exp: crate::protocol::now_ms() / 1000 - 10,
            admin: false,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"secret-for-tests"),
        )
        .unwrap();
        assert!(matches!(a.verify(Some(&t)), Err(AuthError::Expired)));
    }

    #[test]
    fn api_keys() {
        let a = auth();
        assert!(a.is_api_key("k1"));
        assert!(!a.is_api_key("k2"));
        assert!(!a.is_api_key(""));
    }

    #[test]
    fn room_acl() {
        let user = Identity {
            user_id: "7".into(),
            admin: false,
            expires_at: 0,
        };
        let admin = Identity {
            admin: true,
            ..user.clone()
        };
        assert!(may_access(&user, "public:lobby", RoomPolicy::Deny));
        assert!(may_access(&user, "private:7", RoomPolicy::Deny));
        assert!(!may_access(&user, "private:8", RoomPolicy::Allow));
        assert!(may_access(&admin, "private:8", RoomPolicy::Deny));
        assert!(may_access(&user, "team:x", RoomPolicy::Allow));
        assert!(!may_access(&user, "team:x", RoomPolicy::Deny));
        assert!(may_access(&admin, "team:x", RoomPolicy::Deny));
    }
}
