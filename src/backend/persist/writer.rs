//! The writer: one worker at a time holds the lease (its pid in the zone root) and runs a
//! thread that moves the zone's journal to the file, syncs it, compacts the file, and wakes
//! the workers whose `sync=always` publishes wait. Exiting workers and the master write what
//! is left.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use martd_core::persist::{encode, Reader, Record, VERSION};
use martd_core::store::Store;
use nginx_sys::{ngx_cycle_t, NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN};

use super::{dir_of, files, master_log, now_ms, upgrade};
use crate::backend::side::{self, Conf, Shared, SideThread};
use crate::conf::MainConf;
use crate::zone;

/// Compaction starts once the file is twice its compacted size, and at least this large.
const COMPACT_MIN: u64 = 1 << 20;
/// At most this much is taken out of the journal per write.
const WRITE_CHUNK: usize = 4 << 20;

thread_local! {
    static WRITER: std::cell::RefCell<Option<SideThread>> = const { std::cell::RefCell::new(None) };
}

fn lease(root: &mut crate::zone::ZoneRoot) -> &mut i32 {
    &mut root.persister
}

/// A worker's tick (start, and once a second): takes the writer's lease if nobody holds it,
/// and logs what its writer has to say.
pub fn tick(mcf: &'static MainConf) {
    let Some(path) = dir_of(mcf) else { return };
    side::tick(&WRITER, mcf, lease, "martd-persist", move |conf, shared| run(conf, path, shared));
}

/// `exit_process`: the writer writes what is left and stops; the lease is given back. A
/// worker without one writes what is left itself when nobody else holds the lease.
pub fn stop(mcf: &'static MainConf) {
    let Some(path) = dir_of(mcf) else { return };
    if side::stop(&WRITER, mcf, lease) || !side::lease_free(mcf, lease) {
        return;
    }
    let shared = Shared::new(true);
    match open(&path, mcf, &shared) {
        Ok(mut f) => {
            let _ = write_pending(mcf, &mut f, true, &shared);
        }
        Err(why) => master_log(NGX_LOG_ERR, &format!("martd_persist \"{path}\": {why}")),
    }
    shared.flush_logs();
}

/// `exit_master`: what the workers left in the journal goes to disk.
pub extern "C" fn exit_master(cycle: *mut ngx_cycle_t) {
    let Some(mcf) = crate::notify::main_conf(cycle) else { return };
    let Some(path) = dir_of(mcf) else { return };
    if mcf.root.is_null() {
        return;
    }
    let shared = Shared::new(true);
    match open(&path, mcf, &shared) {
        Ok(mut f) => {
            let _ = write_pending(mcf, &mut f, true, &shared);
        }
        Err(why) => shared.log(NGX_LOG_ERR, format!("martd_persist \"{path}\": {why}")),
    }
    shared.flush_logs();
}

/// Opens the file to append to: a damaged tail is cut off (logged), a new file gets its
/// header.
fn open(path: &str, mcf: &'static MainConf, shared: &Shared) -> Result<File, String> {
    let mut f = files::open_journal(mcf).map_err(|e| e.to_string())?;
    match f.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err("not a regular file".into()),
        Err(e) => return Err(e.to_string()),
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    let mut reader = Reader::new(&bytes);
    reader.by_ref().for_each(drop);
    let valid = reader.valid_len();
    if valid < bytes.len() {
        shared.log(
            NGX_LOG_WARN,
            format!(
                "martd_persist \"{path}\": cut a damaged tail of {} bytes",
                bytes.len() - valid
            ),
        );
        f.set_len(valid as u64).map_err(|e| e.to_string())?;
    }
    if valid == 0 {
        let Some(mut z) = zone::lock(mcf) else { return Err("no zone".into()) };
        let (salt, last_id) = (z.root().salt, z.store().last_id());
        drop(z);
        let mut head = Vec::new();
        encode(&Record::Header { version: VERSION, salt, last_id }, &mut head);
        f.write_all(&head).map_err(|e| e.to_string())?;
    }
    let _ = f.seek(SeekFrom::End(0));
    Ok(f)
}

