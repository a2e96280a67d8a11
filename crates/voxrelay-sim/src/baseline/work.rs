//! The protocol work every floor relay does per message, with no I/O: both drivers (tokio's
//! [`super::BaselineRelay`] and, with the `io-uring` feature, [`super::uring`]) feed it the
//! text of each WebSocket message and write what it composed, so the two floors differ only
//! in how bytes move.
//!
//! Owns [`CallWork`]: the call's stream SID, whether its model leg is open, the marks
//! outstanding, the reused buffers (one for the decoded payload that validates base64, one for
//! the messages composed), and the planted [`Fault`]s' effects. Invariants: nothing panics on
//! peer input (a malformed message is skipped); a message costs O(its length); at most
//! [`MAX_TWILIO_BATCH`] messages are composed per model event, into one reused `String`, so the
//! media path allocates nothing once the buffers have reached their working size.

use std::borrow::Cow;
use std::collections::VecDeque;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use voxrelay_core::json::push_json_str;

use super::{EndReason, Fault};

/// Room for one `media` or `append` message with a 100 ms delta without regrowing.
pub(crate) const OUT_CAPACITY: usize = 2048;
/// Frames after which [`Fault::HangUpEarly`] hangs up.
const HANG_UP_AFTER_FRAMES: u64 = 50;
/// Marks a call keeps track of; beyond it the oldest is forgotten (its echo then matches
/// nothing, which is counted, not an error): a caller that never echoes cannot grow the list.
const MAX_OUTSTANDING_MARKS: usize = 64;
/// Messages one model event can become for Twilio: [`Fault::Rechunk`]'s two `media` and a
/// `mark`.
pub(crate) const MAX_TWILIO_BATCH: usize = 3;

/// [`Fault::MixCalls`]: the last delta relayed and the call it came from, shared by every call
/// of one relay.
#[derive(Debug, Default)]
pub(crate) struct Mixer(std::sync::Mutex<Option<(u64, String)>>);

/// What a Twilio message asks of the driver.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TwilioOutcome {
    /// Nothing to send.
    Nothing,
    /// Send [`CallWork::to_model`] on the model socket.
    ToModel,
    /// `start`: open the model socket, send [`super::SESSION_UPDATE`], then call
    /// [`CallWork::model_opened`]. Twilio's later messages wait until then.
    Dial,
    /// The call is over.
    End(EndReason),
}

/// The model leg as the protocol sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelLeg {
    Absent,
    Dialling,
    Open,
}

/// The fields of a Twilio message the relay uses; serde skips the rest. `Cow` borrows from
/// the frame unless a string contains a JSON escape.
#[derive(Deserialize)]
struct TwilioIn<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    start: Option<StartIn<'a>>,
    #[serde(borrow, default)]
    media: Option<MediaIn<'a>>,
    #[serde(borrow, default)]
    dtmf: Option<DtmfIn<'a>>,
    #[serde(borrow, default)]
    mark: Option<MarkIn<'a>>,
}

#[derive(Deserialize)]
struct StartIn<'a> {
    #[serde(borrow, rename = "streamSid")]
    stream_sid: Cow<'a, str>,
}

#[derive(Deserialize)]
struct MediaIn<'a> {
    #[serde(borrow)]
    payload: Cow<'a, str>,
}

#[derive(Deserialize)]
struct DtmfIn<'a> {
    #[serde(borrow)]
    digit: Cow<'a, str>,
}

#[derive(Deserialize)]
struct MarkIn<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

/// The fields of a server event the relay uses.
#[derive(Deserialize)]
struct UpstreamIn<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    delta: Option<Cow<'a, str>>,
}

/// What one call holds between messages.
#[derive(Debug)]
pub(crate) struct CallWork {
    number: u64,
    fault: Option<Fault>,
    stream_sid: String,
    model: ModelLeg,
    /// The messages composed for the last input, back to back; `ends[..count]` splits them.
    out: String,
    ends: [usize; MAX_TWILIO_BATCH],
    count: usize,
    /// Every payload is decoded here to validate it.
    decoded: Vec<u8>,
    /// Marks sent to Twilio and not yet echoed, oldest first (numbers; the name is `m<n>`).
    marks: VecDeque<u64>,
    next_mark: u64,
    /// Echoes that matched no outstanding mark.
    unmatched_marks: u64,
    media_in: u64,
    deltas_out: u64,
}

