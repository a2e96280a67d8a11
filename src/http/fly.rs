//! Pre-warm across Fly.io machines: which machine should serve a Media Streams upgrade.
//!
//! On Fly the voice webhook and the WebSocket may land on different machines of one app. The
//! webhook puts its machine's id (`FLY_MACHINE_ID`) in the stream URL's path
//! (`/twilio/media/m/<id>`; Twilio drops query strings on stream URLs); an upgrade that lands on
//! another machine answers with `fly-replay: prefer_instance=<id>` so Fly's proxy replays it to
//! the machine holding the pre-warmed session — or, if that machine is gone, to any other,
//! which then cold-starts. A request that is itself a replay (`fly-replay-src`) is never
//! replayed again. Off Fly (no machine id) nothing here changes anything.

/// The response header Fly's proxy acts on.
pub const REPLAY_HEADER: &str = "fly-replay";
/// Set by Fly's proxy on a replayed request.
pub const REPLAY_SOURCE_HEADER: &str = "fly-replay-src";
/// The stream path prefix that carries a machine id.
pub const MACHINE_PATH_PREFIX: &str = "/twilio/media/m/";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayDecision {
    /// Serve the upgrade here.
    Serve,
    /// Answer with `fly-replay: <value>` and no upgrade.
    Replay(String),
}

/// A Fly machine id as it may appear in a path: 1–64 characters of `[0-9a-z]` (Fly's ids are
/// 14 hex digits). Anything else is not an id we would have issued.
pub fn is_machine_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// Where the upgrade for a stream pre-warmed on `wanted` should run, when it reached
/// `this_machine` (`None` off Fly) and `replayed` says whether Fly already replayed it.
pub fn replay_decision(
    this_machine: Option<&str>,
    wanted: Option<&str>,
    replayed: bool,
) -> ReplayDecision {
    match (this_machine, wanted) {
        (Some(here), Some(wanted)) if here != wanted && !replayed && is_machine_id(wanted) => {
            ReplayDecision::Replay(format!("prefer_instance={wanted}"))
        }
        _ => ReplayDecision::Serve,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_only_on_fly_to_another_valid_machine_and_never_twice() {
        assert_eq!(
            replay_decision(Some("148e21d1c34289"), Some("3d8d9e1ad73189"), false),
            ReplayDecision::Replay("prefer_instance=3d8d9e1ad73189".into())
        );
        // Already there, already replayed, off Fly, no id in the path, a foreign id.
        assert_eq!(
            replay_decision(Some("3d8d9e1ad73189"), Some("3d8d9e1ad73189"), false),
            ReplayDecision::Serve
        );
        assert_eq!(
            replay_decision(Some("148e21d1c34289"), Some("3d8d9e1ad73189"), true),
            ReplayDecision::Serve
        );
        assert_eq!(
            replay_decision(None, Some("3d8d9e1ad73189"), false),
            ReplayDecision::Serve
        );
        assert_eq!(
            replay_decision(Some("148e21d1c34289"), None, false),
            ReplayDecision::Serve
        );
        assert_eq!(
            replay_decision(Some("148e21d1c34289"), Some("x;instance=evil"), false),
            ReplayDecision::Serve
        );
    }

    #[test]
    fn machine_ids_are_plain_lowercase_alphanumerics() {
        assert!(is_machine_id("3d8d9e1ad73189"));
        assert!(!is_machine_id(""));
        assert!(!is_machine_id("ABC"));
        assert!(!is_machine_id("a/b"));
        assert!(!is_machine_id(&"a".repeat(65)));
    }
}
