//! Which tenant answers a dialled number: the control-plane lookup with a time budget, a cache
//! and a fallback, so a call is always answered.
//!
//! [`TenantDirectory::resolve`] owns the policy; [`DirectorySettings::freshness`] is its
//! sans-IO core (a pure function of `fetched_at` and `now`, unit-tested without sockets or
//! sleeps). The cache is keyed by the dialled (`to`) number and holds the control plane's last
//! answer for it, a context or "unknown number" (a 404, cached like a context).
//!
//! | cache state for `to` | what `resolve` does | [`ContextSource`] |
//! |---|---|---|
//! | fresh (age < `ttl`, default 60 s) | serves it, no request | `cached` (or `unknown_number`) |
//! | stale (age < `ttl` + `stale_while_revalidate`, default 10 min) | serves it at once and starts one background refresh | `stale` (or `unknown_number`) |
//! | missing or expired | fetches, waiting at most `budget` (default 300 ms) | `fresh` (or `unknown_number`) |
//! | … budget passed or the control plane failed | a usable cache entry if one appeared, else nothing | `cached`/`stale`, else `fallback` |
//!
//! Invariants:
//! - **The call is always answered.** `resolve` never fails and never waits much longer than
//!   the budget; `context: None` means "answer with your default agent" (source `fallback` or
//!   `unknown_number`). The default agent is the caller's, not this module's.
//! - **One request per number at a time (single-flight).** Concurrent misses for one number
//!   share one fetch, and a stale entry triggers at most one refresh while one is running. A
//!   fetch is a spawned task: when the budget expires the caller moves on, and the fetch keeps
//!   going (up to the client's request timeout) so its answer still fills the cache for the
//!   next call. A failed fetch leaves the cache as it was.
//! - **No lock across an await, none on the media path.** The cache is a `DashMap`; its shard
//!   guards live only inside synchronous helpers. Only call set-up touches it.
//! - **A memory namespace never leaves its tenant.** The cache is per number but the namespace
//!   is per caller: a context served for another `from` than it was fetched for gets
//!   `api::memory_namespace(tenant_id, from)`. A fetched context whose namespace is not
//!   `<tenant_id>/…` (or has an empty, `.` or `..` segment after it) is corrected to that rule
//!   and logged; one whose `tenant_id` is empty or contains `/` is refused as a failed lookup.
//! - **Bounded.** Once the map holds more than `max_entries` numbers (default 10 000), expired
//!   entries are purged whenever a fetch lands.
//!
//! Metrics: every `resolve` observes `voxrelay_control_lookup_seconds` and counts
//! `voxrelay_control_lookups_total{source=…}`; failed fetches are also in
//! `voxrelay_control_request_failures_total{endpoint="context"}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::watch;

use crate::control::api::{self, TenantContext, namespace_within_tenant};
use crate::control::client::ControlPlaneClient;
use crate::session::metrics::{ControlEndpoint, Metrics};

/// Default longest wait for the control plane before the fallback answers.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(300);
/// Default age up to which a cached answer is served without asking again.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Default time past the TTL during which a cached answer is still served while it is refreshed.
pub const DEFAULT_STALE_WHILE_REVALIDATE: Duration = Duration::from_secs(600);
/// Default number of cached numbers above which expired entries are purged.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

// The report's `context_source` values: a wire name, so it lives with the wire types.
pub use crate::control::api::ContextSource;

/// How usable a cached answer is at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it; no request.
    Fresh,
    /// Serve it, and refresh it in the background.
    Stale,
    /// Do not serve it; fetch.
    Expired,
}

/// The directory's timing. All fields are public; [`Default`] has the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectorySettings {
    /// Longest `resolve` waits for the control plane. Default [`DEFAULT_BUDGET`].
    pub budget: Duration,
    /// Default [`DEFAULT_TTL`].
    pub ttl: Duration,
    /// Default [`DEFAULT_STALE_WHILE_REVALIDATE`].
    pub stale_while_revalidate: Duration,
    /// Default [`DEFAULT_MAX_ENTRIES`].
    pub max_entries: usize,
}

