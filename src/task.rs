//! Background tasks the node cannot live without (the ping sweeper, the
//! listeners, the engine's receive loop...). A panic in a plain
//! `tokio::spawn` only ends that task: the node would go on answering
//! `/healthz` while nobody sweeps, listens or receives. These helpers turn
//! such a failure into [`Fatal`], which stops the whole node (exit code 1),
//! so the orchestrator restarts it.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

/// Trips when a critical background task panics or ends: the node then
/// stops (exit code 1) instead of running half-alive.
#[derive(Clone, Default, Debug)]
pub struct Fatal {
    /// Cancelled once tripped; `tripped` waits on it.
    token: CancellationToken,
    /// Why it tripped: the first reason only, set before `token` is
    /// cancelled so whoever wakes up finds it.
    reason: Arc<OnceLock<String>>,
}

impl Fatal {
    /// A `Fatal` that has not tripped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trips: the node stops. Logged at error level; when several failures
    /// come, the first reason is the one reported (later ones are usually
    /// consequences of it), the others are only logged.
    pub fn trip(&self, reason: String) {
        tracing::error!(%reason, "critical task failed: stopping the node");
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Why it tripped, if it did.
    pub fn reason(&self) -> Option<String> {
        self.reason.get().cloned()
    }

    /// Resolves once tripped (at once if it already was).
    pub async fn tripped(&self) {
        self.token.cancelled().await
    }
}

/// Spawns a task that must run as long as the node: if it panics, or
/// returns before `stop` is cancelled, `fatal` trips. A panic trips `fatal`
/// even after `stop`: it is a bug worth an error line wherever it happens.
pub fn spawn_critical<F>(name: &'static str, fatal: &Fatal, stop: &CancellationToken, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let fatal = fatal.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        // The task owns its future: nothing observes it half-run after a
        // panic, so unwind safety is not at stake.
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(()) if stop.is_cancelled() => {}
            Ok(()) => fatal.trip(format!("{name} ended while the node was running")),
            Err(panic) => fatal.trip(format!("{name} panicked: {}", panic_message(&*panic))),
        }
    });
}

/// The same for a dedicated OS thread (a blocking loop): `fatal` trips if
/// it panics, or returns before `stop` is cancelled.
pub fn spawn_critical_thread<F>(
    name: &'static str,
    fatal: &Fatal,
    stop: &CancellationToken,
    f: F,
) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    let fatal = fatal.clone();
    let stop = stop.clone();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(
            move || match std::panic::catch_unwind(AssertUnwindSafe(f)) {
                Ok(()) if stop.is_cancelled() => {}
                Ok(()) => fatal.trip(format!("{name} thread ended")),
                Err(panic) => fatal.trip(format!(
                    "{name} thread panicked: {}",
                    panic_message(&*panic)
                )),
            },
        )
        .map(drop)
}

/// The message of a panic (`panic!` gives a `&str` or a `String`).
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Bound on every wait here; nothing should come near it.
    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_panicking_task_trips_fatal_with_its_message() {
        let (fatal, stop) = (Fatal::new(), CancellationToken::new());
        spawn_critical("sweeper", &fatal, &stop, async { panic!("boom") });
        tokio::time::timeout(WAIT, fatal.tripped())
            .await
            .expect("fatal trips");
        let reason = fatal.reason().expect("a reason");
        assert!(reason.contains("sweeper"), "{reason}");
        assert!(reason.contains("boom"), "{reason}");
    }

    #[tokio::test]
    async fn a_task_ending_before_stop_trips_fatal() {
        let (fatal, stop) = (Fatal::new(), CancellationToken::new());
        spawn_critical("listener", &fatal, &stop, async {});
        tokio::time::timeout(WAIT, fatal.tripped())
            .await
            .expect("fatal trips");
        assert!(fatal.reason().unwrap().contains("listener ended"));
    }

    /// On the test's single-threaded runtime, the wrapper decides whether
    /// to trip in the same poll in which the task ends; so once the test
    /// hears from the task's last line, the decision is made.
    #[tokio::test]
    async fn a_task_ending_after_stop_does_not_trip() {
        let (fatal, stop) = (Fatal::new(), CancellationToken::new());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let task_stop = stop.clone();
        spawn_critical("sweeper", &fatal, &stop, async move {
            task_stop.cancelled().await;
            let _ = done_tx.send(());
        });
        stop.cancel();
        tokio::time::timeout(WAIT, done_rx)
            .await
            .expect("the task ends")
            .unwrap();
        tokio::task::yield_now().await;
        assert_eq!(fatal.reason(), None);
    }

    #[tokio::test]
    async fn the_first_reason_wins() {
        let fatal = Fatal::new();
        fatal.trip("first".into());
        fatal.trip("second".into());
        assert_eq!(fatal.reason().as_deref(), Some("first"));
        // Already tripped: resolves at once.
        tokio::time::timeout(WAIT, fatal.tripped()).await.unwrap();
    }

    #[test]
    fn a_panicking_thread_trips_fatal() {
        let fatal = Fatal::new();
        spawn_critical_thread("blocking loop", &fatal, &CancellationToken::new(), || {
            panic!("thread boom")
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(WAIT, fatal.tripped())
                .await
                .expect("fatal trips")
        });
        assert!(fatal.reason().unwrap().contains("thread boom"));
    }
}
