//! Key and channel names (PROTOCOL.md, "Broker naming").

pub fn room_channel(room: &str) -> String {
    format!("rt:room:{room}")
}
pub fn stream(room: &str) -> String {
    format!("rt:stream:{room}")
}
pub fn user_channel(user: &str) -> String {
    format!("rt:user:{user}")
}
/// A user's recent direct messages (a short stream), read by an instance that reconnects.
pub fn direct_stream(user: &str) -> String {
    format!("rt:direct:{user}")
}
/// The newest id trimmed out of a room's stream.
pub fn trimmed(room: &str) -> String {
    format!("rt:trimmed:{room}")
}
pub fn presence(room: &str) -> String {
    format!("rt:presence:{room}")
}
/// A publish's idempotency key, scoped by room and sender (see `idempotency::scope`).
pub fn idempotency(scope: &str) -> String {
    format!("rt:idem:{scope}")
}
pub fn presence_index(instance: &str) -> String {
    format!("rt:presence-of:{instance}")
}
pub const INSTANCES: &str = "rt:instances";
pub fn instance(id: &str) -> String {
    format!("rt:instances:{id}")
}
/// Each instance's own self-probe channel.
pub fn probe(instance: &str) -> String {
    format!("rt:probe:{instance}")
}
/// The key the self-probe writes.
pub fn probe_key(instance: &str) -> String {
    format!("rt:probe-seq:{instance}")
}
/// The key written to confirm that what was just read is replicated.
pub fn confirm_key(instance: &str) -> String {
    format!("rt:confirm:{instance}")
}
pub const ROOM_PREFIX: &str = "rt:room:";
pub const USER_PREFIX: &str = "rt:user:";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_protocol() {
        assert_eq!(room_channel("public:lobby"), "rt:room:public:lobby");
        assert_eq!(stream("public:lobby"), "rt:stream:public:lobby");
    }
}
