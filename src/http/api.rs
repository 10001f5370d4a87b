//! The server API (`/api/v1`, PROTOCOL.md v1.1): publish, history, presence, disconnect,
//! unsubscribe and the rooms listing, for the app's backend. Every call needs a server API key
//! (`Authorization: Bearer`); errors are `{"error": {"code", "message"}}` with the WebSocket
//! protocol's codes. Calls that reach other instances go through the broker (a user's
//! connections get commands on the user's direct channel), never instance to instance.
//! The OpenAPI 3.1 document at `/api/v1/openapi.json` is generated from these handlers.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::bearer;
use crate::broker::{Control, MessageId, MessageKind, Occupant, RoomMessage, RoomName};
use crate::gateway::{Gateway, presence_map, room_event_frame, unavailable_message};
use crate::protocol::{is_object, json_too_deep, now_ms, valid_room};
use crate::telemetry::metric;

const MAX_REASON_BYTES: usize = Control::MAX_REASON_BYTES;

pub fn routes() -> Router<Arc<Gateway>> {
    use axum::routing::{get, post};
    Router::new()
        .route("/api/v1/broadcast", post(broadcast))
        .route("/api/v1/rooms", get(rooms))
        .route("/api/v1/rooms/{room}/history", get(history))
        .route("/api/v1/rooms/{room}/presence", get(presence))
        .route("/api/v1/rooms/{room}/presence/stats", get(presence_stats))
        .route("/api/v1/rooms/{room}/unsubscribe", post(unsubscribe))
        .route("/api/v1/users/{user}/disconnect", post(disconnect))
        .route("/api/v1/openapi.json", get(openapi))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rtgate server API",
        description = "Publish, history, presence, disconnect, unsubscribe and rooms, for the app's backend. Every call needs a server API key (`Authorization: Bearer <key>`)."
    ),
    paths(broadcast, history, presence, presence_stats, disconnect, unsubscribe, rooms),
    components(schemas(ApiError, ErrorDetail)),
    modifiers(&ApiKeyScheme),
    security(("api_key" = []))
)]
pub struct ApiDoc;

struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

/// `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ApiError {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The WebSocket protocol's error codes, plus `unauthorized` and `not_found`.
    code: String,
    message: String,
}

/// An error answer: its status and body.
pub struct Failure(StatusCode, &'static str, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let Failure(status, code, message) = self;
        let body = ApiError {
            error: ErrorDetail {
                code: code.to_string(),
                message,
            },
        };
        (status, Json(body)).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, "bad_request", message.into())
}

fn not_found(message: impl Into<String>) -> Failure {
    Failure(StatusCode::NOT_FOUND, "not_found", message.into())
}

fn unavailable(e: &crate::broker::BrokerError) -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        unavailable_message(e),
    )
}

type ApiResult<T> = Result<Json<T>, Failure>;

/// Checks the API key; counts the call with its status.
async fn call<T: Serialize>(
    name: &'static str,
    gw: &Gateway,
    headers: &HeaderMap,
    run: impl Future<Output = ApiResult<T>>,
) -> Response {
    let response = match bearer(headers) {
        Some(key) if gw.auth.is_api_key(key) => match run.await {
            Ok(body) => body.into_response(),
            Err(failure) => failure.into_response(),
        },
        _ => Failure(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a server API key is required (Authorization: Bearer <key>)".into(),
        )
        .into_response(),
    };
    metric::api_request(name, response.status().as_u16());
    response
}

fn room_name(room: &str) -> Result<RoomName, Failure> {
    if !valid_room(room) {
        return Err(bad_request(crate::protocol::ROOM_RULE));
    }
    Ok(RoomName::from(room))
}

fn user_id(user: &str) -> Result<Arc<str>, Failure> {
    if user.is_empty() || user.len() > crate::broker::wire::MAX_ID_LEN {
        return Err(bad_request(format!(
            "a user id is 1 to {} bytes",
            crate::broker::wire::MAX_ID_LEN
        )));
    }
    Ok(Arc::from(user))
}

