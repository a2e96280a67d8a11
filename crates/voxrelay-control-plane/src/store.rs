//! The reference control plane's SQLite store: tenants, numbers, calls, transcripts and the
//! messages `take_message` leaves.
//!
//! Owns the schema and every query. Access is one `Connection` behind
//! `Arc<std::sync::Mutex<…>>`, and every method blocks: the HTTP layer calls them inside
//! `tokio::task::spawn_blocking`. One connection serialises all requests, which is the point for
//! a reference service (simple, obviously consistent) and its limit (a production control plane
//! would use a pool or another database).
//!
//! Invariants: the schema is created idempotently on open (WAL mode, foreign keys on); seeding is
//! an upsert that writes nothing when nothing changed; a call is bound to at most one tenant, by
//! its first context lookup (or, for a call whose context the bridge served from its cache, its
//! first tool call), and no later lookup, tool call or report can move it to another tenant; a
//! call's record comes only from a bound report (its stream proved it is the call) and, once
//! stored, is final (the identical report again is acknowledged, any other refused); unbound
//! reports are kept apart (`unbound_reports`) and belong to no tenant; a tenant's provider and
//! model are read from its row at every context lookup (nothing here caches them, so a change
//! reaches the tenant's next call); every request that is refused changes nothing (its
//! transaction is rolled back).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::seed::{BusinessHours, Seed};
use super::tools::{Tool, ToolArguments, business_hours_output};
use voxrelay_core::control::api::{
    CallHistory, CallLatency, CallReport, ModelSessionReport, ReportAudio, ReportBinding,
    ReportFallback, ReportUsage, Speaker, TenantContext, ToolRequest, TranscriptEntry, TurnReport,
    memory_namespace,
};
use voxrelay_core::{AudioMode, Provider};

/// The schema this build creates and understands (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 5;

/// How long a statement waits for another process's lock on the file before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tenants (
    id               TEXT PRIMARY KEY,
    agent_name       TEXT NOT NULL,
    voice            TEXT NOT NULL,
    greeting         TEXT,
    instructions     TEXT NOT NULL,
    audio_mode       TEXT NOT NULL CHECK (audio_mode IN ('pcmu', 'pcm16')),
    language         TEXT NOT NULL,
    max_call_seconds INTEGER NOT NULL CHECK (max_call_seconds >= 0),
    -- JSON array of the enabled tools' names, in the order the context lists them.
    tools            TEXT NOT NULL,
    -- JSON {\"timezone\": …, \"days\": [7 × null | {\"opens\": \"HH:MM\", \"closes\": \"HH:MM\"}]}, Monday first.
    business_hours   TEXT NOT NULL,
    -- Schema 3. E.164, where callers go when no model session can be had; NULL: an apology.
    fallback_number  TEXT,
    -- Schema 3. 8 kHz mu-law played while a lost model session is replaced, 1 to
    -- MAX_HOLD_PROMPT_BYTES; NULL: the bridge's built-in prompt.
    hold_prompt      BLOB,
    -- Schema 4. The realtime provider for the tenant's calls; NULL: the bridge's
    -- VOXRELAY_PROVIDER.
    provider         TEXT CHECK (provider IN ('openai', 'gemini')),
    -- Schema 4. The provider's model id (1 to 128 of [A-Za-z0-9._-], as the seed checks it);
    -- NULL: the bridge's default model for the provider. Checked here too, so a row edited by
    -- hand cannot hand the bridge a value the seed would have refused.
    model            TEXT CHECK (length(model) BETWEEN 1 AND 128
                                 AND model NOT GLOB '*[^A-Za-z0-9._-]*'),
    -- Schema 5. 1: the tenant's calls are recorded, 0: not; NULL: the bridge's VOXRELAY_RECORD.
    record           INTEGER CHECK (record IN (0, 1))
) STRICT;

CREATE TABLE IF NOT EXISTS numbers (
    number    TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id)
) STRICT;
CREATE INDEX IF NOT EXISTS numbers_by_tenant ON numbers (tenant_id);

-- One row per call SID: created by the first context lookup (or tool call, or report); the
-- report columns stay NULL until the bridge reports the call.
CREATE TABLE IF NOT EXISTS calls (
    call_sid          TEXT PRIMARY KEY,
    tenant_id         TEXT REFERENCES tenants (id),
    from_number       TEXT NOT NULL DEFAULT '',
    to_number         TEXT NOT NULL DEFAULT '',
    looked_up_at_ms   INTEGER,
    reported_at_ms    INTEGER,
    stream_sid        TEXT,
    agent_name        TEXT,
    started_at_ms     INTEGER,
    ended_at_ms       INTEGER,
    end_reason        TEXT,
    context_source    TEXT,
    memory_namespace  TEXT,
    audio_seconds_in  REAL,
    audio_seconds_out REAL,
    barge_ins         INTEGER,
    dtmf_digits       INTEGER,
    tool_calls        INTEGER,
    -- JSON of the report's `latency` (percentiles per direction).
    latency           TEXT,
    -- Schema 2. 'bound' once a bound stream reported (NULL: reported before schema 2, or not
    -- yet); unbound reports never land here (see unbound_reports).
    binding           TEXT,
    -- SHA-256 (hex) of the stored report: an identical retry is acknowledged, any other refused.
    report_sha256     TEXT,
    transcript_dropped_lines INTEGER,
    transcript_cut_lines     INTEGER,
    -- Schema 3. JSON {\"model_sessions\": […], \"reconnect_gap_ms\": …, \"hold_prompt_ms\": …,
    -- \"fallback\": null | {\"reason\": …, \"caller_got\": …}}, as the report has them (NULL:
    -- reported before schema 3, read as one session's worth of nothing).
    continuity        TEXT,
    -- Schema 4. The realtime provider the call ran on (NULL: reported before schema 4, when
    -- every call ran on OpenAI, and read so).
    provider          TEXT CHECK (provider IN ('openai', 'gemini')),
    -- Schema 4. The model id the call ran, as the bridge reported it (NULL: the endpoint's
    -- default model). Not checked like a tenant's: it is the bridge's word, already bounded.
    model             TEXT,
    -- Schema 4. Tokens the provider reported for the call, both set or both NULL (none
    -- reported). Columns rather than JSON so usage can be summed in SQL.
    input_tokens      INTEGER CHECK (input_tokens >= 0),
    output_tokens     INTEGER CHECK (output_tokens >= 0),
    -- Schema 5. JSON {\"turns\": […], \"turns_dropped\": …, \"audio\": {…}}: what the caller
    -- experienced (turn timings, audio telemetry), as the report has it (NULL: reported before
    -- schema 5, read as no turns and no telemetry).
    quality           TEXT,
    -- Schema 5. JSON of the report's `recording` ({path, duration_ms, sha256, frames_dropped}
    -- or {error}); NULL: the call was not to be recorded (or reported before schema 5).
    recording         TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS calls_by_tenant ON calls (tenant_id, started_at_ms);

CREATE TABLE IF NOT EXISTS transcript_lines (
    call_sid  TEXT NOT NULL REFERENCES calls (call_sid) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    speaker   TEXT NOT NULL CHECK (speaker IN ('caller', 'assistant')),
    offset_ms INTEGER NOT NULL,
    text      TEXT NOT NULL,
    PRIMARY KEY (call_sid, seq)
) STRICT;

-- Schema 2. Reports of streams no webhook token bound to their call (the bridge let them through
-- with VOXRELAY_REQUIRE_STREAM_TOKEN=0): kept apart from calls, so they can neither replace a
-- call's record nor be counted as any tenant's. One per stream, first report wins.
CREATE TABLE IF NOT EXISTS unbound_reports (
    call_sid       TEXT NOT NULL,
    stream_sid     TEXT NOT NULL,
    reported_at_ms INTEGER NOT NULL,
    report_sha256  TEXT NOT NULL,
    -- The report as JSON.
    report         TEXT NOT NULL,
    PRIMARY KEY (call_sid, stream_sid)
) STRICT;

CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    call_sid        TEXT NOT NULL REFERENCES calls (call_sid),
    caller_name     TEXT NOT NULL,
    callback_number TEXT NOT NULL,
    message         TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS messages_by_tenant ON messages (tenant_id, id);
";

/// Schema 1 → 2: the columns `SCHEMA` now creates in `calls` (its `CREATE … IF NOT EXISTS`
/// leaves an existing table as it is; `unbound_reports` is new and created by it).
const MIGRATE_1_TO_2: &str = "
BEGIN;
ALTER TABLE calls ADD COLUMN binding TEXT;
ALTER TABLE calls ADD COLUMN report_sha256 TEXT;
ALTER TABLE calls ADD COLUMN transcript_dropped_lines INTEGER;
ALTER TABLE calls ADD COLUMN transcript_cut_lines INTEGER;
COMMIT;
";

/// Schema 2 → 3: the tenants' continuity settings and the calls' continuity record (schema 1
/// runs [`MIGRATE_1_TO_2`] first).
const MIGRATE_2_TO_3: &str = "
BEGIN;
ALTER TABLE tenants ADD COLUMN fallback_number TEXT;
ALTER TABLE tenants ADD COLUMN hold_prompt BLOB;
ALTER TABLE calls ADD COLUMN continuity TEXT;
COMMIT;
";

/// Schema 3 → 4: the tenants' provider and model, NULL (the bridge's defaults) for every
/// existing tenant, so an upgraded database answers exactly as before until it is re-seeded;
/// and the calls' provider, model and token usage, NULL for every call already reported
/// (read as OpenAI, its default model, no usage reported: what those calls had). The checks
/// are `SCHEMA`'s; SQLite tests an added column's CHECK against the existing rows, which NULL
/// passes.
const MIGRATE_3_TO_4: &str = "
BEGIN;
ALTER TABLE tenants ADD COLUMN provider TEXT CHECK (provider IN ('openai', 'gemini'));
ALTER TABLE tenants ADD COLUMN model TEXT CHECK (length(model) BETWEEN 1 AND 128
                                 AND model NOT GLOB '*[^A-Za-z0-9._-]*');
ALTER TABLE calls ADD COLUMN provider TEXT CHECK (provider IN ('openai', 'gemini'));
ALTER TABLE calls ADD COLUMN model TEXT;
ALTER TABLE calls ADD COLUMN input_tokens INTEGER CHECK (input_tokens >= 0);
ALTER TABLE calls ADD COLUMN output_tokens INTEGER CHECK (output_tokens >= 0);
COMMIT;
";

/// Schema 4 → 5: the tenants' recording switch, and the calls' recording and quality record
/// (turn timings and audio telemetry), NULL for every existing row (the bridge's default; no
/// recording reported; no turns or telemetry: those bridges did not measure them).
const MIGRATE_4_TO_5: &str = "
BEGIN;
ALTER TABLE tenants ADD COLUMN record INTEGER CHECK (record IN (0, 1));
ALTER TABLE calls ADD COLUMN quality TEXT;
ALTER TABLE calls ADD COLUMN recording TEXT;
COMMIT;
";

/// Where the database lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbLocation {
    /// A SQLite file, created if missing (with its `-wal` and `-shm` files beside it).
    File(PathBuf),
    /// A private in-memory database, gone when the store is dropped (tests, demos).
    InMemory,
}

/// A fault in the store: the request could not be served (HTTP 500), as opposed to a
/// [`Refusal`], which is an answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "the database has schema version {found}, newer than this build's {SCHEMA_VERSION}: use a newer voxrelay"
    )]
    NewerSchema { found: i64 },
    /// A row this build cannot read back (written by hand, or by another version).
    #[error("unreadable {column} in table {table}")]
    Corrupt {
        table: &'static str,
        column: &'static str,
    },
}

