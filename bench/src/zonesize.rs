//! `zonesize`: zone bytes per channel and per message, measured on martd-core with an
//! allocator that rounds every request the way nginx's slab allocator does (and is as large as
//! the zone's allocator, so the stored types have their production sizes).

use std::alloc::Layout;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use martd_core::msgid::Since;
use martd_core::queue::{Message, MessageSpec};
use martd_core::store::{AttrUpdate, Channel, Concurrency, Listen, ListenOpts, PublishOpts, Store};
use serde_json::json;

use crate::alloc::{slab_size, SlabCount};
use crate::args::Args;
use crate::lockhold::channel_name;

static USED: AtomicUsize = AtomicUsize::new(0);

fn store() -> (Store<SlabCount>, u32) {
    let mut s = Store::new_in(SlabCount(&USED));
    let slot = s.register_worker(1, 1, 0, &|_| true).expect("memory");
    (s, slot)
}

fn publish_all(s: &mut Store<SlabCount>, n: u64, size: usize, times: usize, now: u64) {
    let body = vec![b'm'; size];
    let spec = MessageSpec {
        content_type: b"text/plain",
        event: b"",
        body: &body,
        timeout_ms: 0,
        expire_ms: None,
    };
    let opts = PublishOpts {
        buffer_len: 10,
        buffer_max: 1000,
        timeout_ms: 0,
        store: true,
        channel_timeout_ms: 0,
    };
    let attrs = AttrUpdate::default();
    for _ in 0..times {
        for i in 0..n {
            s.publish(&channel_name(i), Some(&spec), &attrs, &opts, now, &mut Vec::new())
                .expect("memory");
        }
    }
}

pub fn run(a: &Args) -> Result<u8, String> {
    let n: u64 = a.num("channels", 100_000)?;
    let size: usize = a.num("size", 64)?;
    a.finish()?;
    let per = |bytes: usize, count: u64| bytes as f64 / count.max(1) as f64;

    // Channels made by listeners alone, one waiting listener each.
    let (mut s, slot) = store();
    let base = USED.load(Relaxed);
    let opts = ListenOpts {
        concurrency: Concurrency::Broadcast,
        max_listeners: 0,
        create: true,
        channel_timeout_ms: 60_000,
        slot,
        stream: false,
    };
    for i in 0..n {
        let r = s.listen(&channel_name(i), Since::Oldest, &opts, 1, &mut Vec::new());
        assert!(matches!(r, Ok(Listen::Park(_))));
    }
    let listener_channel = per(USED.load(Relaxed) - base, n);
    drop(s);

    // Published channels: one message each, then ten.
    let (mut s, _) = store();
    let base = USED.load(Relaxed);
    publish_all(&mut s, n, size, 1, 1);
    let one = USED.load(Relaxed) - base;
    publish_all(&mut s, n, size, 9, 2);
    let ten = USED.load(Relaxed) - base;
    drop(s);
    let channel_one_msg = per(one, n);
    let message = per(ten - one, n * 9);

    let name = channel_name(n - 1).len();
    let content = slab_size(Layout::array::<u8>(b"text/plain".len() + size).expect("layout"));
    let m = json!({
        "channels": n,
        "size": size,
        "name_len_max": name,
        "size_of_channel": size_of::<Channel<SlabCount>>(),
        "slab_channel": slab_size(Layout::new::<Channel<SlabCount>>()),
        "size_of_message": size_of::<Message<SlabCount>>(),
        "slab_content": content,
        "listener_only_channel_b": listener_channel,
        "channel_with_one_message_b": channel_one_msg,
        "per_message_b_buffer_10": message,
    });
    println!("\nzonesize: {n} channels, names up to {name} bytes, {size}-byte bodies + text/plain");
    println!("| what | zone bytes |\n|---|---|");
    println!(
        "| Channel struct (size_of; slab chunk) | {} ({}) |",
        m["size_of_channel"], m["slab_channel"]
    );
    println!("| Message struct (size_of) | {} |", m["size_of_message"]);
    println!("| content type + body chunk | {content} |");
    println!("| channel made by a listener, 1 listener | {listener_channel:.1} |");
    println!("| published channel with 1 message | {channel_one_msg:.1} |");
    println!("| each further message (buffer 10, 10 stored) | {message:.1} |");
    println!("{}", json!({"bench": "martd-bench", "scenario": "zonesize", "metrics": m}));
    Ok(0)
}
