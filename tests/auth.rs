//! Token hardening against the real binary: asymmetric keys (PEM file and JWKS), key rotation,
//! `nbf`, `iss`, `aud`, maximum lifetime, algorithm confusion, secret length.
//!
//! Keys are generated at run time with the `openssl` command; the JWKS is served by a small
//! HTTP server inside the test process on 127.0.0.1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::{Client, Event, SECRET, Server, WAIT, b64url, now_secs, token_with};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Keys

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Rsa,
    Ec,
    Ed,
}

struct Key {
    kind: Kind,
    private_pem: String,
    public_pem: String,
    /// JWK parameters (`kty`, `n`/`e`, `crv`/`x`/`y`), without `kid`.
    jwk: Value,
}

impl Key {
    fn alg(&self) -> Algorithm {
        match self.kind {
            Kind::Rsa => Algorithm::RS256,
            Kind::Ec => Algorithm::ES256,
            Kind::Ed => Algorithm::EdDSA,
        }
    }

    fn encoding(&self) -> EncodingKey {
        let pem = self.private_pem.as_bytes();
        match self.kind {
            Kind::Rsa => EncodingKey::from_rsa_pem(pem),
            Kind::Ec => EncodingKey::from_ec_pem(pem),
            Kind::Ed => EncodingKey::from_ed_pem(pem),
        }
        .expect("test key loads")
    }

    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg());
        header.kid = kid.map(String::from);
        jsonwebtoken::encode(&header, claims, &self.encoding()).expect("sign")
    }

    fn jwk(&self, kid: &str) -> Value {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(match self.kind {
            Kind::Rsa => "RS256",
            Kind::Ec => "ES256",
            Kind::Ed => "EdDSA",
        });
        jwk
    }

    /// Writes the public key PEM into `dir`; returns its path.
    fn write_public(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.public_pem).expect("write public key");
        path
    }
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn generate(kind: Kind, dir: &Path, name: &str) -> Key {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let (p, q) = (private.to_str().unwrap(), public.to_str().unwrap());
    match kind {
        Kind::Rsa => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p,
        ]),
        Kind::Ec => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            p,
        ]),
        Kind::Ed => openssl(&["genpkey", "-algorithm", "ed25519", "-out", p]),
    };
    openssl(&["pkey", "-in", p, "-pubout", "-out", q]);
    let der = openssl(&["pkey", "-pubin", "-in", q, "-outform", "DER"]);
    let jwk = match kind {
        Kind::Rsa => {
            let out =
                String::from_utf8(openssl(&["rsa", "-pubin", "-in", q, "-noout", "-modulus"]))
                    .unwrap();
            let hex = out.trim().strip_prefix("Modulus=").expect("Modulus=HEX");
            let n: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            json!({"kty": "RSA", "n": b64url(&n), "e": "AQAB"})
        }
        Kind::Ec => {
            let point = &der[der.len() - 65..];
            assert_eq!(point[0], 4, "uncompressed point");
            json!({"kty": "EC", "crv": "P-256", "x": b64url(&point[1..33]), "y": b64url(&point[33..])})
        }
        Kind::Ed => json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(&der[der.len() - 32..])}),
    };
    Key {
        kind,
        private_pem: std::fs::read_to_string(&private).unwrap(),
        public_pem: std::fs::read_to_string(&public).unwrap(),
        jwk,
    }
}

struct Keys {
    rsa: Key,
    rsa2: Key,
    ec: Key,
    ec2: Key,
    ed: Key,
    ed2: Key,
}

/// Generated once per test process.
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        Keys {
            rsa: generate(Kind::Rsa, d, "rsa"),
            rsa2: generate(Kind::Rsa, d, "rsa2"),
            ec: generate(Kind::Ec, d, "ec"),
            ec2: generate(Kind::Ec, d, "ec2"),
            ed: generate(Kind::Ed, d, "ed"),
            ed2: generate(Kind::Ed, d, "ed2"),
        }
    })
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_secs() + 600})
}

