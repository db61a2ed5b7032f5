//! `fishchat group ...`: creating groups, changing and listing their
//! members, and sending to them. Users are named by username (looked up;
//! a number that is no username is taken as a user id, as in `send`),
//! groups by id (`group list` shows them).

use anyhow::Context;
use clap::Subcommand;
use fishchat_client::proto::{
    CreateGroupResponse, GroupChangeResponse, GroupMembersResponse, GroupRole, GroupSummary,
};
use serde::Serialize;

use crate::output::{format_time, to_line};
use crate::session::Session;
use crate::{send, Target};

/// The group commands.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create group NAME owned by --user, with the given members; print its id.
    Create {
        /// The group's name (1 to 64 characters).
        name: String,
        /// The other members' usernames, comma-separated.
        #[arg(long, value_name = "USER,...", value_delimiter = ',')]
        members: Vec<String>,
    },
    /// Add USER to group GID (needs the owner or an admin).
    Add {
        #[arg(value_name = "GID")]
        group: u64,
        /// The new member's username. (Not named `user`: that is the
        /// global `--user`'s id, which a positional of the same id would
        /// overwrite.)
        #[arg(value_name = "USER")]
        member: String,
        /// Make USER an admin (only the owner may).
        #[arg(long)]
        admin: bool,
    },
    /// Remove USER from group GID (needs the owner or an admin).
    Remove {
        #[arg(value_name = "GID")]
        group: u64,
        /// The member's username.
        #[arg(value_name = "USER")]
        member: String,
    },
    /// Leave group GID.
    Leave {
        #[arg(value_name = "GID")]
        group: u64,
    },
    /// Dissolve group GID (needs the owner).
    Dissolve {
        #[arg(value_name = "GID")]
        group: u64,
    },
    /// Print the members of group GID.
    Members {
        #[arg(value_name = "GID")]
        group: u64,
    },
    /// Print the groups --user is a member of.
    List,
    /// Send TEXT to group GID; without TEXT, send each line of stdin as a
    /// message of its own.
    Send {
        #[arg(value_name = "GID")]
        group: u64,
        /// The message; several words are joined with spaces.
        text: Vec<String>,
    },
}

/// Runs one group command.
pub async fn run(mut session: Session, command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::Create { name, members } => {
            let mut member_ids = Vec::new();
            for member in members.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
                member_ids.push(session.resolve(member).await?);
            }
            let created = session
                .client
                .create_group(&name, &member_ids)
                .await
                .context("create group")?;
            if session.json {
                println!("{}", created_json(&created, &name));
            } else {
                println!("{}", created_text(&created, &name));
            }
        }
        GroupCommand::Add {
            group,
            member,
            admin,
        } => {
            let user_id = session.resolve(&member).await?;
            let role = if admin {
                GroupRole::Admin
            } else {
                GroupRole::Member
            };
            let change = session
                .client
                .add_group_member(group, user_id, role)
                .await
                .context("add group member")?;
            let who = session.names.of(user_id);
            let text = if change.changed {
                format!("added {who} to group {group} as {}", role_name(role as i32))
            } else {
                format!("{who} is in group {group} already")
            };
            print_change(&session, group, Some(user_id), &change, text);
        }
        GroupCommand::Remove { group, member } => {
            let user_id = session.resolve(&member).await?;
            let change = session
                .client
                .remove_group_member(group, user_id)
                .await
                .context("remove group member")?;
            let who = session.names.of(user_id);
            let text = if change.changed {
                format!("removed {who} from group {group}")
            } else {
                format!("{who} is not in group {group}")
            };
            print_change(&session, group, Some(user_id), &change, text);
        }
        GroupCommand::Leave { group } => {
            let change = session
                .client
                .leave_group(group)
                .await
                .context("leave group")?;
            let text = if change.changed {
                format!("left group {group}")
            } else {
                format!("not a member of group {group}")
            };
            print_change(&session, group, None, &change, text);
        }
        GroupCommand::Dissolve { group } => {
            let change = session
                .client
                .dissolve_group(group)
                .await
                .context("dissolve group")?;
            let text = if change.changed {
                format!("dissolved group {group}")
            } else {
                format!("group {group} was dissolved already")
            };
            print_change(&session, group, None, &change, text);
        }
        GroupCommand::Members { group } => {
            let members = session
                .client
                .group_members(group)
                .await
                .context("group members")?;
            if session.json {
                for line in members_json(&members) {
                    println!("{line}");
                }
            } else {
                print!("{}", members_table(&members));
            }
        }
        GroupCommand::List => {
            let list = session.client.list_groups().await.context("list groups")?;
            if session.json {
                for group in &list.groups {
                    println!("{}", summary_json(group));
                }
            } else {
                print!("{}", list_table(&list.groups));
            }
        }
        GroupCommand::Send { group, text } => {
            let text = (!text.is_empty()).then(|| text.join(" "));
            return send(&session, Target::Group(group), text).await;
        }
    }
    session.client.close();
    Ok(())
}

/// The answer to `group create` as a JSON line.
#[derive(Debug, Serialize)]
struct CreatedLine<'a> {
    group_id: u64,
    name: &'a str,
    duplicate: bool,
}

/// The answer to a membership change as a JSON line.
#[derive(Debug, Serialize)]
struct ChangeLine {
    group_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<u64>,
    changed: bool,
    group_seq: u64,
}

/// One member as a JSON line.
#[derive(Debug, Serialize)]
struct MemberLine<'a> {
    group_id: u64,
    user_id: u64,
    username: &'a str,
    role: &'static str,
    joined_seq: u64,
}