/// Why a request was refused; each is an expected answer with a stable code, never a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown_number")]
    UnknownNumber,
    #[error("unknown_tenant")]
    UnknownTenant,
    /// Not a tool this control plane implements, or not enabled for the tenant (the two are
    /// not told apart, so a tenant cannot probe which tools others have).
    #[error("unknown_tool")]
    UnknownTool,
    /// The call is bound to another tenant (or to none).
    #[error("tenant_mismatch")]
    TenantMismatch,
    /// A context lookup for a call SID already bound to another tenant's number.
    #[error("call_sid_conflict")]
    CallSidConflict,
    #[error("bad_arguments")]
    BadArguments,
    /// A report integer beyond what SQLite stores (2^63 - 1).
    #[error("bad_body")]
    OutOfRange,
    /// The call (or, for an unbound report, that stream) already has a different report: a
    /// stored report is never replaced.
    #[error("report_conflict")]
    ReportConflict,
}

impl Refusal {
    /// The code sent as `{"error": …}`.
    pub fn code(self) -> &'static str {
        match self {
            Self::UnknownNumber => "unknown_number",
            Self::UnknownTenant => "unknown_tenant",
            Self::UnknownTool => "unknown_tool",
            Self::TenantMismatch => "tenant_mismatch",
            Self::CallSidConflict => "call_sid_conflict",
            Self::BadArguments => "bad_arguments",
            Self::OutOfRange => "bad_body",
            Self::ReportConflict => "report_conflict",
        }
    }
}

/// What one seeding wrote; all zero when the database already matched the seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedOutcome {
    pub tenants_written: usize,
    pub numbers_written: usize,
    pub numbers_removed: usize,
}

/// A message left through `take_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: i64,
    pub tenant_id: String,
    pub call_sid: String,
    pub caller_name: String,
    pub callback_number: String,
    pub message: String,
    pub created_at_ms: i64,
}

/// The store; clones share the one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// A tenant's row, decoded.
struct TenantRow {
    id: String,
    agent_name: String,
    voice: String,
    greeting: Option<String>,
    instructions: String,
    audio_mode: AudioMode,
    language: String,
    max_call_seconds: u32,
    tools: Vec<Tool>,
    business_hours: BusinessHours,
    fallback_number: Option<String>,
    provider: Option<Provider>,
    model: Option<String>,
    record: Option<bool>,
}

/// Every column but `hold_prompt`, which only the context answer reads (up to 80 KB a row).
const TENANT_COLUMNS: &str = "id, agent_name, voice, greeting, instructions, audio_mode, language, \
     max_call_seconds, tools, business_hours, fallback_number, provider, model, record";

impl Store {
    /// Opens (creating if needed) the database and its schema.
    pub fn open(location: &DbLocation) -> Result<Self, StoreError> {
        let conn = match location {
            DbLocation::File(path) => Connection::open(path)?,
            DbLocation::InMemory => Connection::open_in_memory()?,
        };
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets an operator read the file (sqlite3 CLI) while the service writes; an
        // in-memory database answers `memory`, which is fine.
        let _mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        // NORMAL is durable across application crashes in WAL mode; only an OS crash can lose
        // the last transactions, an acceptable trade for a reference service.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { found: version });
        }
        conn.execute_batch(SCHEMA)?;
        // Version 0 is a new database, which SCHEMA just created whole.
        if version == 1 {
            conn.execute_batch(MIGRATE_1_TO_2)?;
        }
        if (1..=2).contains(&version) {
            conn.execute_batch(MIGRATE_2_TO_3)?;
        }
        if (1..=3).contains(&version) {
            conn.execute_batch(MIGRATE_3_TO_4)?;
        }
        if (1..=4).contains(&version) {
            conn.execute_batch(MIGRATE_4_TO_5)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// A poisoned lock only means another thread panicked mid-request; SQLite rolled its
    /// transaction back when the `Transaction` dropped, so the connection is still sound.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Upserts the seed's tenants and numbers in one transaction. Tenants and numbers not in the
    /// seed are left alone, except that a seeded tenant's numbers are exactly its seed list (a
    /// number dropped from the list stops reaching it). Rows already equal are not rewritten.
    pub fn apply_seed(&self, seed: &Seed) -> Result<SeedOutcome, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcome = SeedOutcome::default();
        for tenant in &seed.tenants {
            let tools: Vec<&str> = tenant.tools.iter().map(|tool| tool.name()).collect();
            let tools = serde_json::to_string(&tools).map_err(|_| StoreError::Corrupt {
                table: "tenants",
                column: "tools",
            })?;
            let hours =
                serde_json::to_string(&tenant.business_hours).map_err(|_| StoreError::Corrupt {
                    table: "tenants",
                    column: "business_hours",
                })?;
            outcome.tenants_written += tx.execute(
                "INSERT INTO tenants (id, agent_name, voice, greeting, instructions, audio_mode,
                     language, max_call_seconds, tools, business_hours, fallback_number,
                     hold_prompt, provider, model, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (id) DO UPDATE SET
                     agent_name = excluded.agent_name, voice = excluded.voice,
                     greeting = excluded.greeting, instructions = excluded.instructions,
                     audio_mode = excluded.audio_mode, language = excluded.language,
                     max_call_seconds = excluded.max_call_seconds, tools = excluded.tools,
                     business_hours = excluded.business_hours,
                     fallback_number = excluded.fallback_number,
                     hold_prompt = excluded.hold_prompt,
                     provider = excluded.provider, model = excluded.model,
                     record = excluded.record
                 WHERE (agent_name, voice, greeting, instructions, audio_mode, language,
                        max_call_seconds, tools, business_hours, fallback_number, hold_prompt,
                        provider, model, record)
                    IS NOT (excluded.agent_name, excluded.voice, excluded.greeting,
                        excluded.instructions, excluded.audio_mode, excluded.language,
                        excluded.max_call_seconds, excluded.tools, excluded.business_hours,
                        excluded.fallback_number, excluded.hold_prompt, excluded.provider,
                        excluded.model, excluded.record)",
                params![
                    tenant.id,
                    tenant.agent_name,
                    tenant.voice,
                    tenant.greeting,
                    tenant.instructions,
                    tenant.audio_mode.as_str(),
                    tenant.language,
                    tenant.max_call_seconds,
                    tools,
                    hours,
                    tenant.fallback_number,
                    tenant.hold_prompt,
                    tenant.provider.map(Provider::as_str),
                    tenant.model,
                    tenant.record,
                ],
            )?;
        }
        for tenant in &seed.tenants {
            for number in &tenant.numbers {
                outcome.numbers_written += tx.execute(
                    "INSERT INTO numbers (number, tenant_id) VALUES (?1, ?2)
                     ON CONFLICT (number) DO UPDATE SET tenant_id = excluded.tenant_id
                     WHERE tenant_id IS NOT excluded.tenant_id",
                    params![number, tenant.id],
                )?;
            }
            let existing: Vec<String> = tx
                .prepare("SELECT number FROM numbers WHERE tenant_id = ?1")?
                .query_map([&tenant.id], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            for number in existing {
                if !tenant.numbers.contains(&number) {
                    outcome.numbers_removed +=
                        tx.execute("DELETE FROM numbers WHERE number = ?1", [&number])?;
                }
            }
        }
        tx.commit()?;
        Ok(outcome)
    }

    /// `GET /v1/context`: the context of the tenant `to` belongs to. A non-empty `call_sid` is
    /// bound to that tenant (refused as [`Refusal::CallSidConflict`] if already bound to
    /// another); an empty one (a pre-warm or a refresh) records nothing.
    pub fn context_for_call(
        &self,
        to: &str,
        from: &str,
        call_sid: &str,
        now_ms: u64,
    ) -> Result<Result<TenantContext, Refusal>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let tenant_id: Option<String> = tx
            .query_row(
                "SELECT tenant_id FROM numbers WHERE number = ?1",
                [to],
                |row| row.get(0),
            )
            .optional()?;
        let Some(tenant_id) = tenant_id else {
            return Ok(Err(Refusal::UnknownNumber));
        };
        let Some(tenant) = load_tenant(&tx, &tenant_id)? else {
            // The foreign key makes this unreachable; answer as for a number nobody owns.
            return Ok(Err(Refusal::UnknownNumber));
        };
        let hold_prompt: Option<Vec<u8>> = tx.query_row(
            "SELECT hold_prompt FROM tenants WHERE id = ?1",
            [&tenant.id],
            |row| row.get(0),
        )?;
        if !call_sid.is_empty() {
            match call_binding(&tx, call_sid)? {
                Some(Some(bound)) if bound != tenant.id => {
                    return Ok(Err(Refusal::CallSidConflict));
                }
                _ => {}
            }
            tx.execute(
                "INSERT INTO calls (call_sid, tenant_id, from_number, to_number, looked_up_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (call_sid) DO UPDATE SET
                     tenant_id = COALESCE(calls.tenant_id, excluded.tenant_id),
                     looked_up_at_ms = COALESCE(calls.looked_up_at_ms, excluded.looked_up_at_ms),
                     from_number = IIF(calls.reported_at_ms IS NULL, excluded.from_number, calls.from_number),
                     to_number = IIF(calls.reported_at_ms IS NULL, excluded.to_number, calls.to_number)",
                params![call_sid, tenant.id, from, to, clamp_i64(now_ms)],
            )?;
        }
        tx.commit()?;
        Ok(Ok(TenantContext {
            memory_namespace: memory_namespace(&tenant.id, from),
            tools: tenant.tools.iter().map(|tool| tool.definition()).collect(),
            tenant_id: tenant.id,
            agent_name: tenant.agent_name,
            voice: tenant.voice,
            greeting: tenant.greeting,
            instructions: tenant.instructions,
            audio_mode: tenant.audio_mode,
            language: tenant.language,
            max_call_seconds: tenant.max_call_seconds,
            fallback_number: tenant.fallback_number,
            hold_prompt: hold_prompt.map(|bytes| BASE64.encode(bytes)),
            // Read from the row on every lookup, never cached here: a tenant moved to another
            // provider gets it at its next call.
            provider: tenant.provider,
            model: tenant.model,
            record: tenant.record,
        }))
    }

