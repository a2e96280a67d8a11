//! A scripted Twilio peer: places one simulated call against a running bridge.
//!
//! It does what Twilio does, in order: POSTs the signed voice webhook, reads the TwiML's
//! `<Stream>` URL and `<Parameter>`s, opens the Media Streams WebSocket signed over that
//! `wss://` URL, sends `connected` and `start`, then streams the caller's audio as 20 ms
//! `media` frames on a real-time schedule. Outbound audio from the bridge goes into a
//! simulated playback buffer, so `mark`s are echoed when the audio before them would have
//! finished playing, and a `clear` empties the buffer and echoes every outstanding mark at
//! once — exactly the behaviour the bridge's playback accounting relies on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use url::Url;

use super::http_client;
use voxrelay_core::Secret;
use voxrelay_core::twilio::signature::compute_signature;

/// The account simulated calls come from unless told otherwise.
pub const SIMULATED_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";

/// 20 ms of μ-law at 8 kHz.
pub const FRAME_BYTES: usize = 160;
const FRAME: Duration = Duration::from_millis(20);

#[derive(Clone, Debug)]
pub struct CallerConfig {
    /// Where the bridge listens, e.g. `http://127.0.0.1:8080`.
    pub bridge: Url,
    /// The origin Twilio would use (and sign); defaults to `bridge`.
    pub public_url: Option<Url>,
    pub auth_token: Secret,
    pub to: String,
    pub from: String,
    pub call_sid: String,
    pub stream_sid: String,
    /// The Twilio account the call comes from (webhook `AccountSid`, `start.accountSid`).
    pub account_sid: String,
    /// The caller's audio, μ-law 8 kHz; sent as 20 ms frames (the last one padded).
    pub audio: Vec<u8>,
    /// Keep the call up this long after the audio ends, to hear the reply (sending silence,
    /// as a real line does).
    pub linger: Duration,
    /// DTMF digits to press, with their offset from the stream's start.
    pub dtmf: Vec<(Duration, char)>,
    /// Between the webhook's answer and the stream's handshake: Twilio fetching and running
    /// the TwiML and opening a TLS WebSocket to the bridge takes time a loopback test lacks.
    pub twilio_gap: Duration,
}

