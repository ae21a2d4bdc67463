//! `martd_persist dir [sync=always|sync=TIME]`: the zone's channels outlive nginx.
//!
//! * The store appends each change to a journal in the zone, under the lock it already holds
//!   (`martd_core::store::Journal`). A publish that finds the journal full (the disk is
//!   slower than the publishers) or the disk failing is refused (`503`/`507`); nothing is
//!   ever accepted and then dropped.
//! * One worker at a time (its pid is in the zone root: a lease, taken over when that process
//!   is gone) runs a writer thread. It copies what the journal holds (a short hold of the
//!   lock), appends it to the file, syncs it (each time with `sync=always`, else at least
//!   every `TIME`), and only then drops it from the journal and wakes the workers whose
//!   `sync=always` publishes wait (`backend::held`). A writer that dies leaves what it had not
//!   written for the next one. The worker's event loop never waits on the disk ([`writer`]).
//! * The file is reached through its directory's descriptor, opened by the master
//!   ([`files`]).
//! * When the file has grown to twice its size after the last compaction (and past 1 MB),
//!   the writer replays it into a store of its own and writes what is left in its place.
//! * A worker that exits gracefully stops its writer after a last write; the master writes
//!   what is left when it exits (a clean stop loses nothing).
//! * When nginx starts with a new zone, the master replays the file into it before any
//!   worker starts: every valid record up to the first damaged one (logged), with the key
//!   salt and the id counter, so ids stay strictly increasing and keys keep working. A binary
//!   upgrade first has the running zone hand its journal over ([`upgrade`]).

mod files;
mod upgrade;
mod writer;

pub use writer::{exit_master, stop, tick};

use std::io::Write;

use martd_core::persist::{Reader, Record};
use nginx_sys::{NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN};

use crate::conf::MainConf;
use crate::zone::{self, ZoneRoot};

type Level = u32;

/// The directory `martd_persist` names (empty: off), for log lines.
fn dir_of(mcf: &MainConf) -> Option<String> {
    let p = crate::conf::conf_bytes(&mcf.persist_path);
    (!p.is_empty()).then(|| String::from_utf8_lossy(p).into_owned())
}

/// The workers' user, when the master runs as root (`uid_t::MAX` otherwise).
fn workers_user(mcf: &MainConf) -> libc::uid_t {
    let cycle = mcf.persist_cycle;
    // SAFETY: geteuid has no preconditions; the core module's conf of the cycle being
    // configured is complete when zones are initialised.
    unsafe {
        if libc::geteuid() != 0 || cycle.is_null() || (*cycle).conf_ctx.is_null() {
            return libc::uid_t::MAX;
        }
        let ccf = *(*cycle).conf_ctx.add(nginx_sys::ngx_core_module.index)
            as *const nginx_sys::ngx_core_conf_t;
        if ccf.is_null() {
            return libc::uid_t::MAX;
        }
        (*ccf).user
    }
}

/// The journal's room: an eighth of the zone, between 64 KB and 64 MB.
fn journal_cap(mcf: &MainConf) -> usize {
    (mcf.shm_size / 8).clamp(64 << 10, 64 << 20)
}

/// `init_zone` (the master, zone locked): opens the directory, turns the journal on or off
/// for this configuration, and fills a new zone from the file first.
pub fn configure(mcf: &mut MainConf, root: &mut ZoneRoot, fresh: bool) -> Result<(), ()> {
    let Some(dir) = dir_of(mcf) else {
        root.store.disable_journal();
        return Ok(());
    };
    let user = workers_user(mcf);
    if let Err(e) = files::open_dir(mcf, &dir, user) {
        master_log(NGX_LOG_ERR, &format!("martd_persist \"{dir}\": {e}"));
    }
    if fresh {
        upgrade::request(mcf);
        hand_over(mcf);
        restore(mcf, root);
    }
    root.store.enable_journal(journal_cap(mcf)).map_err(|_| ())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn master_log(level: Level, msg: &str) {
    // SAFETY: the cycle and its log are live in the master and workers.
    let log = unsafe { (*nginx_sys::ngx_cycle).log };
    martd_log!(level, log, "{}", msg);
}

/// A reload that makes a new zone (another `martd_shm_size`): the running zone's journal goes
/// to the file first, and that zone takes no more publishes (its workers answer `503`; the
/// publisher tries again and reaches the new ones), so the new zone, filled from the file,
/// has every message published so far and ids never go two ways.
fn hand_over(mcf: &MainConf) {
    // SAFETY: during a reload `ngx_cycle` is still the running cycle, its zone mapped here; at
    // the first start it is nginx's bare init cycle (no configuration, no modules).
    let old_cycle = unsafe { nginx_sys::ngx_cycle };
    // SAFETY: as above; the module array has `modules_n` entries.
    let ours = unsafe {
        !old_cycle.is_null()
            && !(*old_cycle).conf_ctx.is_null()
            && !(*old_cycle).modules.is_null()
            && (0..(*old_cycle).modules_n)
                .any(|i| std::ptr::eq(*(*old_cycle).modules.add(i), crate::module()))
    };
    if !ours {
        return;
    }
    let Some(old) = crate::notify::main_conf(old_cycle) else { return };
    if old.root.is_null() || dir_of(old) != dir_of(mcf) {
        return;
    }
    let Some(mut z) = zone::lock(old) else { return };
    z.store().journal_supersede();
    let Some((bytes, _)) = z.store().journal_pending() else { return };
    let result = files::open_journal(mcf).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_data()
    });
    match result {
        Ok(()) => {
            let n = bytes.len();
            z.store().journal_written(n, true);
        }
        Err(e) => master_log(NGX_LOG_ERR, &format!("martd_persist: handing over: {e}")),
    }
}

/// Replays the file into the new zone's store.
fn restore(mcf: &MainConf, root: &mut ZoneRoot) {
    let dir = dir_of(mcf).unwrap_or_default();
    let bytes = match files::read_journal(mcf) {
        Ok(b) if b.is_empty() => return,
        Ok(b) => b,
        Err(e) => {
            master_log(NGX_LOG_ERR, &format!("martd_persist \"{dir}\": not restored: {e}"));
            return;
        }
    };
    let now = now_ms();
    let mut reader = Reader::new(&bytes);
    let (mut records, mut failed) = (0u64, 0u64);
    for rec in reader.by_ref() {
        if let Record::Header { salt, .. } = rec {
            root.salt = salt;
        }
        match root.store.restore(&rec, now) {
            Ok(_) => records += 1,
            Err(_) => failed += 1,
        }
    }
    if let Some(d) = reader.damage() {
        let skipped = bytes.len() - reader.valid_len();
        master_log(
            NGX_LOG_WARN,
            &format!(
                "martd_persist \"{dir}\": {} at offset {}: skipped its last {skipped} bytes, \
                 restored the {records} records before",
                d.reason, d.offset
            ),
        );
    }
    if failed > 0 {
        master_log(
            NGX_LOG_ERR,
            &format!("martd_persist \"{dir}\": {failed} records did not fit the zone"),
        );
    }
    master_log(
        NGX_LOG_NOTICE,
        &format!(
            "martd_persist \"{dir}\": restored {} channels, {} messages",
            root.store.channel_count(),
            root.store.stats.messages
        ),
    );
}
