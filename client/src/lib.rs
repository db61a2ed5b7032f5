//! The FishChat client SDK.
