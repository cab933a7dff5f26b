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

fn main() -> std::process::ExitCode {
    gatecast::allocator::tune();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // A worker that goes idle hands back what the last burst freed.
        .on_thread_park(gatecast::allocator::collect_if_due)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("gatecast: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
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
