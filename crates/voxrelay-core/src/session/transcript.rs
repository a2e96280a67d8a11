//! The transcript one call keeps for its report, bounded in bytes of its encoding.
//!
//! A call keeps at most [`MAX_TRANSCRIPT_BYTES`] of transcript, measured as the lines encode in
//! the report (JSON escapes included): when a new line would pass it, the oldest lines are
//! dropped (the most recent are what a caller's last request was) and counted; a single line
//! longer than [`MAX_TRANSCRIPT_LINE_BYTES`] keeps its start and is counted as cut.

use std::collections::VecDeque;

pub use crate::control::api::Speaker;

/// One line of a call's transcript.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranscriptLine {
    pub speaker: Speaker,
    /// Milliseconds since the stream's `start`.
    pub offset_ms: u64,
    pub text: String,
}

/// Most transcript a call keeps, in bytes of its encoding in the report. An hour of busy
/// conversation is ~100 KB of text, so only a runaway call (or model) ever reaches it.
pub const MAX_TRANSCRIPT_BYTES: usize = 256 * 1024;
/// Longest text of one transcript line; longer lines are cut (their start kept).
pub const MAX_TRANSCRIPT_LINE_BYTES: usize = 16 * 1024;
/// Framing of one line in the report's `transcript` array besides its text and offset:
/// `{"speaker":"assistant","offset_ms":,"text":}` and the comma before the next line.
const LINE_FRAMING: usize = r#"{"speaker":"","offset_ms":,"text":}"#.len() + 1;

/// The transcript one call keeps: the most recent lines within [`MAX_TRANSCRIPT_BYTES`].
///
/// `push` costs O(the line's length) (plus, amortised, the lines it drops); memory is bounded
/// by the byte budget plus one `TranscriptLine` header per kept line (each kept line costs at
/// least its framing, so there are at most a few thousand).
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    lines: VecDeque<TranscriptLine>,
    /// What `lines` encode to in the report, framing included.
    encoded_bytes: usize,
    dropped_lines: u64,
    cut_lines: u64,
}

impl Transcript {
    /// Appends a line, cutting it and dropping the oldest lines as the bounds require.
    pub fn push(&mut self, mut line: TranscriptLine) {
        if line.text.len() > MAX_TRANSCRIPT_LINE_BYTES {
            line.text
                .truncate(floor_char_boundary(&line.text, MAX_TRANSCRIPT_LINE_BYTES));
            self.cut_lines += 1;
        }
        self.encoded_bytes += encoded_line_bytes(&line);
        self.lines.push_back(line);
        // A single line encodes to at most 6 × 16 KiB plus framing, far below the budget, so
        // this never drops the line just added.
        while self.encoded_bytes > MAX_TRANSCRIPT_BYTES {
            let Some(oldest) = self.lines.pop_front() else {
                break;
            };
            self.encoded_bytes -= encoded_line_bytes(&oldest);
            self.dropped_lines += 1;
        }
    }

    /// The most recent assistant line reading `full` now reads `heard` and a closing `…`: the
    /// caller stopped hearing it there (a barge-in, or the session lost). Lines are matched
    /// by text, newest first; returns whether one was.
    pub fn cut_assistant_line(&mut self, full: &str, heard: &str) -> bool {
        let full = full.trim();
        let Some(line) = self
            .lines
            .iter_mut()
            .rev()
            .find(|line| line.speaker == Speaker::Assistant && line.text == full)
        else {
            return false;
        };
        let before = encoded_line_bytes(line);
        line.text = cut_marked(heard);
        self.encoded_bytes = self.encoded_bytes - before + encoded_line_bytes(line);
        true
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &TranscriptLine> {
        self.lines.iter()
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Lines dropped from the start to stay within the budget.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }

    /// Lines whose text was cut at [`MAX_TRANSCRIPT_LINE_BYTES`].
    pub fn cut_lines(&self) -> u64 {
        self.cut_lines
    }

    /// What the kept lines encode to in a report (framing included).
    pub fn encoded_bytes(&self) -> usize {
        self.encoded_bytes
    }
}

impl std::ops::Index<usize> for Transcript {
    type Output = TranscriptLine;

