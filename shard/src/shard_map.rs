//! Which shard owns a user, a username, a message.

use std::hash::Hasher;

use serde::{Deserialize, Serialize};

/// Index of a shard, `0..shard_count`.
pub type ShardId = u32;

/// A user's numeric id, assigned by the shard that owns the user.
pub type UserId = u64;

/// A group's numeric id, assigned by the shard that owns the group (its own
/// numbering: a group and a user may have the same number).
pub type GroupId = u64;

/// The fixed partition of users over shards, chosen when the cluster is
/// initialised and never changed afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    shards: u32,
}

impl ShardMap {
    /// A map of `shards` shards; `None` for zero.
    pub fn new(shards: u32) -> Option<Self> {
        (shards > 0).then_some(Self { shards })
    }

    /// How many shards there are.
    pub fn shard_count(&self) -> u32 {
        self.shards
    }

    /// The shard that owns user `user`: the residue its id was assigned with.
    pub fn shard_of_user(&self, user: UserId) -> ShardId {
        (user % u64::from(self.shards)) as ShardId
    }

    /// The shard that owns `username`: registration happens there, and so the
    /// user it creates belongs to it too. Usernames are compared lowercased.
    pub fn shard_of_username(&self, username: &str) -> ShardId {
        let hash = fnv1a64(username.to_lowercase().as_bytes());
        (hash % u64::from(self.shards)) as ShardId
    }

    /// The shard that owns group `group`: the residue its id was assigned with.
    pub fn shard_of_group(&self, group: GroupId) -> ShardId {
        (group % u64::from(self.shards)) as ShardId
    }

    /// The shard that creates (and so owns) the group `creator` asks for
    /// under `request_key`: a retry reaches the same shard, which recognises
    /// it, and groups spread over all shards.
    pub fn shard_of_group_request(&self, creator: UserId, request_key: &str) -> ShardId {
        let mut hasher = fnv::FnvHasher::default();
        hasher.write(&creator.to_be_bytes());
        hasher.write(request_key.as_bytes());
        (hasher.finish() % u64::from(self.shards)) as ShardId
    }

    /// The `sequence`-th id issued by `shard` (users, groups and messages).
    pub fn id_in_shard(&self, shard: ShardId, sequence: u64) -> u64 {
        sequence * u64::from(self.shards) + u64::from(shard)
    }
}

/// 64-bit FNV-1a: stable across builds, so every node maps a name alike.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_issued_by_a_shard_maps_back_to_it() {
        let map = ShardMap::new(16).expect("non-zero");
        for shard in 0..16 {
            for sequence in [1, 2, 1000, u64::MAX / 64] {
                assert_eq!(map.shard_of_user(map.id_in_shard(shard, sequence)), shard);
            }
        }
    }

    #[test]
    fn usernames_map_case_insensitively_and_spread_over_shards() {
        let map = ShardMap::new(16).expect("non-zero");
        assert_eq!(
            map.shard_of_username("Alice"),
            map.shard_of_username("alice")
        );
        let used: std::collections::BTreeSet<_> = (0..200)
            .map(|i| map.shard_of_username(&format!("user{i}")))
            .collect();
        assert_eq!(used.len(), 16, "200 names reach every one of 16 shards");
    }

    #[test]
    fn a_map_needs_at_least_one_shard() {
        assert!(ShardMap::new(0).is_none());
    }
}
