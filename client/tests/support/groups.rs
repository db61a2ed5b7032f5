//! The fake cluster's groups: just enough of `proto/client.proto`, "Groups",
//! to exercise the client. One group sequence per group, shared by messages
//! and membership events; each entry goes to the members right after it
//! (and to a user who was removed or left), with `recipient_id` the inbox
//! owner, as the real server does. Roles and the max group size are
//! checked; `request_key` and `client_msg_id` repeats answer the first
//! result with `duplicate = true`.

use std::collections::{BTreeMap, HashMap};

use fishchat_client::proto::{
    group_event, request, response, CreateGroupResponse, ErrorCode, GroupChangeResponse,
    GroupEvent, GroupMember, GroupMembersResponse, GroupRole, GroupSendResponse, GroupSummary,
    InboxEntry, ListGroupsResponse,
};

use super::World;

/// Every group of the fake cluster.
pub(super) struct Groups {
    /// The largest group, owner included.
    pub(super) max_members: usize,
    /// Group `id` is at index `id - 1`.
    groups: Vec<Group>,
    /// (creator, request_key) -> group id.
    created: HashMap<(u64, String), u64>,
    /// (sender, client_msg_id) -> the first answer.
    sent: HashMap<(u64, String), GroupSendResponse>,
}

impl Default for Groups {
    fn default() -> Self {
        Groups {
            max_members: 1000,
            groups: Vec::new(),
            created: HashMap::new(),
            sent: HashMap::new(),
        }
    }
}

struct Group {
    name: String,
    owner: u64,
    created_ms: u64,
    /// user id -> (role, joined_seq).
    members: BTreeMap<u64, (GroupRole, u64)>,
    seq: u64,
    dissolved: bool,
}

impl Group {
    fn role(&self, user: u64) -> Option<GroupRole> {
        self.members.get(&user).map(|(role, _)| *role)
    }
}

