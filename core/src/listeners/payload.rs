//! What a worker sends its listeners: its copies of messages (one per message however many
//! listeners get it) and the verdicts of a wake-up.

// Keys are ids the zone made (channel serials, message ids), never a client's: a fast
// non-keyed hash is safe.
use rustc_hash::FxHashMap as HashMap;
use std::rc::{Rc, Weak};

use allocator_api2::alloc::Allocator;

use crate::msgid::{format_etag, MsgId};
use crate::queue::Message;
use crate::transport::{sse, websocket};

/// A message copied out of the zone, shared by every listener of this worker that gets it.
#[derive(Debug)]
pub struct Payload {
    pub id: MsgId,
    pub time: u64,
    etag_len: usize,
    ct_len: usize,
    event_len: usize,
    /// The quoted `Etag` value, the content type, the event name and the body, formatted
    /// once.
    data: Box<[u8]>,
    /// The message as an EventSource event, formatted when first needed (`None`: no memory).
    sse: std::cell::OnceCell<Option<Box<[u8]>>>,
    /// The message as a WebSocket frame, the same way.
    ws: std::cell::OnceCell<Option<Box<[u8]>>>,
}

impl Payload {
    /// The `Etag` header value (the quoted id).
    pub fn etag(&self) -> &[u8] {
        &self.data[..self.etag_len]
    }

    pub fn content_type(&self) -> &[u8] {
        &self.data[self.etag_len..self.etag_len + self.ct_len]
    }

    /// The publisher's EventSource event name; empty if none.
    pub fn event(&self) -> &[u8] {
        let at = self.etag_len + self.ct_len;
        &self.data[at..at + self.event_len]
    }

    pub fn body(&self) -> &[u8] {
        &self.data[self.etag_len + self.ct_len + self.event_len..]
    }

    /// The message as an EventSource event (`id:` and `data:` lines), formatted once per
    /// worker however many subscribers get it; `None` if it cannot be allocated.
    pub fn sse_event(&self) -> Option<&[u8]> {
        let made = self.sse.get_or_init(|| {
            let mut v = Vec::new();
            let event = Some(self.event()).filter(|e| !e.is_empty());
            v.try_reserve_exact(sse::event_capacity(event, self.body().len())).ok()?;
            sse::event(&mut v, self.id, event, self.body());
            Some(v.into_boxed_slice())
        });
        made.as_deref()
    }

    /// The message as one WebSocket frame: text when the body is UTF-8 and its content type
    /// is not `application/octet-stream`, else binary. Formatted once per worker; `None` if it
    /// cannot be allocated.
    pub fn ws_frame(&self) -> Option<&[u8]> {
        let made = self.ws.get_or_init(|| {
            let body = self.body();
            let binary = self.content_type().eq_ignore_ascii_case(b"application/octet-stream")
                || std::str::from_utf8(body).is_err();
            let op = if binary { websocket::opcode::BINARY } else { websocket::opcode::TEXT };
            let mut v = Vec::new();
            v.try_reserve_exact(websocket::frame_len(body.len())).ok()?;
            websocket::encode(&mut v, op, body);
            Some(v.into_boxed_slice())
        });
        made.as_deref()
    }
}

/// The worker's copies of messages, by id. A copy lives as long as a response uses it.
#[derive(Default)]
pub struct PayloadCache {
    copies: HashMap<MsgId, Weak<Payload>>,
    copies_made: u64,
}

impl PayloadCache {
    /// The worker's copy of `msg`, made now if no response holds one; `None` if the worker
    /// cannot allocate it (the message's size is the publisher's).
    pub fn get<A: Allocator>(&mut self, msg: &Message<A>) -> Option<Rc<Payload>> {
        if let Some(p) = self.copies.get(&msg.id).and_then(Weak::upgrade) {
            return Some(p);
        }
        let (ct, event) = (msg.content_type(), msg.event());
        let etag = format_etag(msg.id);
        let mut data = Vec::new();
        data.try_reserve_exact(etag.len() + ct.len() + event.len() + msg.body().len()).ok()?;
        data.extend_from_slice(etag.as_bytes());
        data.extend_from_slice(ct);
        data.extend_from_slice(event);
        data.extend_from_slice(msg.body());
        let p = Rc::new(Payload {
            id: msg.id,
            time: msg.time,
            etag_len: etag.len(),
            ct_len: ct.len(),
            event_len: event.len(),
            data: data.into_boxed_slice(),
            sse: Default::default(),
            ws: Default::default(),
        });
        if self.copies.len() >= 64 && self.copies.len().is_power_of_two() {
            self.copies.retain(|_, w| w.strong_count() > 0);
        }
        self.copies.insert(msg.id, Rc::downgrade(&p));
        self.copies_made += 1;
        Some(p)
    }

    /// Copies made so far (one per message per worker while it is in use).
    pub fn copies_made(&self) -> u64 {
        self.copies_made
    }
}

/// What happens to a woken listener.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// `200` with this message.
    Deliver(Rc<Payload>),
    /// A streaming subscriber's next message, and the channel it was published on.
    DeliverOn(Rc<Payload>, Rc<[u8]>),
    /// `200` with this JSON body (a multi-channel listener: every channel with something
    /// newer, see [`crate::json`]).
    Batch(Rc<[u8]>),
    /// `409`: displaced by a newer listener (`last` concurrency) or by the one-to-one
    /// election.
    Conflict,
    /// `410`: the channel was deleted.
    Gone,
    /// `410` for a multi-channel listener: this one of its channels was deleted.
    GoneChannel(Rc<[u8]>),
    /// `503`: the worker could not allocate its copy of the message (the listener asks again).
    Unavailable,
}
