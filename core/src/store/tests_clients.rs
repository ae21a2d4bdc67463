//! Registered clients and `use_sessions` channels.

use super::tests::{msg, popts, store_with_workers};
use super::*;

const T0: u64 = 1_700_000_000_000;

#[test]
fn clients_register_renew_expire_and_go() {
    let (mut s, _) = store_with_workers(1);
    assert_eq!(s.register_client(b"c1", T0, 1_000), Ok(true));
    assert_eq!(s.register_client(b"c1", T0 + 100, 1_000), Ok(false));
    assert_eq!(s.client_alive(b"c1", T0 + 600, false), Some(500));
    // A listen renews it.
    assert_eq!(s.client_alive(b"c1", T0 + 1_000, true), Some(1_000));
    assert_eq!(s.client_alive(b"c1", T0 + 1_999, false), Some(1));
    assert_eq!(s.client_alive(b"c1", T0 + 2_000, false), None, "expired");
    assert_eq!(s.client_alive(b"nobody", T0, false), None);
    // Garbage collection removes it at its deadline, with nothing else touching it.
    assert_eq!(s.channel_count(), 1);
    s.collect_garbage(T0 + 1_999);
    assert_eq!(s.channel_count(), 1);
    s.collect_garbage(T0 + 2_000);
    assert_eq!(s.channel_count(), 0, "an expired client is reclaimed");
    assert_eq!((s.stats.clients, s.stats.channels_created, s.stats.channels_removed), (0, 0, 0));
    s.check();
    assert_eq!(s.register_client(b"c2", T0, 60_000), Ok(true));
    assert!(s.unregister_client(b"c2"));
    assert!(!s.unregister_client(b"c2"));
    assert_eq!(s.client_alive(b"c2", T0, false), None);
    s.check();
}

#[test]
fn a_client_is_not_a_channel_and_sessions_are_a_channel_attribute() {
    let (mut s, _) = store_with_workers(1);
    s.register_client(b"x", T0, 60_000).unwrap();
    // A channel named like the client is another entry.
    s.publish_msg(b"x", &msg(b"m"), &popts(5), T0, &mut vec![]).unwrap();
    assert!(!s.unregister_client(b"\x01x"));
    assert_eq!(s.channel_count(), 2);
    // The stats count one channel and one client; a listing shows only the channel.
    let snap = s.stats_snapshot(T0, &|_| true);
    assert_eq!((snap.channels, s.stats.clients, s.stats.channels_created), (1, 1, 1));
    assert!(!s.needs_session(b"x"));
    let on = AttrUpdate { use_sessions: Some(true), ..AttrUpdate::default() };
    s.publish(b"x", None, &on, &popts(5), T0, &mut vec![]).unwrap();
    assert!(s.needs_session(b"x"));
    let off = AttrUpdate { use_sessions: Some(false), ..AttrUpdate::default() };
    s.publish(b"x", None, &off, &popts(5), T0, &mut vec![]).unwrap();
    assert!(!s.needs_session(b"x"));
    assert!(!s.needs_session(b"missing"));
    s.check();
}
