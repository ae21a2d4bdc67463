//! A channel's message queue: the stored messages, oldest first, in zone memory.

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;

use crate::msgid::MsgId;

/// How long a message published with `martd_store_messages off` stays in the zone at most,
/// waiting for the workers that had listeners to pick it up.
pub const TRANSIENT_LIFE_MS: u64 = 5_000;

/// `Message::pending` of a stored (not transient) message.
const STORED: u32 = u32::MAX;

/// One message (64 bytes in the zone, plus its content type and body, which share one
/// allocation).
pub struct Message<A: Allocator> {
    /// The message id (the `Etag`).
    pub id: MsgId,
    /// Publish time, seconds since the epoch (the `Last-Modified`).
    pub time: u64,
    /// Wall-clock milliseconds after which the message is gone; `u64::MAX` = never.
    expires_ms: u64,
    /// [`STORED`] for a stored message. A message published with storing off is *transient*
    /// (only listeners waiting at publish time may get it), and this counts the workers that
    /// had listeners at publish time and have not yet picked it up. At zero it is dropped.
    pending: u32,
    ct_len: u16,
    event_len: u16,
    /// The content type, the event name, the body.
    data: Vec<u8, A>,
}

impl<A: Allocator> Message<A> {
    pub fn content_type(&self) -> &[u8] {
        &self.data[..self.ct_len as usize]
    }

    /// The publisher's EventSource event name (`X-Martd-Event`); empty if none.
    pub fn event(&self) -> &[u8] {
        &self.data[self.ct_len as usize..self.ct_len as usize + self.event_len as usize]
    }

    pub fn body(&self) -> &[u8] {
        &self.data[self.ct_len as usize + self.event_len as usize..]
    }

    /// Wall-clock milliseconds after which it is gone (`u64::MAX`: never).
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    pub fn is_transient(&self) -> bool {
        self.pending != STORED
    }

    /// Gone for listeners (expired, or a transient message every worker has seen).
    pub fn is_dead(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms || self.pending == 0
    }
}

/// Why a message could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMemory;

/// What the publisher asked for a message.
#[derive(Debug, Clone, Copy)]
pub struct MessageSpec<'a> {
    /// At most [`MAX_CONTENT_TYPE`] bytes.
    pub content_type: &'a [u8],
    /// EventSource event name, at most [`MAX_EVENT`] bytes; empty: none.
    pub event: &'a [u8],
    pub body: &'a [u8],
    /// `0` = never expires.
    pub timeout_ms: u64,
    /// This message's own life (the publisher's `expire`), whatever its channel's: the store
    /// uses it instead of the channel's. `None`: the channel's.
    pub expire_ms: Option<u64>,
}

/// The longest content type a message keeps.
pub const MAX_CONTENT_TYPE: usize = u16::MAX as usize;
/// The longest event name a message keeps.
pub const MAX_EVENT: usize = 1024;

/// The stored messages of one channel, oldest first.
pub struct MessageQueue<A: Allocator> {
    messages: Vec<Message<A>, A>,
    /// No message expires before this (`u64::MAX`: none ever does). Exact after
    /// [`MessageQueue::expire`]; may be earlier than the truth after messages were dropped
    /// otherwise, never later.
    next_expiry: u64,
}

impl<A: Allocator + Clone> MessageQueue<A> {
    pub fn new_in(alloc: A) -> Self {
        MessageQueue { messages: Vec::new_in(alloc), next_expiry: u64::MAX }
    }

    /// No message expires before this time (ms; `u64::MAX`: never).
    pub fn next_expiry(&self) -> u64 {
        self.next_expiry
    }

