//! `martd_persist path [sync=always|sync=TIME]`: the zone's channels outlive nginx.
//!
//! * The store appends each change to a journal in the zone, under the lock it already holds
//!   (`martd_core::store::Journal`). A publish that finds the journal full (the disk is
//!   slower than the publishers) or the disk failing is refused (`503`/`507`); nothing is
//!   ever accepted and then dropped.
//! * One worker at a time (its pid is in the zone root: a lease, taken over when that process
//!   is gone) runs a writer thread. It copies what the journal holds (a short hold of the
//!   lock), appends it to the file, syncs it (each time with `sync=always`, else at least
//!   every `TIME`), and only then drops it from the journal and wakes the workers whose
//!   `sync=always` publishes wait (see [`crate::backend::persist`]'s callers in `push`). A
//!   writer that dies leaves what it had not written for the next one. The worker's event
//!   loop never waits on the disk.
//! * When the file has grown to twice its size after the last compaction (and past 1 MB),
//!   the writer replays it into a store of its own and writes what is left in its place.
//! * A worker that exits gracefully stops its writer after a last write; the master writes
//!   what is left when it exits (a clean stop loses nothing).
//! * When nginx starts with a new zone, the master replays the file into it before any
//!   worker starts: every valid record up to the first damaged one (logged), with the key
//!   salt and the id counter, so ids stay strictly increasing and keys keep working.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use martd_core::persist::{encode, Reader, Record, VERSION};
use martd_core::store::Store;
use nginx_sys::{ngx_cycle_t, NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN};

type Level = u32;

use crate::conf::MainConf;
use crate::zone::{self, ShmAlloc, ZoneRoot};

/// Compaction starts once the file is twice its compacted size, and at least this large.
const COMPACT_MIN: u64 = 1 << 20;
/// At most this much is taken out of the journal per write.
const WRITE_CHUNK: usize = 4 << 20;

/// The journal file in `martd_persist`'s directory.
const FILE: &str = "martd.journal";

fn dir_of(mcf: &MainConf) -> Option<String> {
    let p = crate::conf::conf_bytes(&mcf.persist_path);
    (!p.is_empty()).then(|| String::from_utf8_lossy(p).into_owned())
}

fn path_of(mcf: &MainConf) -> Option<String> {
    dir_of(mcf).map(|d| format!("{}/{FILE}", d.trim_end_matches('/')))
}

/// The master (root, if it started as root) makes the directory and gives it and the file
/// to the workers' user, as nginx does for its temporary paths.
fn prepare_dir(mcf: &MainConf) {
    let (Some(dir), Some(path)) = (dir_of(mcf), path_of(mcf)) else { return };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        master_log(NGX_LOG_ERR, &format!("martd_persist \"{dir}\": {e}"));
        return;
    }
    // SAFETY: geteuid has no preconditions; the core module's conf is live during zone init.
    let user = unsafe {
        if libc::geteuid() != 0 {
            return;
        }
        let cycle = mcf.persist_cycle;
        if cycle.is_null() {
            return;
        }
        let ccf = *(*cycle).conf_ctx.add(nginx_sys::ngx_core_module.index)
            as *const nginx_sys::ngx_core_conf_t;
        if ccf.is_null() {
            return;
        }
        (*ccf).user
    };
    if user == libc::uid_t::MAX {
        return;
    }
    for p in [&dir, &path] {
        if let Ok(c) = std::ffi::CString::new(p.as_bytes()) {
            // SAFETY: a NUL-terminated path; a missing file is fine (ENOENT).
            unsafe { libc::chown(c.as_ptr(), user, libc::gid_t::MAX) };
        }
    }
}

/// The journal's room: an eighth of the zone, between 64 KB and 64 MB.
fn journal_cap(mcf: &MainConf) -> usize {
    (mcf.shm_size / 8).clamp(64 << 10, 64 << 20)
}

