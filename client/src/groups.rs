//! Group chat on [`Client`]: creating groups, changing their membership,
//! listing them, and sending to them (`proto/client.proto`, "Groups").
//!
//! Every method goes through the one retry loop, [`Client::call`], like
//! [`Client::send`], so each is repeated unchanged after a retryable error,
//! a timeout or a failover. That is safe because every group operation is
//! idempotent on the server:
//!
//! - `create_group` draws one `request_key` before the first attempt and
//!   repeats it on every retry; the server answers a repeat with the first
//!   group and `duplicate = true`, so a retried creation makes one group.
//! - `send_group` repeats the caller's `client_msg_id`, exactly as `send`.
//! - Membership changes state an outcome ("bob is a member"), so a repeat
//!   of a change that was applied answers `changed = false`. After a retry,
//!   `changed = false` may therefore mean that an earlier attempt of the
//!   same call made the change.
//!
//! Group entries reach the inbox as ordinary [`InboxEntry`]s with `group_id`,
//! `group_seq` and, for membership changes, `group_event` set; `sync` and
//! [`Client::incoming`] deliver them like any other entry.
//!
//! [`InboxEntry`]: fishchat_proto::client::InboxEntry

use fishchat_proto::client::{
    request, response, AddGroupMemberRequest, CreateGroupRequest, CreateGroupResponse,
    DissolveGroupRequest, GroupChangeResponse, GroupMembersRequest, GroupMembersResponse,
    GroupRole, GroupSendRequest, GroupSendResponse, LeaveGroupRequest, ListGroupsRequest,
    ListGroupsResponse, RemoveGroupMemberRequest,
};

use crate::client::{unexpected, Client};
use crate::error::ClientError;
use crate::new_client_msg_id;

impl Client {
    /// Creates a group named `name` (1 to 64 characters) owned by the
    /// logged-in user, with `member_ids` as its other initial members
    /// (duplicates and the creator are ignored by the server).
    ///
    /// Exactly once: one fresh `request_key` is drawn for the call and
    /// repeated on every retry, so a creation whose answer was lost and was
    /// retried makes one group (the answer then has `duplicate = true`).
    pub async fn create_group(
        &self,
        name: &str,
        member_ids: &[u64],
    ) -> Result<CreateGroupResponse, ClientError> {
        let body = request::Body::CreateGroup(CreateGroupRequest {
            name: name.to_string(),
            member_ids: member_ids.to_vec(),
            request_key: new_client_msg_id()?,
        });
        match self.call(body, true).await? {
            response::Body::CreateGroup(answer) => Ok(answer),
            other => Err(unexpected("create_group", &other)),
        }
    }

    /// Adds `user_id` to `group_id` with `role` (`Member`, or `Admin`, which
    /// only the owner may grant; `Unspecified` means `Member`). Needs the
    /// owner or an admin. Adding a member again answers `changed = false`.
    pub async fn add_group_member(
        &self,
        group_id: u64,
        user_id: u64,
        role: GroupRole,
    ) -> Result<GroupChangeResponse, ClientError> {
        let body = request::Body::AddGroupMember(AddGroupMemberRequest {
            group_id,
            user_id,
            role: role as i32,
        });
        match self.call(body, true).await? {
            response::Body::AddGroupMember(answer) => Ok(answer),
            other => Err(unexpected("add_group_member", &other)),
        }
    }

    /// Removes `user_id` from `group_id`. Needs the owner, or an admin
    /// removing a plain member; the owner cannot be removed. Removing a
    /// non-member answers `changed = false`.
    pub async fn remove_group_member(
        &self,
        group_id: u64,
        user_id: u64,
    ) -> Result<GroupChangeResponse, ClientError> {
        let body = request::Body::RemoveGroupMember(RemoveGroupMemberRequest { group_id, user_id });
        match self.call(body, true).await? {
            response::Body::RemoveGroupMember(answer) => Ok(answer),
            other => Err(unexpected("remove_group_member", &other)),
        }
    }

    /// The logged-in user leaves `group_id` (the owner cannot: it dissolves
    /// the group instead). Leaving a group one is not in answers
    /// `changed = false`.
    pub async fn leave_group(&self, group_id: u64) -> Result<GroupChangeResponse, ClientError> {
        let body = request::Body::LeaveGroup(LeaveGroupRequest { group_id });
        match self.call(body, true).await? {
            response::Body::LeaveGroup(answer) => Ok(answer),
            other => Err(unexpected("leave_group", &other)),
        }
    }

    /// Dissolves `group_id`: every member gets a last entry, and the group
    /// refuses everything afterwards (`GROUP_DISSOLVED`). Needs the owner.
    /// Dissolving again answers `changed = false`.
    pub async fn dissolve_group(&self, group_id: u64) -> Result<GroupChangeResponse, ClientError> {
        let body = request::Body::DissolveGroup(DissolveGroupRequest { group_id });
        match self.call(body, true).await? {
            response::Body::DissolveGroup(answer) => Ok(answer),
            other => Err(unexpected("dissolve_group", &other)),
        }
    }

    /// The group's name, owner, latest group sequence and members (by user
    /// id). Needs a member.
    pub async fn group_members(&self, group_id: u64) -> Result<GroupMembersResponse, ClientError> {
        let body = request::Body::GroupMembers(GroupMembersRequest { group_id });
        match self.call(body, true).await? {
            response::Body::GroupMembers(answer) => Ok(answer),
            other => Err(unexpected("group_members", &other)),
        }
    }

    /// Every group the logged-in user is a member of, by group id: all the
    /// pages of [`Client::list_groups_page`].
    pub async fn list_groups(&self) -> Result<ListGroupsResponse, ClientError> {
        let mut all = ListGroupsResponse::default();
        loop {
            let after = all.groups.last().map_or(0, |g| g.group_id);
            let page = self.list_groups_page(after, 0).await?;
            if page.more && page.groups.is_empty() {
                return Err(ClientError::Protocol(
                    "a list_groups page was empty but said more follow".to_string(),
                ));
            }
            all.groups.extend(page.groups);
            if !page.more {
                return Ok(all);
            }
        }
    }

    /// One page of the user's groups: those with ids above `after_group_id`
    /// (0: from the first), at most `limit` (0: the server's page size), and
    /// whether more follow.
    pub async fn list_groups_page(
        &self,
        after_group_id: u64,
        limit: u32,
    ) -> Result<ListGroupsResponse, ClientError> {
        let body = request::Body::ListGroups(ListGroupsRequest {
            after_group_id,
            limit,
        });
        match self.call(body, true).await? {
            response::Body::ListGroups(answer) => Ok(answer),
            other => Err(unexpected("list_groups", &other)),
        }
    }

    /// Sends `body` to every member of `group_id`, exactly once: retries
    /// repeat the same `client_msg_id` (as for [`Client::send`], and in the
    /// same namespace), so `duplicate = true` in the answer also means
    /// success. Needs a member.
    pub async fn send_group(
        &self,
        group_id: u64,
        client_msg_id: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<GroupSendResponse, ClientError> {
        let request = request::Body::GroupSend(GroupSendRequest {
            group_id,
            client_msg_id: client_msg_id.to_string(),
            body,
            content_type: content_type.to_string(),
        });
        match self.call(request, true).await? {
            response::Body::GroupSend(answer) => Ok(answer),
            other => Err(unexpected("send_group", &other)),
        }
    }
}
