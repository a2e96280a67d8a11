//! The conversation so far, kept so that a new model session can be told it.
//!
//! Owns [`Conversation`]: the call's turns in the order the model's own conversation holds
//! them (caller turns, assistant turns, tool calls and their outputs), and [`Conversation::replay`],
//! the items a successor session is given after a drop or a renewal. What the model said is
//! replayed as the caller heard it: an assistant turn cut by a barge-in (or by the drop itself)
//! keeps only the share of its text that matches the share of its audio the caller heard,
//! so the new session never believes it said what nobody heard.
//!
//! Invariants: bounded ([`MAX_TURNS`] turns, [`MAX_TURN_BYTES`] per turn's text,
//! [`MAX_CONVERSATION_BYTES`] in all; the oldest turns go first and are counted); a caller turn
//! is placed when its speech starts (the model creates its item then) and gets its text when
//! the transcription arrives, which may be after the answer began; nothing here touches a
//! socket or the clock.

use std::borrow::Cow;
use std::collections::VecDeque;

/// Turns kept. An hour-long call has a few hundred; a successor needs the recent ones most.
pub const MAX_TURNS: usize = 128;
/// Longest text kept for one turn (tool outputs can be large); the start is kept.
pub const MAX_TURN_BYTES: usize = 4 * 1024;
/// All the text kept, replay included: well inside a realtime model's context window.
pub const MAX_CONVERSATION_BYTES: usize = 48 * 1024;

/// One turn of the conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    /// What the caller said (empty until, or without, the transcription).
    Caller {
        item_id: String,
        text: String,
    },
    /// What the model said, and how much of it the caller heard.
    Assistant {
        item_id: String,
        text: String,
        /// Audio the model produced for this item, in ms.
        produced_ms: u32,
        /// Set when playback was cut (barge-in, or the drop): the caller heard this much.
        heard_ms: Option<u32>,
    },
    ToolCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    ToolOutput {
        call_id: String,
        output: String,
    },
}

impl Turn {
    fn text_bytes(&self) -> usize {
        match self {
            Turn::Caller { text, .. } | Turn::Assistant { text, .. } => text.len(),
            Turn::ToolCall {
                name, arguments, ..
            } => name.len() + arguments.len(),
            Turn::ToolOutput { output, .. } => output.len(),
        }
    }
}

/// One item a successor session is given, in the provider-neutral form a
/// [`crate::upstream::RealtimeProtocol`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayItem<'a> {
    UserText(&'a str),
    AssistantText(Cow<'a, str>),
    FunctionCall {
        call_id: &'a str,
        name: &'a str,
        arguments: &'a str,
    },
    FunctionOutput {
        call_id: &'a str,
        output: &'a str,
    },
}

/// The call's turns, bounded.
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    turns: VecDeque<Turn>,
    bytes: usize,
    dropped_turns: u64,
}

impl Conversation {
    pub fn turns(&self) -> impl Iterator<Item = &Turn> {
        self.turns.iter()
    }

    /// Turns dropped (oldest first) to stay within the bounds.
    pub fn dropped_turns(&self) -> u64 {
        self.dropped_turns
    }

    /// The caller started speaking: the model's user item `item_id` comes next.
    pub fn caller_started(&mut self, item_id: &str) {
        if self.caller_turn_mut(item_id).is_none() {
            self.push(Turn::Caller {
                item_id: item_id.to_owned(),
                text: String::new(),
            });
        }
    }

    /// The transcription of the caller's item `item_id` (placed at its speech start when that
    /// was seen, else at the end).
    pub fn caller_said(&mut self, item_id: &str, text: &str) {
        let text = cut(text, MAX_TURN_BYTES);
        match self.caller_turn_mut(item_id) {
            Some(existing) => {
                let grown = text.len().saturating_sub(existing.len());
                existing.clear();
                existing.push_str(text);
                self.bytes += grown;
                self.trim();
            }
            None => self.push(Turn::Caller {
                item_id: item_id.to_owned(),
                text: text.to_owned(),
            }),
        }
    }

