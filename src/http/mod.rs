//! HTTP surface: WebSocket upgrade, REST, health and metrics.

pub mod admission;
pub mod api;
mod server;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::auth::AuthError;
use crate::gateway::{Gateway, session};
use crate::protocol::close;
use crate::telemetry::metric;
use admission::{Admission, Refused};

/// Bytes the server reads per socket read; small, so idle connections stay small.
const WS_READ_BUFFER: usize = 256;
/// Frames are written once this much is buffered, or when the send queue is drained.
const WS_WRITE_BUFFER: usize = 16 * 1024;

pub use server::serve;

/// The public listener's routes. `/metrics` and `/api/v1/stats` are here too unless
/// `server.admin_listen` moves them to [`admin_router`].
pub fn router(gw: Arc<Gateway>) -> Router {
    let mut router = Router::new()
        .route(
            "/api/v1/ws",
            get(websocket).layer(Extension(Arc::new(Admission::new(&gw.config.server)))),
        )
        .merge(api::routes())
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if gw.config.server.admin_listen.is_none() {
        router = router
            .route("/api/v1/stats", get(stats))
            .route("/metrics", get(metrics));
    }
    if gw.config.server.demo == Some(true) {
        router = router
            .route("/", get(demo::page))
            .route("/demo/rtgate.js", get(demo::sdk))
            .route("/api/v1/demo/token", get(demo::token))
            .route("/api/v1/demo/rooms/{room}/history", get(demo::history));
    }
    router.with_state(gw)
}

/// The admin listener's routes (`server.admin_listen`): operators only.
pub fn admin_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/api/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(gw)
}

/// The demo page (`server.demo`): a chat built on the JavaScript SDK, bundled into the binary.
mod demo {
    use super::*;

    const PAGE: &str = include_str!("../demo/index.html");
    /// `sdk/js` built by `npm run build`; committed so that the binary builds without Node.
    const SDK: &str = include_str!("../../sdk/js/dist/rtgate.browser.js");

    pub async fn page() -> Response {
        axum::response::Html(PAGE).into_response()
    }

    pub async fn sdk() -> Response {
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            SDK,
        )
            .into_response()
    }

    /// The server API's history of a `public:` room, without the API key (the demo page has
    /// none; development only, like the token endpoint).
    pub async fn history(
        State(gw): State<Arc<Gateway>>,
        axum::extract::Path(room): axum::extract::Path<String>,
        Query(query): Query<api::HistoryQuery>,
    ) -> Response {
        if !room.starts_with("public:") {
            return api_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the demo reads public: rooms only",
            );
        }
        match api::history_page(&gw, &room, query).await {
            Ok(page) => page.into_response(),
            Err(failure) => failure.into_response(),
        }
    }

    /// A one-hour token for `?user=NAME` (1 to 32 of `[A-Za-z0-9_-]`), never an admin.
    pub async fn token(
        State(gw): State<Arc<Gateway>>,
        Query(query): Query<HashMap<String, String>>,
    ) -> Response {
        let user = query.get("user").map(String::as_str).unwrap_or_default();
        let valid = (1..=32).contains(&user.len())
            && user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "`user` is 1 to 32 of [A-Za-z0-9_-]",
            );
        }
        let token = gw
            .auth
            .issue(user, false, std::time::Duration::from_secs(3600));
        Json(json!({ "token": token })).into_response()
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn websocket(
    State(gw): State<Arc<Gateway>>,
    Extension(admission): Extension<Arc<Admission>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if gw.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    // Cheap refusals first, before any token is parsed or state created.
    let client = admission.client_ip(peer, &headers);
    if let Err(refused) = admission.check(client, &headers) {
        metric::connection_refused(refused.as_str());
        tracing::debug!(%client, reason = refused.as_str(), "upgrade refused");
        return match refused {
            Refused::ConnectRate => api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many connections from this address, retry later",
            ),
            Refused::Origin => api_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this origin may not connect (server.allowed_origins)",
            ),
        };
    }
    let max_frame = gw.config.ws.max_frame_bytes;
    // Frames up to 4x the limit are read and answered with `too_large`; beyond, the
    // connection closes with 1009 without buffering them.
    let upgrade = upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(max_frame.saturating_mul(4))
        .max_frame_size(max_frame.saturating_mul(4));
    let token = query
        .get("token")
        .map(String::as_str)
        .or_else(|| bearer(&headers));
    match gw.auth.verify(token).await {
        Ok(identity) => upgrade.on_upgrade(move |socket| session::run(gw, socket, identity)),
        Err(e) => {
            let reason = match e {
                AuthError::Missing => "missing token".to_string(),
                AuthError::Expired => "token expired".to_string(),
                AuthError::Invalid(_) => "invalid token".to_string(),
            };
            metric::connection_refused("auth");
            tracing::debug!(error = %e, "websocket authentication failed");
            upgrade.on_upgrade(move |socket| session::reject(socket, close::POLICY, reason))
        }
    }
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

async fn stats(State(gw): State<Arc<Gateway>>) -> Response {
    let (live, detail) = match gw.registry.instances().await {
        Ok(list) => {
            let ids: Vec<String> = list.iter().map(|i| i.id.clone()).collect();
            (ids, serde_json::to_value(&list).unwrap_or_default())
        }
        Err(e) => {
            tracing::warn!(error = %e, "instance list unavailable");
            (Vec::new(), json!([]))
        }
    };
    Json(json!({
        "instance_id": &**gw.instance_id(),
        "instances": live.len(),
        "live_instances": live,
        "instances_detail": detail,
        "connections": gw.hub.connections(),
        "rooms": gw.hub.room_count(),
        "broker": gw.broker.kind(),
        "ready": gw.is_ready(),
        "version": crate::VERSION,
    }))
    .into_response()
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !gw.broker.is_ready() || !gw.registry.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable").into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
        .into_response()
}
