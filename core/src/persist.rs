//! The on-disk format of `martd_persist`: a file of records, each framed and checksummed:
//!
//! ```text
//! record  = len:u32le crc:u32le payload[len]      crc = CRC-32 (IEEE) of the payload
//! payload = type:u8 fields...
//! ```
//!
//! A file starts with a [`Record::Header`] (magic, format version, the zone's key salt, the
//! last id). Then, in the order they happened: [`Record::Attrs`] (a channel's attributes after
//! a push changed them), [`Record::Message`] (a stored message, with the buffer length it was
//! published under, so replaying evicts what publishing evicted), [`Record::Delete`] and
//! [`Record::Consume`] (one-to-one deliveries). Replaying the records in order rebuilds the
//! channels; a record that is cut short or fails its checksum ends the replay there, and
//! everything before it is kept ([`Reader`]).

use crate::key::KeyHash;
use crate::msgid::MsgId;

/// The first bytes of a header's payload, after its type.
pub const MAGIC: &[u8; 8] = b"martd-j\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// A record's payload may be at most this long (a message body is bounded by the zone).
pub const MAX_RECORD: usize = 1 << 30;

const T_HEADER: u8 = 1;
const T_ATTRS: u8 = 2;
const T_MESSAGE: u8 = 3;
const T_DELETE: u8 = 4;
const T_CONSUME: u8 = 5;

/// A channel's attributes, whole (not an update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SavedAttrs {
    pub size: Option<u32>,
    pub life_ms: Option<u64>,
    pub one2one: bool,
    pub key: Option<KeyHash>,
    pub use_sessions: bool,
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Header { version: u32, salt: u64, last_id: MsgId },
    Attrs { channel: &'a [u8], channel_timeout_ms: u64, attrs: SavedAttrs },
    Message(SavedMessage<'a>),
    Delete { channel: &'a [u8] },
    Consume { channel: &'a [u8], after: MsgId, upto: MsgId },
}

/// A stored message as a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMessage<'a> {
    pub channel: &'a [u8],
    pub channel_timeout_ms: u64,
    pub id: MsgId,
    /// Publish time, seconds since the epoch.
    pub time: u64,
    /// `u64::MAX`: never.
    pub expires_ms: u64,
    /// The channel keeps at most this many messages from this one on.
    pub keep: u32,
    pub content_type: &'a [u8],
    pub event: &'a [u8],
    pub body: &'a [u8],
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

/// The length of `rec` once encoded, framing included (an upper bound is enough to reserve).
pub fn encoded_len(rec: &Record<'_>) -> usize {
    let fields = match rec {
        Record::Header { .. } => 8 + 4 + 8 + 8,
        Record::Attrs { channel, .. } => 4 + channel.len() + 8 + 64,
        Record::Message(m) => {
            4 + m.channel.len()
                + 8 * 4
                + 4
                + 12
                + m.content_type.len()
                + m.event.len()
                + m.body.len()
        }
        Record::Delete { channel } => 4 + channel.len(),
        Record::Consume { channel, .. } => 4 + channel.len() + 16,
    };
    8 + 1 + fields
}

/// Appends `rec`, framed, to `out`.
pub fn encode(rec: &Record<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    match rec {
        Record::Header { version, salt, last_id } => {
            out.push(T_HEADER);
            out.extend_from_slice(MAGIC);
            put_u32(out, *version);
            put_u64(out, *salt);
            put_u64(out, *last_id);
        }
        Record::Attrs { channel, channel_timeout_ms, attrs } => {
            out.push(T_ATTRS);
            put_bytes(out, channel);
            put_u64(out, *channel_timeout_ms);
            let flags = u8::from(attrs.size.is_some())
                | u8::from(attrs.life_ms.is_some()) << 1
                | u8::from(attrs.one2one) << 2
                | u8::from(attrs.key.is_some()) << 3
                | u8::from(attrs.use_sessions) << 4;
            out.push(flags);
            put_u32(out, attrs.size.unwrap_or(0));
            put_u64(out, attrs.life_ms.unwrap_or(0));
            out.extend_from_slice(&attrs.key.unwrap_or([0; 32]));
        }
        Record::Message(m) => {
            out.push(T_MESSAGE);
            put_bytes(out, m.channel);
            put_u64(out, m.channel_timeout_ms);
            put_u64(out, m.id);
            put_u64(out, m.time);
            put_u64(out, m.expires_ms);
            put_u32(out, m.keep);
            put_bytes(out, m.content_type);
            put_bytes(out, m.event);
            put_bytes(out, m.body);
        }
        Record::Delete { channel } => {
            out.push(T_DELETE);
            put_bytes(out, channel);
        }
        Record::Consume { channel, after, upto } => {
            out.push(T_CONSUME);
            put_bytes(out, channel);
            put_u64(out, *after);
            put_u64(out, *upto);
        }
    }
    let payload_len = out.len() - start - 8;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Where and why a file stops being readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: usize,
    pub reason: &'static str,
}

/// Reads the records of a file's bytes, in order, up to the first damage.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    damage: Option<Damage>,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0, damage: None }
    }

    /// Bytes read as whole, valid records so far.
    pub fn valid_len(&self) -> usize {
        self.pos
    }

    /// Why reading stopped before the end, if it did.
    pub fn damage(&self) -> Option<&Damage> {
        self.damage.as_ref()
    }

    fn fail(&mut self, reason: &'static str) -> Option<Record<'a>> {
        self.damage = Some(Damage { offset: self.pos, reason });
        None
    }
}

struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn decode(payload: &[u8]) -> Option<Record<'_>> {
    let mut f = Fields(payload);
    let rec = match f.u8()? {
        T_HEADER => {
            if f.take(8)? != MAGIC {
                return None;
            }
            Record::Header { version: f.u32()?, salt: f.u64()?, last_id: f.u64()? }
        }
        T_ATTRS => {
            let channel = f.bytes()?;
            let channel_timeout_ms = f.u64()?;
            let flags = f.u8()?;
            let size = f.u32()?;
            let life = f.u64()?;
            let key: KeyHash = f.take(32)?.try_into().ok()?;
            let attrs = SavedAttrs {
                size: (flags & 1 != 0).then_some(size),
                life_ms: (flags & 2 != 0).then_some(life),
                one2one: flags & 4 != 0,
                key: (flags & 8 != 0).then_some(key),
                use_sessions: flags & 16 != 0,
            };
            Record::Attrs { channel, channel_timeout_ms, attrs }
        }
        T_MESSAGE => Record::Message(SavedMessage {
            channel: f.bytes()?,
            channel_timeout_ms: f.u64()?,
            id: f.u64()?,
            time: f.u64()?,
            expires_ms: f.u64()?,
            keep: f.u32()?,
            content_type: f.bytes()?,
            event: f.bytes()?,
            body: f.bytes()?,
        }),
        T_DELETE => Record::Delete { channel: f.bytes()? },
        T_CONSUME => Record::Consume { channel: f.bytes()?, after: f.u64()?, upto: f.u64()? },
        _ => return None,
    };
    f.0.is_empty().then_some(rec)
}

/// One framed record on its own (no header needed): a message as it travels between nodes.
pub fn decode_one(bytes: &[u8]) -> Option<Record<'_>> {
    let head = bytes.get(..8)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let payload = bytes.get(8..8 + len)?;
    (bytes.len() == 8 + len && crc32fast::hash(payload) == crc).then(|| decode(payload)).flatten()
}

