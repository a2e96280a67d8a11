//! The model's server messages (Gemini Live) and the client messages built from text the
//! model or a caller controls. The input is one server message per line, invalid UTF-8
//! replaced. Checks: parsing never panics; the greeting is the only follow-up, sent once, after
//! the first `setupComplete` that parsed; every event's ids are within the bound; a kept
//! resumption handle is within its bound; every message written with a line's text in it
//! (audio append, user text, tool output, replayed turns) is valid JSON carrying it exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxrelay::Provider;
use voxrelay::session::conversation::ReplayItem;
use voxrelay::upstream::openai::MAX_ID_BYTES;
use voxrelay::upstream::{GeminiLive, RealtimeProtocol, SessionSettings, UpstreamEvent};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut protocol = GeminiLive::new(SessionSettings {
        provider: Provider::Gemini,
        greeting: Some("Hello".to_owned()),
        ..SessionSettings::default()
    });
    let mut follow_ups = Vec::new();
    let mut greeted = false;
    for line in text.split('\n') {
        follow_ups.clear();
        let result = protocol.on_message(line, &mut follow_ups);
        let ready = matches!(&result, Ok(events) if events.contains(&UpstreamEvent::SessionReady));
        if ready && !greeted {
            greeted = true;
            assert_eq!(follow_ups.len(), 1);
            let value: serde_json::Value = serde_json::from_str(&follow_ups[0]).expect("JSON");
            assert_eq!(value["clientContent"]["turnComplete"], true);
        } else {
            assert!(follow_ups.is_empty());
        }
        if let Ok(events) = &result {
            for event in events {
                if let UpstreamEvent::FunctionCall { call_id, name, .. } = event {
                    assert!(call_id.len() <= MAX_ID_BYTES && name.len() <= MAX_ID_BYTES);
                }
            }
        }
        assert!(protocol.resumption_handle().is_none_or(|h| h.len() <= 2048));

        let mut append = String::new();
        protocol.write_audio_append(line, &mut append);
        let value: serde_json::Value = serde_json::from_str(&append).expect("append is JSON");
        assert_eq!(value["realtimeInput"]["audio"]["data"].as_str(), Some(line));
        let value: serde_json::Value =
            serde_json::from_str(&protocol.user_text(line)).expect("user text is JSON");
        assert_eq!(
            value["clientContent"]["turns"][0]["parts"][0]["text"].as_str(),
            Some(line)
        );
        let value: serde_json::Value =
            serde_json::from_str(&protocol.function_output(line, line)).expect("tool output");
        assert_eq!(
            value["toolResponse"]["functionResponses"][0]["id"].as_str(),
            Some(line)
        );
        let replayed = protocol.replay_item(&ReplayItem::AssistantText(line.into()));
        let value: serde_json::Value = serde_json::from_str(&replayed).expect("replay is JSON");
        assert_eq!(
            value["clientContent"]["turns"][0]["parts"][0]["text"].as_str(),
            Some(line)
        );
        assert!(protocol.truncate(line, u32::MAX).is_none());
    }
});
