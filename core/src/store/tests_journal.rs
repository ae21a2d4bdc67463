//! The journal: what publishes, attributes, deletes and one-to-one deliveries append, and a
//! store rebuilt from it (restore) or from a compacted dump holding the same channels.

use super::tests::{lopts, msg, popts, store_with_workers};
use super::*;
use crate::msgid::Since;
use crate::persist::{encode, Reader, Record, VERSION};
use std::vec::Vec;

const T0: u64 = 1_700_000_000_000;

/// Channel name -> (ids, bodies) of what a store keeps.
type Contents = Vec<(Vec<u8>, Vec<(u64, Vec<u8>)>)>;

fn contents<A: Allocator + Clone>(s: &Store<A>, now: u64) -> Contents {
    let mut out = vec![];
    s.channels.for_each(|ch| {
        let msgs = ch.messages_after(0, now, false).map(|m| (m.id, m.body().to_vec())).collect();
        out.push((ch.name.to_vec(), msgs));
    });
    out.sort();
    out
}

fn file_of<A: Allocator + Clone>(s: &Store<A>) -> Vec<u8> {
    let mut file = vec![];
    encode(&Record::Header { version: VERSION, salt: 5, last_id: 0 }, &mut file);
    file.extend_from_slice(s.journal_pending().expect("journal on").0);
    file
}

fn restored(file: &[u8], now: u64) -> Store<allocator_api2::alloc::Global> {
    let mut s = Store::new_in(allocator_api2::alloc::Global);
    for rec in Reader::new(file) {
        s.restore(&rec, now).unwrap();
    }
    s
}

#[test]
fn a_store_is_rebuilt_from_its_journal_and_from_a_dump() {
    let (mut s, slots) = store_with_workers(1);
    s.enable_journal(1 << 20).unwrap();
    let mut wake = vec![];
    for i in 0..5u8 {
        s.publish_msg(b"a", &msg(&[b'a', i]), &popts(3), T0 + u64::from(i), &mut wake).unwrap();
    }
    let keyed = AttrUpdate { key: Some([7; 32]), size: Some(2), ..Default::default() };
    s.publish(b"k", Some(&msg(b"k1")), &keyed, &popts(5), T0, &mut wake).unwrap();
    s.publish(b"k", Some(&msg(b"k2")), &keyed, &popts(5), T0, &mut wake).unwrap();
    s.publish(b"k", Some(&msg(b"k3")), &keyed, &popts(5), T0, &mut wake).unwrap();
    s.publish_msg(b"gone", &msg(b"x"), &popts(3), T0, &mut wake).unwrap();
    s.delete(b"gone", None, T0, &mut wake).unwrap();
    let one = AttrUpdate { one2one: Some(true), ..Default::default() };
    s.publish(b"o", Some(&msg(b"o1")), &one, &popts(5), T0, &mut wake).unwrap();
    s.publish(b"o", Some(&msg(b"o2")), &one, &popts(5), T0, &mut wake).unwrap();
    // A one-to-one delivery consumes its message.
    let id = match s.listen(b"o", Since::Oldest, &lopts(slots[0]), T0, &mut wake).unwrap() {
        Listen::Message(m) => m.id,
        Listen::Park(_) => panic!("a message"),
    };
    s.consume(b"o", id - 1, id);
    let file = file_of(&s);
    let r = restored(&file, T0 + 10);
    assert_eq!(contents(&r, T0 + 10), contents(&s, T0 + 10));
    assert_eq!(r.last_id(), s.last_id());
    assert!(r.admits(b"k", Some(&[7; 32])) && !r.admits(b"k", None), "the key came back");
    // A dump of it restores the same again (what a compaction writes).
    let mut dump = vec![];
    r.dump(5, T0 + 10, &mut dump);
    assert!(dump.len() < file.len(), "compacted");
    let r2 = restored(&dump, T0 + 10);
    assert_eq!(contents(&r2, T0 + 10), contents(&s, T0 + 10));
    assert_eq!(r2.last_id(), s.last_id());
    // Written, the journal empties; messages expired by restore time stay out.
    let n = s.journal_pending().unwrap().0.len();
    assert!(s.journal_written(n, true).is_empty());
    assert_eq!(s.journal_pending().unwrap().0.len(), 0);
    r.check();
    r2.check();
}

