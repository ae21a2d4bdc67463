//! Store operations of martd's own API: listening on several channels at once, one-to-one
//! delivery (consumed messages, the election that keeps one listener), beside the relay
//! operations in `mod.rs`.

use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;

use super::{Channel, Concurrency, Listen, ListenOpts, Parked, Store, StoreError, WakeTarget};
use crate::msgid::{MsgId, Since};
use crate::queue::Message;

/// What a listen request on several channels gets.
pub enum MultiListen<'a, A: Allocator + Clone> {
    /// Some channels have messages newer than asked: each with the id to send messages after
    /// and its index in the request. Nothing was counted.
    Messages(Vec<(usize, &'a Channel<A>, MsgId)>),
    /// Nothing newer anywhere: the listener is counted on every channel, in request order.
    Park(Vec<Parked>),
}

/// What an interval-poll of several channels finds (see [`Store::peek_multi`]).
pub type MultiPeek<'a, A> = Vec<(usize, &'a Channel<A>, MsgId)>;

/// Where one channel of a multi-channel request resumes: martd's JSON API gives each channel
/// its etag (`0`: everything stored), a list of `martd_channel_id_delimiter` gives all its
/// channels the request's ids (a [`Since`]: message ids are unique in the whole zone).
pub trait Resume: Copy {
    fn since(self) -> Since;
}

impl Resume for MsgId {
    fn since(self) -> Since {
        if self == 0 {
            Since::Oldest
        } else {
            Since::After(self)
        }
    }
}

impl Resume for Since {
    fn since(self) -> Since {
        self
    }
}

