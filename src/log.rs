//! Logging with the `martd:` prefix every line of ours carries.

/// `martd_log!(LEVEL, log_ptr, "format", args...)`
macro_rules! martd_log {
    ($level:expr, $log:expr, $fmt:literal $(, $arg:expr)* $(,)?) => {
        ngx::ngx_log_error!($level, $log, concat!("martd: ", $fmt) $(, $arg)*)
    };
}

/// `martd_debug!(log_ptr, "format", args...)`: an HTTP debug-level line (nginx built with
/// `--with-debug` and `error_log ... debug`); nothing otherwise.
macro_rules! martd_debug {
    ($log:expr, $fmt:literal $(, $arg:expr)* $(,)?) => {{
        ngx::ngx_log_debug!(
            mask: ngx::log::DebugMask::Http,
            $log,
            concat!("martd: ", $fmt) $(, $arg)*
        );
    }};
}
