//! Accepting TCP connections when `accept` fails. Out of file descriptors,
//! the kernel keeps failing `accept` for as long as connections wait in the
//! backlog: without care a listener spins on the error and floods the log
//! with one line per attempt. Here every failure is counted
//! (`gatecast_accept_errors_total`), logged at most once a second with the
//! number left unlogged, and followed by a short pause.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// Pause after a failure that is not about one connection (no descriptor,
/// no memory): short, so the listener recovers quickly once descriptors
/// free up, long enough not to spin.
const BACKOFF: Duration = Duration::from_millis(50);

/// Least time between two log lines about failed accepts on one listener.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// A listener whose `accept` never fails: failures are counted, logged
/// (throttled) and retried.
pub struct Acceptor {
    listener: TcpListener,
    /// Which listener, for the log.
    what: &'static str,
    metrics: Arc<Metrics>,
    log: Throttle,
}

impl Acceptor {
    /// Wraps a bound listener; `what` names it in the log.
    pub fn new(listener: TcpListener, what: &'static str, metrics: Arc<Metrics>) -> Self {
        Acceptor {
            listener,
            what,
            metrics,
            log: Throttle::default(),
        }
    }

    /// The next connection, with `TCP_NODELAY` set: gatecast's messages are
    /// small and latency matters more than packet count. Cancel-safe.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return (stream, peer);
                }
                Err(e) => self.failed(e).await,
            }
        }
    }

    async fn failed(&mut self, error: io::Error) {
        self.metrics.accept_errors.inc();
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            tracing::warn!(
                listener = self.what,
                error = %error,
                suppressed,
                "accept failed (logged at most once a second, `suppressed` since the last line)"
            );
        }
        if !is_about_one_connection(&error) {
            tokio::time::sleep(BACKOFF).await;
        }
    }
}

impl axum::serve::Listener for Acceptor {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        Acceptor::accept(self).await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Failures that concern the one connection being accepted (it was reset
/// while waiting): the next one can be tried at once.
fn is_about_one_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Lets one log line through per [`LOG_EVERY`] and counts the others.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(failures not logged since the last line)` when a line may be
    /// logged at `now`, else `None` (and this failure is counted).
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_at_most_once_a_second_and_counts_the_rest() {
        let mut log = Throttle::default();
        let start = Instant::now();
        assert_eq!(log.allow(start), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(log.allow(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.allow(start + Duration::from_millis(1000)), Some(4));
        assert_eq!(log.allow(start + Duration::from_millis(1500)), None);
        assert_eq!(log.allow(start + Duration::from_millis(5000)), Some(1));
    }

    #[test]
    fn running_out_of_descriptors_is_not_about_one_connection() {
        let emfile = io::Error::from_raw_os_error(24);
        assert!(!is_about_one_connection(&emfile));
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert!(is_about_one_connection(&reset));
    }
}
