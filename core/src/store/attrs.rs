//! Channel attributes a publisher sets (martd's API): how many messages the channel keeps,
//! how long they live, one-to-one delivery, and a key that guards later pushes and deletes.
//! They are channel state: they stay until changed or the channel goes. Kept in an allocation
//! of their own, made only for channels that have any, so plain channels stay small.

use crate::key::{same_key, KeyHash};

/// What one push asks to change (`None`: leave as is).
#[derive(Debug, Default, Clone, Copy)]
pub struct AttrUpdate {
    /// Messages kept (already checked against the location's upper bound).
    pub size: Option<u32>,
    /// Message life in ms (already checked against the location's upper bound); `0` = never.
    pub life_ms: Option<u64>,
    pub one2one: Option<bool>,
    /// The key the push carries (hashed).
    pub key: Option<KeyHash>,
    /// Only registered clients may listen (`use_sessions`).
    pub use_sessions: Option<bool>,
}

impl AttrUpdate {
    /// Whether the push names any attribute (a key counts).
    pub fn any(&self) -> bool {
        self.size.is_some()
            || self.life_ms.is_some()
            || self.one2one.is_some()
            || self.key.is_some()
            || self.use_sessions.is_some()
    }
}

/// A channel's attributes in the zone.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ChannelAttrs {
    pub(super) size: Option<u32>,
    pub(super) life_ms: Option<u64>,
    pub(super) one2one: bool,
    pub(super) key: Option<KeyHash>,
    /// One-to-one switched on while listeners waited: those that parked up to this sequence
    /// number (`0`: none) take part in an election that keeps the longest-waiting one.
    pub(super) elect_cut: u64,
    /// The smallest parking sequence number reported so far by the workers in that election.
    pub(super) elect_best: u64,
    /// Only registered clients may listen.
    pub(super) use_sessions: bool,
    /// Not a channel: a registered client (see `super::clients`).
    pub(super) client: bool,
}

impl ChannelAttrs {
    /// Whether a push or delete carrying `key` may change the channel.
    pub(super) fn admits(&self, key: Option<&KeyHash>) -> bool {
        match (&self.key, key) {
            (None, _) => true,
            (Some(k), Some(given)) => same_key(k, given),
            (Some(_), None) => false,
        }
    }

    /// Whether a listener that parked with sequence number `seq` lost the election.
    pub(super) fn evicts(&self, seq: u64) -> bool {
        self.elect_cut > 0 && seq <= self.elect_cut && seq > self.elect_best
    }
}