/// The oldest message of `found` (what [`Store::listen_multi`] or [`Store::peek_multi`]
/// found), with its index in the request: what a long-poll or interval-poll of a channel list
/// gets, one message at a time in id order across its channels.
pub fn oldest<'a, A: Allocator + Clone>(
    found: &[(usize, &'a Channel<A>, MsgId)],
    now_ms: u64,
) -> Option<(usize, &'a Message<A>)> {
    found
        .iter()
        .filter_map(|&(i, ch, since)| Some((i, ch.queue.next_after(since, now_ms, false)?)))
        .min_by_key(|(_, m)| m.id)
}

impl<A: Allocator + Clone> Store<A> {
    /// A listen request on several channels (`(name, where it resumes)`): every channel's newer
    /// messages at once if any has some, else the listener parks on all of them. Either every
    /// channel counts it or none does.
    pub fn listen_multi<S: Resume>(
        &mut self,
        channels: &[(&[u8], S)],
        opts: &ListenOpts,
        now_ms: u64,
        wake: &mut Vec<WakeTarget>,
    ) -> Result<MultiListen<'_, A>, StoreError> {
        let clamp = self.future_clamp(now_ms);
        let mut found: Vec<(usize, NonNull<Channel<A>>, MsgId)> = Vec::new();
        let mut existing: Vec<Option<NonNull<Channel<A>>>> = Vec::with_capacity(channels.len());
        for (i, &(name, resume)) in channels.iter().enumerate() {
            let p = self.channels.find(name);
            existing.push(p);
            let Some(mut p) = p else {
                continue;
            };
            // SAFETY: a live channel of the table; the reference ends in this iteration.
            let ch = unsafe { p.as_mut() };
            let since = ch.since_id(resume.since(), clamp, now_ms);
            if ch.has_stored_after(since, now_ms) {
                ch.last_requested_ms = now_ms.max(1);
                ch.last_active_ms = now_ms;
                found.push((i, p, since));
            }
        }
        if !found.is_empty() {
            // SAFETY: live channels of the table, borrowed for as long as the store is.
            let found = found.into_iter().map(|(i, p, s)| (i, unsafe { p.as_ref() }, s));
            return Ok(MultiListen::Messages(found.collect()));
        }
        match self.park_all(channels, &existing, opts, now_ms, wake) {
            Err(StoreError::NoMemory) => {
                // A channel could not be made: the careful way, which may collect garbage
                // (and so must look every channel up again).
                self.park_each(channels, opts, now_ms, wake).map(MultiListen::Park)
            }
            r => r.map(MultiListen::Park),
        }
    }

    /// Parks a multi-channel listener on every channel, reusing the channels found by the
    /// caller in this hold of the lock (`existing`, in request order) and making the missing
    /// ones. On an error nothing stays counted; on `NoMemory` no garbage was collected.
    fn park_all<S: Resume>(
        &mut self,
        channels: &[(&[u8], S)],
        existing: &[Option<NonNull<Channel<A>>>],
        opts: &ListenOpts,
        now_ms: u64,
        wake: &mut Vec<WakeTarget>,
    ) -> Result<Vec<Parked>, StoreError> {
        self.wheel.observe(now_ms);
        let clamp = self.future_clamp(now_ms);
        let counted = self.is_registered(opts.slot);
        let mut parked: Vec<Parked> = Vec::with_capacity(channels.len());
        for (&(name, resume), &found) in channels.iter().zip(existing) {
            let made = match found {
                Some(p) => {
                    self.purge_dead(p);
                    Ok((p, false))
                }
                None if opts.create => self
                    .get_or_create(name, now_ms, opts.channel_timeout_ms)
                    .map_err(StoreError::from),
                None => Err(StoreError::NotFound),
            };
            let since = resume.since();
            let r = made.and_then(|(mut p, created)| {
                // SAFETY: a live channel of the table (channels never move, and nothing in
                // this call removes one); the reference ends with `listen_on`.
                let ch = unsafe { p.as_mut() };
                match self.listen_on(ch, since, opts, now_ms, clamp, counted) {
                    Ok(Ok((one, joined))) => {
                        if joined {
                            self.slot_joined(opts.slot);
                        }
                        if counted {
                            let n = ch.listeners;
                            self.note_event(super::ChannelEvent::ListenerJoined, name, n);
                        }
                        self.rearm(p);
                        if opts.concurrency == Concurrency::Last {
                            self.notify_waiters(p, wake);
                        }
                        Ok(one)
                    }
                    // Nothing newer was stored: not possible in this hold of the lock.
                    Ok(Err(_)) => {
                        self.rearm(p);
                        Err(StoreError::NotFound)
                    }
                    Err(e) if created => {
                        // A refused listen leaves nothing behind.
                        self.remove_channel(p);
                        Err(e)
                    }
                    Err(e) => {
                        self.rearm(p);
                        Err(e)
                    }
                }
            });
            match r {
                Ok(one) => parked.push(one),
                Err(e) => {
                    self.unpark(channels, &parked, opts.slot);
                    return Err(e);
                }
            }
        }
        Ok(parked)
    }

    /// Parks a multi-channel listener channel by channel, each a whole [`Store::listen`].
    fn park_each<S: Resume>(
        &mut self,
        channels: &[(&[u8], S)],
        opts: &ListenOpts,
        now_ms: u64,
        wake: &mut Vec<WakeTarget>,
    ) -> Result<Vec<Parked>, StoreError> {
        let mut parked: Vec<Parked> = Vec::with_capacity(channels.len());
        for &(name, resume) in channels {
            match self.listen(name, resume.since(), opts, now_ms, wake) {
                Ok(Listen::Park(p)) => parked.push(p),
                Ok(Listen::Message(_)) => {
                    self.unpark(channels, &parked, opts.slot);
                    return Err(StoreError::NotFound);
                }
                Err(e) => {
                    self.unpark(channels, &parked, opts.slot);
                    return Err(e);
                }
            }
        }
        Ok(parked)
    }

    /// Takes back the parks of a multi-channel listen that failed part way.
    fn unpark<S>(&mut self, channels: &[(&[u8], S)], parked: &[Parked], slot: u32) {
        for (&(name, _), p) in channels.iter().zip(parked) {
            self.release(name, p.serial, slot, 1, None);
        }
    }

    /// An interval-poll of channel `name`: the message a listener waiting past `since` gets
    /// now, without waiting or being counted (`None`: nothing newer, or no such channel).
    pub fn peek(&self, name: &[u8], since: Since, now_ms: u64) -> Option<&Message<A>> {
        // SAFETY: a live channel of the table, borrowed for as long as the store is.
        let ch = unsafe { self.channels.find(name)?.as_ref() };
        let since_id = ch.since_id(since, self.future_clamp(now_ms), now_ms);
        ch.queue.next_after(since_id, now_ms, false)
    }

    /// An interval-poll of several channels (`(name, where it resumes)`): each channel with
    /// messages newer than asked, with its index in the request and the id to send messages
    /// after.
    pub fn peek_multi<S: Resume>(&self, channels: &[(&[u8], S)], now_ms: u64) -> MultiPeek<'_, A> {
        let mut found = Vec::new();
        for (i, &(name, resume)) in channels.iter().enumerate() {
            // SAFETY: a live channel of the table, borrowed for as long as the store is.
            let Some(ch) = self.channels.find(name).map(|p| unsafe { p.as_ref() }) else {
                continue;
            };
            let since = ch.since_id(resume.since(), self.future_clamp(now_ms), now_ms);
            if ch.has_stored_after(since, now_ms) {
                found.push((i, ch, since));
            }
        }
        found
    }

    /// Messages with ids in `(after, upto]` were delivered on channel `name`: a one-to-one
    /// channel drops them (martd's consumed messages); any other keeps them.
    pub fn consume(&mut self, name: &[u8], after: MsgId, upto: MsgId) {
        let Some(mut p) = self.channels.find(name) else {
            return;
        };
        // SAFETY: a live channel of the table; the reference ends before `rearm`.
        let ch = unsafe { p.as_mut() };
        let before = ch.queue.stored_len();
        if ch.one2one() && ch.queue.consume(after, upto) > 0 {
            self.recount(before, ch.queue.stored_len());
            self.rearm(p);
            let rec = crate::persist::Record::Consume { channel: name, after, upto };
            self.journal_append(&rec);
        }
    }

    /// A worker with listeners in the one-to-one election of channel incarnation `serial`
    /// reports its longest-waiting one (`local_min`, its parking sequence number). The
    /// smallest number reported wins: listeners of the election with a larger one are
    /// displaced. When a report beats an earlier one, the workers are woken again so that the
    /// earlier winner's worker displaces it.
    pub fn elect(&mut self, name: &[u8], serial: u64, local_min: u64, wake: &mut Vec<WakeTarget>) {
        let Some(mut p) = self.live_channel(name, serial) else {
            return;
        };
        // SAFETY: a live channel of the table; the reference ends before `notify_waiters`.
        let Some(a) = (unsafe { p.as_mut() }).attrs.as_deref_mut() else {
            return;
        };
        if a.elect_cut == 0 || local_min > a.elect_cut || local_min >= a.elect_best {
            return;
        }
        let beaten = a.elect_best != u64::MAX;
        a.elect_best = local_min;
        if beaten {
            self.notify_waiters(p, wake);
        }
    }
}
