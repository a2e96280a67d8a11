//! The `/v1` wire types, shared by the bridge's client and the reference control plane.
//!
//! One definition per JSON document in `docs/control-plane-api.md`, so both sides of the API
//! serialise from the same types and cannot drift apart. Field names are an interface other
//! control planes implement: add fields, never rename them.

use serde::{Deserialize, Serialize};

use crate::{AudioMode, Provider};

pub const CONTEXT_PATH: &str = "/v1/context";
pub const CALLS_PATH: &str = "/v1/calls";

/// `POST /v1/calls/{call_sid}/report`, with the call SID percent-encoded as a path segment.
pub fn report_path(call_sid: &str) -> String {
    format!("{CALLS_PATH}/{}/report", encode_segment(call_sid))
}

/// `POST /v1/tools/{name}`, with the tool name percent-encoded as a path segment.
pub fn tool_path(name: &str) -> String {
    format!("/v1/tools/{}", encode_segment(name))
}

/// `GET /v1/context?to=…&from=…&call_sid=…` (form-encoded query, in that order).
pub fn context_path_and_query(to: &str, from: &str, call_sid: &str) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("to", to)
        .append_pair("from", from)
        .append_pair("call_sid", call_sid)
        .finish();
    format!("{CONTEXT_PATH}?{query}")
}

/// `GET /v1/calls?tenant_id=…` (form-encoded query).
pub fn calls_path_and_query(tenant_id: &str) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("tenant_id", tenant_id)
        .finish();
    format!("{CALLS_PATH}?{query}")
}

/// Everything outside RFC 3986's unreserved set is escaped, so a segment can never add a `/`,
/// `?` or `#` to the path.
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The memory namespace of one caller of one tenant: `<tenant_id>/<caller>`, where the caller
/// is the `From` number with anything outside `[A-Za-z0-9+._-]` replaced by `_` (Twilio Client
/// callers look like `client:alice`), or `anonymous` when there is none. Built the same way on
/// both sides so a context the bridge serves from its cache to another caller of the same
/// number still names that caller's memory, and nothing in `from` can escape the tenant prefix.
pub fn memory_namespace(tenant_id: &str, from: &str) -> String {
    let mut out = String::with_capacity(tenant_id.len() + 1 + from.len().max(9));
    out.push_str(tenant_id);
    out.push('/');
    let from = from.trim();
    if from.is_empty() {
        out.push_str("anonymous");
    } else {
        out.extend(from.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        }));
    }
    out
}

/// `GET /v1/context`: who answers a dialled number, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantContext {
    pub tenant_id: String,
    pub agent_name: String,
    pub voice: String,
    /// Spoken as soon as the stream starts; `null` (or absent) for no greeting.
    #[serde(default)]
    pub greeting: Option<String>,
    pub instructions: String,
    pub audio_mode: AudioMode,
    /// BCP 47 tag, e.g. `en-US`.
    pub language: String,
    /// OpenAI Realtime function definitions (`{"type":"function","name",…,"parameters"}`).
    #[serde(default)]
    pub tools: Vec<serde_json::Value>,
    /// Where the agent's memory for this caller lives; always starts with `<tenant_id>/`.
    pub memory_namespace: String,
    /// The bridge ends the call after this long; 0 means no limit.
    pub max_call_seconds: u32,
    /// Where a call goes when no model session can be had (E.164, e.g. `+15550100999`): the
    /// voice webhook's TwiML dials it after `<Connect>`. Absent: a spoken apology and a
    /// hang-up. A value that is not E.164 is ignored (and logged) by the bridge.
    #[serde(default)]
    pub fallback_number: Option<String>,
    /// What a caller hears while the bridge replaces a lost model session: base64 of 8 kHz
    /// μ-law audio, at most [`MAX_HOLD_PROMPT_BYTES`] decoded. Absent: the bridge's built-in
    /// chime. An invalid or oversized value is ignored (and logged) by the bridge.
    #[serde(default)]
    pub hold_prompt: Option<String>,
    /// The realtime provider that answers this tenant's calls (`openai` or `gemini`). Absent:
    /// the bridge's `VOXRELAY_PROVIDER`. Changing it takes effect at the next call, with no
    /// restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    /// The provider's model id (`gpt-realtime`, `gemini-3.8-live`). Absent: the bridge's
    /// default for the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Whether this tenant's calls are recorded (Ogg Opus, `VOXRELAY_RECORDING_DIR`). Absent:
    /// the bridge's `VOXRELAY_RECORD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<bool>,
}