/// `init_zone` (the master, zone locked): turns the journal on or off for this
/// configuration, and fills a new zone from the file first.
pub fn configure(mcf: &MainConf, root: &mut ZoneRoot, fresh: bool) -> Result<(), ()> {
    let Some(path) = path_of(mcf) else {
        root.store.disable_journal();
        return Ok(());
    };
    prepare_dir(mcf);
    if fresh {
        hand_over(&path);
        restore(&path, root);
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
fn hand_over(path: &str) {
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
    if old.root.is_null() || path_of(old).as_deref() != Some(path) {
        return;
    }
    let Some(mut z) = zone::lock(old) else { return };
    z.store().journal_supersede();
    let Some((bytes, _)) = z.store().journal_pending() else { return };
    let result = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_data()));
    match result {
        Ok(()) => {
            let n = bytes.len();
            z.store().journal_written(n, true);
        }
        Err(e) => master_log(NGX_LOG_ERR, &format!("martd_persist \"{path}\": {e}")),
    }
}

/// Replays the file at `path` into the new zone's store.
fn restore(path: &str, root: &mut ZoneRoot) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            master_log(NGX_LOG_ERR, &format!("martd_persist \"{path}\": not restored: {e}"));
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
                "martd_persist \"{path}\": {} at offset {}: skipped its last {skipped} bytes, \
                 restored the {records} records before",
                d.reason, d.offset
            ),
        );
    }
    if failed > 0 {
        master_log(
            NGX_LOG_ERR,
            &format!("martd_persist \"{path}\": {failed} records did not fit the zone"),
        );
    }
    master_log(
        NGX_LOG_NOTICE,
        &format!(
            "martd_persist \"{path}\": restored {} channels, {} messages",
            root.store.channel_count(),
            root.store.stats.messages
        ),
    );
}

