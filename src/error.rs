//! Errors, worded like nginx's own.

use thiserror::Error;

/// A directive's value is wrong (logged at `[emerg]` with the file and line).
#[derive(Debug, Error)]
pub enum ConfError {
    #[error("invalid martd_shm_size \"{0}\"")]
    InvalidSize(String),
    #[error("martd_shm_size \"{0}\" is too small, the minimum is {1}k")]
    ZoneTooSmall(String, usize),
    #[error("a location is one of \"martd_push\", \"martd_listen\", \"martd_clients\", \"martd_stats\" or \"martd_client_js\", once")]
    RoleTwice,
    #[error("invalid parameter \"{1}\" of \"{0}\": {2}")]
    BadArgument(String, String, &'static str),
    #[error("\"martd_listen\" names \"{0}\" twice")]
    TransportTwice(String),
}

/// Why a request's channel id is refused (the one-line body of a `400`).
#[derive(Debug, Error)]
pub enum ChannelIdError {
    #[error("no channel id provided")]
    Missing,
    #[error("channel id longer than {0} bytes (martd_max_channel_id_length)")]
    TooLong(usize),
    #[error("channel id with a control character")]
    Control,
}
