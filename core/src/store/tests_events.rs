//! Channel events: noted in the order things happen, published in that order into the
//! events channel, none about the events channel itself or registered clients.

use super::tests::{lopts, msg, popts, store_with_workers};
use super::*;
use crate::msgid::Since;

const T0: u64 = 1_700_000_000_000;

/// The events channel's messages after `since`, as (event name, JSON body).
fn events<A: Allocator + Clone>(s: &Store<A>, since: MsgId) -> std::vec::Vec<(String, String)> {
    let Some(ch) = s.channels.find(b"ev") else { return vec![] };
    // SAFETY: a live channel of the table, only read here.
    let ch = unsafe { ch.as_ref() };
    ch.messages_after(since, T0, false)
        .map(|m| {
            let e = String::from_utf8_lossy(m.event()).into_owned();
            (e, String::from_utf8_lossy(m.body()).into_owned())
        })
        .collect()
}

#[test]
fn events_are_published_in_order() {
    let (mut s, slots) = store_with_workers(2);
    s.set_events_channel(Some(b"ev")).unwrap();
    let mut wake = vec![];
    s.publish_msg(b"room", &msg(b"hi"), &popts(5), T0, &mut wake).unwrap();
    let p0 = match s.listen(b"room", Since::After(u64::MAX), &lopts(slots[0]), T0, &mut wake) {
        Ok(Listen::Park(p)) => p,
        _ => panic!("parks"),
    };
    let p1 = match s.listen(b"room", Since::After(u64::MAX), &lopts(slots[1]), T0, &mut wake) {
        Ok(Listen::Park(p)) => p,
        _ => panic!("parks"),
    };
    s.release(b"room", p0.serial, slots[0], 1, None);
    // Registered clients make none.
    s.register_client(b"c", T0, 60_000).unwrap();
    assert!(s.has_events());
    // A listener of the events channel makes none either.
    assert_eq!(s.flush_events(T0, &mut wake), 4);
    assert!(!s.has_events());
    let ev_listener = s.listen(b"ev", Since::After(u64::MAX), &lopts(slots[0]), T0, &mut wake);
    assert!(matches!(ev_listener, Ok(Listen::Park(_))));
    s.delete(b"room", None, T0, &mut wake).unwrap();
    assert_eq!(s.flush_events(T0, &mut wake), 1);
    let _ = p1;
    let got = events(&s, 0);
    let want = [
        ("channel_created", r#"{"event":"channel_created","channel":"room","listeners":0}"#),
        ("listener_joined", r#"{"event":"listener_joined","channel":"room","listeners":1}"#),
        ("listener_joined", r#"{"event":"listener_joined","channel":"room","listeners":2}"#),
        ("listener_left", r#"{"event":"listener_left","channel":"room","listeners":1}"#),
        ("channel_deleted", r#"{"event":"channel_deleted","channel":"room","listeners":0}"#),
    ];
    let want: std::vec::Vec<(String, String)> =
        want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(got, want);
    // The listener of the events channel is woken for them.
    assert!(!wake.is_empty());
    s.check();
}

#[test]
fn without_an_events_channel_nothing_is_noted_and_a_crash_is_an_event() {
    let (mut s, slots) = store_with_workers(2);
    let mut wake = vec![];
    s.listen(b"a", Since::After(u64::MAX), &lopts(slots[0]), T0, &mut wake).ok();
    assert!(!s.has_events());
    assert_eq!(s.flush_events(T0, &mut wake), 0);
    s.set_events_channel(Some(b"ev")).unwrap();
    s.listen(b"a", Since::After(u64::MAX), &lopts(slots[1]), T0, &mut wake).ok();
    // Slot 1's worker dies: its listener leaves when the channel is next touched.
    s.unregister_worker(slots[1]);
    s.publish_msg(b"a", &msg(b"m"), &popts(5), T0, &mut wake).unwrap();
    s.flush_events(T0, &mut wake);
    let names: std::vec::Vec<String> = events(&s, 0).into_iter().map(|e| e.1).collect();
    assert_eq!(
        names,
        [
            r#"{"event":"listener_joined","channel":"a","listeners":2}"#,
            r#"{"event":"listener_left","channel":"a","listeners":1}"#,
        ]
    );
    assert_eq!(s.events_lost(), 0);
    s.check();
}
