//! Channel events (`martd_channel_events_channel`): the store notes each channel made or
//! removed and each listener that starts or stops waiting, in the order they happen under the
//! zone lock, and [`Store::flush_events`] publishes them, in that order, as JSON messages of
//! the events channel before the lock is released. A backend listening there tracks presence:
//!
//! `{"event":"listener_joined","channel":"room","listeners":3}`
//!
//! Noting an event is cheap and never publishes from inside another operation (no channel
//! moves under its caller). The events channel itself and registered clients make no events.
//! At most [`MAX_PENDING`] wait for one flush; more are counted as lost, as are events that
//! find no memory.

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;

use super::{AttrUpdate, PublishOpts, Store, StoreError, WakeTarget};
use crate::queue::MessageSpec;

/// Events one hold of the lock may note before they are lost.
pub const MAX_PENDING: usize = 1024;

/// How the events channel is published to (a push may still give it `size` and `life`).
pub const EVENTS_OPTS: PublishOpts = PublishOpts {
    buffer_len: 100,
    buffer_max: 1000,
    timeout_ms: 3_600_000,
    store: true,
    channel_timeout_ms: 300_000,
};

/// What happened to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelEvent {
    Created,
    Deleted,
    ListenerJoined,
    ListenerLeft,
}

impl ChannelEvent {
    /// Its name: the `event` of the JSON message and its EventSource event name.
    pub fn name(self) -> &'static str {
        match self {
            ChannelEvent::Created => "channel_created",
            ChannelEvent::Deleted => "channel_deleted",
            ChannelEvent::ListenerJoined => "listener_joined",
            ChannelEvent::ListenerLeft => "listener_left",
        }
    }
}

struct Noted<A: Allocator> {
    kind: ChannelEvent,
    /// Listeners on the channel after it.
    listeners: u32,
    channel: Vec<u8, A>,
}

/// The events channel and the events not published yet.
pub struct Events<A: Allocator> {
    name: Vec<u8, A>,
    pending: Vec<Noted<A>, A>,
    /// Events lost: too many in one hold of the lock, or no memory.
    pub lost: u64,
}

impl<A: Allocator + Clone> Store<A> {
    /// Sets (or, `None`, clears) the channel that gets channel events.
    pub fn set_events_channel(&mut self, name: Option<&[u8]>) -> Result<(), StoreError> {
        let Some(name) = name else {
            self.events = None;
            return Ok(());
        };
        if self.events.as_ref().is_some_and(|e| e.name[..] == *name) {
            return Ok(());
        }
        let mut n = Vec::new_in(self.alloc.clone());
        n.try_reserve_exact(name.len()).map_err(|_| StoreError::NoMemory)?;
        n.extend_from_slice(name);
        let lost = self.events.as_ref().map_or(0, |e| e.lost);
        let events = Events { name: n, pending: Vec::new_in(self.alloc.clone()), lost };
        self.events =
            Some(Box::try_new_in(events, self.alloc.clone()).map_err(|_| StoreError::NoMemory)?);
        Ok(())
    }

    /// Events lost so far (see the module's note).
    pub fn events_lost(&self) -> u64 {
        self.events.as_ref().map_or(0, |e| e.lost)
    }

    /// Notes that `kind` happened to channel `channel`, which now has `listeners`.
    pub(super) fn note_event(&mut self, kind: ChannelEvent, channel: &[u8], listeners: u32) {
        let alloc = self.alloc.clone();
        let Some(e) = self.events.as_mut() else {
            return;
        };
        if e.name[..] == *channel || channel.first() == Some(&super::clients::CLIENT_PREFIX) {
            return;
        }
        let mut name = Vec::new_in(alloc);
        if e.pending.len() >= MAX_PENDING
            || e.pending.try_reserve(1).is_err()
            || name.try_reserve_exact(channel.len()).is_err()
        {
            e.lost += 1;
            return;
        }
        name.extend_from_slice(channel);
        e.pending.push(Noted { kind, listeners, channel: name });
    }

    /// Whether events wait to be published.
    pub fn has_events(&self) -> bool {
        self.events.as_ref().is_some_and(|e| !e.pending.is_empty())
    }

    /// Publishes the noted events, in order, into the events channel; `wake` receives the
    /// workers to notify. Returns how many were published.
    pub fn flush_events(&mut self, now_ms: u64, wake: &mut std::vec::Vec<WakeTarget>) -> usize {
        let mut done = 0;
        // Publishing may note more (the zone full: garbage collection removes channels); a
        // few rounds take those too, and what is left waits for the next flush.
        for _ in 0..4 {
            let Some(e) = self.events.as_mut() else {
                return done;
            };
            if e.pending.is_empty() {
                break;
            }
            let name: std::vec::Vec<u8> = e.name.to_vec();
            let batch: std::vec::Vec<Noted<A>> = e.pending.drain(..).collect();
            for ev in batch {
                let body = event_json(ev.kind, &ev.channel, ev.listeners);
                let spec = MessageSpec {
                    content_type: b"application/json",
                    event: ev.kind.name().as_bytes(),
                    body: &body,
                    timeout_ms: EVENTS_OPTS.timeout_ms,
                    expire_ms: None,
                };
                let attrs = AttrUpdate::default();
                match self.publish(&name, Some(&spec), &attrs, &EVENTS_OPTS, now_ms, wake) {
                    Ok(_) => done += 1,
                    Err(_) => {
                        if let Some(e) = self.events.as_mut() {
                            e.lost += 1;
                        }
                    }
                }
            }
        }
        done
    }
}

/// `{"event":"KIND","channel":"NAME","listeners":N}`.
pub fn event_json(kind: ChannelEvent, channel: &[u8], listeners: u32) -> std::vec::Vec<u8> {
    let mut out = std::vec::Vec::with_capacity(channel.len() + 64);
    out.extend_from_slice(b"{\"event\":\"");
    out.extend_from_slice(kind.name().as_bytes());
    out.extend_from_slice(b"\",\"channel\":");
    crate::json::push_string(&mut out, channel);
    out.extend_from_slice(format!(",\"listeners\":{listeners}}}").as_bytes());
    out
}
