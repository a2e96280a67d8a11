//! The model's server events (`upstream::openai`) and the client messages written from
//! strings the model or a caller controls.

use proptest::prelude::*;
use voxrelay::upstream::{OpenAiRealtime, SessionSettings, UpstreamEvent};

use crate::config;
use crate::grammar;

/// Ids of this size are always accepted; the parser may refuse longer ones (the call keeps
/// dozens of ids, so a model's 64 KiB "id" is not worth remembering).
const ID_BYTES_ALWAYS_ACCEPTED: usize = 128;

fn protocol(greeting: Option<&str>) -> OpenAiRealtime {
    OpenAiRealtime::new(SessionSettings {
        greeting: greeting.map(str::to_owned),
        instructions: "Be brief.".to_owned(),
        ..SessionSettings::default()
    })
}

fn parse_json(text: &str) -> Result<serde_json::Value, TestCaseError> {
    serde_json::from_str(text)
        .map_err(|error| TestCaseError::fail(format!("invalid JSON {text:?}: {error}")))
}

proptest! {
    #![proptest_config(config(384))]

    /// Any sequence of server texts (generated events with hostile fields, edited fixture
    /// lines, arbitrary strings): parsing never panics; a follow-up message is only ever the
    /// greeting's `response.create`, sent once, and only in answer to a `session.updated`
    /// that parsed; every follow-up is valid JSON.
    #[test]
    fn server_events_never_panic_and_the_greeting_is_sent_once(
        texts in prop::collection::vec(grammar::model_text(), 1..40),
        greeting in prop::option::of(grammar::hostile_string()),
    ) {
        let mut protocol = protocol(greeting.as_deref());
        let mut follow_ups = Vec::new();
        let mut total_follow_ups = 0usize;
        let mut session_updated_seen = false;
        for text in &texts {
            follow_ups.clear();
            let result = protocol.parse_event(text, &mut follow_ups);
            let first_session_updated =
                matches!(result, Ok(UpstreamEvent::SessionReady)) && !session_updated_seen;
            if matches!(result, Ok(UpstreamEvent::SessionReady)) {
                session_updated_seen = true;
            }
            if first_session_updated && greeting.is_some() {
                prop_assert_eq!(follow_ups.len(), 1);
            } else {
                prop_assert!(follow_ups.is_empty(), "unexpected follow-up after {:?}", text);
            }
            for message in &follow_ups {
                let value = parse_json(message)?;
                prop_assert_eq!(value["type"].as_str(), Some("response.create"));
                let instructions = value["response"]["instructions"].as_str().unwrap_or("");
                prop_assert!(instructions.ends_with(greeting.as_deref().unwrap_or("")));
            }
            total_follow_ups += follow_ups.len();
        }
        prop_assert!(total_follow_ups <= 1);
    }

    /// Well-formed events carry the model's strings through exactly, escapes and all. Ids of
    /// up to 128 bytes (real ones are about 30) always do; a longer id may be refused, and
    /// if it is accepted it is carried exactly too.
    #[test]
    fn server_event_strings_round_trip(
        response_id in grammar::hostile_string(),
        item_id in grammar::hostile_string(),
        delta in grammar::hostile_string(),
        transcript in grammar::hostile_string(),
        audio_start_ms in any::<u64>(),
    ) {
        let mut protocol = protocol(None);
        let mut out = Vec::new();
        let may_refuse = response_id.len() > ID_BYTES_ALWAYS_ACCEPTED
            || item_id.len() > ID_BYTES_ALWAYS_ACCEPTED;
        let text = serde_json::json!({
            "type": "response.output_audio.delta", "response_id": response_id,
            "item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta,
        })
        .to_string();
        match protocol.parse_event(&text, &mut out) {
            Ok(UpstreamEvent::AudioDelta { response_id: r, item_id: i, audio_b64 }) => {
                prop_assert_eq!(&*r, response_id.as_str());
                prop_assert_eq!(&*i, item_id.as_str());
                prop_assert_eq!(&*audio_b64, delta.as_str());
            }
            Err(_) if may_refuse => {}
            other => prop_assert!(false, "{:?}", other),
        }
        let may_refuse = item_id.len() > ID_BYTES_ALWAYS_ACCEPTED;
        let text = serde_json::json!({
            "type": "input_audio_buffer.speech_started", "item_id": item_id,
            "audio_start_ms": audio_start_ms,
        })
        .to_string();
        match protocol.parse_event(&text, &mut out) {
            Ok(event) => prop_assert_eq!(
                event,
                UpstreamEvent::SpeechStarted {
                    item_id: item_id.as_str().into(),
                    // The speech begins after the server's prefix padding (300 ms by default).
                    audio_start_ms: Some(audio_start_ms.saturating_add(300)),
                }
            ),
            Err(error) => prop_assert!(may_refuse, "{}", error),
        }
        let text = serde_json::json!({
            "type": "response.output_audio_transcript.done", "item_id": item_id,
            "transcript": transcript,
        })
        .to_string();
        match protocol.parse_event(&text, &mut out) {
            Ok(event) => prop_assert_eq!(
                event,
                UpstreamEvent::OutputTranscript {
                    item_id: item_id.as_str().into(),
                    text: transcript.as_str().into(),
                }
            ),
            Err(error) => prop_assert!(may_refuse, "{}", error),
        }
        prop_assert!(out.is_empty());
    }

    /// Every client message built from peer-controlled text (caller audio, the model's item
    /// ids, DTMF text, tool output) is one valid JSON object carrying that text exactly.
    #[test]
    fn client_messages_are_valid_json_for_any_strings(
        audio in grammar::hostile_string(),
        item_id in grammar::hostile_string(),
        text in grammar::hostile_string(),
        output in grammar::hostile_string(),
        audio_end_ms in any::<u32>(),
    ) {
        let protocol = protocol(None);
        let mut buf = String::from("stale");
        protocol.write_audio_append(&audio, &mut buf);
        let value = parse_json(&buf)?;
        prop_assert_eq!(value["type"].as_str(), Some("input_audio_buffer.append"));
        prop_assert_eq!(value["audio"].as_str(), Some(audio.as_str()));

        let value = parse_json(&protocol.truncate(&item_id, audio_end_ms))?;
        prop_assert_eq!(value["item_id"].as_str(), Some(item_id.as_str()));
        prop_assert_eq!(value["audio_end_ms"].as_u64(), Some(u64::from(audio_end_ms)));

        let value = parse_json(&protocol.delete_item(&item_id))?;
        prop_assert_eq!(value["item_id"].as_str(), Some(item_id.as_str()));

        let value = parse_json(&protocol.user_text(&text))?;
        prop_assert_eq!(value["item"]["content"][0]["text"].as_str(), Some(text.as_str()));

        let value = parse_json(&protocol.function_output(&item_id, &output))?;
        prop_assert_eq!(value["item"]["call_id"].as_str(), Some(item_id.as_str()));
        prop_assert_eq!(value["item"]["output"].as_str(), Some(output.as_str()));
    }
}

/// Nesting far beyond any real event is an error, never a stack overflow.
#[test]
fn deeply_nested_server_events_are_refused_without_overflowing_the_stack() {
    let mut protocol = protocol(Some("hello"));
    let mut out = Vec::new();
    for depth in [127, 128, 129, 1_000, 100_000] {
        for objects in [false, true] {
            let nested = grammar::deeply_nested(depth, objects);
            for text in [
                nested.clone(),
                format!(r#"{{"type":"response.done","response":{nested}}}"#),
                format!(r#"{{"type":"rate_limits.updated","rate_limits":{nested}}}"#),
                format!(r#"{{"type":"session.updated","session":{nested}}}"#),
            ] {
                let _ = protocol.parse_event(&text, &mut out);
            }
        }
    }
}
