//! What the commands print: one JSON object per line with `--json`, short
//! human lines otherwise.

use std::collections::HashMap;

use fishchat_client::proto::{
    group_event, GroupEvent, GroupSendResponse, InboxEntry, SendResponse,
};
use serde::Serialize;

/// User and group names the program knows. There is no lookup from user id
/// to name in the protocol, so users have names only when the program met
/// them: the logged-in user, users looked up by name, users named by a
/// group event or a group's member list. Others print as `#17`. Groups are
/// named by their events and `list_groups`; an unknown one prints as
/// `group 12`.
#[derive(Debug, Default, Clone)]
pub struct Names {
    known: HashMap<u64, String>,
    groups: HashMap<u64, String>,
}

impl Names {
    /// Remembers that `user_id` is `name`.
    pub fn learn(&mut self, user_id: u64, name: &str) {
        self.known.insert(user_id, name.to_string());
    }

    /// Whether the name of `user_id` is known.
    pub fn knows(&self, user_id: u64) -> bool {
        self.known.contains_key(&user_id)
    }

    /// The name of `user_id`, or `#user_id`.
    pub fn of(&self, user_id: u64) -> String {
        self.known
            .get(&user_id)
            .cloned()
            .unwrap_or_else(|| format!("#{user_id}"))
    }

    /// Remembers that group `group_id` is called `name`.
    pub fn learn_group(&mut self, group_id: u64, name: &str) {
        self.groups.insert(group_id, name.to_string());
    }

    /// Whether the name of group `group_id` is known.
    pub fn knows_group(&self, group_id: u64) -> bool {
        self.groups.contains_key(&group_id)
    }

    /// `#name` for a known group, `group 12` for another.
    pub fn group(&self, group_id: u64) -> String {
        self.groups
            .get(&group_id)
            .map(|name| format!("#{name}"))
            .unwrap_or_else(|| format!("group {group_id}"))
    }

    /// Learns what a group event says: its group's name and its user's
    /// name. Empty names teach nothing.
    pub fn learn_from(&mut self, entry: &InboxEntry) {
        let Some(event) = &entry.group_event else {
            return;
        };
        if entry.group_id != 0 && !event.group_name.is_empty() {
            self.learn_group(entry.group_id, &event.group_name);
        }
        if event.user_id != 0 && !event.username.is_empty() {
            self.learn(event.user_id, &event.username);
        }
    }
}

/// One inbox entry as a JSON line.
#[derive(Debug, Serialize)]
struct EntryLine<'a> {
    version: u64,
    message_id: u64,
    from: u64,
    to: u64,
    body: String,
    timestamp: u64,
    content_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_seq: Option<u64>,
    /// Present (null for a message) whenever the group fields are.
    #[serde(skip_serializing_if = "Option::is_none")]
    group_event: Option<Option<EventLine<'a>>>,
}

/// A group event inside an entry's JSON line.
#[derive(Debug, Serialize)]
struct EventLine<'a> {
    kind: &'static str,
    user_id: u64,
    username: &'a str,
    group_name: &'a str,
}

/// The answer to one message sent to a group as a JSON line.
#[derive(Debug, Serialize)]
struct GroupSentLine {
    message_id: u64,
    group_seq: u64,
    timestamp: u64,
    duplicate: bool,
    group_id: u64,
}

/// The answer to one sent message as a JSON line.
#[derive(Debug, Serialize)]
struct SentLine {
    message_id: u64,
    version: u64,
    timestamp: u64,
    duplicate: bool,
    to: u64,
}