/// The worker's main conf, handed to its writer thread.
#[derive(Clone, Copy)]
struct Conf(&'static MainConf);

// SAFETY: the main conf lives as long as the worker's cycle, and the writer thread is joined
// before the worker exits; the thread only reads it and reaches the zone through its lock.
unsafe impl Send for Conf {}

struct Shared {
    stop: AtomicBool,
    /// Lines for the worker to log (nginx's log is the event loop's).
    logs: Mutex<Vec<(Level, String)>>,
}

impl Shared {
    fn log(&self, level: Level, msg: String) {
        if let Ok(mut l) = self.logs.lock() {
            if l.len() < 64 {
                l.push((level, msg));
            }
        }
    }
}

struct Writer {
    thread: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

thread_local! {
    static WRITER: std::cell::RefCell<Option<Writer>> = const { std::cell::RefCell::new(None) };
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// A worker's tick (start, and once a second): takes the writer's lease if nobody holds it,
/// and logs what its writer has to say.
pub fn tick(mcf: &'static MainConf) {
    let Some(path) = path_of(mcf) else { return };
    let running = WRITER.with(|w| {
        let w = w.borrow();
        if let Some(w) = w.as_ref() {
            let lines = w.shared.logs.lock().map(|mut l| std::mem::take(&mut *l));
            for (level, msg) in lines.unwrap_or_default() {
                master_log(level, &msg);
            }
            return true;
        }
        false
    });
    // SAFETY: reading nginx's per-process flags.
    if running || unsafe { nginx_sys::ngx_exiting } != 0 {
        return;
    }
    // SAFETY: nginx's pid of this process.
    let pid = unsafe { nginx_sys::ngx_pid };
    let taken = zone::lock(mcf).is_some_and(|mut z| {
        let root = z.root();
        if root.persister != 0 && root.persister != pid && alive(root.persister) {
            return false;
        }
        root.persister = pid;
        true
    });
    if !taken {
        return;
    }
    let shared = Arc::new(Shared { stop: AtomicBool::new(false), logs: Mutex::new(Vec::new()) });
    let conf = Conf(mcf);
    let s = shared.clone();
    let spawned =
        std::thread::Builder::new().name("martd-persist".into()).spawn(move || run(conf, path, s));
    match spawned {
        Ok(t) => WRITER.with(|w| *w.borrow_mut() = Some(Writer { thread: Some(t), shared })),
        Err(e) => {
            master_log(NGX_LOG_ERR, &format!("martd_persist: no writer thread: {e}"));
            if let Some(mut z) = zone::lock(mcf) {
                z.root().persister = 0;
            }
        }
    }
}

/// `exit_process`: the writer writes what is left and stops; the lease is given back. A
/// worker without one writes what is left itself when nobody else holds the lease.
pub fn stop(mcf: &'static MainConf) {
    let Some(path) = path_of(mcf) else { return };
    let writer = WRITER.with(|w| w.borrow_mut().take());
    if let Some(mut w) = writer {
        w.shared.stop.store(true, Ordering::Release);
        if let Some(t) = w.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let Some(mut z) = zone::lock(mcf) {
            z.root().persister = 0;
        }
        return;
    }
    let free = zone::lock(mcf).is_some_and(|mut z| !alive(z.root().persister));
    if free {
        let shared = Shared { stop: AtomicBool::new(true), logs: Mutex::new(Vec::new()) };
        match open(&path, mcf, &shared) {
            Ok(mut f) => {
                let _ = write_pending(mcf, &mut f, true, &shared);
            }
            Err(why) => master_log(NGX_LOG_ERR, &format!("martd_persist \"{path}\": {why}")),
        }
    }
}

/// `exit_master`: what the workers left in the journal goes to disk.
pub extern "C" fn exit_master(cycle: *mut ngx_cycle_t) {
    let Some(mcf) = crate::notify::main_conf(cycle) else { return };
    let Some(path) = path_of(mcf) else { return };
    if mcf.root.is_null() {
        return;
    }
    let shared = Shared { stop: AtomicBool::new(true), logs: Mutex::new(Vec::new()) };
    match open(&path, mcf, &shared) {
        Ok(mut f) => {
            let _ = write_pending(mcf, &mut f, true, &shared);
        }
        Err(why) => shared.log(NGX_LOG_ERR, format!("martd_persist \"{path}\": {why}")),
    }
    if let Ok(lines) = shared.logs.into_inner() {
        for (level, msg) in lines {
            master_log(level, &msg);
        }
    }
}

/// Opens the file to append to: a damaged tail is cut off (logged), a new file gets its
/// header.
fn open(path: &str, mcf: &'static MainConf, shared: &Shared) -> Result<File, String> {
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| e.to_string())?;
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
    let path = path_of(mcf).unwrap_or_default();
    let first = zone::lock(mcf).is_some_and(|mut z| {
        let was = z.store().journal().is_some_and(|j| j.failing);
        z.store().journal_failed();
        !was
    });
    if first {
        shared.log(NGX_LOG_ERR, format!("martd_persist \"{path}\": cannot write: {why}"));
    }
}

/// Builds a publish's answer once its message is on disk.
pub type Answer = Box<dyn FnOnce(*mut nginx_sys::ngx_http_request_t) -> nginx_sys::ngx_int_t>;

thread_local! {
    /// `sync=always` publishes waiting for the journal to reach their position on disk.
    static DURABLE_WAIT: std::cell::RefCell<Vec<(*mut nginx_sys::ngx_http_request_t, u64, Answer)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Holds a publish (its request kept open) until the journal is on disk up to `pos`.
pub fn answer_when_durable(
    r: *mut nginx_sys::ngx_http_request_t,
    pos: u64,
    answer: Answer,
) -> nginx_sys::ngx_int_t {
    // SAFETY: `r` is live; the extra count keeps it until `answer_durable` finalizes it.
    unsafe { (*(*r).main).set_count((*(*r).main).count() + 1) };
    DURABLE_WAIT.with(|w| w.borrow_mut().push((r, pos, answer)));
    arm_durable_timer(crate::listen::main_conf(r));
    nginx_sys::NGX_DONE as nginx_sys::ngx_int_t
}

thread_local! {
    /// Looks at held publishes every few ms, besides the writer's wake-ups. It is not
    /// cancelable: a worker shutting down gracefully (a reload) waits for its held publishes.
    static DURABLE_TIMER: std::cell::RefCell<Option<(Box<nginx_sys::ngx_event_t>, &'static MainConf)>> =
        const { std::cell::RefCell::new(None) };
}

/// How often held publishes are looked at without a wake-up.
const DURABLE_POLL_MS: nginx_sys::ngx_msec_t = 10;

fn arm_durable_timer(mcf: &'static MainConf) {
    DURABLE_TIMER.with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else { return };
        let (ev, _) = t.get_or_insert_with(|| {
            // SAFETY: in a worker the cycle and its log are live.
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            (crate::worker::blank_event(durable_timer_handler, log), mcf)
        });
        if ev.timer_set() == 0 {
            // SAFETY: the event is boxed in this thread-local, which outlives the timer.
            unsafe { nginx_sys::ngx_add_timer(&mut **ev, DURABLE_POLL_MS) };
        }
    });
}

unsafe extern "C" fn durable_timer_handler(_ev: *mut nginx_sys::ngx_event_t) {
    let mcf = DURABLE_TIMER.with(|t| t.try_borrow().ok().and_then(|t| t.as_ref().map(|x| x.1)));
    let Some(mcf) = mcf else { return };
    answer_durable(mcf);
    if DURABLE_WAIT.with(|w| !w.borrow().is_empty()) {
        arm_durable_timer(mcf);
    }
}

/// Answers the publishes whose messages are on disk now (a wake-up from the writer, or the
/// worker's tick).
pub fn answer_durable(mcf: &'static MainConf) {
    if DURABLE_WAIT.with(|w| w.borrow().is_empty()) {
        return;
    }
    let durable = zone::lock(mcf).and_then(|mut z| z.store().journal().map(|j| j.durable));
    let Some(durable) = durable else { return };
    let ready: Vec<_> = DURABLE_WAIT.with(|w| {
        let mut w = w.borrow_mut();
        let (ready, waiting): (Vec<_>, Vec<_>) =
            w.drain(..).partition(|(_, pos, _)| *pos <= durable);
        *w = waiting;
        ready
    });
    for (r, _, answer) in ready {
        // SAFETY: `r` was kept open by `answer_when_durable`; this is its last step.
        unsafe {
            let c = (*r).connection;
            let rc = answer(r);
            nginx_sys::ngx_http_finalize_request(r, rc);
            nginx_sys::ngx_http_run_posted_requests(c);
        }
    }
}

/// The answer to a publish the journal refused.
pub fn refused(
    r: *mut nginx_sys::ngx_http_request_t,
    e: martd_core::store::StoreError,
) -> nginx_sys::ngx_int_t {
    match e {
        martd_core::store::StoreError::DiskFailing => crate::response::error(
            r,
            507,
            "martd_persist cannot write to disk (see the error log); nothing was stored",
        ),
        martd_core::store::StoreError::Superseded => {
            crate::response::error(r, 503, "nginx is reloading into a new zone: try again")
        }
        _ => crate::response::error(
            r,
            503,
            "martd_persist is behind: the disk is slower than the publishers; try again",
        ),
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
        let stopping = shared.stop.load(Ordering::Acquire);
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
            match compact(&path, mcf) {
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
fn compact(path: &str, mcf: &'static MainConf) -> std::io::Result<u64> {
    let bytes = std::fs::read(path)?;
    let now = now_ms();
    let mut store = Store::new_in(martd_core::Global);
    let mut salt = 0;
    for rec in Reader::new(&bytes) {
        if let Record::Header { salt: s, .. } = rec {
            salt = s;
        }
        let _ = store.restore(&rec, now);
    }
    let _ = mcf;
    let mut out = Vec::new();
    store.dump(salt, now, &mut out);
    let tmp = format!("{path}.compact");
    {
        let mut t = File::create(&tmp)?;
        t.write_all(&out)?;
        t.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = std::path::Path::new(path).parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(out.len() as u64)
}

#[allow(dead_code)]
type ZoneStore = Store<ShmAlloc>;
