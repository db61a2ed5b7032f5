//! FishChat wire types.
//!
//! This crate owns every message that crosses a process boundary and nothing
//! else: generated code, and the client protocol's framing ([`frame`]), which
//! is part of the wire format and is shared by server and SDK. It defines the peer service
//! that carries Raft traffic between nodes ([`peer`]) and the client protocol
//! spoken over QUIC ([`client`], documented in `docs/protocol.md`).
//!
//! Promise: changing a `.proto` file here is the only way a wire format
//! changes. Field numbers are never reused.

/// Node-to-node Raft transport (`proto/peer.proto`).
#[allow(missing_docs, clippy::all)]
pub mod peer {
    tonic::include_proto!("fishchat.peer.v1");
}

/// The client protocol over QUIC (`proto/client.proto`).
#[allow(missing_docs, clippy::all)]
pub mod client {
    tonic::include_proto!("fishchat.client.v1");
}

pub mod frame;
