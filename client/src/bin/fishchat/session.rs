//! [`Session`]: a logged-in client, and the names the output needs.
//!
//! The protocol has no lookup from id to name, so a session learns names as
//! it goes: the logged-in user's own, users looked up by name, and, for
//! group entries, what group events say. When a group entry names a group
//! or user still unknown, it asks the server once: one `list_groups` call
//! per session for group names (every group joined later comes with an
//! event that names it), and one `group_members` call per group for its
//! members' names. A failed call only leaves ids printed as numbers.

use std::collections::HashSet;

use anyhow::Context;
use fishchat_client::proto::{ErrorCode, InboxEntry};
use fishchat_client::Client;

use crate::output::{self, Names};
use crate::settings::Settings;
use crate::{connect, UsageError};

/// A logged-in client and what the output needs to know.
pub struct Session {
    pub client: Client,
    pub user_id: u64,
    pub names: Names,
    pub json: bool,
    /// Whether `list_groups` was called already.
    groups_listed: bool,
    /// Groups whose member list was asked for already.
    members_asked: HashSet<u64>,
}

impl Session {
    /// Connects and logs in with the settings' credentials.
    pub async fn open(settings: &Settings) -> anyhow::Result<Session> {
        let (user, password) = settings.credentials().map_err(UsageError)?;
        let client = connect(settings).await?;
        let login = client.login(user, password, None).await.context("login")?;
        let mut names = Names::default();
        names.learn(login.user_id, user);
        Ok(Session {
            client,
            user_id: login.user_id,
            names,
            json: settings.json,
            groups_listed: false,
            members_asked: HashSet::new(),
        })
    }

    /// The user id of `who`: a username, or else a number taken as an id.
    pub async fn resolve(&mut self, who: &str) -> anyhow::Result<u64> {
        match self.client.lookup(who).await {
            Ok(found) => {
                self.names.learn(found.user_id, &found.username);
                Ok(found.user_id)
            }
            Err(e) if e.code() == Some(ErrorCode::UnknownUser) => match who.parse::<u64>() {
                Ok(user_id) => Ok(user_id),
                Err(_) => Err(anyhow::Error::new(e).context(format!("no user {who:?}"))),
            },
            Err(e) => Err(anyhow::Error::new(e).context(format!("looking up {who:?}"))),
        }
    }

    /// Prints one inbox entry: a JSON line, or a human line with the names
    /// of its users and group.
    pub async fn print_entry(&mut self, entry: &InboxEntry) {
        if self.json {
            println!("{}", output::entry_json(entry));
        } else {
            self.learn_names(entry).await;
            println!("{}", output::entry_text(entry, &self.names));
        }
    }

    /// Learns the names a human line of `entry` needs, asking the server
    /// at most once per session (groups) or per group (members).
    async fn learn_names(&mut self, entry: &InboxEntry) {
        self.names.learn_from(entry);
        let group_id = entry.group_id;
        if group_id == 0 {
            return;
        }
        if !self.names.knows_group(group_id) && !self.groups_listed {
            self.groups_listed = true;
            match self.client.list_groups().await {
                Ok(list) => {
                    for group in list.groups {
                        self.names.learn_group(group.group_id, &group.name);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "listing groups for their names failed"),
            }
        }
        let subject = entry.group_event.as_ref().map_or(0, |e| e.user_id);
        let unknown = [entry.sender_id, subject]
            .into_iter()
            .any(|user| user != 0 && !self.names.knows(user));
        if unknown && self.members_asked.insert(group_id) {
            match self.client.group_members(group_id).await {
                Ok(group) => {
                    self.names.learn_group(group_id, &group.name);
                    for member in group.members.iter().filter(|m| !m.username.is_empty()) {
                        self.names.learn(member.user_id, &member.username);
                    }
                }
                // Not a member any more, or the group is gone: ids it is.
                Err(e) => tracing::debug!(error = %e, group_id, "no member names"),
            }
        }
    }
}