/// Writes what the journal holds (all of it if `all`, else one chunk) and syncs it if
/// `sync`; drops it from the journal and wakes the workers waiting for it. `Ok(bytes)`.
fn write_pending(
    mcf: &'static MainConf,
    f: &mut File,
    sync: bool,
    shared: &Shared,
) -> Result<usize, ()> {
    let mut total = 0;
    loop {
        let chunk = {
            let Some(mut z) = zone::lock(mcf) else { return Err(()) };
            match z.store().journal_pending() {
                Some((b, _)) if !b.is_empty() => b[..b.len().min(WRITE_CHUNK)].to_vec(),
                _ => Vec::new(),
            }
        };
        let synced = sync && (chunk.is_empty() || f.write_all(&chunk).is_ok());
        if !chunk.is_empty() && !synced && sync {
            fail(mcf, shared, "could not write");
            return Err(());
        }
        if !chunk.is_empty() && !sync {
            if let Err(e) = f.write_all(&chunk) {
                fail(mcf, shared, &e.to_string());
                return Err(());
            }
        }
        if sync {
            if let Err(e) = f.sync_data() {
                fail(mcf, shared, &e.to_string());
                return Err(());
            }
        }
        let waiting = {
            let Some(mut z) = zone::lock(mcf) else { return Err(()) };
            let nonce = z.root().nonce;
            (z.store().journal_written(chunk.len(), sync), nonce)
        };
        wake(waiting.0, waiting.1);
        total += chunk.len();
        if chunk.len() < WRITE_CHUNK {
            return Ok(total);
        }
    }
}

/// Marks the journal failing (publishes get `507`) and logs why.
fn fail(mcf: &'static MainConf, shared: &Shared, why: &str) {
    let path = dir_of(mcf).unwrap_or_default();
    let first = zone::lock(mcf).is_some_and(|mut z| {
        let was = z.store().journal().is_some_and(|j| j.failing);
        z.store().journal_failed();
        !was
    });
    if first {
        shared.log(NGX_LOG_ERR, format!("martd_persist \"{path}\": cannot write: {why}"));
    }
}

/// Wakes the worker slots whose `sync=always` publishes wait.
fn wake(slots: Vec<u32>, nonce: u64) {
    if slots.is_empty() {
        return;
    }
    if let Ok(fd) = crate::notify::sender() {
        for slot in slots {
            crate::notify::send(fd, nonce, slot);
        }
        crate::notify::close(fd);
    }
}

/// The writer thread.
fn run(conf: Conf, path: String, shared: Arc<Shared>) {
    let mcf = conf.0;
    let sync_every = Duration::from_millis(mcf.persist_sync_ms as u64);
    let mut file: Option<File> = None;
    let mut base = 0u64;
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    let mut was_failing = false;
    loop {
        let stopping = shared.stopping();
        if file.is_none() {
            match open(&path, mcf, &shared) {
                Ok(f) => {
                    base = f.metadata().map_or(0, |m| m.len());
                    file = Some(f);
                }
                Err(why) => {
                    fail(mcf, &shared, &why);
                    if stopping {
                        return;
                    }
                    std::thread::park_timeout(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let Some(f) = file.as_mut() else { continue };
        let flush = || write_pending(mcf, f, true, &shared).is_ok();
        if let upgrade::After::Reopen = upgrade::answer(mcf, &shared, flush) {
            file = None;
            continue;
        }
        let Some(f) = file.as_mut() else { continue };
        let sync_now =
            mcf.persist_sync_ms == 0 || stopping || (unsynced && last_sync.elapsed() >= sync_every);
        match write_pending(mcf, f, sync_now, &shared) {
            Ok(n) => {
                if was_failing {
                    shared.log(NGX_LOG_NOTICE, format!("martd_persist \"{path}\": writing again"));
                    was_failing = false;
                }
                if sync_now {
                    last_sync = Instant::now();
                    unsynced = false;
                } else if n > 0 {
                    unsynced = true;
                }
                if stopping {
                    return;
                }
                if n == 0 {
                    std::thread::park_timeout(Duration::from_millis(if unsynced { 50 } else { 5 }));
                }
            }
            Err(()) => {
                was_failing = true;
                file = None;
                if stopping {
                    return;
                }
                std::thread::park_timeout(Duration::from_secs(1));
                continue;
            }
        }
        let size = file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
        if size >= COMPACT_MIN && size >= base.saturating_mul(2) {
            match compact(mcf) {
                Ok(n) => {
                    base = n;
                    file = None;
                }
                Err(e) => {
                    shared.log(NGX_LOG_ERR, format!("martd_persist \"{path}\": compaction: {e}"));
                    base = size;
                }
            }
        }
    }
}

/// Rewrites the file as what it holds now; returns its new size.
fn compact(mcf: &'static MainConf) -> std::io::Result<u64> {
    let bytes = files::read_journal(mcf)?;
    let now = now_ms();
    let mut store = Store::new_in(martd_core::Global);
    let mut salt = 0;
    for rec in Reader::new(&bytes) {
        if let Record::Header { salt: s, .. } = rec {
            salt = s;
        }
        let _ = store.restore(&rec, now);
    }
    let mut out = Vec::new();
    store.dump(salt, now, &mut out);
    files::replace_journal(mcf, &out)?;
    Ok(out.len() as u64)
}
