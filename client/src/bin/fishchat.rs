//! `fishchat`: the command-line client.
fn main() {}
