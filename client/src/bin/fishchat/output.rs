//! What the commands print: one JSON object per line with `--json`, short
//! human lines otherwise.

use std::collections::HashMap;

use fishchat_client::proto::{InboxEntry, SendResponse};
use serde::Serialize;

/// User names the program knows. There is no reverse lookup in the
/// protocol, so only the logged-in user and users looked up by name have
/// names; others print as `#17`.
#[derive(Debug, Default, Clone)]
pub struct Names {
    known: HashMap<u64, String>,
}

impl Names {
    /// Remembers that `user_id` is `name`.
    pub fn learn(&mut self, user_id: u64, name: &str) {
        self.known.insert(user_id, name.to_string());
    }

    /// The name of `user_id`, or `#user_id`.
    pub fn of(&self, user_id: u64) -> String {
        self.known
            .get(&user_id)
            .cloned()
            .unwrap_or_else(|| format!("#{user_id}"))
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

/// `entry` as one line of JSON; `body` is the body as UTF-8 (lossy).
pub fn entry_json(entry: &InboxEntry) -> String {
    let grouped = entry.group_id != 0;
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
    };
    to_line(&line)
}

/// `entry` as one human line: `[v12 2026-11-26 21:40:03] alice -> bob: hello`.
pub fn entry_text(entry: &InboxEntry, names: &Names) -> String {
    let group = if entry.group_id != 0 {
        format!(" (group #{} seq {})", entry.group_id, entry.group_seq)
    } else {
        String::new()
    };
    format!(
        "[v{} {}] {} -> {}{}: {}",
        entry.version,
        format_time(entry.timestamp_ms),
        names.of(entry.sender_id),
        names.of(entry.recipient_id),
        group,
        body_text(entry)
    )
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

fn to_line<T: Serialize>(value: &T) -> String {
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
        assert_eq!(value["body"], "h\u{fffd}i");
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
