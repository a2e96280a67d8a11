//! Twilio Media Streams messages and the stream machine. The input is a stream: one message
//! per line (a seed is a recorded `.jsonl` call), invalid UTF-8 replaced. Checks: parsing and
//! the machine never panic; every message is counted once and every error in exactly one
//! error counter; an error changes no state; phases only move forward; the stream SID never
//! changes once started; `sequence_gaps` never decreases and never exceeds the largest
//! sequence number accepted (so it cannot wrap).
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxrelay::twilio::events::InboundMessage;
use voxrelay::twilio::stream::{Phase, StreamCounters, StreamEvent, StreamMachine};

/// The sum of the error counters: each refused message is counted in exactly one.
fn errors(counters: &StreamCounters) -> u64 {
    counters.malformed
        + counters.out_of_order
        + counters.stream_sid_mismatches
        + counters.unsupported_media_formats
        + counters.sequence_jumps
        + counters.invalid_sids
        + counters.invalid_dtmf
}

fn rank(phase: Phase) -> u8 {
    match phase {
        Phase::AwaitingConnected => 0,
        Phase::AwaitingStart => 1,
        Phase::Streaming => 2,
        Phase::Stopped => 3,
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut machine = StreamMachine::new();
    let mut largest_sequence = 0u64;
    let mut lines = 0u64;
    for line in text.split('\n') {
        lines += 1;
        if let Ok(message) = serde_json::from_str::<InboundMessage>(line) {
            let _ = (message.event_name(), message.stream_sid());
            if let Some(sequence) = message
                .sequence_number()
                .and_then(|s| s.parse::<u64>().ok())
            {
                largest_sequence = largest_sequence.max(sequence);
            }
        }
        let phase = machine.phase();
        let sid = machine.stream_sid().map(str::to_owned);
        let before = machine.counters().clone();
        let result = machine.handle(line);
        let after = machine.counters().clone();
        assert_eq!(after.messages, before.messages + 1);
        assert!(after.sequence_gaps >= before.sequence_gaps);
        assert!(after.sequence_gaps <= largest_sequence);
        assert!(rank(machine.phase()) >= rank(phase));
        match result {
            Err(_) => {
                assert_eq!(errors(&after), errors(&before) + 1);
                assert_eq!(machine.phase(), phase);
                assert_eq!(machine.stream_sid().map(str::to_owned), sid);
                assert_eq!(after.sequence_gaps, before.sequence_gaps);
                assert_eq!(after.media_frames, before.media_frames);
            }
            Ok(event) => {
                assert_eq!(errors(&after), errors(&before));
                assert_ne!(phase, Phase::Stopped);
                if let Some(sid) = &sid {
                    assert_eq!(machine.stream_sid(), Some(sid.as_str()));
                }
                if let StreamEvent::Started(info) = event {
                    assert_eq!(machine.stream_sid(), Some(info.stream_sid.as_str()));
                    assert_eq!(info.encoding, "audio/x-mulaw");
                }
            }
        }
    }
    assert_eq!(machine.counters().messages, lines);
});