/// The answer to a group operation by `user`, or the error code.
pub(super) fn answer(
    world: &mut World,
    user: u64,
    body: request::Body,
) -> Result<response::Body, ErrorCode> {
    match body {
        request::Body::CreateGroup(c) => {
            if c.request_key.is_empty() || c.request_key.len() > 128 {
                return Err(ErrorCode::BadRequest);
            }
            let chars = c.name.chars().count();
            if chars == 0 || chars > 64 || c.name.chars().any(char::is_control) {
                return Err(ErrorCode::BadRequest);
            }
            if let Some(&group_id) = world.groups.created.get(&(user, c.request_key.clone())) {
                return Ok(response::Body::CreateGroup(CreateGroupResponse {
                    group_id,
                    duplicate: true,
                }));
            }
            let mut members = BTreeMap::from([(user, (GroupRole::Owner, 1))]);
            for &member in &c.member_ids {
                if world.username(member).is_none() {
                    return Err(ErrorCode::UnknownUser);
                }
                members.entry(member).or_insert((GroupRole::Member, 1));
            }
            if members.len() > world.groups.max_members {
                return Err(ErrorCode::GroupFull);
            }
            let (_, created_ms) = world.next_message();
            world.groups.groups.push(Group {
                name: c.name,
                owner: user,
                created_ms,
                members,
                seq: 0,
                dissolved: false,
            });
            let group_id = world.groups.groups.len() as u64;
            world.groups.created.insert((user, c.request_key), group_id);
            publish_event(
                world,
                group_id,
                user,
                group_event::Kind::Created,
                user,
                None,
            );
            Ok(response::Body::CreateGroup(CreateGroupResponse {
                group_id,
                duplicate: false,
            }))
        }
        request::Body::AddGroupMember(a) => {
            let group = open_group(world, a.group_id)?;
            let actor = group.role(user).ok_or(ErrorCode::PermissionDenied)?;
            let role = match GroupRole::try_from(a.role) {
                Ok(GroupRole::Unspecified | GroupRole::Member) => GroupRole::Member,
                Ok(GroupRole::Admin) => GroupRole::Admin,
                _ => return Err(ErrorCode::BadRequest),
            };
            let allowed = match actor {
                GroupRole::Owner => true,
                GroupRole::Admin => role == GroupRole::Member,
                _ => false,
            };
            if !allowed {
                return Err(ErrorCode::PermissionDenied);
            }
            if group.role(a.user_id).is_some() {
                return Ok(unchanged(response::Body::AddGroupMember));
            }
            if group.members.len() >= world.groups.max_members {
                return Err(ErrorCode::GroupFull);
            }
            if world.username(a.user_id).is_none() {
                return Err(ErrorCode::UnknownUser);
            }
            let group = group_mut(world, a.group_id)?;
            group.members.insert(a.user_id, (role, group.seq + 1));
            let seq = publish_event(
                world,
                a.group_id,
                user,
                group_event::Kind::MemberAdded,
                a.user_id,
                None,
            );
            Ok(changed(response::Body::AddGroupMember, seq))
        }
        request::Body::RemoveGroupMember(r) => {
            let group = open_group(world, r.group_id)?;
            let actor = group.role(user).ok_or(ErrorCode::PermissionDenied)?;
            let Some(target) = group.role(r.user_id) else {
                return Ok(unchanged(response::Body::RemoveGroupMember));
            };
            let allowed = match (actor, target) {
                (_, GroupRole::Owner) => false,
                (GroupRole::Owner, _) => true,
                (GroupRole::Admin, GroupRole::Member) => true,
                _ => false,
            };
            if !allowed {
                return Err(ErrorCode::PermissionDenied);
            }
            group_mut(world, r.group_id)?.members.remove(&r.user_id);
            let seq = publish_event(
                world,
                r.group_id,
                user,
                group_event::Kind::MemberRemoved,
                r.user_id,
                Some(r.user_id),
            );
            Ok(changed(response::Body::RemoveGroupMember, seq))
        }
        request::Body::LeaveGroup(l) => {
            let group = open_group(world, l.group_id)?;
            match group.role(user) {
                None => return Ok(unchanged(response::Body::LeaveGroup)),
                Some(GroupRole::Owner) => return Err(ErrorCode::PermissionDenied),
                Some(_) => {}
            }
            group_mut(world, l.group_id)?.members.remove(&user);
            let seq = publish_event(
                world,
                l.group_id,
                user,
                group_event::Kind::MemberLeft,
                user,
                Some(user),
            );
            Ok(changed(response::Body::LeaveGroup, seq))
        }
        request::Body::DissolveGroup(d) => {
            let group = group_mut(world, d.group_id)?;
            if group.owner != user {
                return Err(if group.dissolved {
                    ErrorCode::GroupDissolved
                } else {
                    ErrorCode::PermissionDenied
                });
            }
            if group.dissolved {
                return Ok(unchanged(response::Body::DissolveGroup));
            }
            group.dissolved = true;
            let seq = publish_event(
                world,
                d.group_id,
                user,
                group_event::Kind::Dissolved,
                user,
                None,
            );
            Ok(changed(response::Body::DissolveGroup, seq))
        }
        request::Body::GroupMembers(m) => {
            let group = open_group(world, m.group_id)?;
            if group.role(user).is_none() {
                return Err(ErrorCode::PermissionDenied);
            }
            let members = group
                .members
                .iter()
                .map(|(&user_id, &(role, joined_seq))| GroupMember {
                    user_id,
                    username: world.username(user_id).unwrap_or_default().to_string(),
                    role: role as i32,
                    joined_seq,
                })
                .collect();
            Ok(response::Body::GroupMembers(GroupMembersResponse {
                group_id: m.group_id,
                name: group.name.clone(),
                owner_id: group.owner,
                created_ms: group.created_ms,
                latest_seq: group.seq,
                members,
            }))
        }
        request::Body::ListGroups(page) => {
            // Pages of two at most, so the SDK's paging is exercised.
            let limit = match page.limit {
                0 => 2,
                asked => asked.min(2) as usize,
            };
            let mut groups: Vec<GroupSummary> = world
                .groups
                .groups
                .iter()
                .zip(1u64..)
                .filter(|(group, group_id)| {
                    *group_id > page.after_group_id
                        && !group.dissolved
                        && group.role(user).is_some()
                })
                .map(|(group, group_id)| GroupSummary {
                    group_id,
                    name: group.name.clone(),
                })
                .take(limit + 1)
                .collect();
            let more = groups.len() > limit;
            groups.truncate(limit);
            Ok(response::Body::ListGroups(ListGroupsResponse {
                groups,
                more,
            }))
        }
        request::Body::GroupSend(s) => {
            let key = (user, s.client_msg_id.clone());
            if let Some(first) = world.groups.sent.get(&key) {
                let mut again = *first;
                again.duplicate = true;
                return Ok(response::Body::GroupSend(again));
            }
            if s.client_msg_id.is_empty() || s.client_msg_id.len() > 128 {
                return Err(ErrorCode::BadRequest);
            }
            let group = open_group(world, s.group_id)?;
            if group.role(user).is_none() {
                return Err(ErrorCode::PermissionDenied);
            }
            if s.body.len() > 65536 {
                return Err(ErrorCode::BodyTooLarge);
            }
            let (message_id, timestamp_ms) = world.next_message();
            let entry = InboxEntry {
                message_id,
                sender_id: user,
                body: s.body,
                content_type: s.content_type,
                timestamp_ms,
                ..InboxEntry::default()
            };
            let group_seq = publish(world, s.group_id, entry, None);
            let answer = GroupSendResponse {
                message_id,
                group_seq,
                timestamp_ms,
                duplicate: false,
            };
            world.groups.sent.insert(key, answer);
            Ok(response::Body::GroupSend(answer))
        }
        _ => Err(ErrorCode::BadRequest),
    }
}

