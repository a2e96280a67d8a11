//! Twilio Media Streams messages, exactly as they appear on the wire.
//!
//! Owns the serde shapes of every inbound message (`connected`, `start`, `media`, `stop`,
//! `mark`, `dtmf`, plus a catch-all for events Twilio may add) and the allocation-free writers
//! of the three outbound ones (`media`, `mark`, `clear`), which the tests hold to serde's output.
//! Invariants: numeric-looking fields Twilio sends as strings (`sequenceNumber`, `media.chunk`,
//! `media.timestamp`) stay strings here, and turning them into numbers is the stream machine's
//! job; inbound strings borrow from the message text unless JSON escapes force a copy; outbound
//! media carries exactly `event`, `streamSid` and `media.payload`, because Twilio rejects any
//! extra or missing field (error 31951); every writer clears its output buffer first and emits
//! valid JSON whatever the stream SID or mark name contains.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::json::push_json_str;

/// One message received from Twilio on the Media Streams WebSocket.
///
/// Deserialize it with `serde_json` (its [`Deserialize`] impl reads serde_json's raw values,
/// see `Envelope`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundMessage<'a> {
    Connected(Connected<'a>),
    Start(Start<'a>),
    Media(Media<'a>),
    Stop(Stop<'a>),
    Mark(MarkEcho<'a>),
    Dtmf(Dtmf<'a>),
    /// An event this crate does not know; Twilio may add events without notice.
    Unknown,
}

/// Every inbound message's fields in one pass, without buffering: the event name, and each
/// other top-level field as its raw JSON text (borrowed, not parsed) until the event says
/// which to read. Each event then reads only its own fields, exactly as an internally tagged
/// serde enum would, but serde's tagged enums first copy the whole message into an owned
/// `Content` tree (several allocations per `media` frame); this costs none.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    sequence_number: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream_sid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    protocol: Option<&'a RawValue>,
    #[serde(borrow, default)]
    version: Option<&'a RawValue>,
    #[serde(borrow, default)]
    start: Option<&'a RawValue>,
    #[serde(borrow, default)]
    media: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stop: Option<&'a RawValue>,
    #[serde(borrow, default)]
    mark: Option<&'a RawValue>,
    #[serde(borrow, default)]
    dtmf: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    fn into_message(self) -> Result<InboundMessage<'a>, serde_json::Error> {
        /// A field the event requires.
        fn required<'a, T: Deserialize<'a>>(
            raw: Option<&'a RawValue>,
            name: &'static str,
        ) -> Result<T, serde_json::Error> {
            let raw = raw.ok_or_else(|| de::Error::missing_field(name))?;
            serde_json::from_str(raw.get())
        }
        /// A field the event may omit (or send as `null`).
        fn optional<'a, T: Deserialize<'a>>(
            raw: Option<&'a RawValue>,
        ) -> Result<Option<T>, serde_json::Error> {
            raw.map(|raw| serde_json::from_str::<Option<T>>(raw.get()))
                .transpose()
                .map(Option::flatten)
        }
        let text = |raw, name| required::<CowStr<'a>>(raw, name).map(|CowStr(text)| text);
        let optional_text =
            |raw| optional::<CowStr<'a>>(raw).map(|text| text.map(|CowStr(text)| text));
        Ok(match self.event.as_ref() {
            "connected" => InboundMessage::Connected(Connected {
                protocol: optional_text(self.protocol)?,
                version: optional_text(self.version)?,
            }),
            "start" => InboundMessage::Start(Start {
                sequence_number: optional_text(self.sequence_number)?,
                stream_sid: text(self.stream_sid, "streamSid")?,
                start: required(self.start, "start")?,
            }),
            "media" => InboundMessage::Media(Media {
                sequence_number: optional_text(self.sequence_number)?,
                stream_sid: text(self.stream_sid, "streamSid")?,
                media: required(self.media, "media")?,
            }),
            "stop" => InboundMessage::Stop(Stop {
                sequence_number: optional_text(self.sequence_number)?,
                stream_sid: text(self.stream_sid, "streamSid")?,
                stop: optional(self.stop)?,
            }),
            "mark" => InboundMessage::Mark(MarkEcho {
                sequence_number: optional_text(self.sequence_number)?,
                stream_sid: text(self.stream_sid, "streamSid")?,
                mark: required(self.mark, "mark")?,
            }),
            "dtmf" => InboundMessage::Dtmf(Dtmf {
                sequence_number: optional_text(self.sequence_number)?,
                stream_sid: text(self.stream_sid, "streamSid")?,
                dtmf: required(self.dtmf, "dtmf")?,
            }),
            _ => InboundMessage::Unknown,
        })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for InboundMessage<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Envelope::deserialize(deserializer)?
            .into_message()
            .map_err(de::Error::custom)
    }
}

/// For `Option<Cow<str>>` fields: serde's `borrow` attribute reaches a `Cow<str>` field but not
/// one inside an `Option`, which it would copy into an owned `String`.
fn borrowed_option<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    Ok(Option::<CowStr<'a>>::deserialize(deserializer)?.map(|CowStr(text)| text))
}

impl InboundMessage<'_> {
    /// The wire name of the event, for logs and errors.
    pub fn event_name(&self) -> &'static str {
        match self {
            Self::Connected(_) => "connected",
            Self::Start(_) => "start",
            Self::Media(_) => "media",
            Self::Stop(_) => "stop",
            Self::Mark(_) => "mark",
            Self::Dtmf(_) => "dtmf",
            Self::Unknown => "unknown",
        }
    }

    /// `streamSid` of the message; `connected` and unknown events carry none.
    pub fn stream_sid(&self) -> Option<&str> {
        match self {
            Self::Start(m) => Some(&m.stream_sid),
            Self::Media(m) => Some(&m.stream_sid),
            Self::Stop(m) => Some(&m.stream_sid),
            Self::Mark(m) => Some(&m.stream_sid),
            Self::Dtmf(m) => Some(&m.stream_sid),
            Self::Connected(_) | Self::Unknown => None,
        }
    }

    /// `sequenceNumber` as sent (a string); `connected` and unknown events carry none.
    pub fn sequence_number(&self) -> Option<&str> {
        match self {
            Self::Start(m) => m.sequence_number.as_deref(),
            Self::Media(m) => m.sequence_number.as_deref(),
            Self::Stop(m) => m.sequence_number.as_deref(),
            Self::Mark(m) => m.sequence_number.as_deref(),
            Self::Dtmf(m) => m.sequence_number.as_deref(),
            Self::Connected(_) | Self::Unknown => None,
        }
    }
}

/// `{"event":"connected","protocol":"Call","version":"1.0.0"}`: the first message of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Connected<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub protocol: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub version: Option<Cow<'a, str>>,
}

