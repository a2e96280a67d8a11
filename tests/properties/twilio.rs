//! Twilio Media Streams messages (`twilio::events`) and the stream machine
//! (`twilio::stream::StreamMachine`): any text, any sequence.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;
use voxrelay::twilio::events::{
    InboundMessage, write_clear_json, write_mark_json, write_media_json_from_mulaw,
};
use voxrelay::twilio::stream::{
    IgnoredReason, MAX_SEQUENCE_JUMP, Phase, StreamCounters, StreamError, StreamEvent,
    StreamMachine,
};

use crate::config;
use crate::grammar::{self, Numbers, SID};

/// Errors counted in the machine's error counters.
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

/// A script: optionally the fixture's `connected` and `start` first (so most scripts reach the
/// streaming phase), then generated messages.
fn script(numbers: Numbers, max_len: usize) -> impl Strategy<Value = Vec<String>> {
    (
        prop_oneof![1 => Just(0usize), 1 => Just(1), 4 => Just(2)],
        prop::collection::vec(grammar::twilio_text(numbers), 1..max_len),
    )
        .prop_map(|(prefix, rest)| {
            let mut script: Vec<String> = [
                grammar::twilio_fixture("connected"),
                grammar::twilio_fixture("start"),
            ][..prefix]
                .iter()
                .map(|line| (*line).to_owned())
                .collect();
            script.extend(rest);
            script
        })
}

/// Drives `machine` through `script`, checking after every message the machine's documented
/// invariants against what it answered.
fn run_checked(machine: &mut StreamMachine, script: &[String]) -> Result<(), TestCaseError> {
    let mut results_err = 0u64;
    let mut media = 0u64;
    let mut unknown = 0u64;
    for text in script {
        let before_phase = machine.phase();
        let before_sid = machine.stream_sid().map(str::to_owned);
        let before = machine.counters().clone();
        let result = machine.handle(text);
        let after = machine.counters().clone();
        prop_assert_eq!(
            after.messages,
            before.messages + 1,
            "every message is counted"
        );
        prop_assert!(
            after.sequence_gaps >= before.sequence_gaps,
            "sequence_gaps never decreases"
        );
        match &result {
            Err(_) => {
                results_err += 1;
                prop_assert_eq!(errors(&after), errors(&before) + 1, "one error, one count");
                prop_assert_eq!(machine.phase(), before_phase, "an error changes no state");
                prop_assert_eq!(machine.stream_sid().map(str::to_owned), before_sid);
                prop_assert_eq!(after.sequence_gaps, before.sequence_gaps);
                prop_assert_eq!(after.media_frames, before.media_frames);
                prop_assert_eq!(after.unknown_events, before.unknown_events);
            }
            Ok(event) => {
                prop_assert_eq!(errors(&after), errors(&before), "no error counted on Ok");
                prop_assert_ne!(
                    before_phase,
                    Phase::Stopped,
                    "nothing is accepted after stop"
                );
                match event {
                    StreamEvent::Connected => {
                        prop_assert_eq!(before_phase, Phase::AwaitingConnected);
                        prop_assert_eq!(machine.phase(), Phase::AwaitingStart);
                    }
                    StreamEvent::Started(info) => {
                        prop_assert!(matches!(
                            before_phase,
                            Phase::AwaitingConnected | Phase::AwaitingStart
                        ));
                        prop_assert_eq!(machine.phase(), Phase::Streaming);
                        prop_assert_eq!(machine.stream_sid(), Some(info.stream_sid.as_str()));
                        prop_assert!(!info.stream_sid.is_empty());
                        prop_assert_eq!(
                            (info.encoding.as_str(), info.sample_rate, info.channels),
                            ("audio/x-mulaw", 8000, 1)
                        );
                    }
                    StreamEvent::Media { .. } => {
                        media += 1;
                        prop_assert_eq!(machine.phase(), Phase::Streaming);
                    }
                    StreamEvent::Mark { .. } | StreamEvent::Dtmf { .. } => {
                        prop_assert_eq!(machine.phase(), Phase::Streaming);
                    }
                    StreamEvent::Stopped => {
                        prop_assert_eq!(before_phase, Phase::Streaming);
                        prop_assert_eq!(machine.phase(), Phase::Stopped);
                    }
                    StreamEvent::Ignored(IgnoredReason::UnknownEvent) => {
                        unknown += 1;
                        prop_assert_eq!(machine.phase(), before_phase);
                    }
                    StreamEvent::Ignored(_) => {
                        prop_assert_eq!(machine.phase(), Phase::Streaming);
                    }
                }
                if let Some(sid) = &before_sid {
                    prop_assert_eq!(
                        machine.stream_sid(),
                        Some(sid.as_str()),
                        "the SID never changes"
                    );
                }
            }
        }
    }
    let counters = machine.counters();
    prop_assert_eq!(counters.messages, script.len() as u64);
    prop_assert_eq!(errors(counters), results_err);
    prop_assert_eq!(counters.media_frames, media);
    prop_assert_eq!(counters.unknown_events, unknown);
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    /// Any text at all (arbitrary strings, fixture lines with character edits, generated
    /// messages with hostile fields): parsing never panics, and an event that parses names
    /// itself consistently.
    #[test]
    fn inbound_message_parsing_never_panics(text in grammar::twilio_text(Numbers::Hostile)) {
        if let Ok(message) = serde_json::from_str::<InboundMessage>(&text) {
            let name = message.event_name();
            prop_assert_eq!(message.stream_sid().is_none(), matches!(name, "connected" | "unknown"));
        }
    }
}

