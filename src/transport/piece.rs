//! Bytes a stream writes, and what keeps them alive until nginx has sent them.

use std::ptr;
use std::rc::Rc;

use martd_core::listeners::Payload;
use nginx_sys::ngx_buf_t;

/// What keeps the bytes of a buffer in nginx's hands alive (held, never read).
#[allow(dead_code)]
pub(super) enum Keep {
    Payload(Rc<Payload>),
    /// Bytes of this stream's own (a WebSocket control frame).
    Owned(Box<[u8]>),
    /// Static bytes, or the location's configuration (lives as long as the worker's cycle).
    Lasting,
}

/// Bytes to write and what keeps them alive: `bytes` points into `keep` (or is static).
pub(super) struct Piece {
    bytes: *const [u8],
    keep: Keep,
}

impl Piece {
    pub(super) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(super) fn into_parts(self) -> (*const [u8], Keep) {
        (self.bytes, self.keep)
    }

    pub(super) fn payload(bytes: &[u8], p: &Rc<Payload>) -> Piece {
        Piece { bytes, keep: Keep::Payload(p.clone()) }
    }

    pub(super) fn owned(bytes: Box<[u8]>) -> Piece {
        Piece { bytes: &*bytes as *const [u8], keep: Keep::Owned(bytes) }
    }

    pub(super) fn lasting(bytes: &'static [u8]) -> Piece {
        Piece { bytes, keep: Keep::Lasting }
    }
}

/// Sets buffer header `b` to `bytes` (in memory, nothing else).
///
/// # Safety
/// `b` is a valid buffer header not in anyone's hands; `bytes` outlive its use.
pub(super) unsafe fn point_at(b: *mut ngx_buf_t, bytes: &[u8]) {
    // SAFETY: as the caller promises.
    unsafe {
        ptr::write_bytes(b, 0, 1);
        let start = bytes.as_ptr() as *mut u8;
        (*b).start = start;
        (*b).pos = start;
        (*b).last = start.add(bytes.len());
        (*b).end = (*b).last;
        (*b).set_memory(1);
    }
}
