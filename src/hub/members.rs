//! The members of one group in one shard of the hub's index.
//!
//! A connection lives in one of the index's shards, so a group's members
//! are spread over all of them: with many small groups most shards hold a
//! handful of each group's members. A hash set costs ~160 bytes at any
//! size up to 7 (and 48 more in the map's slot); a short vector, searched
//! in place, costs 16 bytes a member. Past [`SPILL`] members the set
//! comes back, so a big group's joins and leaves stay O(1).

use std::collections::HashSet;

use crate::ids::ClientId;

/// Members kept in a vector up to this many.
const SPILL: usize = 16;

/// A group's members in one shard: a vector while few, then a set.
#[derive(Debug, Clone)]
pub enum Members {
    /// Up to [`SPILL`] members, in no order.
    Few(Vec<ClientId>),
    /// More. Boxed on purpose: a set is 48 bytes inline, and every slot
    /// of the group map (most of them `Few`) would be that size.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<ClientId>>),
}

impl Default for Members {
    fn default() -> Self {
        Members::Few(Vec::new())
    }
}

impl Members {
    /// Adds `id`; whether it was not a member.
    pub fn insert(&mut self, id: ClientId) -> bool {
        match self {
            Members::Few(ids) if ids.contains(&id) => false,
            Members::Few(ids) if ids.len() < SPILL => {
                ids.push(id);
                true
            }
            Members::Few(ids) => {
                let mut set: HashSet<ClientId> = ids.drain(..).collect();
                set.insert(id);
                *self = Members::Many(Box::new(set));
                true
            }
            Members::Many(set) => set.insert(id),
        }
    }

    /// Removes `id`; whether it was a member.
    pub fn remove(&mut self, id: &ClientId) -> bool {
        match self {
            Members::Few(ids) => {
                let Some(pos) = ids.iter().position(|m| m == id) else {
                    return false;
                };
                ids.swap_remove(pos);
                // Give back what a group that shrank no longer needs.
                if ids.capacity() > 2 * ids.len() + 4 {
                    ids.shrink_to_fit();
                }
                true
            }
            Members::Many(set) => {
                let removed = set.remove(id);
                // Back to a vector well below the spill, so a group at the
                // threshold does not switch on every join and leave.
                if set.len() <= SPILL / 2 {
                    *self = Members::Few(set.drain().collect());
                }
                removed
            }
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        match self {
            Members::Few(ids) => ids.len(),
            Members::Many(set) => set.len(),
        }
    }

    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every member, in no order.
    pub fn iter(&self) -> Iter<'_> {
        match self {
            Members::Few(ids) => Iter::Few(ids.iter()),
            Members::Many(set) => Iter::Many(set.iter()),
        }
    }
}

/// The members of a [`Members`], borrowed.
pub enum Iter<'a> {
    /// Of a vector.
    Few(std::slice::Iter<'a, ClientId>),
    /// Of a set.
    Many(std::collections::hash_set::Iter<'a, ClientId>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a ClientId;

    fn next(&mut self) -> Option<&'a ClientId> {
        match self {
            Iter::Few(ids) => ids.next(),
            Iter::Many(ids) => ids.next(),
        }
    }
}

impl<'a> IntoIterator for &'a Members {
    type Item = &'a ClientId;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeId;

    fn id(n: u32) -> ClientId {
        ClientId::new(NodeId::new(std::net::Ipv4Addr::LOCALHOST, 1), n)
    }

    #[test]
    fn a_slot_is_a_vector_s_size() {
        assert_eq!(
            std::mem::size_of::<Members>(),
            std::mem::size_of::<Vec<ClientId>>()
        );
    }

    #[test]
    fn a_set_of_members_across_the_spill_and_back() {
        let mut m = Members::default();
        assert!(m.is_empty());
        for n in 0..40 {
            assert!(m.insert(id(n)), "{n} is new");
            assert!(!m.insert(id(n)), "{n} is a member already");
        }
        assert!(matches!(m, Members::Many(_)));
        assert_eq!(m.len(), 40);
        let mut seen: Vec<u32> = m.iter().map(|c| c.number()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        for n in 0..35 {
            assert!(m.remove(&id(n)));
            assert!(!m.remove(&id(n)));
        }
        assert!(matches!(m, Members::Few(_)), "back to a vector");
        let mut seen: Vec<u32> = (&m).into_iter().map(|c| c.number()).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![35, 36, 37, 38, 39]);
        for n in 35..40 {
            assert!(m.remove(&id(n)));
        }
        assert!(m.is_empty());
    }
}