/// The longest tenant hold prompt, in bytes of 8 kHz μ-law (10 s).
pub const MAX_HOLD_PROMPT_BYTES: usize = 80_000;

/// Whether `number` is an E.164 telephone number (`+` and 8 to 15 digits, no leading 0).
pub fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// `POST /v1/tools/{name}` request body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolRequest {
    pub call_sid: String,
    pub tenant_id: String,
    /// The model's arguments, parsed from its JSON string.
    pub arguments: serde_json::Value,
}

/// `POST /v1/tools/{name}` response body. A string output goes to the model verbatim; any
/// other JSON value is sent as its serialisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResponse {
    pub output: serde_json::Value,
}

impl ToolResponse {
    /// The text the model receives as the `function_call_output`.
    pub fn output_text(&self) -> String {
        match &self.output {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        }
    }
}

/// Who spoke a transcript line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    Caller,
    Assistant,
}

impl Speaker {
    pub fn as_str(self) -> &'static str {
        match self {
            Speaker::Caller => "caller",
            Speaker::Assistant => "assistant",
        }
    }
}

/// One transcript line: caller lines come from input transcription, assistant lines from the
/// model's output transcripts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TranscriptEntry {
    pub speaker: Speaker,
    /// Milliseconds since the stream started.
    pub offset_ms: u64,
    pub text: String,
}

/// Latency figures for one call and direction, in microseconds; all zero when `count` is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// Latency the bridge measured inside itself for one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CallLatency {
    /// Twilio frame read → its audio written to the model.
    pub uplink_us: LatencySummary,
    /// Model delta read → its audio written to Twilio (unpaced chunks only).
    pub downlink_us: LatencySummary,
    /// `speech_started` read → Twilio `clear` written.
    pub barge_in_us: LatencySummary,
}

