//! Channel tokens: registration, expiry, the per-token listener cap across slots, and charges
//! forgotten with the slot's last listener (answered, or purged after a crash).

use super::tests::{lopts, popts, store_with_workers};
use super::*;
use crate::key::hash_key;
use crate::msgid::Since;

const T0: u64 = 1_700_000_000_000;

fn park<A: Allocator + Clone>(s: &mut Store<A>, name: &[u8], slot: u32) -> Parked {
    match s.listen(name, Since::After(u64::MAX), &lopts(slot), T0, &mut vec![]) {
        Ok(Listen::Park(p)) => p,
        other => panic!("expected to park: {:?}", other.err()),
    }
}

#[test]
fn tokens_register_renew_and_expire() {
    let (mut s, _) = store_with_workers(1);
    let (a, b) = (hash_key(1, b"alpha"), hash_key(1, b"beta"));
    s.add_token(b"t", &a, 1_000, T0, &popts(5)).unwrap();
    s.add_token(b"t", &b, 0, T0, &popts(5)).unwrap();
    assert!(s.token_valid(b"t", &a, T0 + 999));
    assert!(!s.token_valid(b"t", &a, T0 + 1_000), "expired");
    assert!(s.token_valid(b"t", &b, T0 + 10_000_000), "no ttl: as long as the channel");
    assert!(!s.token_valid(b"t", &hash_key(1, b"gamma"), T0));
    assert!(!s.token_valid(b"other", &a, T0));
    // Renewed.
    s.add_token(b"t", &a, 1_000, T0 + 900, &popts(5)).unwrap();
    assert!(s.token_valid(b"t", &a, T0 + 1_500));
    // A channel made for tokens only waits its channel timeout, not the listeners' grace.
    s.collect_garbage(T0 + 60_000);
    assert!(s.token_valid(b"t", &b, T0 + 60_000));
    s.check();
}

#[test]
fn a_channel_keeps_at_most_max_tokens() {
    let (mut s, _) = store_with_workers(1);
    for i in 0..tokens::MAX_TOKENS {
        s.add_token(b"m", &hash_key(1, format!("k{i}").as_bytes()), 0, T0, &popts(5)).unwrap();
    }
    let more = s.add_token(b"m", &hash_key(1, b"one more"), 0, T0, &popts(5));
    assert_eq!(more, Err(StoreError::TooManyTokens));
    // Expired ones make room.
    let (mut s, _) = store_with_workers(1);
    for i in 0..tokens::MAX_TOKENS {
        s.add_token(b"m", &hash_key(1, format!("k{i}").as_bytes()), 10, T0, &popts(5)).unwrap();
    }
    s.add_token(b"m", &hash_key(1, b"one more"), 0, T0 + 10, &popts(5)).unwrap();
    s.check();
}

#[test]
fn the_cap_counts_listeners_across_slots_and_forgets_a_slot_that_left() {
    let (mut s, _) = store_with_workers(2);
    let k = hash_key(1, b"key");
    s.add_token(b"c", &k, 0, T0, &popts(5)).unwrap();
    let p0 = park(&mut s, b"c", 0);
    s.charge_token(b"c", &k, 0, 2, T0).unwrap();
    let p1 = park(&mut s, b"c", 1);
    s.charge_token(b"c", &k, 1, 2, T0).unwrap();
    // A third listener (any slot) is over the cap; another token is refused outright.
    assert_eq!(s.charge_token(b"c", &k, 1, 2, T0), Err(StoreError::TooManyTokenListeners));
    let wrong = hash_key(1, b"wrong");
    assert_eq!(s.charge_token(b"c", &wrong, 1, 0, T0), Err(StoreError::Forbidden));
    // One leaves: there is room again.
    s.discharge_token(b"c", p0.serial, &k, 0);
    s.release(b"c", p0.serial, 0, 1, None);
    assert_eq!(s.charge_token(b"c", &k, 1, 2, T0), Ok(p1.serial));
    assert_eq!(s.token_listeners(b"c", &k), 2);
    // Slot 1's last listener goes (answered, or its worker purged after a crash): its
    // charges go with it.
    s.release(b"c", p1.serial, 1, u32::MAX, None);
    park(&mut s, b"c", 0);
    s.charge_token(b"c", &k, 0, 1, T0).unwrap();
    s.check();
}
