//! Logging with the `martd:` prefix every line of ours carries.

/// `martd_log!(LEVEL, log_ptr, "format", args...)`
macro_rules! martd_log {
    ($level:expr, $log:expr, $fmt:literal $(, $arg:expr)* $(,)?) => {
        ngx::ngx_log_error!($level, $log, concat!("martd: ", $fmt) $(, $arg)*)
    };
}
