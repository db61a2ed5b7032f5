//! Groups in the state machine: creation, membership changes and messages.
//!
//! Everything that happens to a group takes the next number of its group
//! sequence, in the group's shard, and becomes one inbox entry that
//! [`ChatMachine::distribute`] puts in the inbox of exactly the users who
//! are members right after it (plus the user who left or was removed, so
//! that it learns of it). Because a group's entries leave its shard through
//! ordered outbox channels, every member holds them in group order (G5).

use fishchat_raft::{ApplyError, StateTxn};

use crate::command::{
    CommandError, GroupChange, GroupEvent, GroupEventKind, InboxEntry, NewMember, OutboxRef,
    Outgoing, Reply, Role,
};
use crate::keys::{self, Addressee, CreateReceipt, Group, Member, SendReceipt};
use crate::machine::{corrupt, next, read_u64, receipt, valid_client_key, Spread};
use crate::{ChatMachine, GroupId, UserId};

/// Longest group name, in characters.
pub const MAX_GROUP_NAME: usize = 64;

/// Counter of group sequence numbers (group ids).
const GROUPS: &str = "groups";

/// True when `name` may name a group: 1 to 64 characters, none a control
/// character.
pub fn valid_group_name(name: &str) -> bool {
    let length = name.chars().count();
    (1..=MAX_GROUP_NAME).contains(&length) && !name.chars().any(char::is_control)
}

impl ChatMachine {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_group(
        &self,
        state: &mut dyn StateTxn,
        creator: UserId,
        request_key: String,
        name: String,
        members: Vec<NewMember>,
        max_members: u32,
        now_ms: u64,
    ) -> Result<Reply, ApplyError> {
        if !valid_client_key(&request_key) {
            return Ok(Reply::Refused(CommandError::InvalidRequestKey));
        }
        if !valid_group_name(&name) {
            return Ok(Reply::Refused(CommandError::InvalidGroupName));
        }
        if self.map.shard_of_group_request(creator, &request_key) != self.shard {
            return Ok(self.wrong_shard(format!("the group request {request_key:?}")));
        }
        let receipt_key = keys::create_receipt(creator, &request_key);
        if let Some(bytes) = state.get(&receipt_key)? {
            let first: CreateReceipt = keys::decode(&bytes).map_err(corrupt)?;
            return Ok(Reply::GroupCreated {
                group: first.group,
                duplicate: true,
                fanout: repeated(&first.fanout),
                appended: Vec::new(),
            });
        }
        let Some(owner) = members.iter().find(|m| m.user == creator).cloned() else {
            return Ok(Reply::Refused(CommandError::Malformed(
                "the creator is not among the initial members".into(),
            )));
        };
        let mut roster: Vec<Member> = members
            .into_iter()
            .map(|m| Member {
                role: if m.user == creator {
                    Role::Owner
                } else {
                    Role::Member
                },
                user: m.user,
                username: m.username,
                joined_seq: 1,
            })
            .collect();
        roster.sort_by_key(|m| m.user);
        roster.dedup_by_key(|m| m.user);
        if roster.len() > max_members as usize {
            return Ok(Reply::Refused(CommandError::GroupFull { max: max_members }));
        }
        let id = self.map.id_in_shard(self.shard, next(state, GROUPS)?);
        let group = Group {
            id,
            name,
            owner: creator,
            created_ms: now_ms,
            dissolved: false,
            members: roster,
        };
        let Spread { fanout, appended } = self.publish(
            state,
            &group,
            creator,
            None,
            now_ms,
            GroupEventKind::Created,
            &owner,
        )?;
        state.put(&keys::group_key(id), &keys::encode(&group));
        let receipt = CreateReceipt {
            group: id,
            fanout: fanout.iter().map(|o| o.to).collect(),
        };
        state.put(&receipt_key, &keys::encode(&receipt));
        Ok(Reply::GroupCreated {
            group: id,
            duplicate: false,
            fanout,
            appended,
        })
    }

