//! 1000 messages on one channel while the subscriber disconnects and resumes every ~100 of
//! them, on each streaming transport: every message exactly once, in order.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::*;

const TOTAL: usize = 1000;

/// Publishes `m0..m999` on `ch` from worker `pid`, recording each id by index.
fn publisher(
    port: u16,
    pid: u32,
    ch: &'static str,
    ids: Arc<Mutex<Vec<u64>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut p = Conn::open_on(port, pid).await;
        for i in 0..TOTAL {
            let id = publish(&mut p, ch, format!("m{i}")).await;
            ids.lock().unwrap().push(id);
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    })
}

/// The id of body `m{i}` (waits until the publisher recorded it).
async fn id_of(ids: &Arc<Mutex<Vec<u64>>>, body: &str) -> u64 {
    let i: usize = body.trim_start_matches('m').parse().expect("body m<i>");
    for _ in 0..500 {
        if let Some(&id) = ids.lock().unwrap().get(i) {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no id recorded for {body}");
}

fn check(got: &[String]) {
    let want: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    assert_eq!(got.len(), want.len(), "count");
    assert_eq!(got, want.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_every_hundred_messages_loses_and_repeats_nothing() {
    let ng = Nginx::start(conf(
        "        location = /es { martd_listen eventsource; }
        location = /ws { martd_listen websocket; }
        location = /st { martd_listen stream; }",
    ));
    let w = ng.worker_pids();
    for (k, (kind, ch)) in
        [("eventsource", "re"), ("websocket", "rw"), ("stream", "rs")].into_iter().enumerate()
    {
        let ids = Arc::new(Mutex::new(Vec::new()));
        let mut got: Vec<String> = Vec::new();
        let mut last: Option<u64> = None;
        let mut publishing = None;
        while got.len() < TOTAL {
            let resume = last.map_or(String::new(), |l| format!("&last_event_id={l}"));
            let pid = w[(got.len() / 100 + k) % 2];
            // Up to 100 messages on this connection, then away.
            let want = (TOTAL - got.len()).min(100);
            let batch: Vec<String> = match kind {
                "eventsource" => {
                    let path = format!("/es?channel={ch}{resume}");
                    let mut ev = open_on(ng.port, pid, &path, &[SSE]).await.events();
                    publishing.get_or_insert_with(|| {
                        publisher(ng.port, w[1 - pid_index(&w, pid)], ch, ids.clone())
                    });
                    ev.take(want, PROMPT * 3).await.into_iter().map(|e| e.data).collect()
                }
                "websocket" => {
                    // (the worker is the kernel's choice here)
                    let url = format!("ws://127.0.0.1:{}/ws?channel={ch}{resume}", ng.port);
                    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
                    publishing.get_or_insert_with(|| {
                        publisher(ng.port, w[1 - pid_index(&w, pid)], ch, ids.clone())
                    });
                    let mut out = Vec::new();
                    while out.len() < want {
                        match tokio::time::timeout(PROMPT * 3, ws.next()).await {
                            Ok(Some(Ok(Message::Text(t)))) => out.push(t.to_string()),
                            Ok(Some(Ok(_))) => {}
                            other => panic!("websocket after {} of {want}: {other:?}", out.len()),
                        }
                    }
                    out
                }
                _ => {
                    let path = format!("/st?channel={ch}{resume}");
                    let mut s = open_on(ng.port, pid, &path, &[]).await;
                    publishing.get_or_insert_with(|| {
                        publisher(ng.port, w[1 - pid_index(&w, pid)], ch, ids.clone())
                    });
                    s.pieces(b"\n", want, PROMPT * 3)
                        .await
                        .into_iter()
                        .map(|b| String::from_utf8(b).expect("UTF-8"))
                        .collect()
                }
            };
            let Some(end) = batch.last() else { panic!("{kind}: empty batch") };
            last = Some(id_of(&ids, end).await);
            got.extend(batch);
        }
        if let Some(t) = publishing {
            t.await.expect("publisher");
        }
        check(&got);
        eprintln!("{kind}: {TOTAL} messages over {} connections", TOTAL / 100);
    }
    ng.finish();
}

fn pid_index(w: &[u32], pid: u32) -> usize {
    w.iter().position(|&p| p == pid).unwrap_or(0)
}
