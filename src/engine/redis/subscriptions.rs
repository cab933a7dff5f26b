//! Which channels this node follows: its own node and reply channels and
//! `all` always, a group's or uid's channel exactly while the hub holds a member.
//! Only the mirror changes subscriptions, one batch at a time, so a
//! subscribe and an unsubscribe of one channel never cross, and a batch of
//! 5,000 new uids is a few SUBSCRIBE commands, not 5,000 round trips in
//! series.

use std::collections::HashSet;

use super::mirror::Follow;
use super::subscriber::Refused;
use super::Shared;

/// The channels subscribed, as far as this node knows.
#[derive(Debug, Default)]
pub struct Subscriptions {
    /// Boxed strings, exactly as long as the name: one entry per uid bound
    /// on this node, so per connection.
    channels: HashSet<Box<str>>,
}

impl Subscriptions {
    /// Subscribes or unsubscribes `follows` to match the hub now. Returns
    /// the channels Redis refused (ACL), left unsubscribed.
    pub async fn follow(
        &mut self,
        s: &Shared,
        follows: &HashSet<Follow>,
    ) -> Result<Refused, fred::error::Error> {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        for follow in follows {
            let channel = follow.channel(&s.keys);
            match (
                follow.wanted(&s.hub),
                self.channels.contains(channel.as_str()),
            ) {
                (true, false) => subscribe.push(channel),
                (false, true) => unsubscribe.push(channel),
                _ => {}
            }
        }
        for channel in &subscribe {
            s.forget_gaps(channel);
        }
        self.apply(s, subscribe, unsubscribe).await
    }

    /// After a reconnection: subscribes to every channel the node needs
    /// (the subscriber connection may have lost them all) and drops those
    /// it no longer needs. Returns the channels Redis refused (ACL).
    pub async fn resync(&mut self, s: &Shared) -> Result<Refused, fred::error::Error> {
        let mut wanted: HashSet<String> = HashSet::new();
        wanted.insert(s.keys.node_channel(s.node));
        wanted.insert(s.keys.reply_channel(s.node));
        wanted.insert(s.keys.all_channel());
        wanted.extend(s.hub.groups().iter().map(|g| s.keys.group_channel(g)));
        wanted.extend(s.hub.uids().iter().map(|u| s.keys.uid_channel(u)));
        let stale: Vec<String> = self
            .channels
            .iter()
            .filter(|c| !wanted.contains(&***c))
            .map(|c| c.to_string())
            .collect();
        // Known as subscribed only once Redis confirmed it.
        self.channels.retain(|c| !wanted.contains(&**c));
        self.apply(s, wanted.into_iter().collect(), stale).await
    }

    /// Subscribes first, then unsubscribes, each confirmed by Redis. A
    /// channel Redis refuses (an ACL without it) stays unsubscribed and is
    /// returned: the batch goes on, and whoever waited for that channel
    /// gets the error (it is tried again at its next change or resync, not
    /// in a loop). A channel stays known as subscribed until Redis
    /// confirmed the UNSUBSCRIBE: a failed one is tried again (the batch is
    /// retried), never forgotten while live.
    async fn apply(
        &mut self,
        s: &Shared,
        subscribe: Vec<String>,
        unsubscribe: Vec<String>,
    ) -> Result<Refused, fred::error::Error> {
        let mut refused = Refused::new();
        if !subscribe.is_empty() {
            refused = s.redis.subscriber.subscribe(subscribe.clone()).await?;
            let no: HashSet<&str> = refused.iter().map(|(c, _)| c.as_str()).collect();
            self.channels.extend(
                subscribe
                    .into_iter()
                    .filter(|c| !no.contains(c.as_str()))
                    .map(String::into_boxed_str),
            );
        }
        if !unsubscribe.is_empty() {
            s.redis.subscriber.unsubscribe(unsubscribe.clone()).await?;
            for channel in &unsubscribe {
                self.channels.remove(channel.as_str());
            }
        }
        s.metrics
            .redis_subscriptions
            .set(self.channels.len() as i64);
        Ok(refused)
    }
}
