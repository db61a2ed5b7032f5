//! The global options and their defaults: flags first, then `FISHCHAT_*`
//! environment variables, then built-in defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use fishchat_client::parse_server_list;

/// The servers tried when neither `--server` nor `FISHCHAT_SERVER` is set.
pub const DEFAULT_SERVERS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";
/// The CA file read when neither `--ca` nor `FISHCHAT_CA` is set.
pub const DEFAULT_CA: &str = "./data/ca.pem";

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// A node's client address; repeat, or separate with commas, for several.
    /// [env: FISHCHAT_SERVER] [default: 127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103]
    #[arg(long = "server", value_name = "HOST:PORT", global = true)]
    pub servers: Vec<String>,
    /// The cluster CA certificate (PEM). [env: FISHCHAT_CA] [default: ./data/ca.pem]
    #[arg(long, value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Username. [env: FISHCHAT_USER]
    #[arg(long, value_name = "NAME", global = true)]
    pub user: Option<String>,
    /// Password. [env: FISHCHAT_PASSWORD]
    #[arg(long, value_name = "PW", global = true)]
    pub password: Option<String>,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// How often `watch` and `chat` sync when no notify arrives, in seconds.
    /// [env: FISHCHAT_SYNC_INTERVAL_SECS] [default: 5]
    #[arg(long, value_name = "SECS", global = true)]
    pub sync_interval_secs: Option<u64>,
}

/// The global options with every default applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Node client addresses, in the order to try them.
    pub servers: Vec<String>,
    /// Path of the cluster CA.
    pub ca: PathBuf,
    /// Username, if given.
    pub user: Option<String>,
    /// Password, if given.
    pub password: Option<String>,
    /// JSON output.
    pub json: bool,
    /// The sync interval of `watch` and `chat`, if not the SDK's default.
    pub sync_interval: Option<Duration>,
}

impl Settings {
    /// Applies the defaults to `args`, reading variables through `env`
    /// (`std::env::var` in the program, a map in tests). Empty variables
    /// count as unset.
    pub fn resolve(args: &GlobalArgs, env: impl Fn(&str) -> Option<String>) -> Settings {
        let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let from_flags: Vec<String> = args
            .servers
            .iter()
            .flat_map(|s| parse_server_list(s))
            .collect();
        let servers = if !from_flags.is_empty() {
            from_flags
        } else {
            let list = env("FISHCHAT_SERVER").unwrap_or_else(|| DEFAULT_SERVERS.to_string());
            parse_server_list(&list)
        };
        Settings {
            servers,
            ca: args
                .ca
                .clone()
                .or_else(|| env("FISHCHAT_CA").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CA)),
            user: args.user.clone().or_else(|| env("FISHCHAT_USER")),
            password: args.password.clone().or_else(|| env("FISHCHAT_PASSWORD")),
            json: args.json,
            sync_interval: args
                .sync_interval_secs
                .or_else(|| env("FISHCHAT_SYNC_INTERVAL_SECS").and_then(|v| v.trim().parse().ok()))
                .map(|secs| Duration::from_secs(secs.max(1))),
        }
    }

    /// The username and password, or a usage error naming what is missing.
    pub fn credentials(&self) -> Result<(&str, &str), String> {
        let user = self
            .user
            .as_deref()
            .ok_or("missing --user NAME (or FISHCHAT_USER)")?;
        let password = self
            .password
            .as_deref()
            .ok_or("missing --password PW (or FISHCHAT_PASSWORD)")?;
        Ok((user, password))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;

    use super::*;
    use crate::Cli;

    fn settings(argv: &[&str], vars: &[(&str, &str)]) -> Settings {
        let cli = Cli::try_parse_from(argv).expect("arguments parse");
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::resolve(&cli.global, |name| vars.get(name).cloned())
    }

    #[test]
    fn with_nothing_set_the_local_cluster_and_data_ca_are_used() {
        let s = settings(&["fishchat", "sync"], &[]);
        assert_eq!(
            s.servers,
            vec!["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
        );
        assert_eq!(s.ca, PathBuf::from("./data/ca.pem"));
        assert_eq!(s.user, None);
        assert_eq!(s.sync_interval, None);
        assert!(s.credentials().is_err());
        assert!(!s.json);
    }

    #[test]
    fn environment_variables_fill_in_what_flags_leave_out() {
        let s = settings(
            &["fishchat", "sync"],
            &[
                ("FISHCHAT_SERVER", "10.0.0.1:7101, 10.0.0.2:7102"),
                ("FISHCHAT_CA", "/etc/fishchat/ca.pem"),
                ("FISHCHAT_USER", "alice"),
                ("FISHCHAT_PASSWORD", "secret123"),
                ("FISHCHAT_SYNC_INTERVAL_SECS", "600"),
            ],
        );
        assert_eq!(s.sync_interval, Some(Duration::from_secs(600)));
        assert_eq!(s.servers, vec!["10.0.0.1:7101", "10.0.0.2:7102"]);
        assert_eq!(s.ca, PathBuf::from("/etc/fishchat/ca.pem"));
        assert_eq!(s.credentials(), Ok(("alice", "secret123")));
    }

    #[test]
    fn flags_win_over_the_environment_and_may_follow_the_command() {
        let s = settings(
            &[
                "fishchat", "--server", "a:1", "--server", "b:2,c:3", "sync", "--user", "bob",
                "--json",
            ],
            &[("FISHCHAT_SERVER", "z:9"), ("FISHCHAT_USER", "alice")],
        );
        assert_eq!(s.servers, vec!["a:1", "b:2", "c:3"]);
        assert_eq!(s.user.as_deref(), Some("bob"));
        assert!(s.json);
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let s = settings(&["fishchat", "sync"], &[("FISHCHAT_SERVER", " ")]);
        assert_eq!(s.servers.len(), 3);
    }
}
