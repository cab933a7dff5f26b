//! The process's file-descriptor limit. Every WebSocket holds a descriptor,
//! and containers often start processes with a soft `RLIMIT_NOFILE` of 1024
//! under a far higher hard limit: left alone, a node would refuse
//! connections past about a thousand while the system allows many more. An
//! unprivileged process may raise its soft limit up to the hard one, so the
//! node does that itself at start.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs the result;
/// returns the soft limit in force afterwards (`None` where it cannot be
/// read). A failure to raise is logged and leaves the limit as it was: the
/// node still runs, with fewer connections.
pub fn raise_to_hard_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let (soft, hard) = match rlimit::Resource::NOFILE.get() {
            Ok(limits) => limits,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the file descriptor limit");
                return None;
            }
        };
        // `increase_nofile_limit` also honours the per-process cap macOS
        // puts below the hard limit.
        match rlimit::increase_nofile_limit(hard) {
            Ok(limit) => {
                tracing::info!(limit, hard, was = soft, "file descriptor limit");
                Some(limit)
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    limit = soft,
                    hard,
                    "cannot raise the soft file descriptor limit to the hard one"
                );
                Some(soft)
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}