/// `POST /v1/calls/{call_sid}/report` body, and one entry of `GET /v1/calls`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallReport {
    pub call_sid: String,
    pub stream_sid: String,
    /// `null` when the fallback agent answered (unknown number, control plane down or slow).
    pub tenant_id: Option<String>,
    pub agent_name: String,
    pub from: String,
    pub to: String,
    /// Unix milliseconds of the stream's `start` and of the call's end.
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// `twilio_stop`, `twilio_closed`, `twilio_error`, `upstream_closed`, `upstream_failed`,
    /// `max_duration`, `shutdown`, …
    pub end_reason: String,
    /// Where the context came from: `fresh`, `cached`, `stale`, `fallback` or `unknown_number`
    /// (`static` from a bridge without a control plane).
    pub context_source: String,
    /// Whether the stream proved it is the call its webhook answered (see [`ReportBinding`]).
    /// Absent (a bridge from before the field) reads as `unbound`.
    #[serde(default)]
    pub binding: ReportBinding,
    /// The caller's memory namespace the call ran with (`<tenant_id>/<caller>`); `null` for
    /// the fallback agent.
    #[serde(default)]
    pub memory_namespace: Option<String>,
    /// Seconds of caller audio received and of model audio sent to the caller (8 kHz μ-law).
    pub audio_seconds_in: f64,
    pub audio_seconds_out: f64,
    pub barge_ins: u64,
    pub dtmf_digits: u64,
    pub tool_calls: u64,
    pub latency: CallLatency,
    /// The most recent lines of the call, at most the bridge's
    /// `session::report::MAX_TRANSCRIPT_BYTES` of them as encoded here.
    pub transcript: Vec<TranscriptEntry>,
    /// Lines left out at the start of `transcript` to keep the report bounded (0 normally).
    #[serde(default)]
    pub transcript_dropped_lines: u64,
    /// Lines of `transcript` whose text was cut short (their start kept; 0 normally).
    #[serde(default)]
    pub transcript_cut_lines: u64,
    /// Every model session the call had, oldest first (more than one when a session was lost
    /// and replaced); at most the bridge's `MAX_SESSION_RECORDS`.
    #[serde(default)]
    pub model_sessions: Vec<ModelSessionReport>,
    /// Time the caller spent without a model session after losses, summed (0 normally).
    #[serde(default)]
    pub reconnect_gap_ms: u64,
    /// Hold prompt audio the caller was sent while waiting for a session (0 normally).
    #[serde(default)]
    pub hold_prompt_ms: u64,
    /// Set when no model session could be had and the call went to the fallback.
    #[serde(default)]
    pub fallback: Option<ReportFallback>,
    /// The realtime provider the call ran on (`openai` or `gemini`). Absent (a bridge from
    /// before the field, which only spoke OpenAI) reads as `openai`.
    #[serde(default)]
    pub provider: Provider,
    /// The provider's model id the call ran; `null` for the endpoint's default model.
    #[serde(default)]
    pub model: Option<String>,
    /// Tokens the model reported using, summed over the call's sessions; absent when the
    /// provider reported none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ReportUsage>,
    /// Every assistant turn, timed on the bridge's clock (at most the bridge's
    /// `session::turns::MAX_TURNS`, oldest first); absent from bridges before the field.
    #[serde(default)]
    pub turns: Vec<TurnReport>,
    /// Turns beyond those kept.
    #[serde(default)]
    pub turns_dropped: u64,
    /// The call's recording, when it was to be recorded; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<ReportRecording>,
    /// What the call sounded like, per leg, with one-way audio and echo
    /// (`voxrelay_core::session::telemetry`); absent from a bridge before the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<ReportAudio>,
}

/// One assistant turn of a reported call. Durations are milliseconds with microsecond
/// precision; a part is `null` when its event never came (a turn cut before it was heard, a
/// turn that answered no caller speech: the greeting, a digit, a tool's answer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnReport {
    /// When the model began the turn, in ms since the stream's `start`.
    pub at_ms: u64,
    /// `caller` (it answered the caller's speech) or `other`.
    pub cause: String,
    /// Caller speech end to the reply's playback start as Twilio's mark confirmed it.
    pub voice_to_voice_ms: Option<f64>,
    /// Caller speech end to the model's first audio (its turn detection and think time).
    pub model_ms: Option<f64>,
    /// Caller speech end to the model saying the caller stopped (its turn detection alone);
    /// `null` for a provider that does not say (Gemini).
    pub detect_ms: Option<f64>,
    /// The model's first audio to its first chunk sent to Twilio.
    pub bridge_ms: Option<f64>,
    /// First chunk sent to Twilio to its playback start.
    pub playout_ms: Option<f64>,
    /// Set when the caller barged in on this turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barge_in: Option<TurnBargeInReport>,
}

/// A barge-in on a reported turn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnBargeInReport {
    /// When the `clear` went, in ms since the stream's `start`.
    pub at_ms: u64,
    /// Caller speech start to the `clear` sent; `null` when the speech start is unknown.
    pub talk_over_ms: Option<f64>,
    /// Agent audio the caller heard after they started to speak, up to the `clear`.
    pub heard_over_caller_ms: Option<f64>,
}

/// A recorded call's file, or why it has none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReportRecording {
    Written {
        /// Where the bridge wrote the Ogg Opus file (on the bridge's host).
        path: String,
        /// Audio in the file, in ms.
        duration_ms: u64,
        /// SHA-256 of the file, lowercase hex.
        sha256: String,
        /// Frames and chunks the recorder's queue could not take (0 normally): the file has
        /// silence in their place.
        frames_dropped: u64,
    },
    Failed {
        /// `recording_unavailable` (a build without recording), or the failure's kind and
        /// detail (`unwritable_dir: …`, `disk_full: …`, `encoder: …`, `finalize_timeout`).
        error: String,
    },
}