/// `token` with its payload replaced (the signature no longer matches).
fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    )
}

// ---------------------------------------------------------------------------------------------
// Outcomes

async fn assert_accepted(s: &Server, token: &str, what: &str) {
    let mut c = Client::connect(&s.ws_url(token)).await;
    match c.next_event(tokio::time::Instant::now() + WAIT).await {
        Event::Json(v) => assert_eq!(v["type"], "welcome", "{what}: {v}"),
        other => panic!("{what}: no welcome: {other:?}\n{}", s.logs()),
    }
}

/// Asserts the connection is closed with 1008; returns the close reason.
async fn assert_refused(s: &Server, token: &str, what: &str) -> String {
    let mut c = Client::connect(&s.ws_url(token)).await;
    let code = c.expect_close(WAIT).await;
    assert_eq!(
        code,
        Some(1008),
        "{what}: frames {:?}",
        c.frames_before_close
    );
    assert!(
        c.frames_before_close.is_empty(),
        "{what}: frames before close: {:?}",
        c.frames_before_close
    );
    c.close_reason.clone().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// JWKS server

#[derive(Clone, Default)]
struct JwksState {
    keys: Arc<Mutex<Vec<Value>>>,
    hits: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

struct JwksServer {
    url: String,
    state: JwksState,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let state = JwksState::default();
        *state.keys.lock().unwrap() = keys;
        let app = axum::Router::new()
            .route("/jwks.json", axum::routing::get(serve_jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        JwksServer { url, state, task }
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn add(&self, key: Value) {
        self.state.keys.lock().unwrap().push(key);
    }

    fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    fn toml(&self, refresh: &str) -> String {
        format!(
            "[auth]\njwt_secret = \"\"\njwks_url = \"{}\"\njwks_refresh = \"{refresh}\"\n",
            self.url
        )
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(State(state): State<JwksState>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    if state.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let keys = state.keys.lock().unwrap().clone();
    axum::Json(json!({ "keys": keys })).into_response()
}

async fn jwks_metric(s: &Server, result: &str) -> f64 {
    s.metric_sum("rtgate_jwks_refresh_total", &format!("result=\"{result}\""))
        .await
}

/// Polls the JWKS metric until it reaches `at_least` (bounded: 10 s); returns the last value.
async fn wait_jwks_metric(s: &Server, result: &str, at_least: f64) -> f64 {
    let mut v = 0.0;
    for _ in 0..100 {
        v = jwks_metric(s, result).await;
        if v >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Public key file

#[tokio::test]
async fn rs256_es256_eddsa_tokens_with_public_key_file() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    for (key, other) in [(&k.rsa, &k.rsa2), (&k.ec, &k.ec2), (&k.ed, &k.ed2)] {
        let alg = format!("{:?}", key.alg());
        let path = key.write_public(dir.path(), &format!("{alg}.pem"));
        // Only the public key: no HS256 secret at all.
        let s = Server::start(&format!(
            "[auth]\njwt_secret = \"\"\npublic_key_file = \"{}\"\n",
            path.display()
        ))
        .await;
        let good = key.sign(None, &claims("alice"));
        assert_accepted(&s, &good, &format!("{alg} token")).await;
        // A kid does not matter with a key file.
        assert_accepted(&s, &key.sign(Some("any"), &claims("bob")), &alg).await;
        let reason = assert_refused(
            &s,
            &tampered(
                &good,
                &json!({"sub": "mallory", "exp": now_secs() + 600, "admin": true}),
            ),
            &format!("tampered {alg}"),
        )
        .await;
        assert_eq!(reason, "invalid token");
        assert_refused(
            &s,
            &other.sign(None, &claims("alice")),
            &format!("{alg}, other key"),
        )
        .await;
        // Expired, with a good signature.
        let expired = key.sign(None, &json!({"sub": "alice", "exp": now_secs() - 30}));
        assert_eq!(
            assert_refused(&s, &expired, &format!("expired {alg}")).await,
            "token expired"
        );
        // HS256 is refused without a secret.
        assert_refused(
            &s,
            &common::token("alice", false, 600),
            "HS256 without a secret",
        )
        .await;
    }
}

#[tokio::test]
async fn hs256_works_alongside_a_public_key_and_confusion_is_refused() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let path = k.rsa.write_public(dir.path(), "rsa.pem");
    let s = Server::start(&format!(
        "[auth]\npublic_key_file = \"{}\"\n",
        path.display()
    ))
    .await;
    assert_accepted(
        &s,
        &common::token("alice", false, 600),
        "HS256 with the secret",
    )
    .await;
    assert_accepted(&s, &k.rsa.sign(None, &claims("alice")), "RS256").await;
    // Algorithm confusion: HS256 signed with the public key PEM as the HMAC secret.
    let confused = token_with(&claims("mallory"), &k.rsa.public_pem);
    assert_refused(&s, &confused, "HS256 signed with the public key").await;
    assert_refused(&s, &common::alg_none_token("mallory", true), "alg none").await;

    // Same without a secret configured.
    let s = Server::start(&format!(
        "[auth]\njwt_secret = \"\"\npublic_key_file = \"{}\"\n",
        path.display()
    ))
    .await;
    assert_refused(&s, &confused, "HS256 signed with the public key, no secret").await;
}

// ---------------------------------------------------------------------------------------------
// JWKS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_chosen_by_kid() {
    let k = keys();
    let jwks = JwksServer::start(vec![k.rsa.jwk("r1"), k.ec.jwk("e1"), k.ed.jwk("d1")]).await;
    let s = Server::start(&jwks.toml("5m")).await;
    assert_eq!(jwks.hits(), 1, "fetched once at start");
    assert_eq!(jwks_metric(&s, "ok").await, 1.0);
    assert_accepted(&s, &k.rsa.sign(Some("r1"), &claims("a")), "RS256 r1").await;
    assert_accepted(&s, &k.ec.sign(Some("e1"), &claims("a")), "ES256 e1").await;
    assert_accepted(&s, &k.ed.sign(Some("d1"), &claims("a")), "EdDSA d1").await;
    // No kid: every key fitting the algorithm is tried.
    assert_accepted(&s, &k.ed.sign(None, &claims("a")), "EdDSA without kid").await;
    // The kid names a key of another type, or the signature is by another key.
    assert_refused(
        &s,
        &k.ec.sign(Some("r1"), &claims("a")),
        "ES256 with an RSA kid",
    )
    .await;
    assert_refused(
        &s,
        &k.rsa2.sign(Some("r1"), &claims("a")),
        "RS256 by another key",
    )
    .await;
    assert_refused(
        &s,
        &tampered(&k.ed.sign(Some("d1"), &claims("a")), &claims("b")),
        "tampered EdDSA",
    )
    .await;
    // HS256 signed with a JWK's parameters, and no secret configured.
    let n = k.rsa.jwk["n"].as_str().unwrap();
    assert_refused(&s, &token_with(&claims("a"), n), "HS256 with the modulus").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_refetches_at_most_once_per_minute() {
    let k = keys();
    let jwks = JwksServer::start(vec![k.rsa.jwk("r1")]).await;
    // A long refresh interval: only unknown key ids cause fetches here.
    let s = Server::start(&jwks.toml("1h")).await;
    assert_eq!(jwks.hits(), 1);
    assert_accepted(&s, &k.rsa.sign(Some("r1"), &claims("a")), "r1").await;
    assert_eq!(jwks.hits(), 1, "a known kid does not fetch");

    // Rotation: the provider publishes r2; the first token with r2 causes one fetch.
    jwks.add(k.rsa2.jwk("r2"));
    assert_accepted(&s, &k.rsa2.sign(Some("r2"), &claims("a")), "new kid r2").await;
    assert_eq!(jwks.hits(), 2, "one refetch for the new kid");
    assert_accepted(&s, &k.rsa2.sign(Some("r2"), &claims("b")), "r2 again").await;
    assert_accepted(&s, &k.rsa.sign(Some("r1"), &claims("b")), "r1 still").await;
    assert_eq!(jwks.hits(), 2);

    // A flood of unknown key ids within the minute: no more fetches.
    let mut flood = Vec::new();
    for i in 0..20 {
        let url = s.ws_url(&k.rsa.sign(Some(&format!("unknown-{i}")), &claims("x")));
        flood.push(async move {
            let mut c = Client::connect(&url).await;
            c.expect_close(WAIT).await
        });
    }
    let codes = futures_util::future::join_all(flood).await;
    assert!(codes.iter().all(|c| *c == Some(1008)), "{codes:?}");
    assert_eq!(jwks.hits(), 2, "unknown kids fetch at most once a minute");

    // Even a real new key waits for the next minute (or the periodic refresh).
    jwks.add(k.ec.jwk("e3"));
    assert_refused(
        &s,
        &k.ec.sign(Some("e3"), &claims("a")),
        "e3 within the minute",
    )
    .await;
    assert_eq!(jwks.hits(), 2);
    assert_eq!(jwks_metric(&s, "ok").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_after_start_keeps_the_last_good_keys() {
    let k = keys();
    let jwks = JwksServer::start(vec![k.ed.jwk("d1")]).await;
    let s = Server::start(&jwks.toml("1s")).await;
    assert_accepted(&s, &k.ed.sign(Some("d1"), &claims("a")), "d1").await;
    jwks.set_down(true);
    let errors = wait_jwks_metric(&s, "error", 2.0).await;
    assert!(errors >= 2.0, "refreshes failed and were counted: {errors}");
    assert_accepted(
        &s,
        &k.ed.sign(Some("d1"), &claims("a")),
        "d1 after failures",
    )
    .await;
    assert_refused(&s, &k.ed2.sign(Some("d1"), &claims("a")), "other key").await;
    assert!(s.logs().contains("JWKS fetch failed"), "{}", s.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_unavailable_at_start_refuses_until_a_fetch_succeeds() {
    let k = keys();
    let jwks = JwksServer::start(vec![k.ec.jwk("e1")]).await;
    jwks.set_down(true);
    let s = Server::start(&jwks.toml("1s")).await;
    assert!(jwks_metric(&s, "error").await >= 1.0);
    let token = k.ec.sign(Some("e1"), &claims("a"));
    assert_refused(&s, &token, "no keys yet").await;
    jwks.set_down(false);
    wait_jwks_metric(&s, "ok", 1.0).await;
    assert_accepted(&s, &token, "after the JWKS came back").await;
}

// ---------------------------------------------------------------------------------------------
// Claims

#[tokio::test]
async fn nbf_in_the_future_is_refused() {
    let s = Server::start("").await;
    let n = now_secs();
    let future = token_with(&json!({"sub": "a", "exp": n + 600, "nbf": n + 120}), SECRET);
    assert_refused(&s, &future, "nbf in 2 minutes").await;
    let past = token_with(&json!({"sub": "a", "exp": n + 600, "nbf": n - 5}), SECRET);
    assert_accepted(&s, &past, "nbf passed").await;
    // Within jwt_leeway.
    let s = Server::start("[auth]\njwt_leeway = \"5m\"\n").await;
    assert_accepted(&s, &future, "nbf within the leeway").await;
}

#[tokio::test]
async fn issuer_is_checked_when_set() {
    let s = Server::start("[auth]\nissuer = \"https://id.example.test\"\n").await;
    let with = |iss: Option<&str>| {
        let mut c = claims("a");
        if let Some(iss) = iss {
            c["iss"] = json!(iss);
        }
        token_with(&c, SECRET)
    };
    assert_accepted(&s, &with(Some("https://id.example.test")), "right iss").await;
    assert_refused(&s, &with(Some("https://evil.example.test")), "wrong iss").await;
    assert_refused(&s, &with(None), "missing iss").await;
}

#[tokio::test]
async fn audience_string_or_list_must_match_when_set() {
    let with = |aud: Value| {
        let mut c = claims("a");
        if !aud.is_null() {
            c["aud"] = aud;
        }
        token_with(&c, SECRET)
    };
    let s = Server::start("[auth]\naudience = [\"chat\", \"rtgate\"]\n").await;
    assert_accepted(&s, &with(json!("rtgate")), "aud string").await;
    assert_accepted(&s, &with(json!(["billing", "chat"])), "aud list").await;
    assert_refused(&s, &with(json!("billing")), "aud string, no match").await;
    assert_refused(&s, &with(json!(["billing", "admin"])), "aud list, no match").await;
    assert_refused(&s, &with(Value::Null), "no aud").await;

    // Configured as a single string.
    let s = Server::start("[auth]\naudience = \"rtgate\"\n").await;
    assert_accepted(&s, &with(json!(["rtgate"])), "aud list, string config").await;
    assert_refused(&s, &with(json!("chat")), "aud, string config").await;

    // Not configured: `aud` is not checked.
    let s = Server::start("").await;
    assert_accepted(&s, &with(json!("anything")), "aud, none configured").await;
    assert_accepted(&s, &with(Value::Null), "no aud, none configured").await;
}

#[tokio::test]
async fn max_token_lifetime_is_enforced() {
    let s = Server::start("[auth]\nmax_token_lifetime = \"1h\"\n").await;
    let n = now_secs();
    let t = |c: Value| token_with(&c, SECRET);
    assert_accepted(&s, &t(json!({"sub": "a", "iat": n, "exp": n + 3600})), "1h").await;
    assert_accepted(&s, &t(json!({"sub": "a", "exp": n + 1800})), "30m, no iat").await;
    assert_refused(&s, &t(json!({"sub": "a", "iat": n, "exp": n + 7200})), "2h").await;
    assert_refused(&s, &t(json!({"sub": "a", "exp": n + 7200})), "2h, no iat").await;
    assert_refused(
        &s,
        &t(json!({"sub": "a", "iat": n - 86_400, "exp": n + 60})),
        "issued a day ago",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Runs `rtgate --config FILE config check`; returns (exit code, stderr).
fn config_check(dir: &Path, toml: &str) -> (Option<i32>, String) {
    let path = dir.join("rtgate.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtgate"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RTGATE_") {
            cmd.env_remove(&k);
        }
    }
    let out = cmd
        .arg("--config")
        .arg(&path)
        .args(["config", "check"])
        .output()
        .expect("run rtgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn short_secret_and_bad_public_key_file_fail_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = config_check(
        dir.path(),
        "[auth]\njwt_secret = \"only-31-bytes-long-secret-here\"\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("auth.jwt_secret"), "{err}");

    let (code, err) = config_check(dir.path(), &format!("[auth]\njwt_secret = \"{SECRET}\"\n"));
    assert_eq!(code, Some(0), "{err}");

    let missing = dir.path().join("missing.pem");
    let (code, err) = config_check(
        dir.path(),
        &format!("[auth]\npublic_key_file = \"{}\"\n", missing.display()),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("auth.public_key_file"), "{err}");

    // A private key where the public one belongs.
    let private = dir.path().join("private.pem");
    std::fs::write(&private, &keys().ec.private_pem).unwrap();
    let (code, err) = config_check(
        dir.path(),
        &format!("[auth]\npublic_key_file = \"{}\"\n", private.display()),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("auth.public_key_file") && err.contains("private"),
        "{err}"
    );

    let public = keys().ed.write_public(dir.path(), "ed.pem");
    let (code, err) = config_check(
        dir.path(),
        &format!("[auth]\npublic_key_file = \"{}\"\n", public.display()),
    );
    assert_eq!(code, Some(0), "{err}");
}
