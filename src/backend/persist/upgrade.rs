//! A binary upgrade (`USR2`): the new master makes a zone of its own while the old workers
//! still take publishes into theirs, and both would append to one file. So the new master
//! asks first, through a file in the directory (`martd.handover`, holding its pid), and waits:
//! the old zone's writer sees the request within a few milliseconds, stops its zone taking
//! publishes (`503`, "try again": the publisher reaches a new worker), writes and syncs what
//! its journal holds, and removes the request. Then the new master restores the file, which
//! has every acknowledged message. Should the new master go (an upgrade given up: the old
//! master is sent `HUP` and the new one `QUIT`), the old zone takes publishes again.

use std::time::{Duration, Instant};

use nginx_sys::{NGX_LOG_NOTICE, NGX_LOG_WARN};

use super::{files, master_log};
use crate::backend::side::{alive, Shared};
use crate::conf::MainConf;
use crate::zone;

/// How long the new master waits for the running zone to hand over.
const WAIT: Duration = Duration::from_secs(3);

/// The new master of a binary upgrade (inherited sockets), before it restores the file into
/// its new zone: asks the running zone for its journal and waits for it (bounded).
pub fn request(mcf: &MainConf) {
    // SAFETY: nginx's flag, set at start when sockets were inherited (a binary upgrade).
    if unsafe { nginx_sys::ngx_inherited } == 0 {
        return;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if let Err(e) = files::write_request(mcf, pid) {
        master_log(NGX_LOG_WARN, &format!("martd_persist: binary upgrade: no request: {e}"));
        return;
    }
    let t0 = Instant::now();
    while files::read_request(mcf).is_some() {
        if t0.elapsed() >= WAIT {
            files::remove_request(mcf);
            master_log(
                NGX_LOG_WARN,
                "martd_persist: binary upgrade: the running nginx did not hand its journal \
                 over within 3s; restoring what the file holds",
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    master_log(NGX_LOG_NOTICE, "martd_persist: binary upgrade: the running zone handed over");
}

/// What the writer should do after [`answer`].
pub enum After {
    Nothing,
    /// Open the file again (another zone may have replaced it).
    Reopen,
}

/// The writer of the running zone, each round: answers a request (the zone takes no more
/// publishes, its journal is written and synced by `flush`), or takes publishes again if the
/// zone that took over is gone.
pub fn answer(mcf: &'static MainConf, shared: &Shared, flush: impl FnOnce() -> bool) -> After {
    let Some(pid) = files::read_request(mcf) else { return resume_if_orphaned(mcf, shared) };
    // SAFETY: nginx's pid of this process.
    let own = unsafe { nginx_sys::ngx_pid };
    if pid == own || !alive(pid) {
        return After::Nothing;
    }
    if let Some(mut z) = zone::lock(mcf) {
        z.store().journal_supersede();
        z.root().successor = pid;
    }
    if flush() {
        files::remove_request(mcf);
        shared.log(
            NGX_LOG_NOTICE,
            format!("martd_persist: handed the journal over to the new nginx master {pid}"),
        );
    }
    After::Nothing
}

fn resume_if_orphaned(mcf: &'static MainConf, shared: &Shared) -> After {
    let gone = zone::lock(mcf).and_then(|mut z| {
        let pid = z.root().successor;
        if pid == 0 || alive(pid) {
            return None;
        }
        z.root().successor = 0;
        z.store().journal_resume();
        Some(pid)
    });
    let Some(pid) = gone else { return After::Nothing };
    shared.log(
        NGX_LOG_WARN,
        format!(
            "martd_persist: the new nginx master {pid} that took the journal over is gone: \
             taking publishes again (what it stored is in the file, not in this zone, until \
             the next start)"
        ),
    );
    After::Reopen
}
