//! Background tasks that must live as long as the node.
//! (Stub until helper-a lands the real module; same API.)

use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// Trips when a critical background task panics or ends: the node then
/// stops instead of running half-alive.
#[derive(Clone, Default, Debug)]
pub struct Fatal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Fatal {
    /// A fatal signal not tripped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trips it; the first reason wins.
    pub fn trip(&self, reason: String) {
        let mut r = self.reason.lock();
        if r.is_none() {
            tracing::error!(%reason, "stopping the node");
            *r = Some(reason);
        }
        self.token.cancel();
    }

    /// Why it tripped.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().clone()
    }

    /// Resolves once tripped.
    pub async fn tripped(&self) {
        self.token.cancelled().await
    }
}

/// Spawns a task that must run as long as the node.
pub fn spawn_critical<F>(name: &'static str, fatal: &Fatal, stop: &CancellationToken, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let fatal = fatal.clone();
    let stop = stop.clone();
    let handle = tokio::spawn(fut);
    tokio::spawn(async move {
        match handle.await {
            Err(e) if e.is_panic() => fatal.trip(format!("background task {name} panicked")),
            _ if !stop.is_cancelled() => fatal.trip(format!("background task {name} ended")),
            _ => {}
        }
    });
}

/// The same for a dedicated OS thread.
pub fn spawn_critical_thread<F>(name: &'static str, fatal: &Fatal, f: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    let fatal = fatal.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                fatal.trip(format!("background thread {name} panicked"));
            }
        })
        .map(|_| ())
}
