//! The journal file, reached through a descriptor of its directory that the master opens (as
//! nginx opens its log files): workers inherit it, so the file works wherever the directory is,
//! even under a path the workers' user could not walk (a prefix in `/root`). The master makes
//! the directory and, started as root, gives it and the file to the workers' user.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;

use crate::conf::MainConf;

/// The journal's name in its directory, and the name a compaction writes first.
const FILE: &str = "martd.journal";
const COMPACTING: &str = "martd.journal.compact";
/// A binary upgrade's request to the running zone (see `upgrade`): the new master's pid.
const REQUEST: &str = "martd.handover";

fn cname(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The directory's descriptor, or why there is none.
fn dir_fd(mcf: &MainConf) -> io::Result<libc::c_int> {
    if mcf.persist_dir_fd < 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, "the directory could not be opened"));
    }
    Ok(mcf.persist_dir_fd)
}

fn open_at(mcf: &MainConf, name: &str, flags: libc::c_int) -> io::Result<File> {
    let dir = dir_fd(mcf)?;
    let n = cname(name)?;
    // SAFETY: a NUL-terminated name relative to our open directory.
    let fd = unsafe { libc::openat(dir, n.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // The workers' user must be able to write a file the master made.
    if mcf.persist_user != libc::uid_t::MAX {
        // SAFETY: `fd` is ours; a failure leaves the owner as it was.
        unsafe { libc::fchown(fd, mcf.persist_user, libc::gid_t::MAX) };
    }
    // SAFETY: `fd` was just opened and is owned by the `File` from here on.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The journal, opened to read and append (made if missing).
pub fn open_journal(mcf: &MainConf) -> io::Result<File> {
    open_at(mcf, FILE, libc::O_RDWR | libc::O_APPEND | libc::O_CREAT)
}

/// The journal's bytes (none if it does not exist).
pub fn read_journal(mcf: &MainConf) -> io::Result<Vec<u8>> {
    match open_at(mcf, FILE, libc::O_RDONLY) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b)?;
            Ok(b)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Puts `bytes` in the journal's place: written to another name, synced, renamed over it, and
/// the directory synced.
pub fn replace_journal(mcf: &MainConf, bytes: &[u8]) -> io::Result<()> {
    {
        let mut t = open_at(mcf, COMPACTING, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)?;
        t.write_all(bytes)?;
        t.sync_all()?;
    }
    let dir = dir_fd(mcf)?;
    let (from, to) = (cname(COMPACTING)?, cname(FILE)?);
    // SAFETY: NUL-terminated names relative to our open directory.
    if unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: our directory's descriptor.
    unsafe { libc::fsync(dir) };
    Ok(())
}

/// Writes the hand-over request (`pid`), replacing any left over.
pub fn write_request(mcf: &MainConf, pid: i32) -> io::Result<()> {
    let mut f = open_at(mcf, REQUEST, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)?;
    f.write_all(pid.to_string().as_bytes())
}

/// The pid in the hand-over request, if there is one.
pub fn read_request(mcf: &MainConf) -> Option<i32> {
    let mut f = open_at(mcf, REQUEST, libc::O_RDONLY).ok()?;
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Removes the hand-over request (answered, or given up).
pub fn remove_request(mcf: &MainConf) {
    let (Ok(dir), Ok(n)) = (dir_fd(mcf), cname(REQUEST)) else { return };
    // SAFETY: a NUL-terminated name relative to our open directory.
    unsafe { libc::unlinkat(dir, n.as_ptr(), 0) };
}

/// The master, at configuration: makes the directory, gives it to the workers' user `user`
/// (`uid_t::MAX`: leave it), and opens it. The descriptor is closed with the cycle.
pub fn open_dir(mcf: &mut MainConf, dir: &str, user: libc::uid_t) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let d = cname(dir)?;
    if user != libc::uid_t::MAX {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::chown(d.as_ptr(), user, libc::gid_t::MAX) };
    }
    // SAFETY: a NUL-terminated path.
    let fd =
        unsafe { libc::open(d.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    mcf.persist_dir_fd = fd;
    mcf.persist_user = user;
    let cycle = mcf.persist_cycle;
    // SAFETY: the cycle being configured; its pool goes with it, and the cleanup closes the
    // descriptor then (a reload's new cycle opens its own).
    unsafe {
        if !cycle.is_null() {
            let cln = nginx_sys::ngx_pool_cleanup_add((*cycle).pool, 0);
            if !cln.is_null() {
                (*cln).handler = Some(close_dir);
                (*cln).data = fd as usize as *mut std::ffi::c_void;
            }
        }
    }
    Ok(())
}

extern "C" fn close_dir(data: *mut std::ffi::c_void) {
    // SAFETY: the descriptor `open_dir` stored; its cycle is going.
    unsafe { libc::close(data as usize as libc::c_int) };
}
