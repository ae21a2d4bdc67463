//! martd's own API (issue 9): channel attributes and keys, `martd_listen json`, JSONP,
//! `martd_client_js`, bad input.

#[path = "../harness/mod.rs"]
mod harness;
