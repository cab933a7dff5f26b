//! History in Redis (docs/redis.md, "History"): per stream a meta HASH
//! (`e` epoch, `o` top offset) and a LIST of entries, in the Cluster slot
//! of the stream's channel. Appending and publishing are one Redis Function
//! call (`<prefix>_push`), so live order is history order on every node;
//! backends call the same Function (docs/publishing.md).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use fred::prelude::*;
use fred::types::Value;
use futures_util::future::{BoxFuture, FutureExt, Shared as SharedFuture};
use parking_lot::Mutex;

use super::client::unavailable;
use super::envelope::{Envelope, EnvelopeRef, Op};
use super::{ids_to_strings, Shared};
use crate::engine::{EngineError, EngineResult};
use crate::push::{Message, Push, Target};
use crate::recovery::history::{
    group_stream, uid_stream, Entry, HistoryRead, HistorySettings, ALL_STREAM,
};

const SOURCE: &str = include_str!("functions/history.lua");

/// How long a stream's meta (epoch and top offset) outlives its last push:
/// a client idle longer than `--history-ttl` with nothing missed still
/// recovers.
const META_TTL_SECS: u64 = 24 * 3600;

/// The names of the history Function library and its functions.
#[derive(Debug, PartialEq, Eq)]
pub struct FunctionNames {
    /// The library.
    pub lib: String,
    /// Append and publish a push.
    pub push: String,
    /// Read a stream after an offset.
    pub since: String,
    /// Give a stream whose history went back a new epoch.
    pub new_epoch: String,
}

/// The names for `prefix`: only letters, digits and `_` (`gatecast` →
/// `gatecast_push`).
pub fn function_names(prefix: &str) -> FunctionNames {
    let lib: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    FunctionNames {
        push: format!("{lib}_push"),
        since: format!("{lib}_since"),
        new_epoch: format!("{lib}_new_epoch"),
        lib,
    }
}

fn lua_string(s: &str) -> String {
    // A Lua long string cannot be closed by any prefix without `]]`.
    let mut level = String::new();
    while s.contains(&format!("]{level}]")) {
        level.push('=');
    }
    format!("[{level}[{s}]{level}]")
}

/// The library's source for this node's options.
pub fn library(prefix: &str, settings: &HistorySettings, sharded: bool) -> String {
    let FunctionNames {
        lib,
        push,
        since,
        new_epoch,
    } = function_names(prefix);
    let source = SOURCE
        .replace("__PREFIX__", &lua_string(prefix))
        .replace("__SIZE__", &settings.size.to_string())
        .replace("__TTL__", &settings.ttl.as_secs().max(1).to_string())
        .replace(
            "__META_TTL__",
            &META_TTL_SECS.max(settings.ttl.as_secs()).to_string(),
        )
        .replace("__SHARDED__", if sharded { "true" } else { "false" })
        .replace(
            "__DEDUP_TTL__",
            &crate::recovery::history::INNER_DEDUP_WINDOW
                .as_secs()
                .to_string(),
        )
        .replace("__PUSH_NAME__", &format!("'{push}'"))
        .replace("__SINCE_NAME__", &format!("'{since}'"))
        .replace("__NEW_EPOCH_NAME__", &format!("'{new_epoch}'"));
    format!("#!lua name={lib}\n{source}")
}

impl Shared {
    /// Loads (or replaces) the history Functions on every primary.
    pub(super) async fn load_history(&self) -> Result<(), fred::error::Error> {
        let code = library(
            self.keys.prefix(),
            &self.settings.history,
            self.redis.sharded,
        );
        if self.redis.sharded {
            self.redis.client.function_load_cluster(true, code).await
        } else {
            self.redis
                .client
                .function_load::<String, _>(true, code)
                .await
                .map(|_| ())
        }
    }

    /// Runs a history Function, loading the library once if Redis lost it
    /// (restarted empty, FUNCTION FLUSH). Never retried otherwise: a push
    /// that may have run is an error for the caller, not a double append.
    async fn fcall(&self, name: &str, channel: String, args: Vec<Value>) -> EngineResult<Value> {
        let client = self.redis.client.with_options(&self.redis.once);
        let run = || client.fcall::<Value, _, _, _>(name, vec![channel.clone()], args.clone());
        match run().await {
            Err(e) if e.details().contains("Function not found") => {
                tracing::warn!("redis had lost gatecast's history Functions: loading them again");
                self.load_history().await.map_err(unavailable)?;
                run().await.map_err(unavailable)
            }
            result => result.map_err(unavailable),
        }
    }