/// How many members or connections `who` has over every instance. The index is written
/// behind joins and connects, so this instance's own count is a floor: a room joined here a
/// moment ago is never answered as empty by this instance.
async fn count_everywhere(gw: &Gateway, who: Occupant) -> Result<u64, Failure> {
    let indexed = gw.registry.count(&who).await.map_err(|e| unavailable(&e))?;
    Ok(indexed.max(gw.hub.local_count(&who) as u64))
}

/// The room's members over every instance, or 404.
async fn occupied(gw: &Gateway, room: &RoomName) -> Result<u64, Failure> {
    let members = count_everywhere(gw, Occupant::Room(room.clone())).await?;
    if members == 0 {
        return Err(not_found(format!(
            "room `{room}` has no members on any instance"
        )));
    }
    Ok(members)
}

/// The user's connections over every instance, or 404.
async fn connected(gw: &Gateway, user: &Arc<str>) -> Result<u64, Failure> {
    let connections = count_everywhere(gw, Occupant::User(user.clone())).await?;
    if connections == 0 {
        return Err(not_found(format!(
            "user `{user}` is not connected to any instance"
        )));
    }
    Ok(connections)
}

// ---------------------------------------------------------------------------------------------
// Broadcast
// ---------------------------------------------------------------------------------------------

/// One of `room` and `rooms`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    room: Option<String>,
    /// Many rooms in one call (at most `api.max_broadcast_rooms`); one id per room.
    rooms: Option<Vec<String>>,
    /// `system` (default) or `message`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    kind: Option<String>,
    #[schema(value_type = Object)]
    data: Box<RawValue>,
    /// 1-64 bytes of `[A-Za-z0-9_.:-]`: a repeat within `broker.idempotency_window` answers
    /// the first id and publishes nothing (per room).
    idempotency_key: Option<String>,
}

/// `id` for `room`; `ids` (room to id) for `rooms`.
#[derive(Serialize, ToSchema)]
pub struct BroadcastAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<HashMap<String, String>>,
}

#[utoipa::path(
    post,
    path = "/api/v1/broadcast",
    request_body = BroadcastRequest,
    responses(
        (status = 200, description = "Published (stored, then fanned out)", body = BroadcastAnswer),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 413, body = ApiError), (status = 503, body = ApiError)
    )
)]
async fn broadcast(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let run = async {
        // Read only once the caller is known, and no more than a WebSocket frame may carry.
        let max = gw.config.ws.max_frame_bytes;
        let Ok(body) = axum::body::to_bytes(body, max).await else {
            metric::limit_exceeded("body_bytes");
            return Err(Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is over the {max}-byte limit (ws.max_frame_bytes)"),
            ));
        };
        let req: BroadcastRequest =
            serde_json::from_slice(&body).map_err(|e| bad_request(e.to_string()))?;
        let rooms: Vec<RoomName> = match (&req.room, &req.rooms) {
            (Some(room), None) => vec![room_name(room)?],
            (None, Some(rooms)) => {
                let most = gw.config.api.max_broadcast_rooms;
                if rooms.is_empty() || rooms.len() > most {
                    return Err(bad_request(format!(
                        "`rooms` holds 1 to {most} rooms (api.max_broadcast_rooms)"
                    )));
                }
                let mut names = Vec::with_capacity(rooms.len());
                for room in rooms {
                    let name = room_name(room)?;
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
                names
            }
            _ => return Err(bad_request("one of `room` and `rooms` is required")),
        };
        let kind = match req.kind.as_deref().unwrap_or("system") {
            "system" => MessageKind::System,
            "message" => MessageKind::Message,
            _ => return Err(bad_request("`type` is \"system\" or \"message\"")),
        };
        if !is_object(&req.data) {
            return Err(bad_request("`data` must be an object"));
        }
        let depth = gw.config.ws.max_json_depth;
        if json_too_deep(req.data.get(), depth) {
            metric::limit_exceeded("json_depth");
            return Err(bad_request(format!(
                "`data` nests deeper than {depth} levels (ws.max_json_depth)"
            )));
        }
        if let Some(key) = &req.idempotency_key
            && !crate::broker::idempotency::valid_key(key)
        {
            return Err(bad_request(crate::broker::idempotency::KEY_RULE));
        }
        // Runs to its end even if the caller hangs up (the HTTP server then drops this
        // handler): cut off midway, a publish could leave its idempotency key claimed for the
        // whole window.
        let broker = gw.broker.clone();
        let single = req.room.is_some();
        let published = tokio::spawn(async move {
            let mut ids = HashMap::new();
            for room in &rooms {
                let msg = RoomMessage {
                    room: room.clone(),
                    kind,
                    data: req.data.clone(),
                    sender_id: None,
                    ts_ms: now_ms(),
                    origin: None,
                    traceparent: None,
                    idempotency_key: req.idempotency_key.as_deref().map(Box::from),
                };
                // A room that fails stops the call: with an idempotency_key, a retry of the
                // whole call publishes each room once.
                let id = broker.publish(msg).await.map_err(|e| unavailable(&e))?;
                ids.insert(room.to_string(), id.to_string());
            }
            Ok::<_, Failure>(ids)
        });
        let ids = published.await.map_err(|e| {
            Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the publish ended with its outcome unknown: {e}"),
            )
        })??;
        Ok(Json(if single {
            BroadcastAnswer {
                id: ids.into_values().next(),
                ids: None,
            }
        } else {
            BroadcastAnswer {
                id: None,
                ids: Some(ids),
            }
        }))
    };
    call("broadcast", &gw, &headers, run).await
}