impl CallerConfig {
    pub fn new(bridge: Url, auth_token: Secret, audio: Vec<u8>) -> Self {
        let id = rand::random::<u64>();
        Self {
            bridge,
            public_url: None,
            auth_token,
            to: "+15005550006".to_owned(),
            from: "+15551230000".to_owned(),
            call_sid: format!("CA{id:032x}"),
            stream_sid: format!("MZ{id:032x}"),
            account_sid: SIMULATED_ACCOUNT_SID.to_owned(),
            audio,
            linger: Duration::from_secs(3),
            dtmf: Vec::new(),
            twilio_gap: Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("voice webhook: {0}")]
    Webhook(#[from] http_client::HttpError),
    #[error("voice webhook answered {status}: {body}")]
    WebhookStatus { status: u16, body: String },
    #[error("the TwiML has no <Stream url=…>: {0}")]
    NoStream(String),
    #[error("media stream: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("bad url: {0}")]
    Url(#[from] url::ParseError),
}

/// What the simulated Twilio saw.
#[derive(Clone, Debug, Default)]
pub struct CallReport {
    pub call_sid: String,
    pub stream_sid: String,
    pub stream_url: String,
    pub parameters: Vec<(String, String)>,
    pub frames_sent: u64,
    pub media_received: u64,
    pub marks_received: u64,
    pub marks_echoed: u64,
    pub clears_received: u64,
    pub unexpected_messages: u64,
    /// Every byte of assistant audio received, μ-law, in order (cleared audio included).
    pub audio_received: Vec<u8>,
    /// Assistant audio that would actually have played (a `clear` discards the rest).
    pub audio_played_ms: u64,
    /// From our `start` to the first assistant audio.
    pub first_audio_after_start: Option<Duration>,
    /// Offsets from our `start` at which a `clear` arrived.
    pub clears_at: Vec<Duration>,
    /// The bridge closed the socket (rather than us hanging up).
    pub closed_by_bridge: bool,
    /// The TwiML after `</Connect>`, which Twilio runs when the bridge ends the stream:
    /// `dial:<number>` or `say:<text>` (`None` when there is none).
    pub after_stream: Option<String>,
    pub duration: Duration,
}

impl CallReport {
    /// What the caller got after the stream: the TwiML after `</Connect>` if the bridge ended
    /// the stream (Twilio runs it then), else nothing (the caller hung up).
    pub fn fallback_heard(&self) -> Option<&str> {
        self.closed_by_bridge
            .then_some(self.after_stream.as_deref())
            .flatten()
    }
}

impl CallReport {
    pub fn audio_received_seconds(&self) -> f64 {
        self.audio_received.len() as f64 / 8000.0
    }
}

/// Twilio's outbound playback buffer, as far as marks and clears are concerned.
#[derive(Default)]
pub(crate) struct PlaybackBuffer {
    /// When everything received so far will have played.
    play_end: Option<Instant>,
    /// Marks not yet echoed, with the time their audio finishes.
    marks: VecDeque<(Instant, String)>,
    /// Audio scheduled but not yet played, for the played-ms figure: (start, end).
    segments: VecDeque<(Instant, Instant)>,
    played: Duration,
}

impl PlaybackBuffer {
    pub(crate) fn push_audio(&mut self, now: Instant, bytes: usize) {
        let start = self.play_end.map_or(now, |end| end.max(now));
        let end = start + Duration::from_micros(bytes as u64 * 125);
        self.segments.push_back((start, end));
        self.play_end = Some(end);
    }

    pub(crate) fn push_mark(&mut self, now: Instant, name: String) {
        let due = self.play_end.map_or(now, |end| end.max(now));
        self.marks.push_back((due, name));
    }

    /// Marks whose audio has played by `now`.
    pub(crate) fn due_marks(&mut self, now: Instant) -> Vec<String> {
        self.account(now);
        let mut due = Vec::new();
        while self.marks.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, name)) = self.marks.pop_front() {
                due.push(name);
            }
        }
        due
    }

    /// `clear`: drop unplayed audio and echo every outstanding mark now.
    pub(crate) fn clear(&mut self, now: Instant) -> Vec<String> {
        self.account(now);
        if let Some((start, _)) = self.segments.front().copied() {
            if start < now {
                self.played += now - start;
            }
        }
        self.segments.clear();
        self.play_end = None;
        self.marks.drain(..).map(|(_, name)| name).collect()
    }

    fn account(&mut self, now: Instant) {
        while let Some(&(start, end)) = self.segments.front() {
            if end <= now {
                self.played += end - start;
                self.segments.pop_front();
            } else {
                break;
            }
        }
    }

    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.marks.front().map(|(at, _)| *at)
    }
}

