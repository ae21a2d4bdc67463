//! What martd's Redis mode writes and reads, without a connection: key names, the
//! announcements nodes publish to each other, and `CLUSTER NODES` replies.
//!
//! Keys of namespace `NS` and channel `CH` share the hash tag `{CH}`, so a Redis Cluster keeps
//! each channel's keys on one master: `NS:{CH}:s` (the stream of its messages) and `NS:{CH}:l`
//! (its last id).

pub fn stream_key(ns: &[u8], ch: &[u8]) -> Vec<u8> {
    [ns, b":{", ch, b"}:s"].concat()
}

pub fn last_key(ns: &[u8], ch: &[u8]) -> Vec<u8> {
    [ns, b":{", ch, b"}:l"].concat()
}

/// The channel's attributes (an attributes record, see [`crate::persist`]).
pub fn attrs_key(ns: &[u8], ch: &[u8]) -> Vec<u8> {
    [ns, b":{", ch, b"}:a"].concat()
}

/// The channel an attributes key names.
pub fn channel_of_attrs(ns: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.strip_prefix(ns)?.strip_prefix(b":{")?;
    Some(rest.strip_suffix(b"}:a")?.to_vec())
}

/// The channel a stream key names.
pub fn channel_of(ns: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.strip_prefix(ns)?.strip_prefix(b":{")?;
    Some(rest.strip_suffix(b"}:s")?.to_vec())
}

/// What a node announces of each message it publishes.
#[derive(Debug, PartialEq, Eq)]
pub struct Announcement<'a> {
    /// The publishing node's session.
    pub origin: u64,
    /// The id the message follows in its channel, and its own.
    pub prev: u64,
    pub id: u64,
    pub channel: &'a [u8],
    /// The message record, when it is small enough to travel in the announcement; the
    /// attributes record of [`Kind::Attrs`].
    pub record: Option<&'a [u8]>,
    pub kind: Kind,
}

/// What an announcement is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    /// The channel was deleted (`prev` and `id` are `0`, no record).
    Delete,
    /// The channel's attributes changed (`prev` and `id` are `0`; the record is its whole
    /// attributes).
    Attrs,
}

/// `<origin> <prev> <id> <len> <channel>[ <record>]`, `<origin> delete <len> <channel>`, or
/// `<origin> attrs <len> <channel> <record>`.
pub fn parse_announcement(payload: &[u8]) -> Option<Announcement<'_>> {
    let mut rest = payload;
    let mut word = || {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let w = &rest[..sp];
        rest = &rest[sp + 1..];
        Some(w)
    };
    let num = |w: &[u8]| std::str::from_utf8(w).ok()?.parse::<u64>().ok();
    let origin = num(word()?)?;
    let second = word()?;
    let kind = match second {
        b"delete" => Kind::Delete,
        b"attrs" => Kind::Attrs,
        _ => Kind::Message,
    };
    let (prev, id) = match kind {
        Kind::Message => (num(second)?, num(word()?)?),
        _ => (0, 0),
    };
    let len = num(word()?)? as usize;
    let channel = rest.get(..len)?;
    let record = rest.get(len..).and_then(|r| r.strip_prefix(b" "));
    match (kind, record) {
        (Kind::Delete, Some(_)) | (Kind::Attrs, None) => return None,
        _ => {}
    }
    Some(Announcement { origin, prev, id, channel, record, kind })
}

/// The `host:port` of each master that is not failing, from `CLUSTER NODES`'s text.
pub fn masters(nodes: &str) -> Vec<&str> {
    nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let (address, flags) = (f.get(1)?, f.get(2)?);
            let master = flags.split(',').any(|x| x == "master");
            let failing = flags.split(',').any(|x| x == "fail" || x == "fail?");
            let address = address.split(['@', ',']).next()?;
            (master && !failing && !address.starts_with(':')).then_some(address)
        })
        .collect()
}

/// `seed` with its `host:port` replaced by `address` (scheme, credentials and db kept).
pub fn with_address(seed: &str, address: &str) -> String {
    let (scheme, rest) = seed.split_once("://").unwrap_or(("redis", seed));
    let (auth, hostpath) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
    format!("{scheme}://{auth}{address}{path}")
}

/// The salt of key and token hashes shared by every node of namespace `ns` (each zone draws
/// its own otherwise, and a key set through one node must verify on all).
pub fn shared_salt(ns: &[u8]) -> u64 {
    // FNV-1a: stable across builds and machines.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in b"martd-redis-salt:".iter().chain(ns) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_their_channel() {
        assert_eq!(stream_key(b"ns", b"a:b"), b"ns:{a:b}:s");
        assert_eq!(last_key(b"ns", b"c"), b"ns:{c}:l");
        assert_eq!(channel_of(b"ns", b"ns:{a:b}:s"), Some(b"a:b".to_vec()));
        assert_eq!(channel_of(b"ns", b"nx:{a}:s"), None);
        assert_eq!(attrs_key(b"ns", b"c"), b"ns:{c}:a");
        assert_eq!(channel_of_attrs(b"ns", b"ns:{c}:a"), Some(b"c".to_vec()));
        assert_eq!(channel_of_attrs(b"ns", b"ns:{c}:s"), None);
    }

    #[test]
    fn announcements_parse() {
        let a = |origin, prev, id, channel, record| Announcement {
            origin,
            prev,
            id,
            channel,
            record,
            kind: Kind::Message,
        };
        let p = parse_announcement;
        assert_eq!(p(b"7 0 5 2 a  b"), Some(a(7, 0, 5, &b"a "[..], Some(&b"b"[..]))));
        assert_eq!(p(b"7 0 5 3 a b"), Some(a(7, 0, 5, &b"a b"[..], None)));
        assert_eq!(p(b"1 3 5 1 c"), Some(a(1, 3, 5, &b"c"[..], None)));
        assert_eq!(p(b"1 x 5 1 c"), None);
        assert_eq!(p(b"1 1 5 9 c"), None);
        assert_eq!(p(b"1 1 5"), None);
        let d = p(b"4 delete 3 a b").expect("a delete");
        assert_eq!(d.kind, Kind::Delete);
        assert_eq!((d.origin, d.channel, d.record), (4, &b"a b"[..], None));
        assert_eq!(p(b"4 delete 1 a b"), None);
        let t = p(b"4 attrs 1 a r").expect("attributes");
        assert_eq!((t.kind, t.channel, t.record), (Kind::Attrs, &b"a"[..], Some(&b"r"[..])));
        assert_eq!(p(b"4 attrs 1 a"), None, "attributes without their record");
    }

    #[test]
    fn masters_of_cluster_nodes() {
        let text = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b 127.0.0.1:7001@17001,host master - 0 0 2 connected 5461-10922\n\
                    c 127.0.0.1:7002@17002 master,fail - 0 0 3 disconnected\n\
                    d 127.0.0.1:7003@17003 slave a 0 0 1 connected\n";
        assert_eq!(masters(text), vec!["127.0.0.1:7000", "127.0.0.1:7001"]);
    }

    #[test]
    fn the_shared_salt_depends_on_the_namespace_only() {
        assert_eq!(shared_salt(b"chat"), shared_salt(b"chat"));
        assert_ne!(shared_salt(b"chat"), shared_salt(b"chat2"));
    }

    #[test]
    fn address_replaced_keeping_credentials() {
        let u = with_address("redis://u:p@h:1/2", "127.0.0.1:7001");
        assert_eq!(u, "redis://u:p@127.0.0.1:7001/2");
        assert_eq!(with_address("redis://h:1", "x:2"), "redis://x:2");
    }
}