impl Default for DirectorySettings {
    fn default() -> Self {
        Self {
            budget: DEFAULT_BUDGET,
            ttl: DEFAULT_TTL,
            stale_while_revalidate: DEFAULT_STALE_WHILE_REVALIDATE,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

impl DirectorySettings {
    /// The freshness policy: fresh while `age < ttl`, stale while
    /// `age < ttl + stale_while_revalidate`, expired after. A `now` before `fetched_at` counts
    /// as age zero.
    pub fn freshness(&self, fetched_at: Instant, now: Instant) -> Freshness {
        let age = now.saturating_duration_since(fetched_at);
        if age < self.ttl {
            Freshness::Fresh
        } else if age < self.ttl.saturating_add(self.stale_while_revalidate) {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }
}

/// What [`TenantDirectory::resolve`] found for one call.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// The tenant's context, its `memory_namespace` for this caller; `None`: use the default
    /// agent (`source` is `Fallback` or `UnknownNumber`).
    pub context: Option<Arc<TenantContext>>,
    pub source: ContextSource,
    /// How long the lookup took.
    pub took: Duration,
}

/// Resolves dialled numbers to tenant contexts (see the module docs). Cheap to clone; clones
/// share the cache.
#[derive(Clone)]
pub struct TenantDirectory {
    inner: Arc<DirectoryInner>,
}

struct DirectoryInner {
    client: ControlPlaneClient,
    settings: DirectorySettings,
    metrics: Arc<Metrics>,
    entries: DashMap<String, Entry>,
}

#[derive(Default)]
struct Entry {
    answer: Option<Answer>,
    /// The fetch in flight for this number, if any (single-flight).
    fetching: Option<watch::Receiver<Fetch>>,
}

/// One answer of the control plane for a number.
#[derive(Clone)]
struct Answer {
    /// `None`: unknown number (404).
    context: Option<Arc<TenantContext>>,
    fetched_at: Instant,
    /// The caller the context was fetched for; its namespace is this caller's.
    from: Arc<str>,
}

#[derive(Clone)]
enum Fetch {
    Pending,
    Done(Answer),
    Failed,
}

/// What the synchronous cache check decided.
enum Step {
    Serve(ContextSource, Answer),
    Wait(watch::Receiver<Fetch>),
}

impl std::fmt::Debug for TenantDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantDirectory")
            .field("client", &self.inner.client)
            .field("settings", &self.inner.settings)
            .field("entries", &self.inner.entries.len())
            .finish()
    }
}

impl TenantDirectory {
    pub fn new(
        client: ControlPlaneClient,
        settings: DirectorySettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(DirectoryInner {
                client,
                settings,
                metrics,
                entries: DashMap::new(),
            }),
        }
    }

    pub fn settings(&self) -> &DirectorySettings {
        &self.inner.settings
    }

    /// The context for a call to `to` from `from`, within the budget; never fails (see the
    /// module docs). Must run inside a tokio runtime (a fetch is a spawned task).
    pub async fn resolve(&self, to: &str, from: &str, call_sid: &str) -> Resolution {
        let started = Instant::now();
        let (source, answer) = self.lookup(to, from, call_sid, started).await;
        let context = answer.and_then(|answer| for_caller(&answer, from));
        let took = started.elapsed();
        let metrics = &self.inner.metrics;
        metrics.control_lookup.observe(took);
        metrics.control_lookup_source(source);
        tracing::debug!(
            call_sid,
            source = source.as_str(),
            ?took,
            "context resolved"
        );
        Resolution {
            context,
            source,
            took,
        }
    }