    /// Model audio for `item_id`: `ms` more of it was produced.
    pub fn assistant_audio(&mut self, item_id: &str, ms: u32) {
        match self.assistant_mut(item_id) {
            Some(Turn::Assistant { produced_ms, .. }) => {
                *produced_ms = produced_ms.saturating_add(ms);
            }
            _ => self.push(Turn::Assistant {
                item_id: item_id.to_owned(),
                text: String::new(),
                produced_ms: ms,
                heard_ms: None,
            }),
        }
    }

    /// Part of the transcript of `item_id`, as the model streams it.
    pub fn assistant_text_delta(&mut self, item_id: &str, delta: &str) {
        let Some(Turn::Assistant { text, .. }) = self.assistant_mut(item_id) else {
            return;
        };
        let room = MAX_TURN_BYTES.saturating_sub(text.len());
        let delta = cut(delta, room);
        text.push_str(delta);
        self.bytes += delta.len();
        self.trim();
    }

    /// The whole transcript of `item_id` (replaces what its deltas built).
    pub fn assistant_said(&mut self, item_id: &str, full: &str) {
        let full = cut(full, MAX_TURN_BYTES);
        match self.assistant_mut(item_id) {
            Some(Turn::Assistant { text, .. }) => {
                let before = text.len();
                text.clear();
                text.push_str(full);
                self.bytes = self.bytes - before + full.len();
                self.trim();
            }
            // A text-only item (no audio seen): heard as a whole is the best guess.
            _ => self.push(Turn::Assistant {
                item_id: item_id.to_owned(),
                text: full.to_owned(),
                produced_ms: 0,
                heard_ms: None,
            }),
        }
    }

    /// Playback of `item_id` was cut when the caller had heard `heard_ms` of it.
    pub fn assistant_cut(&mut self, item_id: &str, heard_ms: u32) {
        if let Some(Turn::Assistant {
            heard_ms: heard, ..
        }) = self.assistant_mut(item_id)
        {
            *heard = Some(heard_ms);
        }
    }

    /// What the model said in `item_id` and the share of it the caller heard (the whole text
    /// unless playback was cut).
    pub fn assistant_heard(&self, item_id: &str) -> Option<(&str, &str)> {
        self.turns.iter().rev().find_map(|turn| match turn {
            Turn::Assistant {
                item_id: id,
                text,
                produced_ms,
                heard_ms,
            } if id == item_id => Some((text.as_str(), heard_text(text, *produced_ms, *heard_ms))),
            _ => None,
        })
    }

    /// `item_id` was withdrawn before the caller heard any of it.
    pub fn assistant_unheard(&mut self, item_id: &str) {
        self.assistant_cut(item_id, 0);
    }

    pub fn tool_called(&mut self, call_id: &str, name: &str, arguments: &str) {
        self.push(Turn::ToolCall {
            call_id: call_id.to_owned(),
            name: cut(name, MAX_TURN_BYTES).to_owned(),
            arguments: cut(arguments, MAX_TURN_BYTES).to_owned(),
        });
    }

    pub fn tool_answered(&mut self, call_id: &str, output: &str) {
        self.push(Turn::ToolOutput {
            call_id: call_id.to_owned(),
            output: cut(output, MAX_TURN_BYTES).to_owned(),
        });
    }

    /// Whether a session that takes over this conversation should speak first: yes unless
    /// the model had the last word and the caller heard all of it (then it is the caller's
    /// turn), or a tool is still running (its output asks for the answer). An empty
    /// conversation counts as unanswered: the lost session's greeting never reached the
    /// caller, or a reset swallowed the events that would have shown it.
    pub fn successor_should_answer(&self) -> bool {
        for turn in self.turns.iter().rev() {
            match turn {
                Turn::Caller { text, .. } if text.is_empty() => continue,
                Turn::Caller { .. } | Turn::ToolOutput { .. } => return true,
                Turn::Assistant { heard_ms, .. } => return heard_ms.is_some(),
                Turn::ToolCall { .. } => return false,
            }
        }
        true
    }