    pub(crate) fn change_group(
        &self,
        state: &mut dyn StateTxn,
        actor: UserId,
        id: GroupId,
        change: GroupChange,
        max_members: u32,
        now_ms: u64,
    ) -> Result<Reply, ApplyError> {
        let mut group = match self.load_group(state, id)? {
            Ok(group) => group,
            Err(refusal) => return Ok(refusal),
        };
        let unchanged = Reply::GroupChanged {
            changed: false,
            group_seq: 0,
            fanout: Vec::new(),
            appended: Vec::new(),
        };
        // Membership first: a non-member learns nothing of the group's state.
        let Some(actor_role) = group.member(actor).map(|m| m.role) else {
            return Ok(match change {
                GroupChange::Leave => unchanged,
                _ => Reply::Refused(CommandError::NotAMember(id)),
            });
        };
        if group.dissolved {
            return Ok(match change {
                GroupChange::Dissolve if actor == group.owner => unchanged,
                _ => Reply::Refused(CommandError::GroupDissolved(id)),
            });
        }
        let not_allowed = |why: &str| Ok(Reply::Refused(CommandError::NotAllowed(why.into())));
        let (kind, subject, leaver) = match change {
            GroupChange::Add { member, role } => {
                if actor_role == Role::Member {
                    return not_allowed("only the owner or an admin adds members");
                }
                if role == Role::Owner || (role == Role::Admin && actor_role != Role::Owner) {
                    return not_allowed("only the owner adds admins, and a group has one owner");
                }
                if group.member(member.user).is_some() {
                    return Ok(unchanged);
                }
                if group.members.len() >= max_members as usize {
                    return Ok(Reply::Refused(CommandError::GroupFull { max: max_members }));
                }
                let joined = Member {
                    user: member.user,
                    username: member.username.clone(),
                    role,
                    // Set below, once the entry's sequence is known.
                    joined_seq: 0,
                };
                let at = group.members.partition_point(|m| m.user < member.user);
                group.members.insert(at, joined);
                (GroupEventKind::Added, member, None)
            }
            GroupChange::Remove { user } => {
                let Some(target) = group.member(user).cloned() else {
                    return Ok(unchanged);
                };
                let allowed = match target.role {
                    Role::Owner => false,
                    Role::Admin => actor_role == Role::Owner,
                    Role::Member => actor_role != Role::Member,
                };
                if !allowed {
                    return not_allowed(
                        "the owner removes admins and members, an admin removes members, \
                         and nobody removes the owner",
                    );
                }
                group.members.retain(|m| m.user != user);
                let subject = NewMember {
                    user,
                    username: target.username,
                };
                (GroupEventKind::Removed, subject, Some(user))
            }
            GroupChange::Leave => {
                if actor_role == Role::Owner {
                    return not_allowed("the owner cannot leave; dissolve the group instead");
                }
                let username = group
                    .member(actor)
                    .map(|m| m.username.clone())
                    .unwrap_or_default();
                group.members.retain(|m| m.user != actor);
                let subject = NewMember {
                    user: actor,
                    username,
                };
                (GroupEventKind::Left, subject, Some(actor))
            }
            GroupChange::Dissolve => {
                if actor_role != Role::Owner {
                    return not_allowed("only the owner dissolves the group");
                }
                group.dissolved = true;
                let username = group
                    .member(actor)
                    .map(|m| m.username.clone())
                    .unwrap_or_default();
                let subject = NewMember {
                    user: actor,
                    username,
                };
                (GroupEventKind::Dissolved, subject, None)
            }
        };
        let Spread { fanout, appended } =
            self.publish(state, &group, actor, leaver, now_ms, kind, &subject)?;
        let group_seq = read_u64(state, &keys::group_seq_key(id))?;
        if kind == GroupEventKind::Added {
            if let Ok(i) = group
                .members
                .binary_search_by_key(&subject.user, |m| m.user)
            {
                group.members[i].joined_seq = group_seq;
            }
        }
        state.put(&keys::group_key(id), &keys::encode(&group));
        Ok(Reply::GroupChanged {
            changed: true,
            group_seq,
            fanout,
            appended,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn group_send(
        &self,
        state: &mut dyn StateTxn,
        sender: UserId,
        id: GroupId,
        client_msg_id: String,
        body: Vec<u8>,
        content_type: String,
        now_ms: u64,
    ) -> Result<Reply, ApplyError> {
        if !valid_client_key(&client_msg_id) {
            return Ok(Reply::Refused(CommandError::InvalidClientMessageId));
        }
        let receipt_key = keys::receipt(sender, &client_msg_id);
        // The receipt is checked before the group: a retry of a message
        // committed before the group was dissolved answers as the first.
        if self.map.shard_of_group(id) == self.shard {
            if let Some(first) = receipt(state, &receipt_key)? {
                if first.addressee.is_some_and(|a| a != Addressee::Group(id)) {
                    return Ok(Reply::Refused(CommandError::ClientMessageIdReused));
                }
                return Ok(Reply::GroupSent {
                    message_id: first.message_id,
                    group_seq: first.version,
                    timestamp_ms: first.timestamp_ms,
                    duplicate: true,
                    fanout: repeated(&first.fanout),
                    appended: Vec::new(),
                });
            }
        }
        let group = match self.load_group(state, id)? {
            Ok(group) => group,
            Err(refusal) => return Ok(refusal),
        };
        if group.member(sender).is_none() {
            return Ok(Reply::Refused(CommandError::NotAMember(id)));
        }
        if group.dissolved {
            return Ok(Reply::Refused(CommandError::GroupDissolved(id)));
        }
        let group_seq = next_seq(state, id)?;
        let message_id = self.next_message_id(state)?;
        let entry = InboxEntry::group_message(
            message_id,
            sender,
            id,
            group_seq,
            body,
            content_type,
            now_ms,
        );
        let owners: Vec<UserId> = group.members.iter().map(|m| m.user).collect();
        let Spread { fanout, appended } = self.distribute(state, &owners, &entry)?;
        let receipt = SendReceipt {
            message_id,
            version: group_seq,
            timestamp_ms: now_ms,
            fanout: fanout.iter().map(|o| o.to).collect(),
            addressee: Some(Addressee::Group(id)),
        };
        state.put(&receipt_key, &keys::encode(&receipt));
        Ok(Reply::GroupSent {
            message_id,
            group_seq,
            timestamp_ms: now_ms,
            duplicate: false,
            fanout,
            appended,
        })
    }

    /// The group `id`, or the refusal that says why there is none here.
    fn load_group(
        &self,
        state: &dyn StateTxn,
        id: GroupId,
    ) -> Result<Result<Group, Reply>, ApplyError> {
        if self.map.shard_of_group(id) != self.shard {
            return Ok(Err(self.wrong_shard(format!("group {id}"))));
        }
        match state.get(&keys::group_key(id))? {
            Some(bytes) => Ok(Ok(keys::decode(&bytes).map_err(corrupt)?)),
            None => Ok(Err(Reply::Refused(CommandError::UnknownGroup(id)))),
        }
    }

    /// Takes the group's next sequence number for a membership event and
    /// puts the event in the inbox of every member of `group` (as it is
    /// after the change) and of `leaver`.
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        state: &mut dyn StateTxn,
        group: &Group,
        actor: UserId,
        leaver: Option<UserId>,
        now_ms: u64,
        kind: GroupEventKind,
        subject: &NewMember,
    ) -> Result<Spread, ApplyError> {
        let group_seq = next_seq(state, group.id)?;
        let entry = InboxEntry {
            version: 0,
            message_id: self.next_message_id(state)?,
            from: actor,
            to: 0,
            body: Vec::new(),
            content_type: String::new(),
            timestamp_ms: now_ms,
            group: group.id,
            group_seq,
            event: Some(GroupEvent {
                kind,
                user: subject.user,
                username: subject.username.clone(),
                group_name: group.name.clone(),
            }),
        };
        let mut owners: Vec<UserId> = group.members.iter().map(|m| m.user).collect();
        owners.extend(leaver);
        self.distribute(state, &owners, &entry)
    }
}

/// The outbox items of a repeated command, as its answer names them.
fn repeated(items: &[OutboxRef]) -> Vec<Outgoing> {
    items
        .iter()
        .map(|&to| Outgoing { to, delivery: None })
        .collect()
}

/// Takes the next number of `group`'s sequence.
fn next_seq(state: &mut dyn StateTxn, group: GroupId) -> Result<u64, ApplyError> {
    let key = keys::group_seq_key(group);
    let seq = read_u64(state, &key)? + 1;
    state.put(&key, &seq.to_be_bytes());
    Ok(seq)
}
