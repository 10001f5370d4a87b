//! The bounded per-connection send queue and its overflow policies.
//!
//! Producers (fan-out, request handlers) push without waiting; the connection's writer task
//! drains the queue. Frames are shared bytes: pushing one to many queues copies no payload.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

use crate::broker::{MessageId, RoomName};
use crate::config::OverflowPolicy;
use crate::protocol::{ServerFrame, close};
use crate::telemetry::metric;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full and a frame was dropped (the oldest or this one, by policy).
    Dropped,
    /// The queue was full under `disconnect`: the connection is now closing with 1013.
    Overflowed,
    /// The connection is closing; the frame was discarded.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: Utf8Bytes,
}

/// Where a room message stands in its room, so that dropping it can be announced. One per
/// event per instance, shared by every recipient.
#[derive(Debug)]
pub struct EventMark {
    pub room: RoomName,
    /// The room's message delivered here just before this one (`0-0` if none yet): the
    /// `since` that recovers this message and every later one.
    pub prev: MessageId,
}

/// What a queued frame is, so that dropping it is made good.
#[derive(Debug, Clone)]
pub enum Mark {
    /// A room message: its loss is announced (an overflow notice).
    Message(Arc<EventMark>),
    /// A presence diff of this room: its loss is made good with the room's current presence.
    Presence(RoomName),
}

/// A queued frame; replies to the connection's own requests are never dropped.
struct Queued {
    frame: Utf8Bytes,
    reply: bool,
    mark: Option<Mark>,
}

#[derive(Default)]
struct Inner {
    frames: VecDeque<Queued>,
    /// Bytes of the queued frames.
    bytes: usize,
    ping: bool,
    close: Option<CloseFrame>,
    /// The writer took the close frame: nothing more will be written.
    finished: bool,
    /// Rooms that lost messages to the overflow policy, with the `since` that recovers them;
    /// announced when the writer next takes frames.
    lost: Vec<(RoomName, MessageId)>,
    /// Rooms that lost presence diffs: the connection needs their presence again.
    lost_presence: Vec<RoomName>,
}

/// What the writer takes in one go.
#[derive(Default)]
pub struct Batch {
    pub frames: Vec<Utf8Bytes>,
    pub ping: bool,
    pub close: Option<CloseFrame>,
    /// Rooms whose presence diffs were dropped since the last batch: the writer asks for
    /// their current presence.
    pub presence_lost: Vec<RoomName>,
}

pub struct SendQueue {
    inner: Mutex<Inner>,
    wake: Notify,
    /// Signalled when the writer takes frames: the reader may be waiting for room.
    space: Notify,
    max: usize,
    max_bytes: usize,
    policy: OverflowPolicy,
}

impl Inner {
    /// Whether `incoming` more bytes would overflow the frame count or the byte budget. A
    /// frame larger than the whole budget still goes into an empty queue.
    fn is_full(&self, max: usize, max_bytes: usize, incoming: usize) -> bool {
        self.frames.len() >= max || (self.bytes > 0 && self.bytes + incoming > max_bytes)
    }

    fn has_room(&self, max: usize, max_bytes: usize) -> bool {
        self.frames.len() < max && self.bytes < max_bytes
    }

    /// Remembers that a room lost a message (the first loss of a room sets its `since`) or a
    /// presence diff.
    fn record_loss(&mut self, mark: Option<&Mark>) {
        match mark {
            Some(Mark::Message(mark)) if !self.lost.iter().any(|(r, _)| *r == mark.room) => {
                self.lost.push((mark.room.clone(), mark.prev));
            }
            Some(Mark::Presence(room)) if !self.lost_presence.contains(room) => {
                self.lost_presence.push(room.clone());
            }
            _ => {}
        }
    }
}

/// `{"type":"system","room":R,"data":{"event":"overflow","since":S}}` (PROTOCOL.md, "Slow
/// consumers").
fn overflow_notice(room: &str, since: MessageId) -> Utf8Bytes {
    let data = serde_json::json!({"event": "overflow", "since": since.to_string()});
    Utf8Bytes::from(ServerFrame::new("system", Some(room), &data).to_json())
}