/// `start`: sent once, describes the stream and the call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Start<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub sequence_number: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stream_sid: Cow<'a, str>,
    #[serde(borrow)]
    pub start: StartMetadata<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartMetadata<'a> {
    #[serde(borrow, default)]
    pub account_sid: Cow<'a, str>,
    /// Twilio repeats the top-level `streamSid` here; optional so a message without it is
    /// still usable.
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub stream_sid: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub call_sid: Cow<'a, str>,
    #[serde(default)]
    pub tracks: Vec<String>,
    pub media_format: MediaFormat<'a>,
    /// `<Parameter>` values from the TwiML, in the order Twilio sent them.
    #[serde(borrow, default)]
    pub custom_parameters: CustomParameters<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat<'a> {
    #[serde(borrow)]
    pub encoding: Cow<'a, str>,
    pub sample_rate: u32,
    pub channels: u32,
}

/// `start.customParameters`: a JSON object of strings, kept as ordered pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomParameters<'a>(pub Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de: 'a, 'a> Deserialize<'de> for CustomParameters<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_option(CustomParametersVisitor(std::marker::PhantomData))
    }
}

struct CustomParametersVisitor<'a>(std::marker::PhantomData<&'a ()>);

/// A string that borrows from the input when it can.
#[derive(Deserialize)]
struct CowStr<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de: 'a, 'a> Visitor<'de> for CustomParametersVisitor<'a> {
    type Value = CustomParameters<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of string parameters")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(CustomParameters::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(CustomParameters::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        // The hint comes from the input, so it is capped rather than trusted.
        let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(32));
        while let Some((CowStr(name), CowStr(value))) = map.next_entry::<CowStr, CowStr>()? {
            pairs.push((name, value));
        }
        Ok(CustomParameters(pairs))
    }
}