/// `entry` as one line of JSON; `body` is the body as UTF-8 (lossy). A group
/// entry also has `group_id`, `group_seq` and `group_event` (null for a
/// message).
pub fn entry_json(entry: &InboxEntry) -> String {
    let grouped = entry.group_id != 0 || entry.group_event.is_some();
    let event = entry.group_event.as_ref().map(|event| EventLine {
        kind: event_kind_name(event),
        user_id: event.user_id,
        username: &event.username,
        group_name: &event.group_name,
    });
    let line = EntryLine {
        version: entry.version,
        message_id: entry.message_id,
        from: entry.sender_id,
        to: entry.recipient_id,
        body: String::from_utf8_lossy(&entry.body).into_owned(),
        timestamp: entry.timestamp_ms,
        content_type: &entry.content_type,
        group_id: grouped.then_some(entry.group_id),
        group_seq: grouped.then_some(entry.group_seq),
        group_event: grouped.then_some(event),
    };
    to_line(&line)
}

/// `event`'s kind in JSON: `created`, `member_added`, `member_removed`,
/// `member_left`, `dissolved`, or `unknown` (a kind from a newer server).
fn event_kind_name(event: &GroupEvent) -> &'static str {
    match group_event::Kind::try_from(event.kind) {
        Ok(group_event::Kind::Created) => "created",
        Ok(group_event::Kind::MemberAdded) => "member_added",
        Ok(group_event::Kind::MemberRemoved) => "member_removed",
        Ok(group_event::Kind::MemberLeft) => "member_left",
        Ok(group_event::Kind::Dissolved) => "dissolved",
        Ok(group_event::Kind::Unspecified) | Err(_) => "unknown",
    }
}

/// `entry` as one human line: `[v12 2026-11-26 21:40:03] alice -> bob: hello`
/// for a direct message, `[v13 2026-11-26 21:40:05] [#team] alice: hello`
/// for a group message and `[v14 ...] [#team] bob left` for a group event.
pub fn entry_text(entry: &InboxEntry, names: &Names) -> String {
    let stamp = format!("[v{} {}]", entry.version, format_time(entry.timestamp_ms));
    if let Some(event) = &entry.group_event {
        return format!(
            "{stamp} [{}] {}",
            names.group(entry.group_id),
            event_text(entry, event, names)
        );
    }
    if entry.group_id != 0 {
        return format!(
            "{stamp} [{}] {}: {}",
            names.group(entry.group_id),
            names.of(entry.sender_id),
            body_text(entry)
        );
    }
    format!(
        "{stamp} {} -> {}: {}",
        names.of(entry.sender_id),
        names.of(entry.recipient_id),
        body_text(entry)
    )
}

/// What a group event says, in words: `bob joined (added by alice)`.
fn event_text(entry: &InboxEntry, event: &GroupEvent, names: &Names) -> String {
    let user = if event.username.is_empty() {
        names.of(event.user_id)
    } else {
        event.username.clone()
    };
    let actor = names.of(entry.sender_id);
    match group_event::Kind::try_from(event.kind) {
        Ok(group_event::Kind::Created) => format!("group created by {user}"),
        Ok(group_event::Kind::MemberAdded) => format!("{user} joined (added by {actor})"),
        Ok(group_event::Kind::MemberRemoved) => format!("{user} was removed by {actor}"),
        Ok(group_event::Kind::MemberLeft) => format!("{user} left"),
        Ok(group_event::Kind::Dissolved) => "group dissolved".to_string(),
        Ok(group_event::Kind::Unspecified) | Err(_) => {
            format!("membership changed ({user}, by {actor})")
        }
    }
}

/// The answer to a send to `to` as one line of JSON.
pub fn sent_json(sent: &SendResponse, to: u64) -> String {
    to_line(&SentLine {
        message_id: sent.message_id,
        version: sent.version,
        timestamp: sent.timestamp_ms,
        duplicate: sent.duplicate,
        to,
    })
}

/// The answer to a send to `to` as one human line.
pub fn sent_text(sent: &SendResponse, to: u64, names: &Names) -> String {
    let again = if sent.duplicate {
        " (already sent)"
    } else {
        ""
    };
    format!(
        "[v{} {}] sent to {}: message {}{}",
        sent.version,
        format_time(sent.timestamp_ms),
        names.of(to),
        sent.message_id,
        again
    )
}