    /// Builds a message in zone memory; nothing is changed if memory runs out.
    pub fn make_message(
        &self,
        spec: &MessageSpec<'_>,
        id: MsgId,
        now_ms: u64,
        transient_for: Option<u32>,
    ) -> Result<Message<A>, NoMemory> {
        let alloc = self.messages.allocator().clone();
        // The caller bounds both (`MAX_CONTENT_TYPE`, `MAX_EVENT`); longer ones are cut.
        let ct = &spec.content_type[..spec.content_type.len().min(MAX_CONTENT_TYPE)];
        let event = &spec.event[..spec.event.len().min(MAX_EVENT)];
        let mut data = Vec::new_in(alloc);
        data.try_reserve_exact(ct.len() + event.len() + spec.body.len()).map_err(|_| NoMemory)?;
        data.extend_from_slice(ct);
        data.extend_from_slice(event);
        data.extend_from_slice(spec.body);
        let life = match (spec.timeout_ms, transient_for.is_some()) {
            (0, false) => u64::MAX,
            (t, false) => t,
            (0, true) => TRANSIENT_LIFE_MS,
            (t, true) => t.min(TRANSIENT_LIFE_MS),
        };
        Ok(Message {
            id,
            time: now_ms / 1000,
            expires_ms: now_ms.saturating_add(life),
            // A worker count, far below `STORED`.
            pending: transient_for.map_or(STORED, |n| n.min(STORED - 1)),
            ct_len: ct.len() as u16,
            event_len: event.len() as u16,
            data,
        })
    }

    /// A stored message read back from disk (see `crate::persist`), as it was.
    pub fn restore_message(
        &self,
        m: &crate::persist::SavedMessage<'_>,
    ) -> Result<Message<A>, NoMemory> {
        let spec = MessageSpec {
            content_type: m.content_type,
            event: m.event,
            body: m.body,
            timeout_ms: 0,
            expire_ms: None,
        };
        let mut msg = self.make_message(&spec, m.id, m.time.saturating_mul(1000), None)?;
        msg.expires_ms = m.expires_ms;
        Ok(msg)
    }

    /// Appends `msg`, dropping the oldest messages so that at most `max_len` stay.
    /// Memory for the slot is reserved first, so on failure the queue is unchanged. The
    /// queue's array grows by doubling from one slot, never past `max_len` slots.
    pub fn push(&mut self, msg: Message<A>, max_len: usize) -> Result<(), NoMemory> {
        self.push_keeping(msg, max_len, 0, |_| 0)
    }

    /// [`MessageQueue::push`], but a stored message pushed out of the buffer while `unseen(id)`
    /// workers with listeners have not looked at it yet stays for them as a transient one
    /// (delivered to the listeners waiting now, not to later ones; at most
    /// [`TRANSIENT_LIFE_MS`] after `now_ms`), so that a burst longer than the buffer does not
    /// lose messages for the listeners already waiting.
    pub fn push_keeping(
        &mut self,
        msg: Message<A>,
        max_len: usize,
        now_ms: u64,
        unseen: impl Fn(MsgId) -> u32,
    ) -> Result<(), NoMemory> {
        let max_len = max_len.max(1);
        let len = self.messages.len();
        // The oldest stored messages that leave the buffer to make room.
        let stored = if len >= max_len {
            self.messages.iter().filter(|m| !m.is_transient()).count()
        } else {
            len
        };
        let excess = (stored + 1).saturating_sub(max_len);
        let leaving = || self.messages.iter().filter(|m| !m.is_transient()).take(excess);
        let dropping = leaving().filter(|m| unseen(m.id) == 0).count();
        // Room first: on failure nothing has changed.
        let need = len - dropping + 1;
        if need > self.messages.capacity() {
            let want = len.saturating_mul(2).max(1).min(max_len.max(need)).max(need);
            self.messages.try_reserve_exact(want - len).map_err(|_| NoMemory)?;
        }
        if excess > 0 {
            let mut left = excess;
            for m in self.messages.iter_mut().filter(|m| !m.is_transient()) {
                if left == 0 {
                    break;
                }
                left -= 1;
                match unseen(m.id) {
                    // `pending` 0 marks it for removal below.
                    0 => m.pending = 0,
                    n => {
                        m.pending = n.min(STORED - 1);
                        m.expires_ms = m.expires_ms.min(now_ms.saturating_add(TRANSIENT_LIFE_MS));
                        self.next_expiry = self.next_expiry.min(m.expires_ms);
                    }
                }
            }
            if dropping > 0 {
                self.messages.retain(|m| m.pending != 0);
            }
        }
        self.next_expiry = self.next_expiry.min(msg.expires_ms);
        self.messages.push(msg);
        Ok(())
    }

