//! One WebSocket connection: a reader that handles requests in order, and a writer task that
//! drains the connection's send queue.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{self, Message, Utf8Bytes, WebSocket};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, SplitSink};
use futures_util::{FutureExt, SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Gateway, Session, presence_map, presence_meta, unavailable_message};
use crate::auth::Identity;
use crate::auth::rooms::{Denied, Verdict};
use crate::broker::{
    DirectKind, DirectMessage, MessageId, MessageKind, Origin, RoomMessage, RoomName, Tracked,
};
use crate::protocol::{
    ClientFrame, ErrorCode, RequestKind, ServerFrame, ack_frame, close, error_frame, is_object,
    json_too_deep, now_ms, valid_room,
};
use crate::telemetry::{metric, trace};
use tracing::Instrument;

/// How long the reader waits for the client's close reply after the server closed.
const CLOSE_HANDSHAKE_WAIT: Duration = Duration::from_secs(2);
/// Publishes of one connection that may wait for the broker at once. They are sent to the
/// broker in request order and answered in request order; a broker with a millisecond of
/// latency still takes thousands of messages per second from one client.
const MAX_PIPELINED: usize = 64;

/// A publish on its way: its `ref`, its room, and the reply data or refusal.
type PendingPublish = BoxFuture<
    'static,
    (
        Option<Box<RawValue>>,
        Option<String>,
        Result<String, Refusal>,
    ),
>;