/// The answer to a send to group `group_id` as one line of JSON.
pub fn group_sent_json(sent: &GroupSendResponse, group_id: u64) -> String {
    to_line(&GroupSentLine {
        message_id: sent.message_id,
        group_seq: sent.group_seq,
        timestamp: sent.timestamp_ms,
        duplicate: sent.duplicate,
        group_id,
    })
}

/// The answer to a send to group `group_id` as one human line:
/// `[seq 5 2026-11-26 21:40:15] sent to group 12: message 40`.
pub fn group_sent_text(sent: &GroupSendResponse, group_id: u64) -> String {
    let again = if sent.duplicate {
        " (already sent)"
    } else {
        ""
    };
    format!(
        "[seq {} {}] sent to group {}: message {}{}",
        sent.group_seq,
        format_time(sent.timestamp_ms),
        group_id,
        sent.message_id,
        again
    )
}

/// `{"user_id":N}`.
pub fn registered_json(user_id: u64) -> String {
    to_line(&serde_json::json!({ "user_id": user_id }))
}

/// A text body as text; any other content as a short description.
fn body_text(entry: &InboxEntry) -> String {
    let content_type = entry.content_type.trim();
    if content_type.is_empty() || content_type.starts_with("text/") {
        String::from_utf8_lossy(&entry.body).into_owned()
    } else {
        format!("<{} bytes of {}>", entry.body.len(), content_type)
    }
}