impl CallWork {
    /// Call `number` of its relay (numbers tell calls apart for [`Fault::MixCalls`]).
    pub(crate) fn new(number: u64, fault: Option<Fault>) -> Self {
        Self {
            number,
            fault,
            stream_sid: String::new(),
            model: ModelLeg::Absent,
            out: String::with_capacity(OUT_CAPACITY),
            ends: [0; MAX_TWILIO_BATCH],
            count: 0,
            decoded: Vec::with_capacity(OUT_CAPACITY),
            marks: VecDeque::with_capacity(MAX_OUTSTANDING_MARKS),
            next_mark: 0,
            unmatched_marks: 0,
            media_in: 0,
            deltas_out: 0,
        }
    }

    /// The model socket is open and configured: Twilio's messages are relayed from now on.
    pub(crate) fn model_opened(&mut self) {
        self.model = ModelLeg::Open;
    }

    /// Whether a `start` is waiting for its model socket (the driver holds Twilio's input;
    /// the tokio driver awaits the dial inside the message instead).
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    pub(crate) fn dialling(&self) -> bool {
        self.model == ModelLeg::Dialling
    }

    /// The one message a [`TwilioOutcome::ToModel`] sends.
    pub(crate) fn to_model(&self) -> &str {
        &self.out
    }

    /// The messages composed for Twilio by the last [`CallWork::on_model`], in order.
    pub(crate) fn to_twilio(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends[..self.count].iter().map(move |&end| {
            let message = self.out.get(start..end).unwrap_or_default();
            start = end;
            message
        })
    }

