use base64::Engine;
use serde_json::{Value, json};

use super::*;

const SECRET: &str = "secret-for-tests-of-32-bytes-min";

fn auth() -> Authenticator {
    Authenticator::new(SECRET.as_bytes(), vec!["k1".into()], Duration::ZERO)
}

fn now() -> u64 {
    crate::protocol::now_ms() / 1000
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// An Ed25519 key pair: (signing key, public key PEM, raw public key).
fn ed25519() -> (EncodingKey, String, Vec<u8>) {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let raw = pair.public_key().as_ref().to_vec();
    // SubjectPublicKeyInfo { AlgorithmIdentifier { id-Ed25519 }, BIT STRING key }.
    let mut der = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    der.extend_from_slice(&raw);
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    (EncodingKey::from_ed_der(pkcs8.as_ref()), pem, raw)
}

fn eddsa(claims: &Value, key: &EncodingKey, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn config(extra: impl FnOnce(&mut AuthConfig)) -> AuthConfig {
    let mut c = AuthConfig {
        jwt_secret: SECRET.into(),
        ..AuthConfig::default()
    };
    extra(&mut c);
    c
}

fn claims() -> Value {
    json!({"sub": "42", "exp": now() + 60})
}

#[tokio::test]
async fn issued_token_verifies() {
    let a = auth();
    let t = a.issue("42", true, Duration::from_secs(60));
    let id = a.verify(Some(&t)).await.unwrap();
    assert_eq!(&*id.user_id, "42");
    assert!(id.admin);
}

#[tokio::test]
async fn issued_token_carries_issuer_audience_and_fits_max_lifetime() {
    let a = Authenticator::from_config(&config(|c| {
        c.issuer = "https://issuer.test".into();
        c.audience = vec!["rt".into(), "other".into()];
        c.max_token_lifetime = Some(Duration::from_secs(600));
    }))
    .unwrap();
    let t = a.issue("42", false, Duration::from_secs(3600));
    let id = a.verify(Some(&t)).await.unwrap();
    assert!(id.expires_at <= now() + 600, "ttl is capped");
}

#[tokio::test]
async fn rejects_bad_tokens() {
    let a = auth();
    assert!(matches!(a.verify(None).await, Err(AuthError::Missing)));
    assert!(matches!(a.verify(Some("")).await, Err(AuthError::Missing)));
    assert!(matches!(
        a.verify(Some("x.y.z")).await,
        Err(AuthError::Invalid(_))
    ));
    let t = hs256(&claims(), b"another-secret-another-secret-xx");
    assert!(matches!(
        a.verify(Some(&t)).await,
        Err(AuthError::Invalid(_))
    ));
    // alg: none, with a valid-looking payload.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    assert!(matches!(
        a.verify(Some(&none)).await,
        Err(AuthError::Invalid(_))
    ));
    // HS512 with the right secret: only HS256 is accepted.
    let t = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert!(matches!(
        a.verify(Some(&t)).await,
        Err(AuthError::Invalid(_))
    ));
    let t = hs256(&json!({"sub": "", "exp": now() + 60}), SECRET.as_bytes());
    assert!(matches!(
        a.verify(Some(&t)).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn rejects_expired() {
    let t = hs256(&json!({"sub": "42", "exp": now() - 10}), SECRET.as_bytes());
    assert!(matches!(
        auth().verify(Some(&t)).await,
        Err(AuthError::Expired)
    ));
    let lenient = Authenticator::new(SECRET.as_bytes(), vec![], Duration::from_secs(60));
    assert!(lenient.verify(Some(&t)).await.is_ok(), "within the leeway");
}

#[tokio::test]
async fn checks_nbf_with_leeway() {
    let t = hs256(
        &json!({"sub": "42", "exp": now() + 600, "nbf": now() + 120}),
        SECRET.as_bytes(),
    );
    assert!(matches!(
        auth().verify(Some(&t)).await,
        Err(AuthError::Invalid(_))
    ));
    let lenient = Authenticator::new(SECRET.as_bytes(), vec![], Duration::from_secs(300));
    assert!(lenient.verify(Some(&t)).await.is_ok());
    let t = hs256(
        &json!({"sub": "42", "exp": now() + 600, "nbf": now() - 1}),
        SECRET.as_bytes(),
    );
    assert!(auth().verify(Some(&t)).await.is_ok());
}

#[tokio::test]
async fn checks_issuer() {
    let a =
        Authenticator::from_config(&config(|c| c.issuer = "https://issuer.test".into())).unwrap();
    let with = |iss: Value| {
        let mut c = claims();
        if !iss.is_null() {
            c["iss"] = iss;
        }
        hs256(&c, SECRET.as_bytes())
    };
    assert!(
        a.verify(Some(&with(json!("https://issuer.test"))))
            .await
            .is_ok()
    );
    for bad in [json!("https://other.test"), Value::Null, json!(5)] {
        assert!(
            matches!(
                a.verify(Some(&with(bad.clone()))).await,
                Err(AuthError::Invalid(_))
            ),
            "iss {bad}"
        );
    }
    // No issuer configured: not checked.
    assert!(auth().verify(Some(&with(json!("anyone")))).await.is_ok());
}

#[tokio::test]
async fn checks_audience() {
    let a =
        Authenticator::from_config(&config(|c| c.audience = vec!["a".into(), "b".into()])).unwrap();
    let with = |aud: Value| {
        let mut c = claims();
        if !aud.is_null() {
            c["aud"] = aud;
        }
        hs256(&c, SECRET.as_bytes())
    };
    for good in [json!("a"), json!("b"), json!(["x", "b"])] {
        assert!(
            a.verify(Some(&with(good.clone()))).await.is_ok(),
            "aud {good}"
        );
    }
    for bad in [json!("c"), json!(["x", "y"]), Value::Null, json!(7)] {
        assert!(
            matches!(
                a.verify(Some(&with(bad.clone()))).await,
                Err(AuthError::Invalid(_))
            ),
            "aud {bad}"
        );
    }
    // No audience configured: accepted whatever `aud` says.
    let open = Authenticator::from_config(&config(|_| {})).unwrap();
    assert!(open.verify(Some(&with(json!("whatever")))).await.is_ok());
    assert!(open.verify(Some(&with(Value::Null))).await.is_ok());
}

#[tokio::test]
async fn checks_max_lifetime() {
    let a = Authenticator::from_config(&config(|c| {
        c.max_token_lifetime = Some(Duration::from_secs(3600))
    }))
    .unwrap();
    let t = |c: Value| hs256(&c, SECRET.as_bytes());
    let n = now();
    let ok = [
        json!({"sub": "1", "iat": n, "exp": n + 3600}),
        json!({"sub": "1", "exp": n + 1800}),
        // Issued long ago for an hour: the lifetime counts from `iat`.
        json!({"sub": "1", "iat": n - 3000, "exp": n + 600}),
    ];
    for c in ok {
        assert!(a.verify(Some(&t(c.clone()))).await.is_ok(), "{c}");
    }
    let too_long = [
        json!({"sub": "1", "iat": n, "exp": n + 3601}),
        json!({"sub": "1", "exp": n + 7200}),
        json!({"sub": "1", "iat": n - 7200, "exp": n + 60}),
    ];
    for c in too_long {
        assert!(
            matches!(
                a.verify(Some(&t(c.clone()))).await,
                Err(AuthError::Invalid(_))
            ),
            "{c}"
        );
    }
}

#[tokio::test]
async fn eddsa_with_public_key_file_and_no_confusion() {
    let (signing, pem, _) = ed25519();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pub.pem");
    std::fs::write(&path, &pem).unwrap();
    let a = Authenticator::from_config(&AuthConfig {
        public_key_file: path.display().to_string(),
        ..AuthConfig::default()
    })
    .unwrap();
    assert!(!a.has_secret());
    let id = a
        .verify(Some(&eddsa(&claims(), &signing, None)))
        .await
        .unwrap();
    assert_eq!(&*id.user_id, "42");
    let (other, _, _) = ed25519();
    assert!(matches!(
        a.verify(Some(&eddsa(&claims(), &other, None))).await,
        Err(AuthError::Invalid(_))
    ));
    // The public key PEM used as an HMAC secret (algorithm confusion).
    let t = hs256(&claims(), pem.as_bytes());
    assert!(matches!(
        a.verify(Some(&t)).await,
        Err(AuthError::Invalid(_))
    ));
    // Expiry is reported as such once the signature is good.
    let t = eddsa(&json!({"sub": "1", "exp": now() - 10}), &signing, None);
    assert!(matches!(a.verify(Some(&t)).await, Err(AuthError::Expired)));
}

#[test]
fn pem_types_are_detected_and_bad_files_refused() {
    let (_, pem, _) = ed25519();
    let key = parse_public_key_pem(&pem).unwrap();
    assert_eq!(key.kind, KeyKind::Ed25519);
    assert!(key.accepts(Algorithm::EdDSA));
    assert!(!key.accepts(Algorithm::HS256) && !key.accepts(Algorithm::ES256));
    assert!(parse_public_key_pem("hello").is_err());
    let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(
        parse_public_key_pem(private)
            .unwrap_err()
            .contains("private key")
    );
    let unknown = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode([0x30, 0x03, 0x02, 0x01, 0x00])
    );
    assert!(parse_public_key_pem(&unknown).is_err());
    assert!(matches!(
        load_public_key_file("/nonexistent/key.pem"),
        Err(KeyError::Read { .. })
    ));
    assert!(KeyKind::Rsa.supports(Algorithm::RS256) && !KeyKind::Rsa.supports(Algorithm::HS256));
    assert!(KeyKind::EcP256.supports(Algorithm::ES256));
    assert!(!KeyKind::EcP256.supports(Algorithm::ES384));
}

#[test]
fn jwks_parsing_skips_unusable_keys() {
    let (_, _, raw) = ed25519();
    let x = b64(&raw);
    let set = json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "good", "alg": "EdDSA", "use": "sig"},
        {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "no-alg"},
        {"kty": "oct", "k": b64(b"symmetric-secret"), "kid": "sym"},
        {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "enc", "use": "enc"},
        {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "wrong-alg", "alg": "RS256"},
        {"kty": "AKP", "kid": "future-type"},
        {"kty": "EC", "crv": "P-521", "x": x, "y": x, "kid": "p521"},
        "not an object"
    ]});
    let (keys, skipped) = jwks::parse_set(set.to_string().as_bytes()).unwrap();
    let kids: Vec<_> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
    assert_eq!(kids, ["good", "no-alg"]);
    assert_eq!(skipped, 6);
    assert_eq!(keys[0].alg, Some(Algorithm::EdDSA));
    assert!(jwks::parse_set(b"{}").is_err());
    assert!(jwks::parse_set(b"[1]").is_err());
}