    /// `POST /v1/calls/{call_sid}/report`: stores the call's report. Returns the number of
    /// transcript lines stored.
    ///
    /// Only a **bound** report (its stream proved, with the webhook's token, that it is the
    /// call) is the call's record. The call's tenant is the one its context lookup bound it to;
    /// a report naming another tenant is [`Refusal::TenantMismatch`], one naming no tenant (the
    /// fallback agent answered) keeps the binding, and one for a call never looked up binds it
    /// to the report's tenant, which must exist. A call's record, once reported, is final: the
    /// identical report again (a retry) is acknowledged without a write, any other is
    /// [`Refusal::ReportConflict`].
    ///
    /// An **unbound** report never touches `calls`: it goes to `unbound_reports`, one per
    /// stream (first wins, an identical retry is acknowledged), and may not name a tenant or a
    /// memory namespace ([`Refusal::TenantMismatch`]).
    pub fn record_report(
        &self,
        report: &CallReport,
        now_ms: u64,
    ) -> Result<Result<usize, Refusal>, StoreError> {
        let Ok(ints) = ReportInts::of(report) else {
            return Ok(Err(Refusal::OutOfRange));
        };
        let encoded = serde_json::to_string(report).map_err(|_| StoreError::Corrupt {
            table: "calls",
            column: "report",
        })?;
        let digest = sha256_hex(encoded.as_bytes());
        if report.binding == ReportBinding::Unbound {
            return self.record_unbound_report(report, &encoded, &digest, now_ms);
        }
        let latency = serde_json::to_string(&report.latency).map_err(|_| StoreError::Corrupt {
            table: "calls",
            column: "latency",
        })?;
        let continuity =
            serde_json::to_string(&Continuity::of(report)).map_err(|_| StoreError::Corrupt {
                table: "calls",
                column: "continuity",
            })?;
        let quality =
            serde_json::to_string(&Quality::of(report)).map_err(|_| StoreError::Corrupt {
                table: "calls",
                column: "quality",
            })?;
        let recording = report
            .recording
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|_| StoreError::Corrupt {
                table: "calls",
                column: "recording",
            })?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored: Option<(Option<i64>, Option<String>)> = tx
            .query_row(
                "SELECT reported_at_ms, report_sha256 FROM calls WHERE call_sid = ?1",
                [&report.call_sid],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((Some(_reported), stored_digest)) = stored {
            if stored_digest.as_deref() != Some(digest.as_str()) {
                return Ok(Err(Refusal::ReportConflict));
            }
            let lines: i64 = tx.query_row(
                "SELECT COUNT(*) FROM transcript_lines WHERE call_sid = ?1",
                [&report.call_sid],
                |row| row.get(0),
            )?;
            return Ok(Ok(usize::try_from(lines).unwrap_or(0)));
        }
        if let Some(reported) = &report.tenant_id {
            if !tenant_exists(&tx, reported)? {
                return Ok(Err(Refusal::UnknownTenant));
            }
        }
        let bound = call_binding(&tx, &report.call_sid)?.flatten();
        let tenant_id = match (&bound, &report.tenant_id) {
            (Some(bound), Some(reported)) if bound != reported => {
                return Ok(Err(Refusal::TenantMismatch));
            }
            (Some(bound), _) => Some(bound.clone()),
            (None, reported) => reported.clone(),
        };
        // A memory namespace is always its tenant's: one naming another tenant is refused.
        if let (Some(namespace), Some(tenant)) = (&report.memory_namespace, &tenant_id) {
            if !voxrelay_core::control::api::namespace_within_tenant(tenant, namespace) {
                return Ok(Err(Refusal::TenantMismatch));
            }
        }
        tx.execute(
            "INSERT INTO calls (call_sid, tenant_id, from_number, to_number, reported_at_ms,
                 stream_sid, agent_name, started_at_ms, ended_at_ms, end_reason, context_source,
                 audio_seconds_in, audio_seconds_out, barge_ins, dtmf_digits, tool_calls, latency,
                 memory_namespace, binding, report_sha256, transcript_dropped_lines,
                 transcript_cut_lines, continuity, provider, model, input_tokens, output_tokens,
                 quality, recording)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 ?18, 'bound', ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)
             ON CONFLICT (call_sid) DO UPDATE SET
                 tenant_id = excluded.tenant_id, from_number = excluded.from_number,
                 to_number = excluded.to_number, reported_at_ms = excluded.reported_at_ms,
                 stream_sid = excluded.stream_sid, agent_name = excluded.agent_name,
                 started_at_ms = excluded.started_at_ms, ended_at_ms = excluded.ended_at_ms,
                 end_reason = excluded.end_reason, context_source = excluded.context_source,
                 audio_seconds_in = excluded.audio_seconds_in,
                 audio_seconds_out = excluded.audio_seconds_out, barge_ins = excluded.barge_ins,
                 dtmf_digits = excluded.dtmf_digits, tool_calls = excluded.tool_calls,
                 latency = excluded.latency, memory_namespace = excluded.memory_namespace,
                 binding = excluded.binding, report_sha256 = excluded.report_sha256,
                 transcript_dropped_lines = excluded.transcript_dropped_lines,
                 transcript_cut_lines = excluded.transcript_cut_lines,
                 continuity = excluded.continuity, provider = excluded.provider,
                 model = excluded.model, input_tokens = excluded.input_tokens,
                 output_tokens = excluded.output_tokens, quality = excluded.quality,
                 recording = excluded.recording",
            params![
                report.call_sid,
                tenant_id,
                report.from,
                report.to,
                clamp_i64(now_ms),
                report.stream_sid,
                report.agent_name,
                ints.started_at_ms,
                ints.ended_at_ms,
                report.end_reason,
                report.context_source,
                finite(report.audio_seconds_in),
                finite(report.audio_seconds_out),
                ints.barge_ins,
                ints.dtmf_digits,
                ints.tool_calls,
                latency,
                report.memory_namespace,
                digest,
                ints.transcript_dropped_lines,
                ints.transcript_cut_lines,
                continuity,
                report.provider.as_str(),
                report.model,
                ints.usage.map(|(input, _)| input),
                ints.usage.map(|(_, output)| output),
                quality,
                recording,
            ],
        )?;
        // Lines a lookup-only row cannot have; cleared so the report's are the only ones.
        tx.execute(
            "DELETE FROM transcript_lines WHERE call_sid = ?1",
            [&report.call_sid],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO transcript_lines (call_sid, seq, speaker, offset_ms, text)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for ((seq, line), offset_ms) in report.transcript.iter().enumerate().zip(&ints.offsets)
            {
                insert.execute(params![
                    report.call_sid,
                    clamp_i64(seq as u64),
                    line.speaker.as_str(),
                    offset_ms,
                    line.text,
                ])?;
            }
        }
        tx.commit()?;
        Ok(Ok(report.transcript.len()))
    }

    /// The unbound half of [`Store::record_report`].
    fn record_unbound_report(
        &self,
        report: &CallReport,
        encoded: &str,
        digest: &str,
        now_ms: u64,
    ) -> Result<Result<usize, Refusal>, StoreError> {
        if report.tenant_id.is_some() || report.memory_namespace.is_some() {
            return Ok(Err(Refusal::TenantMismatch));
        }
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let inserted = tx.execute(
            "INSERT INTO unbound_reports (call_sid, stream_sid, reported_at_ms, report_sha256, report)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (call_sid, stream_sid) DO NOTHING",
            params![
                report.call_sid,
                report.stream_sid,
                clamp_i64(now_ms),
                digest,
                encoded
            ],
        )?;
        if inserted == 0 {
            let stored: String = tx.query_row(
                "SELECT report_sha256 FROM unbound_reports WHERE call_sid = ?1 AND stream_sid = ?2",
                [&report.call_sid, &report.stream_sid],
                |row| row.get(0),
            )?;
            if stored != digest {
                return Ok(Err(Refusal::ReportConflict));
            }
        }
        tx.commit()?;
        Ok(Ok(report.transcript.len()))
    }

    /// The unbound reports stored for `call_sid`, oldest first (for operators and tests).
    pub fn unbound_reports(&self, call_sid: &str) -> Result<Vec<CallReport>, StoreError> {
        let conn = self.lock();
        let mut select = conn.prepare(
            "SELECT report FROM unbound_reports WHERE call_sid = ?1
             ORDER BY reported_at_ms, stream_sid",
        )?;
        let texts: Vec<String> = select
            .query_map([call_sid], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        texts
            .iter()
            .map(|text| {
                serde_json::from_str(text).map_err(|_| StoreError::Corrupt {
                    table: "unbound_reports",
                    column: "report",
                })
            })
            .collect()
    }

    /// `GET /v1/calls`: the tenant's reported calls with transcripts, newest (by start) first.
    pub fn call_history(
        &self,
        tenant_id: &str,
        limit: usize,
    ) -> Result<Result<CallHistory, Refusal>, StoreError> {
        let mut conn = self.lock();
        // One read transaction, so the calls and their transcripts are one snapshot.
        let tx = conn.transaction()?;
        if !tenant_exists(&tx, tenant_id)? {
            return Ok(Err(Refusal::UnknownTenant));
        }
        let calls = reported_calls(
            &tx,
            "tenant_id = ?1 ORDER BY started_at_ms DESC, call_sid DESC LIMIT ?2",
            params![tenant_id, clamp_i64(limit as u64)],
        )?;
        tx.commit()?;
        Ok(Ok(CallHistory { calls }))
    }

    /// The stored (bound) report of one call, whatever its tenant, a call the fallback agent
    /// answered included (no tenant's history lists those); `None` until it is reported. For
    /// operators, tests and the demo; not an endpoint.
    pub fn reported_call(&self, call_sid: &str) -> Result<Option<CallReport>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut calls = reported_calls(&tx, "call_sid = ?1", params![call_sid])?;
        tx.commit()?;
        Ok(calls.pop())
    }

    /// `POST /v1/tools/{name}`: checks, in this order, that the tool exists, the tenant exists,
    /// the tool is enabled for it, the call belongs to it (binding a call never seen before) and
    /// the arguments fit the schema; then runs the tool. Returns the tool's `output`.
    pub fn run_tool(
        &self,
        name: &str,
        request: &ToolRequest,
        now_ms: u64,
    ) -> Result<Result<Value, Refusal>, StoreError> {
        let Some(tool) = Tool::from_name(name) else {
            return Ok(Err(Refusal::UnknownTool));
        };
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(tenant) = load_tenant(&tx, &request.tenant_id)? else {
            return Ok(Err(Refusal::UnknownTenant));
        };
        if !tenant.tools.contains(&tool) {
            return Ok(Err(Refusal::UnknownTool));
        }
        match call_binding(&tx, &request.call_sid)? {
            Some(Some(bound)) if bound == tenant.id => {}
            // Bound to another tenant, or reported as answered by no tenant.
            Some(_) => return Ok(Err(Refusal::TenantMismatch)),
            // The bridge served this call's context from its cache, so the call was never
            // looked up: its first tool call binds it, and no other tenant can use it after.
            None => {
                tx.execute(
                    "INSERT INTO calls (call_sid, tenant_id) VALUES (?1, ?2)",
                    params![request.call_sid, tenant.id],
                )?;
            }
        }
        let Ok(arguments) = tool.parse_arguments(&request.arguments) else {
            return Ok(Err(Refusal::BadArguments));
        };
        let output = match arguments {
            ToolArguments::LookupBusinessHours { day } => {
                business_hours_output(&tenant.business_hours, day)
            }
            ToolArguments::TakeMessage {
                caller_name,
                callback_number,
                message,
            } => {
                tx.execute(
                    "INSERT INTO messages (tenant_id, call_sid, caller_name, callback_number,
                         message, created_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        tenant.id,
                        request.call_sid,
                        caller_name,
                        callback_number,
                        message,
                        clamp_i64(now_ms)
                    ],
                )?;
                json!({"saved": true, "message_id": tx.last_insert_rowid()})
            }
        };
        tx.commit()?;
        Ok(Ok(output))
    }

    /// The messages left for a tenant, oldest first (for operators and tests).
    pub fn messages(&self, tenant_id: &str) -> Result<Vec<StoredMessage>, StoreError> {
        let conn = self.lock();
        let mut select = conn.prepare(
            "SELECT id, tenant_id, call_sid, caller_name, callback_number, message, created_at_ms
             FROM messages WHERE tenant_id = ?1 ORDER BY id",
        )?;
        let messages = select
            .query_map([tenant_id], |row| {
                Ok(StoredMessage {
                    id: row.get(0)?,
                    tenant_id: row.get(1)?,
                    call_sid: row.get(2)?,
                    caller_name: row.get(3)?,
                    callback_number: row.get(4)?,
                    message: row.get(5)?,
                    created_at_ms: row.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(messages)
    }
}

fn load_tenant(tx: &Transaction<'_>, id: &str) -> Result<Option<TenantRow>, StoreError> {
    let raw = tx
        .query_row(
            &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1"),
            [id],
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, Option<String>>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, String>(5)?,
                    row.get::<_, String>(6)?,
                    row.get::<_, i64>(7)?,
                    row.get::<_, String>(8)?,
                    row.get::<_, String>(9)?,
                    row.get::<_, Option<String>>(10)?,
                    row.get::<_, Option<String>>(11)?,
                    row.get::<_, Option<String>>(12)?,
                    row.get::<_, Option<bool>>(13)?,
                ))
            },
        )
        .optional()?;
    let Some((
        id,
        agent_name,
        voice,
        greeting,
        instructions,
        audio_mode,
        language,
        max_call_seconds,
        tools,
        hours,
        fallback_number,
        provider,
        model,
        record,
    )) = raw
    else {
        return Ok(None);
    };
    let corrupt = |column| StoreError::Corrupt {
        table: "tenants",
        column,
    };
    let audio_mode = audio_mode
        .parse::<AudioMode>()
        .map_err(|_| corrupt("audio_mode"))?;
    let max_call_seconds =
        u32::try_from(max_call_seconds).map_err(|_| corrupt("max_call_seconds"))?;
    let tool_names: Vec<String> = serde_json::from_str(&tools).map_err(|_| corrupt("tools"))?;
    let tools = tool_names
        .iter()
        .map(|name| Tool::from_name(name).ok_or_else(|| corrupt("tools")))
        .collect::<Result<_, _>>()?;
    let business_hours = serde_json::from_str(&hours).map_err(|_| corrupt("business_hours"))?;
    // The CHECK allows only the two names this build parses; a newer build's third provider
    // would come with a newer schema version, which `open` refuses.
    let provider = provider
        .map(|name| name.parse::<Provider>())
        .transpose()
        .map_err(|_| corrupt("provider"))?;
    Ok(Some(TenantRow {
        id,
        agent_name,
        voice,
        greeting,
        instructions,
        audio_mode,
        language,
        max_call_seconds,
        tools,
        business_hours,
        fallback_number,
        provider,
        model,
        record,
    }))
}