// ---------------------------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// A message id: the messages after it, as `join` with `since` replays them (`0-0`: from
    /// the start). Without it, the newest `limit` messages.
    since: Option<String>,
    /// At most this many (default 100, at most `api.max_page`).
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct HistoryAnswer {
    room: String,
    /// Oldest first, each exactly as WebSocket clients get it (`type`, `room`, `data`, `ts`,
    /// `sender_id`, `id`).
    #[schema(value_type = Vec<Object>)]
    messages: Vec<Box<RawValue>>,
    /// More messages follow the last one (ask again with its id as `since`).
    more: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/rooms/{room}/history",
    params(("room" = String, Path, description = "Room name"), HistoryQuery),
    responses(
        (status = 200, body = HistoryAnswer),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 404, description = "No retained history and no member anywhere", body = ApiError),
        (status = 410, description = "`history_gap`: messages after `since` are no longer all retained", body = ApiError),
        (status = 503, body = ApiError)
    )
)]
async fn history(
    State(gw): State<Arc<Gateway>>,
    Path(room): Path<String>,
    Query(query): Query<HistoryQuery>,
    headers: HeaderMap,
) -> Response {
    call("history", &gw, &headers, history_page(&gw, &room, query)).await
}

/// The history call without the key check (also behind the demo page's own route).
pub(super) async fn history_page(
    gw: &Gateway,
    room: &str,
    query: HistoryQuery,
) -> ApiResult<HistoryAnswer> {
    {
        let room = room_name(room)?;
        let page = gw.config.api.max_page;
        let limit = query.limit.unwrap_or(100);
        if limit == 0 || limit > page {
            return Err(bad_request(format!(
                "`limit` is 1 to {page} (api.max_page)"
            )));
        }
        let since = match query.since.as_deref() {
            None => None,
            Some(s) => Some(
                s.parse::<MessageId>()
                    .map_err(|_| bad_request("`since` is not a message id"))?,
            ),
        };
        let (events, more) = match since {
            Some(since) => {
                // The join contract: all retained and within broker.replay_limit, or a gap.
                let replay_limit = gw.config.broker.replay_limit;
                let found = gw
                    .broker
                    .history_after(&room, since, replay_limit.saturating_add(1))
                    .await
                    .map_err(|e| unavailable(&e))?;
                if found.gap || found.events.len() > replay_limit {
                    return Err(Failure(
                        StatusCode::GONE,
                        "history_gap",
                        if found.gap {
                            "messages after `since` are no longer retained".into()
                        } else {
                            "more messages after `since` than broker.replay_limit".into()
                        },
                    ));
                }
                let more = found.events.len() > limit;
                let mut events = found.events;
                events.truncate(limit);
                (events, more)
            }
            None => {
                let found = gw
                    .broker
                    .history_after(&room, MessageId::ZERO, limit)
                    .await
                    .map_err(|e| unavailable(&e))?;
                if found.events.is_empty() {
                    occupied(gw, &room).await?;
                }
                (found.events, false)
            }
        };
        let messages = events
            .iter()
            .map(|e| {
                RawValue::from_string(room_event_frame(e).to_string()).expect("a frame is JSON")
            })
            .collect();
        Ok(Json(HistoryAnswer {
            room: room.to_string(),
            messages,
            more,
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

/// The room's presence on every instance; 404 when nobody is there and it has no member.
async fn presence_of(
    gw: &Gateway,
    room: &str,
) -> Result<(RoomName, Vec<crate::broker::PresenceEntry>), Failure> {
    let room = room_name(room)?;
    let entries = gw
        .registry
        .presence(&room)
        .await
        .map_err(|e| unavailable(&e))?;
    if entries.is_empty() {
        occupied(gw, &room).await?;
    }
    Ok((room, entries))
}

#[derive(Serialize, ToSchema)]
pub struct PresenceAnswer {
    room: String,
    /// User id to the meta of each of that user's tracked connections (as `presence_state`).
    #[schema(value_type = HashMap<String, Vec<Object>>)]
    presence: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct PresenceStats {
    room: String,
    /// Tracked connections.
    connections: u64,
    /// Distinct users among them.
    users: u64,
}

#[utoipa::path(
    get,
    path = "/api/v1/rooms/{room}/presence",
    params(("room" = String, Path, description = "Room name")),
    responses(
        (status = 200, body = PresenceAnswer),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 404, description = "No member on any instance", body = ApiError),
        (status = 503, body = ApiError)
    )
)]
async fn presence(
    State(gw): State<Arc<Gateway>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let (room, entries) = presence_of(&gw, &room).await?;
        Ok(Json(PresenceAnswer {
            room: room.to_string(),
            presence: presence_map(&entries),
        }))
    };
    call("presence", &gw, &headers, run).await
}

#[utoipa::path(
    get,
    path = "/api/v1/rooms/{room}/presence/stats",
    params(("room" = String, Path, description = "Room name")),
    responses(
        (status = 200, body = PresenceStats),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 404, description = "No member on any instance", body = ApiError),
        (status = 503, body = ApiError)
    )
)]
async fn presence_stats(
    State(gw): State<Arc<Gateway>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let (room, entries) = presence_of(&gw, &room).await?;
        let users: std::collections::HashSet<&str> = entries.iter().map(|e| &*e.user_id).collect();
        Ok(Json(PresenceStats {
            room: room.to_string(),
            connections: entries.len() as u64,
            users: users.len() as u64,
        }))
    };
    call("presence_stats", &gw, &headers, run).await
}