    /// Publishes a push some of whose streams keep history: one call per
    /// channel, the kept ones through the push Function (append, then
    /// publish). This node's own clients get it from the echo, like every
    /// other node's, so every node delivers a stream in history order.
    /// With `dedup` (a push every node got from a GatewayClient), only the
    /// kept streams are sent, and the first node to send one appends and
    /// publishes it.
    pub(super) async fn publish_kept(&self, push: &Push, dedup: Option<&str>) -> EngineResult<()> {
        self.check()?;
        let mut e = Envelope::new(Op::Push);
        e.data = Some(push.message.data.clone());
        e.binary = push.message.binary;
        e.exclude = ids_to_strings(&push.exclude);
        e.ts = Some(super::accept_ts());
        let mut sends: Vec<(String, String, bytes::Bytes)> = Vec::new();
        match &push.target {
            Target::Uids(uids) => {
                let mut seen = std::collections::HashSet::new();
                for uid in uids.iter().filter(|u| seen.insert(*u)) {
                    sends.push((self.keys.uid_channel(uid), uid_stream(uid), e.encode()));
                }
            }
            Target::Groups(groups) => {
                let mut seen = std::collections::HashSet::new();
                let groups: Vec<&String> = groups.iter().filter(|g| seen.insert(*g)).collect();
                for (i, g) in groups.iter().enumerate() {
                    if groups.len() > 1 {
                        e.groups = groups[..=i].iter().map(|g| (*g).clone()).collect();
                    }
                    sends.push((self.keys.group_channel(g), group_stream(g), e.encode()));
                }
            }
            Target::All => sends.push((self.keys.all_channel(), ALL_STREAM.into(), e.encode())),
            Target::Client(_) | Target::Clients(_) => return Err(unavailable("not a stream")),
        }
        let push_fn = function_names(self.keys.prefix()).push;
        let calls = sends.into_iter().map(|(channel, stream, bytes)| {
            let push_fn = &push_fn;
            async move {
                if self.settings.history.keeps(&stream, push.history) {
                    let mut args = vec![Value::Bytes(bytes)];
                    args.extend(dedup.map(Value::from));
                    self.fcall(push_fn, channel, args).await.map(|_| ())
                } else if dedup.is_some() {
                    // Every node delivers this part itself.
                    Ok(())
                } else {
                    self.publish_one(channel, bytes).await.map(|_| ())
                }
            }
        });
        futures_util::future::try_join_all(calls).await.map(|_| ())
    }

    /// The channel of a stream name.
    pub(super) fn stream_channel(&self, stream: &str) -> Option<String> {
        if stream == ALL_STREAM {
            return Some(self.keys.all_channel());
        }
        if let Some(uid) = stream.strip_prefix("u:") {
            return Some(self.keys.uid_channel(uid));
        }
        stream
            .strip_prefix("g:")
            .map(|group| self.keys.group_channel(group))
    }

    /// What `stream` keeps after `offset`, read once for every concurrent
    /// resume of this node asking for the same range.
    pub(super) async fn history_since(
        self: &Arc<Self>,
        stream: &str,
        offset: u64,
    ) -> EngineResult<HistoryRead> {
        let s = self.clone();
        let owned = stream.to_owned();
        let read = async move { s.read_since(&owned, offset).await };
        self.reads.read(stream, offset, read).await
    }

    async fn read_since(&self, stream: &str, offset: u64) -> EngineResult<HistoryRead> {
        let reply = self.call_since(stream, offset).await?;
        Ok(self.parse_since(reply))
    }

    /// The history function's reply for `stream` after `offset` (epoch,
    /// top, entries), as Redis sent it: for a resume's read and for the
    /// gap repair's.
    pub(super) async fn call_since(&self, stream: &str, offset: u64) -> EngineResult<Value> {
        self.check()?;
        let channel = self
            .stream_channel(stream)
            .ok_or_else(|| unavailable("not a stream"))?;
        let since_fn = function_names(self.keys.prefix()).since;
        self.fcall(&since_fn, channel, vec![Value::from(offset as i64)])
            .await
    }

    /// Gives `stream` a new epoch if it is still at `epoch` (its history
    /// went back): whether this call renewed it.
    pub(super) async fn new_epoch(&self, stream: &str, epoch: &str) -> EngineResult<bool> {
        self.check()?;
        let channel = self
            .stream_channel(stream)
            .ok_or_else(|| unavailable("not a stream"))?;
        let name = function_names(self.keys.prefix()).new_epoch;
        let reply = self.fcall(&name, channel, vec![Value::from(epoch)]).await?;
        Ok(reply.as_u64() == Some(1))
    }