/// The group `id`, if it exists and is not dissolved.
fn open_group(world: &World, id: u64) -> Result<&Group, ErrorCode> {
    let index = usize::try_from(id.wrapping_sub(1)).map_err(|_| ErrorCode::UnknownGroup)?;
    let group = world
        .groups
        .groups
        .get(index)
        .ok_or(ErrorCode::UnknownGroup)?;
    if group.dissolved {
        return Err(ErrorCode::GroupDissolved);
    }
    Ok(group)
}

fn group_mut(world: &mut World, id: u64) -> Result<&mut Group, ErrorCode> {
    let index = usize::try_from(id.wrapping_sub(1)).map_err(|_| ErrorCode::UnknownGroup)?;
    world
        .groups
        .groups
        .get_mut(index)
        .ok_or(ErrorCode::UnknownGroup)
}

fn unchanged(variant: fn(GroupChangeResponse) -> response::Body) -> response::Body {
    variant(GroupChangeResponse {
        changed: false,
        group_seq: 0,
    })
}

fn changed(variant: fn(GroupChangeResponse) -> response::Body, seq: u64) -> response::Body {
    variant(GroupChangeResponse {
        changed: true,
        group_seq: seq,
    })
}

/// Publishes a membership event made by `actor` about `subject`.
fn publish_event(
    world: &mut World,
    group_id: u64,
    actor: u64,
    kind: group_event::Kind,
    subject: u64,
    also_to: Option<u64>,
) -> u64 {
    let (message_id, timestamp_ms) = world.next_message();
    let group_name = world
        .groups
        .groups
        .get(group_id as usize - 1)
        .map(|g| g.name.clone())
        .unwrap_or_default();
    let entry = InboxEntry {
        message_id,
        sender_id: actor,
        timestamp_ms,
        group_event: Some(GroupEvent {
            kind: kind as i32,
            user_id: subject,
            group_name,
            username: world.username(subject).unwrap_or_default().to_string(),
        }),
        ..InboxEntry::default()
    };
    publish(world, group_id, entry, also_to)
}

/// Gives `entry` the group's next sequence number and appends it to the
/// inbox of every member (and of `also_to`); returns the sequence number.
fn publish(world: &mut World, group_id: u64, mut entry: InboxEntry, also_to: Option<u64>) -> u64 {
    let Some(group) = world.groups.groups.get_mut(group_id as usize - 1) else {
        return 0;
    };
    group.seq += 1;
    entry.group_id = group_id;
    entry.group_seq = group.seq;
    let mut owners: Vec<u64> = group.members.keys().copied().collect();
    owners.extend(also_to);
    for owner in owners {
        let mut copy = entry.clone();
        copy.recipient_id = owner;
        world.append(owner, copy);
    }
    entry.group_seq
}