    async fn lookup(
        &self,
        to: &str,
        from: &str,
        call_sid: &str,
        started: Instant,
    ) -> (ContextSource, Option<Answer>) {
        let mut fetch = match self.check(to, from, call_sid, started) {
            Step::Serve(source, answer) => return (source, Some(answer)),
            Step::Wait(fetch) => fetch,
        };
        let deadline = tokio::time::Instant::from_std(started + self.inner.settings.budget);
        let outcome = tokio::time::timeout_at(deadline, async {
            fetch
                .wait_for(|fetch| !matches!(fetch, Fetch::Pending))
                .await
                .map(|fetch| fetch.clone())
        })
        .await;
        if let Ok(Ok(Fetch::Done(answer))) = outcome {
            return (source_of(ContextSource::Fresh, &answer), Some(answer));
        }
        if outcome.is_err() {
            tracing::warn!(
                call_sid,
                budget = ?self.inner.settings.budget,
                "control plane slower than the lookup budget; the lookup goes on in the background"
            );
        }
        // Budget passed or the fetch failed: another lookup may have filled the cache since.
        match self.cached(to, Instant::now()) {
            Some((Freshness::Fresh, answer)) => {
                (source_of(ContextSource::Cached, &answer), Some(answer))
            }
            Some((_, answer)) => (source_of(ContextSource::Stale, &answer), Some(answer)),
            None => (ContextSource::Fallback, None),
        }
    }

    /// The cache decision, under the number's shard lock and nothing else: serve, or join (or
    /// start) the number's fetch.
    fn check(&self, to: &str, from: &str, call_sid: &str, now: Instant) -> Step {
        // Fast path: a fresh hit takes only the shard's read lock.
        if let Some((Freshness::Fresh, answer)) = self.cached(to, now) {
            return Step::Serve(source_of(ContextSource::Cached, &answer), answer);
        }

        let mut entry = self.inner.entries.entry(to.to_owned()).or_default();
        let entry = &mut *entry;
        if entry
            .fetching
            .as_ref()
            .is_some_and(|fetch| fetch.has_changed().is_err())
        {
            // Its task is gone without clearing the slot (it cannot, but never wedge a number).
            entry.fetching = None;
        }
        if let Some(answer) = &entry.answer {
            match self.inner.settings.freshness(answer.fetched_at, now) {
                Freshness::Fresh => {
                    return Step::Serve(source_of(ContextSource::Cached, answer), answer.clone());
                }
                Freshness::Stale => {
                    let answer = answer.clone();
                    if entry.fetching.is_none() {
                        entry.fetching = Some(self.spawn_fetch(to, from, call_sid));
                    }
                    return Step::Serve(source_of(ContextSource::Stale, &answer), answer);
                }
                Freshness::Expired => entry.answer = None,
            }
        }
        let fetch = entry
            .fetching
            .get_or_insert_with(|| self.spawn_fetch(to, from, call_sid));
        Step::Wait(fetch.clone())
    }

    /// The cached answer for `to` if it is still usable at `now` (fresh or stale).
    fn cached(&self, to: &str, now: Instant) -> Option<(Freshness, Answer)> {
        let entry = self.inner.entries.get(to)?;
        let answer = entry.answer.as_ref()?;
        match self.inner.settings.freshness(answer.fetched_at, now) {
            Freshness::Expired => None,
            freshness => Some((freshness, answer.clone())),
        }
    }

    /// Starts the fetch for `to`. Called with the number's entry locked; the task needs that
    /// lock only when it finishes, after this returns.
    fn spawn_fetch(&self, to: &str, from: &str, call_sid: &str) -> watch::Receiver<Fetch> {
        let (sender, receiver) = watch::channel(Fetch::Pending);
        let inner = self.inner.clone();
        let (to, from, call_sid) = (to.to_owned(), from.to_owned(), call_sid.to_owned());
        tokio::spawn(async move {
            // Clears the number's in-flight slot however this task ends.
            let _slot = FetchSlot {
                inner: inner.clone(),
                to: to.clone(),
                channel: sender.subscribe(),
            };
            let from: Arc<str> = from.into();
            let outcome = match inner.client.context(&to, &from, &call_sid).await {
                Ok(context) => match context.map(|c| within_tenant(c, &from, &call_sid)) {
                    None => Fetch::Done(Answer {
                        context: None,
                        fetched_at: Instant::now(),
                        from,
                    }),
                    Some(Ok(context)) => Fetch::Done(Answer {
                        context: Some(Arc::new(context)),
                        fetched_at: Instant::now(),
                        from,
                    }),
                    Some(Err(reason)) => {
                        inner
                            .metrics
                            .control_request_failure(ControlEndpoint::Context);
                        tracing::warn!(
                            call_sid,
                            "control plane sent an unusable context: {reason}"
                        );
                        Fetch::Failed
                    }
                },
                Err(error) => {
                    tracing::warn!(call_sid, %error, "control plane context lookup failed");
                    Fetch::Failed
                }
            };
            if let Fetch::Done(answer) = &outcome {
                inner.store(&to, answer.clone());
            }
            let _ = sender.send(outcome);
        });
        receiver
    }
}