    fn index(&self, index: usize) -> &TranscriptLine {
        &self.lines[index]
    }
}

impl PartialEq<Vec<TranscriptLine>> for Transcript {
    fn eq(&self, other: &Vec<TranscriptLine>) -> bool {
        self.lines.iter().eq(other.iter())
    }
}

/// Bytes `line` takes in a report's `transcript` array, its trailing comma included.
fn encoded_line_bytes(line: &TranscriptLine) -> usize {
    LINE_FRAMING
        + line.speaker.as_str().len()
        + decimal_digits(line.offset_ms)
        + json_string_bytes(&line.text)
}

/// Length of `text` as a JSON string (quotes included), escaped as `serde_json` escapes it.
fn json_string_bytes(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn decimal_digits(mut value: u64) -> usize {
    let mut digits = 1;
    while value >= 10 {
        value /= 10;
        digits += 1;
    }
    digits
}

/// The largest char boundary of `text` at or below `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut end = at.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// `heard` marked as cut where the caller stopped hearing it.
pub fn cut_marked(heard: &str) -> String {
    let heard = heard.trim_end();
    if heard.is_empty() {
        "…".to_owned()
    } else {
        format!("{heard}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::api::{Speaker, TranscriptEntry};
    use crate::testkit::Lcg;

    fn line(speaker: Speaker, offset_ms: u64, text: &str) -> TranscriptLine {
        TranscriptLine {
            speaker,
            offset_ms,
            text: text.into(),
        }
    }

    #[test]
    fn the_encoded_size_of_a_line_is_exactly_what_serde_writes() {
        let mut rng = Lcg(11);
        let alphabet: Vec<char> = "ab \"\\\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}é€😀/"
            .chars()
            .collect();
        for _ in 0..2_000 {
            let text: String = (0..rng.below(40))
                .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                .collect();
            let offset_ms = match rng.below(3) {
                0 => 0,
                1 => rng.next(),
                _ => u64::MAX,
            };
            let speaker = if rng.below(2) == 0 {
                Speaker::Caller
            } else {
                Speaker::Assistant
            };
            let entry = TranscriptEntry {
                speaker,
                offset_ms,
                text: text.clone(),
            };
            let encoded = serde_json::to_vec(&entry).unwrap().len() + 1;
            assert_eq!(
                encoded_line_bytes(&line(speaker, offset_ms, &text)),
                encoded,
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_long_call_keeps_its_most_recent_lines_and_marks_the_cut() {
        let mut transcript = Transcript::default();
        let text = "x".repeat(1_000);
        for n in 0..1_000u64 {
            transcript.push(line(Speaker::Caller, n, &text));
        }
        assert!(transcript.encoded_bytes() <= MAX_TRANSCRIPT_BYTES);
        let kept = transcript.len() as u64;
        assert!(kept > 200 && kept < 1_000, "{kept}");
        assert_eq!(transcript.dropped_lines(), 1_000 - kept);
        assert_eq!(
            transcript.iter().last().unwrap().offset_ms,
            999,
            "the newest is kept"
        );
        assert_eq!(
            transcript[0].offset_ms,
            1_000 - kept,
            "the oldest kept follows the cut"
        );
        assert_eq!(transcript.cut_lines(), 0);

        // One line longer than a line may be keeps its start.
        let mut one = Transcript::default();
        one.push(line(
            Speaker::Assistant,
            0,
            &"é".repeat(MAX_TRANSCRIPT_LINE_BYTES),
        ));
        assert_eq!(one.cut_lines(), 1);
        assert_eq!(one[0].text.len(), MAX_TRANSCRIPT_LINE_BYTES);
        assert_eq!(one.dropped_lines(), 0);
    }
}
