//! The model's server events (OpenAI Realtime, GA) and the client messages built from text
//! the model or a caller controls. The input is one server message per line (a seed is the
//! recorded `server-events.jsonl`), invalid UTF-8 replaced. Checks: parsing never panics; the
//! greeting's `response.create` is the only follow-up, sent once, after the first
//! `session.updated` that parsed; every message written with a line's text in it (audio
//! append, truncate, delete, user text, tool output) is valid JSON carrying it exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxrelay::upstream::{OpenAiRealtime, RealtimeProtocol, SessionSettings, UpstreamEvent};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut protocol = OpenAiRealtime::new(SessionSettings {
        greeting: Some("Hello".to_owned()),
        ..SessionSettings::default()
    });
    let mut follow_ups = Vec::new();
    let mut greeted = false;
    for line in text.split('\n') {
        follow_ups.clear();
        let result = protocol.parse_event(line, &mut follow_ups);
        if matches!(result, Ok(UpstreamEvent::SessionReady)) && !greeted {
            greeted = true;
            assert_eq!(follow_ups.len(), 1);
            let value: serde_json::Value = serde_json::from_str(&follow_ups[0]).expect("JSON");
            assert_eq!(value["type"], "response.create");
        } else {
            assert!(follow_ups.is_empty());
        }

        let mut append = String::new();
        protocol.write_audio_append(line, &mut append);
        let value: serde_json::Value = serde_json::from_str(&append).expect("append is JSON");
        assert_eq!(value["audio"].as_str(), Some(line));
        let value: serde_json::Value =
            serde_json::from_str(&protocol.truncate(line, u32::MAX)).expect("truncate is JSON");
        assert_eq!(value["item_id"].as_str(), Some(line));
        let value: serde_json::Value =
            serde_json::from_str(&protocol.delete_item(line)).expect("delete is JSON");
        assert_eq!(value["item_id"].as_str(), Some(line));
        let value: serde_json::Value =
            serde_json::from_str(&protocol.user_text(line)).expect("user text is JSON");
        assert_eq!(value["item"]["content"][0]["text"].as_str(), Some(line));
        let value: serde_json::Value =
            serde_json::from_str(&protocol.function_output(line, line)).expect("output is JSON");
        assert_eq!(value["item"]["output"].as_str(), Some(line));
    }
});