    fn parse_since(&self, reply: Value) -> HistoryRead {
        let Value::Array(mut parts) = reply else {
            return HistoryRead::default();
        };
        if parts.len() != 3 {
            return HistoryRead::default();
        }
        let entries = parts.pop().unwrap_or(Value::Null);
        let top = parts.pop().and_then(|v| v.as_u64()).unwrap_or(0);
        let Some(epoch) = parts.pop().and_then(|v| v.as_string()) else {
            return HistoryRead::default();
        };
        let cutoff = unix_ms().saturating_sub(self.settings.history.ttl.as_millis() as u64);
        let mut out = Vec::new();
        if let Value::Array(items) = entries {
            for item in items {
                let Some(bytes) = item.as_bytes() else {
                    continue;
                };
                let Ok(e) = EnvelopeRef::decode(bytes) else {
                    continue;
                };
                let (Some(o), Some(data)) = (e.o, e.data.as_deref()) else {
                    continue;
                };
                if e.t.is_some_and(|t| t < cutoff) {
                    // Older than --history-ttl: as good as gone.
                    continue;
                }
                out.push(Entry {
                    offset: o,
                    message: Message {
                        binary: e.binary,
                        data: bytes::Bytes::copy_from_slice(data),
                    },
                });
            }
        }
        HistoryRead {
            epoch: Some(epoch),
            top,
            entries: out,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Read = SharedFuture<BoxFuture<'static, Result<Arc<HistoryRead>, String>>>;

/// History reads in flight on this node, by stream and position: a resume
/// storm asking for one group's history reads it once.
#[derive(Default)]
pub struct Reads {
    inflight: Mutex<HashMap<(String, u64), Read>>,
}

impl Reads {
    /// The result of `read`, or of the same read already in flight.
    pub async fn read<F>(&self, stream: &str, offset: u64, read: F) -> EngineResult<HistoryRead>
    where
        F: Future<Output = EngineResult<HistoryRead>> + Send + 'static,
    {
        let key = (stream.to_owned(), offset);
        let shared = {
            let mut inflight = self.inflight.lock();
            match inflight.get(&key) {
                // A finished one is stale: history moved on since.
                Some(f) if f.peek().is_none() => f.clone(),
                _ => {
                    let f = read
                        .map(|r| r.map(Arc::new).map_err(|e| e.to_string()))
                        .boxed()
                        .shared();
                    inflight.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        let result = shared.clone().await;
        {
            let mut inflight = self.inflight.lock();
            if inflight.get(&key).is_some_and(|f| f.ptr_eq(&shared)) {
                inflight.remove(&key);
            }
        }
        result
            .map(|r| (*r).clone())
            .map_err(EngineError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_reads_of_one_range_read_once() {
        let reads = Arc::new(Reads::default());
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = futures_util::FutureExt::shared(rx);
        let read = |runs: Arc<std::sync::atomic::AtomicUsize>,
                    rx: futures_util::future::Shared<_>| async move {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = rx.await;
            Ok(HistoryRead {
                epoch: Some("e".into()),
                top: 3,
                entries: Vec::new(),
            })
        };
        let a = tokio::spawn({
            let (reads, f) = (reads.clone(), read(runs.clone(), rx.clone()));
            async move { reads.read("g:x", 1, f).await }
        });
        let b = tokio::spawn({
            let (reads, f) = (reads.clone(), read(runs.clone(), rx.clone()));
            async move { reads.read("g:x", 1, f).await }
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tx.send(()).unwrap();
        assert_eq!(a.await.unwrap().unwrap().top, 3);
        assert_eq!(b.await.unwrap().unwrap().top, 3);
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Finished: a later read reads again.
        let f = read(runs.clone(), rx.clone());
        reads.read("g:x", 1, f).await.unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn names_and_the_library_follow_the_prefix() {
        assert_eq!(
            function_names("app1:gc"),
            FunctionNames {
                lib: "app1_gc".into(),
                push: "app1_gc_push".into(),
                since: "app1_gc_since".into(),
                new_epoch: "app1_gc_new_epoch".into(),
            }
        );
        let lib = library("gate]]cast", &HistorySettings::default(), true);
        assert!(lib.starts_with("#!lua name=gate__cast\n"));
        assert!(lib.contains("[=[gate]]cast]=]"));
        assert!(lib.contains("local SHARDED = true"));
        assert!(!lib.contains("__SIZE__") && !lib.contains("__PREFIX__"));
    }
}