/// `media`: one chunk of caller audio, base64 μ-law.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Media<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub sequence_number: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stream_sid: Cow<'a, str>,
    #[serde(borrow)]
    pub media: MediaPayload<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MediaPayload<'a> {
    /// `inbound` or `outbound`; absent on some streams.
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub track: Option<Cow<'a, str>>,
    /// Chunk counter as a decimal string.
    #[serde(borrow)]
    pub chunk: Cow<'a, str>,
    /// Milliseconds since the stream started, as a decimal string.
    #[serde(borrow)]
    pub timestamp: Cow<'a, str>,
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

/// `stop`: the stream has ended.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stop<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub sequence_number: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stream_sid: Cow<'a, str>,
    #[serde(borrow, default)]
    pub stop: Option<StopMetadata<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopMetadata<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub account_sid: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub call_sid: Option<Cow<'a, str>>,
}

/// `mark` from Twilio: the echo of a mark we sent, once the audio before it has played (or
/// been cleared).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarkEcho<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub sequence_number: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stream_sid: Cow<'a, str>,
    #[serde(borrow)]
    pub mark: MarkName<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MarkName<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
}

/// `dtmf`: a key the caller pressed (bidirectional streams only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dtmf<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub sequence_number: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stream_sid: Cow<'a, str>,
    #[serde(borrow)]
    pub dtmf: DtmfDigit<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DtmfDigit<'a> {
    /// `inbound_track` in practice.
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    pub track: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub digit: Cow<'a, str>,
}