    /// The items that tell a new session this conversation, oldest first: empty caller turns
    /// and assistant turns nobody heard are left out, a cut assistant turn is cut, a tool
    /// output whose call is no longer kept is left out (the server refuses an output for a
    /// call it does not know).
    pub fn replay(&self) -> Vec<ReplayItem<'_>> {
        let mut items = Vec::with_capacity(self.turns.len());
        for turn in &self.turns {
            match turn {
                Turn::Caller { text, .. } if !text.trim().is_empty() => {
                    items.push(ReplayItem::UserText(text));
                }
                Turn::Assistant {
                    text,
                    produced_ms,
                    heard_ms,
                    ..
                } => {
                    let heard = heard_text(text, *produced_ms, *heard_ms);
                    if !heard.trim().is_empty() {
                        items.push(ReplayItem::AssistantText(Cow::Borrowed(heard)));
                    }
                }
                Turn::ToolCall {
                    call_id,
                    name,
                    arguments,
                } => items.push(ReplayItem::FunctionCall {
                    call_id,
                    name,
                    arguments,
                }),
                Turn::ToolOutput { call_id, output } => {
                    let called = items.iter().any(|item| {
                        matches!(item, ReplayItem::FunctionCall { call_id: c, .. } if c == call_id)
                    });
                    if called {
                        items.push(ReplayItem::FunctionOutput { call_id, output });
                    }
                }
                Turn::Caller { .. } => {}
            }
        }
        items
    }

    fn caller_turn_mut(&mut self, id: &str) -> Option<&mut String> {
        self.turns.iter_mut().rev().find_map(|turn| match turn {
            Turn::Caller { item_id, text } if item_id == id => Some(text),
            _ => None,
        })
    }

    fn assistant_mut(&mut self, id: &str) -> Option<&mut Turn> {
        self.turns
            .iter_mut()
            .rev()
            .find(|turn| matches!(turn, Turn::Assistant { item_id, .. } if item_id == id))
    }

    fn push(&mut self, turn: Turn) {
        self.bytes += turn.text_bytes();
        self.turns.push_back(turn);
        self.trim();
    }

    fn trim(&mut self) {
        while self.turns.len() > MAX_TURNS
            || (self.bytes > MAX_CONVERSATION_BYTES && self.turns.len() > 1)
        {
            let Some(oldest) = self.turns.pop_front() else {
                break;
            };
            self.bytes -= oldest.text_bytes();
            self.dropped_turns += 1;
        }
    }
}

