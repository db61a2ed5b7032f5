//! Which cluster a peer request belongs to.
//!
//! A node that was formed apart from the others (started once with a wrong
//! peer list, say, so that it made groups of its own) has Raft logs that
//! conflict with the real cluster's. If the two ever exchange appends,
//! openraft on either side would be asked to reconcile committed entries
//! that differ, and the replicas' states would diverge. So every request a
//! node sends to a peer carries its cluster's tag in the `fishchat-cluster`
//! header, and a node refuses, with `FAILED_PRECONDITION`, any request whose
//! tag differs from its own, before any group sees it.
//!
//! The tag is set once, by the application, when it knows which cluster the
//! node belongs to (FishChat: the cluster id in the meta group's record).
//! Until then the node neither sends a tag nor checks one: a node that is
//! new to its cluster must be able to join it. A request without a tag is
//! accepted for the same reason.
//!
//! An append stream lives long, and its header is sent once, when it opens.
//! So the receiver checks the opening header against its tag again with
//! every message (its tag may have been set since), and the sender reopens
//! a stream it opened before its own tag was set.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The header that carries the tag.
pub const CLUSTER_HEADER: &str = "fishchat-cluster";

/// This node's cluster tag, once known. Clones share it. As a client
/// interceptor it adds the tag to every request.
#[derive(Clone, Debug, Default)]
pub struct ClusterTag {
    value: Arc<OnceLock<MetadataValue<Ascii>>>,
    /// When a refusal was last logged (a stranded leader retries every
    /// heartbeat; the log says so once in [`WARN_EVERY`]).
    last_warned: Arc<Mutex<Option<Instant>>>,
}

/// How often a node says, at most, that it refuses another cluster.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why a tag was not set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TagError {
    /// A tag travels as an HTTP header value: visible ASCII only.
    #[error("a cluster tag must be visible ASCII, not empty: {0:?}")]
    Invalid(String),
    /// The node already belongs to another cluster.
    #[error("this node's cluster tag is {current:?}, not {wanted:?}")]
    AlreadySet {
        /// The tag set first.
        current: String,
        /// The tag asked for now.
        wanted: String,
    },
}

impl ClusterTag {
    /// Sets the tag. Setting the same tag again is fine; another is refused.
    pub fn set(&self, tag: &str) -> Result<(), TagError> {
        let invalid = || TagError::Invalid(tag.to_string());
        if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        let value: MetadataValue<Ascii> = tag.parse().map_err(|_| invalid())?;
        let current = self.value.get_or_init(|| value.clone());
        if *current == value {
            Ok(())
        } else {
            Err(TagError::AlreadySet {
                current: current.to_str().unwrap_or_default().to_string(),
                wanted: tag.to_string(),
            })
        }
    }

    /// The tag, once set.
    pub fn get(&self) -> Option<&str> {
        self.value.get().and_then(|v| v.to_str().ok())
    }

    /// Whether the tag is set.
    pub(crate) fn is_set(&self) -> bool {
        self.value.get().is_some()
    }

    /// The server side: refuses a request tagged with another cluster.
    pub(crate) fn check(&self) -> ClusterCheck {
        ClusterCheck(self.clone())
    }

    /// Refuses `theirs`, a request's tag, if both it and this node's are
    /// known and they differ.
    pub(crate) fn admits(&self, theirs: Option<&MetadataValue<Ascii>>) -> Result<(), Status> {
        let (Some(mine), Some(theirs)) = (self.value.get(), theirs) else {
            return Ok(());
        };
        if mine == theirs {
            return Ok(());
        }
        let show = |v: &MetadataValue<Ascii>| v.to_str().unwrap_or("(not text)").to_string();
        if self.time_to_warn() {
            tracing::warn!(
                mine = %show(mine),
                theirs = %show(theirs),
                "refusing peer requests from another cluster (said at most every 10 s)"
            );
        }
        Err(Status::failed_precondition(format!(
            "this node belongs to cluster {}, the request to cluster {}",
            show(mine),
            show(theirs)
        )))
    }

    /// Whether a refusal should be logged now.
    fn time_to_warn(&self) -> bool {
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= WARN_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

impl Interceptor for ClusterTag {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(tag) = self.value.get() {
            request.metadata_mut().insert(CLUSTER_HEADER, tag.clone());
        }
        Ok(request)
    }
}

/// Refuses requests from another cluster (see the module's doc).
#[derive(Clone, Debug)]
pub(crate) struct ClusterCheck(ClusterTag);

impl Interceptor for ClusterCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.0.admits(request.metadata().get(CLUSTER_HEADER))?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(tag: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(tag) = tag {
            request
                .metadata_mut()
                .insert(CLUSTER_HEADER, tag.parse().expect("a header value"));
        }
        request
    }

    #[test]
    fn a_request_tagged_with_another_cluster_is_refused_and_only_that() {
        let tag = ClusterTag::default();
        let mut check = tag.check();
        assert!(
            check.call(tagged(Some("beta"))).is_ok(),
            "a node that does not know its cluster yet checks nothing"
        );
        tag.set("alpha").expect("a valid tag");
        let refused = check
            .call(tagged(Some("beta")))
            .expect_err("another cluster");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(check.call(tagged(Some("alpha"))).is_ok());
        assert!(
            check.call(tagged(None)).is_ok(),
            "an untagged request passes"
        );
    }

    #[test]
    fn the_sender_adds_its_tag_once_it_is_set() {
        let mut tag = ClusterTag::default();
        let untagged = tag.call(Request::new(())).expect("passes");
        assert!(untagged.metadata().get(CLUSTER_HEADER).is_none());
        tag.set("alpha").expect("a valid tag");
        let sent = tag.call(Request::new(())).expect("passes");
        assert_eq!(
            sent.metadata().get(CLUSTER_HEADER).map(|v| v.to_str().ok()),
            Some(Some("alpha"))
        );
    }

    #[test]
    fn a_tag_is_set_once_and_must_be_visible_ascii() {
        let tag = ClusterTag::default();
        assert_eq!(tag.set(""), Err(TagError::Invalid(String::new())));
        assert_eq!(tag.set("a b"), Err(TagError::Invalid("a b".into())));
        assert_eq!(tag.get(), None);
        tag.set("alpha").expect("first");
        tag.set("alpha").expect("the same again");
        assert_eq!(
            tag.set("beta"),
            Err(TagError::AlreadySet {
                current: "alpha".into(),
                wanted: "beta".into()
            })
        );
        assert_eq!(tag.get(), Some("alpha"));
    }
}