/// A call's audio telemetry: the caller's leg (what Twilio sent), the agent's (what the caller
/// was played and heard: a barge-in's cut withdraws the rest), and the agent's voice echoing
/// back in the caller's audio. Levels in dBFS (a full-scale sine is −3 dBFS; −100 stands for
/// digital silence), rounded to 0.01.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportAudio {
    pub caller: ReportLegAudio,
    pub agent: ReportLegAudio,
    pub echo: ReportEcho,
}

/// One leg's figures over the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportLegAudio {
    /// Audio the leg carried, ms.
    pub audio_ms: u64,
    pub rms_dbfs: f64,
    pub peak_dbfs: f64,
    /// Samples at the μ-law code's extremes (clipped, or at full scale).
    pub clipped_samples: u64,
    /// Share of the call (0–1) the leg was silent: below −45 dBFS, or, for the agent, not
    /// playing.
    pub silence_share: f64,
    pub longest_silence_ms: u64,
    /// Times the leg was silent for 8 s or more while the other spoke (one-way audio), and
    /// those silences' length summed.
    pub one_way_episodes: u32,
    pub one_way_ms: u64,
}

/// The agent's own voice in the caller's audio.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportEcho {
    pub detected: bool,
    /// How long after it was played it came back; `null` unless detected.
    pub delay_ms: Option<u32>,
    /// Echo return loss: how many dB below the played audio it came back; `null` unless
    /// detected.
    pub level_db: Option<f64>,
    /// The best correlation found between the played audio and the caller's (0–1; an echo
    /// is 0.6 or more).
    pub correlation: f64,
}

/// A call's token usage as the provider reported it (OpenAI's `response.done` usage,
/// Gemini's `usageMetadata`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One model session of a reported call, in ms since the stream's `start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSessionReport {
    pub started_ms: u64,
    /// `null` for a session still open when the report was made (never, normally).
    pub ended_ms: Option<u64>,
    /// `drop`, `idle`, `stalled`, `oversized`, `renewal` or `call_ended`.
    pub end: Option<String>,
    /// Connect attempts that failed before this session opened, by kind (`rate_limited`,
    /// `server_error`, `refused`, `timeout`, `network`), at most 8.
    #[serde(default)]
    pub failed_connects: Vec<String>,
}

/// Why a call went to the fallback, and what the caller got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportFallback {
    /// `rate_limited`, `server_error`, `refused`, `timeout`, `network` (the last connect
    /// attempt's failure) or `too_many_drops`.
    pub reason: String,
    /// `dial` (the tenant's `fallback_number`), `apology` (a spoken apology and a hang-up), or
    /// `stream_closed` (a stream not from this bridge's webhook: its TwiML is not ours).
    pub caller_got: String,
}

/// How a reported call's stream was tied to its call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportBinding {
    /// The stream presented the token its call's voice webhook issued (for this `CallSid` and
    /// `To`, unexpired) and was the first to do so: its report is the call's.
    Bound,
    /// No verified token (TwiML from elsewhere, with `VOXRELAY_REQUIRE_STREAM_TOKEN=0`): the
    /// fallback agent answered, and the report is kept apart from every tenant's calls.
    #[default]
    Unbound,
}

impl ReportBinding {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportBinding::Bound => "bound",
            ReportBinding::Unbound => "unbound",
        }
    }
}

/// `POST /v1/calls/{call_sid}/report` success body: what was stored. The identical report sent
/// again (a retry) answers the same; a different one for the same call is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAck {
    pub call_sid: String,
    /// Transcript lines stored for the call.
    pub transcript_lines: usize,
}

/// `GET /v1/calls?tenant_id=…` response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallHistory {
    pub calls: Vec<CallReport>,
}

/// Body of every non-2xx answer: a stable code, never details of a secret or a signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Where a call's context came from (the bridge's tenant directory decides); `as_str` is the
/// report's `context_source` and the bridge's metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContextSource {
    /// Fetched from the control plane during this lookup, within the budget.
    Fresh,
    /// A cached answer younger than the TTL.
    Cached,
    /// A cached answer past its TTL but within the stale-while-revalidate window.
    Stale,
    /// No usable answer in time (control plane down, slow or invalid): the default agent.
    Fallback,
    /// The control plane said no tenant owns the number (404): the default agent.
    UnknownNumber,
}