/// The reported calls of `calls` that `filter` (SQL after `WHERE … AND`, with its order and
/// limit) selects, each with its transcript, read in the caller's transaction so the calls and
/// their transcripts are one snapshot.
fn reported_calls(
    tx: &Transaction<'_>,
    filter: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<CallReport>, StoreError> {
    let mut calls = Vec::new();
    {
        let mut select = tx.prepare(&format!(
            "SELECT call_sid, stream_sid, tenant_id, agent_name, from_number, to_number,
                 started_at_ms, ended_at_ms, end_reason, context_source, audio_seconds_in,
                 audio_seconds_out, barge_ins, dtmf_digits, tool_calls, latency,
                 memory_namespace, transcript_dropped_lines, transcript_cut_lines, continuity,
                 provider, model, input_tokens, output_tokens, quality, recording
             FROM calls
             WHERE reported_at_ms IS NOT NULL AND {filter}"
        ))?;
        let mut rows = select.query(params)?;
        while let Some(row) = rows.next()? {
            let latency: CallLatency = json_column(row.get(15)?, "latency")?;
            let continuity: Continuity = json_column(row.get(19)?, "continuity")?;
            let quality: Quality = json_column(row.get(24)?, "quality")?;
            let corrupt = |column| StoreError::Corrupt {
                table: "calls",
                column,
            };
            // NULL: reported before schema 4, when every call ran on OpenAI.
            let provider = row
                .get::<_, Option<String>>(20)?
                .map(|name| name.parse::<Provider>())
                .transpose()
                .map_err(|_| corrupt("provider"))?
                .unwrap_or(Provider::OpenAi);
            let usage = match (row.get::<_, Option<i64>>(22)?, row.get(23)?) {
                (Some(input), Some(output)) => Some(ReportUsage {
                    input_tokens: unsigned(Some(input)),
                    output_tokens: unsigned(Some(output)),
                }),
                (None, None) => None,
                (Some(_), None) => return Err(corrupt("output_tokens")),
                (None, Some(_)) => return Err(corrupt("input_tokens")),
            };
            calls.push(CallReport {
                call_sid: row.get(0)?,
                stream_sid: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                tenant_id: row.get(2)?,
                agent_name: row.get::<_, Option<String>>(3)?.unwrap_or_default(),
                from: row.get(4)?,
                to: row.get(5)?,
                started_at_ms: unsigned(row.get(6)?),
                ended_at_ms: unsigned(row.get(7)?),
                end_reason: row.get::<_, Option<String>>(8)?.unwrap_or_default(),
                context_source: row.get::<_, Option<String>>(9)?.unwrap_or_default(),
                memory_namespace: row.get(16)?,
                audio_seconds_in: row.get::<_, Option<f64>>(10)?.unwrap_or_default(),
                audio_seconds_out: row.get::<_, Option<f64>>(11)?.unwrap_or_default(),
                barge_ins: unsigned(row.get(12)?),
                dtmf_digits: unsigned(row.get(13)?),
                tool_calls: unsigned(row.get(14)?),
                latency,
                // Only bound reports are stored here; rows from before schema 2 were
                // attributed by the rules of their time.
                binding: ReportBinding::Bound,
                transcript: Vec::new(),
                transcript_dropped_lines: unsigned(row.get(17)?),
                transcript_cut_lines: unsigned(row.get(18)?),
                model_sessions: continuity.model_sessions,
                reconnect_gap_ms: continuity.reconnect_gap_ms,
                hold_prompt_ms: continuity.hold_prompt_ms,
                fallback: continuity.fallback,
                provider,
                model: row.get(21)?,
                usage,
                turns: quality.turns,
                turns_dropped: quality.turns_dropped,
                audio: quality.audio,
                recording: row
                    .get::<_, Option<String>>(25)?
                    .map(|json| serde_json::from_str(&json).map_err(|_| corrupt("recording")))
                    .transpose()?,
            });
        }
    }
    {
        let mut lines = tx.prepare(
            "SELECT speaker, offset_ms, text FROM transcript_lines
             WHERE call_sid = ?1 ORDER BY seq",
        )?;
        for call in &mut calls {
            let mut rows = lines.query([&call.call_sid])?;
            while let Some(row) = rows.next()? {
                let speaker: String = row.get(0)?;
                let speaker = match speaker.as_str() {
                    "caller" => Speaker::Caller,
                    "assistant" => Speaker::Assistant,
                    _ => {
                        return Err(StoreError::Corrupt {
                            table: "transcript_lines",
                            column: "speaker",
                        });
                    }
                };
                call.transcript.push(TranscriptEntry {
                    speaker,
                    offset_ms: unsigned(row.get(1)?),
                    text: row.get(2)?,
                });
            }
        }
    }
    Ok(calls)
}

fn tenant_exists(tx: &Transaction<'_>, id: &str) -> Result<bool, StoreError> {
    Ok(tx
        .query_row("SELECT 1 FROM tenants WHERE id = ?1", [id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// `None`: the call is unknown; `Some(None)`: known but bound to no tenant (reported as
/// answered by the fallback agent); `Some(Some(id))`: bound to tenant `id`.
fn call_binding(
    tx: &Transaction<'_>,
    call_sid: &str,
) -> Result<Option<Option<String>>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT tenant_id FROM calls WHERE call_sid = ?1",
            [call_sid],
            |row| row.get(0),
        )
        .optional()?)
}

/// The `calls.continuity` column: the report's model-session fields as one JSON object, so a
/// field added to a session record needs no new column. A key left out reads as the report's
/// own default.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Continuity {
    #[serde(default)]
    model_sessions: Vec<ModelSessionReport>,
    #[serde(default)]
    reconnect_gap_ms: u64,
    #[serde(default)]
    hold_prompt_ms: u64,
    #[serde(default)]
    fallback: Option<ReportFallback>,
}

/// The `calls.quality` column: what the caller experienced, as one JSON object (a key left
/// out reads as the report's own default).
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Quality {
    #[serde(default)]
    turns: Vec<TurnReport>,
    #[serde(default)]
    turns_dropped: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audio: Option<ReportAudio>,
}

impl Quality {
    fn of(report: &CallReport) -> Self {
        Self {
            turns: report.turns.clone(),
            turns_dropped: report.turns_dropped,
            audio: report.audio,
        }
    }
}

impl Continuity {
    fn of(report: &CallReport) -> Self {
        Self {
            model_sessions: report.model_sessions.clone(),
            reconnect_gap_ms: report.reconnect_gap_ms,
            hold_prompt_ms: report.hold_prompt_ms,
            fallback: report.fallback.clone(),
        }
    }
}

/// A JSON column of `calls` read back (NULL: a row from before the column, its default).
fn json_column<T: serde::de::DeserializeOwned + Default>(
    text: Option<String>,
    column: &'static str,
) -> Result<T, StoreError> {
    match text {
        Some(text) => serde_json::from_str(&text).map_err(|_| StoreError::Corrupt {
            table: "calls",
            column,
        }),
        None => Ok(T::default()),
    }
}

/// The report's integers as SQLite's signed 64-bit ones; `Err` if any does not fit.
struct ReportInts {
    started_at_ms: i64,
    ended_at_ms: i64,
    barge_ins: i64,
    dtmf_digits: i64,
    tool_calls: i64,
    transcript_dropped_lines: i64,
    transcript_cut_lines: i64,
    offsets: Vec<i64>,
    /// `(input_tokens, output_tokens)`, when the report has usage.
    usage: Option<(i64, i64)>,
}

impl ReportInts {
    fn of(report: &CallReport) -> Result<Self, std::num::TryFromIntError> {
        Ok(Self {
            started_at_ms: i64::try_from(report.started_at_ms)?,
            ended_at_ms: i64::try_from(report.ended_at_ms)?,
            barge_ins: i64::try_from(report.barge_ins)?,
            dtmf_digits: i64::try_from(report.dtmf_digits)?,
            tool_calls: i64::try_from(report.tool_calls)?,
            transcript_dropped_lines: i64::try_from(report.transcript_dropped_lines)?,
            transcript_cut_lines: i64::try_from(report.transcript_cut_lines)?,
            offsets: report
                .transcript
                .iter()
                .map(|line| i64::try_from(line.offset_ms))
                .collect::<Result<_, _>>()?,
            usage: report
                .usage
                .map(|usage| {
                    Ok::<_, std::num::TryFromIntError>((
                        i64::try_from(usage.input_tokens)?,
                        i64::try_from(usage.output_tokens)?,
                    ))
                })
                .transpose()?,
        })
        .and_then(|ints| {
            // Stored as JSON text, which would carry them, but held to the rule every report
            // integer follows (docs/control-plane-api.md), so any control plane can use SQL.
            i64::try_from(report.reconnect_gap_ms)?;
            i64::try_from(report.hold_prompt_ms)?;
            for session in &report.model_sessions {
                i64::try_from(session.started_ms)?;
                session.ended_ms.map(i64::try_from).transpose()?;
            }
            if let Some(audio) = &report.audio {
                for leg in [&audio.caller, &audio.agent] {
                    i64::try_from(leg.audio_ms)?;
                    i64::try_from(leg.clipped_samples)?;
                    i64::try_from(leg.longest_silence_ms)?;
                    i64::try_from(leg.one_way_ms)?;
                }
            }
            Ok(ints)
        })
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// For values we produce ourselves (clocks, counts), where saturating is harmless.
fn clamp_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Back from a column we only ever write with non-negative values (NULL reads as 0).
fn unsigned(value: Option<i64>) -> u64 {
    value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

/// JSON cannot carry NaN or infinities, but a `CallReport` built in Rust can; store 0 instead
/// of failing the whole report.
fn finite(value: f64) -> f64 {
    if value.is_finite() { value } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::SeedFiles;
    use crate::test_dir::TempDir;
    use voxrelay_core::control::api::{LatencySummary, ReportRecording};

    const FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tenants.toml"
    ));
    const NOW_MS: u64 = 1_750_000_000_000;

    fn seeded() -> Store {
        let store = Store::open(&DbLocation::InMemory).expect("open");
        store
            .apply_seed(&Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture"))
            .expect("seed");
        store
    }

    fn report(call_sid: &str, tenant: Option<&str>, started_at_ms: u64) -> CallReport {
        CallReport {
            call_sid: call_sid.into(),
            stream_sid: format!("MZ{call_sid}"),
            tenant_id: tenant.map(str::to_owned),
            agent_name: "Ava".into(),
            from: "+15551230000".into(),
            to: "+15550100001".into(),
            started_at_ms,
            ended_at_ms: started_at_ms + 30_000,
            end_reason: "twilio_stop".into(),
            context_source: "fresh".into(),
            binding: ReportBinding::Bound,
            memory_namespace: None,
            audio_seconds_in: 30.0,
            audio_seconds_out: 12.5,
            barge_ins: 2,
            dtmf_digits: 1,
            tool_calls: 0,
            latency: CallLatency {
                uplink_us: LatencySummary {
                    count: 1500,
                    p50: 20,
                    p99: 90,
                    max: 400,
                },
                ..CallLatency::default()
            },
            transcript: vec![
                TranscriptEntry {
                    speaker: Speaker::Assistant,
                    offset_ms: 100,
                    text: "Hello".into(),
                },
                TranscriptEntry {
                    speaker: Speaker::Caller,
                    offset_ms: 2_000,
                    text: "Hi, are you open?".into(),
                },
            ],
            transcript_dropped_lines: 0,
            transcript_cut_lines: 0,
            model_sessions: Vec::new(),
            reconnect_gap_ms: 0,
            hold_prompt_ms: 0,
            fallback: None,
            provider: Provider::OpenAi,
            model: None,
            usage: None,
            turns: vec![TurnReport {
                at_ms: 1_200,
                cause: "caller".into(),
                voice_to_voice_ms: Some(812.5),
                model_ms: Some(700.25),
                detect_ms: Some(520.0),
                bridge_ms: Some(0.375),
                playout_ms: Some(111.875),
                barge_in: None,
            }],
            turns_dropped: 1,
            recording: None,
            audio: None,
        }
    }

    fn tool(call_sid: &str, tenant: &str, arguments: Value) -> ToolRequest {
        ToolRequest {
            call_sid: call_sid.into(),
            tenant_id: tenant.into(),
            arguments,
        }
    }

    #[test]
    fn seeding_twice_writes_nothing_the_second_time() {
        let store = Store::open(&DbLocation::InMemory).expect("open");
        let seed = Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture");
        let first = store.apply_seed(&seed).expect("seed");
        assert_eq!(first.tenants_written, seed.tenants.len());
        assert!(first.numbers_written >= 2);
        let total_before = store.lock().total_changes();
        assert_eq!(
            store.apply_seed(&seed).expect("seed"),
            SeedOutcome::default()
        );
        assert_eq!(store.lock().total_changes(), total_before);
    }

    #[test]
    fn a_changed_seed_updates_tenants_and_moves_numbers() {
        let store = seeded();
        let changed = FIXTURE
            .replacen("agent_name = \"Ava\"", "agent_name = \"Avery\"", 1)
            .replacen("\"+15550100003\"", "\"+15550100009\"", 1);
        assert_ne!(changed, FIXTURE, "the fixture names Ava and +15550100003");
        let outcome = store
            .apply_seed(&Seed::parse(&changed, &SeedFiles::Shipped).expect("changed"))
            .expect("seed");
        assert_eq!(
            outcome,
            SeedOutcome {
                tenants_written: 1,
                numbers_written: 1,
                numbers_removed: 1
            }
        );
        let context = store
            .context_for_call("+15550100001", "+1555", "", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(context.agent_name, "Avery");
        assert_eq!(
            store
                .context_for_call("+15550100003", "", "", NOW_MS)
                .expect("store"),
            Err(Refusal::UnknownNumber)
        );
        assert!(
            store
                .context_for_call("+15550100009", "", "", NOW_MS)
                .expect("store")
                .is_ok()
        );
    }

    #[test]
    fn context_lists_enabled_tools_and_binds_the_call() {
        let store = seeded();
        let context = store
            .context_for_call("+15550100001", "+15551230000", "CA1", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(context.tenant_id, "acme_dental");
        assert_eq!(context.memory_namespace, "acme_dental/+15551230000");
        let names: Vec<&str> = context
            .tools
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert_eq!(names, ["lookup_business_hours", "take_message"]);
        // The same call SID on another tenant's number is refused, and stays with acme_dental.
        assert_eq!(
            store
                .context_for_call("+15550100002", "+15551230000", "CA1", NOW_MS)
                .expect("store"),
            Err(Refusal::CallSidConflict)
        );
        assert_eq!(
            store
                .run_tool(
                    "lookup_business_hours",
                    &tool("CA1", "bistro_luna", json!({})),
                    NOW_MS
                )
                .expect("store"),
            Err(Refusal::TenantMismatch)
        );
        assert_eq!(
            store
                .context_for_call("+15559999999", "", "CA2", NOW_MS)
                .expect("store"),
            Err(Refusal::UnknownNumber)
        );
    }

    #[test]
    fn a_retried_report_is_acknowledged_and_a_different_one_refused() {
        let store = seeded();
        store
            .context_for_call("+15550100001", "+15551230000", "CA1", NOW_MS)
            .expect("store")
            .expect("known");
        let first = report("CA1", Some("acme_dental"), NOW_MS);
        assert_eq!(store.record_report(&first, NOW_MS).expect("store"), Ok(2));
        let changes = store.lock().total_changes();
        // The identical report again (a retry whose answer was lost): acknowledged, no write.
        assert_eq!(
            store.record_report(&first, NOW_MS + 5).expect("store"),
            Ok(2)
        );
        assert_eq!(store.lock().total_changes(), changes);
        // Any other report for the call (another stream, another transcript) is refused.
        let mut other = first.clone();
        other.transcript.push(TranscriptEntry {
            speaker: Speaker::Assistant,
            offset_ms: 3_000,
            text: "Yes, until five.".into(),
        });
        assert_eq!(
            store.record_report(&other, NOW_MS).expect("store"),
            Err(Refusal::ReportConflict)
        );
        let mut forged = first.clone();
        forged.stream_sid = "MZforged".into();
        forged.from = "+15559990000".into();
        assert_eq!(
            store.record_report(&forged, NOW_MS).expect("store"),
            Err(Refusal::ReportConflict)
        );
        let history = store
            .call_history("acme_dental", 50)
            .expect("store")
            .expect("tenant");
        assert_eq!(history.calls, vec![first]);
    }

    #[test]
    fn unbound_reports_are_kept_apart_and_never_a_tenants() {
        let store = seeded();
        store
            .context_for_call("+15550100001", "+15551230000", "CA1", NOW_MS)
            .expect("store")
            .expect("known");
        let mut unbound = report("CA1", None, NOW_MS);
        unbound.binding = ReportBinding::Unbound;
        unbound.stream_sid = "MZintruder".into();
        unbound.from = "+15559990000".into();
        // Stored apart, before or after the real report, without touching the call's record.
        assert_eq!(store.record_report(&unbound, NOW_MS).expect("store"), Ok(2));
        let real = report("CA1", Some("acme_dental"), NOW_MS);
        assert_eq!(store.record_report(&real, NOW_MS).expect("store"), Ok(2));
        assert_eq!(store.record_report(&unbound, NOW_MS).expect("store"), Ok(2));
        let history = store
            .call_history("acme_dental", 50)
            .expect("store")
            .expect("tenant");
        assert_eq!(history.calls, vec![real]);
        assert_eq!(
            store.unbound_reports("CA1").expect("store"),
            vec![unbound.clone()]
        );
        // One per stream: a different report from that stream is refused.
        let mut changed = unbound.clone();
        changed.end_reason = "shutdown".into();
        assert_eq!(
            store.record_report(&changed, NOW_MS).expect("store"),
            Err(Refusal::ReportConflict)
        );
        // An unbound report cannot name a tenant or a namespace.
        let mut claiming = unbound.clone();
        claiming.stream_sid = "MZother".into();
        claiming.tenant_id = Some("acme_dental".into());
        assert_eq!(
            store.record_report(&claiming, NOW_MS).expect("store"),
            Err(Refusal::TenantMismatch)
        );
        claiming.tenant_id = None;
        claiming.memory_namespace = Some("acme_dental/+15559990000".into());
        assert_eq!(
            store.record_report(&claiming, NOW_MS).expect("store"),
            Err(Refusal::TenantMismatch)
        );
        assert_eq!(store.unbound_reports("CA1").expect("store").len(), 1);
        // An unbound report for a call nobody looked up binds nothing either.
        let mut stray = report("CA7", None, NOW_MS);
        stray.binding = ReportBinding::Unbound;
        assert_eq!(store.record_report(&stray, NOW_MS).expect("store"), Ok(2));
        assert!(
            store
                .run_tool(
                    "lookup_business_hours",
                    &tool("CA7", "bistro_luna", json!({})),
                    NOW_MS
                )
                .expect("store")
                .is_ok(),
            "the call is still free for the tenant a bound stream proves"
        );
    }

    #[test]
    fn a_schema_1_database_is_migrated_and_keeps_its_reports() {
        let dir = TempDir::new("migrate");
        let path = dir.0.join("cp.sqlite3");
        {
            // The calls table as schema 1 created it, with one reported call.
            let conn = database_at_schema(&path, 1);
            conn.execute(
                "INSERT INTO calls (call_sid, from_number, to_number, reported_at_ms, stream_sid)
                 VALUES ('CA1', '+1', '+2', 5, 'MZ1')",
                [],
            )
            .expect("row");
        }
        let store = Store::open(&DbLocation::File(path)).expect("migrated");
        let version: i64 = store
            .lock()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("pragma");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(columns(&store.lock()), columns(&seeded().lock()));
        store
            .apply_seed(&Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture"))
            .expect("seed");
        // A report stored before the upgrade is final too.
        assert_eq!(
            store
                .record_report(&report("CA1", None, NOW_MS), NOW_MS)
                .expect("store"),
            Err(Refusal::ReportConflict)
        );
        assert_eq!(
            store
                .record_report(&report("CA2", Some("acme_dental"), NOW_MS), NOW_MS)
                .expect("store"),
            Ok(2)
        );
    }

    /// A database file shaped as schema `version` (1 to 4) left it: today's schema without
    /// what later versions added, columns in the order the migrations append them.
    fn database_at_schema(path: &std::path::Path, version: i64) -> Connection {
        let conn = Connection::open(path).expect("open");
        conn.execute_batch(SCHEMA).expect("schema");
        let mut undo = vec![
            "ALTER TABLE calls DROP COLUMN quality",
            "ALTER TABLE tenants DROP COLUMN record",
            "ALTER TABLE calls DROP COLUMN recording",
        ];
        if version < 4 {
            undo.extend([
                "ALTER TABLE tenants DROP COLUMN provider",
                "ALTER TABLE tenants DROP COLUMN model",
                "ALTER TABLE calls DROP COLUMN provider",
                "ALTER TABLE calls DROP COLUMN model",
                "ALTER TABLE calls DROP COLUMN input_tokens",
                "ALTER TABLE calls DROP COLUMN output_tokens",
            ]);
        }
        if version < 3 {
            undo.extend([
                "ALTER TABLE tenants DROP COLUMN fallback_number",
                "ALTER TABLE tenants DROP COLUMN hold_prompt",
                "ALTER TABLE calls DROP COLUMN continuity",
            ]);
        }
        if version < 2 {
            undo.extend([
                "ALTER TABLE calls DROP COLUMN binding",
                "ALTER TABLE calls DROP COLUMN report_sha256",
                "ALTER TABLE calls DROP COLUMN transcript_dropped_lines",
                "ALTER TABLE calls DROP COLUMN transcript_cut_lines",
                "DROP TABLE unbound_reports",
            ]);
        }
        for statement in undo {
            conn.execute_batch(statement).expect(statement);
        }
        conn.pragma_update(None, "user_version", version)
            .expect("pragma");
        conn
    }

    /// Every table's columns with their declared types, in order.
    fn columns(conn: &Connection) -> Vec<(String, String, String)> {
        let mut select = conn
            .prepare(
                "SELECT m.name, c.name, c.type FROM sqlite_schema AS m, pragma_table_info(m.name) AS c
                 WHERE m.type = 'table' ORDER BY m.name, c.cid",
            )
            .expect("prepare");
        select
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    #[test]
    fn a_schema_2_database_is_migrated_and_keeps_its_rows() {
        let dir = TempDir::new("migrate-2");
        let path = dir.0.join("cp.sqlite3");
        let old_report = report("CA1", Some("acme_dental"), NOW_MS);
        {
            let conn = database_at_schema(&path, 2);
            assert!(
                !columns(&conn)
                    .iter()
                    .any(|(_, column, _)| column == "continuity" || column == "hold_prompt")
            );
            conn.execute(
                "INSERT INTO tenants (id, agent_name, voice, instructions, audio_mode, language,
                     max_call_seconds, tools, business_hours)
                 VALUES ('old_tenant', 'Olga', 'marin', 'x', 'pcmu', 'en', 0, '[]',
                     '{\"timezone\":\"\",\"days\":[null,null,null,null,null,null,null]}')",
                [],
            )
            .expect("tenant");
            conn.execute(
                "INSERT INTO numbers (number, tenant_id) VALUES ('+15550100077', 'old_tenant')",
                [],
            )
            .expect("number");
            // A call reported under schema 2, as that build wrote it.
            let encoded = serde_json::to_string(&old_report).expect("json");
            conn.execute(
                "INSERT INTO calls (call_sid, tenant_id, from_number, to_number, reported_at_ms,
                     stream_sid, agent_name, started_at_ms, ended_at_ms, end_reason,
                     context_source, audio_seconds_in, audio_seconds_out, barge_ins,
                     dtmf_digits, tool_calls, latency, binding, report_sha256,
                     transcript_dropped_lines, transcript_cut_lines)
                 VALUES ('CA1', 'old_tenant', '+15551230000', '+15550100001', 5, 'MZCA1', 'Ava',
                     ?1, ?2, 'twilio_stop', 'fresh', 30.0, 12.5, 2, 1, 0, ?3, 'bound', ?4, 0, 0)",
                params![
                    clamp_i64(old_report.started_at_ms),
                    clamp_i64(old_report.ended_at_ms),
                    serde_json::to_string(&old_report.latency).expect("json"),
                    sha256_hex(encoded.as_bytes()),
                ],
            )
            .expect("call");
        }
        let store = Store::open(&DbLocation::File(path.clone())).expect("migrated");
        let version: i64 = store
            .lock()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("pragma");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(columns(&store.lock()), columns(&seeded().lock()));
        // The old tenant answers, with no fallback or prompt, and its call is history with no
        // continuity record: the report's defaults.
        let context = store
            .context_for_call("+15550100077", "", "", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(
            (
                context.agent_name.as_str(),
                context.fallback_number,
                context.hold_prompt
            ),
            ("Olga", None, None)
        );
        let history = store
            .call_history("old_tenant", 50)
            .expect("store")
            .expect("tenant");
        let mut expected = old_report.clone();
        expected.tenant_id = Some("old_tenant".into());
        expected.transcript.clear();
        // Schema 2 stored no turns.
        expected.turns.clear();
        expected.turns_dropped = 0;
        assert_eq!(history.calls, vec![expected]);
        // Its report is as final as before: the identical retry acknowledged, no other.
        assert_eq!(
            store.record_report(&old_report, NOW_MS).expect("store"),
            Ok(0)
        );
        let mut other = old_report.clone();
        other.reconnect_gap_ms = 900;
        assert_eq!(
            store.record_report(&other, NOW_MS).expect("store"),
            Err(Refusal::ReportConflict)
        );
        // Opening again migrates nothing twice.
        drop(store);
        Store::open(&DbLocation::File(path)).expect("reopen");
    }

    #[test]
    fn the_context_carries_the_fallback_number_and_the_hold_prompt_as_base64() {
        let store = seeded();
        let seed = Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture");
        for tenant in &seed.tenants {
            let number = &tenant.numbers[0];
            let context = store
                .context_for_call(number, "", "", NOW_MS)
                .expect("store")
                .expect("known");
            assert_eq!(context.fallback_number, tenant.fallback_number);
            let prompt = context
                .hold_prompt
                .map(|text| BASE64.decode(text).expect("base64"));
            assert_eq!(prompt, tenant.hold_prompt);
        }
        assert!(seed.tenants.iter().any(|t| t.fallback_number.is_some()));
        assert!(seed.tenants.iter().any(|t| t.hold_prompt.is_some()));
        // A seed that drops them clears them; the same seed again writes nothing.
        let mut cleared = seed.clone();
        for tenant in &mut cleared.tenants {
            tenant.fallback_number = None;
            tenant.hold_prompt = None;
        }
        let with_either = seed
            .tenants
            .iter()
            .filter(|t| t.fallback_number.is_some() || t.hold_prompt.is_some())
            .count();
        assert_eq!(
            store.apply_seed(&cleared).expect("seed").tenants_written,
            with_either
        );
        assert_eq!(
            store.apply_seed(&cleared).expect("seed"),
            SeedOutcome::default()
        );
        let context = store
            .context_for_call(&seed.tenants[1].numbers[0], "", "", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!((context.fallback_number, context.hold_prompt), (None, None));
    }

    #[test]
    fn a_tenants_record_switch_and_a_reports_recording_round_trip() {
        let store = Store::open(&DbLocation::InMemory).expect("open");
        let mut seed = Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture");
        seed.tenants[0].record = Some(true);
        seed.tenants[1].record = Some(false);
        store.apply_seed(&seed).expect("seed");
        let record = |tenant: usize| {
            store
                .context_for_call(&seed.tenants[tenant].numbers[0], "", "", NOW_MS)
                .expect("store")
                .expect("known")
                .record
        };
        assert_eq!(
            (record(0), record(1), record(2)),
            (Some(true), Some(false), None)
        );
        let tenant = seed.tenants[0].id.clone();
        let mut written = report("CA1", Some(&tenant), NOW_MS);
        written.recording = Some(ReportRecording::Written {
            path: "/var/lib/voxrelay/recordings/CA1.opus".into(),
            duration_ms: 61_240,
            sha256: "ab".repeat(32),
            frames_dropped: 0,
        });
        let mut failed = report("CA2", Some(&tenant), NOW_MS + 1);
        failed.recording = Some(ReportRecording::Failed {
            error: "disk_full: No space left on device (os error 28)".into(),
        });
        let none = report("CA3", Some(&tenant), NOW_MS + 2);
        for call in [&written, &failed, &none] {
            assert_eq!(store.record_report(call, NOW_MS).expect("store"), Ok(2));
        }
        assert_eq!(store.reported_call("CA1").expect("store"), Some(written));
        assert_eq!(store.reported_call("CA2").expect("store"), Some(failed));
        let none_back = store.reported_call("CA3").expect("store").expect("stored");
        assert_eq!(none_back.recording, None);
        let json = serde_json::to_value(&none_back).expect("json");
        assert!(json.get("recording").is_none());
    }

    #[test]
    fn a_schema_4_database_is_migrated_with_no_record_switch_recordings_or_turns() {
        let dir = TempDir::new("migrate-4");
        let path = dir.0.join("cp.sqlite3");
        {
            let conn = database_at_schema(&path, 4);
            assert!(!columns(&conn).iter().any(|(_, column, _)| {
                column == "record" || column == "recording" || column == "quality"
            }));
            conn.execute(
                "INSERT INTO tenants (id, agent_name, voice, instructions, audio_mode, language,
                     max_call_seconds, tools, business_hours, provider)
                 VALUES ('old_tenant', 'Olga', 'marin', 'x', 'pcmu', 'en', 0, '[]',
                     '{\"timezone\":\"\",\"days\":[null,null,null,null,null,null,null]}',
                     'gemini')",
                [],
            )
            .expect("tenant");
            conn.execute(
                "INSERT INTO numbers (number, tenant_id) VALUES ('+15550100077', 'old_tenant')",
                [],
            )
            .expect("number");
            // A call schema 4 stored a report for (the columns history needs).
            conn.execute(
                "INSERT INTO calls (call_sid, tenant_id, reported_at_ms, started_at_ms,
                     stream_sid, agent_name, end_reason, context_source)
                 VALUES ('CA0', 'old_tenant', 6, 1, 'MZ0', 'Olga', 'twilio_stop', 'fresh')",
                [],
            )
            .expect("reported call");
        }
        let store = Store::open(&DbLocation::File(path.clone())).expect("migrated");
        assert_eq!(columns(&store.lock()), columns(&seeded().lock()));
        // Its report reads as what that bridge measured: no turns, no telemetry, no recording.
        let history = store
            .call_history("old_tenant", 50)
            .expect("store")
            .expect("tenant");
        let [old] = &history.calls[..] else {
            panic!("one call: {:?}", history.calls);
        };
        assert!(old.turns.is_empty() && old.audio.is_none() && old.recording.is_none());
        let context = store
            .context_for_call("+15550100077", "", "", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(
            (context.provider, context.record),
            (Some(Provider::Gemini), None)
        );
        assert!(
            store
                .lock()
                .execute("UPDATE tenants SET record = 2 WHERE id = 'old_tenant'", [])
                .is_err(),
            "the check holds on the migrated table"
        );
    }

    #[test]
    fn a_reports_audio_round_trips_in_its_quality_record() {
        use voxrelay_core::control::api::{ReportEcho, ReportLegAudio};
        let store = seeded();
        let leg = ReportLegAudio {
            audio_ms: 61_020,
            rms_dbfs: -23.46,
            peak_dbfs: -3.0,
            clipped_samples: 7,
            silence_share: 0.42,
            longest_silence_ms: 5_410,
            one_way_episodes: 1,
            one_way_ms: 5_410,
        };
        let mut heard = report("CA2", Some("harbor_florist"), NOW_MS);
        heard.to = "+15550100004".into();
        heard.audio = Some(ReportAudio {
            caller: leg,
            agent: ReportLegAudio {
                silence_share: 0.6,
                ..leg
            },
            echo: ReportEcho {
                detected: true,
                delay_ms: Some(180),
                level_db: Some(19.88),
                correlation: 0.95,
            },
        });
        assert_eq!(store.record_report(&heard, NOW_MS).expect("store"), Ok(2));
        assert_eq!(
            store.reported_call("CA2").expect("store"),
            Some(heard.clone())
        );
        let stored: String = store
            .lock()
            .query_row(
                "SELECT quality FROM calls WHERE call_sid = 'CA2'",
                [],
                |row| row.get(0),
            )
            .expect("row");
        let stored: serde_json::Value = serde_json::from_str(&stored).expect("json");
        assert_eq!(stored["audio"]["echo"]["delay_ms"], 180);
        // A retry differing only in its audio is another report.
        let mut other = heard.clone();
        other.audio = None;
        assert_eq!(
            store.record_report(&other, NOW_MS).expect("store"),
            Err(Refusal::ReportConflict)
        );
        // Its integers are held to SQLite's range like every report integer.
        let mut huge = report("CA3", Some("harbor_florist"), NOW_MS);
        huge.audio = Some(ReportAudio {
            caller: ReportLegAudio {
                clipped_samples: u64::MAX,
                ..leg
            },
            ..ReportAudio::default()
        });
        assert_eq!(
            store.record_report(&huge, NOW_MS).expect("store"),
            Err(Refusal::OutOfRange)
        );
    }

    #[test]
    fn a_reports_provider_model_and_usage_round_trip() {
        let store = seeded();
        let mut gemini = report("CA1", Some("harbor_florist"), NOW_MS);
        gemini.to = "+15550100004".into();
        gemini.provider = Provider::Gemini;
        gemini.model = Some("gemini-3.8-live".into());
        gemini.usage = Some(ReportUsage {
            input_tokens: 1_204,
            output_tokens: 388,
        });
        assert_eq!(store.record_report(&gemini, NOW_MS).expect("store"), Ok(2));
        // On OpenAI with the endpoint's default model and no usage reported.
        let plain = report("CA2", Some("harbor_florist"), NOW_MS + 1);
        assert_eq!(store.record_report(&plain, NOW_MS).expect("store"), Ok(2));
        let history = store
            .call_history("harbor_florist", 50)
            .expect("store")
            .expect("tenant");
        assert_eq!(history.calls, vec![plain.clone(), gemini.clone()]);
        let json = serde_json::to_value(&history).expect("json");
        assert_eq!(json["calls"][1]["provider"], "gemini");
        assert_eq!(
            json["calls"][1]["usage"],
            json!({"input_tokens": 1_204, "output_tokens": 388})
        );
        assert_eq!(json["calls"][0]["provider"], "openai");
        assert_eq!(json["calls"][0]["model"], Value::Null);
        assert!(json["calls"][0].get("usage").is_none());
        // One call's report, whatever its tenant: a call the fallback agent answered too,
        // which no tenant's history lists.
        assert_eq!(
            store.reported_call("CA1").expect("store"),
            Some(gemini.clone())
        );
        let mut fallback = report("CA9", None, NOW_MS);
        fallback.provider = Provider::Gemini;
        assert_eq!(
            store.record_report(&fallback, NOW_MS).expect("store"),
            Ok(2)
        );
        assert_eq!(store.reported_call("CA9").expect("store"), Some(fallback));
        assert_eq!(store.reported_call("CA-none").expect("store"), None);
        store
            .context_for_call("+15550100004", "+15551230000", "CA-looked-up", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(store.reported_call("CA-looked-up").expect("store"), None);
        // The columns hold them, for SQL.
        let stored: (String, Option<String>, Option<i64>, Option<i64>) = store
            .lock()
            .query_row(
                "SELECT provider, model, input_tokens, output_tokens FROM calls
                 WHERE call_sid = 'CA1'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .expect("row");
        assert_eq!(
            stored,
            (
                "gemini".into(),
                Some("gemini-3.8-live".into()),
                Some(1_204),
                Some(388)
            )
        );
        // A retry differing only in usage is another report.
        let mut other = gemini.clone();
        other.usage = None;
        assert_eq!(
            store.record_report(&other, NOW_MS).expect("store"),
            Err(Refusal::ReportConflict)
        );
        // Token counts past i64 are refused as every report integer is.
        let mut huge = report("CA3", Some("harbor_florist"), NOW_MS);
        huge.usage = Some(ReportUsage {
            input_tokens: 1,
            output_tokens: u64::MAX,
        });
        assert_eq!(
            store.record_report(&huge, NOW_MS).expect("store"),
            Err(Refusal::OutOfRange)
        );
        // Half a usage in a row edited by hand is reported, not read as something else.
        store
            .lock()
            .execute(
                "UPDATE calls SET output_tokens = NULL WHERE call_sid = 'CA1'",
                [],
            )
            .expect("edit");
        assert!(matches!(
            store.call_history("harbor_florist", 50),
            Err(StoreError::Corrupt {
                column: "output_tokens",
                ..
            })
        ));
    }

    #[test]
    fn a_report_with_two_sessions_and_a_fallback_round_trips() {
        let store = seeded();
        let mut sent = report("CA1", Some("acme_dental"), NOW_MS);
        sent.model_sessions = vec![
            ModelSessionReport {
                started_ms: 0,
                ended_ms: Some(41_000),
                end: Some("drop".into()),
                failed_connects: Vec::new(),
            },
            ModelSessionReport {
                started_ms: 41_900,
                ended_ms: None,
                end: None,
                failed_connects: vec!["rate_limited".into(), "timeout".into()],
            },
        ];
        sent.reconnect_gap_ms = 900;
        sent.hold_prompt_ms = 200;
        sent.fallback = Some(ReportFallback {
            reason: "too_many_drops".into(),
            caller_got: "dial".into(),
        });
        assert_eq!(store.record_report(&sent, NOW_MS).expect("store"), Ok(2));
        let history = store
            .call_history("acme_dental", 50)
            .expect("store")
            .expect("tenant");
        assert_eq!(history.calls, vec![sent.clone()]);
        let stored: String = store
            .lock()
            .query_row(
                "SELECT continuity FROM calls WHERE call_sid = 'CA1'",
                [],
                |row| row.get(0),
            )
            .expect("column");
        let stored: Value = serde_json::from_str(&stored).expect("json");
        assert_eq!(
            stored["model_sessions"][1]["failed_connects"][0],
            "rate_limited"
        );
        assert_eq!(stored["fallback"]["caller_got"], "dial");
        // The identical retry is acknowledged; one differing only in continuity is not.
        assert_eq!(store.record_report(&sent, NOW_MS).expect("store"), Ok(2));
        let mut other = sent.clone();
        other.model_sessions[1].failed_connects.pop();
        assert_eq!(
            store.record_report(&other, NOW_MS).expect("store"),
            Err(Refusal::ReportConflict)
        );
        // Past i64 is refused here as for every report integer.
        let mut huge = report("CA2", Some("acme_dental"), NOW_MS);
        huge.model_sessions = vec![ModelSessionReport {
            ended_ms: Some(u64::MAX),
            ..sent.model_sessions[0].clone()
        }];
        assert_eq!(
            store.record_report(&huge, NOW_MS).expect("store"),
            Err(Refusal::OutOfRange)
        );
        huge.model_sessions.clear();
        huge.reconnect_gap_ms = u64::MAX;
        assert_eq!(
            store.record_report(&huge, NOW_MS).expect("store"),
            Err(Refusal::OutOfRange)
        );
    }

    #[test]
    fn reports_keep_the_binding_and_refuse_another_tenant() {
        let store = seeded();
        store
            .context_for_call("+15550100001", "+15551230000", "CA1", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(
            store
                .record_report(&report("CA1", Some("bistro_luna"), NOW_MS), NOW_MS)
                .expect("store"),
            Err(Refusal::TenantMismatch)
        );
        assert_eq!(
            store
                .record_report(&report("CA2", Some("no_such_tenant"), NOW_MS), NOW_MS)
                .expect("store"),
            Err(Refusal::UnknownTenant)
        );
        // A fallback report (no tenant) for a looked-up call stays with the looked-up tenant.
        store
            .record_report(&report("CA1", None, NOW_MS), NOW_MS)
            .expect("store")
            .expect("stored");
        let history = store
            .call_history("acme_dental", 50)
            .expect("store")
            .expect("tenant");
        assert_eq!(history.calls[0].tenant_id.as_deref(), Some("acme_dental"));
        // Numbers past i64 are refused, not wrapped.
        let mut huge = report("CA3", None, NOW_MS);
        huge.started_at_ms = u64::MAX;
        assert_eq!(
            store.record_report(&huge, NOW_MS).expect("store"),
            Err(Refusal::OutOfRange)
        );
    }

    #[test]
    fn history_is_per_tenant_newest_first_and_limited() {
        let store = seeded();
        for (index, tenant) in ["acme_dental", "bistro_luna", "acme_dental"]
            .into_iter()
            .enumerate()
        {
            let started = NOW_MS + index as u64 * 60_000;
            store
                .record_report(
                    &report(&format!("CA{index}"), Some(tenant), started),
                    NOW_MS,
                )
                .expect("store")
                .expect("stored");
        }
        let sids = |tenant: &str, limit: usize| -> Vec<String> {
            store
                .call_history(tenant, limit)
                .expect("store")
                .expect("tenant")
                .calls
                .into_iter()
                .map(|c| c.call_sid)
                .collect()
        };
        assert_eq!(sids("acme_dental", 50), ["CA2", "CA0"]);
        assert_eq!(sids("acme_dental", 1), ["CA2"]);
        assert_eq!(sids("bistro_luna", 50), ["CA1"]);
        assert_eq!(
            store.call_history("nobody", 50).expect("store"),
            Err(Refusal::UnknownTenant)
        );
        // A looked-up call that was never reported is not history yet.
        store
            .context_for_call("+15550100002", "", "CA9", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(sids("bistro_luna", 50), ["CA1"]);
    }

    #[test]
    fn tools_check_tenant_tool_and_arguments_before_writing() {
        let store = seeded();
        store
            .context_for_call("+15550100001", "+15551230000", "CA1", NOW_MS)
            .expect("store")
            .expect("known");
        let message = json!({"caller_name": "Sam", "callback_number": "+15551230000", "message": "Please call back."});
        let run = |name: &str, request: ToolRequest| {
            store.run_tool(name, &request, NOW_MS).expect("store")
        };
        assert_eq!(
            run("take_message", tool("CA1", "acme_dental", message.clone())),
            Ok(json!({"saved": true, "message_id": 1}))
        );
        assert_eq!(
            run("launch_rockets", tool("CA1", "acme_dental", json!({}))),
            Err(Refusal::UnknownTool)
        );
        assert_eq!(
            run("take_message", tool("CA1", "nobody", message.clone())),
            Err(Refusal::UnknownTenant)
        );
        assert_eq!(
            run(
                "take_message",
                tool("CA1", "acme_dental", json!({"message": "hi"}))
            ),
            Err(Refusal::BadArguments)
        );
        assert_eq!(
            run(
                "lookup_business_hours",
                tool("CA1", "bistro_luna", json!({}))
            ),
            Err(Refusal::TenantMismatch)
        );
        let messages = store.messages("acme_dental").expect("messages");
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].caller_name, "Sam");
        assert_eq!(messages[0].call_sid, "CA1");
        assert!(store.messages("bistro_luna").expect("messages").is_empty());

        let hours = run(
            "lookup_business_hours",
            tool("CA1", "acme_dental", json!({"day": "sunday"})),
        )
        .expect("hours");
        assert_eq!(hours["open"], false);
        assert_eq!(hours["day"], "sunday");
    }

    #[test]
    fn a_tool_not_enabled_for_the_tenant_is_unknown_to_it() {
        let store = seeded();
        // bistro_luna enables lookup_business_hours only.
        assert_eq!(
            store
                .run_tool(
                    "take_message",
                    &tool(
                        "CA5",
                        "bistro_luna",
                        json!({"caller_name": "A", "callback_number": "555", "message": "x"})
                    ),
                    NOW_MS
                )
                .expect("store"),
            Err(Refusal::UnknownTool)
        );
        // A call never looked up is bound by its first tool call; a refused call binds nothing.
        assert!(
            store
                .run_tool(
                    "lookup_business_hours",
                    &tool("CA5", "bistro_luna", json!({})),
                    NOW_MS
                )
                .expect("store")
                .is_ok()
        );
        assert_eq!(
            store
                .run_tool(
                    "lookup_business_hours",
                    &tool("CA5", "acme_dental", json!({})),
                    NOW_MS
                )
                .expect("store"),
            Err(Refusal::TenantMismatch)
        );
    }

    #[test]
    fn a_file_database_keeps_its_data_across_reopening() {
        let dir = TempDir::new("reopen");
        let location = DbLocation::File(dir.0.join("cp.sqlite3"));
        {
            let store = Store::open(&location).expect("open");
            store
                .apply_seed(&Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture"))
                .expect("seed");
            store
                .record_report(&report("CA1", Some("acme_dental"), NOW_MS), NOW_MS)
                .expect("store")
                .expect("stored");
            let mode: String = store
                .lock()
                .pragma_query_value(None, "journal_mode", |row| row.get(0))
                .expect("pragma");
            assert_eq!(mode, "wal");
        }
        let store = Store::open(&location).expect("reopen");
        let history = store
            .call_history("acme_dental", 50)
            .expect("store")
            .expect("tenant");
        assert_eq!(history.calls.len(), 1);
        assert_eq!(history.calls[0].transcript.len(), 2);
    }

    #[test]
    fn a_schema_3_database_is_migrated_and_keeps_its_rows() {
        let dir = TempDir::new("migrate-3");
        let path = dir.0.join("cp.sqlite3");
        {
            let conn = database_at_schema(&path, 3);
            assert!(
                !columns(&conn)
                    .iter()
                    .any(|(_, column, _)| column == "provider" || column == "model")
            );
            // A tenant with schema 3's continuity settings, its number, and a looked-up call.
            conn.execute(
                "INSERT INTO tenants (id, agent_name, voice, instructions, audio_mode, language,
                     max_call_seconds, tools, business_hours, fallback_number, hold_prompt)
                 VALUES ('old_tenant', 'Olga', 'marin', 'x', 'pcmu', 'en', 0, '[]',
                     '{\"timezone\":\"\",\"days\":[null,null,null,null,null,null,null]}',
                     '+15550100999', x'7f7f7f')",
                [],
            )
            .expect("tenant");
            conn.execute(
                "INSERT INTO numbers (number, tenant_id) VALUES ('+15550100077', 'old_tenant')",
                [],
            )
            .expect("number");
            conn.execute(
                "INSERT INTO calls (call_sid, tenant_id, looked_up_at_ms)
                 VALUES ('CA1', 'old_tenant', 5)",
                [],
            )
            .expect("call");
            // A call schema 3 stored a report for (the columns history needs).
            conn.execute(
                "INSERT INTO calls (call_sid, tenant_id, reported_at_ms, started_at_ms,
                     stream_sid, agent_name, end_reason, context_source)
                 VALUES ('CA0', 'old_tenant', 6, 1, 'MZ0', 'Olga', 'twilio_stop', 'fresh')",
                [],
            )
            .expect("reported call");
        }
        let store = Store::open(&DbLocation::File(path.clone())).expect("migrated");
        let version: i64 = store
            .lock()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("pragma");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(columns(&store.lock()), columns(&seeded().lock()));
        // The tenant answers as before, on the bridge's default provider and model.
        let context = store
            .context_for_call("+15550100077", "", "", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(
            (
                context.agent_name.as_str(),
                context.fallback_number.as_deref(),
                context.hold_prompt.as_deref(),
                context.provider,
                context.model,
            ),
            ("Olga", Some("+15550100999"), Some("f39/"), None, None)
        );
        // The call is still bound to it.
        let bound: (Option<String>, Option<i64>) = store
            .lock()
            .query_row(
                "SELECT tenant_id, looked_up_at_ms FROM calls WHERE call_sid = 'CA1'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .expect("call");
        assert_eq!(bound, (Some("old_tenant".into()), Some(5)));
        // The report stored before schema 4 reads as what it was: OpenAI, the default model,
        // no usage reported.
        let history = store
            .call_history("old_tenant", 50)
            .expect("store")
            .expect("tenant");
        assert_eq!(history.calls.len(), 1);
        let old = &history.calls[0];
        assert_eq!(
            (
                old.call_sid.as_str(),
                old.provider,
                old.model.as_deref(),
                old.usage
            ),
            ("CA0", Provider::OpenAi, None, None)
        );
        // The new columns work on the migrated table, their checks included.
        {
            let conn = store.lock();
            conn.execute(
                "UPDATE tenants SET provider = 'gemini', model = 'gemini-3.8-live'
                 WHERE id = 'old_tenant'",
                [],
            )
            .expect("provider");
            assert!(
                conn.execute(
                    "UPDATE tenants SET provider = 'anthropic' WHERE id = 'old_tenant'",
                    []
                )
                .is_err()
            );
            assert!(
                conn.execute(
                    "UPDATE calls SET provider = 'anthropic' WHERE call_sid = 'CA0'",
                    []
                )
                .is_err()
            );
            assert!(
                conn.execute(
                    "UPDATE calls SET input_tokens = -1 WHERE call_sid = 'CA0'",
                    []
                )
                .is_err()
            );
        }
        let context = store
            .context_for_call("+15550100077", "", "", NOW_MS)
            .expect("store")
            .expect("known");
        assert_eq!(
            (context.provider, context.model.as_deref()),
            (Some(Provider::Gemini), Some("gemini-3.8-live"))
        );
        // Opening again migrates nothing twice.
        drop(store);
        Store::open(&DbLocation::File(path)).expect("reopen");
    }

    #[test]
    fn the_context_carries_each_tenants_provider_and_model() {
        let store = seeded();
        let seed = Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture");
        for tenant in &seed.tenants {
            let context = store
                .context_for_call(&tenant.numbers[0], "", "", NOW_MS)
                .expect("store")
                .expect("known");
            assert_eq!(
                (context.provider, context.model.as_ref()),
                (tenant.provider, tenant.model.as_ref()),
                "{}",
                tenant.id
            );
        }
        assert!(
            seed.tenants
                .iter()
                .any(|t| t.provider == Some(Provider::Gemini) && t.model.is_some()),
            "the fixture has a tenant on Gemini"
        );
        assert!(seed.tenants.iter().any(|t| t.provider.is_none()));
    }

    #[test]
    fn a_tenant_switches_provider_at_its_next_lookup() {
        let store = seeded();
        let lookup = |call_sid: &str| {
            let context = store
                .context_for_call("+15550100001", "+15551230000", call_sid, NOW_MS)
                .expect("store")
                .expect("known");
            (context.provider, context.model)
        };
        assert_eq!(lookup("CA1"), (None, None));
        // The operator edits the seed (the service applies it at its next start).
        let on_gemini = FIXTURE.replacen(
            "voice = \"marin\"",
            "voice = \"Kore\"\nprovider = \"gemini\"",
            1,
        );
        assert_ne!(on_gemini, FIXTURE, "the fixture gives acme_dental marin");
        let outcome = store
            .apply_seed(&Seed::parse(&on_gemini, &SeedFiles::Shipped).expect("edited"))
            .expect("seed");
        assert_eq!(outcome.tenants_written, 1);
        assert_eq!(lookup("CA2"), (Some(Provider::Gemini), None));
        // Or edits the row in place, with the service running: the next lookup sees it.
        store
            .lock()
            .execute(
                "UPDATE tenants SET provider = 'openai', model = 'gpt-realtime'
                 WHERE id = 'acme_dental'",
                [],
            )
            .expect("update");
        assert_eq!(
            lookup("CA3"),
            (Some(Provider::OpenAi), Some("gpt-realtime".into()))
        );
        // The shipped seed again puts it back on the bridge's defaults.
        assert_eq!(
            store
                .apply_seed(&Seed::parse(FIXTURE, &SeedFiles::Shipped).expect("fixture"))
                .expect("seed")
                .tenants_written,
            1
        );
        assert_eq!(lookup("CA4"), (None, None));
    }

    #[test]
    fn the_schema_refuses_a_provider_or_model_the_seed_would() {
        use crate::seed::{MAX_MODEL_ID_LEN, is_valid_model_id};
        let store = seeded();
        let conn = store.lock();
        let set = |column: &str, value: &str| {
            conn.execute(
                &format!("UPDATE tenants SET {column} = ?1 WHERE id = 'acme_dental'"),
                [value],
            )
        };
        let too_long = "m".repeat(MAX_MODEL_ID_LEN + 1);
        for provider in ["anthropic", "OpenAI", "gemini ", ""] {
            assert!(set("provider", provider).is_err(), "{provider:?}");
        }
        for model in [
            "",
            "gpt realtime",
            "models/gemini",
            "gémini",
            "a*",
            &too_long,
        ] {
            assert!(set("model", model).is_err(), "{model:?}");
            assert!(!is_valid_model_id(model), "{model:?}");
        }
        let longest = "m".repeat(MAX_MODEL_ID_LEN);
        for model in ["gpt-realtime", "gemini-3.8-live", "A_b.9-z", &longest] {
            assert_eq!(set("model", model).expect(model), 1);
            assert!(is_valid_model_id(model), "{model:?}");
        }
        for provider in ["openai", "gemini"] {
            assert_eq!(set("provider", provider).expect(provider), 1);
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = TempDir::new("newer");
        let path = dir.0.join("cp.sqlite3");
        {
            let conn = Connection::open(&path).expect("open");
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .expect("pragma");
        }
        assert!(matches!(
            Store::open(&DbLocation::File(path)),
            Err(StoreError::NewerSchema { .. })
        ));
    }
}