impl SendQueue {
    /// A queue of at most `max` frames and `max_bytes` bytes (replies excepted).
    pub fn new(max: usize, max_bytes: usize, policy: OverflowPolicy) -> Self {
        Self {
            inner: Mutex::default(),
            wake: Notify::new(),
            space: Notify::new(),
            max,
            max_bytes,
            policy,
        }
    }

    pub fn policy(&self) -> OverflowPolicy {
        self.policy
    }

    /// Queues a frame, applying the overflow policy. `mark` tells which room message it is,
    /// so that losing it is announced.
    pub fn push(&self, frame: Utf8Bytes, mark: Option<&Mark>) -> Pushed {
        let mut q = self.inner.lock();
        if q.close.is_some() {
            return Pushed::Closed;
        }
        let mut outcome = Pushed::Queued;
        if q.is_full(self.max, self.max_bytes, frame.len()) {
            match self.policy {
                OverflowPolicy::DropOldest => {
                    // Oldest first, until the new frame fits; replies stay.
                    while q.is_full(self.max, self.max_bytes, frame.len()) {
                        let Some(oldest) = q.frames.iter().position(|f| !f.reply) else {
                            // Only replies queued: this frame is the one dropped.
                            q.record_loss(mark);
                            drop(q);
                            self.wake.notify_one();
                            return Pushed::Dropped;
                        };
                        if let Some(old) = q.frames.remove(oldest) {
                            q.bytes -= old.frame.len();
                            q.record_loss(old.mark.as_ref());
                        }
                    }
                    outcome = Pushed::Dropped;
                }
                OverflowPolicy::DropNew => {
                    q.record_loss(mark);
                    drop(q);
                    self.wake.notify_one();
                    return Pushed::Dropped;
                }
                OverflowPolicy::Disconnect => {
                    q.frames.clear();
                    q.bytes = 0;
                    q.close = Some(CloseFrame {
                        code: close::TRY_AGAIN_LATER,
                        reason: Utf8Bytes::from_static("slow consumer"),
                    });
                    drop(q);
                    self.wake.notify_one();
                    return Pushed::Overflowed;
                }
            }
        }
        q.bytes += frame.len();
        q.frames.push_back(Queued {
            frame,
            reply: false,
            mark: mark.cloned(),
        });
        drop(q);
        self.wake.notify_one();
        outcome
    }

    /// Announces, once the queue has room, that `room` lost messages after `since` (frames
    /// that never entered the queue).
    pub fn announce_loss(&self, room: &RoomName, since: MessageId) {
        let mut q = self.inner.lock();
        if q.close.is_some() {
            return;
        }
        let mark = Mark::Message(Arc::new(EventMark {
            room: room.clone(),
            prev: since,
        }));
        q.record_loss(Some(&mark));
        drop(q);
        self.wake.notify_one();
    }

    /// Queues a reply to the connection's own request. Replies are never dropped: every request
    /// with a `ref` gets its answer. They stay bounded because the reader stops reading new
    /// requests while the queue is full (see [`SendQueue::wait_for_room`]).
    pub fn push_reply(&self, frame: Utf8Bytes) {
        self.queue_reply(frame, false);
    }

    /// Queues a reply ahead of every queued frame (the connection's `welcome`).
    pub fn push_reply_first(&self, frame: Utf8Bytes) {
        self.queue_reply(frame, true);
    }