/// Accepts the socket only to close it: a failed authentication creates no state.
pub async fn reject(mut socket: WebSocket, code: u16, reason: String) {
    let frame = ws::CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
    // Give the client a moment to answer the close handshake.
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_WAIT, async {
        while let Some(Ok(msg)) = socket.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Runs a connection until it ends.
pub async fn run(gw: Arc<Gateway>, socket: WebSocket, identity: Identity) {
    let (session, user_subscribed) = match gw.open_session(identity) {
        Ok(opened) => opened,
        Err(limit) => {
            metric::connection_refused(limit.as_str());
            tracing::debug!(limit = limit.as_str(), "connection refused");
            // Boxed: inline, this rare path would grow every connection's task.
            let reason = limit.reason().to_string();
            return Box::pin(reject(socket, close::TRY_AGAIN_LATER, reason)).await;
        }
    };
    // Welcomed once direct messages reach this connection, so that one sent to the user as
    // soon as the client hears it is connected is delivered. Still the first frame: whatever
    // was queued meanwhile follows it, and the writer starts only then.
    if let Some(subscribed) = user_subscribed
        && let Err(e) = subscribed.await
    {
        tracing::warn!(error = %e, "direct-message subscription failed");
    }
    let welcome = serde_json::json!({
        "user_id": &*session.identity.user_id,
        "instance_id": &**gw.instance_id(),
        "session_id": &*session.public_id,
    });
    session
        .queue
        .push_reply_first(ServerFrame::new("welcome", None, &welcome).to_json().into());
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_loop(sink, session.clone(), gw.hub.clone()));

    let mut conn = Connection::new(gw.clone(), session.clone());
    conn.read_loop(stream).await;
    // Publishes the client sent run to their end, in order, though nobody hears the answers:
    // cut off midway, a publish could leave its idempotency key claimed for the whole window
    // (the client's retry with that key refused meanwhile) or a stored message unannounced.
    if let Some(mut publishes) = conn.publishes.take() {
        tokio::spawn(async move { while publishes.next().await.is_some() {} });
    }
    gw.close_session(&session, &conn.rooms).await;
    // The writer ends after the close frame, or stays stuck on a client that stopped reading.
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_HANDSHAKE_WAIT, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    session: Arc<Session>,
    hub: Arc<super::Hub>,
) {
    let mut batch = super::queue::Batch::default();
    while session.queue.next_batch(&mut batch).await.is_some() {
        if !batch.presence_lost.is_empty() {
            hub.presence_lost(&session, std::mem::take(&mut batch.presence_lost));
        }
        for frame in batch.frames.drain(..) {
            if sink.feed(Message::Text(frame)).await.is_err() {
                return;
            }
        }
        if std::mem::take(&mut batch.ping)
            && sink.feed(Message::Ping(Default::default())).await.is_err()
        {
            return;
        }
        if let Some(c) = batch.close.take() {
            let frame = ws::CloseFrame {
                code: c.code,
                reason: c.reason,
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
            return;
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// Just the `ref` of a frame (what a refused request needs for its error).
#[derive(Deserialize)]
struct RefOnly<'a> {
    #[serde(rename = "ref", borrow, default)]
    reference: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct DirectTarget<'a> {
    #[serde(borrow)]
    to: Option<&'a str>,
}

/// Reader-side state of a connection.
struct Connection {
    gw: Arc<Gateway>,
    session: Arc<Session>,
    /// Rooms joined, for cleanup.
    rooms: Vec<RoomName>,
    limiter: DefaultDirectRateLimiter,
    /// Bad frames so far (binary, non-JSON, oversized).
    violations: u32,
    /// Requests refused by the rate limit since the last accepted one.
    refused_in_a_row: u32,
    /// Publishes waiting for the broker; allocated on the first publish.
    publishes: Option<FuturesOrdered<PendingPublish>>,
    /// Presence meta defaults the app's backend gave at join, per hook room.
    meta_defaults: Option<std::collections::HashMap<RoomName, Arc<RawValue>>>,
}

/// A request failed: the error frame to send.
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

type Reply = Result<Option<String>, Refusal>;

impl Connection {
    fn new(gw: Arc<Gateway>, session: Arc<Session>) -> Self {
        let ws = &gw.config.ws;
        let quota =
            Quota::per_second(NonZeroU32::new(ws.rate_limit_per_sec).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(ws.rate_limit_burst).unwrap_or(NonZeroU32::MIN));
        Self {
            gw,
            session,
            rooms: Vec::new(),
            limiter: RateLimiter::direct(quota),
            violations: 0,
            refused_in_a_row: 0,
            publishes: None,
            meta_defaults: None,
        }
    }

    async fn read_loop(&mut self, mut stream: futures_util::stream::SplitStream<WebSocket>) {
        loop {
            let may_read = self
                .publishes
                .as_ref()
                .is_none_or(|p| p.len() < MAX_PIPELINED);
            let session = &self.session;
            let next = tokio::select! {
                done = next_published(&mut self.publishes) => {
                    self.answer_publish(done);
                    continue;
                }
                next = async {
                    session.queue.wait_for_room().await;
                    stream.next().await
                }, if may_read => next,
                _ = session.closing.notified() => {
                    // Kicked out of rooms by the server API, or closing (or both).
                    for room in session.take_kicked() {
                        // Boxed: a rare path, kept out of every idle connection's task.
                        Box::pin(self.kicked_from(&room)).await;
                    }
                    if self.session.queue.is_closing() {
                        break;
                    }
                    continue;
                }
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    if is_capacity_error(&e) {
                        metric::bad_frame("too_large");
                        self.session.close(close::TOO_BIG, "frame too large");
                        break;
                    }
                    tracing::debug!(error = %e, "websocket read failed");
                    return;
                }
                None => return,
            };
            self.gw.touch(&self.session);
            match msg {
                // Boxed: the handler futures are large and live only while a request runs,
                // so an idle connection's task stays small.
                Message::Text(text) => {
                    metric::bytes_in(text.len());
                    if trace::enabled() {
                        let span = trace::receive_span(&self.session.public_id);
                        Box::pin(self.on_text(&text).instrument(span)).await
                    } else {
                        Box::pin(self.on_text(&text)).await
                    }
                }
                Message::Binary(_) => {
                    self.violation(ErrorCode::BadRequest, "binary frames are not supported")
                }
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Close(_) => {
                    // tungstenite queued the close reply (RFC 6455 5.5.1); it goes out on the
                    // next read, which then reports the end of the stream.
                    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_WAIT, stream.next()).await;
                    return;
                }
            }
            if self.session.queue.is_closing() {
                break;
            }
        }
        // The server is closing: wait briefly for the client's close reply.
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_WAIT, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// A bad frame: reply with an error, and close once the client has sent too many.
    fn violation(&mut self, code: ErrorCode, message: &str) {
        metric::bad_frame(code.as_str());
        self.send(error_frame(code, message, None, None));
        self.violations += 1;
        if self.violations >= self.gw.config.ws.max_violations {
            let (close_code, reason) = if code == ErrorCode::TooLarge {
                (close::TOO_BIG, "too many oversized frames")
            } else {
                (close::POLICY, "too many malformed frames")
            };
            self.session.close(close_code, reason);
        }
    }

    /// Queues a reply to this connection's request (never dropped by the overflow policy).
    fn send(&self, frame: String) {
        self.session.queue.push_reply(Utf8Bytes::from(frame));
    }

    async fn on_text(&mut self, text: &str) {
        if self.limiter.check().is_err() {
            metric::rate_limited();
            self.refused_in_a_row += 1;
            if self.refused_in_a_row > self.gw.config.ws.rate_limit_burst {
                self.session.close(close::POLICY, "rate limit exceeded");
                return;
            }
            // Nothing is parsed for a refused frame but its `ref`, and only within the size
            // limit, so a flood costs little.
            let reference = (text.len() <= self.gw.config.ws.max_frame_bytes)
                .then(|| serde_json::from_str::<RefOnly>(text).ok())
                .flatten()
                .and_then(|f| f.reference);
            self.send(error_frame(
                ErrorCode::RateLimited,
                "too many requests, slow down",
                None,
                reference,
            ));
            return;
        }
        self.refused_in_a_row = 0;

        let max = self.gw.config.ws.max_frame_bytes;
        if text.len() > max {
            self.violation(
                ErrorCode::TooLarge,
                &format!("frame of {} bytes is over the {max}-byte limit", text.len()),
            );
            return;
        }
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) if e.is_data() => {
                // A field of the wrong type: still answer the request's `ref`, if it has one.
                let reference = serde_json::from_str::<RefOnly>(text)
                    .ok()
                    .and_then(|r| r.reference);
                self.send(error_frame(
                    ErrorCode::BadRequest,
                    &format!("bad envelope: {e}"),
                    None,
                    reference,
                ));
                return;
            }
            Err(e) => {
                self.violation(ErrorCode::BadRequest, &format!("not a JSON object: {e}"));
                return;
            }
        };
        let reference = frame.reference;
        let Some(kind_name) = frame.kind else {
            self.send(error_frame(
                ErrorCode::BadRequest,
                "`type` is required",
                None,
                reference,
            ));
            return;
        };
        let Some(kind) = RequestKind::parse(kind_name) else {
            self.send(error_frame(
                ErrorCode::UnknownType,
                &format!("unknown type `{kind_name}`"),
                frame.room.as_deref(),
                reference,
            ));
            return;
        };
        metric::message_in(kind.as_str());
        if kind == RequestKind::Message {
            self.start_publish(&frame);
            return;
        }
        self.finish_publishes().await;
        let room = frame.room.clone();
        let reply = match kind {
            RequestKind::Ping => {
                self.send(
                    ServerFrame {
                        reference,
                        ..ServerFrame::new("pong", None, &serde_json::json!({}))
                    }
                    .to_json(),
                );
                return;
            }
            RequestKind::Join => self.join(&frame).await,
            RequestKind::Leave => self.leave(&frame).await,
            RequestKind::Message => unreachable!("publishes are pipelined above"),
            RequestKind::Direct => self.direct(&frame).await,
            RequestKind::Track => self.track(&frame).await,
            RequestKind::Untrack => self.untrack(&frame).await,
        };
        match reply {
            Ok(Some(data)) => {
                if reference.is_some() {
                    let data = RawValue::from_string(data).expect("reply data is JSON");
                    self.send(ack_frame(room.as_deref(), &*data, reference));
                }
            }
            Ok(None) => {}
            Err(r) => self.send(error_frame(r.code, &r.message, room.as_deref(), reference)),
        }
    }

    /// The request's room, checked for syntax and access.
    fn room_of(&self, frame: &ClientFrame) -> Result<RoomName, Refusal> {
        let Some(room) = frame.room.as_deref() else {
            return Err(Refusal::new(ErrorCode::RoomRequired, "`room` is required"));
        };
        if !valid_room(room) {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                crate::protocol::ROOM_RULE,
            ));
        }
        match self.gw.access.rule_for(&self.session.identity, room) {
            Ok(Verdict::Allowed) => Ok(RoomName::from(room)),
            // The backend allowed it at `join`: members may use the room.
            Ok(Verdict::Hook(_)) if self.rooms.iter().any(|r| &**r == room) => {
                Ok(RoomName::from(room))
            }
            Ok(Verdict::Hook(_)) => Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("join `{room}` first: its access is decided at join"),
            )),
            Err(denied) => Err(refusal_of(denied)),
        }
    }

    /// [`Connection::room_of`] for `join`: a hook room asks the app's backend (or its cache).
    async fn room_to_join(&mut self, frame: &ClientFrame<'_>) -> Result<RoomName, Refusal> {
        let Some(name) = frame.room.as_deref() else {
            return Err(Refusal::new(ErrorCode::RoomRequired, "`room` is required"));
        };
        if !valid_room(name) {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                crate::protocol::ROOM_RULE,
            ));
        }
        let room = RoomName::from(name);
        let defaults = self
            .gw
            .access
            .check(&self.session.identity, name)
            .await
            .map_err(refusal_of)?;
        match defaults {
            Some(meta) => {
                self.meta_defaults
                    .get_or_insert_with(Default::default)
                    .insert(room.clone(), meta);
            }
            None => {
                if let Some(d) = &mut self.meta_defaults {
                    d.remove(&room);
                }
            }
        }
        Ok(room)
    }

    fn origin(&self) -> Origin {
        Origin {
            instance: self.gw.instance_id().clone(),
            session: self.session.id,
        }
    }

    async fn join(&mut self, frame: &ClientFrame<'_>) -> Reply {
        let room = self.room_to_join(frame).await?;
        let since =
            match frame.since.as_deref() {
                None => None,
                Some(s) => Some(s.parse::<MessageId>().map_err(|_| {
                    Refusal::new(ErrorCode::BadRequest, "`since` is not a message id")
                })?),
            };
        let echo_self = frame.echo_self.unwrap_or(true);
        let gw = &self.gw;
        let max_rooms = gw.config.ws.max_rooms_per_connection;
        if self.rooms.len() >= max_rooms && !self.rooms.contains(&room) {
            metric::limit_exceeded("rooms_per_connection");
            return Err(Refusal::new(
                ErrorCode::LimitExceeded,
                format!("this connection is in {max_rooms} rooms (ws.max_rooms_per_connection)"),
            ));
        }
        let joined = gw.hub.join(
            &*gw.broker,
            &*gw.registry,
            &room,
            &self.session,
            echo_self,
            since.map(|_| gw.config.broker.replay_limit),
        );
        if joined.already_member {
            return Ok(Some("{}".into()));
        }
        if let Err(e) = joined.subscribed.await {
            gw.hub
                .leave(&*gw.broker, &*gw.registry, &room, self.session.id);
            return Err(Refusal::new(
                ErrorCode::Unavailable,
                unavailable_message(&e),
            ));
        }
        self.rooms.push(room.clone());
        metric::joined();

        let mut reply = Ok(Some("{}".to_string()));
        if let Some(since) = since {
            let mut delivered_through = since;
            // One more than the limit: more than `replay_limit` missing is a gap, never a
            // partial replay of the newest.
            let limit = gw.config.broker.replay_limit;
            match gw
                .broker
                .history_after(&room, since, limit.saturating_add(1))
                .await
            {
                Ok(history) if history.gap || history.events.len() > limit => {
                    // The client is told; it gets live messages from here on.
                    let why = if history.gap {
                        "messages after `since` are no longer retained"
                    } else {
                        "more messages after `since` than broker.replay_limit"
                    };
                    reply = Err(Refusal::new(ErrorCode::HistoryGap, why));
                    delivered_through = MessageId::ZERO;
                }
                Ok(history) => {
                    // Complete whatever the queue size: each frame waits for room (the client
                    // reading is the backpressure) and is never dropped by the overflow policy.
                    // Live events meanwhile wait in the member's replay buffer.
                    for event in &history.events {
                        self.session.queue.wait_for_room().await;
                        self.session
                            .queue
                            .push_reply(super::room_event_frame(event));
                        delivered_through = event.id;
                    }
                }
                Err(e) => {
                    self.leave_room(&room).await;
                    return Err(Refusal::new(
                        ErrorCode::Unavailable,
                        unavailable_message(&e),
                    ));
                }
            }
            // Then what arrived live meanwhile, with the same backpressure, until nothing
            // is held: live delivery takes over from there.
            loop {
                let held = gw.hub.take_held(&room, self.session.id, delivered_through);
                let Some(last) = held.last() else { break };
                delivered_through = last.id;
                for event in &held {
                    self.session.queue.wait_for_room().await;
                    let frame = super::room_event_frame(event);
                    metric::delivered(event.msg.kind.as_str(), 1);
                    metric::bytes_out(frame.len() as u64);
                    self.session.queue.push_reply(frame);
                }
            }
        }

        let seq = gw.hub.presence_seq(&room);
        match gw.registry.presence(&room).await {
            Ok(entries) => {
                if crate::supervise::injected("slow-presence", &room) {
                    // Test-only: a diff overtakes the state read before it.
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                let state = serde_json::Value::Object(presence_map(&entries));
                self.send(ServerFrame::new("presence_state", Some(&room), &state).to_json());
                if gw.hub.presence_seq(&room) != seq {
                    // A diff came meanwhile and went out before this state, which may be
                    // older: the current presence follows.
                    gw.hub.presence_lost(&self.session, vec![room.clone()]);
                }
            }
            Err(e) => tracing::warn!(error = %e, room = %room, "presence state unavailable"),
        }
        reply
    }

    async fn leave_room(&mut self, room: &RoomName) -> bool {
        let gw = &self.gw;
        let was_member = gw
            .hub
            .leave(&*gw.broker, &*gw.registry, room, self.session.id);
        self.rooms.retain(|r| r != room);
        if let Some(d) = &mut self.meta_defaults {
            d.remove(room);
        }
        if was_member {
            gw.untrack(room, &self.session).await;
        }
        was_member
    }

    /// The server API removed this connection from `room`: leave it and say so.
    async fn kicked_from(&mut self, room: &RoomName) {
        if self.leave_room(room).await {
            let notice = serde_json::json!({"event": "unsubscribed"});
            self.send(ServerFrame::new("system", Some(room), &notice).to_json());
        }
    }

    async fn leave(&mut self, frame: &ClientFrame<'_>) -> Reply {
        let Some(room) = frame.room.as_deref() else {
            return Err(Refusal::new(ErrorCode::RoomRequired, "`room` is required"));
        };
        let room = RoomName::from(room);
        self.leave_room(&room).await;
        Ok(Some("{}".into()))
    }

    /// Refuses JSON nested deeper than `ws.max_json_depth`: other clients' parsers may choke.
    fn check_depth(&self, data: &RawValue) -> Result<(), Refusal> {
        let max = self.gw.config.ws.max_json_depth;
        if json_too_deep(data.get(), max) {
            metric::limit_exceeded("json_depth");
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("`data` nests deeper than {max} levels (ws.max_json_depth)"),
            ));
        }
        Ok(())
    }

    /// `data`, or `{"text": ...}` from the shorthand; must be an object.
    fn payload(&self, frame: &ClientFrame) -> Result<Box<RawValue>, Refusal> {
        match (frame.data, &frame.text) {
            (Some(data), _) if is_object(data) => {
                self.check_depth(data)?;
                Ok(data.to_owned())
            }
            (Some(_), _) => Err(Refusal::new(
                ErrorCode::BadRequest,
                "`data` must be an object",
            )),
            (None, Some(text)) => Ok(serde_json::value::to_raw_value(
                &serde_json::json!({ "text": text }),
            )
            .expect("JSON object")),
            (None, None) => Err(Refusal::new(
                ErrorCode::BadRequest,
                "`data` (an object) or `text` is required",
            )),
        }
    }

    /// Starts a publish; its reply goes out when the broker answers, in request order.
    fn start_publish(&mut self, frame: &ClientFrame<'_>) {
        let reference = frame.reference.map(RawValue::to_owned);
        let room_name = frame.room.clone();
        let broker = self.gw.broker.clone();
        let span = match (&frame.room, trace::enabled()) {
            (Some(room), true) => Some(trace::publish_span(room, broker.kind())),
            _ => None,
        };
        let msg = self.room_of(frame).and_then(|room| {
            Ok(RoomMessage {
                room,
                kind: MessageKind::Message,
                data: self.payload(frame)?,
                sender_id: Some(self.session.identity.user_id.clone()),
                ts_ms: now_ms(),
                origin: Some(self.origin()),
                traceparent: span.as_ref().and_then(trace::traceparent),
                idempotency_key: idempotency_key(frame.idempotency_key.as_deref())?,
            })
        });
        let pending = async move {
            let result = match msg {
                Err(refusal) => Err(refusal),
                Ok(msg) => {
                    let started = std::time::Instant::now();
                    let published = broker.publish(msg).await;
                    metric::publish_latency(started.elapsed());
                    published
                        .map(|id| {
                            tracing::Span::current().record("messaging.message.id", id.to_string());
                            format!(r#"{{"id":"{id}"}}"#)
                        })
                        .map_err(|e| Refusal::new(ErrorCode::Unavailable, unavailable_message(&e)))
                }
            };
            (reference, room_name, result)
        };
        let pending = match span {
            Some(span) => pending.instrument(span).boxed(),
            None => pending.boxed(),
        };
        self.publishes
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(pending);
    }

    fn answer_publish(
        &mut self,
        (reference, room, result): (
            Option<Box<RawValue>>,
            Option<String>,
            Result<String, Refusal>,
        ),
    ) {
        let reference = reference.as_deref();
        match result {
            Ok(data) => {
                if reference.is_some() {
                    let data = RawValue::from_string(data).expect("reply data is JSON");
                    self.send(ack_frame(room.as_deref(), &*data, reference));
                }
            }
            Err(r) => self.send(error_frame(r.code, &r.message, room.as_deref(), reference)),
        }
        if self.publishes.as_ref().is_some_and(|p| p.is_empty()) {
            // Give back the queue's memory while the connection is quiet.
            self.publishes = None;
        }
    }

    /// Answers every publish still waiting, so other requests are answered after them.
    async fn finish_publishes(&mut self) {
        while self.publishes.as_ref().is_some_and(|p| !p.is_empty()) {
            let done = next_published(&mut self.publishes).await;
            self.answer_publish(done);
        }
    }

    async fn direct(&mut self, frame: &ClientFrame<'_>) -> Reply {
        let data = frame
            .data
            .filter(|d| is_object(d))
            .ok_or_else(|| Refusal::new(ErrorCode::BadRequest, "`data` must be an object"))?;
        self.check_depth(data)?;
        let to = serde_json::from_str::<DirectTarget>(data.get())
            .ok()
            .and_then(|t| t.to)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Refusal::new(ErrorCode::BadRequest, "`data.to` (a user id) is required")
            })?;
        let msg = DirectMessage {
            kind: DirectKind::Message,
            to: to.into(),
            data: data.to_owned(),
            sender_id: self.session.identity.user_id.clone(),
            ts_ms: now_ms(),
            traceparent: None,
        };
        self.gw
            .broker
            .send_direct(msg)
            .await
            .map_err(|e| Refusal::new(ErrorCode::Unavailable, unavailable_message(&e)))?;
        Ok(Some("{}".into()))
    }

    fn joined_room(&self, frame: &ClientFrame) -> Result<RoomName, Refusal> {
        let room = self.room_of(frame)?;
        if !self.rooms.contains(&room) {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("join `{room}` before tracking presence there"),
            ));
        }
        Ok(room)
    }

    async fn track(&mut self, frame: &ClientFrame<'_>) -> Reply {
        let room = self.joined_room(frame)?;
        let ws = &self.gw.config.ws;
        if let Some(data) = frame.data {
            if data.get().len() > ws.max_presence_bytes {
                metric::limit_exceeded("presence_bytes");
                return Err(Refusal::new(
                    ErrorCode::TooLarge,
                    format!(
                        "presence meta over {} bytes (ws.max_presence_bytes)",
                        ws.max_presence_bytes
                    ),
                ));
            }
            self.check_depth(data)?;
        }
        let defaults = self.meta_defaults.as_ref().and_then(|d| d.get(&room));
        let meta = presence_meta(frame.data, defaults.map(|d| &**d), &self.session)
            .map_err(|_| Refusal::new(ErrorCode::BadRequest, "`data` must be an object"))?;
        let entry = crate::broker::PresenceEntry {
            user_id: self.session.identity.user_id.clone(),
            conn_id: self.session.public_id.clone(),
            meta: meta.into(),
        };
        let max = self.gw.config.rooms.max_presence_per_room;
        let tracked = self
            .gw
            .registry
            .track(&room, entry.clone(), max)
            .await
            .map_err(|e| Refusal::new(ErrorCode::Unavailable, unavailable_message(&e)))?;
        if tracked == Tracked::RoomFull {
            metric::limit_exceeded("presence_per_room");
            return Err(Refusal::new(
                ErrorCode::LimitExceeded,
                format!("room `{room}` has {max} presence entries (rooms.max_presence_per_room)"),
            ));
        }
        // Once per connection and room: a `track` that only changes the meta is no join.
        if tracked == Tracked::Added {
            self.gw.webhooks.presence_join(&room, &entry);
        }
        Ok(Some("{}".into()))
    }

    async fn untrack(&mut self, frame: &ClientFrame<'_>) -> Reply {
        let room = self.joined_room(frame)?;
        let removed = self
            .gw
            .registry
            .untrack(&room, &self.session.public_id)
            .await
            .map_err(|e| Refusal::new(ErrorCode::Unavailable, unavailable_message(&e)))?;
        if removed {
            self.gw.webhooks.presence_leave(
                &room,
                &self.session.identity.user_id,
                &self.session.public_id,
            );
        }
        Ok(Some("{}".into()))
    }
}