impl DirectoryInner {
    fn store(&self, to: &str, answer: Answer) {
        self.entries.entry(to.to_owned()).or_default().answer = Some(answer);
        // No guard is held here: `len` and `retain` lock every shard in turn.
        if self.entries.len() > self.settings.max_entries {
            let now = Instant::now();
            self.entries.retain(|_, entry| {
                entry.fetching.is_some()
                    || entry.answer.as_ref().is_some_and(|answer| {
                        self.settings.freshness(answer.fetched_at, now) != Freshness::Expired
                    })
            });
        }
    }
}

/// Drop guard of a fetch task: frees the number's single-flight slot, even if the task is
/// cancelled (runtime shutdown) or panics; only if the slot still holds this task's fetch.
struct FetchSlot {
    inner: Arc<DirectoryInner>,
    to: String,
    channel: watch::Receiver<Fetch>,
}

impl Drop for FetchSlot {
    fn drop(&mut self) {
        if let Some(mut entry) = self.inner.entries.get_mut(&self.to) {
            let ours = entry
                .fetching
                .as_ref()
                .is_some_and(|fetch| fetch.same_channel(&self.channel));
            if ours {
                entry.fetching = None;
            }
        }
    }
}

/// An unknown number is `UnknownNumber` however it was served.
fn source_of(source: ContextSource, answer: &Answer) -> ContextSource {
    if answer.context.is_none() {
        ContextSource::UnknownNumber
    } else {
        source
    }
}

/// The answer's context as served to `from`: the fetched one for the caller it was fetched
/// for, otherwise a copy naming this caller's memory.
fn for_caller(answer: &Answer, from: &str) -> Option<Arc<TenantContext>> {
    let context = answer.context.as_ref()?;
    if *answer.from == *from {
        return Some(context.clone());
    }
    let mut context = TenantContext::clone(context);
    context.memory_namespace = api::memory_namespace(&context.tenant_id, from);
    Some(Arc::new(context))
}

