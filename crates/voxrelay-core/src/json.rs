//! JSON written by hand on the hot paths: one string-literal writer, [`push_json_str`], for
//! every message the bridge and the simulator build without serde (audio appends, media
//! frames, marks). Output is byte-for-byte what `serde_json::to_string` gives for a `&str`.

/// Appends `value` to `buf` as a JSON string literal (quotes included), escaping per RFC 8259,
/// without allocating beyond `buf`'s growth.
pub fn push_json_str(buf: &mut String, value: &str) {
    buf.push('"');
    // Most text here (every audio append's base64) needs no escape at all: one check 16 bytes
    // at a time instead of a branch per byte (this scan was 10% of an uplink frame's
    // instructions through the call task).
    if !needs_json_escape(value.as_bytes()) {
        buf.push_str(value);
        buf.push('"');
        return;
    }
    let mut run_start = 0;
    for (index, byte) in value.bytes().enumerate() {
        let escape: Option<&str> = match byte {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0x00..=0x1f => None,
            _ => continue,
        };
        buf.push_str(&value[run_start..index]);
        match escape {
            Some(escaped) => buf.push_str(escaped),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                buf.push_str("\\u00");
                buf.push(HEX[(byte >> 4) as usize] as char);
                buf.push(HEX[(byte & 0xf) as usize] as char);
            }
        }
        run_start = index + 1;
    }
    buf.push_str(&value[run_start..]);
    buf.push('"');
}

/// Whether any byte must be escaped in a JSON string: `"`, `\` or a control character.
fn needs_json_escape(bytes: &[u8]) -> bool {
    let escape = |byte: u8| byte < 0x20 || byte == b'"' || byte == b'\\';
    let chunks = bytes.chunks_exact(16);
    let tail = chunks.remainder();
    // No early exit inside a chunk, so each chunk compiles to a few vector compares.
    chunks.into_iter().any(|chunk| {
        chunk
            .iter()
            .fold(false, |found, &byte| found | escape(byte))
    }) || tail.iter().any(|&byte| escape(byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_json_str_round_trips_through_serde() {
        for value in [
            "",
            "plain",
            "quote \" back \\ slash",
            "line\nfeed\r\ttab \u{1} \u{8} \u{c} \u{1f} é 🎉",
        ] {
            let mut buf = String::from("x");
            push_json_str(&mut buf, value);
            let parsed: String = serde_json::from_str(&buf[1..]).expect("valid JSON string");
            assert_eq!(parsed, value);
            assert_eq!(buf[1..], serde_json::to_string(value).expect("serialize"));
        }
    }

    #[test]
    fn the_escape_check_finds_every_escape_at_every_position() {
        for len in 0..40 {
            let plain = "A".repeat(len);
            assert!(!needs_json_escape(plain.as_bytes()), "{len}");
            for at in 0..len {
                for escaped in ["\"", "\\", "\n", "\u{1}", "\u{1f}"] {
                    let mut text = plain.clone();
                    text.replace_range(at..=at, escaped);
                    assert!(needs_json_escape(text.as_bytes()), "{text:?}");
                    let mut buf = String::new();
                    push_json_str(&mut buf, &text);
                    assert_eq!(buf, serde_json::to_string(&text).unwrap());
                }
            }
        }
        assert!(!needs_json_escape("é 🎉 \u{7f} /+=".as_bytes()));
    }
}