/// `{"group_id":12,"name":"team","duplicate":false}`.
fn created_json(created: &CreateGroupResponse, name: &str) -> String {
    to_line(&CreatedLine {
        group_id: created.group_id,
        name,
        duplicate: created.duplicate,
    })
}

/// `created group 12 (#team)`.
fn created_text(created: &CreateGroupResponse, name: &str) -> String {
    let again = if created.duplicate {
        " (already created)"
    } else {
        ""
    };
    format!("created group {} (#{name}){again}", created.group_id)
}

/// Prints a membership change: `text` and the change's group sequence, or
/// a JSON line.
fn print_change(
    session: &Session,
    group_id: u64,
    user_id: Option<u64>,
    change: &GroupChangeResponse,
    text: String,
) {
    if session.json {
        println!(
            "{}",
            to_line(&ChangeLine {
                group_id,
                user_id,
                changed: change.changed,
                group_seq: change.group_seq,
            })
        );
    } else if change.changed {
        println!("{text} (seq {})", change.group_seq);
    } else {
        println!("{text}");
    }
}

/// One JSON line per member.
fn members_json(group: &GroupMembersResponse) -> Vec<String> {
    group
        .members
        .iter()
        .map(|member| {
            to_line(&MemberLine {
                group_id: group.group_id,
                user_id: member.user_id,
                username: &member.username,
                role: role_name(member.role),
                joined_seq: member.joined_seq,
            })
        })
        .collect()
}

/// A heading line about the group, then a table of its members.
fn members_table(group: &GroupMembersResponse) -> String {
    let owner = group
        .members
        .iter()
        .find(|m| m.user_id == group.owner_id)
        .map_or_else(|| format!("#{}", group.owner_id), |m| m.username.clone());
    let mut out = format!(
        "group {} #{}, owner {}, created {}, latest seq {}, {} member{}\n",
        group.group_id,
        group.name,
        owner,
        format_time(group.created_ms),
        group.latest_seq,
        group.members.len(),
        if group.members.len() == 1 { "" } else { "s" }
    );
    let width = group
        .members
        .iter()
        .map(|m| m.username.chars().count())
        .max()
        .unwrap_or(0)
        .max("USERNAME".len());
    out.push_str(&format!(
        "{:>8}  {:<width$}  {:<6}  {:>10}\n",
        "USER ID", "USERNAME", "ROLE", "JOINED SEQ"
    ));
    for member in &group.members {
        out.push_str(&format!(
            "{:>8}  {:<width$}  {:<6}  {:>10}\n",
            member.user_id,
            member.username,
            role_name(member.role),
            member.joined_seq
        ));
    }
    out
}

/// `{"group_id":12,"name":"team"}`.
fn summary_json(group: &GroupSummary) -> String {
    to_line(&serde_json::json!({ "group_id": group.group_id, "name": group.name }))
}

/// A table of groups, or `no groups`.
fn list_table(groups: &[GroupSummary]) -> String {
    if groups.is_empty() {
        return "no groups\n".to_string();
    }
    let mut out = format!("{:>8}  NAME\n", "GROUP ID");
    for group in groups {
        out.push_str(&format!("{:>8}  {}\n", group.group_id, group.name));
    }
    out
}

/// `owner`, `admin`, `member`, or `unknown` (a role from a newer server).
fn role_name(role: i32) -> &'static str {
    match GroupRole::try_from(role) {
        Ok(GroupRole::Owner) => "owner",
        Ok(GroupRole::Admin) => "admin",
        Ok(GroupRole::Member) => "member",
        Ok(GroupRole::Unspecified) | Err(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use fishchat_client::proto::GroupMember;

    use super::*;

    fn team() -> GroupMembersResponse {
        GroupMembersResponse {
            group_id: 12,
            name: "team".into(),
            owner_id: 1,
            created_ms: 1_795_729_203_000,
            latest_seq: 7,
            members: vec![
                GroupMember {
                    user_id: 1,
                    username: "alice".into(),
                    role: GroupRole::Owner as i32,
                    joined_seq: 1,
                },
                GroupMember {
                    user_id: 23,
                    username: "bartholomew".into(),
                    role: GroupRole::Admin as i32,
                    joined_seq: 4,
                },
            ],
        }
    }

    #[test]
    fn the_member_table_has_a_heading_and_one_aligned_row_per_member() {
        let table = members_table(&team());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "group 12 #team, owner alice, created 2026-11-26 21:40:03, latest seq 7, 2 members"
        );
        assert_eq!(lines[1], " USER ID  USERNAME     ROLE    JOINED SEQ");
        assert_eq!(lines[2], "       1  alice        owner            1");
        assert_eq!(lines[3], "      23  bartholomew  admin            4");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn members_and_groups_are_json_lines() {
        let lines = members_json(&team());
        let first: serde_json::Value = serde_json::from_str(&lines[0]).expect("json");
        assert_eq!(
            first,
            serde_json::json!({"group_id":12,"user_id":1,"username":"alice","role":"owner","joined_seq":1})
        );
        let summary = GroupSummary {
            group_id: 3,
            name: "ops".into(),
        };
        assert_eq!(summary_json(&summary), r#"{"group_id":3,"name":"ops"}"#);
        assert_eq!(list_table(&[]), "no groups\n");
        assert_eq!(list_table(&[summary]), "GROUP ID  NAME\n       3  ops\n");
        assert_eq!(role_name(42), "unknown");
    }

    #[test]
    fn a_created_group_prints_its_id() {
        let created = CreateGroupResponse {
            group_id: 12,
            duplicate: false,
        };
        assert_eq!(created_text(&created, "team"), "created group 12 (#team)");
        assert_eq!(
            created_json(&created, "team"),
            r#"{"group_id":12,"name":"team","duplicate":false}"#
        );
    }
}
