//! What peers send, made safe for a log line: escaped, cut short, and rate-limited per call.
//!
//! A log line is read by people and parsed by tools, so text a caller, a stream or a model
//! controls must not be able to forge a second line (`\n`), hide itself (`\r`, terminal
//! escapes) or fill the disk. [`Untrusted`] escapes every control character and cuts the text
//! at [`MAX_LOGGED_BYTES`]; [`WarnBudget`] lets one call log a bounded number of warnings and
//! counts the rest, so a peer that sends garbage in a loop costs a few lines, not one per
//! message.

use std::fmt;

/// The most of one untrusted field a log line carries.
pub const MAX_LOGGED_BYTES: usize = 200;

/// Warnings one call may log before the rest are only counted.
pub const WARNINGS_PER_CALL: u32 = 20;

/// Displays peer-controlled text escaped (as Rust's `escape_debug` does, without quotes) and
/// cut at [`MAX_LOGGED_BYTES`] of the original, with the number of bytes left out.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        let mut end = text.len().min(MAX_LOGGED_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for c in text[..end].chars() {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        if end < text.len() {
            write!(f, "…(+{} bytes)", text.len() - end)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// One call's allowance of warning lines.
#[derive(Debug)]
pub struct WarnBudget {
    remaining: u32,
    suppressed: u64,
}

impl Default for WarnBudget {
    fn default() -> Self {
        Self::new(WARNINGS_PER_CALL)
    }
}

impl WarnBudget {
    pub fn new(lines: u32) -> Self {
        Self {
            remaining: lines,
            suppressed: 0,
        }
    }

    /// Whether the next warning may be logged; when not, it is counted as suppressed.
    pub fn allow(&mut self) -> bool {
        if self.remaining > 0 {
            self.remaining -= 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Warnings counted but not logged so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Phone numbers in logs keep their last two digits only.
pub fn redact_number(number: &str) -> String {
    let digits = number.chars().filter(char::is_ascii_digit).count();
    if digits <= 2 {
        return "**".to_owned();
    }
    let tail: String = number
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("***{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_a_line() {
        let forged = "1\n2026-12-06T00:00:00Z  INFO call ended\r\u{1b}[2J\u{2028}";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert_eq!(
            shown,
            "1\\n2026-12-06T00:00:00Z  INFO call ended\\r\\u{1b}[2J\\u{2028}"
        );
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_the_rest_counted() {
        let long = "é".repeat(1000);
        let shown = Untrusted(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(MAX_LOGGED_BYTES / 2)));
        assert!(shown.ends_with(&format!("…(+{} bytes)", 2000 - MAX_LOGGED_BYTES)));
        assert_eq!(Untrusted("short").to_string(), "short");
        assert_eq!(format!("{:?}", Untrusted("a\"b")), "\"a\"b\"");
    }

    #[test]
    fn a_budget_logs_its_lines_then_counts() {
        let mut budget = WarnBudget::new(2);
        assert!(budget.allow());
        assert!(budget.allow());
        assert!(!budget.allow());
        assert!(!budget.allow());
        assert_eq!(budget.suppressed(), 2);
    }
}
