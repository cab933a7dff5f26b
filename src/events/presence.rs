//! Presence transitions (`--presence-events`): the four changes a uid or
//! a group goes through cluster-wide, as events name them.

/// A presence transition, cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// A uid's first connection anywhere.
    Online,
    /// A uid's last connection anywhere is gone (after the grace).
    Offline,
    /// A group's first member anywhere.
    Occupied,
    /// A group's last member anywhere is gone (after the grace).
    Vacated,
}

impl PresenceChange {
    /// The event type.
    pub fn kind(self) -> &'static str {
        match self {
            PresenceChange::Online => "online",
            PresenceChange::Offline => "offline",
            PresenceChange::Occupied => "occupied",
            PresenceChange::Vacated => "vacated",
        }
    }

    /// The field that names what changed: `uid` or `group`.
    pub fn field(self) -> &'static str {
        match self {
            PresenceChange::Online | PresenceChange::Offline => "uid",
            PresenceChange::Occupied | PresenceChange::Vacated => "group",
        }
    }
}
