//! Test harness for martd: a real nginx with the module, driven over real TCP connections.
#![allow(dead_code)]

pub mod backend;
pub mod conf;
pub mod h2;
pub mod http;
pub mod json;
pub mod nginx;
pub mod proto;
pub mod raw;
pub mod redis;
pub mod stream;
pub mod tls;

#[allow(unused_imports)]
pub use self::conf::*;
pub use self::http::*;
pub use self::nginx::*;
pub use self::proto::*;
pub use self::raw::*;
#[allow(unused_imports)]
pub use self::stream::*;
pub use self::tls::*;

use std::sync::{Mutex, MutexGuard};

static HEAVY: Mutex<()> = Mutex::new(());

/// Serialises the resource-hungry tests (thousands of connections, storms, timing bounds).
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a resource-hungry test body on its own runtime while holding the [`heavy`] lock.
pub fn heavy_test<F: std::future::Future>(f: F) -> F::Output {
    let _g = heavy();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// The usual publisher and listener locations, with extra directives for each.
pub fn pubsub(pub_extra: &str, sub_extra: &str) -> String {
    format!(
        "        location = /pub {{ martd_push; {pub_extra} }}\n        location = /sub {{ martd_listen; {sub_extra} }}\n"
    )
}