// ---------------------------------------------------------------------------------------------
// Disconnect and unsubscribe
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisconnectRequest {
    /// WebSocket close code: 1000, 1001, 1008 (default), 1011, 1013 or 3000-4999.
    code: Option<u16>,
    /// Close reason, at most 123 bytes.
    reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DisconnectAnswer {
    user: String,
    /// Connections the user had over every instance when the command went out.
    connections: u64,
}

#[utoipa::path(
    post,
    path = "/api/v1/users/{user}/disconnect",
    params(("user" = String, Path, description = "User id (the token's `sub`)")),
    request_body(content = DisconnectRequest, description = "Optional"),
    responses(
        (status = 200, body = DisconnectAnswer),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 404, description = "Not connected to any instance", body = ApiError),
        (status = 503, body = ApiError)
    )
)]
async fn disconnect(
    State(gw): State<Arc<Gateway>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let run = async {
        let user = user_id(&user)?;
        let req: DisconnectRequest = if body.iter().all(u8::is_ascii_whitespace) {
            DisconnectRequest::default()
        } else {
            serde_json::from_slice(&body).map_err(|e| bad_request(e.to_string()))?
        };
        let code = req.code.unwrap_or(crate::protocol::close::POLICY);
        if !Control::valid_code(code) {
            return Err(bad_request(
                "`code` is 1000, 1001, 1008, 1011, 1013 or 3000-4999",
            ));
        }
        let reason = req
            .reason
            .unwrap_or_else(|| "disconnected by the server".into());
        if reason.len() > MAX_REASON_BYTES {
            return Err(bad_request(format!(
                "`reason` is at most {MAX_REASON_BYTES} bytes"
            )));
        }
        let connections = connected(&gw, &user).await?;
        gw.control(&user, &Control::Disconnect { code, reason })
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Json(DisconnectAnswer {
            user: user.to_string(),
            connections,
        }))
    };
    call("disconnect", &gw, &headers, run).await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeRequest {
    user: String,
}

