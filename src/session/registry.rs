//! The registry of live calls, keyed by Twilio `streamSid`.
//!
//! A `DashMap` (sharded locks) is touched twice per call, at `start` and at the end, never
//! per frame: each call's media path only uses what its own task owns. Entries are removed by
//! [`Registration`]'s `Drop`, so a call that ends by `stop`, a dropped socket, an upstream
//! failure or a panic in its task is removed all the same, and the active-calls gauge with it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// What the registry knows about a live call.
#[derive(Clone, Debug)]
pub struct CallEntry {
    pub call_sid: String,
    pub started: Instant,
    /// Cancelling this ends the call (used by shutdown once the drain deadline passes).
    pub cancel: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
#[error("stream {0} is already live")]
pub struct DuplicateStream(pub String);

pub struct CallRegistry {
    calls: DashMap<String, CallEntry>,
    metrics: Arc<Metrics>,
}

impl CallRegistry {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            calls: DashMap::new(),
            metrics,
        })
    }

    /// Adds a call. A second live stream with the same `streamSid` is refused: it would be
    /// another socket claiming an existing call.
    pub fn register(
        self: &Arc<Self>,
        stream_sid: &str,
        entry: CallEntry,
    ) -> Result<Registration, DuplicateStream> {
        match self.calls.entry(stream_sid.to_owned()) {
            Entry::Occupied(_) => Err(DuplicateStream(stream_sid.to_owned())),
            Entry::Vacant(vacant) => {
                vacant.insert(entry);
                self.metrics.calls_active.fetch_add(1, Relaxed);
                self.metrics.calls_started.fetch_add(1, Relaxed);
                Ok(Registration {
                    registry: Arc::clone(self),
                    stream_sid: stream_sid.to_owned(),
                })
            }
        }
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    pub fn get(&self, stream_sid: &str) -> Option<CallEntry> {
        self.calls.get(stream_sid).map(|entry| entry.clone())
    }
}

/// Removes its call from the registry when dropped.
pub struct Registration {
    registry: Arc<CallRegistry>,
    stream_sid: String,
}

impl Registration {
    pub fn stream_sid(&self) -> &str {
        &self.stream_sid
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.registry.calls.remove(&self.stream_sid).is_some() {
            self.registry.metrics.calls_active.fetch_sub(1, Relaxed);
            self.registry.metrics.calls_ended.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> CallEntry {
        CallEntry {
            call_sid: "CA1".into(),
            started: Instant::now(),
            cancel: CancellationToken::new(),
        }
    }

    #[test]
    fn registration_is_removed_on_drop_and_gauges_follow() {
        let metrics = Arc::new(Metrics::default());
        let registry = CallRegistry::new(Arc::clone(&metrics));
        let guard = registry.register("MZ1", entry()).unwrap();
        assert!(registry.register("MZ1", entry()).is_err());
        assert_eq!(registry.len(), 1);
        assert_eq!(metrics.calls_active.load(Relaxed), 1);
        drop(guard);
        assert!(registry.is_empty());
        assert_eq!(metrics.calls_active.load(Relaxed), 0);
        assert_eq!(metrics.calls_ended.load(Relaxed), 1);
    }

    #[test]
    fn a_panicking_owner_still_removes_its_call() {
        let registry = CallRegistry::new(Arc::new(Metrics::default()));
        let registry_in_thread = Arc::clone(&registry);
        let result = std::thread::spawn(move || {
            let _guard = registry_in_thread.register("MZ2", entry()).unwrap();
            panic!("call task failed");
        })
        .join();
        assert!(result.is_err());
        assert!(registry.is_empty());
    }
}
