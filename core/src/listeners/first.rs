//! Long-polls of a channel list (`martd_channel_id_delimiter`): a multi-channel listener
//! answered with one message, the oldest newer than its id on any of its channels.
//!
//! Message ids are unique and increasing in the whole zone: one id resumes every channel, and
//! answering with the oldest newer message of all of them, one at a time, loses nothing and
//! repeats nothing. A wake-up finds that message the way it finds a streaming subscriber's
//! messages (see [`Listeners::begin_wake`]): only the channels of the wake-up being worked
//! through, and only messages up to its horizon. A message published on one of the listener's
//! channels after it parked and before the mailbox was taken named that channel in the mailbox
//! (so that channel is woken now, or was in an earlier pass that answered the listener); one
//! published after has an id past the horizon. So an entry is answered only with a message up
//! to the horizon (a later one comes with the wake-up its publish asks for), and the oldest
//! such message of the listener's woken channels is the oldest of all its channels.

// Keys are ids the zone made (channel serials, message ids), never a client's: a fast
// non-keyed hash is safe.
use rustc_hash::FxHashMap as HashMap;
use std::rc::Rc;

use allocator_api2::alloc::Allocator;

use super::wake::Afterwards;
use super::{ListenerKey, Listeners, MultiListener, PayloadCache, Verdict};
use crate::msgid::MsgId;
use crate::queue::Message;
use crate::store::{Channel, Store};

/// What one wake-up pass learnt for long-polls of channel lists: the next message up to the
/// horizon per `(channel serial, since)`, and each channel's name as the verdicts carry it.
pub(super) struct FirstPass<'s, A: Allocator + Clone> {
    nexts: HashMap<(u64, MsgId), Option<&'s Message<A>>>,
    names: HashMap<u64, Rc<[u8]>>,
}

impl<A: Allocator + Clone> Default for FirstPass<'_, A> {
    fn default() -> Self {
        FirstPass { nexts: HashMap::default(), names: HashMap::default() }
    }
}

/// Where the oldest message for a listener is: its channel, the id the listener's entry there
/// waited past, and the message.
type Found<'s, A> = (&'s Channel<A>, MsgId, &'s Message<A>);

/// Whether an entry of multi-channel listener `m` waiting past `since` on `ch` is answered
/// now: it has a newer message, up to `horizon` for a long-poll of a channel list (see the
/// module's documentation).
pub(super) fn multi_due<H, A: Allocator + Clone>(
    m: Option<&MultiListener<H>>,
    horizon: MsgId,
    ch: &Channel<A>,
    since: MsgId,
    now_ms: u64,
) -> bool {
    let upto = if m.is_some_and(|m| m.first) { horizon } else { MsgId::MAX };
    ch.next_for(since, now_ms).is_some_and(|m| m.id <= upto)
}

impl<H: Copy> Listeners<H> {
    /// The oldest message up to the horizon of a long-poll of a channel list (entries `parts`),
    /// answered on channel `own` whose entry waited past `own_since` (and has left): the
    /// oldest of `own`'s and of its other woken channels'.
    pub(super) fn oldest_for<'s, A: Allocator + Clone>(
        &self,
        store: &'s Store<A>,
        parts: &[ListenerKey],
        (own, own_since): (&'s Channel<A>, MsgId),
        now_ms: u64,
        pass: &mut FirstPass<'s, A>,
    ) -> Option<Found<'s, A>> {
        let horizon = self.horizon;
        let mut next = |ch: &'s Channel<A>, since: MsgId| {
            *pass
                .nexts
                .entry((ch.serial(), since))
                .or_insert_with(|| ch.next_for(since, now_ms).filter(|m| m.id <= horizon))
        };
        let mut best = next(own, own_since).map(|m| (own, own_since, m));
        let others = parts.iter().filter(|p| p.serial != own.serial() && self.woken(p.serial));
        for part in others {
            let Some(local) = self.channels.get(&part.serial) else { continue };
            let Some(entry) = local.parked.get(part.index) else { continue };
            let Some(ch) = store.channel(&local.name, part.serial) else { continue };
            let Some(m) = next(ch, entry.since) else { continue };
            if best.is_none_or(|b| m.id < b.2.id) {
                best = Some((ch, entry.since, m));
            }
        }
        best
    }
}

/// The verdict of a long-poll of a channel list whose oldest message is `found`: that message
/// and its channel (`503` if it cannot be copied). A one-to-one channel's message is consumed.
pub(super) fn verdict<'s, A: Allocator + Clone>(
    found: Option<Found<'s, A>>,
    pass: &mut FirstPass<'s, A>,
    cache: &mut PayloadCache,
    after: &mut Afterwards,
) -> Verdict {
    let Some((ch, since, msg)) = found else {
        return Verdict::Unavailable;
    };
    let Some(payload) = cache.get(msg) else {
        return Verdict::Unavailable;
    };
    if ch.one2one() {
        after.consumed.push((ch.name().into(), since, msg.id));
    }
    let name = pass.names.entry(ch.serial()).or_insert_with(|| ch.name().into());
    Verdict::DeliverOn(payload, name.clone())
}