#[test]
fn api_keys() {
    let a = auth();
    assert!(a.is_api_key("k1"));
    assert!(!a.is_api_key("k2"));
    assert!(!a.is_api_key(""));
    // A prefix or an extension of a key is not the key.
    assert!(!a.is_api_key("k"));
    assert!(!a.is_api_key("k1x"));
}

#[tokio::test]
async fn room_acl() {
    let user = Identity {
        user_id: "7".into(),
        admin: false,
        expires_at: 0,
    };
    let admin = Identity {
        admin: true,
        ..user.clone()
    };
    let with = |policy| {
        rooms::RoomAccess::new(&crate::config::RoomsConfig {
            policy,
            ..Default::default()
        })
        .unwrap()
    };
    let (deny, allow) = (with(RoomPolicy::Deny), with(RoomPolicy::Allow));
    assert!(deny.check(&user, "public:lobby").await.is_ok());
    assert!(deny.check(&user, "private:7").await.is_ok());
    assert!(allow.check(&user, "private:8").await.is_err());
    assert!(deny.check(&admin, "private:8").await.is_ok());
    assert!(allow.check(&user, "team:x").await.is_ok());
    assert!(deny.check(&user, "team:x").await.is_err());
    assert!(deny.check(&admin, "team:x").await.is_ok());
}