impl<'a> Iterator for Reader<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.damage.is_some() || self.pos >= self.buf.len() {
            return None;
        }
        let rest = &self.buf[self.pos..];
        let Some(head) = rest.get(..8) else {
            return self.fail("a record cut short");
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > MAX_RECORD {
            return self.fail("a record of impossible length");
        }
        let Some(payload) = rest.get(8..8 + len) else {
            return self.fail("a record cut short");
        };
        if crc32fast::hash(payload) != crc {
            return self.fail("a record whose checksum does not match");
        }
        let Some(rec) = decode(payload) else {
            return self.fail("a record this version cannot read");
        };
        if self.pos == 0 && !matches!(rec, Record::Header { version: VERSION, .. }) {
            return self.fail("no martd header of a known version");
        }
        self.pos += 8 + len;
        Some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record<'static>> {
        vec![
            Record::Header { version: VERSION, salt: 7, last_id: 42 },
            Record::Attrs {
                channel: b"a",
                channel_timeout_ms: 300_000,
                attrs: SavedAttrs {
                    size: Some(3),
                    life_ms: None,
                    one2one: true,
                    key: Some([9; 32]),
                    use_sessions: false,
                },
            },
            Record::Message(SavedMessage {
                channel: b"a",
                channel_timeout_ms: 300_000,
                id: 43,
                time: 1_700_000_000,
                expires_ms: u64::MAX,
                keep: 10,
                content_type: b"text/plain",
                event: b"",
                body: b"hello",
            }),
            Record::Consume { channel: b"a", after: 42, upto: 43 },
            Record::Delete { channel: b"a" },
        ]
    }

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        for r in sample() {
            let before = buf.len();
            encode(&r, &mut buf);
            assert!(buf.len() - before <= encoded_len(&r), "{r:?}");
        }
        let mut rd = Reader::new(&buf);
        let got: Vec<_> = rd.by_ref().collect();
        assert_eq!(got, sample());
        assert_eq!(rd.valid_len(), buf.len());
        assert!(rd.damage().is_none());
    }

    #[test]
    fn damage_keeps_everything_before_it() {
        let mut buf = Vec::new();
        for r in sample() {
            encode(&r, &mut buf);
        }
        let whole = buf.len();
        let mut ends = vec![0];
        let mut acc = Vec::new();
        for r in sample() {
            encode(&r, &mut acc);
            ends.push(acc.len());
        }
        // Cut short anywhere: every whole record before the cut is read.
        for cut in 0..whole {
            let mut rd = Reader::new(&buf[..cut]);
            let n = rd.by_ref().count();
            let whole_before = ends.iter().filter(|&&e| e > 0 && e <= cut).count();
            assert_eq!(n, whole_before, "cut at {cut}");
            assert_eq!(rd.valid_len(), ends[whole_before]);
            assert_eq!(rd.damage().is_some(), !ends.contains(&cut), "cut at {cut}");
        }
        // A flipped byte in the third record: the first two are read.
        let mut first_two = Vec::new();
        for r in &sample()[..2] {
            encode(r, &mut first_two);
        }
        let mut bad = buf.clone();
        bad[first_two.len() + 20] ^= 0x40;
        let mut rd = Reader::new(&bad);
        assert_eq!(rd.by_ref().count(), 2);
        assert_eq!(rd.damage().map(|d| d.offset), Some(first_two.len()));
        // No header: nothing.
        let mut rd = Reader::new(&buf[first_two.len()..]);
        assert_eq!(rd.by_ref().count(), 0);
        assert!(rd.damage().is_some());
    }
}