    fn queue_reply(&self, frame: Utf8Bytes, first: bool) {
        let mut q = self.inner.lock();
        if q.close.is_some() {
            return;
        }
        q.bytes += frame.len();
        let queued = Queued {
            frame,
            reply: true,
            mark: None,
        };
        if first {
            q.frames.push_front(queued);
        } else {
            q.frames.push_back(queued);
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Waits until the queue is below its limit, so a client that does not read stops being
    /// read from (TCP backpressure) instead of growing its queue.
    pub async fn wait_for_room(&self) {
        loop {
            let space = self.space.notified();
            {
                let q = self.inner.lock();
                if q.has_room(self.max, self.max_bytes) || q.close.is_some() {
                    return;
                }
            }
            space.await;
        }
    }

    /// Asks the writer for a WebSocket ping (liveness).
    pub fn ping(&self) {
        let mut q = self.inner.lock();
        if q.close.is_none() {
            q.ping = true;
            drop(q);
            self.wake.notify_one();
        }
    }

    /// Closes the connection after the frames already queued (or at once, discarding them).
    /// Returns false if it was already closing.
    pub fn close(&self, code: u16, reason: impl Into<Utf8Bytes>, discard_pending: bool) -> bool {
        let mut q = self.inner.lock();
        if q.close.is_some() {
            return false;
        }
        if discard_pending {
            q.frames.clear();
            q.bytes = 0;
        }
        q.close = Some(CloseFrame {
            code,
            reason: reason.into(),
        });
        drop(q);
        self.wake.notify_one();
        true
    }

    pub fn is_closing(&self) -> bool {
        self.inner.lock().close.is_some()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for work and moves it into `batch` (reusing its allocation). `None` once the
    /// close frame has been handed out.
    pub async fn next_batch(&self, batch: &mut Batch) -> Option<()> {
        loop {
            {
                let mut q = self.inner.lock();
                if q.finished {
                    return None;
                }
                if !q.frames.is_empty()
                    || q.ping
                    || q.close.is_some()
                    || !q.lost.is_empty()
                    || !q.lost_presence.is_empty()
                {
                    batch.frames.extend(q.frames.drain(..).map(|f| f.frame));
                    q.bytes = 0;
                    if q.close.is_none() {
                        // The queue is empty now: tell the client what it lost, after the
                        // frames it keeps.
                        for (room, since) in q.lost.drain(..) {
                            metric::overflow_notice();
                            batch.frames.push(overflow_notice(&room, since));
                        }
                        batch.presence_lost.append(&mut q.lost_presence);
                    }
                    batch.ping = std::mem::take(&mut q.ping);
                    batch.close = q.close.clone();
                    q.finished = q.close.is_some();
                    if q.frames.capacity() > 4 * self.max.min(64) {
                        // Give back memory a burst grew.
                        q.frames.shrink_to(self.max.min(64));
                    }
                    drop(q);
                    self.space.notify_waiters();
                    return Some(());
                }
            }
            self.wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &'static str) -> Utf8Bytes {
        Utf8Bytes::from_static(s)
    }

    async fn drain(q: &SendQueue) -> Batch {
        let mut b = Batch::default();
        q.next_batch(&mut b).await.unwrap();
        b
    }

    #[tokio::test]
    async fn drop_oldest_keeps_newest() {
        let q = SendQueue::new(2, usize::MAX, OverflowPolicy::DropOldest);
        assert_eq!(q.push(f("1"), None), Pushed::Queued);
        assert_eq!(q.push(f("2"), None), Pushed::Queued);
        assert_eq!(q.push(f("3"), None), Pushed::Dropped);
        assert_eq!(drain(&q).await.frames, vec![f("2"), f("3")]);
    }

    #[tokio::test]
    async fn drop_oldest_never_drops_a_reply() {
        let q = SendQueue::new(2, usize::MAX, OverflowPolicy::DropOldest);
        q.push_reply(f("ack"));
        q.push(f("1"), None);
        assert_eq!(q.push(f("2"), None), Pushed::Dropped);
        assert_eq!(drain(&q).await.frames, vec![f("ack"), f("2")]);
    }

    #[tokio::test]
    async fn drop_new_keeps_oldest() {
        let q = SendQueue::new(2, usize::MAX, OverflowPolicy::DropNew);
        q.push(f("1"), None);
        q.push(f("2"), None);
        assert_eq!(q.push(f("3"), None), Pushed::Dropped);
        assert_eq!(drain(&q).await.frames, vec![f("1"), f("2")]);
    }

    #[tokio::test]
    async fn disconnect_closes_with_1013() {
        let q = SendQueue::new(1, usize::MAX, OverflowPolicy::Disconnect);
        q.push(f("1"), None);
        assert_eq!(q.push(f("2"), None), Pushed::Overflowed);
        assert_eq!(q.push(f("3"), None), Pushed::Closed);
        let b = drain(&q).await;
        assert!(b.frames.is_empty());
        assert_eq!(b.close.unwrap().code, 1013);
        let mut again = Batch::default();
        assert!(q.next_batch(&mut again).await.is_none());
    }

    #[tokio::test]
    async fn byte_budget_applies_the_policy() {
        // 10 frames allowed, but only 6 bytes.
        let q = SendQueue::new(10, 6, OverflowPolicy::DropOldest);
        assert_eq!(q.push(f("aaa"), None), Pushed::Queued);
        assert_eq!(q.push(f("bbb"), None), Pushed::Queued);
        assert_eq!(q.push(f("cc"), None), Pushed::Dropped);
        assert_eq!(drain(&q).await.frames, vec![f("bbb"), f("cc")]);

        let q = SendQueue::new(10, 6, OverflowPolicy::DropNew);
        q.push(f("aaaa"), None);
        assert_eq!(q.push(f("bbb"), None), Pushed::Dropped);
        assert_eq!(drain(&q).await.frames, vec![f("aaaa")]);

        let q = SendQueue::new(10, 6, OverflowPolicy::Disconnect);
        q.push(f("aaaa"), None);
        assert_eq!(q.push(f("bbb"), None), Pushed::Overflowed);
        assert_eq!(drain(&q).await.close.unwrap().code, 1013);

        // A frame over the whole budget still reaches an empty queue.
        let q = SendQueue::new(10, 6, OverflowPolicy::DropNew);
        assert_eq!(q.push(f("0123456789"), None), Pushed::Queued);
        assert_eq!(drain(&q).await.frames, vec![f("0123456789")]);
    }

    #[tokio::test]
    async fn a_drop_is_announced_once_per_room_after_the_kept_frames() {
        let mark = |room: &str, prev: u64| {
            Mark::Message(Arc::new(EventMark {
                room: room.into(),
                prev: MessageId::new(prev, 0),
            }))
        };
        let q = SendQueue::new(2, usize::MAX, OverflowPolicy::DropOldest);
        q.push(f("a1"), Some(&mark("a", 0)));
        q.push(f("a2"), Some(&mark("a", 1)));
        // Drops a1, then a2: room a lost from after 0-0 (the first loss counts).
        q.push(f("b1"), Some(&mark("b", 0)));
        q.push(f("b2"), Some(&mark("b", 10)));
        let frames: Vec<String> = drain(&q)
            .await
            .frames
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(frames[..2], ["b1", "b2"]);
        assert_eq!(frames.len(), 3);
        assert!(frames[2].contains(r#""room":"a""#), "{}", frames[2]);
        assert!(frames[2].contains(r#""since":"0-0""#), "{}", frames[2]);
        // Announced once.
        q.push(f("c"), None);
        assert_eq!(drain(&q).await.frames, vec![f("c")]);

        let q = SendQueue::new(1, usize::MAX, OverflowPolicy::DropNew);
        q.push(f("a1"), Some(&mark("a", 0)));
        assert_eq!(q.push(f("a2"), Some(&mark("a", 1))), Pushed::Dropped);
        let frames = drain(&q).await.frames;
        assert_eq!(frames[0], f("a1"));
        assert!(frames[1].contains(r#""since":"1-0""#), "{}", frames[1]);
    }

    #[tokio::test]
    async fn a_dropped_presence_diff_asks_once_for_the_rooms_presence() {
        let presence = |room: &str| Mark::Presence(room.into());
        let q = SendQueue::new(1, usize::MAX, OverflowPolicy::DropOldest);
        q.push(f("d1"), Some(&presence("a")));
        q.push(f("d2"), Some(&presence("a")));
        q.push(f("d3"), Some(&presence("a")));
        let b = drain(&q).await;
        assert_eq!(b.frames, vec![f("d3")]);
        assert_eq!(b.presence_lost, [RoomName::from("a")]);
        q.push(f("d4"), Some(&presence("a")));
        let b = drain(&q).await;
        assert!(b.presence_lost.is_empty(), "asked once per loss");
    }

    #[tokio::test]
    async fn close_after_pending_frames() {
        let q = SendQueue::new(4, usize::MAX, OverflowPolicy::DropOldest);
        q.push(f("bye"), None);
        assert!(q.close(1001, "draining", false));
        assert!(!q.close(1000, "again", false));
        let b = drain(&q).await;
        assert_eq!(b.frames, vec![f("bye")]);
        assert_eq!(b.close.unwrap().code, 1001);
    }
}