/// `value` as one line of JSON.
pub fn to_line<T: Serialize>(value: &T) -> String {
    // Serialising these plain structs cannot fail; say so if it ever does.
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The Gregorian date `days` days after 1970-01-01.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Count from 0000-03-01 so leap days fall at the end of each year; a
    // 400-year era has 146 097 days.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> InboxEntry {
        InboxEntry {
            version: 12,
            message_id: 99,
            sender_id: 1,
            recipient_id: 17,
            body: "hello".into(),
            content_type: "text/plain; charset=utf-8".into(),
            timestamp_ms: 1_795_729_203_000,
            group_id: 0,
            group_seq: 0,
            group_event: None,
        }
    }

    fn event(kind: group_event::Kind, user_id: u64, username: &str) -> InboxEntry {
        InboxEntry {
            body: Vec::new(),
            content_type: String::new(),
            group_id: 5,
            group_seq: 9,
            group_event: Some(GroupEvent {
                kind: kind as i32,
                user_id,
                group_name: "team".into(),
                username: username.into(),
            }),
            ..entry()
        }
    }

    #[test]
    fn an_entry_is_one_json_object_without_group_fields_for_a_direct_message() {
        let line = entry_json(&entry());
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(value["version"], 12);
        assert_eq!(value["message_id"], 99);
        assert_eq!(value["from"], 1);
        assert_eq!(value["to"], 17);
        assert_eq!(value["body"], "hello");
        assert_eq!(value["timestamp"], 1_795_729_203_000u64);
        assert_eq!(value["content_type"], "text/plain; charset=utf-8");
        assert!(value.get("group_id").is_none());
        assert!(value.get("group_seq").is_none());
    }

    #[test]
    fn a_group_entry_carries_its_group_and_a_bad_body_is_lossy() {
        let mut grouped = entry();
        grouped.group_id = 5;
        grouped.group_seq = 8;
        grouped.body = vec![b'h', 0xff, b'i'];
        let value: serde_json::Value = serde_json::from_str(&entry_json(&grouped)).expect("json");
        assert_eq!(value["group_id"], 5);
        assert_eq!(value["group_seq"], 8);
        assert_eq!(value["group_event"], serde_json::Value::Null);
        assert!(
            value.get("group_event").is_some(),
            "a message has a null event"
        );
        assert_eq!(value["body"], "h\u{fffd}i");
    }

    #[test]
    fn a_group_event_is_a_json_object_of_the_entry() {
        let added = event(group_event::Kind::MemberAdded, 2, "bob");
        let value: serde_json::Value = serde_json::from_str(&entry_json(&added)).expect("json");
        assert_eq!(value["group_id"], 5);
        assert_eq!(value["group_seq"], 9);
        assert_eq!(
            value["group_event"],
            serde_json::json!({"kind":"member_added","user_id":2,"username":"bob","group_name":"team"})
        );
        let mut future = added.clone();
        if let Some(e) = future.group_event.as_mut() {
            e.kind = 99;
        }
        let value: serde_json::Value = serde_json::from_str(&entry_json(&future)).expect("json");
        assert_eq!(value["group_event"]["kind"], "unknown");
    }

    #[test]
    fn group_entries_print_with_the_groups_name() {
        let mut names = Names::default();
        names.learn(1, "alice");
        let mut message = entry();
        message.group_id = 5;
        message.group_seq = 8;
        assert_eq!(
            entry_text(&message, &names),
            "[v12 2026-11-26 21:40:03] [group 5] alice: hello"
        );
        names.learn_from(&event(group_event::Kind::MemberAdded, 2, "bob"));
        assert_eq!(names.of(2), "bob", "an event names its user");
        assert!(entry_text(&message, &names).ends_with("] [#team] alice: hello"));

        use group_event::Kind;
        let expected = [
            (Kind::Created, 1, "alice", "[#team] group created by alice"),
            (
                Kind::MemberAdded,
                2,
                "bob",
                "[#team] bob joined (added by alice)",
            ),
            (Kind::MemberLeft, 2, "bob", "[#team] bob left"),
            (
                Kind::MemberRemoved,
                2,
                "bob",
                "[#team] bob was removed by alice",
            ),
            (Kind::Dissolved, 1, "alice", "[#team] group dissolved"),
        ];
        for (kind, user, name, text) in expected {
            let line = entry_text(&event(kind, user, name), &names);
            assert!(line.ends_with(text), "{line} should end with {text}");
            assert!(line.starts_with("[v12 2026-11-26 21:40:03] "), "{line}");
        }
    }

    #[test]
    fn a_group_send_answer_is_one_json_object_or_line() {
        let sent = GroupSendResponse {
            message_id: 40,
            group_seq: 5,
            timestamp_ms: 1000,
            duplicate: false,
        };
        let value: serde_json::Value =
            serde_json::from_str(&group_sent_json(&sent, 12)).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"message_id":40,"group_seq":5,"timestamp":1000,"duplicate":false,"group_id":12})
        );
        assert_eq!(
            group_sent_text(&sent, 12),
            "[seq 5 1970-01-01 00:00:01] sent to group 12: message 40"
        );
    }

    #[test]
    fn a_send_answer_is_one_json_object() {
        let sent = SendResponse {
            message_id: 7,
            version: 3,
            timestamp_ms: 1000,
            duplicate: true,
        };
        let value: serde_json::Value = serde_json::from_str(&sent_json(&sent, 17)).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"message_id":7,"version":3,"timestamp":1000,"duplicate":true,"to":17})
        );
        assert_eq!(registered_json(4), r#"{"user_id":4}"#);
    }

    #[test]
    fn a_human_line_names_known_users_and_numbers_the_rest() {
        let mut names = Names::default();
        names.learn(1, "alice");
        assert_eq!(
            entry_text(&entry(), &names),
            "[v12 2026-11-26 21:40:03] alice -> #17: hello"
        );
        let mut binary = entry();
        binary.content_type = "image/png".into();
        assert!(entry_text(&binary, &names).ends_with(": <5 bytes of image/png>"));
    }

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_709_251_199_000), "2024-02-29 23:59:59");
        assert_eq!(format_time(4_102_444_800_000), "2100-01-01 00:00:00");
    }
}
