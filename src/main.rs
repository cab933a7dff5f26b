//! The `gatecast` binary: parse options, set up logging, run the node until
//! SIGTERM or SIGINT (exit 0), or until it cannot start or a critical task
//! fails (exit 1).

use clap::Parser;
use gatecast::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc returns freed memory to the system more readily than glibc's
/// allocator, which matters for a process whose connections come and go
/// in bursts (handshake buffers are large and short-lived). The
/// `system-alloc` feature leaves glibc's in place, for heap profilers that
/// hook malloc (heaptrack; docs/benchmarks.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands memory freed after a burst back to the system at once. mimalloc
/// purges freed memory after a delay (1 s), and only when a thread next
/// allocates: after a burst (a reconnect storm, 20,000 binds through
/// another node) the worker threads go idle and what the burst freed stays
/// resident, several KiB per connection (docs/benchmarks.md). A purge delay
/// of 0 returns it when it is freed. `MIMALLOC_PURGE_DELAY` still wins.
#[cfg(not(feature = "system-alloc"))]
fn tune_allocator() {
    // `mi_option_purge_delay` in mimalloc.h; the crate's bindings predate
    // the name (15 was `reset_delay`, the same option).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option has no preconditions; mimalloc reads
        // this one each time it considers a purge.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    #[cfg(not(feature = "system-alloc"))]
    tune_allocator();
    let config = Config::parse();
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    match gatecast::run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                gatecast::server::StartError::Fatal(_) => {
                    tracing::error!(error = %e, "gatecast stopped")
                }
                _ => tracing::error!(error = %e, "gatecast could not start"),
            }
            eprintln!("gatecast: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed
/// here, before the node starts, so a signal that arrives right after
/// start-up still drains the node instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
