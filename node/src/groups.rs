//! The group operations of the client protocol.
//!
//! A group lives in one shard (`shard_of_group`), which orders everything
//! that happens to it; see `fishchat_shard` for the rules it applies. The
//! handlers here check what a client sent, resolve user ids to usernames
//! (users are never deleted, so a user seen to exist keeps existing), and
//! after the commit start the fan-out, waiting only for the caller's own
//! inbox (read-your-writes).

use fishchat_proto::client::{self as wire, request, response, ErrorCode};
use fishchat_shard::{
    decode_group, group_key, group_seq_key, membership_group, memberships_range, user_key,
    valid_group_name, Command, GroupChange, GroupEvent, GroupEventKind, GroupId, InboxEntry,
    NewMember, Outgoing, Reply, Role, ShardId, UserId, Version, MAX_GROUP_NAME,
};
use futures::{StreamExt, TryStreamExt};

use crate::chat::{now_ms, placed_entry, stopping, unexpected, Chat, Refusal};
use crate::node::group_of;

/// Longest create request key, in bytes (fixed rule).
const MAX_REQUEST_KEY: usize = 128;
/// Usernames looked up at once when a group is created.
const LOOKUPS_IN_FLIGHT: usize = 32;
/// Most groups in one ListGroups answer.
const LIST_PAGE: usize = 256;

impl Chat {
    /// Answers one group operation of `user`.
    pub(crate) async fn group_request(
        &self,
        user: UserId,
        body: request::Body,
    ) -> Result<response::Body, Refusal> {
        match body {
            request::Body::CreateGroup(create) => self.create_group(user, create).await,
            request::Body::AddGroupMember(add) => {
                let role = match wire::GroupRole::try_from(add.role) {
                    Ok(wire::GroupRole::Unspecified | wire::GroupRole::Member) => Role::Member,
                    Ok(wire::GroupRole::Admin) => Role::Admin,
                    Ok(wire::GroupRole::Owner) | Err(_) => {
                        return Err(Refusal::new(
                            ErrorCode::BadRequest,
                            "a member is added as MEMBER or ADMIN",
                        ))
                    }
                };
                let member = self.new_members(&[add.user_id]).await?.remove(0);
                let change = GroupChange::Add { member, role };
                let answer = self.change_group(user, add.group_id, change).await?;
                Ok(response::Body::AddGroupMember(answer))
            }
            request::Body::RemoveGroupMember(remove) => {
                let change = GroupChange::Remove {
                    user: remove.user_id,
                };
                let answer = self.change_group(user, remove.group_id, change).await?;
                Ok(response::Body::RemoveGroupMember(answer))
            }
            request::Body::LeaveGroup(leave) => {
                let answer = self
                    .change_group(user, leave.group_id, GroupChange::Leave)
                    .await?;
                Ok(response::Body::LeaveGroup(answer))
            }
            request::Body::DissolveGroup(dissolve) => {
                let answer = self
                    .change_group(user, dissolve.group_id, GroupChange::Dissolve)
                    .await?;
                Ok(response::Body::DissolveGroup(answer))
            }
            request::Body::GroupMembers(members) => {
                self.group_members(user, members.group_id).await
            }
            request::Body::ListGroups(page) => self.list_groups(user, page).await,
            request::Body::GroupSend(send) => self.group_send(user, send).await,
            _ => Err(Refusal::new(ErrorCode::BadRequest, "not a group operation")),
        }
    }

