//! TwiML that connects a call to a bidirectional Media Stream.
//!
//! Owns the `<Connect><Stream>` document the voice webhook answers with, with the fallback
//! Twilio runs when the bridge ends the stream ([`AfterStream`]), and the `<Say>`+`<Hangup/>`
//! one it answers when the bridge is full. Invariant: every value
//! placed in an attribute is XML-escaped (`&`, `<`, `>`, `"`, `'`), so a parameter taken from a
//! caller or a URL cannot break out of its attribute or inject elements.

/// What Twilio does when the bridge ends the stream (the caller hanging up ends the call
/// instead): the verbs after `</Connect>`. The bridge ends a stream when no model session can
/// be had, at the tenant's maximum call length, and when it shuts down past its drain time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStream<'a> {
    /// `<Dial>number</Dial>`: a person (the tenant's `fallback_number`, E.164).
    Dial(&'a str),
    /// `<Say>text</Say><Hangup/>`.
    Apology(&'a str),
}

/// Renders `<Response><Connect><Stream url=…>` with one `<Parameter>` per pair, then `after`.
///
/// `stream_url` must be a `wss://` URL without a query string (Twilio drops queries on stream
/// URLs); values travel as `parameters` and come back in `start.customParameters`.
pub fn connect_stream(
    stream_url: &str,
    parameters: &[(&str, &str)],
    status_callback: Option<&str>,
    after: AfterStream<'_>,
) -> String {
    let mut xml = String::with_capacity(160 + parameters.len() * 48);
    xml.push_str(r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url=""#);
    push_escaped(&mut xml, stream_url);
    xml.push('"');
    if let Some(callback) = status_callback {
        xml.push_str(r#" statusCallback=""#);
        push_escaped(&mut xml, callback);
        xml.push_str(r#"" statusCallbackMethod="POST""#);
    }
    xml.push('>');
    for (name, value) in parameters {
        xml.push_str(r#"<Parameter name=""#);
        push_escaped(&mut xml, name);
        xml.push_str(r#"" value=""#);
        push_escaped(&mut xml, value);
        xml.push_str(r#""/>"#);
    }
    xml.push_str("</Stream></Connect>");
    match after {
        AfterStream::Dial(number) => {
            xml.push_str("<Dial>");
            push_escaped(&mut xml, number);
            xml.push_str("</Dial>");
        }
        AfterStream::Apology(text) => {
            xml.push_str("<Say>");
            push_escaped(&mut xml, text);
            xml.push_str("</Say><Hangup/>");
        }
    }
    xml.push_str("</Response>");
    xml
}

/// Renders `<Response><Say>text</Say><Hangup/></Response>`: what a caller hears when the
/// bridge cannot take the call, instead of silence or an error tone.
pub fn say_and_hang_up(text: &str) -> String {
    let mut xml = String::with_capacity(96 + text.len());
    xml.push_str(r#"<?xml version="1.0" encoding="UTF-8"?><Response><Say>"#);
    // Element text needs the same escapes as an attribute (quotes are harmless but allowed).
    push_escaped(&mut xml, text);
    xml.push_str("</Say><Hangup/></Response>");
    xml
}

/// Appends `value` escaped for XML (and HTML) text and attribute values: the one escaper for
/// the markup voxrelay writes (TwiML here, the benchmark's HTML report).
pub fn push_escaped(out: &mut String, value: &str) {
    for character in value.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            other => out.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SORRY: AfterStream<'static> = AfterStream::Apology("Sorry.");

    #[test]
    fn plain_stream_without_parameters() {
        assert_eq!(
            connect_stream("wss://example.com/media", &[], None, SORRY),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://example.com/media"></Stream></Connect><Say>Sorry.</Say><Hangup/></Response>"#
        );
    }

    #[test]
    fn the_fallback_dials_a_person_after_the_stream() {
        assert_eq!(
            connect_stream(
                "wss://example.com/media",
                &[],
                None,
                AfterStream::Dial("+15550100999")
            ),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://example.com/media"></Stream></Connect><Dial>+15550100999</Dial></Response>"#
        );
        let hostile = connect_stream(
            "wss://e/m",
            &[],
            None,
            AfterStream::Apology("</Say><Dial>1</Dial>"),
        );
        assert!(
            hostile
                .ends_with("<Say>&lt;/Say&gt;&lt;Dial&gt;1&lt;/Dial&gt;</Say><Hangup/></Response>")
        );
    }

    #[test]
    fn parameters_and_status_callback_in_order() {
        assert_eq!(
            connect_stream(
                "wss://example.com/media",
                &[("From", "+14158675309"), ("agent", "sales")],
                Some("https://example.com/status"),
                SORRY,
            ),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect>"#,
                r#"<Stream url="wss://example.com/media" statusCallback="https://example.com/status" statusCallbackMethod="POST">"#,
                r#"<Parameter name="From" value="+14158675309"/>"#,
                r#"<Parameter name="agent" value="sales"/>"#,
                r#"</Stream></Connect><Say>Sorry.</Say><Hangup/></Response>"#
            )
        );
    }

    #[test]
    fn say_and_hang_up_escapes_its_text() {
        assert_eq!(
            say_and_hang_up("Sorry <all> lines & more"),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#,
                r#"<Say>Sorry &lt;all&gt; lines &amp; more</Say><Hangup/></Response>"#
            )
        );
    }

    #[test]
    fn attribute_values_are_escaped() {
        let xml = connect_stream(
            "wss://example.com/a&b",
            &[("n\"a'm<e>", r#"x&"<>'y"#)],
            Some("https://example.com/s?a=1&b=2"),
            SORRY,
        );
        assert_eq!(
            xml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect>"#,
                r#"<Stream url="wss://example.com/a&amp;b" statusCallback="https://example.com/s?a=1&amp;b=2" statusCallbackMethod="POST">"#,
                r#"<Parameter name="n&quot;a&apos;m&lt;e&gt;" value="x&amp;&quot;&lt;&gt;&apos;y"/>"#,
                r#"</Stream></Connect><Say>Sorry.</Say><Hangup/></Response>"#
            )
        );
        // Raw quotes only delimit attributes: the declaration's two, the stream's three and
        // the parameter's two.
        assert_eq!(xml.matches('"').count(), 2 * 2 + 2 * 3 + 2 * 2);
        assert_eq!(xml.matches('<').count(), xml.matches('>').count());
    }
}