/// Checks a fetched context's tenant and namespace (see the module docs).
fn within_tenant(
    mut context: TenantContext,
    from: &str,
    call_sid: &str,
) -> Result<TenantContext, &'static str> {
    if context.tenant_id.is_empty() || context.tenant_id.contains('/') {
        return Err("tenant_id is empty or contains '/'");
    }
    if !namespace_within_tenant(&context.tenant_id, &context.memory_namespace) {
        tracing::warn!(
            call_sid,
            tenant_id = context.tenant_id,
            "control plane sent a memory_namespace outside its tenant; using the default one"
        );
        context.memory_namespace = api::memory_namespace(&context.tenant_id, from);
    }
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ttl_s: u64, swr_s: u64) -> DirectorySettings {
        DirectorySettings {
            ttl: Duration::from_secs(ttl_s),
            stale_while_revalidate: Duration::from_secs(swr_s),
            ..DirectorySettings::default()
        }
    }

    fn context(tenant_id: &str, namespace: &str) -> TenantContext {
        TenantContext {
            tenant_id: tenant_id.into(),
            agent_name: "Ada".into(),
            voice: "marin".into(),
            greeting: None,
            instructions: "Be brief.".into(),
            audio_mode: crate::AudioMode::Pcmu,
            language: "en-US".into(),
            tools: Vec::new(),
            memory_namespace: namespace.into(),
            max_call_seconds: 0,
            fallback_number: None,
            hold_prompt: None,
            provider: None,
            model: None,
            record: None,
        }
    }

    #[test]
    fn freshness_is_fresh_then_stale_then_expired() {
        let policy = settings(60, 600);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(policy.freshness(t0, t0), Freshness::Fresh);
        assert_eq!(policy.freshness(t0, at(59)), Freshness::Fresh);
        assert_eq!(
            policy.freshness(t0, at(59) + Duration::from_millis(999)),
            Freshness::Fresh
        );
        assert_eq!(policy.freshness(t0, at(60)), Freshness::Stale);
        assert_eq!(policy.freshness(t0, at(659)), Freshness::Stale);
        assert_eq!(policy.freshness(t0, at(660)), Freshness::Expired);
        assert_eq!(policy.freshness(t0, at(100_000)), Freshness::Expired);
    }

    #[test]
    fn a_clock_before_the_fetch_counts_as_age_zero() {
        let t0 = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            settings(1, 1).freshness(t0, t0 - Duration::from_secs(5)),
            Freshness::Fresh
        );
    }

    #[test]
    fn without_a_stale_window_an_entry_goes_straight_to_expired() {
        let policy = settings(60, 0);
        let t0 = Instant::now();
        assert_eq!(
            policy.freshness(t0, t0 + Duration::from_secs(60)),
            Freshness::Expired
        );
        let no_cache = settings(0, 0);
        assert_eq!(no_cache.freshness(t0, t0), Freshness::Expired);
    }

    #[test]
    fn huge_windows_do_not_overflow() {
        let policy = DirectorySettings {
            ttl: Duration::MAX,
            stale_while_revalidate: Duration::MAX,
            ..DirectorySettings::default()
        };
        let t0 = Instant::now();
        assert_eq!(
            policy.freshness(t0, t0 + Duration::from_secs(1 << 40)),
            Freshness::Fresh
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let defaults = DirectorySettings::default();
        assert_eq!(defaults.budget, Duration::from_millis(300));
        assert_eq!(defaults.ttl, Duration::from_secs(60));
        assert_eq!(defaults.stale_while_revalidate, Duration::from_secs(600));
        assert_eq!(defaults.max_entries, 10_000);
    }

    #[test]
    fn a_namespace_outside_the_tenant_is_corrected_and_a_bad_tenant_refused() {
        let fixed = within_tenant(context("t1", "t2/+1555"), "+1555", "CA1").unwrap();
        assert_eq!(fixed.memory_namespace, "t1/+1555");
        let kept = within_tenant(context("t1", "t1/custom"), "+1555", "CA1").unwrap();
        assert_eq!(kept.memory_namespace, "t1/custom");
        assert!(within_tenant(context("", "/x"), "+1", "CA1").is_err());
        assert!(within_tenant(context("a/b", "a/b/x"), "+1", "CA1").is_err());
    }

    #[test]
    fn a_context_served_to_another_caller_names_that_callers_memory() {
        let answer = Answer {
            context: Some(Arc::new(context("t1", "t1/custom-for-alice"))),
            fetched_at: Instant::now(),
            from: Arc::from("+1555000111"),
        };
        let same = for_caller(&answer, "+1555000111").unwrap();
        assert!(Arc::ptr_eq(&same, answer.context.as_ref().unwrap()));
        let other = for_caller(&answer, "client:bob").unwrap();
        assert_eq!(other.memory_namespace, "t1/client_bob");
        assert_eq!(other.agent_name, "Ada");
        let unknown = Answer {
            context: None,
            ..answer
        };
        assert_eq!(for_caller(&unknown, "+1"), None);
        assert_eq!(
            source_of(ContextSource::Stale, &unknown),
            ContextSource::UnknownNumber
        );
    }
}