fn refusal_of(denied: Denied) -> Refusal {
    match denied {
        Denied::Forbidden(_) => Refusal::new(ErrorCode::Forbidden, denied.to_string()),
        Denied::Unavailable(_) => Refusal::new(ErrorCode::Unavailable, denied.to_string()),
    }
}

/// The next publish answered by the broker, in request order; never resolves when none waits.
async fn next_published(
    publishes: &mut Option<FuturesOrdered<PendingPublish>>,
) -> (
    Option<Box<RawValue>>,
    Option<String>,
    Result<String, Refusal>,
) {
    match publishes {
        Some(p) if !p.is_empty() => match p.next().await {
            Some(done) => done,
            None => std::future::pending().await,
        },
        _ => std::future::pending().await,
    }
}

fn is_capacity_error(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_));
        }
        source = s.source();
    }
    e.to_string().contains("Space limit exceeded") || e.to_string().contains("too long")
}

/// A publish's optional `idempotency_key`, checked.
fn idempotency_key(key: Option<&str>) -> Result<Option<Box<str>>, Refusal> {
    match key {
        None => Ok(None),
        Some(k) if crate::broker::idempotency::valid_key(k) => Ok(Some(k.into())),
        Some(_) => Err(Refusal::new(
            ErrorCode::BadRequest,
            crate::broker::idempotency::KEY_RULE,
        )),
    }
}
