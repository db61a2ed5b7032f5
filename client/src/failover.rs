//! Failover: replacing a lost connection with one to the next node, and
//! reopening the session there: by resuming it with its token
//! (`ResumeRequest`: no password hash, no new session, so no older session
//! to end across a cluster that just lost a node), or, when the token is no
//! longer good, by logging in again with the stored credentials.
//!
//! The nodes are tried in turn, starting after the one that failed: the
//! configured addresses first, then those learned from the last
//! `LoginResponse.client_addrs`, and the failed node last (it may come
//! back). A node that completes the handshake but cannot log the user in
//! with a retryable error (say its shard is electing a leader) is passed
//! over for the next. Failovers are serialised, and each names the
//! connection generation it replaces, so many requests failing at once on
//! one connection reconnect once.

use std::sync::Arc;

use fishchat_proto::client::{request, response, ErrorCode, LoginResponse, Request, ResumeRequest};

use crate::client::{exchange, login_body, unexpected, Client, Credentials, Session};
use crate::connection::Connection;
use crate::error::ClientError;

impl Client {
    /// Logs in again on the current connection with the stored credentials
    /// (one attempt), refreshing the token.
    pub(crate) async fn relogin(&self) -> Result<(), ClientError> {
        let (connection, credentials) = {
            let state = self.state();
            let credentials = state.session.as_ref().and_then(|s| s.credentials.clone());
            (state.connection.clone(), credentials)
        };
        let Some(credentials) = credentials else {
            return Err(ClientError::Config(
                "no stored credentials to log in again".to_string(),
            ));
        };
        let answer = self.login_on(&connection, &credentials).await?;
        self.keep_login(answer, credentials);
        Ok(())
    }

    /// Replaces the connection of `failed_generation` with one to the next
    /// reachable node, with the session reopened there if credentials are
    /// stored (see [`Client::reopen_on`]). Does
    /// nothing if another task already replaced it.
    pub(crate) async fn failover(&self, failed_generation: u64) -> Result<(), ClientError> {
        let _one_at_a_time = self.shared.failover_lock.lock().await;
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let (order, credentials, token) = {
            let state = self.state();
            if state.generation != failed_generation {
                return Ok(());
            }
            let candidates = merge_servers(&self.shared.config.servers, &state.learned_servers);
            let order = rotation(&candidates, state.connection.server());
            let credentials = state.session.as_ref().and_then(|s| s.credentials.clone());
            let token = state.session.as_ref().map(|s| s.token.clone());
            (order, credentials, token)
        };
        let mut failures = Vec::new();
        for server in order {
            let connection =
                match Connection::connect_with(&self.shared.quic, &self.shared.config, &server)
                    .await
                {
                    Ok(connection) => Arc::new(connection),
                    Err(e) => {
                        failures.push(e.detail());
                        continue;
                    }
                };
            let Some(credentials) = credentials.clone() else {
                self.install(connection);
                return Ok(());
            };
            match self
                .reopen_on(&connection, token.as_deref(), &credentials)
                .await
            {
                Ok(answer) => {
                    self.install(connection);
                    self.keep_login(answer, credentials);
                    tracing::info!(%server, "failed over");
                    return Ok(());
                }
                Err(e) if e.is_retryable() => {
                    connection.close();
                    failures.push(format!("{server}: login: {e}"));
                }
                Err(e) => {
                    self.install(connection);
                    return Err(e);
                }
            }
        }
        Err(ClientError::Connect(failures.join("; ")))
    }

    /// Reopens the session on `connection`: resumes it with `token`, or
    /// logs in with `credentials` if there is no token or the session it
    /// names is over (revoked, replaced, expired).
    async fn reopen_on(
        &self,
        connection: &Connection,
        token: Option<&str>,
        credentials: &Credentials,
    ) -> Result<LoginResponse, ClientError> {
        let Some(token) = token else {
            return self.login_on(connection, credentials).await;
        };
        let request = Request {
            request_id: self.next_request_id(),
            token: token.to_string(),
            body: Some(request::Body::Resume(ResumeRequest {})),
        };
        match exchange(connection, &request).await {
            Ok(response::Body::Resume(answer)) => Ok(answer),
            Ok(other) => Err(unexpected("resume", &other)),
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        ErrorCode::TokenRevoked
                            | ErrorCode::TokenExpired
                            | ErrorCode::Unauthenticated
                    )
                ) =>
            {
                self.login_on(connection, credentials).await
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn login_on(
        &self,
        connection: &Connection,
        credentials: &Credentials,
    ) -> Result<LoginResponse, ClientError> {
        let request = Request {
            request_id: self.next_request_id(),
            token: String::new(),
            body: Some(login_body(credentials)),
        };
        match exchange(connection, &request).await? {
            response::Body::Login(answer) => Ok(answer),
            other => Err(unexpected("login", &other)),
        }
    }

    pub(crate) fn keep_login(&self, answer: LoginResponse, credentials: Credentials) {
        let mut state = self.state();
        if !answer.client_addrs.is_empty() {
            state.learned_servers = answer.client_addrs;
        }
        state.session = Some(Session {
            user_id: answer.user_id,
            token: answer.token,
            credentials: Some(credentials),
        });
    }

    fn install(&self, connection: Arc<Connection>) {
        let mut state = self.state();
        state.connection = connection;
        state.generation += 1;
    }
}

/// The configured servers, then the learned ones not configured.
fn merge_servers(configured: &[String], learned: &[String]) -> Vec<String> {
    let mut all = configured.to_vec();
    for server in learned {
        if !all.contains(server) {
            all.push(server.clone());
        }
    }
    all
}

/// The servers to try after `current` failed: those after it in the list,
/// then those before it, and `current` itself last (it may come back).
fn rotation(servers: &[String], current: &str) -> Vec<String> {
    match servers.iter().position(|s| s == current) {
        Some(i) => servers[i + 1..]
            .iter()
            .chain(&servers[..=i])
            .cloned()
            .collect(),
        None => servers.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn failover_tries_the_next_servers_then_the_failed_one_last() {
        let servers = names(&["a:1", "b:2", "c:3"]);
        assert_eq!(rotation(&servers, "b:2"), names(&["c:3", "a:1", "b:2"]));
        assert_eq!(rotation(&servers, "c:3"), names(&["a:1", "b:2", "c:3"]));
        assert_eq!(rotation(&servers, "z:9"), servers);
    }

    #[test]
    fn learned_addresses_follow_the_configured_ones_without_repeats() {
        let merged = merge_servers(&names(&["a:1"]), &names(&["b:2", "a:1", "c:3"]));
        assert_eq!(merged, names(&["a:1", "b:2", "c:3"]));
    }
}