    async fn create_group(
        &self,
        creator: UserId,
        create: wire::CreateGroupRequest,
    ) -> Result<response::Body, Refusal> {
        if !valid_group_name(&create.name) {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "a group name has 1 to {MAX_GROUP_NAME} characters and no control characters"
                ),
            ));
        }
        if create.request_key.is_empty() || create.request_key.len() > MAX_REQUEST_KEY {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("request_key must be 1 to {MAX_REQUEST_KEY} bytes"),
            ));
        }
        let mut ids = create.member_ids;
        ids.push(creator);
        ids.sort_unstable();
        ids.dedup();
        let max = self.limits.max_group_members;
        if ids.len() > max as usize {
            return Err(Refusal::new(
                ErrorCode::GroupFull,
                format!("a group has at most {max} members, the owner included"),
            ));
        }
        let members = self.new_members(&ids).await?;
        let command = Command::CreateGroup {
            creator,
            request_key: create.request_key.clone(),
            name: create.name,
            members,
            max_members: max,
            now_ms: now_ms(),
        };
        let shard = self
            .map
            .shard_of_group_request(creator, &create.request_key);
        match self.propose(shard, &command).await? {
            Reply::GroupCreated {
                group,
                duplicate,
                fanout,
                appended,
            } => {
                tracing::info!(group, duplicate, "group created");
                self.spread(shard, fanout, &appended, None, creator).await?;
                Ok(response::Body::CreateGroup(wire::CreateGroupResponse {
                    group_id: group,
                    duplicate,
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn change_group(
        &self,
        actor: UserId,
        group: GroupId,
        change: GroupChange,
    ) -> Result<wire::GroupChangeResponse, Refusal> {
        if group == 0 {
            return Err(unknown_group(group));
        }
        let command = Command::ChangeGroup {
            actor,
            group,
            change,
            max_members: self.limits.max_group_members,
            now_ms: now_ms(),
        };
        let shard = self.map.shard_of_group(group);
        match self.propose(shard, &command).await? {
            Reply::GroupChanged {
                changed,
                group_seq,
                fanout,
                appended,
            } => {
                self.spread(shard, fanout, &appended, None, actor).await?;
                Ok(wire::GroupChangeResponse { changed, group_seq })
            }
            other => Err(unexpected(other)),
        }
    }

    async fn group_send(
        &self,
        sender: UserId,
        send: wire::GroupSendRequest,
    ) -> Result<response::Body, Refusal> {
        self.check_message(&send.body, &send.client_msg_id, &send.content_type)?;
        if send.group_id == 0 {
            return Err(unknown_group(0));
        }
        let command = Command::GroupSend {
            sender,
            group: send.group_id,
            client_msg_id: send.client_msg_id,
            body: send.body.clone(),
            content_type: send.content_type.clone(),
            now_ms: now_ms(),
        };
        let shard = self.map.shard_of_group(send.group_id);
        match self.propose(shard, &command).await? {
            Reply::GroupSent {
                message_id,
                group_seq,
                timestamp_ms,
                duplicate,
                fanout,
                appended,
            } => {
                let entry = InboxEntry::group_message(
                    message_id,
                    sender,
                    send.group_id,
                    group_seq,
                    send.body,
                    send.content_type,
                    timestamp_ms,
                );
                self.spread(shard, fanout, &appended, Some(entry), sender)
                    .await?;
                Ok(response::Body::GroupSend(wire::GroupSendResponse {
                    message_id,
                    group_seq,
                    timestamp_ms,
                    duplicate,
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn group_members(&self, user: UserId, group: GroupId) -> Result<response::Body, Refusal> {
        let shard = self.map.shard_of_group(group);
        let bytes = match group {
            0 => None,
            _ => self.read(shard, &group_key(group)).await?,
        };
        let record = decode_group(&bytes.ok_or_else(|| unknown_group(group))?)
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        // Membership first: a non-member learns nothing of the group's state.
        if record.member(user).is_none() {
            return Err(Refusal::new(
                ErrorCode::PermissionDenied,
                format!("only members list group {group}"),
            ));
        }
        if record.dissolved {
            return Err(Refusal::new(
                ErrorCode::GroupDissolved,
                format!("group {group} was dissolved"),
            ));
        }
        let latest_seq = self.read_u64(shard, &group_seq_key(group)).await?;
        Ok(response::Body::GroupMembers(wire::GroupMembersResponse {
            group_id: record.id,
            name: record.name,
            owner_id: record.owner,
            created_ms: record.created_ms,
            latest_seq,
            members: record
                .members
                .into_iter()
                .map(|m| wire::GroupMember {
                    user_id: m.user,
                    username: m.username,
                    role: role_to_wire(m.role) as i32,
                    joined_seq: m.joined_seq,
                })
                .collect(),
        }))
    }

    async fn list_groups(
        &self,
        user: UserId,
        page: wire::ListGroupsRequest,
    ) -> Result<response::Body, Refusal> {
        let group = group_of(self.map.shard_of_user(user));
        let (mut from, to) = memberships_range(user);
        if page.after_group_id > 0 {
            // Just past the membership key of `after_group_id`.
            from.extend_from_slice(&page.after_group_id.to_be_bytes());
            from.push(0);
        }
        let limit = match page.limit as usize {
            0 => LIST_PAGE,
            asked => asked.min(LIST_PAGE),
        };
        // One more row than the page says whether more follow.
        let rows = self.host.scan(group, &from, &to, limit + 1).await?;
        let budget = (self.limits.max_frame_bytes as usize).saturating_sub(64);
        let mut used = 0;
        let mut groups = Vec::new();
        let mut more = false;
        for (key, name) in rows {
            let Some(group_id) = membership_group(&key) else {
                continue;
            };
            used += name.len() + 16;
            if groups.len() == limit || used > budget {
                more = true;
                break;
            }
            groups.push(wire::GroupSummary {
                group_id,
                name: String::from_utf8_lossy(&name).into_owned(),
            });
        }
        Ok(response::Body::ListGroups(wire::ListGroupsResponse {
            groups,
            more,
        }))
    }

    /// Each of `users` with its username; UNKNOWN_USER for the first that
    /// does not exist.
    async fn new_members(&self, users: &[UserId]) -> Result<Vec<NewMember>, Refusal> {
        futures::stream::iter(users.iter().copied())
            .map(|user| async move {
                let unknown =
                    || Refusal::new(ErrorCode::UnknownUser, format!("no such user: {user}"));
                if user == 0 {
                    return Err(unknown());
                }
                let bytes = self
                    .read(self.map.shard_of_user(user), &user_key(user))
                    .await?
                    .ok_or_else(unknown)?;
                let username = String::from_utf8(bytes).map_err(|_| {
                    Refusal::new(ErrorCode::Internal, "a stored username is not UTF-8")
                })?;
                Ok(NewMember { user, username })
            })
            .buffered(LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await
    }

    /// After a group commit in `shard`: notifies the inboxes it reached
    /// there (with `entry` placed in each, when given), starts carrying it
    /// to the other shards, and waits until it is in `caller`'s own inbox.
    async fn spread(
        &self,
        shard: ShardId,
        fanout: Vec<Outgoing>,
        appended: &[(UserId, Version)],
        entry: Option<InboxEntry>,
        caller: UserId,
    ) -> Result<(), Refusal> {
        for &(owner, version) in appended {
            let placed = entry
                .as_ref()
                .map(|e| placed_entry(e.clone(), owner, version));
            self.events.inbox_advanced(owner, version, placed);
        }
        let home = self.map.shard_of_user(caller);
        let mut own = None;
        for item in fanout {
            if item.to.target == home {
                own = Some(item);
            } else {
                self.courier.kick(shard, item);
            }
        }
        if let Some(own) = own {
            self.courier.deliver(shard, own).await.map_err(stopping)?;
        }
        Ok(())
    }
}

fn unknown_group(group: GroupId) -> Refusal {
    Refusal::new(ErrorCode::UnknownGroup, format!("no such group: {group}"))
}

fn role_to_wire(role: Role) -> wire::GroupRole {
    match role {
        Role::Owner => wire::GroupRole::Owner,
        Role::Admin => wire::GroupRole::Admin,
        Role::Member => wire::GroupRole::Member,
    }
}

/// A stored membership event in the protocol's form.
pub fn event_to_wire(event: GroupEvent) -> wire::GroupEvent {
    use wire::group_event::Kind;
    let kind = match event.kind {
        GroupEventKind::Created => Kind::Created,
        GroupEventKind::Added => Kind::MemberAdded,
        GroupEventKind::Removed => Kind::MemberRemoved,
        GroupEventKind::Left => Kind::MemberLeft,
        GroupEventKind::Dissolved => Kind::Dissolved,
    };
    wire::GroupEvent {
        kind: kind as i32,
        user_id: event.user,
        group_name: event.group_name,
        username: event.username,
    }
}