    /// Drops dead messages; returns how many were dropped. Nothing to look at before
    /// [`MessageQueue::next_expiry`].
    pub fn expire(&mut self, now_ms: u64) -> usize {
        if now_ms < self.next_expiry {
            return 0;
        }
        let before = self.messages.len();
        self.messages.retain(|m| !m.is_dead(now_ms));
        self.settle();
        before - self.messages.len()
    }

    /// After messages were dropped: the exact next expiry, and the array's memory given back
    /// when nothing is left (without a reallocation that could fail).
    fn settle(&mut self) {
        self.next_expiry = self.messages.iter().map(|m| m.expires_ms).min().unwrap_or(u64::MAX);
        if self.messages.is_empty() && self.messages.capacity() > 0 {
            let alloc = self.messages.allocator().clone();
            self.messages = Vec::new_in(alloc);
        }
    }

    /// The first live message after `since`; transient ones only if `include_transient`.
    pub fn next_after(
        &self,
        since: MsgId,
        now_ms: u64,
        include_transient: bool,
    ) -> Option<&Message<A>> {
        // Ids increase along the queue: skip the older part with a binary search.
        let start = self.messages.partition_point(|m| m.id <= since);
        self.messages[start..]
            .iter()
            .find(|m| !m.is_dead(now_ms) && (include_transient || !m.is_transient()))
    }

    /// Every live message after `since`, oldest first; transient ones only if
    /// `include_transient`.
    pub fn after(
        &self,
        since: MsgId,
        now_ms: u64,
        include_transient: bool,
    ) -> impl Iterator<Item = &Message<A>> + Clone {
        let start = self.messages.partition_point(|m| m.id <= since);
        self.messages[start..]
            .iter()
            .filter(move |m| !m.is_dead(now_ms) && (include_transient || !m.is_transient()))
    }

    /// Removes the messages with ids in `(after, upto]` (delivered one-to-one: consumed).
    pub fn consume(&mut self, after: MsgId, upto: MsgId) -> usize {
        let before = self.messages.len();
        self.messages.retain(|m| m.id <= after || m.id > upto);
        let n = before - self.messages.len();
        if n > 0 {
            self.settle();
        }
        n
    }

    /// Drops the oldest messages until at most `max_len` stay (a channel's size was lowered).
    pub fn truncate_to(&mut self, max_len: usize) {
        let len = self.messages.len();
        if len > max_len {
            self.messages.drain(..len - max_len);
            self.settle();
        }
    }

    /// The id of the newest live stored message published at or before second `time`
    /// (`0` if none): the id an `If-Modified-Since` of `time` stands for.
    pub fn id_at_time(&self, time: u64, now_ms: u64) -> MsgId {
        self.messages
            .iter()
            .rev()
            .find(|m| m.time <= time && !m.is_dead(now_ms))
            .map_or(0, |m| m.id)
    }