#[test]
fn a_full_journal_refuses_publishes_and_a_failing_disk_too() {
    let (mut s, _) = store_with_workers(1);
    s.enable_journal(300).unwrap();
    let mut wake = vec![];
    s.publish_msg(b"a", &msg(b"small"), &popts(3), T0, &mut wake).unwrap();
    let big = vec![b'x'; 400];
    assert_eq!(
        s.publish_msg(b"a", &msg(&big), &popts(3), T0, &mut wake).err(),
        Some(StoreError::Behind)
    );
    let n = s.journal_pending().unwrap().0.len();
    s.journal_failed();
    assert_eq!(
        s.publish_msg(b"a", &msg(b"y"), &popts(3), T0, &mut wake).err(),
        Some(StoreError::DiskFailing)
    );
    s.journal_written(n, true);
    s.publish_msg(b"a", &msg(b"z"), &popts(3), T0, &mut wake).unwrap();
    s.check();
}

#[test]
fn remote_messages_come_in_order_and_wake_the_listeners() {
    let (mut s, slots) = store_with_workers(2);
    let mut wake = vec![];
    let parked = s.listen(b"r", Since::After(u64::MAX), &lopts(slots[1]), T0, &mut wake);
    assert!(matches!(parked, Ok(Listen::Park(_))));
    let m = |id, body: &'static [u8]| crate::persist::SavedMessage {
        channel: b"r",
        channel_timeout_ms: 300_000,
        id,
        time: T0 / 1000,
        expires_ms: u64::MAX,
        keep: 10,
        content_type: b"text/plain",
        event: b"",
        body,
    };
    assert_eq!(s.insert_remote(&m(T0 * 1000 + 5, b"one"), T0, &mut wake), Ok(true));
    assert_eq!(wake.len(), 1, "the listener's worker is woken");
    assert_eq!(wake[0].slot, slots[1]);
    // A repeat (the same id, or an older one) changes nothing.
    assert_eq!(s.insert_remote(&m(T0 * 1000 + 5, b"one"), T0, &mut wake), Ok(false));
    assert_eq!(s.insert_remote(&m(T0 * 1000 + 1, b"old"), T0, &mut wake), Ok(false));
    assert_eq!(s.insert_remote(&m(T0 * 1000 + 9, b"two"), T0, &mut wake), Ok(true));
    assert_eq!(s.last_id(), T0 * 1000 + 9);
    let got: Vec<_> = contents(&s, T0).into_iter().flat_map(|c| c.1).map(|m| m.1).collect();
    assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
    s.check();
}

#[test]
fn with_the_outbox_on_an_id_not_stored_yet_waits_for_what_follows_it() {
    let (mut s, slots) = store_with_workers(1);
    s.enable_outbox(1 << 16).unwrap();
    let mut wake = vec![];
    let m = |id, body: &'static [u8]| crate::persist::SavedMessage {
        channel: b"c",
        channel_timeout_ms: 300_000,
        id,
        time: T0 / 1000,
        expires_ms: u64::MAX,
        keep: 10,
        content_type: b"",
        event: b"",
        body,
    };
    s.insert_remote(&m(T0 * 1000, b"one"), T0, &mut wake).unwrap();
    // A listener that got id T0*1000+7 from another node, before this zone has it.
    let since = Since::After(T0 * 1000 + 7);
    let r = s.listen(b"c", since, &lopts(slots[0]), T0, &mut wake).unwrap();
    assert!(matches!(r, Listen::Park(p) if p.since == T0 * 1000 + 7), "not answered with \"one\"");
    // A made-up id far in the future still counts as the zone's last one.
    let r = s.listen(b"c", Since::After(u64::MAX / 2), &lopts(slots[0]), T0, &mut wake).unwrap();
    assert!(matches!(r, Listen::Park(p) if p.since == T0 * 1000));
    s.check();
}

#[test]
fn the_outbox_asks_for_one_wake_up_per_burst() {
    let (mut s, _) = store_with_workers(2);
    s.enable_outbox(1 << 16).unwrap();
    s.outbox_set_down(false);
    s.outbox_push(0, b"a", b"r1").unwrap();
    assert!(s.outbox_signal());
    s.outbox_push(1, b"a", b"r2").unwrap();
    assert!(!s.outbox_signal(), "one wake-up is on its way");
    assert_eq!(s.outbox_take().len(), 2);
    s.outbox_push(0, b"a", b"r3").unwrap();
    assert!(s.outbox_signal(), "taken: the next publish wakes the thread again");
    s.outbox_unsignal();
    assert!(s.outbox_signal(), "a wake-up nobody received is sent again");
}