proptest! {
    #![proptest_config(config(384))]

    /// Any sequence of messages with hostile numeric fields (`u64::MAX`, past it, signs,
    /// 20,000-digit strings, JSON numbers): the machine never panics, counts every message
    /// and every error exactly once, changes nothing on an error, follows its phase order, and
    /// keeps its SID once started.
    #[test]
    fn stream_machine_keeps_its_invariants_on_any_sequence(
        script in script(Numbers::Hostile, 48)
    ) {
        run_checked(&mut StreamMachine::new(), &script)?;
    }

    /// Sequence numbers as a lossy, reordering or hostile stream sends them: repeats, late
    /// ones, jumps around `MAX_SEQUENCE_JUMP`, `u64::MAX` and its neighbours, any number. The
    /// counters follow an exact model: a jump of more than `MAX_SEQUENCE_JUMP` past the highest
    /// number seen is refused and counted once in `sequence_jumps` (its gap is not counted and
    /// the highest number stays); any other number is accepted, and a forward one counts the
    /// numbers it skipped. So `sequence_gaps` never exceeds the highest number accepted and
    /// cannot wrap, and each message costs the same whatever its number says.
    #[test]
    fn sequence_accounting_is_exact_for_any_numbers(
        steps in prop::collection::vec(
            prop_oneof![
                8 => (0u64..40).prop_map(Step::Forward),
                2 => (MAX_SEQUENCE_JUMP - 2..=MAX_SEQUENCE_JUMP + 2).prop_map(Step::Forward),
                2 => (0u64..5).prop_map(Step::Back),
                1 => (0u64..=2).prop_map(Step::NearMax),
                1 => any::<u64>().prop_map(Step::Absolute),
            ],
            1..200,
        ),
    ) {
        let mut machine = StreamMachine::new();
        machine.handle(grammar::twilio_fixture("connected")).expect("connected");
        machine.handle(grammar::twilio_fixture("start")).expect("start is sequence 1");
        let mut highest = 1u64;
        let mut gaps = 0u64;
        let mut jumps = 0u64;
        for step in steps {
            let sequence = match step {
                Step::Forward(n) => highest.saturating_add(n),
                Step::Back(n) => highest.saturating_sub(n),
                Step::NearMax(n) => u64::MAX - n,
                Step::Absolute(n) => n,
            };
            let text = media(sequence);
            let result = machine.handle(&text);
            if sequence > highest && sequence - highest > MAX_SEQUENCE_JUMP {
                prop_assert!(
                    matches!(result, Err(StreamError::SequenceJump { .. })),
                    "{:?} for a jump from {} to {}", result, highest, sequence
                );
                jumps += 1;
            } else {
                prop_assert!(result.is_ok(), "{:?} for {} after {}", result, sequence, highest);
                if sequence > highest {
                    gaps += sequence - highest - 1;
                    highest = sequence;
                }
            }
            let counters = machine.counters();
            prop_assert_eq!(counters.sequence_gaps, gaps);
            prop_assert_eq!(counters.sequence_jumps, jumps);
            prop_assert!(counters.sequence_gaps <= highest);
        }
    }

    /// The outbound writers emit valid JSON carrying exactly the given strings and audio,
    /// whatever the stream SID or mark name contains.
    #[test]
    fn outbound_writers_emit_valid_json_for_any_strings(
        sid in grammar::hostile_string(),
        name in grammar::hostile_string(),
        mulaw in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut out = String::from("stale");
        write_mark_json(&mut out, &sid, &name);
        let value: serde_json::Value = serde_json::from_str(&out).expect("mark is JSON");
        prop_assert_eq!(value["streamSid"].as_str(), Some(sid.as_str()));
        prop_assert_eq!(value["mark"]["name"].as_str(), Some(name.as_str()));

        write_clear_json(&mut out, &sid);
        let value: serde_json::Value = serde_json::from_str(&out).expect("clear is JSON");
        prop_assert_eq!(value["streamSid"].as_str(), Some(sid.as_str()));

        write_media_json_from_mulaw(&mut out, &sid, &mulaw);
        let value: serde_json::Value = serde_json::from_str(&out).expect("media is JSON");
        prop_assert_eq!(value["streamSid"].as_str(), Some(sid.as_str()));
        prop_assert_eq!(value.as_object().map(|o| o.len()), Some(3));
        let payload = value["media"]["payload"].as_str().expect("a payload string");
        prop_assert_eq!(BASE64.decode(payload).expect("base64"), mulaw);
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Forward(u64),
    Back(u64),
    NearMax(u64),
    Absolute(u64),
}

fn media(sequence: u64) -> String {
    format!(
        r#"{{"event":"media","sequenceNumber":"{sequence}","streamSid":"{SID}","media":{{"track":"inbound","chunk":"1","timestamp":"20","payload":"//8="}}}}"#
    )
}

/// Nesting far beyond any real message: every parser refuses it with an error (serde_json's
/// recursion limit), none overflows the stack.
#[test]
fn deeply_nested_messages_are_refused_without_overflowing_the_stack() {
    for depth in [64, 127, 128, 129, 1_000, 100_000] {
        for objects in [false, true] {
            let nested = grammar::deeply_nested(depth, objects);
            for text in [
                nested.clone(),
                format!(r#"{{"event":"media","streamSid":"{SID}","media":{nested}}}"#),
                format!(r#"{{"event":"start","streamSid":"{SID}","start":{nested}}}"#),
                format!(r#"{{"event":"transcription","x":{nested}}}"#),
            ] {
                let _ = serde_json::from_str::<InboundMessage>(&text);
                let mut machine = StreamMachine::new();
                machine
                    .handle(grammar::twilio_fixture("start"))
                    .expect("start");
                let _ = machine.handle(&text);
                assert_eq!(machine.counters().messages, 2);
            }
        }
    }
}