    /// Live stored messages a new listener could receive.
    pub fn stored_count(&self, now_ms: u64) -> usize {
        self.messages.iter().filter(|m| !m.is_transient() && !m.is_dead(now_ms)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Stored (not transient) messages in the queue, expired ones not yet dropped included:
    /// what the zone-wide count of stored messages counts.
    pub fn stored_len(&self) -> usize {
        self.messages.iter().filter(|m| !m.is_transient()).count()
    }

    /// A worker that had listeners when these were published has now seen every message
    /// after `seen`. Transient messages every such worker has seen are dropped at once.
    pub fn ack_transient_after(&mut self, seen: MsgId) {
        self.ack_transient_between(seen, MsgId::MAX);
    }

    /// A worker that had listeners when these were published has now seen the messages with
    /// ids in `(seen, upto]`.
    pub fn ack_transient_between(&mut self, seen: MsgId, upto: MsgId) {
        let start = self.messages.partition_point(|m| m.id <= seen);
        let end = self.messages.partition_point(|m| m.id <= upto);
        let mut done = false;
        for m in &mut self.messages[start..end.max(start)] {
            if m.is_transient() && m.pending > 0 {
                m.pending -= 1;
                done |= m.pending == 0;
            }
        }
        if done {
            self.messages.retain(|m| m.pending != 0);
            self.settle();
        }
    }

    /// Messages in the queue, dead or alive.
    pub fn len(&self) -> usize {
        self.messages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allocator_api2::alloc::Global;

    fn spec(body: &[u8]) -> MessageSpec<'_> {
        MessageSpec {
            content_type: b"text/plain",
            event: b"",
            body,
            timeout_ms: 0,
            expire_ms: None,
        }
    }

    #[test]
    fn circular_and_ordered() {
        let mut q = MessageQueue::new_in(Global);
        for id in 1..=5u64 {
            let m = q.make_message(&spec(format!("m{id}").as_bytes()), id, 1000, None).unwrap();
            q.push(m, 3).unwrap();
        }
        assert_eq!(q.stored_count(1000), 3);
        assert_eq!(q.next_after(0, 1000, false).unwrap().body(), b"m3");
        assert_eq!(q.next_after(3, 1000, false).unwrap().body(), b"m4");
        assert!(q.next_after(5, 1000, false).is_none());
        assert_eq!(q.next_after(3, 1000, false).unwrap().content_type(), b"text/plain");
    }

    #[test]
    fn expiry() {
        let mut q = MessageQueue::new_in(Global);
        let m = q
            .make_message(
                &MessageSpec {
                    content_type: b"",
                    event: b"",
                    body: b"x",
                    timeout_ms: 500,
                    expire_ms: None,
                },
                1,
                1000,
                None,
            )
            .unwrap();
        q.push(m, 10).unwrap();
        assert!(q.next_after(0, 1499, false).is_some());
        assert!(q.next_after(0, 1500, false).is_none());
        assert_eq!(q.expire(1500), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn transient_messages_reach_only_waiting_listeners() {
        let mut q = MessageQueue::new_in(Global);
        let m = q.make_message(&spec(b"t"), 7, 1000, Some(2)).unwrap();
        q.push(m, 10).unwrap();
        assert!(q.next_after(0, 1000, false).is_none());
        assert!(q.next_after(0, 1000, true).is_some());
        assert_eq!(q.stored_count(1000), 0);
        q.ack_transient_after(0);
        assert!(q.next_after(0, 1000, true).is_some());
        q.ack_transient_after(0);
        assert!(q.next_after(0, 1000, true).is_none());
        assert!(q.is_empty(), "dropped once every worker has seen it");
        // And in any case they leave after TRANSIENT_LIFE_MS.
        let m = q.make_message(&spec(b"u"), 8, 1000, Some(1)).unwrap();
        q.push(m, 10).unwrap();
        assert_eq!(q.next_expiry(), 1000 + TRANSIENT_LIFE_MS);
        assert_eq!(q.expire(1000 + TRANSIENT_LIFE_MS - 1), 0);
        assert_eq!(q.expire(1000 + TRANSIENT_LIFE_MS), 1);
        assert_eq!(q.next_expiry(), u64::MAX);
    }

    #[test]
    fn modified_since_maps_to_ids() {
        let mut q = MessageQueue::new_in(Global);
        for (id, now) in [(10u64, 1_000u64), (11, 2_000), (12, 2_500), (13, 4_000)] {
            let m = q.make_message(&spec(b"x"), id, now, None).unwrap();
            q.push(m, 10).unwrap();
        }
        assert_eq!(q.id_at_time(0, 5_000), 0);
        assert_eq!(q.id_at_time(1, 5_000), 10);
        assert_eq!(q.id_at_time(2, 5_000), 12);
        assert_eq!(q.id_at_time(9, 5_000), 13);
    }
}