/// Writes an outbound `media` message, base64-encoding the μ-law bytes straight into `out`.
pub fn write_media_json_from_mulaw(out: &mut String, stream_sid: &str, mulaw: &[u8]) {
    out.clear();
    out.push_str(r#"{"event":"media","streamSid":"#);
    push_json_str(out, stream_sid);
    out.push_str(r#","media":{"payload":""#);
    // The base64 alphabet needs no JSON escaping.
    BASE64.encode_string(mulaw, out);
    out.push_str("\"}}");
}

/// Writes an outbound `mark` message.
pub fn write_mark_json(out: &mut String, stream_sid: &str, name: &str) {
    out.clear();
    out.push_str(r#"{"event":"mark","streamSid":"#);
    push_json_str(out, stream_sid);
    out.push_str(r#","mark":{"name":"#);
    push_json_str(out, name);
    out.push_str("}}");
}

/// Writes an outbound `clear` message.
pub fn write_clear_json(out: &mut String, stream_sid: &str) {
    out.clear();
    out.push_str(r#"{"event":"clear","streamSid":"#);
    push_json_str(out, stream_sid);
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const INBOUND: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/twilio-media-streams/inbound.jsonl"
    ));
    const OUTBOUND: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/twilio-media-streams/outbound.jsonl"
    ));

    fn fixture_lines(text: &str) -> impl Iterator<Item = &str> {
        text.lines().filter(|line| !line.trim().is_empty())
    }

    fn outbound_line(event: &str) -> Value {
        fixture_lines(OUTBOUND)
            .map(|line| serde_json::from_str::<Value>(line).expect("fixture is JSON"))
            .find(|value| value["event"] == event)
            .expect("fixture has the event")
    }

    #[test]
    fn every_inbound_fixture_line_parses_to_its_event() {
        let names: Vec<&str> = fixture_lines(INBOUND)
            .map(|line| {
                let message: InboundMessage = serde_json::from_str(line).expect(line);
                assert_ne!(message, InboundMessage::Unknown, "{line}");
                message.event_name()
            })
            .collect();
        assert_eq!(
            names,
            [
                "connected",
                "start",
                "media",
                "media",
                "dtmf",
                "mark",
                "stop"
            ]
        );
    }

    #[test]
    fn inbound_fixture_fields_are_read_and_borrowed() {
        let lines: Vec<&str> = fixture_lines(INBOUND).collect();
        let InboundMessage::Start(start) = serde_json::from_str(lines[1]).expect("start") else {
            panic!("not a start");
        };
        assert_eq!(start.stream_sid, "MZ00000000000000000000000000000001");
        assert!(matches!(start.stream_sid, Cow::Borrowed(_)));
        assert_eq!(start.sequence_number.as_deref(), Some("1"));
        assert_eq!(start.start.call_sid, "CA00000000000000000000000000000001");
        assert_eq!(start.start.tracks, ["inbound"]);
        assert_eq!(start.start.media_format.encoding, "audio/x-mulaw");
        assert_eq!(start.start.media_format.sample_rate, 8000);
        assert_eq!(start.start.media_format.channels, 1);
        let params: Vec<(&str, &str)> = start
            .start
            .custom_parameters
            .0
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            .collect();
        assert_eq!(params, [("To", "+18005551212"), ("From", "+14158675309")]);

        let InboundMessage::Media(media) = serde_json::from_str(lines[2]).expect("media") else {
            panic!("not a media");
        };
        assert_eq!(media.media.chunk, "1");
        assert_eq!(media.media.timestamp, "5");
        assert_eq!(media.media.track.as_deref(), Some("inbound"));
        assert!(matches!(media.media.payload, Cow::Borrowed(_)));
        // Optional strings borrow too (serde alone would copy them).
        assert!(matches!(media.media.track, Some(Cow::Borrowed(_))));
        assert!(matches!(media.sequence_number, Some(Cow::Borrowed(_))));
        assert_eq!(
            BASE64
                .decode(media.media.payload.as_bytes())
                .expect("b64")
                .len(),
            160
        );
    }

    #[test]
    fn escaped_slash_in_payload_still_parses() {
        let line = r#"{"event":"media","streamSid":"MZ1","sequenceNumber":"2","media":{"chunk":"1","timestamp":"5","payload":"\/\/8="}}"#;
        let InboundMessage::Media(media) = serde_json::from_str(line).expect("parses") else {
            panic!("not a media");
        };
        assert_eq!(media.media.payload, "//8=");
        assert_eq!(media.media.track, None);
    }

    #[test]
    fn unknown_events_parse_as_unknown() {
        let message: InboundMessage =
            serde_json::from_str(r#"{"event":"transcription","streamSid":"MZ1","x":{"y":1}}"#)
                .expect("parses");
        assert_eq!(message, InboundMessage::Unknown);
    }

    #[test]
    fn each_event_reads_only_its_own_fields() {
        // A field of another event's shape, or of no known shape, does not spoil a message.
        let media = r#"{"event":"media","streamSid":"MZ1","mark":7,"start":"x","media":{"chunk":"1","timestamp":"5","payload":"AA=="}}"#;
        assert!(matches!(
            serde_json::from_str::<InboundMessage>(media),
            Ok(InboundMessage::Media(_))
        ));
        let novel =
            r#"{"event":"transcription","sequenceNumber":3,"media":[],"streamSid":{"a":1}}"#;
        assert_eq!(
            serde_json::from_str::<InboundMessage>(novel).expect("parses"),
            InboundMessage::Unknown
        );
        // Escaped strings still parse, as owned copies.
        let escaped = r#"{"event":"stop","streamSid":"MZ\u0031","sequenceNumber":"\u0039"}"#;
        let InboundMessage::Stop(stop) = serde_json::from_str(escaped).expect("parses") else {
            panic!("not a stop");
        };
        assert_eq!(
            (stop.stream_sid.as_ref(), stop.sequence_number.as_deref()),
            ("MZ1", Some("9"))
        );
    }

    #[test]
    fn lenient_on_omitted_optional_fields() {
        let start = r#"{"event":"start","streamSid":"MZ1","start":{"callSid":"CA1","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":null}}"#;
        let InboundMessage::Start(start) = serde_json::from_str(start).expect("parses") else {
            panic!("not a start");
        };
        assert!(start.start.custom_parameters.0.is_empty());
        assert!(start.start.tracks.is_empty());
        assert_eq!(start.sequence_number, None);

        let stop = r#"{"event":"stop","streamSid":"MZ1","sequenceNumber":"9"}"#;
        assert!(matches!(
            serde_json::from_str::<InboundMessage>(stop),
            Ok(InboundMessage::Stop(_))
        ));
    }

    #[test]
    fn strict_on_fields_the_bridge_needs() {
        let cases = [
            // media without streamSid
            r#"{"event":"media","sequenceNumber":"2","media":{"chunk":"1","timestamp":"5","payload":"AA=="}}"#,
            // media without payload
            r#"{"event":"media","streamSid":"MZ1","media":{"chunk":"1","timestamp":"5"}}"#,
            // sequenceNumber as a number
            r#"{"event":"media","streamSid":"MZ1","sequenceNumber":2,"media":{"chunk":"1","timestamp":"5","payload":"AA=="}}"#,
            // start without mediaFormat
            r#"{"event":"start","streamSid":"MZ1","start":{"callSid":"CA1"}}"#,
            // sampleRate as a string
            r#"{"event":"start","streamSid":"MZ1","start":{"callSid":"CA1","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":"8000","channels":1}}}"#,
            // custom parameter that is not a string
            r#"{"event":"start","streamSid":"MZ1","start":{"callSid":"CA1","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"a":1}}}"#,
            // mark without a name
            r#"{"event":"mark","streamSid":"MZ1","mark":{}}"#,
            // no event at all
            r#"{"streamSid":"MZ1"}"#,
        ];
        for case in cases {
            assert!(
                serde_json::from_str::<InboundMessage>(case).is_err(),
                "accepted: {case}"
            );
        }
    }

    /// A JSON string as serde_json writes it: the writers must escape exactly like this.
    fn serde_str(value: &str) -> String {
        serde_json::to_string(value).expect("a string serializes")
    }

    #[test]
    fn writers_match_the_outbound_fixture_and_serde() {
        let sid = "MZ00000000000000000000000000000001";
        let mut out = String::from("stale contents the writer must clear");

        let media = outbound_line("media");
        let payload = media["media"]["payload"].as_str().expect("payload");
        let mulaw = BASE64.decode(payload).expect("b64");
        write_media_json_from_mulaw(&mut out, sid, &mulaw);
        assert_eq!(serde_json::from_str::<Value>(&out).expect("json"), media);
        assert_eq!(
            out,
            format!(
                r#"{{"event":"media","streamSid":{},"media":{{"payload":{}}}}}"#,
                serde_str(sid),
                serde_str(payload)
            )
        );

        let mark = outbound_line("mark");
        let name = mark["mark"]["name"].as_str().expect("name");
        write_mark_json(&mut out, sid, name);
        assert_eq!(serde_json::from_str::<Value>(&out).expect("json"), mark);
        assert_eq!(
            out,
            format!(
                r#"{{"event":"mark","streamSid":{},"mark":{{"name":{}}}}}"#,
                serde_str(sid),
                serde_str(name)
            )
        );

        write_clear_json(&mut out, sid);
        assert_eq!(
            serde_json::from_str::<Value>(&out).expect("json"),
            outbound_line("clear")
        );
        assert_eq!(
            out,
            format!(r#"{{"event":"clear","streamSid":{}}}"#, serde_str(sid))
        );
    }

    #[test]
    fn outbound_media_has_exactly_the_required_fields() {
        let mut out = String::new();
        write_media_json_from_mulaw(&mut out, "MZ1", &[0xff; 160]);
        let value: Value = serde_json::from_str(&out).expect("json");
        let top: Vec<&String> = value.as_object().expect("object").keys().collect();
        assert_eq!(top.len(), 3);
        assert_eq!(
            value["media"]
                .as_object()
                .expect("media")
                .keys()
                .collect::<Vec<_>>(),
            ["payload"]
        );
        assert_eq!(value["media"]["payload"].as_str().map(str::len), Some(216));
    }

    #[test]
    fn quotes_backslashes_and_control_characters_are_escaped_like_serde() {
        let awkward_sid = "MZ\"1\\2/é\u{2028}";
        let awkward_name: String = (0u8..0x20)
            .map(char::from)
            .chain("\"quoted\" \\back\\ ünïcode \u{7f}".chars())
            .collect();
        let mut out = String::new();

        write_mark_json(&mut out, awkward_sid, &awkward_name);
        assert_eq!(
            out,
            format!(
                r#"{{"event":"mark","streamSid":{},"mark":{{"name":{}}}}}"#,
                serde_str(awkward_sid),
                serde_str(&awkward_name)
            )
        );
        let value: Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["streamSid"], awkward_sid);
        assert_eq!(value["mark"]["name"], awkward_name.as_str());

        write_clear_json(&mut out, awkward_sid);
        let value: Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["streamSid"], awkward_sid);

        write_media_json_from_mulaw(&mut out, awkward_sid, &[1, 2, 3]);
        let value: Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["streamSid"], awkward_sid);
        assert_eq!(value["media"]["payload"], "AQID");
    }

    #[test]
    fn writers_reuse_the_buffer_without_growing_it() {
        let mut out = String::new();
        write_media_json_from_mulaw(&mut out, "MZ1", &[0xff; 160]);
        let capacity = out.capacity();
        let pointer = out.as_ptr();
        for _ in 0..10 {
            write_media_json_from_mulaw(&mut out, "MZ1", &[0xff; 160]);
        }
        assert_eq!(out.capacity(), capacity);
        assert_eq!(out.as_ptr(), pointer);
    }
}
