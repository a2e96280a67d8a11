use serde_json::{Value, json};

use super::*;
use crate::upstream::VadSettings;

fn receptionist() -> SessionSettings {
    SessionSettings {
        provider: Provider::Gemini,
        instructions: "You answer the phone for Bistro Luna.".into(),
        voice: "Kore".into(),
        greeting: Some("Hello, Bistro Luna.".into()),
        tools: vec![
            json!({"type": "function", "name": "take_message", "description": "Leave a message",
                   "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                                  "required": ["text"], "additionalProperties": false}}),
            json!({"type": "web_search"}),
        ],
        ..SessionSettings::default()
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("valid JSON")
}

fn events<'a>(protocol: &mut GeminiLive, text: &'a str) -> Vec<UpstreamEvent<'a>> {
    protocol
        .on_message(text, &mut Vec::new())
        .expect("parses")
        .into_vec()
}

fn audio(data: &str) -> String {
    json!({"serverContent": {"modelTurn": {"parts": [
        {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": data}}]}}})
    .to_string()
}

#[test]
fn setup_configures_everything_the_call_needs() {
    let protocol = GeminiLive::new(receptionist());
    let setup = parse(&protocol.setup());
    let setup = &setup["setup"];
    assert_eq!(setup["model"], "models/gemini-3.8-live");
    assert_eq!(
        setup["generationConfig"]["responseModalities"],
        json!(["AUDIO"])
    );
    assert_eq!(
        setup["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"],
        "Kore"
    );
    assert_eq!(
        setup["systemInstruction"],
        json!({"parts": [{"text": "You answer the phone for Bistro Luna."}]})
    );
    let declarations = &setup["tools"][0]["functionDeclarations"];
    assert_eq!(declarations.as_array().unwrap().len(), 1, "only functions");
    assert_eq!(declarations[0]["name"], "take_message");
    assert_eq!(declarations[0]["description"], "Leave a message");
    assert_eq!(
        declarations[0]["parametersJsonSchema"]["required"],
        json!(["text"])
    );
    let detection = &setup["realtimeInputConfig"]["automaticActivityDetection"];
    assert_eq!(detection["disabled"], false);
    assert_eq!(detection["prefixPaddingMs"], 300);
    assert_eq!(detection["silenceDurationMs"], 500);
    assert_eq!(
        setup["realtimeInputConfig"]["activityHandling"],
        "START_OF_ACTIVITY_INTERRUPTS"
    );
    assert_eq!(setup["inputAudioTranscription"], json!({}));
    assert_eq!(setup["outputAudioTranscription"], json!({}));
    assert_eq!(
        setup["sessionResumption"],
        json!({}),
        "a new session asks for handles"
    );
    assert_eq!(
        setup["contextWindowCompression"],
        json!({"slidingWindow": {}})
    );
    assert_eq!(
        parse(&protocol.setup()).as_object().unwrap().len(),
        1,
        "one top-level field per message"
    );
}

#[test]
fn setup_carries_a_tenants_model_and_a_resumption_handle_and_omits_what_is_off() {
    let protocol = GeminiLive::new(SessionSettings {
        provider: Provider::Gemini,
        model: Some("gemini-live-2.5-flash-native-audio".into()),
        resumption_handle: Some("h-1".into()),
        vad: VadSettings {
            interrupt_response: false,
            ..VadSettings::default()
        },
        ..SessionSettings::default()
    });
    let setup = parse(&protocol.setup());
    let setup = &setup["setup"];
    assert_eq!(setup["model"], "models/gemini-live-2.5-flash-native-audio");
    assert_eq!(setup["sessionResumption"], json!({"handle": "h-1"}));
    assert_eq!(
        setup["realtimeInputConfig"]["activityHandling"],
        "NO_INTERRUPTION"
    );
    assert!(setup.get("tools").is_none() && setup.get("systemInstruction").is_none());
    assert!(protocol.resumes_context());
    let named = GeminiLive::new(SessionSettings {
        provider: Provider::Gemini,
        model: Some("models/x".into()),
        ..SessionSettings::default()
    });
    assert_eq!(parse(&named.setup())["setup"]["model"], "models/x");
}

#[test]
fn the_greeting_is_asked_for_once_after_setup_complete() {
    let mut protocol = GeminiLive::new(receptionist());
    let mut out = Vec::new();
    protocol.on_open(&mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].starts_with(r#"{"setup":"#));
    out.clear();
    let ready = protocol
        .on_message(r#"{"setupComplete":{}}"#, &mut out)
        .unwrap();
    assert_eq!(ready.into_vec(), vec![UpstreamEvent::SessionReady]);
    assert_eq!(out.len(), 1);
    let greeting = parse(&out[0]);
    assert_eq!(greeting["clientContent"]["turnComplete"], true);
    assert_eq!(greeting["clientContent"]["turns"][0]["role"], "user");
    assert!(
        greeting["clientContent"]["turns"][0]["parts"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with("Hello, Bistro Luna.")
    );
    out.clear();
    protocol
        .on_message(r#"{"setupComplete":{}}"#, &mut out)
        .unwrap();
    assert!(out.is_empty(), "greeted once");
}

#[test]
fn a_model_turn_is_named_and_ends_with_its_transcript() {
    let mut protocol = GeminiLive::new(receptionist());
    let first = audio("AAAA");
    assert_eq!(
        events(&mut protocol, &first),
        vec![
            UpstreamEvent::ResponseCreated {
                response_id: "gemini-0-turn-1".into()
            },
            UpstreamEvent::AudioDelta {
                response_id: "".into(),
                item_id: "".into(),
                audio_b64: "AAAA".into(),
            },
        ]
    );
    let more = audio("BBBB");
    let parsed = events(&mut protocol, &more);
    assert_eq!(parsed.len(), 1, "the turn is open: audio only");
    assert!(
        matches!(&parsed[0], UpstreamEvent::AudioDelta { audio_b64: Cow::Borrowed(b), .. } if *b == "BBBB"),
        "audio borrows from the message: {parsed:?}"
    );
    let words = r#"{"serverContent":{"outputTranscription":{"text":"Hello, "}}}"#;
    assert_eq!(
        events(&mut protocol, words),
        vec![UpstreamEvent::OutputTranscriptDelta {
            item_id: "gemini-0-turn-1".into(),
            delta: "Hello, ".into()
        }]
    );
    let more_words = r#"{"serverContent":{"outputTranscription":{"text":"Bistro Luna."}}}"#;
    events(&mut protocol, more_words);
    assert!(
        events(
            &mut protocol,
            r#"{"serverContent":{"generationComplete":true}}"#
        )
        .is_empty()
    );
    assert_eq!(
        events(
            &mut protocol,
            r#"{"serverContent":{"turnComplete":true},"usageMetadata":{"promptTokenCount":120,"responseTokenCount":40,"totalTokenCount":160}}"#
        ),
        vec![
            UpstreamEvent::OutputTranscript {
                item_id: "gemini-0-turn-1".into(),
                text: "Hello, Bistro Luna.".into()
            },
            UpstreamEvent::ResponseDone {
                response_id: "gemini-0-turn-1".into(),
                status: "completed".into()
            },
            UpstreamEvent::Usage {
                input_tokens: 120,
                output_tokens: 40
            },
        ]
    );
    let next = audio("CCCC");
    assert!(matches!(
        &events(&mut protocol, &next)[0],
        UpstreamEvent::ResponseCreated { response_id } if response_id == "gemini-0-turn-2"
    ));
}

#[test]
fn caller_speech_is_placed_at_its_first_transcript_and_ends_when_the_model_answers() {
    let mut protocol = GeminiLive::new(receptionist());
    let heard = r#"{"serverContent":{"inputTranscription":{"text":"I'd like"}}}"#;
    assert_eq!(
        events(&mut protocol, heard),
        vec![UpstreamEvent::SpeechStarted {
            item_id: "gemini-0-caller-1".into(),
            audio_start_ms: None
        }]
    );
    let more = r#"{"serverContent":{"inputTranscription":{"text":" a table."}}}"#;
    assert!(events(&mut protocol, more).is_empty(), "one start per turn");
    let answer = audio("AAAA");
    let answered = events(&mut protocol, &answer);
    assert_eq!(
        answered[..3],
        [
            UpstreamEvent::SpeechStopped { audio_end_ms: None },
            UpstreamEvent::InputTranscript {
                item_id: "gemini-0-caller-1".into(),
                text: "I'd like a table.".into()
            },
            UpstreamEvent::ResponseCreated {
                response_id: "gemini-0-turn-1".into()
            },
        ]
    );
    // Speech over a turn still being generated is the server's to judge.
    assert!(events(&mut protocol, heard).is_empty());
}

#[test]
fn an_interruption_barges_in_and_cancels_the_turn() {
    let mut protocol = GeminiLive::new(receptionist());
    let first = audio("AAAA");
    events(&mut protocol, &first);
    events(
        &mut protocol,
        r#"{"serverContent":{"outputTranscription":{"text":"We open at"}}}"#,
    );
    assert_eq!(
        events(&mut protocol, r#"{"serverContent":{"interrupted":true}}"#),
        vec![
            UpstreamEvent::SpeechStarted {
                item_id: "gemini-0-caller-1".into(),
                audio_start_ms: None
            },
            UpstreamEvent::OutputTranscript {
                item_id: "gemini-0-turn-1".into(),
                text: "We open at".into()
            },
            UpstreamEvent::ResponseDone {
                response_id: "gemini-0-turn-1".into(),
                status: "cancelled".into()
            },
        ]
    );
    assert!(
        events(&mut protocol, r#"{"serverContent":{"interrupted":true}}"#).is_empty(),
        "nothing left to interrupt"
    );
    // A turn the model ends without answering still gives the caller's transcript.
    events(
        &mut protocol,
        r#"{"serverContent":{"inputTranscription":{"text":"wait"}}}"#,
    );
    assert_eq!(
        events(&mut protocol, r#"{"serverContent":{"turnComplete":true}}"#),
        vec![
            UpstreamEvent::SpeechStopped { audio_end_ms: None },
            UpstreamEvent::InputTranscript {
                item_id: "gemini-0-caller-1".into(),
                text: "wait".into()
            },
        ]
    );
}

#[test]
fn tool_calls_their_answers_and_cancellations() {
    let mut protocol = GeminiLive::new(receptionist());
    let call = r#"{"toolCall":{"functionCalls":[{"id":"fc-1","name":"take_message","args":{"text":"call me back"}},{"id":"fc-2","name":"take_message"}]}}"#;
    assert_eq!(
        events(&mut protocol, call),
        vec![
            UpstreamEvent::FunctionCall {
                call_id: "fc-1".into(),
                name: "take_message".into(),
                arguments: r#"{"text":"call me back"}"#.into()
            },
            UpstreamEvent::FunctionCall {
                call_id: "fc-2".into(),
                name: "take_message".into(),
                arguments: "{}".into()
            },
        ]
    );
    assert!(protocol.answers_tool_output_itself());
    assert_eq!(
        parse(&protocol.function_output("fc-1", r#"{"saved":true}"#)),
        json!({"toolResponse": {"functionResponses": [
            {"id": "fc-1", "name": "take_message", "response": {"saved": true}}]}})
    );
    assert_eq!(
        parse(&protocol.function_output("fc-2", "plain text")),
        json!({"toolResponse": {"functionResponses": [
            {"id": "fc-2", "name": "take_message", "response": {"output": "plain text"}}]}})
    );
    assert_eq!(
        events(
            &mut protocol,
            r#"{"toolCallCancellation":{"ids":["fc-2"]}}"#
        ),
        vec![UpstreamEvent::FunctionCallCancelled {
            call_id: "fc-2".into()
        }]
    );
}

#[test]
fn go_away_and_resumption_handles() {
    let mut protocol = GeminiLive::new(receptionist());
    assert_eq!(
        events(&mut protocol, r#"{"goAway":{"timeLeft":"10s"}}"#),
        vec![UpstreamEvent::SessionEnding]
    );
    assert_eq!(protocol.resumption_handle(), None);
    events(
        &mut protocol,
        r#"{"sessionResumptionUpdate":{"newHandle":"h-7","resumable":true}}"#,
    );
    assert_eq!(protocol.resumption_handle(), Some("h-7"));
    events(
        &mut protocol,
        r#"{"sessionResumptionUpdate":{"resumable":false}}"#,
    );
    assert_eq!(
        protocol.resumption_handle(),
        None,
        "not resumable now: the successor is told the conversation"
    );
    let huge = format!(
        r#"{{"sessionResumptionUpdate":{{"newHandle":"{}","resumable":true}}}}"#,
        "h".repeat(MAX_HANDLE_BYTES + 1)
    );
    events(&mut protocol, &huge);
    assert_eq!(
        protocol.resumption_handle(),
        None,
        "an oversized handle is not kept"
    );
}

#[test]
fn client_messages_have_the_live_api_shape() {
    let protocol = GeminiLive::new(receptionist());
    let mut append = String::with_capacity(128);
    protocol.write_audio_append("AAEC", &mut append);
    assert_eq!(
        append,
        r#"{"realtimeInput":{"audio":{"data":"AAEC","mimeType":"audio/pcm;rate=16000"}}}"#
    );
    let capacity = append.capacity();
    protocol.write_audio_append("AAEC", &mut append);
    assert_eq!(append.capacity(), capacity, "the buffer is reused");
    assert_eq!(protocol.truncate("gemini-0-turn-1", 400), None);
    assert_eq!(protocol.delete_item("gemini-0-turn-1"), None);
    assert_eq!(protocol.cancel_response(), None);
    assert_eq!(
        parse(&protocol.user_text("The caller pressed 5.")),
        json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "The caller pressed 5."}]}],
               "turnComplete": false}})
    );
    assert_eq!(
        parse(&protocol.create_response()),
        json!({"clientContent": {"turnComplete": true}})
    );
    assert_eq!(
        parse(&protocol.replay_item(&ReplayItem::AssistantText("We open at nine.".into()))),
        json!({"clientContent": {"turns": [{"role": "model", "parts": [{"text": "We open at nine."}]}],
               "turnComplete": false}})
    );
    let call = parse(&protocol.replay_item(&ReplayItem::FunctionCall {
        call_id: "fc-1",
        name: "take_message",
        arguments: "{}",
    }));
    assert_eq!(call["clientContent"]["turns"][0]["role"], "model");
    assert_eq!(
        protocol.audio(),
        ModelAudio {
            input: ModelAudioFormat::Pcm16 { rate: 16_000 },
            output: ModelAudioFormat::Pcm16 { rate: 24_000 },
        }
    );
}

#[test]
fn garbage_and_wrong_audio_are_errors_never_panics() {
    let mut protocol = GeminiLive::new(receptionist());
    for garbage in [
        "",
        "{",
        "[]",
        "null",
        r#"{"serverContent":{"modelTurn":{"parts":[{"inlineData":{"data":"AAAA"}}]}}}"#,
        r#"{"serverContent":{"interrupted":"yes"}}"#,
        r#"{"toolCall":{"functionCalls":[{"name":"x"}]}}"#,
    ] {
        assert!(
            protocol.on_message(garbage, &mut Vec::new()).is_err(),
            "{garbage:?}"
        );
    }
    let wrong_rate = json!({"serverContent": {"modelTurn": {"parts": [
        {"inlineData": {"mimeType": "audio/pcm;rate=16000", "data": "AAAA"}}]}}})
    .to_string();
    assert!(matches!(
        protocol.on_message(&wrong_rate, &mut Vec::new()),
        Err(UpstreamError::UnexpectedAudioFormat)
    ));
    let long_id = format!(
        r#"{{"toolCall":{{"functionCalls":[{{"id":"{}","name":"x"}}]}}}}"#,
        "i".repeat(MAX_ID_BYTES + 1)
    );
    assert!(matches!(
        protocol.on_message(&long_id, &mut Vec::new()),
        Err(UpstreamError::IdTooLong(_))
    ));
    assert!(
        events(&mut protocol, r#"{"somethingNew":{}}"#).is_empty(),
        "unknown messages are ignored"
    );
    assert!(is_output_audio("audio/pcm"));
    assert!(is_output_audio("audio/pcm; rate=24000"));
    assert!(!is_output_audio("audio/wav"));
}

#[test]
fn a_successors_turns_have_names_of_their_own() {
    // The call's conversation and playback outlive a session: a successor's first turn must
    // not be taken for its predecessor's.
    let first_audio = audio("AAAA");
    let mut first = GeminiLive::new(receptionist());
    let mut successor = GeminiLive::new(SessionSettings {
        generation: 1,
        ..receptionist()
    });
    let named = |events: Vec<UpstreamEvent<'_>>| match &events[0] {
        UpstreamEvent::ResponseCreated { response_id } => response_id.to_string(),
        other => panic!("{other:?}"),
    };
    let a = named(events(&mut first, &first_audio));
    let b = named(events(&mut successor, &first_audio));
    assert_ne!(a, b);
    let successor_session = crate::session::model::ModelSession::new(receptionist(), false);
    let mut next = successor_session.successor();
    let mut out = Vec::new();
    next.open(&mut out);
    assert_eq!(parse(&out[0])["setup"]["model"], "models/gemini-3.8-live");
}
