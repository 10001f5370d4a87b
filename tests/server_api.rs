//! The server API (history, presence, rooms, disconnect, unsubscribe, broadcast to many rooms,
//! OpenAPI), join authorization through the app's backend, and webhooks: against the real
//! binary, with a real local HTTP server standing in for the backend, on the memory broker and
//! over Redis with two instances.

mod common;

use std::time::Duration;

use common::backend::{Backend, expected_signature};
use common::redis::{RedisServer, require_redis};
use common::{API_KEY, QUIET, Server, WAIT, messages_in};
use serde_json::{Value, json};

const HOOK_SECRET: &str = "webhook-secret-0123456789";

async fn api(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    api_with_key(server, method, path, body, Some(API_KEY)).await
}

async fn api_with_key(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let client = server.http_client();
    let url = server.http(path);
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The ids of a history page's messages.
fn ids_in(page: &Value) -> Vec<&str> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect()
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

#[tokio::test]
async fn history_presence_rooms_and_their_errors() {
    let server = Server::start("[broker]\nhistory_size = 5\n").await;
    let room = "public:api-history";
    let mut alice = server.user("alice").await;
    alice.join(room).await;
    alice
        .request_ok(json!({"type": "track", "room": room, "data": {"status": "here"}}))
        .await;
    let mut bob = server.user("bob").await;
    bob.join(room).await;
    bob.join("public:api-other").await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(alice.publish(room, json!({ "n": n })).await);
    }

    // The newest messages, oldest first, as clients get them; then pages after `since`.
    let (status, page) = api(
        &server,
        "GET",
        &format!("/api/v1/rooms/{room}/history?limit=3"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let got = ids_in(&page);
    assert_eq!(got, ids[1..].iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(page["messages"][0]["type"], "message");
    assert_eq!(page["messages"][0]["sender_id"], "alice");
    assert_eq!(page["messages"][0]["data"]["n"], 1);
    let (status, page) = api(
        &server,
        "GET",
        &format!("/api/v1/rooms/{room}/history?since={}&limit=2", ids[0]),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let got = ids_in(&page);
    assert_eq!(got, [ids[1].as_str(), ids[2].as_str()]);
    assert_eq!(page["more"], true);
    // Three more trim ids[1] out of a 5-message history: a gap after ids[0], as for join.
    for n in 4..7 {
        ids.push(alice.publish(room, json!({ "n": n })).await);
    }
    let (status, gap) = api(
        &server,
        "GET",
        &format!("/api/v1/rooms/{room}/history?since={}", ids[0]),
        None,
    )
    .await;
    assert_eq!((status, error_code(&gap)), (410, "history_gap"), "{gap}");

    // Presence and its counts.
    let (status, presence) = api(
        &server,
        "GET",
        &format!("/api/v1/rooms/{room}/presence"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{presence}");
    assert_eq!(presence["presence"]["alice"][0]["status"], "here");
    let (status, stats) = api(
        &server,
        "GET",
        &format!("/api/v1/rooms/{room}/presence/stats"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        (stats["connections"].as_u64(), stats["users"].as_u64()),
        (Some(1), Some(1))
    );

    // Rooms with members, with counts, a page at a time.
    let (status, rooms) = api(&server, "GET", "/api/v1/rooms?limit=1", None).await;
    assert_eq!(status, 200, "{rooms}");
    assert_eq!(
        rooms["rooms"],
        json!([{"room": "public:api-history", "members": 2}])
    );
    assert_eq!(rooms["next"], "public:api-history");
    let (_, rest) = api(
        &server,
        "GET",
        "/api/v1/rooms?limit=1&after=public:api-history",
        None,
    )
    .await;
    assert_eq!(
        rest["rooms"],
        json!([{"room": "public:api-other", "members": 1}])
    );
    assert_eq!(rest["next"], Value::Null);

    // Bad input: clear errors, nothing changed.
    let (status, e) = api(
        &server,
        "GET",
        "/api/v1/rooms/public:nobody-here/presence",
        None,
    )
    .await;
    assert_eq!((status, error_code(&e)), (404, "not_found"), "{e}");
    let (status, e) = api(
        &server,
        "GET",
        "/api/v1/rooms/public:nobody-here/history",
        None,
    )
    .await;
    assert_eq!((status, error_code(&e)), (404, "not_found"), "{e}");
    let (status, e) = api(&server, "GET", "/api/v1/rooms/bad%20room/presence", None).await;
    assert_eq!((status, error_code(&e)), (400, "bad_request"), "{e}");
    let (status, e) = api(
        &server,
        "GET",
        &format!("/api/v1/rooms/{room}/history?since=nope"),
        None,
    )
    .await;
    assert_eq!((status, error_code(&e)), (400, "bad_request"), "{e}");
    let (status, e) = api(&server, "GET", "/api/v1/rooms?limit=0", None).await;
    assert_eq!((status, error_code(&e)), (400, "bad_request"), "{e}");
    let (status, e) = api(&server, "POST", "/api/v1/users/nobody/disconnect", None).await;
    assert_eq!((status, error_code(&e)), (404, "not_found"), "{e}");
    let (status, e) = api_with_key(&server, "GET", "/api/v1/rooms", None, Some("wrong-key")).await;
    assert_eq!((status, error_code(&e)), (401, "unauthorized"), "{e}");
    let (status, e) = api_with_key(&server, "GET", "/api/v1/rooms", None, None).await;
    assert_eq!((status, error_code(&e)), (401, "unauthorized"), "{e}");
    alice.assert_alive().await;
    bob.assert_alive().await;
}

#[tokio::test]
async fn broadcast_to_many_rooms_answers_one_id_per_room() {
    let server = Server::start("").await;
    let mut a = server.user("a").await;
    a.join("public:many-1").await;
    a.join("public:many-2").await;
    let body = json!({"rooms": ["public:many-1", "public:many-2"], "data": {"k": 1}, "idempotency_key": "once"});
    let (status, reply) = api(&server, "POST", "/api/v1/broadcast", Some(body.clone())).await;
    assert_eq!(status, 200, "{reply}");
    let frames = a.collect_for(Duration::from_millis(500)).await;
    for room in ["public:many-1", "public:many-2"] {
        let got: Vec<&Value> = frames
            .iter()
            .filter(|f| f["type"] == "system" && f["room"] == room)
            .collect();
        assert_eq!(got.len(), 1, "{room}: {frames:?}");
        assert_eq!(got[0]["type"], "system");
        assert_eq!(got[0]["id"], reply["ids"][room], "{reply}");
    }
    // The same key again: the same ids, nothing published.
    let (_, again) = api(&server, "POST", "/api/v1/broadcast", Some(body)).await;
    assert_eq!(again["ids"], reply["ids"]);
    let later = a.collect_for(QUIET).await;
    assert!(!later.iter().any(|f| f["type"] == "system"), "{later:?}");
    let (status, e) = api(
        &server,
        "POST",
        "/api/v1/broadcast",
        Some(json!({"room": "public:x", "rooms": ["public:y"], "data": {}})),
    )
    .await;
    assert_eq!((status, error_code(&e)), (400, "bad_request"), "{e}");
    let too_many: Vec<String> = (0..101).map(|i| format!("public:r{i}")).collect();
    let (status, e) = api(
        &server,
        "POST",
        "/api/v1/broadcast",
        Some(json!({"rooms": too_many, "data": {}})),
    )
    .await;
    assert_eq!((status, error_code(&e)), (400, "bad_request"), "{e}");
}

#[tokio::test]
async fn unsubscribe_and_disconnect_reach_the_users_connections() {
    let server = Server::start("").await;
    let room = "public:kick";
    let mut carol = server.user("carol").await;
    let mut carol2 = server.user("carol").await;
    carol.join(room).await;
    carol2.join(room).await;
    let mut dave = server.user("dave").await;
    dave.join(room).await;

    let (status, reply) = api(
        &server,
        "POST",
        &format!("/api/v1/rooms/{room}/unsubscribe"),
        Some(json!({"user": "carol"})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    for c in [&mut carol, &mut carol2] {
        let notice = c
            .recv_until(
                |v| v["type"] == "system" && v["data"]["event"] == "unsubscribed",
                WAIT,
            )
            .await
            .expect("carol is told");
        assert_eq!(notice["room"], room);
    }
    dave.publish(room, json!({"after": true})).await;
    assert!(
        messages_in(&carol.collect_for(QUIET).await, room).is_empty(),
        "carol left the room"
    );
    assert!(dave.recv_message(room, WAIT).await.is_some());
    let (_, stats) = api(&server, "GET", "/api/v1/rooms", None).await;
    assert_eq!(stats["rooms"], json!([{"room": room, "members": 1}]));

    let (status, reply) = api(
        &server,
        "POST",
        "/api/v1/users/carol/disconnect",
        Some(json!({"code": 4001, "reason": "banned"})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["connections"], 2);
    assert_eq!(carol.expect_close(WAIT).await, Some(4001));
    assert_eq!(carol2.expect_close(WAIT).await, Some(4001));
    dave.assert_alive().await;
    let (status, e) = api(
        &server,
        "POST",
        "/api/v1/users/dave/disconnect",
        Some(json!({"code": 1006})),
    )
    .await;
    assert_eq!((status, error_code(&e)), (400, "bad_request"), "{e}");
    // Default close code: 1008.
    let (status, _) = api(&server, "POST", "/api/v1/users/dave/disconnect", None).await;
    assert_eq!(status, 200);
    assert_eq!(dave.expect_close(WAIT).await, Some(1008));
}

#[tokio::test]
async fn join_authorization_asks_the_backend_and_caches_its_answer() {
    let backend = Backend::start().await;
    let cfg = format!(
        "[rooms]\nauthorize_timeout = \"300ms\"\n[[rooms.rules]]\nprefix = \"app:\"\npolicy = \"hook\"\n\
         authorize_url = \"{}\"\n",
        backend.url("/authorize")
    );
    let server = Server::start(&cfg).await;
    let mut erin = server.user("erin").await;
    // Allowed, with presence meta defaults under the client's own.
    erin.join("app:allow-1").await;
    let calls = backend.authorize_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["user_id"], "erin");
    assert_eq!(calls[0]["room"], "app:allow-1");
    assert_eq!(calls[0]["claims"]["sub"], "erin");
    erin.request_ok(json!({"type": "track", "room": "app:allow-1", "data": {"color": "red"}}))
        .await;
    let (_, presence) = api(&server, "GET", "/api/v1/rooms/app:allow-1/presence", None).await;
    assert_eq!(
        presence["presence"]["erin"][0]["role"], "member",
        "{presence}"
    );
    assert_eq!(
        presence["presence"]["erin"][0]["color"], "red",
        "{presence}"
    );
    // Members may publish; others are told to join first.
    erin.publish("app:allow-1", json!({"hi": 1})).await;
    let mut frank = server.user("frank").await;
    frank
        .request_err(
            json!({"type": "message", "room": "app:allow-1", "data": {}}),
            "forbidden",
        )
        .await;
    // Cached: leaving and joining again asks nobody.
    erin.leave("app:allow-1").await;
    erin.join("app:allow-1").await;
    assert_eq!(
        backend.authorize_calls().len(),
        1,
        "answer reused from the cache"
    );

    // An allow whose meta defaults are over the presence limits: allowed, defaults ignored.
    erin.join("app:bigmeta-1").await;
    erin.request_ok(json!({"type": "track", "room": "app:bigmeta-1", "data": {"color": "red"}}))
        .await;
    let (_, presence) = api(&server, "GET", "/api/v1/rooms/app:bigmeta-1/presence", None).await;
    assert_eq!(
        presence["presence"]["erin"][0]["color"], "red",
        "{presence}"
    );
    assert!(
        presence["presence"]["erin"][0].get("filler").is_none(),
        "{presence}"
    );
    assert!(
        server
            .metric_sum("rtgate_limit_exceeded_total", "authorize_answer_bytes")
            .await
            >= 1.0
    );
    erin.request_err(json!({"type": "join", "room": "app:deny-1"}), "forbidden")
        .await;
    let started = std::time::Instant::now();
    erin.request_err(json!({"type": "join", "room": "app:slow-1"}), "unavailable")
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by rooms.authorize_timeout"
    );
    erin.request_err(
        json!({"type": "join", "room": "app:error-1"}),
        "unavailable",
    )
    .await;
    // Errors are not cached: asked again.
    erin.request_err(
        json!({"type": "join", "room": "app:error-1"}),
        "unavailable",
    )
    .await;
    let error_calls = backend
        .authorize_calls()
        .iter()
        .filter(|c| c["room"] == "app:error-1")
        .count();
    assert_eq!(error_calls, 2);
    // Rooms the rules do not hand to the hook are as before.
    erin.join("public:free").await;
    erin.request_err(
        json!({"type": "join", "room": "private:someone"}),
        "forbidden",
    )
    .await;
    erin.assert_alive().await;
    assert!(
        server
            .metric_sum("rtgate_authorize_requests_total", "outcome=\"deny\"")
            .await
            >= 1.0
    );
}

fn webhooks_toml(backend: &Backend, port_override: Option<u16>) -> String {
    let url = match port_override {
        Some(p) => format!("http://127.0.0.1:{p}/hooks"),
        None => backend.url("/hooks"),
    };
    format!("[webhooks]\nurl = \"{url}\"\nsecret = \"{HOOK_SECRET}\"\ninterval = \"200ms\"\n")
}

fn events_named<'a>(events: &'a [Value], name: &str, room: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == name && e["room"] == room)
        .collect()
}

#[tokio::test]
async fn webhooks_are_signed_batched_and_announce_rooms_and_presence() {
    let backend = Backend::start().await;
    let server = Server::start(&webhooks_toml(&backend, None)).await;
    let room = "public:hooked";
    let mut gus = server.user("gus").await;
    let mut hal = server.user("hal").await;
    gus.join(room).await;
    hal.join(room).await;
    gus.request_ok(json!({"type": "track", "room": room, "data": {"mood": "ok"}}))
        .await;
    // A second track only changes the meta: no second join.
    gus.request_ok(json!({"type": "track", "room": room, "data": {"mood": "fine"}}))
        .await;
    gus.request_ok(json!({"type": "untrack", "room": room}))
        .await;
    gus.leave(room).await;
    hal.leave(room).await;
    let events = backend
        .wait_events(Duration::from_secs(5), |e| {
            !events_named(e, "room_vacated", room).is_empty()
        })
        .await;
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["room"] == room)
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "room_occupied",
            "presence_join",
            "presence_leave",
            "room_vacated"
        ],
        "{events:?}"
    );
    let join = events_named(&events, "presence_join", room)[0];
    assert_eq!(join["user_id"], "gus");
    assert_eq!(join["meta"]["mood"], "ok");
    assert!(join["ts"].is_string() && join["instance_id"].is_string());
    // Batched (at most one POST per 200 ms here), each signed over "<timestamp>.<body>".
    let deliveries = backend.deliveries();
    assert!(
        deliveries.len() < names.len(),
        "batched: {} POSTs",
        deliveries.len()
    );
    for d in &deliveries {
        assert_eq!(
            d.signature,
            format!(
                "sha256={}",
                expected_signature(HOOK_SECRET, &d.timestamp, &d.body)
            )
        );
        let age = common::now_secs() - d.timestamp.parse::<i64>().expect("timestamp");
        assert!((0..60).contains(&age), "timestamp {}", d.timestamp);
    }
}

/// A receiver that answers errors gets the same batch again (backoff) until it takes it:
/// every event arrives once.
#[tokio::test]
async fn a_refused_webhook_batch_is_retried() {
    let backend = Backend::start().await;
    let cfg = format!(
        "[webhooks]\nurl = \"{}\"\nsecret = \"{HOOK_SECRET}\"\ninterval = \"100ms\"\n",
        backend.url("/hooks-flaky")
    );
    let server = Server::start(&cfg).await;
    let room = "public:flaky";
    let mut kay = server.user("kay").await;
    kay.join(room).await;
    let events = backend
        .wait_events(Duration::from_secs(5), |e| {
            !events_named(e, "room_occupied", room).is_empty()
        })
        .await;
    assert_eq!(
        events_named(&events, "room_occupied", room).len(),
        1,
        "{events:?}"
    );
    assert!(server.metric_sum("rtgate_webhook_failures_total", "").await >= 2.0);
    kay.leave(room).await;
    let events = backend
        .wait_events(Duration::from_secs(5), |e| {
            !events_named(e, "room_vacated", room).is_empty()
        })
        .await;
    assert_eq!(
        events_named(&events, "room_occupied", room).len(),
        1,
        "{events:?}"
    );
    assert_eq!(
        events_named(&events, "room_vacated", room).len(),
        1,
        "{events:?}"
    );
}

/// More events than one batch, all at once, then silence: every batch still goes out (at most
/// `batch_max` events per POST).
#[tokio::test]
async fn a_backlog_longer_than_a_batch_is_sent_without_new_events() {
    let backend = Backend::start().await;
    let cfg = webhooks_toml(&backend, None).replace("interval = \"200ms\"", "interval = \"300ms\"")
        + "batch_max = 2\n";
    let server = Server::start(&cfg).await;
    let mut lou = server.user("lou").await;
    for n in 0..7 {
        lou.join(&format!("public:backlog-{n}")).await;
    }
    let events = backend
        .wait_events(Duration::from_secs(8), |e| {
            e.iter().filter(|v| v["event"] == "room_occupied").count() >= 7
        })
        .await;
    let occupied = events
        .iter()
        .filter(|v| v["event"] == "room_occupied")
        .count();
    assert_eq!(occupied, 7, "{events:?}");
    for d in backend.deliveries() {
        let body: Value = serde_json::from_str(&d.body).unwrap();
        assert!(body["events"].as_array().unwrap().len() <= 2, "{}", d.body);
    }
}

/// A receiver that is down blocks nothing: delivery goes on, failures and drops are counted.
#[tokio::test]
async fn a_dead_webhook_receiver_blocks_nothing() {
    let backend = Backend::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = webhooks_toml(&backend, Some(dead)) + "queue_max = 3\n";
    let server = Server::start(&cfg).await;
    let mut ivy = server.user("ivy").await;
    for n in 0..6 {
        let room = format!("public:dead-{n}");
        ivy.join(&room).await;
        ivy.publish(&room, json!({"n": n})).await;
        assert!(ivy.recv_message(&room, WAIT).await.is_some());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.metric_sum("rtgate_webhook_failures_total", "").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no failure counted\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        server
            .metric_sum("rtgate_webhook_events_dropped_total", "")
            .await
            >= 1.0
    );
    ivy.assert_alive().await;
}

/// The occupancy index is written behind joins: while it lags (injected: 3 s late for this
/// room), the instance that holds the member still answers for it instead of 404.
#[tokio::test]
async fn a_member_here_is_answered_for_while_the_index_lags() {
    let server = Server::start_with_env("", &[("RTGATE_FAULT_INJECTION", "1")]).await;
    let room = "public:fault-slow-index";
    let mut kim = server.user("kim").await;
    kim.join(room).await;
    let (status, answer) = api(
        &server,
        "GET",
        &format!("/api/v1/rooms/{room}/presence"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = api(
        &server,
        "POST",
        &format!("/api/v1/rooms/{room}/unsubscribe"),
        Some(json!({"user": "kim"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let notice = kim
        .recv_until(|v| v["type"] == "system" && v["room"] == room, WAIT)
        .await
        .expect("unsubscribed notice");
    assert_eq!(notice["data"]["event"], "unsubscribed");
}

/// The OpenAPI document lists every server API route, and each answers with the documented
/// status and the documented required fields.
#[tokio::test]
async fn openapi_document_matches_the_running_server() {
    let server = Server::start("").await;
    let (status, doc) = api(&server, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/api/v1/broadcast",
        "/api/v1/rooms",
        "/api/v1/rooms/{room}/history",
        "/api/v1/rooms/{room}/presence",
        "/api/v1/rooms/{room}/presence/stats",
        "/api/v1/rooms/{room}/unsubscribe",
        "/api/v1/users/{user}/disconnect",
    ] {
        assert!(paths.contains_key(p), "{p} is documented");
    }
    let room = "public:documented";
    let mut jay = server.user("jay").await;
    jay.join(room).await;
    jay.publish(room, json!({"x": 1})).await;
    let calls: [(&str, &str, Option<Value>); 7] = [
        (
            "post",
            "/api/v1/broadcast",
            Some(json!({"room": room, "data": {}})),
        ),
        ("get", "/api/v1/rooms", None),
        ("get", "/api/v1/rooms/{room}/history", None),
        ("get", "/api/v1/rooms/{room}/presence", None),
        ("get", "/api/v1/rooms/{room}/presence/stats", None),
        (
            "post",
            "/api/v1/rooms/{room}/unsubscribe",
            Some(json!({"user": "jay"})),
        ),
        ("post", "/api/v1/users/{user}/disconnect", None),
    ];
    for (method, template, body) in calls {
        let path = template.replace("{room}", room).replace("{user}", "jay");
        let (status, answer) = api(&server, &method.to_uppercase(), &path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        let schema = &doc["paths"][template][method]["responses"]["200"]["content"]["application/json"]
            ["schema"];
        check_shape(&doc, schema, &answer, template);
    }
    // Errors too: the documented 404 and 401 bodies.
    for (status, path, key) in [
        (404, "/api/v1/users/nobody/disconnect", Some(API_KEY)),
        (401, "/api/v1/users/jay/disconnect", None),
    ] {
        let (got, answer) = api_with_key(&server, "POST", path, None, key).await;
        assert_eq!(got, status, "{path}: {answer}");
        let schema = &doc["paths"]["/api/v1/users/{user}/disconnect"]["post"]["responses"]
            [status.to_string()]["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{status} is documented");
        check_shape(&doc, schema, &answer, path);
    }
}

/// Checks `value` against an OpenAPI schema: types, required properties, nested objects and
/// arrays (the subset the generator emits).
fn check_shape(doc: &Value, schema: &Value, value: &Value, at: &str) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return check_shape(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(any) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        assert!(
            any.iter()
                .any(|s| std::panic::catch_unwind(|| check_shape(doc, s, value, at)).is_ok()),
            "{at}: {value} matches none of {any:?}"
        );
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return,
    };
    let actual = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    assert!(
        types.contains(&actual) || (actual == "integer" && types.contains(&"number")),
        "{at}: {value} is {actual}, documented {types:?}"
    );
    if let (Value::Object(map), Some(props)) = (value, schema["properties"].as_object()) {
        for req in schema["required"].as_array().into_iter().flatten() {
            let req = req.as_str().unwrap();
            assert!(map.contains_key(req), "{at}: `{req}` missing in {value}");
        }
        for (k, v) in map {
            if let Some(s) = props.get(k) {
                check_shape(doc, s, v, &format!("{at}.{k}"));
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
        for v in items {
            check_shape(doc, item, v, &format!("{at}[]"));
        }
    }
}

/// Two instances over Redis: the API on A sees rooms, presence and users on B; a disconnect
/// issued on A closes the user's connection on B; `room_vacated` is sent once when the last
/// member leaves, whichever instance it was on.
#[tokio::test]
async fn across_two_instances_over_redis() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start_standalone().await;
    let backend = Backend::start().await;
    let cfg = redis.broker_toml("", "") + &webhooks_toml(&backend, None);
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    a.wait_stats(Duration::from_secs(10), |s| s["instances"] == 2)
        .await;
    let room = "public:two-instances";
    let mut on_a = a.user("kim").await;
    let mut on_b = b.user("lee").await;
    on_a.join(room).await;
    on_b.join(room).await;
    on_b.request_ok(json!({"type": "track", "room": room, "data": {"here": true}}))
        .await;
    on_a.publish(room, json!({"n": 1})).await;

    let rooms = wait_rooms(&a, json!([{"room": room, "members": 2}])).await;
    assert_eq!(rooms["rooms"], json!([{"room": room, "members": 2}]));
    let (_, presence) = api(&a, "GET", &format!("/api/v1/rooms/{room}/presence"), None).await;
    assert_eq!(presence["presence"]["lee"][0]["here"], true, "{presence}");
    let (_, history) = api(&b, "GET", &format!("/api/v1/rooms/{room}/history"), None).await;
    assert_eq!(
        history["messages"].as_array().map(Vec::len),
        Some(1),
        "{history}"
    );

    // Disconnect on A closes lee's connection on B.
    let (status, reply) = api(
        &a,
        "POST",
        "/api/v1/users/lee/disconnect",
        Some(json!({"code": 4002})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(on_b.expect_close(WAIT).await, Some(4002));
    let rooms = wait_rooms(&a, json!([{"room": room, "members": 1}])).await;
    assert_eq!(rooms["rooms"], json!([{"room": room, "members": 1}]));
    // The last member leaves on A: vacated, once, though two instances held the room.
    on_a.leave(room).await;
    backend
        .wait_events(Duration::from_secs(5), |e| {
            !events_named(e, "room_vacated", room).is_empty()
        })
        .await;
    // Time for a second, wrong, one to arrive (three webhook intervals).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let events = backend.events();
    assert_eq!(
        events_named(&events, "room_occupied", room).len(),
        1,
        "{events:?}"
    );
    assert_eq!(
        events_named(&events, "room_vacated", room).len(),
        1,
        "{events:?}"
    );
    let leaves = events_named(&events, "presence_leave", room);
    assert_eq!(
        leaves.len(),
        1,
        "lee's presence left with the disconnect: {events:?}"
    );
    let (status, e) = api(&b, "GET", &format!("/api/v1/rooms/{room}/presence"), None).await;
    assert_eq!((status, error_code(&e)), (404, "not_found"), "{e}");
}

/// An instance dies (SIGKILL) with a tracked member: the instance that reaps it announces that
/// member's `presence_leave`, then `room_vacated`, once each. Before: only `room_vacated`, so
/// a backend following presence kept the dead instance's users present for good.
#[tokio::test]
async fn a_dead_instances_presence_leaves_are_announced() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start_standalone().await;
    let backend = Backend::start().await;
    let cfg = redis.broker_toml("", "")
        + &webhooks_toml(&backend, None)
        + "[heartbeat]\ninterval = \"500ms\"\nttl = \"2s\"\n";
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    let room = "public:dies-with-a";
    let mut mia = a.user("mia").await;
    mia.join(room).await;
    mia.request_ok(json!({"type": "track", "room": room, "data": {}}))
        .await;
    let events = backend
        .wait_events(Duration::from_secs(5), |e| {
            !events_named(e, "presence_join", room).is_empty()
        })
        .await;
    let join = events_named(&events, "presence_join", room)[0].clone();
    // SIGKILL, with mia still there (she notices afterwards).
    drop(a);
    drop(mia);
    backend
        .wait_events(Duration::from_secs(10), |e| {
            !events_named(e, "room_vacated", room).is_empty()
        })
        .await;
    // Time for a second, wrong, one to arrive.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let events = backend.events();
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["room"] == room)
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    // The first two come from two writers (presence, occupancy) in either order.
    assert_eq!(
        names[2..],
        ["presence_leave", "room_vacated"],
        "{events:?}\n{}",
        b.logs()
    );
    assert_eq!(names.len(), 4, "{events:?}");
    let leave = events_named(&events, "presence_leave", room)[0];
    assert_eq!(leave["user_id"], "mia");
    assert_eq!(leave["session_id"], join["session_id"]);
    assert_ne!(
        leave["instance_id"], join["instance_id"],
        "announced by the instance that reaped the dead one"
    );
    drop(b);
}

/// `GET /api/v1/rooms` until its rooms are `want` (bounded), then its last answer.
async fn wait_rooms(server: &Server, want: Value) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, rooms) = api(server, "GET", "/api/v1/rooms", None).await;
        assert_eq!(status, 200, "{rooms}");
        if rooms["rooms"] == want || std::time::Instant::now() > deadline {
            return rooms;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
