//! The two HTTP/1.1 WebSocket handshakes of the io_uring floor, over bytes: the Twilio side's
//! upgrade (we are the server) and the model side's (we are the client). No socket, no clock.
//!
//! Owns the request and response heads and the `Sec-WebSocket-Accept` check (RFC 6455 §4).
//! Invariants: a head is parsed only whole, within [`MAX_HEAD`] bytes and [`MAX_HEADERS`]
//! headers (more is an error, never a longer wait); nothing panics on peer input.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest as _, Sha1};

/// The longest request or response head accepted: the read buffer's working size.
pub(crate) const MAX_HEAD: usize = super::frame::READ_BUFFER;
/// Headers parsed per head; a real upgrade has about ten.
const MAX_HEADERS: usize = 32;
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why a handshake failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("the HTTP head is malformed")]
    Malformed,
    #[error("the HTTP head is over {MAX_HEAD} bytes")]
    TooLarge,
    #[error("not a WebSocket upgrade")]
    NotAnUpgrade,
    #[error("the model refused the handshake with HTTP {0}")]
    Rejected(u16),
    #[error("the model's Sec-WebSocket-Accept does not match our key")]
    BadAccept,
}

/// `Sec-WebSocket-Accept` for `key`.
fn accept_for(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    BASE64.encode(sha.finalize())
}

fn header<'h>(headers: &'h [httparse::Header<'_>], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case(name))
        .map(|header| header.value)
}

fn contains_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// What the server side of an upgrade decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// The head is not all here yet.
    Partial,
    /// A WebSocket upgrade of `head` bytes; the 101 response is in `out`.
    Accepted { head: usize },
}

/// Parses a client's upgrade request from `bytes`; on success writes the 101 response to
/// `out`. An error is answered with [`BAD_REQUEST`], then the connection closes.
pub(crate) fn accept_upgrade(bytes: &[u8], out: &mut Vec<u8>) -> Result<Upgrade, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(bytes) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD => {
            return Err(HandshakeError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Upgrade::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    let upgrade =
        header(request.headers, "upgrade").is_some_and(|v| contains_token(v, "websocket"));
    let version = header(request.headers, "sec-websocket-version") == Some(b"13");
    let key = header(request.headers, "sec-websocket-key");
    let (true, true, Some(key), Some("GET")) = (upgrade, version, key, request.method) else {
        return Err(HandshakeError::NotAnUpgrade);
    };
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: ",
    );
    out.extend_from_slice(accept_for(key.trim_ascii()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    Ok(Upgrade::Accepted { head })
}

/// The answer to anything that is not a WebSocket upgrade.
pub(crate) const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// The client side of an upgrade: the request written, the answer expected.
#[derive(Debug)]
pub(crate) struct ClientHandshake {
    expected_accept: String,
}

impl ClientHandshake {
    /// Writes the upgrade request for `path` on `host` (as the `Host` header has it) with
    /// `Authorization: Bearer <bearer>` to `out`, keyed with 16 random bytes.
    pub(crate) fn start(out: &mut Vec<u8>, host: &str, path: &str, bearer: &str) -> Self {
        let key = BASE64.encode(rand::random::<[u8; 16]>());
        for part in [
            "GET ",
            path,
            " HTTP/1.1\r\nhost: ",
            host,
            "\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: ",
            &key,
            "\r\nauthorization: Bearer ",
            bearer,
            "\r\n\r\n",
        ] {
            out.extend_from_slice(part.as_bytes());
        }
        Self {
            expected_accept: accept_for(key.as_bytes()),
        }
    }

    /// Parses the model's answer from `bytes`: `Some(head length)` once it has switched
    /// protocols, `None` until the head is all here.
    pub(crate) fn finish(&self, bytes: &[u8]) -> Result<Option<usize>, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(bytes) {
            Ok(httparse::Status::Complete(head)) => head,
            Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD => {
                return Err(HandshakeError::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
            Err(_) => return Err(HandshakeError::Malformed),
        };
        match response.code {
            Some(101) => {}
            Some(code) => return Err(HandshakeError::Rejected(code)),
            None => return Err(HandshakeError::Malformed),
        }
        let accept = header(response.headers, "sec-websocket-accept").map(<[u8]>::trim_ascii);
        if accept != Some(self.expected_accept.as_bytes()) {
            return Err(HandshakeError::BadAccept);
        }
        Ok(Some(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_example_key_gets_the_rfc_example_accept() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn an_upgrade_is_accepted_only_whole_and_only_if_it_is_one() {
        let request = b"GET /twilio/media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81";
        let mut out = Vec::new();
        assert_eq!(
            accept_upgrade(&request[..40], &mut out),
            Ok(Upgrade::Partial)
        );
        assert_eq!(
            accept_upgrade(request, &mut out),
            Ok(Upgrade::Accepted {
                head: request.len() - 1
            })
        );
        let response = String::from_utf8(out).expect("ascii");
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
        assert!(response.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));

        let plain = b"GET /twilio/media HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        assert_eq!(
            accept_upgrade(plain, &mut Vec::new()),
            Err(HandshakeError::NotAnUpgrade)
        );
        assert_eq!(
            accept_upgrade(b"\x00\x01 nonsense\r\n\r\n", &mut Vec::new()),
            Err(HandshakeError::Malformed)
        );
        let endless = [b'a'; MAX_HEAD];
        assert_eq!(
            accept_upgrade(b"GET / HTTP/1.1\r\nx: ", &mut Vec::new()),
            Ok(Upgrade::Partial)
        );
        let mut long = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long.extend_from_slice(&endless);
        assert_eq!(
            accept_upgrade(&long, &mut Vec::new()),
            Err(HandshakeError::TooLarge)
        );
    }

    #[test]
    fn the_client_checks_the_status_and_the_accept() {
        let mut request = Vec::new();
        let handshake =
            ClientHandshake::start(&mut request, "127.0.0.1:9", "/v1/realtime?x=1", "k");
        let request = String::from_utf8(request).expect("ascii");
        assert!(
            request.starts_with("GET /v1/realtime?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nauthorization: Bearer k\r\n"));
        let key = request
            .lines()
            .find_map(|line| line.strip_prefix("sec-websocket-key: "))
            .expect("a key");
        let accept = accept_for(key.as_bytes());
        let good =
            format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        assert_eq!(handshake.finish(&good.as_bytes()[..20]), Ok(None));
        assert_eq!(handshake.finish(good.as_bytes()), Ok(Some(good.len())));
        assert_eq!(
            handshake.finish(b"HTTP/1.1 401 Unauthorized\r\n\r\n"),
            Err(HandshakeError::Rejected(401))
        );
        assert_eq!(
            handshake.finish(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n"),
            Err(HandshakeError::BadAccept)
        );
    }
}