#[derive(Serialize, ToSchema)]
pub struct UnsubscribeAnswer {
    room: String,
    user: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/rooms/{room}/unsubscribe",
    params(("room" = String, Path, description = "Room name")),
    request_body = UnsubscribeRequest,
    responses(
        (status = 200, description = "The user's connections leave the room and get a `system` notice `{\"event\": \"unsubscribed\"}`", body = UnsubscribeAnswer),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 404, description = "No member of the room, or the user is not connected", body = ApiError),
        (status = 503, body = ApiError)
    )
)]
async fn unsubscribe(
    State(gw): State<Arc<Gateway>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let run = async {
        let room = room_name(&room)?;
        let req: UnsubscribeRequest =
            serde_json::from_slice(&body).map_err(|e| bad_request(e.to_string()))?;
        let user = user_id(&req.user)?;
        occupied(&gw, &room).await?;
        connected(&gw, &user).await?;
        gw.control(
            &user,
            &Control::Unsubscribe {
                room: room.to_string(),
            },
        )
        .await
        .map_err(|e| unavailable(&e))?;
        Ok(Json(UnsubscribeAnswer {
            room: room.to_string(),
            user: user.to_string(),
        }))
    };
    call("unsubscribe", &gw, &headers, run).await
}

// ---------------------------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RoomsQuery {
    /// The `next` of the previous page: rooms after this name.
    after: Option<String>,
    /// Rooms per page (default 100, at most `api.max_page`).
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct RoomMembers {
    room: String,
    /// Members over every instance.
    members: u64,
}

#[derive(Serialize, ToSchema)]
pub struct RoomsAnswer {
    /// By name.
    rooms: Vec<RoomMembers>,
    /// Pass as `after` for the next page; null on the last.
    next: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/rooms",
    params(RoomsQuery),
    responses(
        (status = 200, description = "Rooms with members on any instance", body = RoomsAnswer),
        (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 503, body = ApiError)
    )
)]
async fn rooms(
    State(gw): State<Arc<Gateway>>,
    Query(query): Query<RoomsQuery>,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let page = gw.config.api.max_page;
        let limit = query.limit.unwrap_or(100);
        if limit == 0 || limit > page {
            return Err(bad_request(format!(
                "`limit` is 1 to {page} (api.max_page)"
            )));
        }
        let after = query.after.unwrap_or_default();
        let mut found = gw
            .registry
            .rooms(&after, limit + 1)
            .await
            .map_err(|e| unavailable(&e))?;
        let next = (found.len() > limit).then(|| {
            found.truncate(limit);
            found.last().map(|(r, _)| r.to_string())
        });
        Ok(Json(RoomsAnswer {
            rooms: found
                .into_iter()
                .map(|(room, members)| RoomMembers {
                    room: room.to_string(),
                    members,
                })
                .collect(),
            next: next.flatten(),
        }))
    };
    call("rooms", &gw, &headers, run).await
}
