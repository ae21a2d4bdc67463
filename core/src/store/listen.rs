//! A listen request in the zone: answered at once with a stored message, or counted and
//! parked (see `super::Store::listen`).

use allocator_api2::alloc::Allocator;

use super::channel::{Channel, Waiter};
use super::{
    events, Concurrency, Listen, ListenOpts, NoMemory, Parked, Store, StoreError, WakeTarget,
};
use crate::msgid::{MsgId, Since};

impl<A: Allocator + Clone> Store<A> {
    /// A listen request: a message at once, or the listener is counted and parks. A listener
    /// of a slot that is not registered is not counted (nobody could wake it).
    pub fn listen(
        &mut self,
        name: &[u8],
        since: Since,
        opts: &ListenOpts,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Listen<'_, A>, StoreError> {
        let future_clamp = self.future_clamp(now_ms);
        let counted = self.is_registered(opts.slot);
        let found = self.retrying(now_ms, |s| {
            let (mut p, created) = if opts.create {
                s.get_or_create(name, now_ms, opts.channel_timeout_ms)?
            } else {
                let p = s.channels.find(name).ok_or(StoreError::NotFound)?;
                s.purge_dead(p);
                (p, false)
            };
            // SAFETY: a live channel of the table; the reference ends with `listen_on`.
            let r = s.listen_on(unsafe { p.as_mut() }, since, opts, now_ms, future_clamp, counted);
            match r {
                Err(_) if created => {
                    s.remove_channel(p);
                    return Err(r.err().unwrap_or(StoreError::NoMemory));
                }
                Ok(Ok((_, joined))) => {
                    if joined {
                        s.slot_joined(opts.slot);
                    }
                    if counted {
                        // SAFETY: a live channel of the table, only read here.
                        let n = unsafe { p.as_ref() }.listeners;
                        s.note_event(events::ChannelEvent::ListenerJoined, name, n);
                    }
                }
                _ => {}
            }
            s.rearm(p);
            r.map(|r| (p, r.map(|(parked, _)| parked)))
        })?;
        match found {
            (p, Ok(parked)) => {
                if opts.concurrency == Concurrency::Last {
                    self.notify_waiters(p, wake);
                }
                Ok(Listen::Park(parked))
            }
            (p, Err(since_id)) => {
                // SAFETY: a live channel of the table, borrowed for as long as the store is.
                let ch = unsafe { p.as_ref() };
                let msg =
                    ch.queue.next_after(since_id, now_ms, false).ok_or(StoreError::NotFound)?;
                Ok(Listen::Message(msg))
            }
        }
    }

    /// The listen decision on channel `ch`: `Ok(Err(since))` when a stored message answers it,
    /// `Ok(Ok((parked, joined)))` when it parks: counted in `ch` if `counted`, and `joined`
    /// if it is the slot's first listener there.
    pub(super) fn listen_on(
        &self,
        ch: &mut Channel<A>,
        since: Since,
        opts: &ListenOpts,
        now_ms: u64,
        future_clamp: super::Clamp,
        counted: bool,
    ) -> Result<Result<(Parked, bool), MsgId>, StoreError> {
        ch.last_requested_ms = now_ms.max(1);
        ch.last_active_ms = now_ms;
        ch.channel_timeout_ms = opts.channel_timeout_ms;
        let since_id = ch.since_id(since, future_clamp, now_ms);
        if !opts.stream && ch.has_stored_after(since_id, now_ms) {
            return Ok(Err(since_id));
        }
        if (opts.concurrency == Concurrency::First || ch.one2one()) && ch.listeners > 0 {
            return Err(StoreError::Conflict);
        }
        if opts.max_listeners > 0 && ch.listeners >= opts.max_listeners {
            return Err(StoreError::TooManyListeners);
        }
        let mut joined = false;
        if counted {
            match ch.waiters.iter_mut().find(|w| w.slot == opts.slot) {
                Some(w) => w.count += 1,
                None => {
                    // Most channels have listeners in one worker: one slot, then doubling.
                    let more = ch.waiters.len().max(1);
                    ch.waiters.try_reserve_exact(more).map_err(|_| NoMemory)?;
                    ch.waiters.push(Waiter { slot: opts.slot, count: 1, seen: ch.last_id });
                    joined = true;
                }
            }
            ch.listeners += 1;
        }
        ch.park_counter += 1;
        let park_seq = ch.park_counter;
        if opts.concurrency == Concurrency::Last {
            ch.evict_below = park_seq;
        }
        let parked = Parked { serial: ch.serial, since: since_id, park_seq, last_id: ch.last_id };
        Ok(Ok((parked, joined)))
    }
}