impl ContextSource {
    pub const ALL: [ContextSource; 5] = [
        ContextSource::Fresh,
        ContextSource::Cached,
        ContextSource::Stale,
        ContextSource::Fallback,
        ContextSource::UnknownNumber,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ContextSource::Fresh => "fresh",
            ContextSource::Cached => "cached",
            ContextSource::Stale => "stale",
            ContextSource::Fallback => "fallback",
            ContextSource::UnknownNumber => "unknown_number",
        }
    }
}

/// `<tenant_id>/<rest>` where no `/`-separated segment of `rest` is empty, `.` or `..`, and
/// nothing is a control character or a backslash.
pub fn namespace_within_tenant(tenant_id: &str, namespace: &str) -> bool {
    let Some(rest) = namespace
        .strip_prefix(tenant_id)
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    !tenant_id.is_empty()
        && !namespace.chars().any(|c| c.is_control() || c == '\\')
        && rest
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_escape_everything_that_could_change_the_route() {
        assert_eq!(report_path("CA123"), "/v1/calls/CA123/report");
        assert_eq!(report_path("../x?y"), "/v1/calls/..%2Fx%3Fy/report");
        assert_eq!(tool_path("take_message"), "/v1/tools/take_message");
        assert_eq!(tool_path("a b/c"), "/v1/tools/a%20b%2Fc");
        assert_eq!(
            context_path_and_query("+15551234567", "+1 555&x", "CA1"),
            "/v1/context?to=%2B15551234567&from=%2B1+555%26x&call_sid=CA1"
        );
        assert_eq!(
            calls_path_and_query("tenant 42&x"),
            "/v1/calls?tenant_id=tenant+42%26x"
        );
    }

    #[test]
    fn memory_namespace_stays_inside_its_tenant() {
        assert_eq!(
            memory_namespace("tenant_42", "+15551234567"),
            "tenant_42/+15551234567"
        );
        assert_eq!(memory_namespace("t1", ""), "t1/anonymous");
        assert_eq!(memory_namespace("t1", "client:alice"), "t1/client_alice");
        assert_eq!(memory_namespace("t1", "../t2/x"), "t1/.._t2_x");
        assert!(
            !memory_namespace("t1", "a/b")
                .trim_start_matches("t1/")
                .contains('/')
        );
    }

    #[test]
    fn context_round_trips_and_greeting_may_be_absent() {
        let json = r#"{"tenant_id":"t1","agent_name":"Ada","voice":"marin","instructions":"Be brief.",
            "audio_mode":"pcm16","language":"en-US","memory_namespace":"t1/+1555","max_call_seconds":600}"#;
        let context: TenantContext = serde_json::from_str(json).unwrap();
        assert_eq!(context.audio_mode, AudioMode::Pcm16);
        assert_eq!(context.greeting, None);
        assert!(context.tools.is_empty());
        let again: TenantContext =
            serde_json::from_str(&serde_json::to_string(&context).unwrap()).unwrap();
        assert_eq!(again, context);
    }

    #[test]
    fn tool_output_text_keeps_strings_verbatim() {
        let text = ToolResponse {
            output: serde_json::json!("open 9-5"),
        };
        assert_eq!(text.output_text(), "open 9-5");
        let object = ToolResponse {
            output: serde_json::json!({"open": true}),
        };
        assert_eq!(object.output_text(), r#"{"open":true}"#);
    }

    #[test]
    fn namespaces_must_stay_below_their_tenant() {
        assert!(namespace_within_tenant("t1", "t1/+15551234567"));
        assert!(namespace_within_tenant("t1", "t1/vip/line-2"));
        for outside in [
            "t2/+1555",
            "t1",
            "t1/",
            "t10/x",
            "t1x/y",
            "/t1/x",
            "t1//x",
            "t1/../t2/x",
            "t1/./x",
            "t1/x/..",
            "t1/a\\b",
            "t1/a\nb",
        ] {
            assert!(!namespace_within_tenant("t1", outside), "{outside:?}");
        }
        assert!(!namespace_within_tenant("", "/x"));
    }

    #[test]
    fn a_report_from_before_provider_and_usage_still_reads() {
        let old = r#"{"call_sid":"CA1","stream_sid":"MZ1","tenant_id":"t1","agent_name":"Ada",
            "from":"+1555","to":"+1666","started_at_ms":1,"ended_at_ms":2,"end_reason":"twilio_stop",
            "context_source":"fresh","audio_seconds_in":1.0,"audio_seconds_out":0.5,"barge_ins":0,
            "dtmf_digits":0,"tool_calls":0,"latency":{
                "uplink_us":{"count":0,"p50":0,"p99":0,"max":0},
                "downlink_us":{"count":0,"p50":0,"p99":0,"max":0},
                "barge_in_us":{"count":0,"p50":0,"p99":0,"max":0}},
            "transcript":[]}"#;
        let report: CallReport = serde_json::from_str(old).unwrap();
        assert_eq!(
            (report.provider, report.model.as_deref(), report.usage),
            (Provider::OpenAi, None, None)
        );
        // And a new one carries them; `usage` is left out when there is none.
        let mut json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["provider"], "openai");
        assert!(json.get("usage").is_none());
        json["provider"] = "gemini".into();
        json["model"] = "gemini-3.8-live".into();
        json["usage"] = serde_json::json!({"input_tokens": 10, "output_tokens": 4});
        let report: CallReport = serde_json::from_value(json).unwrap();
        assert_eq!(report.provider, Provider::Gemini);
        assert_eq!(report.model.as_deref(), Some("gemini-3.8-live"));
        assert_eq!(
            report.usage,
            Some(ReportUsage {
                input_tokens: 10,
                output_tokens: 4
            })
        );
    }

    #[test]
    fn a_reports_audio_is_optional_and_round_trips() {
        let mut json = serde_json::json!({
            "call_sid":"CA1","stream_sid":"MZ1","tenant_id":null,"agent_name":"a","from":"",
            "to":"","started_at_ms":0,"ended_at_ms":0,"end_reason":"twilio_stop",
            "context_source":"fresh","audio_seconds_in":1.0,"audio_seconds_out":0.5,
            "barge_ins":0,"dtmf_digits":0,"tool_calls":0,"latency":{
                "uplink_us":{"count":0,"p50":0,"p99":0,"max":0},
                "downlink_us":{"count":0,"p50":0,"p99":0,"max":0},
                "barge_in_us":{"count":0,"p50":0,"p99":0,"max":0}},
            "transcript":[]});
        // A bridge from before the field: none, and none written back.
        let report: CallReport = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(report.audio, None);
        assert!(
            serde_json::to_value(&report)
                .unwrap()
                .get("audio")
                .is_none()
        );
        let leg = serde_json::json!({"audio_ms": 60_000, "rms_dbfs": -24.5, "peak_dbfs": -3.1,
            "clipped_samples": 12, "silence_share": 0.41, "longest_silence_ms": 5_400,
            "one_way_episodes": 1, "one_way_ms": 5_400});
        json["audio"] = serde_json::json!({"caller": leg, "agent": leg, "echo": {
            "detected": true, "delay_ms": 180, "level_db": 21.5, "correlation": 0.93}});
        let report: CallReport = serde_json::from_value(json.clone()).unwrap();
        let audio = report.audio.expect("the audio");
        assert_eq!(audio.caller.one_way_episodes, 1);
        assert_eq!(audio.echo.delay_ms, Some(180));
        assert_eq!(
            serde_json::to_value(&report).unwrap()["audio"],
            json["audio"]
        );
    }

    #[test]
    fn sources_have_their_wire_names() {
        let names: Vec<&str> = ContextSource::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            ["fresh", "cached", "stale", "fallback", "unknown_number"]
        );
    }
}
