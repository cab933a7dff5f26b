//! Publishing envelopes with fred.

use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, PubsubInterface};

use crate::envelope::{Envelope, Op};
use crate::ids::{ClientId, InvalidId};
use crate::keys::Keys;
use crate::Session;

/// A message as the client will receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// A binary frame (else text).
    pub binary: bool,
    /// Exactly the bytes the client receives.
    pub data: Bytes,
}

impl Message {
    /// A text frame.
    pub fn text(text: impl Into<String>) -> Self {
        Message {
            binary: false,
            data: Bytes::from(text.into()),
        }
    }

    /// A binary frame.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Message {
            binary: true,
            data: data.into(),
        }
    }
}

/// Why a push could not be published.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// Redis refused or did not answer.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// A client_id that is not 20 hex characters.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
}

/// Publishes pushes and commands for a gatecast cluster through Redis.
///
/// Pushes are fire-and-forget, like every Redis pub/sub message: they reach
/// the clients connected at that moment (at-most-once). Membership commands
/// are applied by the node holding the client, in the order published; use
/// the HTTP API when you need to wait until a change is applied.
#[derive(Clone)]
pub struct Emitter {
    client: Client,
    keys: Keys,
    sharded: bool,
}

impl Emitter {
    /// An emitter over a connected fred client, for gateways started with
    /// `--redis-prefix prefix` (default `gatecast`).
    pub fn new(client: Client, prefix: &str) -> Self {
        let sharded = client.is_clustered();
        Emitter {
            client,
            keys: Keys::new(prefix),
            sharded,
        }
    }

    async fn publish(&self, channel: String, envelope: &Envelope) -> Result<(), EmitError> {
        let bytes = envelope.encode();
        if self.sharded {
            self.client.spublish::<i64, _, _>(channel, bytes).await?;
        } else {
            self.client.publish::<i64, _, _>(channel, bytes).await?;
        }
        Ok(())
    }

    fn push(message: Message, exclude: &[&str]) -> Result<Envelope, EmitError> {
        let mut e = Envelope::new(Op::Push);
        e.data = Some(message.data);
        e.binary = message.binary;
        e.exclude = normalize(exclude)?;
        // The accept time: gateways measure push-to-frame latency from it.
        e.ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_micros() as u64);
        Ok(e)
    }

    /// Sends to one connection.
    pub async fn send_to_client(&self, client_id: &str, message: Message) -> Result<(), EmitError> {
        let id: ClientId = client_id.parse()?;
        let mut e = Self::push(message, &[])?;
        e.client_ids = vec![id.to_string()];
        self.publish(self.keys.node_channel(id.node()), &e).await
    }

    /// Sends to every connection bound to `uid`.
    pub async fn send_to_uid(&self, uid: &str, message: Message) -> Result<(), EmitError> {
        let e = Self::push(message, &[])?;
        self.publish(self.keys.uid_channel(uid), &e).await
    }

    /// Sends to every member of `group` except `exclude`.
    pub async fn send_to_group(
        &self,
        group: &str,
        message: Message,
        exclude: &[&str],
    ) -> Result<(), EmitError> {
        self.send_to_groups(&[group], message, exclude).await
    }

    /// Sends to every member of these groups, once per connection, except
    /// `exclude`.
    pub async fn send_to_groups(
        &self,
        groups: &[&str],
        message: Message,
        exclude: &[&str],
    ) -> Result<(), EmitError> {
        let mut e = Self::push(message, exclude)?;
        if groups.len() > 1 {
            e.groups = groups.iter().map(|g| g.to_string()).collect();
        }
        for group in groups {
            self.publish(self.keys.group_channel(group), &e).await?;
        }
        Ok(())
    }

    /// Sends to every connection except `exclude`.
    pub async fn send_to_all(&self, message: Message, exclude: &[&str]) -> Result<(), EmitError> {
        let e = Self::push(message, exclude)?;
        self.publish(self.keys.all_channel(), &e).await
    }

    /// Closes a connection, after `last` if given.
    pub async fn close_client(
        &self,
        client_id: &str,
        last: Option<Message>,
    ) -> Result<(), EmitError> {
        let id: ClientId = client_id.parse()?;
        let mut e = Envelope::new(Op::Close);
        e.client_id = Some(id.to_string());
        if let Some(last) = last {
            e.binary = last.binary;
            e.data = Some(last.data);
        }
        self.publish(self.keys.node_channel(id.node()), &e).await
    }

    async fn command(&self, client_id: &str, mut e: Envelope) -> Result<(), EmitError> {
        let id: ClientId = client_id.parse()?;
        e.client_id = Some(id.to_string());
        self.publish(self.keys.node_channel(id.node()), &e).await
    }

    /// Binds `uid` to a connection (replacing the uid it had).
    pub async fn bind_uid(&self, client_id: &str, uid: &str) -> Result<(), EmitError> {
        let mut e = Envelope::new(Op::BindUid);
        e.uid = Some(uid.to_owned());
        self.command(client_id, e).await
    }

    /// Unbinds `uid` from a connection, if it is its uid.
    pub async fn unbind_uid(&self, client_id: &str, uid: &str) -> Result<(), EmitError> {
        let mut e = Envelope::new(Op::UnbindUid);
        e.uid = Some(uid.to_owned());
        self.command(client_id, e).await
    }

    /// Adds a connection to `group`.
    pub async fn join_group(&self, client_id: &str, group: &str) -> Result<(), EmitError> {
        let mut e = Envelope::new(Op::JoinGroup);
        e.group = Some(group.to_owned());
        self.command(client_id, e).await
    }

    /// Removes a connection from `group`.
    pub async fn leave_group(&self, client_id: &str, group: &str) -> Result<(), EmitError> {
        let mut e = Envelope::new(Op::LeaveGroup);
        e.group = Some(group.to_owned());
        self.command(client_id, e).await
    }

    /// Replaces a connection's session.
    pub async fn set_session(&self, client_id: &str, session: Session) -> Result<(), EmitError> {
        let mut e = Envelope::new(Op::SetSession);
        e.session = Some(session);
        self.command(client_id, e).await
    }

    /// Merges into a connection's session (nested objects merge).
    pub async fn update_session(&self, client_id: &str, session: Session) -> Result<(), EmitError> {
        let mut e = Envelope::new(Op::UpdateSession);
        e.session = Some(session);
        self.command(client_id, e).await
    }
}

fn normalize(ids: &[&str]) -> Result<Vec<String>, InvalidId> {
    ids.iter()
        .map(|s| s.parse::<ClientId>().map(|id| id.to_string()))
        .collect()
}