    /// Handles one Twilio text message.
    pub(crate) fn on_twilio(&mut self, text: &str) -> TwilioOutcome {
        self.count = 0;
        let message: TwilioIn<'_> = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(error) => {
                tracing::debug!(%error, "baseline relay: skipped a malformed twilio message");
                return TwilioOutcome::Nothing;
            }
        };
        match message.event.as_ref() {
            "media" => {
                let (ModelLeg::Open, Some(media)) = (self.model, message.media) else {
                    return TwilioOutcome::Nothing;
                };
                if !self.validate(&media.payload) {
                    tracing::debug!("baseline relay: dropped a media frame that is not base64");
                    return TwilioOutcome::Nothing;
                }
                self.media_in += 1;
                if self.fault == Some(Fault::HangUpEarly) && self.media_in >= HANG_UP_AFTER_FRAMES {
                    return TwilioOutcome::End(EndReason::Fault);
                }
                self.out.clear();
                self.out
                    .push_str(r#"{"type":"input_audio_buffer.append","audio":"#);
                push_json_str(&mut self.out, &media.payload);
                self.out.push('}');
                TwilioOutcome::ToModel
            }
            "start" => {
                let Some(start) = message.start else {
                    return TwilioOutcome::Nothing;
                };
                if self.model != ModelLeg::Absent {
                    tracing::debug!("baseline relay: second `start` ignored");
                    return TwilioOutcome::Nothing;
                }
                self.stream_sid.push_str(&start.stream_sid);
                self.model = ModelLeg::Dialling;
                TwilioOutcome::Dial
            }
            "dtmf" => {
                let (ModelLeg::Open, Some(dtmf)) = (self.model, message.dtmf) else {
                    return TwilioOutcome::Nothing;
                };
                // The bridge's wording, so whatever reads the digit from the bridge's
                // user text reads it from the baseline's too.
                let note = format!(
                    "The caller pressed the key \"{}\" on their phone keypad.",
                    dtmf.digit
                );
                self.out.clear();
                self.out.push_str(
                    r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"#,
                );
                push_json_str(&mut self.out, &note);
                self.out.push_str("}]}}");
                TwilioOutcome::ToModel
            }
            "mark" => {
                let Some(number) = message
                    .mark
                    .and_then(|mark| mark.name.strip_prefix('m')?.parse::<u64>().ok())
                else {
                    self.unmatched_marks += 1;
                    return TwilioOutcome::Nothing;
                };
                // Twilio echoes marks in the order they were sent (all at once after a clear).
                match self.marks.iter().position(|&sent| sent == number) {
                    Some(at) => {
                        self.marks.drain(..=at);
                    }
                    None => self.unmatched_marks += 1,
                }
                TwilioOutcome::Nothing
            }
            "stop" => TwilioOutcome::End(EndReason::TwilioStop),
            // `connected` and events Twilio may add: nothing to relay.
            _ => TwilioOutcome::Nothing,
        }
    }

    /// Handles one model text message; what it composed for Twilio is [`CallWork::to_twilio`].
    pub(crate) fn on_model(&mut self, text: &str, mixer: &Mixer) {
        self.count = 0;
        self.out.clear();
        let event: UpstreamIn<'_> = match serde_json::from_str(text) {
            Ok(event) => event,
            Err(error) => {
                tracing::debug!(%error, "baseline relay: skipped a malformed upstream message");
                return;
            }
        };
        match event.kind.as_ref() {
            "response.output_audio.delta" => {
                let Some(delta) = event.delta else {
                    return;
                };
                if !self.validate(&delta) {
                    tracing::debug!("baseline relay: dropped a delta that is not base64");
                    return;
                }
                self.deltas_out += 1;
                match self.fault {
                    Some(fault) => self.relay_with_fault(fault, &delta, mixer),
                    None => {
                        self.push_media(&delta);
                        self.push_mark();
                    }
                }
            }
            "input_audio_buffer.speech_started" => {
                self.out.push_str(r#"{"event":"clear","streamSid":"#);
                push_json_str(&mut self.out, &self.stream_sid);
                self.out.push('}');
                self.end_message();
            }
            "error" => tracing::debug!(event = text, "baseline relay: upstream error event"),
            _ => {}
        }
    }

    /// Decodes `payload` into the reused buffer; false when it is not base64.
    fn validate(&mut self, payload: &str) -> bool {
        self.decoded.clear();
        BASE64
            .decode_vec(payload.as_bytes(), &mut self.decoded)
            .is_ok()
    }

    fn end_message(&mut self) {
        if let Some(end) = self.ends.get_mut(self.count) {
            *end = self.out.len();
            self.count += 1;
        }
    }

    /// Twilio `media` carrying `payload` (base64).
    fn push_media(&mut self, payload: &str) {
        self.out.push_str(r#"{"event":"media","streamSid":"#);
        push_json_str(&mut self.out, &self.stream_sid);
        self.out.push_str(r#","media":{"payload":"#);
        push_json_str(&mut self.out, payload);
        self.out.push_str("}}");
        self.end_message();
    }

    /// A `mark` after the audio, to learn when Twilio has played it (as any relay must, to know
    /// what a barge-in cut).
    fn push_mark(&mut self) {
        use std::fmt::Write as _;
        if self.marks.len() == MAX_OUTSTANDING_MARKS {
            self.marks.pop_front();
        }
        self.marks.push_back(self.next_mark);
        self.out.push_str(r#"{"event":"mark","streamSid":"#);
        push_json_str(&mut self.out, &self.stream_sid);
        let _ = write!(self.out, r#","mark":{{"name":"m{}"}}}}"#, self.next_mark);
        self.next_mark += 1;
        self.end_message();
    }

    /// Relays one validated delta (its bytes in `self.decoded`) with `fault` planted.
    fn relay_with_fault(&mut self, fault: Fault, delta: &str, mixer: &Mixer) {
        match fault {
            Fault::DropDownlink if self.deltas_out.is_multiple_of(100) => return,
            Fault::DropDownlink | Fault::HangUpEarly => self.push_media(delta),
            Fault::Rechunk => {
                let bytes = std::mem::take(&mut self.decoded);
                let (first, second) = bytes.split_at(bytes.len() / 2);
                for half in [first, second] {
                    let payload = BASE64.encode(half);
                    self.push_media(&payload);
                }
                self.decoded = bytes;
            }
            Fault::MixCalls => {
                let other = {
                    let mut mixer = crate::lock(&mixer.0);
                    let other = mixer
                        .as_ref()
                        .filter(|(from, _)| {
                            *from != self.number && self.deltas_out.is_multiple_of(10)
                        })
                        .map(|(_, payload)| payload.clone());
                    *mixer = Some((self.number, delta.to_owned()));
                    other
                };
                self.push_media(other.as_deref().unwrap_or(delta));
            }
        }
        self.push_mark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"{"event":"start","start":{"streamSid":"MZ1"}}"#;

    fn open_call(fault: Option<Fault>) -> CallWork {
        let mut call = CallWork::new(0, fault);
        assert_eq!(call.on_twilio(START), TwilioOutcome::Dial);
        assert_eq!(call.model, ModelLeg::Dialling);
        call.model_opened();
        call
    }

    #[test]
    fn media_before_the_model_opens_goes_nowhere_and_a_second_start_is_ignored() {
        let mut call = CallWork::new(0, None);
        let media = r#"{"event":"media","media":{"payload":"AAA="}}"#;
        assert_eq!(call.on_twilio(media), TwilioOutcome::Nothing);
        assert_eq!(call.on_twilio(START), TwilioOutcome::Dial);
        assert_eq!(call.on_twilio(START), TwilioOutcome::Nothing);
        call.model_opened();
        assert_eq!(call.on_twilio(media), TwilioOutcome::ToModel);
        assert_eq!(
            call.to_model(),
            r#"{"type":"input_audio_buffer.append","audio":"AAA="}"#
        );
    }

    #[test]
    fn a_delta_becomes_media_then_a_mark_and_its_echo_is_matched() {
        let mut call = open_call(None);
        let mixer = Mixer::default();
        call.on_model(
            r#"{"type":"response.output_audio.delta","delta":"AAEC\/w=="}"#,
            &mixer,
        );
        let sent: Vec<&str> = call.to_twilio().collect();
        assert_eq!(
            sent,
            [
                r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AAEC/w=="}}"#,
                r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"m0"}}"#,
            ]
        );
        assert_eq!(
            call.on_twilio(r#"{"event":"mark","mark":{"name":"m0"}}"#),
            TwilioOutcome::Nothing
        );
        assert!(call.marks.is_empty());
        assert_eq!(call.unmatched_marks, 0);
        call.on_twilio(r#"{"event":"mark","mark":{"name":"m7"}}"#);
        assert_eq!(call.unmatched_marks, 1);
    }

    #[test]
    fn malformed_input_is_skipped_and_invalid_base64_is_dropped() {
        let mut call = open_call(None);
        let mixer = Mixer::default();
        for text in ["", "not json", "{}", r#"{"event":7}"#, "\u{0}"] {
            assert_eq!(call.on_twilio(text), TwilioOutcome::Nothing);
            call.on_model(text, &mixer);
            assert_eq!(call.to_twilio().count(), 0);
        }
        assert_eq!(
            call.on_twilio(r#"{"event":"media","media":{"payload":"not base64!"}}"#),
            TwilioOutcome::Nothing
        );
        call.on_model(
            r#"{"type":"response.output_audio.delta","delta":"%%%"}"#,
            &mixer,
        );
        assert_eq!(call.to_twilio().count(), 0);
    }

    #[test]
    fn rechunk_composes_two_media_and_one_mark() {
        let mut call = open_call(Some(Fault::Rechunk));
        call.on_model(
            r#"{"type":"response.output_audio.delta","delta":"AAECAw=="}"#,
            &Mixer::default(),
        );
        let sent: Vec<&str> = call.to_twilio().collect();
        assert_eq!(sent.len(), MAX_TWILIO_BATCH);
        assert!(sent[0].contains(r#""payload":"AAE=""#), "{sent:?}");
        assert!(sent[1].contains(r#""payload":"AgM=""#), "{sent:?}");
        assert!(sent[2].contains(r#""mark""#), "{sent:?}");
    }

    #[test]
    fn hang_up_early_ends_the_call_at_the_fiftieth_frame() {
        let mut call = open_call(Some(Fault::HangUpEarly));
        let media = r#"{"event":"media","media":{"payload":"AAA="}}"#;
        for _ in 1..HANG_UP_AFTER_FRAMES {
            assert_eq!(call.on_twilio(media), TwilioOutcome::ToModel);
        }
        assert_eq!(call.on_twilio(media), TwilioOutcome::End(EndReason::Fault));
    }
}