/// The share of `text` the caller heard: all of it when playback was not cut, else the share
/// of its characters matching `heard ÷ produced` of its audio (speech runs at a roughly even
/// rate of characters), ended at the last word boundary before it so no half word is replayed.
pub fn heard_text(text: &str, produced_ms: u32, heard_ms: Option<u32>) -> &str {
    let Some(heard) = heard_ms else {
        return text;
    };
    if produced_ms == 0 || heard >= produced_ms {
        return text;
    }
    let chars = text.chars().count() as u64;
    let keep = (chars * u64::from(heard) / u64::from(produced_ms)) as usize;
    let end = text
        .char_indices()
        .nth(keep)
        .map_or(text.len(), |(index, _)| index);
    if end == text.len() {
        return text;
    }
    // The next character starts a word: `end` is already a boundary.
    let next_is_space = text[end..].starts_with(char::is_whitespace);
    let cut_at = if next_is_space {
        end
    } else {
        text[..end].rfind(char::is_whitespace).unwrap_or(0)
    };
    text[..cut_at].trim_end()
}

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_turn_keeps_the_words_heard_and_no_half_word() {
        let text = "We open at nine and close at five on weekdays.";
        assert_eq!(heard_text(text, 4000, None), text);
        assert_eq!(heard_text(text, 4000, Some(4000)), text);
        assert_eq!(heard_text(text, 4000, Some(0)), "");
        // Half the audio: 23 of 46 characters is "We open at nine and clo", cut back to a word.
        assert_eq!(heard_text(text, 4000, Some(2000)), "We open at nine and");
        assert_eq!(heard_text(text, 4000, Some(100)), "");
        assert_eq!(heard_text("Grüße aus Köln", 1000, Some(500)), "Grüße");
    }

    #[test]
    fn caller_turns_keep_their_place_when_the_transcription_comes_late() {
        let mut conversation = Conversation::default();
        conversation.caller_started("u1");
        conversation.assistant_audio("a1", 500);
        conversation.caller_said("u1", "What time do you open?");
        conversation.assistant_said("a1", "Nine.");
        assert_eq!(
            conversation.replay(),
            vec![
                ReplayItem::UserText("What time do you open?"),
                ReplayItem::AssistantText(Cow::Borrowed("Nine.")),
            ]
        );
        assert!(!conversation.successor_should_answer(), "the caller's turn");
        conversation.caller_said("u2", "Thanks");
        assert!(conversation.successor_should_answer());
        conversation.assistant_audio("a2", 800);
        conversation.assistant_cut("a2", 300);
        assert!(conversation.successor_should_answer(), "cut short");
        assert!(
            Conversation::default().successor_should_answer(),
            "never heard"
        );
    }

    #[test]
    fn unheard_turns_empty_turns_and_orphan_outputs_are_not_replayed() {
        let mut conversation = Conversation::default();
        conversation.caller_started("u0");
        conversation.assistant_audio("a1", 1000);
        conversation.assistant_text_delta("a1", "Let me check that");
        conversation.assistant_unheard("a1");
        conversation.tool_answered("gone", "{}");
        conversation.tool_called("c1", "lookup", "{\"id\":7}");
        conversation.tool_answered("c1", "{\"open\":true}");
        assert_eq!(
            conversation.replay(),
            vec![
                ReplayItem::FunctionCall {
                    call_id: "c1",
                    name: "lookup",
                    arguments: "{\"id\":7}"
                },
                ReplayItem::FunctionOutput {
                    call_id: "c1",
                    output: "{\"open\":true}"
                },
            ]
        );
        assert!(
            conversation.successor_should_answer(),
            "a tool output wants an answer"
        );
        conversation.tool_called("c2", "lookup", "{}");
        assert!(
            !conversation.successor_should_answer(),
            "a tool still running"
        );
    }

    #[test]
    fn the_conversation_stays_within_its_bounds_dropping_the_oldest() {
        let mut conversation = Conversation::default();
        let long = "x".repeat(MAX_TURN_BYTES * 2);
        for n in 0..(MAX_TURNS * 2) {
            conversation.caller_said(&format!("u{n}"), &long);
        }
        let kept = conversation.turns().count();
        assert!(kept <= MAX_TURNS);
        assert!(conversation.bytes <= MAX_CONVERSATION_BYTES);
        assert_eq!(conversation.dropped_turns() as usize, MAX_TURNS * 2 - kept);
        assert!(
            conversation
                .turns()
                .all(|turn| turn.text_bytes() <= MAX_TURN_BYTES)
        );
        match conversation.turns().last() {
            Some(Turn::Caller { item_id, .. }) => {
                assert_eq!(*item_id, format!("u{}", MAX_TURNS * 2 - 1));
            }
            other => panic!("{other:?}"),
        }
        // Deltas stop at the turn's cap.
        conversation.assistant_audio("a", 20);
        for _ in 0..3 {
            conversation.assistant_text_delta("a", &long);
        }
        assert!(conversation.bytes <= MAX_CONVERSATION_BYTES);
    }
}
