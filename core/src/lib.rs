//! martd's core: everything that does not need nginx.
//!
//! * [`store`]: the channel store that lives in the shared zone (channels, message queues,
//!   listener counts, worker mailboxes), generic over its allocator so it runs on the nginx slab
//!   pool in production and on the global allocator in tests.
//! * [`msgid`]: message ids and the parsing of the ids a listener sends back.
//! * [`listeners`]: one worker's parked listeners and its copies of messages, driven by the
//!   store.
//! * [`info`]: the channel info bodies (plain text and JSON).
//! * [`json`]: martd's JSON bodies (multi-channel replies, errors); [`key`]: channel keys.
//! * [`api`]: parsing martd's API requests (attribute values, multi-channel listens).
//! * [`redis`]: key names and announcements of the Redis mode.
//! * [`stats`]: the stats counters and their JSON, text and Prometheus forms.
//!
//! Nothing here locks: the caller holds the zone's mutex around every call that takes the store.

pub mod api;
pub mod cors;
pub mod info;
pub mod json;
pub mod key;
pub mod listeners;
pub mod msgid;
pub mod persist;
pub mod queue;
pub mod redis;
pub mod stats;
pub mod store;
pub mod transport;

pub use allocator_api2;
pub use allocator_api2::alloc::{AllocError, Allocator, Global};