/// Places one call and returns what happened.
pub async fn place_call(config: &CallerConfig) -> Result<CallReport, CallerError> {
    let began = Instant::now();
    let public = config
        .public_url
        .clone()
        .unwrap_or_else(|| config.bridge.clone());

    // 1. The voice webhook, signed like Twilio signs it.
    let params = vec![
        ("AccountSid".to_owned(), config.account_sid.clone()),
        ("ApiVersion".to_owned(), "2010-04-01".to_owned()),
        ("CallSid".to_owned(), config.call_sid.clone()),
        ("CallStatus".to_owned(), "ringing".to_owned()),
        ("Direction".to_owned(), "inbound".to_owned()),
        ("From".to_owned(), config.from.clone()),
        ("To".to_owned(), config.to.clone()),
    ];
    let signed_url = public.join("/twilio/voice")?;
    let signature = compute_signature(config.auth_token.expose(), signed_url.as_str(), &params);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let response = http_client::send(
        "POST",
        &config.bridge.join("/twilio/voice")?,
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-twilio-signature", &signature),
        ],
        body.into_bytes(),
    )
    .await?;
    if response.status != 200 {
        return Err(CallerError::WebhookStatus {
            status: response.status,
            body: response.body,
        });
    }
    let (stream_url, parameters) = parse_connect_stream(&response.body)
        .ok_or_else(|| CallerError::NoStream(response.body.clone()))?;
    let after_stream = parse_after_stream(&response.body);

    // 2. The Media Streams handshake: signed over the TwiML's wss:// URL, sent to the bridge.
    if !config.twilio_gap.is_zero() {
        tokio::time::sleep(config.twilio_gap).await;
    }
    let stream = Url::parse(&stream_url)?;
    let mut connect_to = config.bridge.clone();
    let _ = connect_to.set_scheme(if config.bridge.scheme() == "https" {
        "wss"
    } else {
        "ws"
    });
    connect_to.set_path(stream.path());
    let mut request = connect_to.as_str().into_client_request()?;
    let ws_signature = compute_signature(config.auth_token.expose(), &stream_url, &[]);
    request.headers_mut().insert(
        "x-twilio-signature",
        ws_signature
            .parse()
            .map_err(|_| CallerError::NoStream("bad signature header".into()))?,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;

    let mut report = CallReport {
        call_sid: config.call_sid.clone(),
        stream_sid: config.stream_sid.clone(),
        stream_url,
        parameters: parameters.clone(),
        after_stream,
        ..CallReport::default()
    };

    // 3. connected, start, then media on a 20 ms clock.
    let custom: serde_json::Map<String, Value> = parameters
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut sequence = 1u64;
    ws.send(Message::text(
        json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
    ))
    .await?;
    ws.send(Message::text(
        json!({
            "event": "start",
            "sequenceNumber": sequence.to_string(),
            "start": {
                "accountSid": config.account_sid,
                "streamSid": config.stream_sid,
                "callSid": config.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": custom,
            },
            "streamSid": config.stream_sid,
        })
        .to_string(),
    ))
    .await?;
    let started = Instant::now();
    let mut frames: Vec<&[u8]> = config.audio.chunks(FRAME_BYTES).collect();
    // Twilio streams continuously: after the script, the caller's line carries silence.
    let silence = [0xFFu8; FRAME_BYTES];
    let linger_frames = (config.linger.as_millis() / FRAME.as_millis()) as usize;
    frames.extend(std::iter::repeat_n(&silence[..], linger_frames));
    let mut next_frame = 0usize;
    let mut dtmf: VecDeque<(Duration, char)> = config.dtmf.iter().copied().collect();
    let hang_up_at = started + FRAME * frames.len() as u32;
    let mut buffer = PlaybackBuffer::default();
    let mut padded = [0xFFu8; FRAME_BYTES];
    let mut text = String::with_capacity(512);

    loop {
        let now = Instant::now();
        let frame_due = (next_frame < frames.len()).then(|| started + FRAME * next_frame as u32);
        let dtmf_due = dtmf.front().map(|(offset, _)| started + *offset);
        let wake = [frame_due, dtmf_due, buffer.next_due(), Some(hang_up_at)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(hang_up_at);
        if now >= hang_up_at {
            break;
        }
        tokio::select! {
            message = ws.next() => {
                let now = Instant::now();
                match message {
                    Some(Ok(Message::Text(body))) => {
                        let Ok(value) = serde_json::from_str::<Value>(body.as_str()) else {
                            report.unexpected_messages += 1;
                            continue;
                        };
                        match value["event"].as_str() {
                            Some("media") => {
                                let payload = value["media"]["payload"].as_str().unwrap_or("");
                                match BASE64.decode(payload) {
                                    Ok(audio) => {
                                        report.first_audio_after_start.get_or_insert(now - started);
                                        report.media_received += 1;
                                        buffer.push_audio(now, audio.len());
                                        report.audio_received.extend_from_slice(&audio);
                                    }
                                    Err(_) => report.unexpected_messages += 1,
                                }
                            }
                            Some("mark") => {
                                report.marks_received += 1;
                                let name = value["mark"]["name"].as_str().unwrap_or("").to_owned();
                                buffer.push_mark(now, name);
                            }
                            Some("clear") => {
                                report.clears_received += 1;
                                report.clears_at.push(now - started);
                                for name in buffer.clear(now) {
                                    sequence += 1;
                                    send_mark(&mut ws, &mut text, sequence, &config.stream_sid, &name).await?;
                                    report.marks_echoed += 1;
                                }
                            }
                            _ => report.unexpected_messages += 1,
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => {
                        report.closed_by_bridge = true;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) => {
                        report.closed_by_bridge = true;
                        break;
                    }
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                let now = Instant::now();
                for name in buffer.due_marks(now) {
                    sequence += 1;
                    send_mark(&mut ws, &mut text, sequence, &config.stream_sid, &name).await?;
                    report.marks_echoed += 1;
                }
                if dtmf.front().is_some_and(|(offset, _)| started + *offset <= now) {
                    if let Some((_, digit)) = dtmf.pop_front() {
                        sequence += 1;
                        let message = json!({
                            "event": "dtmf", "streamSid": config.stream_sid,
                            "sequenceNumber": sequence.to_string(),
                            "dtmf": {"track": "inbound_track", "digit": digit.to_string()},
                        });
                        ws.send(Message::text(message.to_string())).await?;
                    }
                }
                // Catch up on every frame that is due (a late wake-up sends a burst, as Twilio does).
                while next_frame < frames.len() && started + FRAME * next_frame as u32 <= now {
                    let frame = frames[next_frame];
                    let audio: &[u8] = if frame.len() == FRAME_BYTES {
                        frame
                    } else {
                        padded[..frame.len()].copy_from_slice(frame);
                        &padded
                    };
                    sequence += 1;
                    let chunk = next_frame + 1;
                    let timestamp = next_frame * 20;
                    text.clear();
                    text.push_str(r#"{"event":"media","sequenceNumber":""#);
                    text.push_str(&sequence.to_string());
                    text.push_str(r#"","media":{"track":"inbound","chunk":""#);
                    text.push_str(&chunk.to_string());
                    text.push_str(r#"","timestamp":""#);
                    text.push_str(&timestamp.to_string());
                    text.push_str(r#"","payload":""#);
                    BASE64.encode_string(audio, &mut text);
                    text.push_str(r#""},"streamSid":""#);
                    text.push_str(&config.stream_sid);
                    text.push_str(r#""}"#);
                    ws.send(Message::text(text.clone())).await?;
                    report.frames_sent += 1;
                    next_frame += 1;
                }
            }
        }
    }

    if !report.closed_by_bridge {
        sequence += 1;
        let stop = json!({
            "event": "stop", "sequenceNumber": sequence.to_string(),
            "stop": {"accountSid": config.account_sid, "callSid": config.call_sid},
            "streamSid": config.stream_sid,
        });
        let _ = ws.send(Message::text(stop.to_string())).await;
        // Let the bridge close its side; don't wait long.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(message)) = ws.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    buffer.account(Instant::now());
    report.audio_played_ms = buffer.played.as_millis() as u64;
    report.duration = began.elapsed();
    Ok(report)
}

async fn send_mark<S>(
    ws: &mut S,
    text: &mut String,
    sequence: u64,
    stream_sid: &str,
    name: &str,
) -> Result<(), CallerError>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    text.clear();
    let message = json!({
        "event": "mark", "sequenceNumber": sequence.to_string(),
        "streamSid": stream_sid, "mark": {"name": name},
    });
    text.push_str(&message.to_string());
    ws.send(Message::text(text.clone())).await?;
    Ok(())
}

/// The verbs after `</Connect>`: `dial:<number>` for `<Dial>`, `say:<text>` for `<Say>`.
pub fn parse_after_stream(twiml: &str) -> Option<String> {
    let after = &twiml[twiml.find("</Connect>")? + "</Connect>".len()..];
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = after.find(&open)? + open.len();
        let end = start + after[start..].find(&format!("</{name}>"))?;
        Some(unescape(&after[start..end]))
    };
    if let Some(number) = element("Dial") {
        return Some(format!("dial:{number}"));
    }
    element("Say").map(|text| format!("say:{text}"))
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Extracts the `<Stream url>` and its `<Parameter>`s from `<Connect><Stream>` TwiML.
pub fn parse_connect_stream(twiml: &str) -> Option<(String, Vec<(String, String)>)> {
    let stream_tag = &twiml[twiml.find("<Stream")?..];
    let stream_tag = &stream_tag[..stream_tag.find('>')?];
    let url = xml_attribute(stream_tag, "url")?;
    let mut parameters = Vec::new();
    let mut rest = twiml;
    while let Some(at) = rest.find("<Parameter") {
        rest = &rest[at..];
        let end = rest.find("/>").or_else(|| rest.find('>'))?;
        let tag = &rest[..end];
        if let (Some(name), Some(value)) = (xml_attribute(tag, "name"), xml_attribute(tag, "value"))
        {
            parameters.push((name, value));
        }
        rest = &rest[end..];
    }
    Some((url, parameters))
}

fn xml_attribute(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = start + tag[start..].find('"')?;
    Some(unescape(&tag[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_stream_url_and_parameters_of_connect_stream_twiml() {
        let twiml = voxrelay_core::twilio::twiml::connect_stream(
            "wss://voice.example.com/twilio/media",
            &[("To", "+1555"), ("From", "a&b\"c")],
            Some("https://voice.example.com/twilio/status"),
            voxrelay_core::twilio::twiml::AfterStream::Dial("+15550100999"),
        );
        let (url, parameters) = parse_connect_stream(&twiml).unwrap();
        assert_eq!(url, "wss://voice.example.com/twilio/media");
        assert_eq!(
            parameters,
            vec![
                ("To".to_owned(), "+1555".to_owned()),
                ("From".to_owned(), "a&b\"c".to_owned())
            ]
        );
        assert_eq!(
            parse_after_stream(&twiml).as_deref(),
            Some("dial:+15550100999")
        );
        let apology = voxrelay_core::twilio::twiml::connect_stream(
            "wss://e/m",
            &[],
            None,
            voxrelay_core::twilio::twiml::AfterStream::Apology("Sorry & bye"),
        );
        assert_eq!(
            parse_after_stream(&apology).as_deref(),
            Some("say:Sorry & bye")
        );
    }

    #[test]
    fn playback_buffer_echoes_marks_when_played_and_all_at_once_on_clear() {
        let t0 = Instant::now();
        let mut buffer = PlaybackBuffer::default();
        buffer.push_audio(t0, 160);
        buffer.push_mark(t0, "a".into());
        buffer.push_audio(t0, 160);
        buffer.push_mark(t0, "b".into());
        assert!(buffer.due_marks(t0 + Duration::from_millis(19)).is_empty());
        assert_eq!(buffer.due_marks(t0 + Duration::from_millis(20)), ["a"]);
        buffer.push_audio(t0 + Duration::from_millis(25), 800);
        buffer.push_mark(t0 + Duration::from_millis(25), "c".into());
        assert_eq!(buffer.clear(t0 + Duration::from_millis(30)), ["b", "c"]);
        assert_eq!(buffer.played, Duration::from_millis(30));
    }
}
